"""The demo: conditional training + its tag policy against MLE, on checkpoints the project trained itself.

Training that shows the effect takes longer than a demo may (see README, "Results"), so the demo evaluates two
shipped checkpoints — trained by ``pretag experiment`` with the exact config in ``demo/checkpoints/README.md`` —
on a fresh sample budget: misalignment of each with bootstrap intervals, the ratio MLE ÷ conditional with its
interval, a coloured temptation trace of one controlled generation, and the HTML report. Everything runs through
the public API (``run_experiment`` with ``pretrained`` runs, ``generate``), so the demo is also its example.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "demo" / "checkpoints"


@dataclass
class DemoConfig:
    checkpoints: Path = CHECKPOINTS
    """Directory holding ``mle/`` and ``conditional/`` model dirs and ``demo.yaml`` (the experiment to rerun)."""
    samples: int = 384
    """Unconditional samples per model: enough for an interval that can exclude 1, small enough for ~minutes."""
    max_new_tokens: int = 48
    prompt: str = ""
    """Prompt of the traced controlled generation (empty: start of a document)."""
    seed: int = 0


def demo_experiment(cfg: DemoConfig) -> dict[str, Any]:
    """The experiment config of the demo: the shipped checkpoints as pretrained runs, on their task's data."""
    import yaml

    from pretag.modeldir import ADAPTER_FILE

    base = yaml.safe_load((cfg.checkpoints / "demo.yaml").read_text())
    runs = {r: str(cfg.checkpoints / r) for r in ("mle", "conditional")}
    missing = [p for p in runs.values() if not any((Path(p) / f).exists() for f in ("config.json", ADAPTER_FILE))]
    if missing:
        raise FileNotFoundError(f"demo checkpoints missing: {', '.join(missing)} (see demo/checkpoints/README.md "
                                "for the command that trains them)")
    sch = (base.get("data") or {}).get("schema")
    if isinstance(sch, str) and (cfg.checkpoints / sch).is_file():  # a schema shipped beside the checkpoints
        base["data"] = {**base["data"], "schema": str(cfg.checkpoints / sch)}
    ev = {**base.get("eval", {}), "samples": cfg.samples, "max_new_tokens": cfg.max_new_tokens}
    return {**base, **trained_with(runs), "methods": [], "pretrained": runs, "finetune": {"enabled": False},
            "eval": ev, "seed": cfg.seed}


def trained_with(runs: dict[str, str]) -> dict[str, Any]:
    """``model`` and ``tokens`` as the checkpoints were trained (their ``pretag_train.yaml``), so the report says
    what was evaluated, not the experiment defaults (it said ``micro`` on 1M tokens for ``tiny`` on 1.5M)."""
    from pretag.modeldir import ModelDir

    seen = {}
    for run, d in runs.items():
        conf = ModelDir(d).config
        seen[run] = {k: conf[k] for k in ("model", "tokens") if conf.get(k) is not None}
    got = {}
    for k in ("model", "tokens"):
        values = {s[k] for s in seen.values() if k in s}
        if len(values) > 1:
            log.warning("demo checkpoints differ in %s: %s", k, {r: s.get(k) for r, s in seen.items()})
        if values:
            got[k] = seen.get("conditional", {}).get(k, next(iter(values)))
    return got


def run_demo(cfg: DemoConfig, out: str | Path) -> dict[str, Any]:
    """Evaluate the shipped checkpoints and trace one controlled generation; returns the results and the trace."""
    from pretag.experiment import config_from_dict, run_experiment
    from pretag.generate import GenerateConfig, generate
    from pretag.models import load_model_dir

    out = Path(out)
    exp = demo_experiment(cfg)
    res = run_experiment(config_from_dict(exp, where="<demo>"), out)
    model, tok, schema = load_model_dir(cfg.checkpoints / "conditional")
    gen = generate(model, tok, schema, [cfg.prompt], exp.get("policy") or None,  # the policy the samples had
                   config=GenerateConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, seed=cfg.seed, n=1))
    return {"results": res, "trace": gen.sequences[0], "schema": schema, "policy": gen.policy}


def relabel_data(experiment_out: str | Path, source: str, dest: str | Path) -> dict[str, Any]:
    """The data section with which a fresh machine rebuilds an experiment's data from ``source``: its schema (a
    labeled dataset's own ``schema.yaml`` is shipped in ``dest``), and its inline-tag threshold if it had one."""
    import json
    import shutil

    import yaml

    conf = yaml.safe_load((Path(experiment_out) / "config.yaml").read_text())["data"]
    data = {"source": source, "schema": conf["schema"], "label_options": {"num_proc": 2}}
    if conf.get("inline_word_threshold") is not None:
        data["inline_word_threshold"] = conf["inline_word_threshold"]
    if conf.get("labeled"):
        lab, dest = Path(conf["labeled"]), Path(dest)
        if (lab / "inline.json").exists():  # an inline copy: relabel as its source was, then inline again
            info = json.loads((lab / "inline.json").read_text())
            data["inline_word_threshold"] = info["word_threshold"]
            if (Path(info["source"]) / "schema.yaml").exists():
                lab = Path(info["source"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lab / "schema.yaml", dest / "schema.yaml")
        data["schema"] = "schema.yaml"  # resolved beside the checkpoints by demo_experiment
    return data


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "pretag_schema.yaml", "pretag_train.yaml",
                 "metrics.csv")


def save_adapter_bf16(src: str | Path, dest: str | Path) -> Path:
    """Copy a LoRA model dir (``adapter_config.json``: the adapter and tag rows over an installed base) to ``dest``
    with its weights in bf16 and without training checkpoints or logs: half the size, loadable as it was
    (``pretag.models.load_model_dir`` rebuilds it over the base its ``pretag_train.yaml`` names)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    weights = src / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{src}: an adapter dir without {weights.name}")
    shutil.copytree(src, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints", "tensorboard", weights.name))
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    save_file(tensors, dest / weights.name, metadata={"format": "pt"})
    # transformers 5.17 (the GPU machine's) saves a GGUF tokenizer with clean_up_tokenization_spaces: true, which
    # 5.24 warns about on every load and which would make a plain decode rewrite " ." as "."; pretag's text is
    # exact, as the adapters trained here save it (the key absent)
    tc = dest / "tokenizer_config.json"
    if tc.exists():
        conf = json.loads(tc.read_text())
        if conf.pop("clean_up_tokenization_spaces", None) is not None:
            tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    return dest


def export_checkpoints(experiment_out: str | Path, dest: str | Path = CHECKPOINTS, *,
                       data: dict[str, Any] | None = None) -> Path:
    """Copy an experiment's ``mle`` and ``conditional`` models into ``dest`` as bf16 safetensors (half the size;
    ``load_model_dir`` casts back to float32; a LoRA run ships its adapter only, :func:`save_adapter_bf16`), with the ``demo.yaml`` that re-evaluates them. An experiment whose
    tag-trained run is ``conditional_ul`` ships that one as ``conditional/`` (the demo's policy is the same).

    ``data`` replaces the experiment's data section in ``demo.yaml`` (e.g. ``{source: fortunes, schema: toxicity}``
    instead of a local labeled dir), so a fresh machine can rebuild the held-out split by labeling again.
    """
    import shutil

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from pretag.modeldir import ADAPTER_FILE

    src, dest = Path(experiment_out), Path(dest)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    ran = [*(cfg.get("methods") or []), *(cfg.get("pretrained") or {})]
    tagged = next((r for r in ("conditional", "conditional_ul") if r in ran), "conditional")
    for run, name in (("mle", "mle"), (tagged, "conditional")):  # the tag-trained run ships as conditional/
        md, out = src / "models" / run, dest / name
        if not (md / "pretag_train.yaml").exists() and run in (cfg.get("pretrained") or {}):
            md = Path(cfg["pretrained"][run])  # a run the experiment evaluated from an earlier one's model dir
        if not (md / "pretag_train.yaml").exists():
            raise FileNotFoundError(f"{md} is not a finished model dir of the experiment in {src}")
        shutil.rmtree(out, ignore_errors=True)  # a stale model.safetensors beside a new adapter would shadow it
        if (md / ADAPTER_FILE).exists():  # LoRA over an installed base: ship the adapter (and tag rows) only
            save_adapter_bf16(md, out)
            continue
        out.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED_FILES:
            if (md / name).exists() and name != "model.safetensors":
                shutil.copy2(md / name, out / name)
        model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(out)
    keep = {k: cfg[k] for k in ("name", "description", "eval", "policy", "heldout_fraction", "seed") if k in cfg}
    keep["data"] = data or cfg["data"]
    (dest / "demo.yaml").write_text(yaml.safe_dump(keep, sort_keys=False))
    return dest
