"""Which warning-light aggregate separates bad from clean openings? (analysis for issue 12, run by hand)

    python benchmarks/warning_light_variants.py MODEL_DIR DATA [--n 96] [--tokens 64] [--seed 0]

Continues held-out openings (half holding a bad segment, half clean; ``pretag.evaluate.opening_prompts``) with the
bad tags banned, and reports the AUROC of several aggregates of the pre-ban P(bad tag) over the continuation, for
two renderings of the prompt: as generation renders it (the policy's tag before the first segment, the rest
untagged) and *tagged* (every piece with its classifier tag, as training rendered the text).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pretag.evaluate import heldout_rows, opening_prompts
from pretag.metrics import auroc
from pretag.models import load_model_dir
from pretag.tokens import TagVocab


def openings_with_tags(schema, attr, rows, n, max_chars=160):
    prompts, labels = opening_prompts(schema, attr, rows, n, max_chars=max_chars)
    by_text = {}
    for r in rows:
        p, segs, tags = "", [], {a.name: [] for a in schema.attributes}
        rt = schema.row_tags(r)
        for i, s in enumerate(r["segments"]):
            if p and len(p) + len(s) > max_chars:
                break
            p += s
            segs.append(s)
            for a in schema.attributes:
                tags[a.name].append(rt[a.name][i])
        by_text.setdefault(p, (segs, tags))
    return prompts, labels, [by_text[p] for p in prompts]


@torch.no_grad()
def continue_and_measure(model, vocab, ids, bad_ids, tokens, gen):
    x = torch.tensor([ids])
    out, past = [], None
    logits_in = x
    for _ in range(tokens):
        o = model(input_ids=logits_in, past_key_values=past, use_cache=True)
        past = o.past_key_values
        p = torch.softmax(o.logits[0, -1].float(), -1)
        out.append(float(p[bad_ids].sum()))
        p[bad_ids] = 0
        nxt = torch.multinomial(p / p.sum(), 1, generator=gen)
        if int(nxt) == vocab.tokenizer.eos_token_id:
            break
        logits_in = nxt.view(1, 1)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, schema = load_model_dir(a.model)
    model.eval()
    vocab = TagVocab(tok, schema)
    rows = heldout_rows(a.model, a.data)
    attr = [x for x in schema.segment_attributes if x.bands is None][0]
    bad_ids = \
        [tok.convert_tokens_to_ids(schema.open_token(attr.tags[v])) for v in attr.bad]
    good = attr.tags["good"]
    prompts, labels, tagged = openings_with_tags(schema, attr, rows, a.n)
    res = {}
    for how in ("policy", "tagged"):
        gen = torch.Generator().manual_seed(a.seed)
        curves = []
        for p, (segs, tags) in zip(prompts, tagged):
            if how == "policy":
                ids = vocab.prompt_ids(p, {attr.name: good})
            else:
                ids = ([] if vocab.start_id is None else [vocab.start_id]) + vocab.render(segs, tags, close=False).ids
            curves.append(continue_and_measure(model, vocab, ids, bad_ids, a.tokens, gen))
        aggs = {"mean": np.mean, "max": np.max, "mean_first16": lambda c: np.mean(c[:16]),
                "frac_over_0.1": lambda c: np.mean(c > 0.1), "first": lambda c: c[0]}
        res[how] = {k: auroc([float(f(c)) for c in curves], labels) for k, f in aggs.items()}
        res[how]["mean_after_bad"] = float(np.mean([c.mean() for c, y in zip(curves, labels) if y]))
        res[how]["mean_after_clean"] = float(np.mean([c.mean() for c, y in zip(curves, labels) if not y]))
    print(json.dumps({"model": a.model, "n_prompts": len(prompts), **res}, indent=1))


if __name__ == "__main__":
    main()
