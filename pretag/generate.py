"""Controlled, monitored generation: prompts with tags, ``model.generate`` with a :class:`TagProcessor`, results.

``generate`` builds the prompt the way training rendered documents (EOS = document start, document-level tags,
then per segment its tags and text), runs HF ``generate`` with the processor and an :class:`AlarmStop`, and turns
the processor's records into per-token results: each tag's temptation, what the policy did, the alarms raised,
a summary, and optionally the schema's scorers run on the output ("run your classifiers on the model's output").
``stream`` yields tokens with their temptation as they are generated. Pruned tree search is in ``pretag.search``,
the terminal view in ``pretag.display``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pretag.control import ACTION_NAMES, BANNED, AlarmStop, StepInfo, TagPolicy, TagProcessor, load_policy
from pretag.schema import Schema
from pretag.tokens import TagVocab, pad_id

logger = logging.getLogger(__name__)


class _MaskedAnyway(logging.Filter):
    """transformers' ``generate`` drops the all-ones attention mask pretag passes when no row is padded, then warns
    that none was passed ("We strongly recommend passing in an `attention_mask`"). pretag always passes one, so on
    its console the warning is noise a user cannot act on; a padded batch keeps its mask and never warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_MaskedAnyway())
DEFAULT_THRESHOLDS = (0.1, 0.5)


# ---- results ---------------------------------------------------------------------------------------------------
@dataclass
class TokenRecord:
    id: int
    text: str
    is_tag: bool
    temptation: dict[str, float]
    """Tag token -> probability the model gave it at this step, before the policy acted."""
    forced: bool
    """A tag had to come here (text was banned)."""
    banned: list[str]
    biased: list[str]
    verdict: dict[str, float] = field(default_factory=dict)
    """Where the text asks for an attribute's tag (a segment start; prefix schemas): each of that attribute's tag
    tokens -> its share of their probability, the model's choice once a tag must come (``Rule.reading``). The
    temptation is this times P(a tag here). Empty elsewhere."""

    @property
    def max_banned_temptation(self) -> float:
        return max((self.temptation[t] for t in self.banned), default=0.0)


@dataclass
class Alarm:
    rule: str
    action: str
    step: int
    token: str


class SequenceResult:
    """One generated sequence. ``tokens`` (a :class:`TokenRecord` per step) is built on first access: a batch of
    32 x 64 tokens spends ~20 ms making them, ~5 % of the generation, which callers that want only the text, the
    alarms and the summary should not pay."""

    def __init__(self, prompt: str, text: str, rendered: str, tokens: list[TokenRecord] | Callable[[], list],
                 alarms: list[Alarm], summary: dict[str, dict[str, Any]], stopped_by_alarm: bool = False,
                 classifiers: dict[str, Any] | None = None):
        self.prompt = prompt
        self.text = text
        """The generated text, tags removed."""
        self.rendered = rendered
        """The generated text with its tag tokens (span closes appended), for display."""
        self._tokens = tokens
        self.alarms = alarms
        self.summary = summary
        """Per tag token: max, mean, argmax step, first step above each threshold (None: never)."""
        self.stopped_by_alarm = stopped_by_alarm
        self.classifiers = classifiers

    @property
    def tokens(self) -> list[TokenRecord]:
        if callable(self._tokens):
            self._tokens = self._tokens()
        return self._tokens

    def __repr__(self) -> str:
        return (f"SequenceResult(text={self.text!r}, alarms={len(self.alarms)}, "
                f"stopped_by_alarm={self.stopped_by_alarm})")

    def to_dict(self) -> dict[str, Any]:
        tokens = []
        for t in self.tokens:
            d = asdict(t)
            d["temptation"] = {k: round(v, 6) for k, v in t.temptation.items()}
            tokens.append(d)
        return {"prompt": self.prompt, "text": self.text, "rendered": self.rendered, "tokens": tokens,
                "alarms": [asdict(a) for a in self.alarms], "summary": self.summary,
                "stopped_by_alarm": self.stopped_by_alarm, "classifiers": self.classifiers,
                "ids": [t.id for t in self.tokens]}


@dataclass
class GenerationResult:
    sequences: list[SequenceResult]
    policy: dict[str, Any]
    schema: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "policy": self.policy, "settings": self.settings,
                "sequences": [s.to_dict() for s in self.sequences]}


# ---- prompts -----------------------------------------------------------------------------------------------------
def start_tag(schema: Schema, policy: TagPolicy, attr) -> str:
    """The tag a prompt starts with for ``attr``: the forced one, else the first allowed value that is not bad."""
    tags = [attr.tags[v] for v in attr.values]
    forced = [t for t in policy.force if t in tags]
    if forced:
        return forced[0]
    allowed = [t for t in tags if t not in policy.ban]
    good = [t for t in allowed if schema.attribute_of_tag(t)[1] not in attr.bad]
    return (good or allowed or tags)[0]


def prompt_ids(tokenizer, schema: Schema, policy: TagPolicy, prompt: str) -> list[int]:
    """Token ids of a prompt rendered as training rendered documents (tags inserted by id, text tag-safe), each
    attribute opened with the policy's :func:`start_tag` (``pretag.tokens.TagVocab.prompt_ids``)."""
    how = policy.resolved_prompt_tags(schema)
    tags = None if how == "none" else {a.name: start_tag(schema, policy, a) for a in schema.attributes}
    return TagVocab(tokenizer, schema).prompt_ids(prompt, tags, every_segment=how == "every")


class ContextLengthError(ValueError):
    """The prompt and the tokens asked for do not fit in the model's context (positions past it do not exist)."""


def context_limit(model_or_config, default: int | None = None) -> int | None:
    """How many positions the model has (GPT-2 ``n_positions``, Llama ``max_position_embeddings``), from a model,
    its config or a ``config.json`` mapping; ``default`` when the config does not say. The one reading of it:
    generation, evaluation and the server all check prompts against this number."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    get = cfg.get if isinstance(cfg, dict) else lambda name: getattr(cfg, name, None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def check_context(model, prompt_tokens: int, max_new_tokens: int, *, what: str = "prompt") -> None:
    """Refuse, before any work, a generation that would run past the model's context: a position beyond it has no
    embedding, and HF ``generate`` fails there with ``IndexError: index out of range in self``. pretag rejects
    rather than sliding the window, so a sample is never conditioned on a silently truncated prompt."""
    ctx = context_limit(model)
    if ctx is None or prompt_tokens + max_new_tokens <= ctx:
        return
    room = ctx - prompt_tokens
    fix = (f"ask for at most {room} new tokens (max_new_tokens, --max-new-tokens) or shorten the {what}" if room > 0
           else f"shorten the {what}")
    raise ContextLengthError(f"{what} of {prompt_tokens} token{'s' * (prompt_tokens != 1)} (tags included) + "
                             f"{max_new_tokens} new tokens = "
                             f"{prompt_tokens + max_new_tokens} exceeds the model's context of {ctx} tokens; {fix}")


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- generation --------------------------------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """Decoding settings; each is passed to HF ``generate`` except ``repetition_penalty`` (run by the processor
    so tag ids are exempt) and ``thresholds`` (for the summary)."""

    max_new_tokens: int = 64
    n: int = 1
    """Sequences per prompt (sampling when > 1 unless num_beams > 1)."""
    do_sample: bool | None = None
    """None: sample iff n > 1 and no beam search."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    classify: bool = False
    stop_at_eos: bool = True
    """False: make exactly ``max_new_tokens`` (EOS is then an ordinary document separator), e.g. for benchmarks."""
    ablate_direction: str | None = None
    """Project a direction out of the residual stream at every layer while writing: a tag (``bad``: the direction
    its logit is read from), ``embed:TAG`` (its embedding row) or a ``direction.pt`` of ``pretag interpret``."""

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.num_beams < 1 or (self.num_beams > 1 and self.n > self.num_beams):
            problems.append(f"num_beams must be >= 1 and >= n, got num_beams={self.num_beams}, n={self.n}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not 0 <= t <= 1 for t in self.thresholds):
            problems.append(f"thresholds must be probabilities, got {self.thresholds}")
        if problems:
            raise ValueError("generation settings: " + "; ".join(problems))

    def sampling(self) -> bool:
        return self.do_sample if self.do_sample is not None else (self.n > 1 and self.num_beams == 1)


def _hf_kwargs(cfg: GenerateConfig, tokenizer) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                              num_return_sequences=cfg.n, do_sample=cfg.sampling(),
                              pad_token_id=pad_id(tokenizer),
                              eos_token_id=tokenizer.eos_token_id if cfg.stop_at_eos else None)
    if cfg.sampling():
        kw.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    return kw


def generate(model, tokenizer, schema: Schema, prompts: str | Sequence[str],
             policy: TagPolicy | str | None = None, config: GenerateConfig | None = None, *,
             callback: Callable[[StepInfo], None] | None = None, streamer=None,
             processor: TagProcessor | None = None, stopping_criteria: Sequence[Any] = ()) -> GenerationResult:
    """Generate under ``policy`` and monitor the temptation of every tag; one result per prompt x ``n``.

    ``stopping_criteria`` are extra HF ``StoppingCriteria`` (e.g. a client disconnect); prefer them to a
    ``callback`` for anything that does not change the logits, since a callback forces the processor's slower
    per-step path."""
    cfg = config or GenerateConfig()
    cfg.validate()
    policy = load_policy(policy, schema)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompt given")
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    proc = processor or TagProcessor(tokenizer, schema, policy, repetition_penalty=cfg.repetition_penalty,
                                     num_beams=cfg.num_beams, callback=callback)
    proc.reset()
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    rendered = {p: prompt_ids(tokenizer, schema, policy, p) for p in dict.fromkeys(prompts)}
    check_context(model, max(len(r) for r in rendered.values()), cfg.max_new_tokens)
    ids, mask = _left_pad([rendered[p] for p in prompts], pad)
    from pretag.guidance import guidance_for
    from pretag.interpret.hooks import ablation

    if policy.guide and cfg.num_beams > 1:
        raise ValueError("tag guidance works with sampling and greedy decoding, not beam search (num_beams > 1)")
    guide = guidance_for(model, tokenizer, schema, policy, mask.repeat_interleave(cfg.n, 0).to(device))
    with torch.no_grad(), ablation(model, tokenizer, schema, cfg.ablate_direction):
        out = model.generate(ids.to(device), attention_mask=mask.to(device),
                             logits_processor=[proc] if guide is None else [proc, guide],
                             stopping_criteria=[AlarmStop(proc), *stopping_criteria], streamer=streamer,
                             **_hf_kwargs(cfg, tokenizer))
    start = ids.shape[1]
    if cfg.num_beams > 1:  # rows were re-ordered during the search: measure the final beams' histories again
        full_mask = torch.cat([mask.repeat_interleave(cfg.n, 0).to(device),
                               torch.ones(out.shape[0], out.shape[1] - start, dtype=mask.dtype, device=device)], 1)
        proc = replay(model, tokenizer, schema, policy, out, start, attention_mask=full_mask,
                      repetition_penalty=cfg.repetition_penalty)
    seqs = _results(proc, tokenizer, schema, out.cpu(), start, [p for p in prompts for _ in range(cfg.n)], cfg)
    return GenerationResult(seqs, policy.to_dict(), schema.name,
                            {k: v for k, v in asdict(cfg).items() if k != "thresholds"})


def replay(model, tokenizer, schema: Schema, policy: TagPolicy | str | None, sequences: torch.Tensor, start: int, *,
           attention_mask: torch.Tensor | None = None, repetition_penalty: float = 1.0) -> TagProcessor:
    """Run a fresh processor over finished sequences with one teacher-forced forward pass.

    The records depend only on each prefix, so this reproduces what generation saw; used for beam search (whose
    rows are re-ordered every step) and to monitor any given text.
    """
    proc = TagProcessor(tokenizer, schema, policy, repetition_penalty=repetition_penalty)
    with torch.no_grad():
        logits = model(sequences, attention_mask=attention_mask).logits.float()  # (N, T, V)
    for p in range(start, sequences.shape[1]):
        proc(sequences[:, :p], logits[:, p - 1])
    return proc


def _results(proc: TagProcessor, tokenizer, schema: Schema, out: torch.Tensor, start: int, prompts: list[str],
             cfg: GenerateConfig) -> list[SequenceResult]:
    """Per-sequence results from the processor's stacked records. Everything is converted to Python lists once
    (indexing a tensor element costs microseconds, and a batch has thousands of tokens x tags)."""
    rec = proc.records()
    slots = proc.slots
    slot_set = set(proc.slot_ids)
    eos = tokenizer.eos_token_id
    rules = proc.policy.rules
    stop_rules = [r for r, rule in enumerate(rules) if rule.action == "stop"]
    text_of = TagVocab(tokenizer, schema).text
    steps = rec["temptation"].shape[1] if rec["temptation"] is not None else 0
    temps = rec["temptation"].tolist() if steps else []
    acts = rec["action"].tolist() if steps else []
    forced_all = rec["forced"].tolist() if steps else []
    groups = rec["group"].tolist() if steps else []
    fired_at = [[] for _ in range(out.shape[0])]  # per row: (step, rule) in step order
    if rec["fired"] is not None:
        for i, s, r in rec["fired"].nonzero().tolist():
            fired_at[i].append((s, r))
    # banned/biased slot lists per distinct action row (a policy has a handful)
    lists: dict[tuple[int, ...], tuple[list[str], list[str]]] = {}

    def records_of(gen: list[int], temps_i: list, acts_i: list, forced_i: list,
                   groups_i: list) -> Callable[[], list[TokenRecord]]:
        def build() -> list[TokenRecord]:
            tokens = []
            for tid, temp, act, forced, group in zip(gen, temps_i, acts_i, forced_i, groups_i):
                act = tuple(act)
                if act not in lists:
                    lists[act] = ([slots[j] for j, a in enumerate(act) if a == BANNED],
                                  [slots[j] for j, a in enumerate(act) if ACTION_NAMES[a] == "bias"])
                banned, biased = lists[act]
                tokens.append(TokenRecord(tid, text_of(tid), tid in slot_set, dict(zip(slots, temp)), forced,
                                          banned[:], biased[:], proc.verdicts(temp, group)))
            return tokens
        return build

    results = []
    for i, gen in enumerate(out[:, start:].tolist()):
        n = len(gen)
        if cfg.stop_at_eos and eos in gen:
            n = gen.index(eos) + 1
        stop_steps = [s for s, r in fired_at[i] if r in stop_rules and s < n]
        if stop_steps:
            n = min(n, stop_steps[0] + 1)
        n = min(n, steps)
        gen = gen[:n]
        temps_i = temps[i][:n] if steps else []
        alarms = [Alarm(rules[r].label, rules[r].action, s, text_of(gen[s])) for s, r in fired_at[i] if s < n]
        alarms += [Alarm(msg, "callback", s, text_of(gen[s]) if s < n else "")
                   for s, row, msg in proc.callback_alarms if row == i and s < n]
        text_ids = [t for t in gen if t not in slot_set and t != eos]
        rendered = tokenizer.decode([t for t in gen if t != eos], skip_special_tokens=False)
        if schema.render == "span" and proc.policy.resolved_force_at(schema) != "none":
            rendered += "".join(schema.close_token(start_tag(schema, proc.policy, a))
                                for a in reversed(schema.segment_attributes + schema.document_attributes))
        text = tokenizer.decode(text_ids, skip_special_tokens=False)
        columns = list(zip(*temps_i)) if temps_i else [()] * len(slots)
        seq = SequenceResult(prompt=prompts[i], text=text, rendered=rendered,
                             tokens=records_of(gen, temps_i, acts[i][:n] if steps else [],
                                               forced_all[i][:n] if steps else [],
                                               groups[i][:n] if steps else []), alarms=alarms,
                             summary=_summary({slot: list(col) for slot, col in zip(slots, columns)},
                                              cfg.thresholds),
                             stopped_by_alarm=bool(stop_steps) and n == stop_steps[0] + 1)
        if cfg.classify:
            seq.classifiers = classify_output(schema, prompts[i], text)
        results.append(seq)
    return results


def summarize(tokens: list[TokenRecord], slots: list[str], thresholds: Sequence[float]) -> dict[str, dict]:
    """Per tag token: max and mean temptation, where the max was, and the first step above each threshold."""
    return _summary({s: [t.temptation[s] for t in tokens] for s in slots}, thresholds)


def _summary(columns: dict[str, list[float]], thresholds: Sequence[float]) -> dict[str, dict]:
    out = {}
    for s, vals in columns.items():
        top = max(vals, default=0.0)
        out[s] = {
            "max": top,
            "mean": sum(vals) / len(vals) if vals else 0.0,
            "argmax": vals.index(top) if vals else None,
            "first_above": {str(th): next((k for k, v in enumerate(vals) if v > th), None) for th in thresholds},
        }
    return out


# ---- output classifiers ------------------------------------------------------------------------------------------
def classify_output(schema: Schema, prompt: str, text: str) -> dict[str, Any]:
    """Run the schema's scorers on prompt + output (scorers such as pep8 need the context); each segment says
    whether it holds generated text. Degrades to ``{"error": ...}`` when labeling is unavailable."""
    try:
        from pretag.label import label_document
    except ImportError as e:
        logger.warning("output classifiers unavailable: %s", e)
        return {"error": f"pretag.label is not available ({e})"}
    try:
        doc = label_document(schema, prompt + text)
    except Exception as e:  # a scorer's optional dependency missing, etc.: report beside the generation
        logger.warning("output classifiers failed: %s", e)
        return {"error": f"{type(e).__name__}: {e}"}
    segs, pos, generated = [], 0, []
    for s in doc.segments:
        pos += len(s)
        segs.append(s)
        generated.append(pos > len(prompt))
    bad = {}
    for a in schema.attributes:
        tags = doc.tags.get(a.name) or []
        flags = [t is not None and schema.attribute_of_tag(t)[1] in a.bad for t in tags]
        if a.level == "segment":
            flags = [f for f, g in zip(flags, generated) if g]
        bad[a.name] = sum(flags) / len(flags) if flags else None
    return {"segments": segs, "generated": generated, "scores": doc.scores, "tags": doc.tags, "bad_fraction": bad}


# ---- streaming ---------------------------------------------------------------------------------------------------
@dataclass
class StreamToken:
    index: int
    id: int
    text: str
    temptation: dict[str, float]
    forced: bool
    banned: list[str]
    verdict: dict[str, float] = field(default_factory=dict)
    """As :attr:`TokenRecord.verdict`."""


class TokenStreamer:
    """The HF streamer protocol (``put``/``end``), once: ``generate`` ``put``s the prompt first, then a (batch,)
    tensor of new ids per step; each new id goes to :meth:`token`. HF calls the processor for step t (which
    records the temptation), samples, then ``put``s token t, so in ``token`` the processor's last record is this
    token's step. Subclasses say what a token becomes (:class:`TokenStream`'s queue, the server's events)."""

    def __init__(self):
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.token(int(tid))

    def token(self, tid: int) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


class _QueueStreamer(TokenStreamer):
    """Hands each new id (None at the end) to the consumer's thread."""

    def __init__(self):
        super().__init__()
        self.q: queue.Queue = queue.Queue()

    def token(self, tid: int) -> None:
        self.q.put(tid)

    def end(self) -> None:
        self.q.put(None)


class TokenStream:
    """Iterate to receive each token with its temptation as it is generated (batch 1, greedy or sampling);
    after the iteration ``result`` holds the same :class:`GenerationResult` that ``generate`` returns."""

    def __init__(self, model, tokenizer, schema, prompt: str, policy=None, config: GenerateConfig | None = None,
                 callback=None):
        cfg = config or GenerateConfig()
        if cfg.n != 1 or cfg.num_beams != 1:
            raise ValueError("streaming supports one sequence without beam search (n=1, num_beams=1)")
        self.result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._streamer = _QueueStreamer()
        self._proc = TagProcessor(tokenizer, schema, load_policy(policy, schema),
                                  repetition_penalty=cfg.repetition_penalty, callback=callback)
        self._text = TagVocab(tokenizer, schema).text

        def work():
            try:
                self.result = generate(model, tokenizer, schema, prompt, self._proc.policy, cfg,
                                       streamer=self._streamer, processor=self._proc)
            except BaseException as e:  # re-raised in the consumer's thread
                self._error = e
                self._streamer.end()

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[StreamToken]:
        slots, k = self._proc.slots, 0
        while (tid := self._streamer.q.get()) is not None:
            temp = self._proc.temptations[k][0].tolist()
            act = self._proc.actions[k][0].tolist()
            yield StreamToken(k, tid, self._text(tid),
                              dict(zip(slots, temp)), bool(self._proc.forced[k][0]),
                              [s for s, a in zip(slots, act) if a == BANNED],
                              self._proc.verdicts(temp, int(self._proc.groups[k][0])))
            k += 1
        self._thread.join()
        if self._error is not None:
            raise self._error


def stream(model, tokenizer, schema: Schema, prompt: str, policy=None, config: GenerateConfig | None = None,
           callback=None) -> TokenStream:
    return TokenStream(model, tokenizer, schema, prompt, policy, config, callback)
