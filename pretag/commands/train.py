"""Train a causal LM on a labeled dataset with one of the paper's six objectives.

The config is layered: the method overlay (configs/train/methods/<method>.yaml), the task file
(configs/train/tasks/<schema name>.yaml, with the paper's per-task hyperparameters), --config FILE (same shape as
a task file), then --set key=value. Re-run the same command after an interruption to resume.

examples:
  pretag train runs/stdlib-pep8 --method conditional --model tiny --tokens 2000000 --out runs/pep8-cond
  pretag train runs/stdlib-pep8 --method unlikelihood --set alpha=0.1 --set threshold=0 --out runs/pep8-ul
  pretag train runs/fortunes --method mle --model smollm2 --set lora=true --tokens 200000 --out runs/smol-lora
"""

from __future__ import annotations

import argparse
import os

HELP = "train a model with mle, filter, conditional, unlikelihood, rwr, awr or conditional_ul"
METHODS = ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr", "conditional_ul")  # = OBJECTIVES (tested);
# spelled out so that `pretag --help` does not import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="labeled dataset directory (written by `pretag label`)")
    p.add_argument("--method", choices=METHODS, help="training objective (default: mle, or the config's)")
    p.add_argument("--model", help="size preset (micro, tiny, tiny-llama, small, gpt2-small), a HF model "
                   "directory, a .gguf file, or smollm2 (default: tiny)")
    p.add_argument("--tokens", type=_count, help="training budget in tokens, e.g. 2000000 or 2M (default 2M)")
    p.add_argument("--out", required=True, help="output model directory (also holds checkpoints and logs); a "
                   "folder holding another run is refused, the same command resumes its run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model (pretag's or a plain HF one) already in --out instead of refusing")
    p.add_argument("--config", help="YAML config: keys of the training config, plus `methods: {name: {...}}`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set lr=3e-4 --set threshold=0")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _count(s: str) -> int:
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
    try:
        if s[-1:].lower() in mult:
            return int(float(s[:-1]) * mult[s[-1].lower()])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {s!r} (use e.g. 500000, 500k or 2M)") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json
    from pretag.train import end_distributed, parse_sets, resolve_config, train

    data = Path(args.data)
    if not (data / "schema.yaml").exists():
        raise UserError(f"{data} is not a labeled dataset (no schema.yaml); create one with `pretag label`")
    schema_name = read_schema_name(data)
    try:
        cfg = resolve_config(args.method, schema_name=schema_name, config_file=args.config,
                             sets=parse_sets(args.set), model=args.model, tokens=args.tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep one bar (training); no per-checkpoint "Writing model shards" bars
    try:
        res = train(cfg, data, args.out, overwrite=args.overwrite)
    except ValueError as e:
        raise UserError(str(e)) from None
    end_distributed()
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch, one process reports
        return 0
    summary = {"out": str(res.out), "method": cfg.method, "model": cfg.model, "steps": res.steps,
               "train_loss": res.train_loss, "eval_loss": res.eval_loss, "tokens_per_s": res.tokens_per_s,
               "params": res.params, "resumed_from": res.resumed_from, **res.stats}
    if args.json:
        print_json(summary)
    else:
        ev = f", eval loss {res.eval_loss:.4f}" if res.eval_loss is not None else ""
        tps = f", {res.tokens_per_s:.0f} tokens/s" if res.tokens_per_s else ""
        print(f"trained {cfg.model} with {cfg.method}: {res.steps} steps, train loss {res.train_loss:.4f}{ev}{tps}")
        print(f"model: {res.out}  (metrics.csv, tensorboard/ and checkpoints/ beside it)")
    return 0


def read_schema_name(data) -> str | None:
    from pretag.schema import load_schema

    return load_schema(data / "schema.yaml").name
