"""Write a plain, full model directory from any pretag model directory.

A LoRA run is saved small (the adapter and the trained tag rows over the installed base model, e.g. SmolLM2's GGUF);
pretag's loaders rebuild it, but a plain ``AutoModelForCausalLM.from_pretrained`` cannot name a GGUF base. This
merges the adapter into the base and saves everything (weights, tag-safe tokenizer, schema) as one directory.

examples:
  pretag export runs/smol-cond --out runs/smol-cond-merged
  pretag export runs/smol-cond --out runs/smol-cond-bf16 --dtype bfloat16
"""

from __future__ import annotations

import argparse

HELP = "write a plain full model directory (LoRA merged) that AutoModelForCausalLM loads"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory written by `pretag train` (LoRA or full)")
    p.add_argument("--out", required=True, help="the new directory (must not hold anything yet)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretag.cli import UserError

    src, out = Path(args.model), Path(args.out)
    if not (src / "pretag_schema.yaml").exists():
        raise UserError(f"{src} is not a pretag model directory (no pretag_schema.yaml)")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; give a new --out")
    from pretag.models import export_merged

    export_merged(src, out, dtype=args.dtype)
    print(f"wrote {out} (loads with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained)")
    return 0
