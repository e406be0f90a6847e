"""KL from a reference to a tag-trained model read two ways: the paper's (raw logits after the good tags) and the
sampler's (the policy's ban and tag guidance applied, ``pretag.evaluate.sampler_logprobs``), on the same reference
samples. For models evaluated before ``evaluate_model`` reported ``kl.sampler`` (e.g. the demo's checkpoints).

    python docs/results/guidance/sampler_kl.py demo/checkpoints/mle demo/checkpoints/conditional \\
        --policy "ban:bad,guide:bad=3" -n 128 --max-new-tokens 48 [--out F]
"""

from __future__ import annotations

import argparse
import json
import time

from pretag.control import load_policy
from pretag.evaluate import kl_from_reference, pretag_logprobs, reference_samples, sampler_logprobs
from pretag.models import load_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", help="the reference model dir (the MLE model): its samples and their log p")
    ap.add_argument("model", help="the tag-trained model dir")
    ap.add_argument("--policy", required=True, help='the sampling policy, e.g. "ban:bad,guide:bad=3"')
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    ref = reference_samples(a.reference, a.n, max_new_tokens=a.max_new_tokens, seed=a.seed)
    texts, logp_ref = [r["text"] for r in ref], [r["logp_ref"] for r in ref]
    model, tok, schema = load_model_dir(a.model)
    pol = load_policy(a.policy, schema)
    paper = kl_from_reference(logp_ref, pretag_logprobs(model, tok, schema, texts, pol, batch_size=16))
    sampler = kl_from_reference(logp_ref, sampler_logprobs(model, tok, schema, texts, pol))
    out = {"reference": a.reference, "model": a.model, "policy": a.policy, "n": a.n,
           "max_new_tokens": a.max_new_tokens, "kl": paper.to_dict(), "kl_sampler": sampler.to_dict(),
           "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
