"""Serve a model over HTTP with live temptation, and the web playground at ``/``.

The operator's ``--policy`` is a floor: requests may ban more tags and lower alarm thresholds, never lift a ban or
raise an alarm (such a request is rejected with 422 naming the tag). Requests are queued and run one at a time.

Examples:
  pretag serve runs/toxicity-conditional --policy policy.yaml
  curl -N localhost:8000/v1/completions -d '{"prompt": "Hello", "stream": true, "policy": {"ban": ["bad"]}}'
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "serve a model over HTTP (completions, streamed temptation, playground)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory written by `pretag train`")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--policy", metavar="POLICY",
                   help="operator policy, the floor every request inherits: a YAML file, a shipped policy name or a "
                        "compact string such as 'ban:bad,alarm:bad>0.3=stop'; 'none' = no floor "
                        "(default: pretag's default policy, which bans every bad value)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="generation engine: Hugging Face generate (default) or vLLM (pip install 'pretag[vllm]' or "
                        "make setup-vllm); the same API, policy floor and temptation")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; HF engine only)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens one request may generate")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt accepted, in tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 503")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name accepted on loopback besides localhost/127.0.0.1/[::1], e.g. a reverse proxy's "
                        "(repeatable; other names get 421, against DNS rebinding)")


def run(args: argparse.Namespace) -> int:
    from pretag.cli import UserError

    problems = []
    if not Path(args.model).is_dir():
        problems.append(f"MODEL {args.model!r} is not a directory (expected a model dir written by `pretag train`)")
    if args.policy and args.policy.endswith((".yaml", ".yml")) and not Path(args.policy).is_file():
        problems.append(f"--policy {args.policy!r}: no such file")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    from pretag.serve.app import ServeConfig

    config = ServeConfig(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                         max_queue=args.max_queue, allowed_hosts=tuple(args.allow_host))
    problems += [f"--{p.replace('_', '-')}" for p in config.problems()]
    if problems:
        raise UserError("; ".join(problems))

    import uvicorn

    from pretag.serve.app import create_app
    from pretag.serve.engine import Engine

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("--engine vllm: vLLM is not installed here (pip install 'pretag[vllm]', or make setup-vllm "
                            "and run .venv-vllm/bin/pretag)")
        from pretag.serve.vllm_engine import VllmEngine as engine_cls
    else:
        engine_cls = Engine
    try:
        engine = engine_cls.from_dir(args.model, policy=args.policy, device=device)
        app = create_app(engine, config)
    except ValueError as e:  # policy, model or limit problems, already naming what is wrong
        raise UserError(str(e)) from e
    print(f"pretag serve: {args.model} on http://{args.host}:{args.port}/ (playground at /, API at /v1/completions)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("pretag serve: warning: listening beyond loopback; the API has no authentication")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
