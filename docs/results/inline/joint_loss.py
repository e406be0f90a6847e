"""Capability without oracle tags: each run's held-out loss three ways, on the same held-out documents.

    python docs/results/inline/joint_loss.py runs/exp-tiny-inline05-2m-s0 [more experiment folders...]

``untagged`` (plain text), ``tagged`` (the classifier's tags in context, never counted: what the README's tables
compare with MLE's untagged loss) and ``joint`` (the tags counted too, per text token: −log p(text, tags) / n_text,
an upper bound on the conditional model's loss on plain text that needs no oracle tags). Inline tags announce that a
flagged word follows, so ``tagged`` flatters a conditional model; ``joint`` does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretag.evaluate import heldout_loss, heldout_rows, uses_tags
from pretag.models import load_model_dir


def losses(model_dir: Path, data: Path, n_docs: int) -> dict[str, float]:
    model, tok, schema = load_model_dir(model_dir, device="auto")
    held = heldout_rows(model_dir, data, n_docs)
    res = heldout_loss(model, tok, schema, held, joint=uses_tags(model_dir), batch_size=32)
    return {k: v["loss"] for k, v in res.items()}


def main() -> None:
    import yaml

    print("| experiment | MLE untagged | conditional tagged (cost) | conditional joint, no oracle (cost) |")
    print("|---|---|---|---|")
    for exp in map(Path, sys.argv[1:]):
        cfg = yaml.safe_load((exp / "config.yaml").read_text())
        data, n = Path(cfg["data"]["labeled"]), cfg["eval"]["heldout_docs"]
        if cfg["data"].get("inline_word_threshold") is not None:
            data = exp / "data-inline"
        mle_dir = exp / "models" / "mle"
        if not mle_dir.exists():  # an MLE shared with another experiment (config's pretrained.mle, repo-relative)
            mle_dir = Path(cfg["pretrained"]["mle"])
        mle = losses(mle_dir, data, n)["untagged"]
        c = losses(exp / "models" / "conditional", data, n)
        print(f"| {exp.name} | {mle:.3f} | {c['tagged']:.3f} ({100 * (c['tagged'] / mle - 1):+.1f} %) | "
              f"{c['joint']:.3f} ({100 * (c['joint'] / mle - 1):+.1f} %) |", flush=True)


if __name__ == "__main__":
    main()
