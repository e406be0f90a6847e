"""Control tags at inference: a policy, and one LogitsProcessor that measures, then acts.

A model pretrained with control tags (Korbak et al. 2023, the "conditional" objective) learned p(text | tags). At
inference we decide which tags it may write. :class:`TagPolicy` says, per tag, ``allow`` / ``ban`` / ``force`` and a
logit ``bias``; :class:`TagProcessor` applies it inside ``model.generate``. Before it touches the logits it records
each tag token's softmax probability under the model: the *temptation*, the warning light that tells how strongly
the model wanted to write a banned tag before the ban zeroed it.

Where tags may appear (``force_at``):
    segment  (default for prefix schemas) at every segment start the next tokens must be one allowed tag of each
             segment attribute, in schema order; tags are banned everywhere else. Measured on a PEP8 model trained
             with 10 % tag dropout: banning only ``<|bad|>`` let it escape into untagged lines (4.2 % vs 0.4 %,
             69 % of them bad), and allowing tags anywhere let a model loop on tags.
    start    (default for span schemas) tags are forced only at the start of generation; afterwards every tag that
             is not banned may appear anywhere. For span schemas generation starts inside the allowed span and every
             opening and closing tag is banned; the final close is appended when the document ends.
    none     "ban only": nothing is forced; banned tags get -inf, biases apply, other tags may appear anywhere.

Segment starts are decided from the last tokens' text (the same cut as ``pretag.segment``):
    lines       the previous token ends with ``\\n``
    sentences   the previous token ends with ``\\n``, or with ``.!?`` (plus closing quotes/brackets) followed by
                whitespace, or it is pure whitespace and the token before ends with ``.!?`` (byte-level BPE often
                emits ``"."`` then ``" "``); whitespace after a sentence belongs to it, as in ``pretag.segment``
    paragraphs  the previous token ends with a blank line (``\\n\\n``), or is a newline after a newline
    document    only the start of the document
The start of the document (BOS/EOS token or a document-level tag) is a segment start as well.

Where the processor sits among HF's processors: ``generate`` runs its own processors (repetition penalty, n-gram
bans, min length, ...) first, then custom ``logits_processor``s, then the sampling warpers (temperature, top-k,
top-p). So the temptation is measured at temperature 1, and HF's repetition penalty would already have touched tag
logits; pass ``repetition_penalty`` to :class:`TagProcessor` instead (``pretag.generate`` does), which exempts tag
ids. With beam search HF hands processors log-probabilities; the softmax of those is the same distribution.

Memory: per step the processor keeps the (batch, slots) temptation and a (batch, slots) action code, never
(batch, vocab). All work is vectorised; nothing syncs with the device inside ``__call__`` (unless a Python
``callback`` does).
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import LogitsProcessor, StoppingCriteria

from pretag.policy import (  # noqa: F401  (re-exported: pretag.control is where users import policies from)
    FORCE_AT,
    POLICY_DIR,
    RULE_ACTIONS,
    PolicyError,
    Rule,
    TagPolicy,
    default_policy,
    load_policy,
    parse_policy,
    policy_from_dict,
    shipped_policies,
)
from pretag.schema import Schema

logger = logging.getLogger(__name__)

_MODE_CODE = {"segment": 0, "start": 1, "none": 2}
# action codes recorded per step and tag slot
UNTOUCHED, BIASED, BANNED = 0, 1, 2
ACTION_NAMES = {UNTOUCHED: "allow", BIASED: "bias", BANNED: "ban"}
MAX_STATE_RULES = 8  # ban/switch rules the compiled path enumerates (2^n states); more use the general path


# ---- the processor -----------------------------------------------------------------------------------------------
_TEXTS: dict[tuple[int, int, int], list[str]] = {}


def _token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The decoded text of every id (ids past the tokenizer's size decode to ''); cached per tokenizer."""
    key = (id(tokenizer), len(tokenizer), vocab_size)
    if key not in _TEXTS:
        if len(_TEXTS) > 8:
            _TEXTS.clear()
        _TEXTS[key] = _decode_all(tokenizer, vocab_size)
    return _TEXTS[key]


def _decode_all(tokenizer, vocab_size: int) -> list[str]:
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return texts + [""] * (vocab_size - n)


_SENT_END = re.compile(r"[.!?][\"'”’)\]]*\s+$")
_PUNCT_END = re.compile(r"[.!?][\"'”’)\]]*$")
_VOCAB_TABLES: dict[tuple, tuple[Any, dict[str, Any]]] = {}


def _vocab_tables(tokenizer, schema: Schema, order, n_doc: int, doc_start_ids: Sequence[int], vocab: int,
                  device) -> dict[str, Any]:
    """Per-token tables: which attribute group must follow each token, and the two-token rules.

    Decoding and matching every token takes milliseconds (a few % of a short generation), and ``generate`` builds
    a processor per call, so the tables are shared by every processor over the same tokenizer and schema.
    """
    import torch

    tag_ids = tuple(tuple(tokenizer.convert_tokens_to_ids(schema.open_token(t)) for t in a.tags.values())
                    for a in order)
    key = (id(tokenizer), len(tokenizer), vocab, str(device), schema.segmenter, schema.render, n_doc, tag_ids,
           tuple(tokenizer.convert_tokens_to_ids(t) for t in schema.tag_tokens), tuple(doc_start_ids))
    hit = _VOCAB_TABLES.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    G = len(order)
    texts = _token_texts(tokenizer, vocab)
    is_tag = torch.zeros(vocab, dtype=torch.bool)
    is_tag[torch.tensor([i for t in schema.tag_tokens for i in [tokenizer.convert_tokens_to_ids(t)]])] = True
    # group_after[v]: which attribute group must follow token v (-1: none, text may follow)
    group_after = torch.full((vocab,), -1, dtype=torch.long)
    seg = schema.segmenter
    first_seg = n_doc if schema.segment_attributes else -1
    if schema.render == "prefix":
        for i, t in enumerate(texts):
            if seg == "lines" and t.endswith("\n"):
                group_after[i] = first_seg
            elif seg == "sentences" and (t.endswith("\n") or _SENT_END.search(t)):
                group_after[i] = first_seg
            elif seg == "paragraphs" and t.endswith("\n\n"):
                group_after[i] = first_seg
    for i in doc_start_ids:
        group_after[i] = 0 if G else -1
    if schema.render == "prefix":
        for g, ids in enumerate(tag_ids):
            for i in ids:
                group_after[i] = g + 1 if g + 1 < G else -1
    # two-token rules: whitespace after sentence punctuation; a newline after a newline (paragraphs)
    ws = torch.tensor([bool(t) and t.isspace() for t in texts])
    if seg == "sentences":
        prev_ok = torch.tensor([bool(_PUNCT_END.search(t)) for t in texts])
    elif seg == "paragraphs":
        prev_ok = torch.tensor([t.endswith("\n") for t in texts])
        ws = ws & torch.tensor([t.endswith("\n") for t in texts])
    else:
        prev_ok = None
    is_start = torch.zeros(vocab, dtype=torch.bool)
    is_start[torch.tensor(doc_start_ids, dtype=torch.long)] = True
    # compiled path: gi = group + 1 (0: none); gi2 = the same after a token that may end a sentence/paragraph
    gi = group_after + 1
    gi2 = prev_off = None
    if prev_ok is not None:
        gi2 = torch.cat([gi, torch.where((group_after < 0) & ws, first_seg + 1, gi)])
        prev_off = prev_ok.long() * vocab
    tables = {"group_after": group_after, "ws": ws, "prev_ok": prev_ok, "first_seg": first_seg,
              "is_start": is_start, "is_tag": is_tag, "is_text": ~(is_tag | is_start), "gi": gi, "gi2": gi2,
              "prev_off": prev_off}
    tables = {k: v.to(device) if hasattr(v, "to") else v for k, v in tables.items()}
    if len(_VOCAB_TABLES) > 16:
        _VOCAB_TABLES.clear()
    _VOCAB_TABLES[key] = (weakref.ref(tokenizer), tables)
    return tables


@dataclass
class StepInfo:
    """What a ``callback`` sees at each step; its methods change this step's action for chosen rows."""

    step: int
    input_ids: Any
    temptation: Any
    """(batch, slots) probabilities, measured before the policy."""
    slots: list[str]
    """The tag token of each slot column."""
    _proc: TagProcessor

    def _col(self, tag: str) -> int:
        return self._proc.slot_of_tag(tag)

    def _rows(self, rows):
        import torch

        if rows is None:
            return slice(None)
        return torch.as_tensor(rows, device=self.temptation.device)

    def bias(self, tag: str, value: float, rows=None) -> None:
        self._proc._extra_bias[self._rows(rows), self._col(tag)] += value

    def ban(self, tag: str, rows=None) -> None:
        self.bias(tag, float("-inf"), rows)

    def stop(self, rows=None) -> None:
        self._proc.stop[self._rows(rows)] = True

    def flag(self, message: str, rows=None) -> None:
        rows_l = range(self.temptation.shape[0]) if rows is None else rows
        for r in rows_l:
            self._proc.callback_alarms.append((self.step, int(r), message))


class TagProcessor(LogitsProcessor):
    """HF ``LogitsProcessor``: measure every tag's probability, then apply the policy (and rules).

    ``__call__(input_ids (B, T), scores (B, V)) -> new scores (B, V)``; the input is never modified. Create one per
    ``generate`` call (or call :meth:`reset`). ``num_beams > 1`` makes it follow beams: per-row state (rule counters,
    switched policies, stops) is re-ordered to each row's parent beam, found by matching prefixes.

    Two paths compute the same thing. The *compiled* path (no callback, no beams) enumerates every state a row can be
    in — which attribute group must follow the last token, whether the row has written text, which ban/switch rules
    have latched — and precomputes each state's action once (:meth:`_compile_states`), so a step is a table lookup
    plus one add over the vocabulary: about 20 small ops. With one row on the CPU (an interactive session, the
    server) the same tables run as Python scalars (:meth:`_call_host`): a softmax, one add and list lookups. The
    *general* path evaluates the policy per step, which a
    Python callback (free to change any row's bias) and beam re-ordering need. Both share :meth:`_decide`.
    """

    _h_ok = False  # the scalar path's tables exist (set by _compile_host)

    def __init__(self, tokenizer, schema: Schema, policy: TagPolicy | str | None = None, *,
                 repetition_penalty: float = 1.0, num_beams: int = 1,
                 callback: Callable[[StepInfo], None] | None = None, doc_start_ids: Sequence[int] = ()):
        import torch

        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.schema = schema
        self.policy = load_policy(policy, schema)
        self.tokenizer = tokenizer
        self.repetition_penalty = float(repetition_penalty)
        self.num_beams = int(num_beams)
        self.callback = callback
        self.eos_id = tokenizer.eos_token_id
        starts = set(doc_start_ids) | {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
        self.doc_start_ids = sorted(starts)
        # slots: one column per tag token (prefix: open; span: open and close)
        self.slots: list[str] = schema.tag_tokens
        self.slot_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.slots]
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [t for t, i in zip(self.slots, self.slot_ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise ValueError(f"the tokenizer lacks the schema's tag tokens {missing}; was the model trained with "
                             f"schema {schema.name!r}?")
        self.slot_tag = [t for t in schema.tag_names for _ in range(2 if schema.render == "span" else 1)]
        self.slot_close = [schema.render == "span" and i % 2 == 1 for i in range(len(self.slots))]
        # forcing order: document attributes first (generation start only), then segment attributes
        self.order = schema.document_attributes + schema.segment_attributes
        self.n_doc = len(schema.document_attributes)
        # compile the main policy and every switch target; which policy each rule switches to is this processor's
        # state (index into self.policies, -1: not a switch), never written onto the shared, frozen Rule
        self.policies: list[TagPolicy] = [self.policy]
        self._switch_to: list[int] = []
        for r in self.policy.rules:
            if r.action == "switch":
                t = r.policy if isinstance(r.policy, TagPolicy) else load_policy(r.policy, schema)
                self._switch_to.append(len(self.policies))
                self.policies.append(t)
            else:
                self._switch_to.append(-1)
        self._torch = torch
        self._general = callback is not None or self.num_beams > 1
        self._tables_for: tuple | None = None
        self.reset()

    # -- public helpers --
    def slot_of_tag(self, tag: str) -> int:
        """Column of ``tag``'s opening token."""
        self.schema.attribute_of_tag(tag)
        return self.slots.index(self.schema.open_token(tag))

    def reset(self) -> None:
        """Forget state and records (call between ``generate`` calls)."""
        self.start_len: int | None = None
        self.steps = 0
        self.temptations: list[Any] = []   # per step (B, S) float
        self.fired: list[Any] = []         # per step (B, R) bool: rule fired at this step
        self.callback_alarms: list[tuple[int, int, str]] = []
        self.stop = None
        self._prev_ids = None
        self._keys: list[Any] = []         # compiled path: per step (B,) state key; actions/forced derive from it
        self._acts: list[Any] = []         # per step (B, S) int8
        self._forced: list[Any] = []       # per step (B,) bool

    @property
    def actions(self) -> list[Any]:
        """Per step, the (B, S) int8 action code of every tag slot (``UNTOUCHED``, ``BIASED``, ``BANNED``)."""
        self._materialize()
        return self._acts

    @property
    def forced(self) -> list[Any]:
        """Per step, a (B,) bool: text was banned there (a tag had to come)."""
        self._materialize()
        return self._forced

    def _materialize(self) -> None:
        # the compiled path records one state key per step; the codes are looked up only when someone reads them
        for key in self._keys[len(self._acts):]:
            self._acts.append(self._t_act[key])
            self._forced.append(self._t_forced[key])

    # -- compiled tensors --
    def _build_tables(self, vocab: int, device) -> None:
        """Compile the vocabulary, the policies and the rules into tensors; shared by every processor with the
        same tokenizer, schema and policies (``generate`` makes one per call; compiling takes ~0.5 ms)."""
        vt = _vocab_tables(self.tokenizer, self.schema, self.order, self.n_doc, self.doc_start_ids, vocab, device)
        key = (id(vt), repr(self.policies), self._general)
        hit = _POLICY_TABLES.get(key)
        if hit is None or hit[0] is not vt:
            self._compile(vt, device)
            hit = (vt, {k: self.__dict__[k] for k in _COMPILED if k in self.__dict__})
            if len(_POLICY_TABLES) > 32:
                _POLICY_TABLES.clear()
            _POLICY_TABLES[key] = hit
        self.__dict__.update(hit[1])
        self._after_masks: dict[tuple[bool, ...], Any] = {}
        self._tables_for = (vocab, device)

    def _compile(self, vt: dict[str, Any], device) -> None:
        torch = self._torch
        S, G = len(self.slots), len(self.order)
        self._group_after, self._ws, self._prev_ok = vt["group_after"], vt["ws"], vt["prev_ok"]
        self._first_seg, self._is_start, self._is_tag = vt["first_seg"], vt["is_start"], vt["is_tag"]
        self._is_text, self._gi, self._gi2, self._prev_off = vt["is_text"], vt["gi"], vt["gi2"], vt["prev_off"]
        self._slot_ids = torch.tensor(self.slot_ids, device=device)
        # per policy: bias (-inf = banned), tags allowed when forcing group g, tags allowed elsewhere
        P = len(self.policies)
        bias = torch.zeros(P, S)
        force_ok = torch.zeros(P, max(G, 1), S, dtype=torch.bool)
        free_ok = torch.zeros(P, S, dtype=torch.bool)
        mode = torch.zeros(P, dtype=torch.long)
        for p, pol in enumerate(self.policies):
            fa = pol.resolved_force_at(self.schema)
            mode[p] = _MODE_CODE[fa]
            forced_attrs = {self.schema.attribute_of_tag(t)[0].name for t in pol.force}
            for s, tag in enumerate(self.slot_tag):
                attr = self.schema.attribute_of_tag(tag)[0]
                banned = tag in pol.ban or (attr.name in forced_attrs and tag not in pol.force)
                bias[p, s] = float("-inf") if banned else float(pol.bias.get(tag, 0.0))
                if banned or self.slot_close[s]:
                    continue
                if self.schema.render == "prefix":
                    g = next(i for i, a in enumerate(self.order) if a.name == attr.name)
                    force_ok[p, g, s] = True
                # tags outside forced positions: only without segment forcing; span tags never mid-text
                free_ok[p, s] = fa == "none" or (fa == "start" and self.schema.render == "prefix")
            if self.schema.render == "span" and fa == "none":
                free_ok[p] = torch.isfinite(bias[p]) & ~torch.tensor(self.slot_close)
        self._bias, self._force_ok = bias.to(device), force_ok.to(device)
        self._free_ok, self._mode = free_ok.to(device), mode.to(device)
        # rules
        rules = self.policy.rules
        R = len(rules)
        self._r_watch = torch.tensor([self.slot_of_tag(r.watch) if r.watch else 0 for r in rules],
                                     dtype=torch.long, device=device)
        self._r_has_watch = torch.tensor([r.watch is not None for r in rules], device=device)
        self._r_above = torch.tensor([float(r.above or 0.0) for r in rules], device=device)
        self._r_k = torch.tensor([r.consecutive for r in rules], device=device)
        self._r_after = torch.tensor([r.after or 0 for r in rules], device=device)
        ban_m = torch.zeros(R, S)
        for i, r in enumerate(rules):
            if r.action == "ban":
                for t in r.tags:
                    ban_m[i, self.slot_of_tag(t)] = 1.0
                    if self.schema.render == "span":
                        ban_m[i, self.slot_of_tag(t) + 1] = 1.0
        self._r_ban = ban_m.to(device)
        self._r_stop = torch.tensor([r.action == "stop" for r in rules], device=device)
        self._r_switch = torch.tensor(self._switch_to, dtype=torch.long, device=device)
        # what the compiled path needs per step, decided here once
        self._r_nowatch = ~self._r_has_watch if not all(r.watch is not None for r in rules) else None
        self._r_afters = [r.after or 0 for r in rules] if any(r.after for r in rules) else None
        stop_cols = [i for i, r in enumerate(rules) if r.action == "stop"]
        self._r_stop_cols = torch.tensor(stop_cols, device=device) if stop_cols else None
        self._r_stop_col = stop_cols[0] if len(stop_cols) == 1 else None
        if not self._general:
            self._compile_states(device)

    def _compile_states(self, device) -> None:
        """Precompute the action of every per-row state; the step then looks it up by a key.

        key = ((m * P + pol_prev) * T + in_text) * (G + 1) + (pending + 1), where ``pending`` is the attribute group
        that must follow the last token (-1: none), ``in_text`` whether the row has written text (only when some
        policy forces at the start), ``pol_prev`` the row's policy before this step's rules (only with switch rules)
        and ``m`` the bitmask of latched ban/switch rules. The tables come from running the general path's own
        decision (:meth:`_decide`) over all states at once, so the two paths agree by construction.
        """
        torch = self._torch
        rules = self.policy.rules
        R = len(rules)
        state_rules = [i for i, r in enumerate(rules) if r.action in ("ban", "switch")]
        if len(state_rules) > MAX_STATE_RULES:  # 2^n states: evaluate per step instead
            self._general = True
            return
        P, G1 = len(self.policies), len(self.order) + 1
        T = 2 if any(int(m) == _MODE_CODE["start"] for m in self._mode) else 1
        M = 2 ** len(state_rules)
        grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (M, P, T, G1)), indexing="ij")
        m, pol_prev, in_text, gi = (g.reshape(-1) for g in grid)                      # (K,) each
        latched = torch.zeros(m.shape[0], R, dtype=torch.bool, device=device)
        for j, r in enumerate(state_rules):
            latched[:, r] = (m >> j) & 1 == 1
        bias, pending, pol = self._after_rules(latched, pol_prev, in_text.bool(), gi - 1)
        forcing, allowed = self._decide(bias, pending, pol)
        finite = torch.isfinite(bias)
        self._t_slot = torch.where(allowed, torch.where(finite, bias, 0.0), float("-inf"))   # (K, S)
        self._t_text = torch.zeros(m.shape[0], 1, device=device).masked_fill(forcing[:, None], float("-inf"))
        self._t_act = _action_codes(allowed, bias)
        self._t_forced = forcing
        # the policy after the rules as a function of m alone (a row's policy changes only by a switch)
        first = (pol_prev == 0) & (in_text == 0) & (gi == 0)
        self._t_pol = pol[first]                                                      # (M,)
        self._r_bits = torch.zeros(R, dtype=torch.long, device=device)
        for j, r in enumerate(state_rules):
            self._r_bits[r] = 2 ** j
        self._k_text = G1 if T == 2 else 0
        self._k_pol = T * G1 if P > 1 else 0
        self._k_m = P * T * G1 if M > 1 else 0
        self._compile_host(device)

    def _compile_host(self, device) -> None:
        """The scalar path's tables (one row on the CPU): the same state tables as Python lists, and each state's
        whole action as one (V,) row of ``_t_all`` (0 / -inf on text, the tag columns' bias / -inf), so a step is
        a softmax, one add and a few list lookups. Skipped when the (states x vocab) table would exceed 64 MB."""
        torch = self._torch
        K, V = self._t_slot.shape[0], self._gi.shape[0]
        self._h_ok = device.type == "cpu" and K * V <= 2 ** 24
        if not self._h_ok:
            return
        t_all = self._t_text.expand(K, V).clone()
        t_all[:, self._slot_ids] = self._t_slot
        self._t_all = t_all
        self._h_gi = self._gi.tolist()
        self._h_gi2 = self._gi2.tolist() if self._gi2 is not None else None
        self._h_prev_off = self._prev_off.tolist() if self._prev_off is not None else None
        self._h_is_text = self._is_text.tolist()
        self._h_keys = [torch.tensor([k], device=device) for k in range(K)]
        rules = self.policy.rules
        # thresholds as the float32 values the tensor paths compare against, so every path fires on the same step
        self._h_rules = [(r.watch is not None, w, above, k, r.after or 0, bit)
                         for r, w, above, k, bit in zip(rules, self._r_watch.tolist(), self._r_above.tolist(),
                                                        self._r_k.tolist(), self._r_bits.tolist())]
        self._h_stop_cols = [i for i, r in enumerate(rules) if r.action == "stop"]
        self._h_t_pol = self._t_pol.tolist()
        self._h_bool = (torch.zeros(1, dtype=torch.bool, device=device), torch.ones(1, dtype=torch.bool, device=device))

    def _after_rules(self, latched, pol, in_text, pending):
        """The general path's step 3, given the latched rules: (bias (B, S), pending (B,), policy (B,))."""
        torch = self._torch
        pending = _mask_pending(pending, self._mode[pol], in_text)
        if not self.policy.rules:
            return self._bias[pol], pending, pol
        sw = torch.where(latched & (self._r_switch >= 0), self._r_switch, -1).amax(-1)
        switched = sw >= 0
        pol = torch.where(switched, sw, pol)
        pending = torch.where(switched, _mask_pending(pending, self._mode[pol], in_text), pending)
        banned = (latched.float() @ self._r_ban) > 0
        return self._bias[pol].masked_fill(banned, float("-inf")), pending, pol

    def _decide(self, bias, pending, pol):
        """Where a tag must come and which tag slots are allowed: (forcing (B,), allowed (B, S))."""
        torch = self._torch
        finite = torch.isfinite(bias)
        forcing = pending >= 0
        force_ok = self._force_ok[pol, pending.clamp(min=0)] & finite              # (B, S)
        forcing = forcing & force_ok.any(-1)                                        # nothing allowed: let text come
        allowed = torch.where(forcing[:, None], force_ok, self._free_ok[pol] & finite)
        return forcing, allowed

    def _init_state(self, B: int, device) -> None:
        torch = self._torch
        R = len(self.policy.rules)
        self.stop = torch.zeros(B, dtype=torch.bool, device=device)
        self._pol = torch.zeros(B, dtype=torch.long, device=device)
        self._in_text = torch.zeros(B, dtype=torch.bool, device=device)
        self._count = torch.zeros(B, R, dtype=torch.long, device=device)
        self._latched = torch.zeros(B, R, dtype=torch.bool, device=device)
        self._host = B == 1 and not self._general and self.repetition_penalty == 1.0 and self._h_ok
        if self._host:
            self._h_in_text, self._h_pol = False, 0
            self._h_count, self._h_latched = [0] * R, [False] * R
            self._h_fired: dict[int, Any] = {}
            self.stop = self._h_bool[0]

    def _follow_beams(self, input_ids) -> None:
        """Re-order per-row state to each row's parent: the previous row whose ids equal this row's prefix."""
        torch = self._torch
        prev = self._prev_ids
        B, K = input_ids.shape[0] // self.num_beams, self.num_beams
        new = input_ids[:, self.start_len:-1].reshape(B, K, -1)
        old = prev[:, self.start_len:].reshape(B, K, -1)
        eq = (new[:, :, None, :] == old[:, None, :, :]).all(-1)  # (B, K, K)
        parent = eq.float().argmax(-1) + torch.arange(B, device=eq.device)[:, None] * K  # (B, K)
        parent = parent.reshape(-1)
        for name in ("stop", "_pol", "_in_text", "_count", "_latched"):
            setattr(self, name, getattr(self, name)[parent])

    # -- the call --
    def __call__(self, input_ids, scores):
        torch = self._torch
        B, V = scores.shape
        if self._tables_for != (V, scores.device):
            self._build_tables(V, scores.device)
        if self.start_len is None:
            self.start_len = input_ids.shape[1]
            self._init_state(B, scores.device)
        if self._general:
            return self._call_general(input_ids, scores)
        if self._host:
            return self._call_host(input_ids, scores)
        step = input_ids.shape[1] - self.start_len

        # 1. measure: the temptation of every tag slot under the model, before anything changes the logits
        tag_logits = scores.index_select(1, self._slot_ids)                      # (B, S)
        out = torch.empty_like(scores)                                           # the result; scratch until 4.
        temptation = _tag_probs(scores, tag_logits, self._slot_ids, out)         # (B, S)

        # 2. the row's state: which group must follow the last token(s), whether it has written text
        last = input_ids[:, -1]
        if self._gi2 is not None and input_ids.shape[1] > 1:  # two-token rules (sentences, paragraphs)
            key = self._gi2.index_select(0, last + self._prev_off.index_select(0, input_ids[:, -2]))  # (B,)
        else:
            key = self._gi.index_select(0, last)
        if self._k_text:
            self._in_text = self._in_text | self._is_text.index_select(0, last)
            key = key.add(self._in_text, alpha=self._k_text)

        # 3. rules: counters and latches; the latched ban/switch rules select the state
        if self.policy.rules:
            key = self._step_rules(temptation, step, key)

        # 4. act: one add over the vocabulary (-inf on text where a tag must come), then the tag columns
        src = self._penalise(input_ids, scores) if self.repetition_penalty != 1.0 else scores
        torch.add(src, self._t_text.index_select(0, key), out=out)               # (B, V)
        out.index_copy_(1, self._slot_ids, tag_logits + self._t_slot.index_select(0, key))  # -inf: not allowed

        # 5. record, O(B x S) per step
        self.temptations.append(temptation)
        self._keys.append(key)
        self.steps += 1
        return out

    def _call_host(self, input_ids, scores):
        """The compiled path for one row on the CPU, with the state kept in Python scalars: reading two ids and
        the tag probabilities to the host is free there, and each tensor op saved is ~3 us of a ~2 ms step."""
        torch = self._torch
        temptation = torch.softmax(scores, -1).index_select(1, self._slot_ids)   # (1, S), as _tag_probs at B < 8
        last2 = input_ids[0, -2:].tolist()
        last = last2[-1]
        if self._h_gi2 is not None and len(last2) == 2:
            key = self._h_gi2[last + self._h_prev_off[last2[0]]]
        else:
            key = self._h_gi[last]
        if self._k_text:
            self._h_in_text = self._h_in_text or self._h_is_text[last]
            key += self._k_text * self._h_in_text
        if self._h_rules:
            key = self._host_rules(temptation, input_ids.shape[1] - self.start_len, key)
        out = torch.add(scores, self._t_all[key])                                # one add: text and tag columns
        self.temptations.append(temptation)
        self._keys.append(self._h_keys[key])
        self.steps += 1
        return out

    def _host_rules(self, temptation, step: int, key: int) -> int:
        t = temptation[0].tolist()
        count, latched = self._h_count, self._h_latched
        fired = m = 0
        for j, (watch, w, above, k, after, bit) in enumerate(self._h_rules):
            count[j] = count[j] + 1 if (not watch or t[w] > above) else 0
            if not latched[j] and count[j] >= k and step >= after:
                latched[j] = True
                fired |= 1 << j
            if latched[j]:
                m += bit
        if fired not in self._h_fired:
            self._h_fired[fired] = self._torch.tensor([[bool(fired >> j & 1) for j in range(len(count))]],
                                                      device=temptation.device)
        self.fired.append(self._h_fired[fired])
        if self._h_stop_cols:
            self.stop = self._h_bool[any(latched[j] for j in self._h_stop_cols)]
        if self._k_m:
            key += self._h_pol * self._k_pol + m * self._k_m
            self._h_pol = self._h_t_pol[m]
        return key

    def _step_rules(self, temptation, step: int, key):
        watched = temptation.index_select(1, self._r_watch)                     # (B, R)
        cond = watched > self._r_above
        if self._r_nowatch is not None:
            cond = cond | self._r_nowatch
        self._count = self._count.add(1).mul_(cond)                             # consecutive steps, 0 when not
        ready = self._count >= self._r_k
        if self._r_afters is not None:
            ready = ready & self._after_mask(step)
        latched = self._latched | ready
        self.fired.append(latched ^ self._latched)                               # fires once, then latches
        self._latched = latched
        if self._r_stop_cols is not None:
            self.stop = (latched[:, self._r_stop_col] if self._r_stop_col is not None   # one stop rule: a view
                         else latched.index_select(1, self._r_stop_cols).any(-1))
        if self._k_m:
            m = (latched * self._r_bits).sum(-1)                                 # latched ban/switch rules
            if self._k_pol:
                key = key.add(self._pol, alpha=self._k_pol)
            key = key.add(m, alpha=self._k_m)
            self._pol = self._t_pol.index_select(0, m)
        return key

    def _after_mask(self, step: int):
        """(R,) bool: ``step >= after`` per rule; one small tensor per distinct pattern, made on the host."""
        k = tuple(step >= a for a in self._r_afters)
        if k not in self._after_masks:
            self._after_masks[k] = self._torch.tensor(k, device=self._r_k.device)
        return self._after_masks[k]

    def _penalise(self, input_ids, scores):
        """HF's repetition-penalty formula; tag columns are rewritten afterwards, so they are never penalised."""
        torch = self._torch
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
        return scores.scatter(1, input_ids, seen)

    def _call_general(self, input_ids, scores):
        """The policy evaluated per step: needed by callbacks (any row's bias may change) and beam search."""
        torch = self._torch
        step = input_ids.shape[1] - self.start_len
        if self.num_beams > 1 and self._prev_ids is not None and step > 0:
            self._follow_beams(input_ids)
        if self.num_beams > 1:
            self._prev_ids = input_ids

        # 1. measure
        tag_logits = scores.index_select(1, self._slot_ids)                      # (B, S)
        out = torch.empty_like(scores)
        temptation = _tag_probs(scores, tag_logits, self._slot_ids, out)         # (B, S)

        # 2. where must a tag come? (stateless from the last tokens, plus the row's policy mode)
        last = input_ids[:, -1]
        pending = self._group_after[last]                                       # (B,)
        if self._prev_ok is not None and input_ids.shape[1] > 1:
            two = (pending < 0) & self._ws[last] & self._prev_ok[input_ids[:, -2]]
            pending = torch.where(two, torch.full_like(pending, self._first_seg), pending)
        self._in_text |= self._is_text[last]

        # 3. rules: consecutive-temptation counters, latches, bans, switches, stops
        if self.policy.rules:
            watched = temptation[:, self._r_watch]                              # (B, R)
            cond = ~self._r_has_watch | (watched > self._r_above)
            self._count = torch.where(cond, self._count + 1, torch.zeros_like(self._count))
            fire = (self._count >= self._r_k) & (step >= self._r_after) & ~self._latched
            self._latched |= fire
            self.fired.append(fire)
            self.stop |= (self._latched & self._r_stop).any(-1)
        bias, pending, self._pol = self._after_rules(self._latched, self._pol, self._in_text, pending)
        if self.callback is not None:
            self._extra_bias = torch.zeros_like(bias)
            self.callback(StepInfo(step, input_ids, temptation, self.slots, self))
            bias = bias + self._extra_bias

        # 4. act: allowed tag slots per row, text banned where a tag must come
        forcing, allowed = self._decide(bias, pending, self._pol)
        finite = torch.isfinite(bias)
        new_tags = torch.where(allowed, tag_logits + torch.where(finite, bias, 0.0),
                               torch.full_like(tag_logits, float("-inf")))
        src = self._penalise(input_ids, scores) if self.repetition_penalty != 1.0 else scores
        torch.add(src, torch.zeros_like(tag_logits[:, :1]).masked_fill_(forcing[:, None], float("-inf")), out=out)
        if self.num_beams > 1 and self.eos_id is not None:  # beam search ignores AlarmStop: a stopped beam ends
            out = out.masked_fill(self.stop[:, None], float("-inf"))
            out[:, self.eos_id] = torch.where(self.stop, 0.0, out[:, self.eos_id])
            allowed = allowed & ~self.stop[:, None]
            new_tags = new_tags.masked_fill(self.stop[:, None], float("-inf"))
        out[:, self._slot_ids] = new_tags

        # 5. record
        self.temptations.append(temptation)
        self._acts.append(_action_codes(allowed, bias))
        self._forced.append(forcing)
        self.steps += 1
        return out

    # -- results --
    def records(self) -> dict[str, Any]:
        """Stacked records on the CPU: temptation (B, steps, S), action (B, steps, S), forced (B, steps),
        fired (B, steps, R)."""
        torch = self._torch
        if not self.temptations:
            return {"temptation": None, "action": None, "forced": None, "fired": None}
        if self._keys:
            keys = torch.stack(self._keys, 1)                                    # (B, steps)
            action, forced = self._t_act[keys], self._t_forced[keys]
        else:
            action, forced = torch.stack(self._acts, 1), torch.stack(self._forced, 1)
        return {
            "temptation": torch.stack(self.temptations, 1).cpu(),
            "action": action.cpu(),
            "forced": forced.cpu(),
            "fired": torch.stack(self.fired, 1).cpu() if self.fired else None,
        }


# what _compile sets: shared between processors through _POLICY_TABLES (read-only once built)
_COMPILED = ("_group_after", "_ws", "_prev_ok", "_first_seg", "_is_start", "_is_tag", "_is_text", "_gi", "_gi2",
             "_prev_off", "_slot_ids", "_bias", "_force_ok", "_free_ok", "_mode", "_r_watch", "_r_has_watch",
             "_r_above", "_r_k", "_r_after", "_r_ban", "_r_stop", "_r_switch", "_r_nowatch", "_r_afters",
             "_r_stop_cols", "_r_stop_col", "_general", "_t_slot", "_t_text", "_t_act", "_t_forced", "_t_pol",
             "_r_bits", "_k_text", "_k_pol", "_k_m", "_h_ok", "_t_all", "_h_gi", "_h_gi2", "_h_prev_off",
             "_h_is_text", "_h_keys", "_h_rules", "_h_stop_cols", "_h_t_pol", "_h_bool")
_POLICY_TABLES: dict[tuple, tuple[dict[str, Any], dict[str, Any]]] = {}

# HF's LogitsProcessorList calls inspect.signature on every processor at every step (~12 us); a precomputed
# signature makes that a lookup (~4 us)
TagProcessor.__call__.__signature__ = inspect.signature(TagProcessor.__call__)  # type: ignore[attr-defined]


def _mask_pending(pending, mode, in_text):
    """No forced group for rows whose policy forces nowhere (``none``) or only at the start and wrote text."""
    return pending.masked_fill((mode == _MODE_CODE["none"]) | ((mode == _MODE_CODE["start"]) & in_text), -1)


def _action_codes(allowed, bias):
    """(B, S) int8: BANNED where not allowed, BIASED where a bias applies, else UNTOUCHED."""
    import torch

    return torch.where(~allowed, BANNED, torch.where(bias != 0, BIASED, UNTOUCHED)).to(torch.int8)


def _tag_probs(scores, tag_logits, slot_ids, scratch):
    """softmax(scores)[:, slots]; ``scratch`` is a (B, V) tensor it may overwrite (the step's output, written
    afterwards: one fresh (B, V) allocation per step instead of two; on CPU fresh pages cost more than the math).

    One fused softmax is fastest for a few rows, and on a GPU (no host sync). On CPU with many rows the max-shift
    pass is skipped: sum(exp(x)) is used as is when every row's sum is a finite normal float >= 1e-26 (then no term
    overflowed and the terms that underflowed weigh < 1e-8 of it; the host reads that for free), else the shifted
    form. Measured at batch 32, vocab 8192, one thread: exp + sum 80 us vs 160 us (softmax) and 150 us (shifted).
    """
    import torch

    if scores.shape[0] < 8 or scores.device.type != "cpu":
        return torch.softmax(scores, -1).index_select(1, slot_ids)
    total = torch.exp(scores, out=scratch).sum(-1, keepdim=True)                      # (B, 1)
    lo, hi = torch.aminmax(total)
    if float(lo) >= 1e-26 and float(hi) < float("inf"):
        return tag_logits.exp().div_(total)
    top = scores.amax(-1, keepdim=True).clamp_(min=-1e30)                             # (B, 1)
    lse = torch.sub(scores, top, out=scratch).exp_().sum(-1, keepdim=True).log_() + top  # (B, 1)
    return (tag_logits - lse).exp_()


class AlarmStop(StoppingCriteria):
    """HF ``StoppingCriteria``: ends a sequence once one of the processor's ``stop`` rules (or its callback) fired.

    HF calls stopping criteria after the step's token is appended, so the tempted token is the last one kept.
    With beam search (candidate rows do not match the processor's rows) the processor instead forces EOS.
    """

    def __init__(self, processor: TagProcessor):
        self.processor = processor

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = self.processor.stop
        if stop is None or stop.shape[0] != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # the compiled path never writes its stop tensor in place (it makes a new one); the general path does
        return stop.clone() if self.processor._general else stop
