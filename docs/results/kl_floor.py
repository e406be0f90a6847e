"""The KL floor: how far apart two MLE models of different seeds are, on the same KL estimate the tables use.

    python docs/results/kl_floor.py runs/exp-tiny-inline05-2m-s0 runs/exp-tiny-inline05-2m-s1

KL(MLE_a || MLE_b) in nats per sample, over experiment a's cached reference samples (MLE_a's own, with their
log p): two models that differ only by seed already disagree this much, so a conditional model's "KL from MLE" is
read against it, not against 0. Prints one Markdown row per direction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pretag.evaluate import kl_from_reference, pretag_logprobs
from pretag.models import load_model_dir


def kl_floor(exp_a: Path, exp_b: Path) -> dict:
    [cache] = sorted((exp_a / "cache").glob("reference-*.json"))
    ref = json.loads(cache.read_text())["samples"]
    model, tok, schema = load_model_dir(exp_b / "models" / "mle", device="auto")
    mine = pretag_logprobs(model, tok, schema, [r["text"] for r in ref], None, batch_size=64)
    return kl_from_reference([r["logp_ref"] for r in ref], mine).to_dict()


def main() -> None:
    a, b = map(Path, sys.argv[1:3])
    print("| reference (its MLE's samples) | other MLE | KL (nats/sample) |")
    print("|---|---|---|")
    for x, y in ((a, b), (b, a)):
        k = kl_floor(x, y)
        print(f"| {x.name} | {y.name} | {k['value']:.2f} [{k['lo']:.2f}, {k['hi']:.2f}] (n = {k['n']}) |", flush=True)


if __name__ == "__main__":
    main()
