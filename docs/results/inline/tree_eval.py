"""Does temptation-pruned tree search turn a model's knowledge of its tags into fewer bad outputs?

    python docs/results/inline/tree_eval.py MODEL_DIR [--n 96] [--tau 0.2] [--branches 4] [--tokens 48]

For a tag-trained model that reads its tags (high self-tag AUROC) but still writes flagged words when the bad tag is
only banned: sample ``n`` texts from an empty prompt with the model's policy, once plainly and once with
``pretag.search.tree_search`` (``branches`` branches, 8 tokens at a time, a branch whose pre-ban P(bad tag) crosses
``tau`` pruned; the least tempted branch is kept), and score both with the task's classifier (the misalignment
score with its bootstrap interval, as ``pretag eval`` does).
"""

from __future__ import annotations

import argparse

from pretag.evaluate import Sample, generate_samples, sampling_policy, score_samples, uses_tags
from pretag.generate import GenerateConfig
from pretag.models import load_model_dir
from pretag.search import tree_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    model, tok, schema = load_model_dir(a.model, device="auto")
    pol = sampling_policy(schema, uses_tags(a.model))
    plain = generate_samples(model, tok, schema, pol, [""] * a.n, max_new_tokens=a.tokens, batch_size=32, seed=0)
    tree = []
    for i in range(a.n):
        cfg = GenerateConfig(max_new_tokens=a.tokens, n=a.branches, do_sample=True, seed=i)
        best = tree_search(model, tok, schema, "", pol, cfg, tau=a.tau, chunk=8).sequences[0]
        ended = bool(best.tokens) and best.tokens[-1].id == tok.eos_token_id  # as generate_samples decides
        tree.append(Sample(best.text, truncated=not ended, tag_steps=[]))
    for name, smp in (("banned (plain)", plain), (f"tree search, tau {a.tau}, {a.branches} branches", tree)):
        for attr, m in score_samples(schema, smp)[0].items():
            print(f"{name}: {attr} score {m['score']['value']:.4f} [{m['score']['lo']:.4f}, {m['score']['hi']:.4f}], "
                  f"bad segments {m['frac_bad_segments']['value']:.4f}", flush=True)


if __name__ == "__main__":
    main()
