"""``interpret``: the whole bridge for one model and one labeled dataset, in the order of issue 14.

1. residual stream at held-out segment starts, a probe and a difference-of-means direction per layer;
2. direct logit attribution of logit(bad) - logit(good) to the embeddings, each head and each MLP;
3. a TopK SAE on the most informative layer, features ranked by correlation with P(bad tag) and the verdict;
4. interventions (ablate, scrub, steer, SAE features, the tag directions), measured against the plain model;
5. the report (``report.write_report``) and the records ``--json`` prints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretag.interpret import attribution, probe, sae
from pretag.interpret.hooks import Edit, FeatureEdit, direction_edit, layout
from pretag.interpret.measure import MeasureConfig, Measurer

log = logging.getLogger(__name__)


@dataclass
class InterpretConfig:
    attribute: str | None = None
    """Binary segment attribute to study (default: the schema's first)."""
    heldout_docs: int | None = None
    """Held-out documents to read (None: all that ``pretag train`` held out)."""
    train_fraction: float = 0.7
    """Documents whose segment starts train the probes; the rest measure them."""
    sae_features: int = 1024
    sae_k: int = 16
    sae_steps: int = 1000
    sae_layer: int | None = None
    """None: the layer with the best held-out probe AUROC."""
    top_features: int = 10
    ablate_features: int = 3
    """The SAE intervention removes this many of the features most positively correlated with P(bad tag)."""
    steer: tuple[float, ...] = (1.0, -1.0)
    """Steering amounts, in units of the difference-of-means vector (bad minus good) at the chosen layer."""
    interventions: bool = True
    loss_docs: int = 128
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    n_resamples: int = 1000
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if not 0 < self.train_fraction < 1:
            problems.append(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0 < self.sae_k <= self.sae_features:
            problems.append(f"need 0 < sae_k <= sae_features, got {self.sae_k} and {self.sae_features}")
        if self.measure.samples < 0 or self.loss_docs < 0:
            problems.append("samples and loss_docs must be >= 0")
        if problems:
            raise ValueError("interpret settings: " + "; ".join(problems))


def interventions(model, tokenizer, schema, ctx: probe.Contexts, directions: dict[int, torch.Tensor], layer: int,
                  feats: list[dict], sae_model, cfg: InterpretConfig) -> list[tuple[str, list, str]]:
    """(name, edits, description) of every intervention the report measures."""
    n = layout(model).n_layers
    dm = directions[layer]
    unit = dm / dm.norm()
    mean_proj = float((ctx.acts[layer] @ unit).mean())
    bad = schema.attribute(ctx.attribute).tags["bad"]
    out = [("control: steer by 0", [Edit(dm, tuple(range(n + 1)), "steer", 0.0)],
            "adds 0 x the direction at every layer: must change nothing"),
           (f"ablate diff-of-means L{layer}", [Edit(dm, (layer,), "ablate")],
            f"project the bad-minus-good mean direction out of layer {layer}"),
           ("ablate diff-of-means, every layer", [Edit(directions[i], (i,), "ablate") for i in sorted(directions)],
            "each layer's own difference-of-means direction projected out of it"),
           (f"scrub diff-of-means L{layer}", [Edit(dm, (layer,), "scrub", mean_proj)],
            f"component along the direction set to its mean over contexts ({mean_proj:.3g})")]
    out += [(f"steer {s:+g} x diff-of-means L{layer}", [Edit(dm, (layer,), "steer", s)],
             f"add {s:g} x (mean bad - mean good) at layer {layer}, every position") for s in cfg.steer]
    pos = [f["feature"] for f in feats if f["corr_p_bad"] > 0][: cfg.ablate_features]
    if sae_model is not None and pos:
        out.append((f"ablate SAE features {pos} L{layer}", [FeatureEdit(sae_model, pos, (layer,))],
                    "remove the features most correlated with P(bad tag) (the SAE's error term kept)"))
    out.append((f"ablate tag direction '{bad}' (generate --ablate-direction {bad})",
                [direction_edit(model, tokenizer, schema, bad)],
                "the direction the final norm + unembedding read logit(bad) - logit(good) from, every layer"))
    out.append((f"ablate embedding row 'embed:{bad}'", [direction_edit(model, tokenizer, schema, f"embed:{bad}")],
                "the <|bad|> embedding row minus the good one, every layer"))
    return out


def interpret_model(model, tokenizer, schema, rows: list[dict], cfg: InterpretConfig | None = None,
                    out: str | Path | None = None) -> dict[str, Any]:
    """Run everything on an in-memory model and held-out labeled rows; write the artifacts to ``out`` if given."""
    cfg = cfg or InterpretConfig()
    cfg.validate()
    t0 = time.perf_counter()
    model.eval()
    boot = {"n_resamples": cfg.n_resamples, "seed": cfg.seed}
    rows = rows[: cfg.heldout_docs] if cfg.heldout_docs else rows
    ctx = probe.build_contexts(model, tokenizer, schema, rows, cfg.attribute)
    t_cap = time.perf_counter()
    probe.capture(model, ctx)
    t_cap = time.perf_counter() - t_cap
    from pretag.metrics import auroc

    layers, directions = probe.layer_curve(model, tokenizer, schema, ctx, train_fraction=cfg.train_fraction, **boot)
    test = ~probe.split_docs(ctx.doc, cfg.train_fraction, cfg.seed)
    summary: dict[str, Any] = {
        "attribute": ctx.attribute, "n_docs": len(rows), "n_contexts": len(ctx.label),
        "n_bad": int(ctx.label.sum()), "capture_s": t_cap, "layers": layout(model).n_layers,
        "model_auroc": probe.auroc_ci(ctx.p_rel[test], ctx.label[test], **boot).to_dict(),
        "model_auroc_all": auroc(ctx.p_rel, ctx.label), "mean_temptation": float(ctx.p_bad.mean())}
    best = cfg.sae_layer if cfg.sae_layer is not None else probe.best_layer(layers)
    summary["best_layer"] = best
    attr = attribution.attribution_summary(model, ctx, **boot)
    X = sae.token_activations(model, ctx, best)
    sae_model, sae_stats = sae.train_sae(X, n_features=cfg.sae_features, k=cfg.sae_k, steps=cfg.sae_steps,
                                         seed=cfg.seed)
    feats = sae.rank_features(sae_model, ctx, best, top=cfg.top_features)
    result: dict[str, Any] = {"summary": summary, "layers": layers, "attribution": attr,
                              "sae": {**sae_stats, "layer": best}, "features": feats, "interventions": [],
                              "config": asdict(cfg)}
    if cfg.interventions and best in directions:
        m = Measurer(model, tokenizer, schema, ctx, rows[: cfg.loss_docs], cfg.measure)
        for name, edits, desc in interventions(model, tokenizer, schema, ctx, directions, best, feats, sae_model,
                                               cfg):
            log.info("measuring intervention: %s", name)
            result["interventions"].append(m.measure(name, edits, desc))
    summary["wall_s"] = time.perf_counter() - t0
    if out is not None:
        from pretag.interpret.report import write_outputs

        write_outputs(result, Path(out), directions=directions, sae_model=sae_model, best=best)
    return result


def interpret(model_dir: str | Path, data: str | Path, out: str | Path | None = None,
              config: InterpretConfig | None = None) -> dict[str, Any]:
    """``pretag interpret MODEL --data LABELED --out DIR``: the documents ``pretag train`` held out of this
    model (the same hash split ``pretag eval`` uses), read, attributed, decomposed and intervened on."""
    from pretag.evaluate import heldout_rows
    from pretag.metrics import json_safe
    from pretag.models import load_model_dir

    model, tok, schema = load_model_dir(model_dir)
    rows = heldout_rows(model_dir, data, (config or InterpretConfig()).heldout_docs)
    res = interpret_model(model, tok, schema, rows, config, out)
    res["summary"]["model"], res["summary"]["data"] = str(model_dir), str(data)
    return json_safe(res)
