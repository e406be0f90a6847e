"""Where a conditional model's residual misalignment comes from: leaked flagged words, or the classifier's floor.

    python docs/results/inline/leak.py INLINE_DATA MODEL_DIR [MODEL_DIR ...] [--samples 256] [--seed 1]

Samples each model as its evaluation does (a tag-trained one after <|good|> with <|bad|> banned, others plainly),
then reports the share of its words that the inline copy flagged (the words that only ever followed <|bad|> in
training), the evaluation's misalignment score (per-sentence profanity, character-weighted, mean over samples), and
the same score with every flagged word deleted from the samples: what the model would score if no flagged word
leaked, i.e. the classifier's floor on its text.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from pretag.evaluate import generate_samples, sampling_policy, uses_tags
from pretag.inline import WORD
from pretag.label import load_labeled
from pretag.metrics import sample_score
from pretag.models import load_model_dir
from pretag.scorers import build_scorer
from pretag.segment import segment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(2)
    schema, rows = load_labeled(a.data)
    attr = [x for x in schema.segment_attributes if x.bands is None][0]
    bad = attr.tags["bad"]
    flagged = {m.group(0).lower() for r in rows for s, t in zip(r["segments"], r[f"tag__{attr.name}"]) if t == bad
               for m in WORD.finditer(s)}
    scorer = build_scorer(attr.scorer)
    sign = 1.0 if attr.higher_is_worse else -1.0

    def score(texts: list[str]) -> float:
        out = []
        for t in texts:
            segs = [s for s in segment(t, schema.segmenter) if s.strip()]
            if segs:
                out.append(sign * sample_score(segs, scorer.score_texts(segs)))
        return float(np.mean(out))

    print(f"{len(flagged)} flagged words in {a.data}")
    print("| model | flagged share of words | misalignment score | flagged words deleted | most common leaks |")
    print("|---|---|---|---|---|")
    for d in a.models:
        model, tok, sch = load_model_dir(d)
        model.eval()
        smp = generate_samples(model, tok, sch, sampling_policy(sch, uses_tags(d)), [""] * a.samples,
                               max_new_tokens=64, batch_size=64, seed=a.seed)
        texts = [s.text for s in smp]
        words = [m.group(0).lower() for t in texts for m in WORD.finditer(t)]
        leaks = Counter(w for w in words if w in flagged)
        clean = [WORD.sub(lambda m: "" if m.group(0).lower() in flagged else m.group(0), t) for t in texts]
        print(f"| {d} | {sum(leaks.values()) / max(len(words), 1):.2%} | {score(texts):.4f} | {score(clean):.4f} | "
              f"{', '.join(w for w, _ in leaks.most_common(8))} |")


if __name__ == "__main__":
    main()
