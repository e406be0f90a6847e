"""OpenAI's completions shapes around pretag's generations: stop sequences, choices, logprobs, stream chunks.

``POST /v1/completions`` answers OpenAI's ``text_completion`` object (``id``, ``object``, ``created``, ``model``,
``choices``, ``usage``) with pretag's own fields beside it (the first choice's ``text``, ``rendered``, ``tokens``
with their temptation, ``alarms``; the effective ``policy``); every choice carries its own pretag fields too.
``POST /openai/v1/completions`` takes the same body and, with ``"stream": true``, streams OpenAI's chunks
(``data: {...}`` lines ending with ``data: [DONE]``) instead of pretag's named events, each chunk's choice carrying
the token's ``temptation``, ``tag`` and ``alarms``. Nothing here touches a model: it shapes what an engine emitted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

MAX_STOP = 4
"""Stop sequences per request, as OpenAI allows."""
MAX_LOGPROBS = 5
"""Alternatives per token in ``top_logprobs``, as OpenAI allows."""
FINISH = {"length": "length", "stop": "stop", "alarm": "content_filter", "cancelled": "stop"}
"""pretag's finish reasons in OpenAI's vocabulary: a policy alarm that stopped the text is a content filter."""


class StopWatch:
    """Cuts a generation at the first stop sequence of its *visible* text (tags do not count).

    Token events pass through ``token`` and reach ``emit`` in order, but an event whose text could begin a stop
    sequence is held back until the next tokens tell (``"\\n\\n"`` split over two tokens must not leak its first
    ``"\\n"``), so the streamed pieces always add up to the final text. Once a stop sequence appears, the held tokens
    are sent with their text cut before the sequence (their temptation still counts: every generated token is one
    event) and ``hit`` turns true, so the caller cancels the generation.
    """

    def __init__(self, stops: list[str], emit: Callable[[dict[str, Any]], None]):
        self.stops = [s for s in stops if s]
        self.emit = emit
        self.text = ""
        """Visible text seen so far (cut at the stop sequence once hit)."""
        self.rendered = ""
        """Text with its tag tokens, cut like ``text``."""
        self.hit = False
        self._pending: list[tuple[dict[str, Any], int]] = []  # (event, visible length before it)

    def token(self, event: dict[str, Any]) -> None:
        if self.hit:
            return
        if not self.stops:
            self.emit(event)
            return
        visible = event.get("tag") is None
        self._pending.append((event, len(self.text)))
        if visible:
            self.text += event["text"]
        cut = min((i for s in self.stops if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self.text = self.text[:cut]
            self._flush(len(self.text), cut=True)
            return
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._flush(len(self.text) - hold)

    def finish(self) -> None:
        """The generation ended: whatever was held back is text after all."""
        self._flush(len(self.text), cut=True)

    def _flush(self, safe: int, cut: bool = False) -> None:
        while self._pending:
            event, before = self._pending[0]
            visible = event.get("tag") is None
            end = before + len(event["text"]) if visible else before
            if end > safe and not cut:
                return
            self._pending.pop(0)
            if visible and end > safe:  # (part of) the stop sequence: the token is sent, its text cut
                event = {**event, "text": event["text"][:max(0, safe - before)]}
            self.rendered += event["text"]
            self.emit(event)


def check_fields(body, served: str) -> list[str]:
    """Problems with the OpenAI fields of a request (numbers only: pretag's own checks run elsewhere)."""
    problems = []
    if body.max_tokens is not None and body.max_new_tokens is not None and body.max_tokens != body.max_new_tokens:
        problems.append(f"max_tokens ({body.max_tokens}) and max_new_tokens ({body.max_new_tokens}) name the same "
                        "limit: give one")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP:
        problems.append(f"stop: at most {MAX_STOP} sequences, got {len(stops)}")
    if any(not s for s in stops):
        problems.append("stop: a stop sequence may not be empty")
    if any(len(s) > 200 for s in stops):
        problems.append("stop: a stop sequence is at most 200 characters")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        problems.append(f"logprobs: must be in [0, {MAX_LOGPROBS}], got {body.logprobs}")
    if body.model is not None and body.model != served:
        problems.append(f"model: this server serves {served!r}, not {body.model!r}")
    return problems


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def choice(index: int, summary: dict[str, Any], tokens: list[dict[str, Any]], logprobs: int | None) -> dict[str, Any]:
    """One OpenAI choice (``text``, ``index``, ``logprobs``, ``finish_reason``) plus pretag's fields for it."""
    return {"text": summary["text"], "index": index, "logprobs": _logprobs(tokens) if logprobs is not None else None,
            "finish_reason": FINISH.get(summary["finish_reason"], summary["finish_reason"]),
            "pretag_finish_reason": summary["finish_reason"], "rendered": summary["rendered"],
            "n_tokens": summary["n_tokens"], "alarms": summary["alarms"],
            "max_temptation": summary["max_temptation"], "tokens": tokens}


def _logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's legacy logprobs object from token events that carry ``logprob`` / ``top_logprobs``."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["text"]) if t.get("tag") is None else 0
    return {"tokens": [t.get("token", t["text"]) for t in tokens],
            "token_logprobs": [t.get("logprob") for t in tokens],
            "top_logprobs": [t.get("top_logprobs") for t in tokens], "text_offset": offsets}


def completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int, policy: dict[str, Any]
               ) -> dict[str, Any]:
    """The whole answer: OpenAI's object, then pretag's fields of the first choice as before (``text``,
    ``tokens``, ...), so clients of either API read it unchanged."""
    first = choices[0]
    completion_tokens = sum(c["n_tokens"] for c in choices)
    return {"id": new_id(), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "text": first["text"], "rendered": first["rendered"], "n_tokens": first["n_tokens"],
            "finish_reason": first["pretag_finish_reason"], "alarms": first["alarms"],
            "max_temptation": first["max_temptation"], "tokens": first["tokens"], "policy": policy}


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def chunk(cid: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    """One OpenAI stream chunk as an SSE ``data:`` line (no ``event:`` name: OpenAI clients read only data)."""
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def token_choice(event: dict[str, Any], logprobs: int | None) -> dict[str, Any]:
    """A token event as a streamed choice: its text, OpenAI logprobs, and pretag's temptation/tag/alarms."""
    lp = None
    if logprobs is not None:
        lp = {"tokens": [event.get("token", event["text"])], "token_logprobs": [event.get("logprob")],
              "top_logprobs": [event.get("top_logprobs")], "text_offset": [0]}
    return {"text": event["text"] if event.get("tag") is None else "", "index": event.get("choice", 0),
            "logprobs": lp, "finish_reason": None, "token_id": event["id"], "tag": event.get("tag"),
            "temptation": event["temptation"], "alarms": event["alarms"],
            **({"verdict": event["verdict"]} if "verdict" in event else {})}
