"""One generation worker behind a bounded queue, and the server's counters.

Why one worker thread: a single model on one device gains little from running two generations at once (they
contend for the same cores/GPU) and the HF generation loop is not re-entrant on a shared model. So requests are
*queued* and served one at a time, in arrival order; the asyncio server thread never runs the model, so it keeps
answering health checks, metrics and new connections while a generation runs. A full queue answers 503 with a
``Retry-After`` hint instead of piling up unbounded memory; a client that disconnects cancels its job, so
abandoned streams do not hold the worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class QueueFull(RuntimeError):
    """The request queue is at capacity; the caller should answer 503 and ask the client to retry."""


@dataclass
class Job:
    """One accepted request. ``emit`` is called from the worker thread; events reach the asyncio side in order."""

    payload: Any
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def emit(self, event: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    """Runs ``run(job)`` for each submitted job on one daemon thread.

    ``run`` streams by calling ``job.emit(event)`` and should return early when ``job.cancelled`` is set. Whatever
    it raises becomes an ``{"event": "error"}`` event for that job only; the worker itself never dies from a
    request. Every job ends with exactly one ``{"event": "end"}`` event.
    """

    def __init__(self, run: Callable[[Job], None], max_queue: int = 64, name: str = "pretag-serve-worker"):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._run = run
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._q.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly") from None

    def close(self, timeout: float = 5.0) -> None:
        # Cancel whatever is still waiting, then let the running job finish and stop the thread.
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            job.emit({"event": "error", "status": 503, "message": "the server is shutting down"})
            job.emit({"event": "end"})
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is _STOP:
                return
            if job.cancelled.is_set():
                job.emit({"event": "end"})
                continue
            self.busy = True
            try:
                self._run(job)
            except Exception as e:  # one bad request must never take the worker down
                log.exception("generation failed")
                job.emit({"event": "error", "status": 500, "message": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                self.busy = False
                job.emit({"event": "end"})


class Metrics:
    """Counters for ``GET /metrics``; thread-safe, cheap, and kept in memory only."""

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.started = time.time()
        self.counts = {"requests": 0, "completed": 0, "rejected": 0, "errors": 0, "cancelled": 0,
                       "queue_full": 0, "tokens": 0, "alarms": 0}
        self._latency: deque[float] = deque(maxlen=window)
        self._queue_wait: deque[float] = deque(maxlen=window)
        self._gen_seconds = 0.0

    def incr(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def observe(self, latency_s: float, queue_wait_s: float, gen_s: float, tokens: int) -> None:
        with self._lock:
            self._latency.append(latency_s)
            self._queue_wait.append(queue_wait_s)
            self._gen_seconds += gen_s
            self.counts["tokens"] += tokens

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self._latency)
            wait = sorted(self._queue_wait)
            return {
                **self.counts,
                "uptime_s": round(time.time() - self.started, 3),
                "latency_s": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "n": len(lat)},
                "queue_wait_s": {"p50": _pct(wait, 50), "p99": _pct(wait, 99)},
                "tokens_per_s": round(self.counts["tokens"] / self._gen_seconds, 2) if self._gen_seconds else None,
            }


def _pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of a sorted list (None when empty)."""
    if not xs:
        return None
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return round(xs[k], 6)
