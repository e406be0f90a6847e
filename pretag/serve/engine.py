"""The server's view of one loaded model: encode a prompt, generate under a policy, report each token as it comes.

The engine owns no sampling logic. It runs HF ``model.generate`` with the project's ``pretag.control.TagProcessor``
(which measures every tag's temptation, then applies the policy and its rules) and ``AlarmStop``, and a streamer
that turns each new token into a JSON-ready event carrying that step's temptation per tag and the rules that fired.
Keeping this adapter in one place means the HTTP layer never touches torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria

from pretag.control import TagPolicy, TagProcessor
from pretag.generate import TokenStreamer
from pretag.schema import Schema
from pretag.tokens import TagVocab

log = logging.getLogger(__name__)


@dataclass
class GenParams:
    max_new_tokens: int = 48
    temperature: float = 1.0
    """0 = greedy."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    """Choices; the server runs them one after another (``pretag.serve.app``), an engine generates one."""
    stop: list[str] = field(default_factory=list)
    """Stop sequences, applied by the server to the visible text (``pretag.serve.openai_api.StopWatch``)."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each token's log-probability under the policy plus the k likeliest."""


def load_operator_policy(spec: str | Path | None, schema: Schema) -> TagPolicy:
    """The operator's floor: a policy file / shipped name / compact string (``pretag.control.load_policy``).

    ``None`` gives the project's default (ban every bad value), the same as ``pretag generate``; ``"none"`` gives an
    empty floor (requests may do anything the schema allows).
    """
    from pretag.control import load_policy

    if spec is not None and str(spec) == "none":
        return TagPolicy(name="none")
    return load_policy(spec, schema)


class Engine:
    """A model loaded for serving, with the operator's policy floor."""

    def __init__(self, model, tokenizer, schema: Schema, operator: TagPolicy | None = None, name: str = "model"):
        self.model, self.tokenizer, self.schema = model.eval(), tokenizer, schema
        self.operator = operator if operator is not None else load_operator_policy(None, schema)
        self.operator.validate(schema)
        from pretag.serve.floor import RequestPolicy, merge

        merge(self.operator, RequestPolicy(), schema)  # a floor whose switch lifts its own bans fails here, once
        self.name = name
        self.device = str(next(model.parameters()).device)
        from pretag.generate import context_limit

        self.context_length = context_limit(model, 2048)
        self.vocab = TagVocab(tokenizer, schema)

    @classmethod
    def from_dir(cls, model_dir: str | Path, policy: str | Path | None = None, device: str | None = None) -> Engine:
        """Load ``model_dir`` (docs/CONTRACTS.md) and the operator's policy (see :func:`load_operator_policy`)."""
        from pretag.models import load_model_dir

        model, tokenizer, schema = load_model_dir(model_dir)
        if device:
            model = model.to(device)
        return cls(model, tokenizer, schema, load_operator_policy(policy, schema), name=Path(model_dir).name)

    def encode(self, prompt: str, policy: TagPolicy | None = None) -> list[int]:
        """The prompt's token ids exactly as ``pretag.generate`` will build them (document start, start tags,
        tag-safe text: a literal ``<|bad|>`` in a prompt is text, never a tag id)."""
        from pretag.generate import prompt_ids

        return prompt_ids(self.tokenizer, self.schema, policy or self.operator, prompt)

    def token_logprobs(self, logprobs, tid: int, top: int) -> dict[str, Any]:
        """``logprob`` of token ``tid`` and ``top_logprobs`` (token text -> log-probability) from a (V,) row;
        a banned token's -inf is sent as None (JSON has no infinity)."""
        import math

        chosen = float(logprobs[tid])
        alts: dict[str, float] = {}
        if top:
            vals, ids = logprobs.topk(top)
            for v, i in zip(vals.tolist(), ids.tolist()):
                if math.isfinite(v):
                    alts.setdefault(self.vocab.text(i), v)
        return {"token": self.vocab.text(tid),
                "logprob": chosen if math.isfinite(chosen) else None, "top_logprobs": alts}

    def generate(self, prompt: str, policy: TagPolicy, params: GenParams,
                 on_token: Callable[[dict[str, Any]], None], cancelled: Callable[[], bool]) -> dict[str, Any]:
        """Run ``pretag.generate.generate``, calling ``on_token`` once per new token as HF produces it.

        Returns the summary: text (tags removed), rendered (with tags), finish_reason, alarms, peak temptation.
        Cancellation is an HF ``StoppingCriteria`` (the generation ends after the current token), so the processor
        keeps its compiled per-step path.
        """
        from pretag.control import TagProcessor
        from pretag.generate import GenerateConfig, generate

        proc = (TagProcessor(self.tokenizer, self.schema, policy) if params.logprobs is None
                else _LogprobProcessor(self.tokenizer, self.schema, policy, top=params.logprobs))
        streamer = _EventStreamer(self, proc, policy, on_token)
        greedy = params.temperature == 0
        cfg = GenerateConfig(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                             temperature=1.0 if greedy else params.temperature, top_k=params.top_k or 0,
                             top_p=params.top_p or 1.0, seed=params.seed)
        t0 = time.perf_counter()
        seq = generate(self.model, self.tokenizer, self.schema, prompt, policy, cfg, streamer=streamer,
                       processor=proc, stopping_criteria=[_Cancel(cancelled)]).sequences[0]
        if cancelled():
            reason = "cancelled"
        elif seq.stopped_by_alarm:
            reason = "alarm"
        elif seq.tokens and seq.tokens[-1].id == self.tokenizer.eos_token_id:
            reason = "stop"
        else:
            reason = "length"
        return {"text": seq.text, "rendered": seq.rendered, "n_tokens": len(streamer.events),
                "finish_reason": reason, "alarms": streamer.alarms, "max_temptation": streamer.peak(),
                "model_s": round(time.perf_counter() - t0, 6)}


class _LogprobProcessor(TagProcessor):
    """The TagProcessor that also keeps, per step, the log-softmax of the scores it returns (the policy applied,
    before temperature/top-k/top-p), so a token's log-probability and the ``top`` likeliest can be reported."""

    def __init__(self, *args, top: int = 0, **kwargs):
        self.top = top
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.logprobs: list = []  # per step (V,) of row 0: the server generates one row

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        self.logprobs.append(out[0].float().log_softmax(-1))
        return out


class _Cancel(StoppingCriteria):
    """Ends every row once ``cancelled()`` says so (a client went away, the server is shutting down)."""

    def __init__(self, cancelled: Callable[[], bool]):
        self.cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.cancelled(), dtype=torch.bool, device=input_ids.device)


class _EventStreamer(TokenStreamer):
    """Each new token becomes an event with the processor's record for its step (``pretag.generate.TokenStreamer``:
    at ``token`` time the processor's last record is this token's step). The vLLM engine calls ``token`` itself."""

    def __init__(self, engine: Engine, proc, policy: TagPolicy, on_token: Callable[[dict[str, Any]], None]):
        super().__init__()
        self.engine, self.proc, self.policy, self.on_token = engine, proc, policy, on_token
        self.ids: list[int] = []
        self.text = ""
        self.events: list[dict[str, Any]] = []
        self.alarms: list[dict[str, Any]] = []
        self.tag_of_id = engine.vocab.tag_of_id
        self.cols = {t: proc.slot_of_tag(t) for t in engine.schema.tag_names}
        self.n_operator_rules = len(engine.operator.rules)

    def peak(self) -> dict[str, float]:
        """Per tag, the highest temptation over the tokens sent so far (0 before any)."""
        return {t: max((e["temptation"].get(t, 0.0) for e in self.events), default=0.0) for t in self.cols}

    def token(self, tid: int) -> None:
        step = len(self.ids)
        if step >= len(self.proc.temptations):  # defensive: a token the processor never saw is not ours to send
            return
        self.ids.append(tid)
        # decode everything so far and send the new suffix: byte-level BPE splits characters across tokens
        shown = [i for i in self.ids if i != self.engine.tokenizer.eos_token_id]
        full = self.engine.tokenizer.decode(shown, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: its text comes with the next token
            piece = ""
        else:
            piece, self.text = full[len(self.text):], full
        temp = self.proc.temptations[step][0].tolist()
        temptation = {t: float(temp[c]) for t, c in self.cols.items()}
        shares = self.proc.verdicts(temp, int(self.proc.groups[step][0]))
        verdict = {t: shares[self.proc.slots[c]] for t, c in self.cols.items() if self.proc.slots[c] in shares}
        alarms = []
        if step < len(self.proc.fired):
            for i in self.proc.fired[step][0].nonzero().reshape(-1).tolist():
                r = self.policy.rules[i]
                alarm = {"rule": r.label, "action": r.action, "step": step,
                         "source": "operator" if i < self.n_operator_rules else "request"}
                if r.watch is not None:
                    alarm.update(tag=r.watch, threshold=r.above, reading=r.reading,
                                 p=(verdict if r.reading == "verdict" else temptation).get(r.watch))
                alarms.append(alarm)
        self.alarms.extend(alarms)
        event = {"index": step, "id": tid, "text": piece, "tag": self.tag_of_id.get(tid),
                 "temptation": temptation, "alarms": alarms, **({"verdict": verdict} if verdict else {})}
        if getattr(self.proc, "logprobs", None) is not None and step < len(self.proc.logprobs):
            event.update(self.engine.token_logprobs(self.proc.logprobs[step], tid, self.proc.top))
        self.events.append(event)
        self.on_token(event)
