"""The HTTP API and the playground: ``create_app(engine)`` returns a FastAPI app.

Routes (JSON unless said otherwise):

- ``POST /v1/completions``: generate under the operator's policy tightened by the request's; ``"stream": true``
  answers server-sent events (``start``, one ``token`` per token with its temptation per tag and alarms,
  ``done``; or ``error``).
- ``GET /v1/policy``: the schema's tags, the operator's floor and the server's limits (the playground reads it).
- ``GET /health``: liveness plus the model and queue state. ``GET /metrics``: counters and latency percentiles
  (``?format=prometheus`` for the text exposition format).
- ``GET /``: the playground page (static HTML/JS/CSS, no build step, nothing fetched from outside).

Every bad request gets a 4xx whose ``error`` names each problem (unknown field, wrong type, limit exceeded, unknown
tag, an attempt to lift the operator's floor; at most ``MAX_PROBLEMS`` of them); a full queue gets 503 with
``Retry-After``. A body over ``max_body_bytes`` gets 413 before it is parsed. A request that reached the server on a
loopback address must name a loopback host (``localhost``, ``127.0.0.1``, ``[::1]``) or one of ``allowed_hosts`` in
its ``Host`` header, else 421: a web page whose DNS name was rebound to 127.0.0.1 cannot drive the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from pretag.control import TagPolicy
from pretag.serve import openai_api as oai
from pretag.serve.engine import Engine, GenParams
from pretag.serve.floor import PolicyFloorError, RequestPolicy, describe, merge
from pretag.serve.worker import Job, Metrics, QueueFull, Worker

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_PROBLEMS = 20
"""An error lists at most this many problems (and says how many it left out): 200k unknown tags gave a 26 MB 422."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
"""A temperature is 0 (greedy) or in this range: below it sampling is greedy anyway, and logits divided by 1e-133
overflowed float32 to inf (NaN probabilities, a 500, found by tests/test_fuzz_serve.py); above it the distribution
is uniform to float32 precision (1e308 was a 500 too)."""
MAX_SEED = 2**63 - 1
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


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
    max_n: int = 8
    """The most choices (``n``) one request may ask for: n choices cost n generations."""
    max_queue: int = 64
    """Requests waiting behind the running one; beyond this the server answers 503 instead of growing memory."""
    max_body_bytes: int = 256 * 1024
    """Larger bodies get 413 unread (an 8000-character prompt escaped as ``\\uXXXX`` is 48 kB)."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names accepted besides the loopback names on a loopback connection (e.g. a reverse proxy's name)."""

    def problems(self) -> list[str]:
        out = []
        for k, v in asdict(self).items():
            if k == "allowed_hosts":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                out.append(f"{k} must be a positive integer, got {v!r}")
        return out

    def limits(self) -> dict[str, int]:
        """The numeric limits, as ``GET /v1/policy`` advertises them."""
        return {k: v for k, v in asdict(self).items() if k != "allowed_hosts"}


# strict: "10", true and 10.5 are not an int, "yes" is not a bool (JSON numbers stay accepted for floats); NaN and
# Infinity (which Python's JSON parser reads) are not numbers a request may send
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PolicyIn(BaseModel):
    model_config = _STRICT
    ban: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    force: list[str] = Field(default_factory=list)
    bias: dict[str, float] = Field(default_factory=dict)
    alarms: dict[str, float] = Field(default_factory=dict)
    stop_on_alarm: bool | None = None


class CompletionIn(BaseModel):
    model_config = _STRICT
    prompt: str
    max_new_tokens: int | None = None
    max_tokens: int | None = None
    """OpenAI's name for ``max_new_tokens``."""
    n: int = 1
    """Choices (independent generations) for the prompt; with a seed, choice i uses seed + i."""
    stop: str | list[str] | None = None
    """Up to 4 sequences; the text ends before the first one that appears (tags do not count)."""
    logprobs: int | None = None
    """OpenAI's legacy logprobs: each token's log-probability under the policy, plus this many alternatives."""
    model: str | None = None
    """Must name the served model when given (OpenAI clients always send it)."""
    user: str | None = None
    """OpenAI's end-user id; accepted and ignored."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    policy: PolicyIn = Field(default_factory=PolicyIn)


def _error(status: int, problems: list[str], headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``error`` (a sentence naming every problem) and ``problems`` (the list).

    At most ``MAX_PROBLEMS`` problems of at most 500 characters each are listed; lone surrogates a client sent (in a
    field name, say) are escaped, so the answer is always valid UTF-8 JSON.
    """
    n = len(problems)
    problems = [_clip(p) for p in problems[:MAX_PROBLEMS]]
    if n > MAX_PROBLEMS:
        problems.append(f"... and {n - MAX_PROBLEMS} more problems")
    msg = problems[0] if n == 1 else f"{n} problems: " + "; ".join(problems)
    return JSONResponse({"error": msg, "problems": problems}, status_code=status, headers=headers)


def _clip(text: str, limit: int = 500) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """Build the app around a loaded :class:`~pretag.serve.engine.Engine` (one model, one operator policy)."""
    config = config or ServeConfig()
    if problems := config.problems():
        raise ValueError("invalid serve config: " + "; ".join(problems))
    config = _fit_context(engine, config)
    metrics = Metrics()
    worker = Worker(lambda job: _run_job(engine, job, metrics), max_queue=config.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="pretag serve", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.config, app.state.metrics, app.state.worker = engine, config, metrics, worker

    app.add_middleware(_Gate, max_body_bytes=config.max_body_bytes, allowed_hosts=config.allowed_hosts,
                       metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.incr("rejected")
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            msg = "unknown field (not part of the API)" if e.get("type") == "extra_forbidden" else e.get("msg")
            problems.append(f"{where}: {msg}")
        return _error(422, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 4xx (a body nested too deeply to parse, 404, 405) in the documented shape, not {"detail"}
        if 400 <= exc.status_code < 500:
            metrics.incr("rejected")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if detail == "There was an error parsing the body":
            detail = "body: not a JSON document this server can parse (nested too deeply?)"
        return _error(exc.status_code, [detail], headers=getattr(exc, "headers", None))

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
                "operator": describe(engine.operator), "limits": config.limits()}

    @app.get("/v1/models")
    @app.get("/openai/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(metrics.started),
                                             "owned_by": "pretag"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionIn) -> Any:
        return await complete(body, openai_stream=False)

    @app.post("/openai/v1/completions")
    async def openai_completions(body: CompletionIn) -> Any:
        """The same request; a stream is OpenAI's ``data:`` chunks ending with ``[DONE]``."""
        return await complete(body, openai_stream=True)

    async def complete(body: CompletionIn, openai_stream: bool) -> Any:
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
            events = (_openai_stream(job, start, metrics, t0, engine.name, params.logprobs) if openai_stream
                      else _stream(job, start, metrics, t0))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        tokens: list[list[dict[str, Any]]] = [[] for _ in range(params.n)]
        try:
            while (ev := await job.events.get())["event"] != "end":
                if ev["event"] == "token":
                    tokens[ev["data"].get("choice", 0)].append(ev["data"])
                elif ev["event"] == "done":
                    metrics.incr("completed")
                    _observe(metrics, job, t0, ev["data"])
                    choices = [oai.choice(i, s, tokens[i], params.logprobs)
                               for i, s in enumerate(ev["data"]["choices"])]
                    return oai.completion(engine.name, choices, len(prompt_ids), start["policy"])
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
    problems: list[str] = oai.check_fields(body, engine.name)
    asked = body.max_new_tokens if body.max_new_tokens is not None else body.max_tokens
    n_new = asked if asked is not None else min(config.default_new_tokens, config.max_new_tokens)
    if not 1 <= body.n <= config.max_n:
        problems.append(f"n: must be between 1 and {config.max_n}, got {body.n}")
    prompt_ok = len(body.prompt) <= config.max_prompt_chars
    if not prompt_ok:
        problems.append(f"prompt: {len(body.prompt)} characters exceeds the limit of {config.max_prompt_chars}")
    elif (bad := _lone_surrogate(body.prompt)) is not None:
        prompt_ok = False
        problems.append(f"prompt: not valid Unicode text (a lone surrogate at character {bad})")
    if not 1 <= n_new <= config.max_new_tokens:
        name = "max_tokens" if body.max_new_tokens is None and body.max_tokens is not None else "max_new_tokens"
        problems.append(f"{name}: must be between 1 and {config.max_new_tokens}, got {n_new}")
    if body.temperature != 0 and not MIN_TEMPERATURE <= body.temperature <= MAX_TEMPERATURE:
        problems.append(f"temperature: must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                        f"got {body.temperature}")
    if body.top_k is not None and body.top_k < 1:
        problems.append(f"top_k: must be >= 1, got {body.top_k}")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        problems.append(f"top_p: must be in (0, 1], got {body.top_p}")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        problems.append(f"seed: must be in [0, 2**63 - 1], got {body.seed}")
    request = RequestPolicy(**body.policy.model_dump())
    effective = None
    try:
        effective = merge(engine.operator, request, engine.schema)
    except PolicyFloorError as e:
        problems.extend(e.problems)
    prompt_ids: list[int] = []
    if prompt_ok and effective is not None:
        prompt_ids = engine.encode(body.prompt, effective)
        limit = min(config.max_prompt_tokens, engine.context_length - min(n_new, config.max_new_tokens))
        if len(prompt_ids) > limit:
            problems.append(f"prompt: {len(prompt_ids)} tokens exceeds the limit of {limit} "
                            f"(max_prompt_tokens {config.max_prompt_tokens}, context {engine.context_length} "
                            f"minus max_new_tokens)")
    if problems or effective is None:
        raise PolicyFloorError(problems)
    params = GenParams(max_new_tokens=n_new, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                       seed=body.seed, n=body.n, stop=oai.stop_list(body.stop), logprobs=body.logprobs)
    return params, prompt_ids, effective


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone UTF-16 surrogate (JSON's ``"\\ud800"``), which no tokenizer can encode; else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _fit_context(engine: Engine, config: ServeConfig) -> ServeConfig:
    """Cap ``max_new_tokens`` so that it fits the context after the shortest prompt (document start and forced
    tags): on a 256-token model the default 256 advertised a maximum that every request was refused at."""
    room = engine.context_length - len(engine.encode(""))
    if room < 1:
        raise ValueError(f"the model's context ({engine.context_length} tokens) leaves no room to generate")
    if config.max_new_tokens <= room:
        return config
    log.warning("max_new_tokens %d capped at %d: the model's context is %d tokens", config.max_new_tokens, room,
                engine.context_length)
    return dataclasses.replace(config, max_new_tokens=room, default_new_tokens=min(config.default_new_tokens, room))


def _run_job(engine: Engine, job: Job, metrics: Metrics) -> None:
    """Worker side: run the request's ``n`` generations one after another, emitting a ``token`` event per token
    (with its ``choice`` when n > 1) and a final ``done``: the first choice's summary plus ``choices``."""
    prompt, policy, params = job.payload
    job.started_at = time.perf_counter()
    summaries = []
    for i in range(params.n):
        def emit(tok: dict[str, Any], i: int = i) -> None:
            job.emit({"event": "token", "data": {**tok, "choice": i} if params.n > 1 else tok})

        watch = oai.StopWatch(params.stop, emit)
        one = dataclasses.replace(params, seed=None if params.seed is None else (params.seed + i) % (MAX_SEED + 1))
        summary = engine.generate(prompt, policy, one, on_token=watch.token,
                                  cancelled=lambda w=watch: job.cancelled.is_set() or w.hit)
        watch.finish()
        if watch.hit:  # cut before the stop sequence, as OpenAI does
            summary.update(text=watch.text, rendered=watch.rendered, finish_reason="stop")
        summaries.append(summary)
        if job.cancelled.is_set():
            metrics.incr("cancelled")
            break
        metrics.incr("alarms", len(summary.get("alarms", [])))
    gen_s = round(time.perf_counter() - job.started_at, 6)
    for s in summaries:
        s.setdefault("gen_s", gen_s)
    job.emit({"event": "done", "data": {**summaries[0], "gen_s": gen_s, "choices": summaries,
                                        "total_tokens": sum(s["n_tokens"] for s in summaries)}})


def _observe(metrics: Metrics, job: Job, t0: float, summary: dict[str, Any]) -> None:
    started = getattr(job, "started_at", job.enqueued_at)
    metrics.observe(time.perf_counter() - t0, started - job.enqueued_at, summary.get("gen_s", 0.0),
                    summary.get("total_tokens", summary.get("n_tokens", 0)))


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


async def _openai_stream(job: Job, start: dict[str, Any], metrics: Metrics, t0: float, model: str,
                         logprobs: int | None):
    """OpenAI's stream: a first chunk with no choices (pretag's ``policy``), one chunk per token, one per choice
    with its ``finish_reason``, then ``data: [DONE]``; an error is ``data: {"error": ...}``."""
    cid, created = oai.new_id(), int(time.time())
    try:
        yield oai.chunk(cid, created, model, [], policy=start["policy"], prompt_tokens=start["prompt_tokens"])
        while (ev := await job.events.get())["event"] != "end":
            if ev["event"] == "token":
                yield oai.chunk(cid, created, model, [oai.token_choice(ev["data"], logprobs)])
            elif ev["event"] == "done":
                metrics.incr("completed")
                _observe(metrics, job, t0, ev["data"])
                for i, s in enumerate(ev["data"]["choices"]):
                    yield oai.chunk(cid, created, model, [{"text": "", "index": i, "logprobs": None,
                                                            "finish_reason": oai.FINISH.get(s["finish_reason"]),
                                                            "alarms": s["alarms"],
                                                            "max_temptation": s["max_temptation"]}])
            elif ev["event"] == "error":
                metrics.incr("errors")
                yield f"data: {json.dumps({'error': {'message': ev['message'], 'code': ev.get('status', 500)}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


class _Gate:
    """ASGI middleware in front of every route: the ``Host`` check (DNS rebinding) and the body size cap.

    A connection that arrived on a loopback address (uvicorn puts the socket's own address in ``scope["server"]``)
    must name a loopback host or one of ``allowed_hosts``: a page on ``evil.example`` whose DNS name was rebound to
    127.0.0.1 sends ``Host: evil.example`` and gets 421. Connections on other addresses are not checked (an
    operator who binds beyond loopback is warned that the API has no authentication). The body is read here, up to
    ``max_body_bytes`` (413 beyond, whether or not a ``Content-Length`` said so), then handed on unchanged.
    """

    def __init__(self, app, max_body_bytes: int, allowed_hosts: tuple[str, ...], metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.allowed = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, *allowed_hosts)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = _host_name(headers.get("host", ""))
        if _is_loopback(scope.get("server")) and host not in self.allowed and not _is_loopback((host, 0)):
            return await self._refuse(scope, receive, send, 421, f"Host {headers.get('host', '')!r} is not served "
                                      f"here: a server bound to loopback answers only {', '.join(LOOPBACK_HOSTS)} "
                                      f"(and --allow-host names)")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(scope, receive, send, 413, self._too_large(int(declared)))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._refuse(scope, receive, send, 413, self._too_large(size, at_least=True))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, which cancels a stream

        return await self.app(scope, replay, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"body: {'more than ' if at_least else ''}{size} bytes exceeds the limit of {self.max_body_bytes} "
                f"bytes")

    async def _refuse(self, scope, receive, send, status: int, problem: str) -> None:
        self.metrics.incr("rejected")
        await _error(status, [problem])(scope, receive, send)


def _host_name(host: str) -> str:
    """``Host`` header without its port: ``localhost:8000`` -> ``localhost``, ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(server: tuple[str, int] | None) -> bool:
    if not server:
        return False
    try:
        ip = ipaddress.ip_address(server[0])
    except ValueError:
        return server[0] == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


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
