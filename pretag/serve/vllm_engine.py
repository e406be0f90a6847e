"""vLLM as the serving engine: the same HTTP API, policy floor and per-token temptation as the HF engine.

How the policy reaches vLLM: through a logits processor of vLLM's v1 API (``vllm.v1.sample.logits_processor``),
:class:`TagLogitsProcessor`, which runs pretag's own ``TagProcessor`` on each of our rows of vLLM's batch logits.
So ban, bias, force at segment starts, dynamic rules, switches and alarms are the *same code* on both engines, and
the temptation (the pre-ban probability of every tag) is measured by that processor on vLLM's own logits, before
the policy acts: no second model pass. vLLM's sampler calls logits processors on its float32 logits before
temperature, top-k/top-p and sampling, exactly where HF calls ``TagProcessor``, so greedy decoding picks the same
tokens (``tests/test_serve_vllm.py`` checks the tokens and the temptation to 1e-3).

A request finds its processor through ``SamplingParams.extra_args["pretag"]``, a key into :data:`ROWS`. That
registry is shared memory, so the engine core must run in this process: :func:`load_llm` sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` before vLLM is imported. A stop rule ends a request the way HF's
``AlarmStop`` does: the tempted token is kept, then the request is aborted.

Import this module only where vLLM is installed (``pip install pretag[vllm]`` or ``make setup-vllm``); the pure
parts (:func:`sampling_kwargs`, :class:`BatchRows`) need no vLLM and are unit-tested everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretag.control import TagPolicy, TagProcessor
from pretag.schema import Schema
from pretag.serve.engine import Engine, GenParams, _EventStreamer, _LogprobProcessor, load_operator_policy
from pretag.tokens import TagVocab

log = logging.getLogger(__name__)

ROWS: dict[str, TagProcessor] = {}
"""``extra_args["pretag"]`` key -> the TagProcessor of one running request."""


def sampling_kwargs(params: GenParams, key: str, eos_id: int | None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one pretag request (pure, testable without vLLM).

    temperature 0 is greedy on both engines; top-k 0/None means off (vLLM: 0 or -1); the seed makes sampling
    reproducible per request; EOS ends the text as it does under HF (``stop_at_eos``).
    """
    kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": float(params.temperature),
                          "top_p": float(params.top_p or 1.0), "top_k": int(params.top_k or 0),
                          "seed": params.seed, "extra_args": {"pretag": key}, "detokenize": False}
    if eos_id is not None:
        kw["stop_token_ids"] = [int(eos_id)]
    return kw


class BatchRows:
    """Which TagProcessor owns which row of vLLM's persistent batch, kept in step with vLLM's ``BatchUpdate``s.

    vLLM reorders its batch as requests come and go: it reports removals, then additions, then moves (one-way or
    swaps), in that order (``vllm.v1.sample.logits_processor.interface.BatchUpdate``). Rows of other requests
    (no ``pretag`` key) are left alone.
    """

    def __init__(self, registry: dict[str, TagProcessor]):
        self.registry = registry
        self.rows: dict[int, tuple[TagProcessor, list[int], list[int]]] = {}

    def update(self, removed, added, moved) -> None:
        for i in removed:
            self.rows.pop(i, None)
        for i, params, prompt_ids, output_ids in added:
            key = (getattr(params, "extra_args", None) or {}).get("pretag")
            proc = self.registry.get(key) if key is not None else None
            if proc is None:
                self.rows.pop(i, None)
            else:
                self.rows[i] = (proc, list(prompt_ids or []), output_ids)  # output_ids: vLLM's live list
        for a, b, kind in moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and getattr(kind, "name", str(kind)) == "SWAP":
                self.rows[a] = rb

    def apply(self, logits):
        """Run each row's TagProcessor on its (1, V) logits; the batch tensor is updated row by row."""
        import torch

        for i, (proc, prompt_ids, output_ids) in self.rows.items():
            ids = torch.tensor([prompt_ids + list(output_ids)], dtype=torch.long, device=logits.device)  # (1, T)
            logits[i] = proc(ids, logits[i:i + 1])[0]
        return logits


def _processor_class():
    """vLLM's v1 ``LogitsProcessor`` subclass (defined lazily: vLLM is an optional dependency)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

    class TagLogitsProcessor(LogitsProcessor):
        """pretag's TagProcessor inside vLLM's sampler, one per request row (see the module docstring)."""

        def __init__(self, vllm_config, device, is_pin_memory: bool):
            self.rows = BatchRows(ROWS)

        def is_argmax_invariant(self) -> bool:
            return False  # bans and forces change the argmax: greedy requests need it too

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is not None:
                self.rows.update(batch_update.removed, batch_update.added, batch_update.moved)

        def apply(self, logits):
            return self.rows.apply(logits) if self.rows.rows else logits

    return TagLogitsProcessor


def load_llm(model_dir: str | Path, *, kv_cache_gib: int = 1):
    """An in-process ``vllm.LLMEngine`` for a pretag model directory, with :class:`TagLogitsProcessor` installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # ROWS is shared with the engine core: one process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    from vllm import EngineArgs, LLMEngine

    ctx = _context_length(model_dir)
    args = EngineArgs(model=str(model_dir), dtype="float32", max_model_len=ctx, enforce_eager=True,
                      logits_processors=[_processor_class()], enable_prefix_caching=False, seed=0,
                      max_num_seqs=64)
    return LLMEngine.from_engine_args(args)


def _context_length(model_dir: str | Path) -> int:
    from pretag.generate import context_limit

    return context_limit(json.loads((Path(model_dir) / "config.json").read_text()), 2048)


class VllmEngine(Engine):
    """The :class:`~pretag.serve.engine.Engine` interface on a vLLM ``LLMEngine`` (one request at a time, like
    the HF engine, behind the same queue)."""

    def __init__(self, llm, tokenizer, schema: Schema, operator: TagPolicy | None = None, name: str = "model",
                 context_length: int = 2048):
        from pretag.serve.floor import RequestPolicy, merge

        self.llm, self.tokenizer, self.schema, self.model = llm, tokenizer, schema, None
        self.operator = operator if operator is not None else load_operator_policy(None, schema)
        self.operator.validate(schema)
        merge(self.operator, RequestPolicy(), schema)
        from pretag.guidance import refuse_guidance

        refuse_guidance(self.operator, "the vLLM engine")  # at start-up, not at every request
        self.name, self.device, self.context_length = name, "vllm:cpu", context_length
        self.vocab = TagVocab(tokenizer, schema)

    @classmethod
    def from_dir(cls, model_dir: str | Path, policy: str | Path | None = None, device: str | None = None
                 ) -> VllmEngine:
        from transformers import AutoTokenizer

        from pretag.models import SCHEMA_FILE
        from pretag.schema import load_schema
        from pretag.tokens import tag_ids

        path = Path(model_dir)
        schema = load_schema(path / SCHEMA_FILE)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tag_ids(tokenizer, schema)
        return cls(load_llm(path), tokenizer, schema, load_operator_policy(policy, schema), name=path.name,
                   context_length=_context_length(path))

    def generate(self, prompt: str, policy: TagPolicy, params: GenParams,
                 on_token: Callable[[dict[str, Any]], None], cancelled: Callable[[], bool]) -> dict[str, Any]:
        from vllm import SamplingParams

        from pretag.guidance import refuse_guidance

        refuse_guidance(policy, "the vLLM engine")  # its logits processors see logits, not the model
        proc = (TagProcessor(self.tokenizer, self.schema, policy) if params.logprobs is None
                else _LogprobProcessor(self.tokenizer, self.schema, policy, top=params.logprobs))
        streamer = _EventStreamer(self, proc, policy, on_token)
        key = rid = uuid.uuid4().hex
        ROWS[key] = proc
        ids = self.encode(prompt, policy)
        t0 = time.perf_counter()
        reason, seen = "length", 0
        try:
            self.llm.add_request(rid, {"prompt_token_ids": ids},
                                 SamplingParams(**sampling_kwargs(params, key, self.tokenizer.eos_token_id)))
            while self.llm.has_unfinished_requests():
                for out in self.llm.step():
                    if out.request_id != rid:
                        continue
                    new = list(out.outputs[0].token_ids)[seen:]
                    for tid in new:
                        streamer.token(int(tid))
                    seen += len(new)
                    if out.finished:
                        reason = "stop" if out.outputs[0].finish_reason == "stop" else "length"
                stop = proc.stop is not None and bool(proc.stop[0])
                if (cancelled() or stop) and self.llm.has_unfinished_requests():
                    self.llm.abort_request([rid])
                    reason = "cancelled" if cancelled() else "alarm"
                    break
        finally:
            ROWS.pop(key, None)
        if cancelled():
            reason = "cancelled"
        shown = [e["id"] for e in streamer.events if e["id"] != self.tokenizer.eos_token_id]
        slot_ids = set(proc.slot_ids)
        text = self.tokenizer.decode([i for i in shown if i not in slot_ids], skip_special_tokens=False)
        rendered = self.tokenizer.decode(shown, skip_special_tokens=False)
        return {"text": text, "rendered": rendered, "n_tokens": len(streamer.events), "finish_reason": reason,
                "alarms": streamer.alarms, "max_temptation": streamer.peak(), "model_s": round(time.perf_counter() - t0, 6)}
