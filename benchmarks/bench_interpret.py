"""Cost of activation capture against a plain forward pass over the same batches, in one run.

Run by hand:  OMP_NUM_THREADS=2 python benchmarks/bench_interpret.py [--arch llama] [--repeats 7]
Configurations, interleaved, best of --repeats, on a randomly initialised ``tiny`` preset (speed does not depend on
the weights) and the batch shapes ``pretag interpret`` runs (16 documents x 128 tokens, a segment start every
16 tokens):
    plain          the body + the unembedding at the segment starts, no hooks (``probe.run_contexts`` with no layer)
    capture        + every residual layer (0..L) read at the segment starts (what the probes use)
    plain body     ``model.base_model(...)``, no hooks
    capture all    + one layer read at every token (what the SAE trains on)
    HF forward     ``model(...).logits`` at every position, for reference (the unembedding of every token)
The target is capture <= 1.2x plain.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pretag.interpret.hooks import Recorder, on_residual  # noqa: E402
from pretag.interpret.probe import Batch, Contexts, run_contexts  # noqa: E402
from pretag.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="tiny (GPT-2) or tiny-llama preset")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--every", type=int, default=16, help="a segment start every this many tokens")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("tiny" if args.arch == "gpt2" else "tiny-llama", args.vocab).eval()
    L = model.config.get_text_config().num_hidden_layers
    batches = []
    for _ in range(args.docs // args.batch_size):
        ids = torch.randint(3, args.vocab, (args.batch_size, args.tokens))
        sites = torch.zeros_like(ids, dtype=torch.bool)
        sites[:, args.every - 1 :: args.every] = True
        batches.append(Batch(ids, torch.ones_like(ids), sites))
    n = sum(int(b.sites.sum()) for b in batches)
    ctx = Contexts("bench", 1, 2, batches, np.zeros(n, int), np.zeros(n, bool), [""] * n)

    def body(record: bool):
        rec = Recorder([L // 2])
        with torch.no_grad(), on_residual(model, [L // 2] if record else [], rec):
            for b in batches:
                rec.select = b.mask.bool()
                model.base_model(input_ids=b.ids, attention_mask=b.mask)
        return rec.take()

    def hf():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.ids, attention_mask=b.mask)

    runs = {"plain": lambda: run_contexts(model, ctx, []),
            "capture": lambda: run_contexts(model, ctx, list(range(L + 1))),
            "plain body": lambda: body(False), "capture all": lambda: body(True), "HF forward": hf}
    for f in runs.values():  # warm up
        f()
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    toks = args.docs // args.batch_size * args.batch_size * args.tokens
    print(f"{args.arch} tiny preset, {L} layers, vocab {args.vocab}, {toks} tokens in batches of "
          f"{args.batch_size}x{args.tokens}, {n} segment starts, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    for k, v in best.items():
        print(f"  {k:12s} {v * 1000:8.1f} ms  {toks / v:9.0f} tokens/s")
    print(f"capture / plain = {best['capture'] / best['plain']:.3f}x (target <= 1.2x); "
          f"capture all / plain body = {best['capture all'] / best['plain body']:.3f}x; "
          f"capture / HF forward = {best['capture'] / best['HF forward']:.3f}x")


if __name__ == "__main__":
    main()
