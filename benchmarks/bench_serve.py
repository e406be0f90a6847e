"""Load test for `pretag serve`: N concurrent clients on loopback for a bounded time.

Reports requests per second, p50/p99 latency, errors, and "lost" requests (any answer that is not complete: a
stream without its ``done`` event, or a token count that does not match the summary). Half the requests stream.

    python benchmarks/bench_serve.py                      # tiny untrained model built on the fly
    python benchmarks/bench_serve.py --model runs/x --clients 16 --seconds 30 --tokens 32
    .venv-vllm/bin/python benchmarks/bench_serve.py --engine vllm     # the same clients against the vLLM engine

The model built on the fly is 1 layer, width 64, one head (head_dim 64: vLLM's CPU attention has no head_dim 16
kernel), the same for both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def client(url: str, i: int, deadline: float, tokens: int, out: list, lock: threading.Lock) -> None:
    import httpx

    k = 0
    with httpx.Client(timeout=120) as http:
        while time.perf_counter() < deadline:
            stream = (i + k) % 2 == 0
            body = {"prompt": f"Client {i} request {k}. ", "max_new_tokens": tokens, "seed": k, "stream": stream,
                    "policy": {"ban": ["bad"], "alarms": {"bad": 0.2}}}
            t0 = time.perf_counter()
            status, complete = 0, False
            try:
                r = http.post(url + "/v1/completions", json=body)
                status = r.status_code
                if status == 200 and stream:
                    events = [b.split("\n") for b in r.text.strip().split("\n\n")]
                    kinds = [e[0].removeprefix("event: ") for e in events]
                    done = json.loads(events[-1][1].removeprefix("data: "))
                    complete = kinds[-1] == "done" and kinds.count("token") == done["n_tokens"] >= 1
                elif status == 200:
                    j = r.json()
                    complete = len(j["tokens"]) == j["n_tokens"] >= 1
            except Exception as e:  # counted as an error, never hidden
                status = f"{type(e).__name__}"
            with lock:
                out.append((time.perf_counter() - t0, status, complete, stream))
            k += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a tiny untrained one, built now)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens per request")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        ap.error("--clients must be in 1..256 and --seconds in (0, 600]")

    from pretag.models import Preset
    from pretag.serve.app import ServeConfig, background_server, create_app
    from pretag.serve.engine import Engine
    from pretag.serve.tiny import build_tiny_model_dir

    model = args.model or build_tiny_model_dir(tempfile.mkdtemp(prefix="pretag-bench-"), "toxicity",
                                               preset=Preset("gpt2", 1, 64, 1, 256))
    if args.engine == "vllm":
        from pretag.serve.vllm_engine import VllmEngine as Engine
    engine = Engine.from_dir(model, policy="none")
    config = ServeConfig(max_queue=max(64, args.clients * 2))
    with background_server(create_app(engine, config), host="127.0.0.1") as url:
        import httpx

        httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_new_tokens": 4}, timeout=60)
        out: list = []
        lock = threading.Lock()
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(url, i, deadline, args.tokens, out, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        metrics = httpx.get(url + "/metrics").json()
    lat = [x[0] for x in out]
    errors = [x for x in out if x[1] != 200]
    lost = [x for x in out if x[1] == 200 and not x[2]]
    print(f"engine: {args.engine}; model: {model} ({engine.device}); {args.clients} clients x {args.seconds:g}s, "
          f"max_new_tokens {args.tokens}, half streaming")
    print(f"requests: {len(out)} in {wall:.1f}s = {len(out) / wall:.2f} req/s; "
          f"tokens/s (server): {metrics['tokens_per_s']}")
    print(f"latency: p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms, "
          f"mean {statistics.mean(lat) * 1000:.0f} ms; server queue wait p50 "
          f"{metrics['queue_wait_s']['p50'] * 1000:.0f} ms")
    print(f"errors: {len(errors)}; lost (incomplete answers): {len(lost)}; server errors: {metrics['errors']}")
    if errors or lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
