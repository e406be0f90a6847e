"""Interventions, measured against the unmodified model: temptation, misalignment of samples, held-out loss.

Each intervention is a list of residual-stream edits (``hooks.Edit`` / ``hooks.FeatureEdit``) applied with
``hooks.intervene`` around the very calls the rest of pretag makes: the teacher-forced pass over segment starts
(temptation = P(bad tag) there, paired context by context with the plain model), ``evaluate.generate_samples`` +
``score_samples`` under the default sampling policy (bad tags banned, a good tag forced: the way the model is
used), and ``evaluate.token_logprobs`` over held-out tagged documents (capability, paired document by document).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pretag.interpret.hooks import intervene
from pretag.interpret.probe import Contexts, run_contexts
from pretag.metrics import Estimate, bootstrap_ci


@dataclass
class MeasureConfig:
    samples: int = 256
    """Unconditional samples per intervention (and for the plain model); 0 skips the misalignment column."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 32
    n_resamples: int = 1000
    seed: int = 0


def diff_ci(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """mean(a) - mean(b) for two independent samples, with a percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    stats = [a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean()
             for _ in range(n_resamples)]
    point = float(a.mean() - b.mean())
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), len(a) + len(b))


def pooled_loss_diff(base: Sequence[tuple[float, int]], new: Sequence[tuple[float, int]], *,
                     n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """Change in pooled loss (nats per text token) between two scorings of the same documents, with a paired
    bootstrap over documents."""
    s0, s1 = np.array([s for s, _ in base]), np.array([s for s, _ in new])
    n = np.array([c for _, c in base], dtype=float)

    def stat(idx: np.ndarray) -> float:
        i = idx.astype(int)
        return float((-s1[i].sum() + s0[i].sum()) / max(n[i].sum(), 1))

    return bootstrap_ci(np.arange(len(n)), stat, n_resamples=n_resamples, seed=seed)


class Measurer:
    """Measures the plain model once, then each intervention against it."""

    def __init__(self, model, tokenizer, schema, ctx: Contexts, loss_rows: Sequence[dict], cfg: MeasureConfig):
        from pretag.tokens import TagVocab

        self.model, self.tok, self.schema, self.ctx, self.cfg = model, tokenizer, schema, ctx, cfg
        vocab = TagVocab(tokenizer, schema)
        self.start = vocab.start_id
        self.loss_docs = [vocab.render(list(r["segments"]), schema.row_tags(r)).chunks for r in loss_rows]
        self.base = self._measure([])

    def _measure(self, edits) -> dict:
        from pretag.evaluate import sampling_policy, score_samples, token_logprobs

        cfg, out = self.cfg, {}
        with intervene(self.model, edits):
            out["p_bad"] = run_contexts(self.model, self.ctx)[0]
            out["loss"] = token_logprobs(self.model, self.loss_docs, start_id=self.start,
                                         batch_size=cfg.batch_size) if self.loss_docs else []
            if cfg.samples:
                from pretag.evaluate import generate_samples

                smp = generate_samples(self.model, self.tok, self.schema, sampling_policy(self.schema, True),
                                       [""] * cfg.samples, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed)
                mis = score_samples(self.schema, smp, n_resamples=cfg.n_resamples, seed=cfg.seed)[0]
                out["mis"] = mis[self.ctx.attribute]
                out["examples"] = [s.text for s in smp[:3]]
        return out

    def measure(self, name: str, edits, description: str = "") -> dict:
        """One record: the change in temptation (all contexts, and the contexts of bad segments), in the
        misalignment score and bad-segment fraction of samples, and in held-out loss, each with a 95 % interval."""
        cfg, base = self.cfg, self.base
        new = self._measure(edits)
        boot = {"n_resamples": cfg.n_resamples, "seed": cfg.seed}
        d = new["p_bad"] - base["p_bad"]  # (N,) paired
        lab = self.ctx.label
        rec = {"intervention": name, "description": description,
               "temptation_before": float(base["p_bad"].mean()), "temptation_after": float(new["p_bad"].mean()),
               "d_temptation": bootstrap_ci(d, **boot).to_dict(),
               "d_temptation_bad_segments": bootstrap_ci(d[lab], **boot).to_dict() if lab.any() else None}
        if base["loss"]:
            n = sum(c for _, c in base["loss"])
            rec["loss_before"] = -sum(s for s, _ in base["loss"]) / n
            rec["loss_after"] = -sum(s for s, _ in new["loss"]) / n
            rec["d_loss"] = pooled_loss_diff(base["loss"], new["loss"], **boot).to_dict()
        if "mis" in new and new["mis"].get("n_samples") and base["mis"].get("n_samples"):
            b, a = base["mis"]["per_sample"], new["mis"]["per_sample"]
            rec["score_before"], rec["score_after"] = float(np.mean(b["score"])), float(np.mean(a["score"]))
            rec["d_score"] = diff_ci(a["score"], b["score"], **boot).to_dict()
            frac = [np.asarray(x["bad_segments"], float) / np.maximum(np.asarray(x["segments"], float), 1)
                    for x in (a, b)]
            rec["d_bad_segment_fraction"] = diff_ci(frac[0], frac[1], **boot).to_dict()
            rec["n_samples"] = int(new["mis"]["n_samples"])
            rec["examples"] = new["examples"]
        return rec
