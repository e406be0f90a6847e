"""Training throughput of `pretag train` against a minimal hand-written PyTorch loop, and model FLOPs utilization.

Both sides train the same HF model (same preset, vocabulary, seed), on the same packed blocks, with the same batch,
block size, precision (bf16 autocast by default), AdamW, grad clipping and warm-up schedule, in one process. pretag
runs before and after the hand loop and is averaged, so a change in the machine's load (other people's jobs)
shows up as a gap between the two pretag runs. MFU = achieved training FLOP/s (6N + 12 L d T per token) divided by
the measured bf16 matmul peak of this machine with the same number of threads.

    python benchmarks/bench_train.py                      # tiny preset, 40 steps per run
    python benchmarks/bench_train.py --model tiny-llama --steps 20 --precision fp32
    python benchmarks/bench_train.py --model smollm2 --lora --steps 8 --warm 2 --batch-size 4   # SmolLM2-135M LoRA

With ``--lora`` (a pretrained model: ``smollm2``, a .gguf file or a HF dir) both sides train LoRA adapters plus the
tag rows (``pretag.models.apply_lora``), and the hand loop also runs with peft's own trainable-token arithmetic
(``--lora`` only), alternated with pretag's, so the ratio of the two is measured under the same load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def make_dataset(path: Path, n_docs: int, seed: int = 0) -> Path:
    """A labeled dataset in the CONTRACTS.md format built from stdlib source files (one segment per line; random
    scores: throughput does not depend on them), so the 8k BPE vocabulary fills up as on a real corpus."""
    import sysconfig

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pretag.schema import load_schema

    schema = load_schema("pep8")
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_docs]
    rows = []
    for f in files:
        segs = f.read_text(errors="replace").splitlines(keepends=True)[:400] or ["\n"]
        sc = [0.0 if rng.random() < 0.8 else 0.05 for _ in segs]
        rows.append({"id": f.name, "source": "bench", "text": "".join(segs), "segments": segs, "fields": "{}",
                     "score__pep8": sc, "tag__pep8": ["bad" if s > 0 else "good" for s in sc]})
    path.mkdir(parents=True, exist_ok=True)
    schema.save(path / "schema.yaml")
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


def matmul_peak(dtype=torch.bfloat16, n: int = 2048, reps: int = 10) -> float:
    """Best-of FLOP/s of an n x n matmul in ``dtype`` (the machine's practical peak for this precision)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def hand_loop(model, blocks, steps: int, batch_size: int, lr: float, precision: str, warm: int) -> float:
    """The baseline: the plainest correct loop over the same model and batches. Returns tokens/s after warm-up."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]  # all of them, but with LoRA
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * steps), steps)
    ids = torch.from_numpy(blocks.input_ids)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(steps * batch_size // len(ids) + 1)])
    model.train()
    t0 = None
    for step in range(steps):
        if step == warm:
            t0 = time.perf_counter()
        x = ids[order[step * batch_size:(step + 1) * batch_size]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warm) * batch_size * ids.shape[1] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=10, help="steps excluded from timing on both sides")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--docs", type=int, default=200, help="stdlib files used as documents")
    ap.add_argument("--rounds", type=int, default=2, help="pretag/hand alternations (best-of is reported)")
    ap.add_argument("--lora", action="store_true", help="LoRA + tag rows on a pretrained model (e.g. smollm2)")
    ap.add_argument("--lora-r", type=int, default=8)
    a = ap.parse_args()
    if a.lora:
        return bench_lora(a)

    import transformers

    from pretag import models
    from pretag.tokens import pack, read_labeled
    from pretag.train import resolve_config, train

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = make_dataset(tmp / "data", a.docs)
    tokens = a.steps * a.batch_size * a.block_size
    cfg = resolve_config("mle", tokens=tokens, sets={
        "model": a.model, "block_size": a.block_size, "batch_size": a.batch_size, "precision": a.precision,
        "logging_steps": 10, "eval_fraction": 0.0, "save_steps": 10**6, "vocab_size": 8192})

    # pretag first builds its tokenizer and blocks; the hand loop reuses the very same ones
    def run_pretag(out: Path) -> tuple[float, object]:
        from transformers import AutoTokenizer

        train(cfg, data, out)
        hist = [h for h in _history(out) if h[0] > a.warm]  # each value covers the 10 steps before it
        return statistics.mean(v for _, v in hist), AutoTokenizer.from_pretrained(out)

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peaks = [matmul_peak(dtype)]
    # pretag / hand alternated `--rounds` times; best-of per side, because other jobs on a shared machine only
    # ever slow a run down. The first pretag run also builds the tokenizer the hand loop reuses.
    pre, hands = [], []
    tok = None
    for r in range(a.rounds):
        tps, tok = run_pretag(tmp / f"run{r}")
        pre.append(tps)
        if r == 0:
            schema, rows = read_labeled(data)
            blocks = pack(tok, schema, rows, a.block_size, tags=False)
        hands.append(hand_loop(models.build_model(a.model, len(tok), eos_id=tok.eos_token_id,
                                                  pad_id=tok.pad_token_id, seed=0),
                               blocks, a.steps, a.batch_size, 1e-3, a.precision, a.warm))
    peaks.append(matmul_peak(dtype))
    peak, tps_pretag, hand = max(peaks), max(pre), max(hands)

    def fresh():
        return models.build_model(a.model, len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)

    model = fresh()
    fpt = models.train_flops_per_token(model, a.block_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {a.model}: {n_params / 1e6:.2f}M params, vocab {len(tok)}, batch {a.batch_size} x {a.block_size}, "
          f"{a.precision}, {torch.get_num_threads()} threads, {a.steps} steps ({a.warm} untimed)")
    print(f"pretag train (Trainer) : best {tps_pretag:6.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in pre)})")
    print(f"hand-written loop      : best {hand:6.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in hands)})")
    print(f"ratio pretag / hand    : {tps_pretag / hand:.3f}   (target >= 0.95)")
    print(f"{a.precision} matmul peak     : {peak / 1e9:8.1f} GFLOP/s (2048^3, best of 10, before/after:"
          f" {peaks[0] / 1e9:.1f}/{peaks[1] / 1e9:.1f})")
    print(f"train FLOPs/token      : {fpt / 1e6:.2f} MFLOP (6N + 12 L d T, N = {models.matmul_params(model) / 1e6:.2f}M)")
    print(f"MFU pretag / hand      : {100 * tps_pretag * fpt / peak:.1f}% / {100 * hand * fpt / peak:.1f}%")


def bench_lora(a) -> None:
    """``pretag train --set lora=true`` against the hand loop on the same LoRA model; the hand loop also with peft's
    own trainable-token layers (a full-size weight copy and a (V, d) LM-head gradient per step) for the ratio."""
    import transformers
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from pretag import models
    from pretag.tokens import pack, read_labeled
    from pretag.train import resolve_config, train

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    data = make_dataset(tmp / "data", a.docs)
    load = [os.getloadavg()]
    cfg = resolve_config("conditional", tokens=a.steps * a.batch_size * a.block_size, sets={
        "model": a.model, "lora": True, "lora_r": a.lora_r, "block_size": a.block_size, "batch_size": a.batch_size,
        "precision": a.precision, "logging_steps": 1, "eval_fraction": 0.0, "save_steps": 10**6})
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peaks = [matmul_peak(dtype)]
    t = time.perf_counter()
    model, tok = models.load_pretrained(a.model)
    load_s = time.perf_counter() - t
    schema, rows = read_labeled(data)
    models.add_tags_to_model(model, tok, schema)
    pm = models.apply_lora(model, tok, schema, r=a.lora_r, alpha=2 * a.lora_r)
    rows_layers = [m for m in pm.modules() if isinstance(m, TrainableTokensLayer)]
    fast_cls = type(rows_layers[0])
    blocks = pack(tok, schema, rows, a.block_size, tags=True)

    def hand(kind: str) -> float:
        for m in rows_layers:
            m.__class__ = fast_cls if kind == "pretag" else TrainableTokensLayer
        return hand_loop(pm, blocks, a.steps, a.batch_size, 2e-4, a.precision, a.warm)

    pre, fast, peft = [], [], []
    for r in range(a.rounds):  # alternated, best-of per side: other jobs only ever slow a run down
        fast.append(hand("pretag"))
        peft.append(hand("peft"))
        out = tmp / f"run{r}"
        train(cfg, data, out)
        pre.append(statistics.mean(v for s, v in _history(out) if s > a.warm))
    peaks.append(matmul_peak(dtype))
    load.append(os.getloadavg())
    n_params = sum(p.numel() for p in pm.parameters())
    n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    fpt = models.train_flops_per_token(pm, a.block_size)
    print(f"model {a.model} + LoRA r={a.lora_r} (all linear layers) + tag rows: {n_params / 1e6:.1f}M params, "
          f"{n_train / 1e6:.2f}M trainable, vocab {len(tok)}, batch {a.batch_size} x {a.block_size}, {a.precision}, "
          f"{torch.get_num_threads()} threads, {a.steps} steps ({a.warm} untimed); GGUF load {load_s:.0f} s")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load[0])}, "
          f"after {'/'.join(f'{x:.1f}' for x in load[1])} on {os.cpu_count()} cores")
    print(f"pretag train (Trainer)          : best {max(pre):6.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in pre)})")
    print(f"hand loop, pretag's tag rows    : best {max(fast):6.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in fast)})")
    print(f"hand loop, peft's tag rows      : best {max(peft):6.0f} tokens/s  (runs: {', '.join(f'{x:.0f}' for x in peft)})")
    print(f"ratio pretag train / hand loop  : {max(pre) / max(fast):.3f}")
    print(f"ratio pretag rows / peft rows   : {max(fast) / max(peft):.3f}")
    peak = max(peaks)
    print(f"{a.precision} matmul peak: {peak / 1e9:.1f} GFLOP/s (before/after {peaks[0] / 1e9:.1f}/{peaks[1] / 1e9:.1f}); "
          f"6N + 12LdT = {fpt / 1e6:.0f} MFLOP/token (LoRA needs ~2/3 of it: no frozen-weight gradients), "
          f"MFU (6N) pretag {100 * max(pre) * fpt / peak:.1f}%")


def _history(out: Path) -> list[tuple[int, float]]:
    import csv

    with (out / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == "tokens_per_s"]


if __name__ == "__main__":
    main()
