"""Tag guidance on one model: the misalignment score of its samples under the plain ban and under
``guide: {bad: w}`` for each weight (same seeds), their diversity, and how typical they are to a reference model
(its mean NLL per token of the samples: guidance that broke the text would raise it).

    python docs/results/guidance/guide_probe.py MODEL_DIR --schema SCHEMA -n 128 -w 0 1 3 [--ref MLE_DIR] [--out F]

With ``--ref`` and ``--kl-samples N`` each weight also gets ``kl_sampler``: KL(reference || the guided sampler) on N
reference samples (``pretag.evaluate.sampler_logprobs``), the capability side of the weight's trade-off.
"""

from __future__ import annotations

import argparse
import json
import time

from pretag.control import TagPolicy, default_policy
from pretag.evaluate import (
    encode_plain,
    generate_samples,
    kl_from_reference,
    reference_samples,
    sampler_logprobs,
    score_samples,
    token_logprobs,
)
from pretag.metrics import distinct_n
from pretag.models import load_model_dir
from pretag.schema import load_schema
from pretag.tokens import TagVocab


def nll_per_token(model, tok, schema, texts: list[str]) -> float:
    start = TagVocab(tok, schema).start_id
    docs = [[(encode_plain(tok, t), True)] for t in texts if t]
    scored = token_logprobs(model, docs, start_id=start, batch_size=32)
    return -sum(s for s, _ in scored) / max(1, sum(n for _, n in scored))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--schema", required=True, help="the task schema that scores the samples")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-w", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    ap.add_argument("--ref", default=None, help="reference model dir (the MLE fine-tune) for the samples' NLL")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--kl-samples", type=int, default=0, help="with --ref: KL to each guided sampler on N samples")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tok, own = load_model_dir(a.model)
    schema = load_schema(a.schema)
    ref = load_model_dir(a.ref) if a.ref else None
    base = default_policy(own)
    kl_ref = (reference_samples(a.ref, a.kl_samples, max_new_tokens=a.max_new_tokens, seed=0)
              if a.ref and a.kl_samples else None)
    rows = []
    for w in a.w:
        pol = TagPolicy(ban=list(base.ban), guide={t: w for t in base.ban} if w else {}, name=f"guide{w:g}")
        t0 = time.time()
        samples = generate_samples(model, tok, own, pol, [""] * a.n, max_new_tokens=a.max_new_tokens,
                                   batch_size=32, seed=0)
        wall = time.time() - t0
        summ, _ = score_samples(schema, samples)
        s = summ[schema.attributes[0].name]
        texts = [x.text for x in samples]
        row = {"guide": w, "score": s["score"], "frac_bad_segments": s.get("frac_bad_segments"),
               "distinct_2": distinct_n(texts, 2), "sampling_s": round(wall, 1),
               "ref_nll": nll_per_token(ref[0], ref[1], ref[2], texts) if ref else None}
        if kl_ref is not None:
            q = sampler_logprobs(model, tok, own, [r["text"] for r in kl_ref], pol)
            row["kl_sampler"] = kl_from_reference([r["logp_ref"] for r in kl_ref], q).to_dict()
        row["samples"] = texts[:6]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        for t in texts[:3]:
            print("   ", repr(t[:160]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "schema": a.schema, "n": a.n, "ref": a.ref, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
