"""The HTTP API and the playground: ``create_app(engine)`` returns a FastAPI app.

Routes (JSON unless said otherwise):

- ``POST /v1/completions``: generate under the operator's policy tightened by the request's; ``"stream": true``
  answers server-sent events (``start``, one ``token`` per token with its temptation per tag and alarms,
  ``done``; or ``error``).
- ``GET /v1/policy``: the schema's tags, the operator's floor and the server's limits (the playground reads it).
- ``GET /health``: liveness plus the model and queue state. ``GET /metrics``: counters and latency percentiles
  (``?format=prometheus`` for the text exposition format).
- ``GET /``: the playground page (static HTML/JS/CSS, no build step, nothing fetched from outside).

Every bad request gets a 4xx whose ``error`` names each problem (unknown field, limit exceeded, unknown tag, an
attempt to lift the operator's floor); a full queue gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from pretag.control import TagPolicy
from pretag.serve.engine import Engine, GenParams
from pretag.serve.floor import PolicyFloorError, RequestPolicy, describe, merge
from pretag.serve.worker import Job, Metrics, QueueFull, Worker

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """Server limits. Each bounds what one request can cost, so one client cannot starve the others."""

    max_prompt_chars: int = 8000
    """Checked before tokenizing, so a huge prompt costs nothing."""
    max_prompt_tokens: int = 1024
    """Checked after tokenizing; also bounded by the model's context minus the output budget."""
    max_new_tokens: int = 256
    """The most tokens one request may ask for."""
    default_new_tokens: int = 48
    """Used when a request does not say; capped at ``max_new_tokens``."""
    max_queue: int = 64
    """Requests waiting behind the running one; beyond this the server answers 503 instead of growing memory."""

    def problems(self) -> list[str]:
        out = []
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 1:
                out.append(f"{k} must be a positive integer, got {v!r}")
        return out


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ban: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    force: list[str] = Field(default_factory=list)
    bias: dict[str, float] = Field(default_factory=dict)
    alarms: dict[str, float] = Field(default_factory=dict)
    stop_on_alarm: bool | None = None


class CompletionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    policy: PolicyIn = Field(default_factory=PolicyIn)


def _error(status: int, problems: list[str], headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``error`` (a sentence naming every problem) and ``problems`` (the list)."""
    msg = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
    return JSONResponse({"error": msg, "problems": problems}, status_code=status, headers=headers)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """Build the app around a loaded :class:`~pretag.serve.engine.Engine` (one model, one operator policy)."""
    config = config or ServeConfig()
    if problems := config.problems():
        raise ValueError("invalid serve config: " + "; ".join(problems))
    metrics = Metrics()
    worker = Worker(lambda job: _run_job(engine, job, metrics), max_queue=config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="pretag serve", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.config, app.state.metrics, app.state.worker = engine, config, metrics, worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.incr("rejected")
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            msg = "unknown field (not part of the API)" if e.get("type") == "extra_forbidden" else e.get("msg")
            problems.append(f"{where}: {msg}")
        return _error(422, problems)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "schema": engine.schema.name, "device": engine.device,
                "queue": {"waiting": worker.depth, "busy": worker.busy, "max": worker.max_queue}}

    @app.get("/metrics")
    def get_metrics(format: str = "json") -> Any:
        snap = {**metrics.snapshot(), "queue_waiting": worker.depth, "busy": worker.busy}
        if format == "prometheus":
            return PlainTextResponse(_prometheus(snap), media_type="text/plain; version=0.0.4")
        if format != "json":
            return _error(422, [f"format: must be 'json' or 'prometheus', got {format!r}"])
        return snap

    @app.get("/v1/policy")
    def policy() -> dict[str, Any]:
        return {"schema": engine.schema.name, "tags": engine.schema.tag_names,
                "bad_tags": [a.tags[v] for a in engine.schema.attributes for v in a.bad],
                "operator": describe(engine.operator), "limits": asdict(config)}

    @app.post("/v1/completions")
    async def completions(body: CompletionIn) -> Any:
        metrics.incr("requests")
        t0 = time.perf_counter()
        try:
            params, prompt_ids, effective = _check(engine, config, body)
        except PolicyFloorError as e:
            metrics.incr("rejected")
            return _error(422, e.problems)
        job = Job(payload=(body.prompt, effective, params), loop=asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as e:
            metrics.incr("queue_full")
            return _error(503, [str(e)], headers={"Retry-After": "1"})
        start = {"policy": describe(effective), "prompt_tokens": len(prompt_ids), "queued": worker.depth}
        if body.stream:
            return StreamingResponse(_stream(job, start, metrics, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tokens: list[dict[str, Any]] = []
        try:
            while (ev := await job.events.get())["event"] != "end":
                if ev["event"] == "token":
                    tokens.append(ev["data"])
                elif ev["event"] == "done":
                    metrics.incr("completed")
                    _observe(metrics, job, t0, ev["data"])
                    return {**ev["data"], "tokens": tokens, "policy": start["policy"],
                            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens)}}
                elif ev["event"] == "error":
                    metrics.incr("errors")
                    return _error(ev.get("status", 500), [ev["message"]])
        finally:
            job.cancelled.set()  # no-op once done; stops the worker if the client went away
        metrics.incr("errors")
        return _error(500, ["generation ended without a result"])

    return app


def _check(engine: Engine, config: ServeConfig, body: CompletionIn) -> tuple[GenParams, list[int], TagPolicy]:
    """Every problem with a request, collected into one PolicyFloorError (a 422)."""
    problems: list[str] = []
    n_new = body.max_new_tokens if body.max_new_tokens is not None else min(config.default_new_tokens,
                                                                            config.max_new_tokens)
    if len(body.prompt) > config.max_prompt_chars:
        problems.append(f"prompt: {len(body.prompt)} characters exceeds the limit of {config.max_prompt_chars}")
    if not 1 <= n_new <= config.max_new_tokens:
        problems.append(f"max_new_tokens: must be between 1 and {config.max_new_tokens}, got {n_new}")
    if body.temperature < 0:
        problems.append(f"temperature: must be >= 0 (0 = greedy), got {body.temperature}")
    if body.top_k is not None and body.top_k < 1:
        problems.append(f"top_k: must be >= 1, got {body.top_k}")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        problems.append(f"top_p: must be in (0, 1], got {body.top_p}")
    request = RequestPolicy(**body.policy.model_dump())
    effective = None
    try:
        effective = merge(engine.operator, request, engine.schema)
    except PolicyFloorError as e:
        problems.extend(e.problems)
    prompt_ids: list[int] = []
    if len(body.prompt) <= config.max_prompt_chars and effective is not None:
        prompt_ids = engine.encode(body.prompt, effective)
        limit = min(config.max_prompt_tokens, engine.context_length - min(n_new, config.max_new_tokens))
        if len(prompt_ids) > limit:
            problems.append(f"prompt: {len(prompt_ids)} tokens exceeds the limit of {limit} "
                            f"(max_prompt_tokens {config.max_prompt_tokens}, context {engine.context_length} "
                            f"minus max_new_tokens)")
    if problems or effective is None:
        raise PolicyFloorError(problems)
    params = GenParams(max_new_tokens=n_new, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                       seed=body.seed)
    return params, prompt_ids, effective


def _run_job(engine: Engine, job: Job, metrics: Metrics) -> None:
    """Worker side: run one generation, emitting a ``token`` event per token and a final ``done``."""
    prompt, policy, params = job.payload
    job.started_at = time.perf_counter()
    summary = engine.generate(prompt, policy, params,
                              on_token=lambda tok: job.emit({"event": "token", "data": tok}),
                              cancelled=job.cancelled.is_set)
    if job.cancelled.is_set():
        metrics.incr("cancelled")
    metrics.incr("alarms", len(summary.get("alarms", [])))
    summary["gen_s"] = round(time.perf_counter() - job.started_at, 6)
    job.emit({"event": "done", "data": summary})


def _observe(metrics: Metrics, job: Job, t0: float, summary: dict[str, Any]) -> None:
    started = getattr(job, "started_at", job.enqueued_at)
    metrics.observe(time.perf_counter() - t0, started - job.enqueued_at, summary.get("gen_s", 0.0),
                    summary.get("n_tokens", 0))


async def _stream(job: Job, start: dict[str, Any], metrics: Metrics, t0: float):
    """Server-sent events for one job; a client that goes away cancels the generation."""
    try:
        yield _sse("start", start)
        while (ev := await job.events.get())["event"] != "end":
            if ev["event"] == "done":
                metrics.incr("completed")
                _observe(metrics, job, t0, ev["data"])
            elif ev["event"] == "error":
                metrics.incr("errors")
                ev = {"event": "error", "data": {"status": ev.get("status", 500), "error": ev["message"]}}
            yield _sse(ev["event"], ev["data"])
    finally:
        job.cancelled.set()


def _prometheus(snap: dict[str, Any]) -> str:
    lines = []
    for k in ("requests", "completed", "rejected", "errors", "cancelled", "queue_full", "tokens", "alarms"):
        lines += [f"# TYPE pretag_{k}_total counter", f"pretag_{k}_total {snap[k]}"]
    lines += ["# TYPE pretag_queue_waiting gauge", f"pretag_queue_waiting {snap['queue_waiting']}"]
    for q in ("p50", "p99"):
        v = snap["latency_s"][q]
        if v is not None:
            lines.append(f'pretag_latency_seconds{{quantile="{q[1:]}"}} {v}')
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run ``app`` with uvicorn on a daemon thread; yields the base URL (``port=0`` picks a free port).

    For tests, benchmarks and notebooks; ``pretag serve`` runs uvicorn in the foreground instead.
    """
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="pretag-serve-http", daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
