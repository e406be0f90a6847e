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

import dataclasses
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


# ---- the plan: everything a processor looks up, compiled once ------------------------------------------------------
@dataclass(frozen=True)
class VocabTables:
    """Per-token facts about one tokenizer's vocabulary under one schema's tags and segmenter.

    Decoding and matching every token takes milliseconds (a few % of a short generation) and ``generate`` builds a
    processor per call, so these are made once per tokenizer, schema layout, vocabulary size and device, and shared
    by every plan over them (whatever the policy).
    """

    group_after: Any  # (V,) long: the attribute group that must follow token v (-1: none, text may follow)
    ws: Any           # (V,) bool: v may be the whitespace that ends a sentence/paragraph after a ``prev_ok`` token
    prev_ok: Any      # (V,) bool: v may end a sentence/paragraph once whitespace follows; None: no two-token rule
    first_seg: int    # the first segment attribute's group (-1: the schema has none)
    is_text: Any      # (V,) bool: neither a tag nor a document start
    gi: Any           # (V,) long: group_after + 1, the pending part of a state key
    gi2: Any          # (2V,) long: gi, then gi after a ``prev_ok`` token (read at v + prev_off[previous]); or None
    prev_off: Any     # (V,) long: V where prev_ok, else 0; or None


@dataclass(frozen=True)
class RuleTable:
    """A policy's rules as tensors, one column per rule (``R`` of them)."""

    watch: Any             # (R,) long: the slot each rule watches (0 when it watches none)
    above: Any             # (R,) float32: the threshold (every path compares in float32)
    reads: Any             # (R,) long: a verdict rule's attribute group, read where it is pending (-1: a temptation
                           # rule, read at every step); None if no rule reads the verdict
    denom: Any             # (S, R) float: 1 on the tag slots of a verdict rule's attribute; None as ``reads``
    nowatch: Any           # (R,) bool: the rule watches nothing (its condition always holds); None if every rule does
    k: Any                 # (R,) long: consecutive steps needed
    after: Any             # (R,) long: first step it may fire at; None if no rule has one
    ban: Any               # (R, S) float: 1 where a latched ``ban`` rule bans the slot
    switch: Any            # (R,) long: the policy a ``switch`` rule selects (index into ``Plan.policies``; -1: none)
    stop_cols: tuple[int, ...]  # the ``stop`` rules
    bits: Any              # (R,) long: 2^j for the j-th ban/switch rule (they select the compiled state), else 0
    host: tuple[tuple[int, float, bool, int, int, int], ...]  # per rule (watch, above, watches nothing, k, after,
    host_bits: tuple[int, ...]                                # reads) as Python scalars, and bits: one CPU row


@dataclass(frozen=True)
class HostTables:
    """The compiled states as Python lists and whole-vocabulary rows, for one row on the CPU (``_call_host``)."""

    all: Any                  # (K, V): each state's whole action (0 / -inf on text, bias / -inf on the tag columns)
    gi: list[int]
    gi2: list[int] | None
    prev_off: list[int] | None
    is_text: list[bool]
    pol: list[int]            # StateTable.pol
    keys: list[Any]           # (1,) long tensor per key, so the record costs no allocation


@dataclass(frozen=True)
class StateTable:
    """Every state a row can be in, with its action precomputed, so a step is a lookup and one add.

    key = ((m * P + pol_prev) * T + in_text) * (G + 1) + (pending + 1), where ``pending`` is the attribute group
    that must follow the last token (-1: none), ``in_text`` whether the row has written text (T = 2 only when some
    policy forces at the start), ``pol_prev`` the row's policy before this step's rules (only with switch rules)
    and ``m`` the bitmask of latched ban/switch rules. Made by running :func:`apply_rules` and :func:`decide` over
    all states at once.
    """

    slot: Any      # (K, S): each state's addition to the tag logits (bias, or -inf: not allowed)
    text: Any      # (K, 1): 0, or -inf where a tag must come
    act: Any       # (K, S) int8 action codes
    forced: Any    # (K,) bool
    pol: Any       # (M,) long: the policy after the rules, by m (a row's policy changes only by a switch)
    k_text: int    # key strides (0: that part is absent)
    k_pol: int
    k_m: int
    host: HostTables | None


@dataclass(frozen=True)
class Plan:
    """What a :class:`TagProcessor` looks up: the vocabulary, each policy's action per tag slot, the rules and (for
    the compiled paths) every state's action. Made by :func:`compile_plan`; shared and never changed."""

    vocab: VocabTables
    slot_ids: Any   # (S,) long: the tag token of each slot
    bias: Any       # (P, S) per policy (0: main, then each switch target): each slot's bias, -inf: banned
    force_ok: Any   # (P, max(G, 1), S) bool: the slot may be written where group g must come
    free_ok: Any    # (P, S) bool: the slot may be written anywhere else
    mode: Any       # (P,) long: force_at code
    rules: RuleTable
    states: StateTable | None  # None: the policy is evaluated per step (the general path)


_TABLES: dict[tuple, tuple[Any, Any]] = {}  # key -> (weakref to the tokenizer, VocabTables | Plan)


def _cached(tokenizer, key: tuple, make: Callable[[], Any]):
    """One cache for vocabulary tables and plans, keyed on everything they depend on (ids can be reused once a
    tokenizer dies: the weak reference tells)."""
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    value = make()
    if len(_TABLES) > 48:
        _TABLES.clear()
    _TABLES[key] = (weakref.ref(tokenizer), value)
    return value


def _layout(schema: Schema) -> tuple:
    """What a plan reads from a schema: render, segmenter and each attribute's level and tags, in forcing order."""
    return (schema.render, schema.segmenter,
            tuple((a.name, a.level, tuple(a.tags.values())) for a in _order(schema)))


def _order(schema: Schema) -> list:
    """Forcing order: document attributes first (generation start only), then segment attributes."""
    return schema.document_attributes + schema.segment_attributes


def switch_targets(policy: TagPolicy, schema: Schema) -> list[TagPolicy]:
    """The policies a processor may apply: ``policy`` first, then each ``switch`` rule's target, in rule order."""
    return [policy] + [r.policy if isinstance(r.policy, TagPolicy) else load_policy(r.policy, schema)
                       for r in policy.rules if r.action == "switch"]


def compile_plan(tokenizer, schema: Schema, policies: Sequence[TagPolicy], vocab: int, device, *,
                 doc_start_ids: Sequence[int] = (), states: bool = True) -> Plan:
    """The plan for ``policies`` (:func:`switch_targets`) over a vocabulary of ``vocab`` ids on ``device``; cached.

    ``states=False`` skips enumerating the states (the general path evaluates the policy per step); so do more than
    ``MAX_STATE_RULES`` ban/switch rules (2^n states).
    """
    import torch

    device = torch.device(device)
    slot_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in schema.tag_tokens)
    key = ("plan", id(tokenizer), len(tokenizer), _layout(schema), slot_ids, repr(list(policies)), vocab, str(device),
           tuple(doc_start_ids), states)
    return _cached(tokenizer, key, lambda: _compile_plan(tokenizer, schema, list(policies), vocab, device,
                                                         tuple(doc_start_ids), states))


def _compile_plan(tokenizer, schema, policies, vocab, device, doc_start_ids, states) -> Plan:
    import torch

    vt = vocab_tables(tokenizer, schema, vocab, device, doc_start_ids=doc_start_ids)
    slots = schema.tag_tokens
    slot_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in slots], device=device)
    span = schema.render == "span"
    slot_tag = [t for t in schema.tag_names for _ in range(2 if span else 1)]
    slot_close = [span and i % 2 == 1 for i in range(len(slots))]
    order = _order(schema)
    S, G, P = len(slots), len(order), len(policies)
    # per policy: bias (-inf = banned), tags allowed when forcing group g, tags allowed elsewhere
    bias = torch.zeros(P, S)
    force_ok = torch.zeros(P, max(G, 1), S, dtype=torch.bool)
    free_ok = torch.zeros(P, S, dtype=torch.bool)
    mode = torch.zeros(P, dtype=torch.long)
    for p, pol in enumerate(policies):
        fa = pol.resolved_force_at(schema)
        mode[p] = _MODE_CODE[fa]
        forced_attrs = {schema.attribute_of_tag(t)[0].name for t in pol.force}
        for s, tag in enumerate(slot_tag):
            attr = schema.attribute_of_tag(tag)[0]
            banned = tag in pol.ban or (attr.name in forced_attrs and tag not in pol.force)
            bias[p, s] = float("-inf") if banned else float(pol.bias.get(tag, 0.0))
            if banned or slot_close[s]:
                continue
            if not span:
                force_ok[p, next(i for i, a in enumerate(order) if a.name == attr.name), s] = True
            # tags outside forced positions: only without segment forcing; span tags never mid-text
            free_ok[p, s] = fa == "none" or (fa == "start" and not span)
        if span and fa == "none":
            free_ok[p] = torch.isfinite(bias[p]) & ~torch.tensor(slot_close)
    rules = _rule_table(schema, policies, slots, device)
    plan = Plan(vt, slot_ids, bias.to(device), force_ok.to(device), free_ok.to(device), mode.to(device), rules, None)
    n_state_rules = int((rules.bits > 0).sum())
    if states and n_state_rules <= MAX_STATE_RULES:
        plan = dataclasses.replace(plan, states=_compile_states(plan, len(policies), G, n_state_rules, device))
    return plan


def _rule_table(schema: Schema, policies: list[TagPolicy], slots: list[str], device) -> RuleTable:
    import torch

    rules = policies[0].rules
    R = len(rules)

    def col(tag: str) -> int:
        return slots.index(schema.open_token(tag))

    ban = torch.zeros(R, len(slots))
    for i, r in enumerate(rules):
        for t in r.tags if r.action == "ban" else ():
            ban[i, col(t)] = 1.0
            if schema.render == "span":
                ban[i, col(t) + 1] = 1.0
    targets = iter(range(1, len(policies)))
    switch = [next(targets) if r.action == "switch" else -1 for r in rules]
    state_rules = [i for i, r in enumerate(rules) if r.action in ("ban", "switch")]
    order = _order(schema)
    reads = [next(g for g, a in enumerate(order) if a.name == schema.attribute_of_tag(r.watch)[0].name)
             if r.reading == "verdict" else -1 for r in rules]
    denom = torch.zeros(len(slots), R)
    for i, g in enumerate(reads):
        if g >= 0:
            for t in order[g].tags.values():
                denom[col(t), i] = 1.0
    bits = [0] * R
    for j, i in enumerate(state_rules):
        bits[i] = 2 ** j
    return RuleTable(
        watch=torch.tensor([col(r.watch) if r.watch else 0 for r in rules], dtype=torch.long, device=device),
        above=torch.tensor([float(r.above or 0.0) for r in rules], device=device),
        reads=torch.tensor(reads, dtype=torch.long, device=device) if any(g >= 0 for g in reads) else None,
        denom=denom.to(device) if any(g >= 0 for g in reads) else None,
        nowatch=(torch.tensor([r.watch is None for r in rules], device=device)
                 if any(r.watch is None for r in rules) else None),
        k=torch.tensor([r.consecutive for r in rules], dtype=torch.long, device=device),
        after=(torch.tensor([r.after or 0 for r in rules], dtype=torch.long, device=device)
               if any(r.after for r in rules) else None),
        ban=ban.to(device),
        switch=torch.tensor(switch, dtype=torch.long, device=device),
        stop_cols=tuple(i for i, r in enumerate(rules) if r.action == "stop"),
        bits=torch.tensor(bits, dtype=torch.long, device=device),
        # thresholds as the float32 values the tensor paths compare against, so every path fires on the same step
        host=tuple((col(r.watch) if r.watch else 0, float(torch.tensor(float(r.above or 0.0))), r.watch is None,
                    r.consecutive, r.after or 0, g) for r, g in zip(rules, reads)),
        host_bits=tuple(bits),
    )


def _compile_states(plan: Plan, P: int, G: int, n_state_rules: int, device) -> StateTable:
    import torch

    G1 = G + 1
    T = 2 if bool((plan.mode == _MODE_CODE["start"]).any()) else 1
    M = 2 ** n_state_rules
    grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (M, P, T, G1)), indexing="ij")
    m, pol_prev, in_text, gi = (g.reshape(-1) for g in grid)                          # (K,) each
    latched = (m[:, None] & plan.rules.bits) > 0                                      # (K, R)
    bias, pending, pol = apply_rules(plan, latched, pol_prev, in_text.bool(), gi - 1)
    forcing, allowed = decide(plan, bias, pending, pol)
    slot = torch.where(allowed, torch.where(torch.isfinite(bias), bias, 0.0), float("-inf"))  # (K, S)
    text = torch.zeros(m.shape[0], 1, device=device).masked_fill(forcing[:, None], float("-inf"))
    first = (pol_prev == 0) & (in_text == 0) & (gi == 0)
    states = StateTable(slot=slot, text=text, act=action_codes(allowed, bias), forced=forcing, pol=pol[first],
                        k_text=G1 if T == 2 else 0, k_pol=T * G1 if P > 1 else 0, k_m=P * T * G1 if M > 1 else 0,
                        host=None)
    return dataclasses.replace(states, host=_host_tables(plan, states, device))


def _host_tables(plan: Plan, st: StateTable, device) -> HostTables | None:
    """The one-row CPU path's tables; None when the (states x vocab) table would exceed 64 MB."""
    import torch

    vt = plan.vocab
    K, V = st.slot.shape[0], vt.gi.shape[0]
    if device.type != "cpu" or K * V > 2 ** 24:
        return None
    t_all = st.text.expand(K, V).clone()
    t_all[:, plan.slot_ids] = st.slot
    return HostTables(all=t_all, gi=vt.gi.tolist(), gi2=vt.gi2.tolist() if vt.gi2 is not None else None,
                      prev_off=vt.prev_off.tolist() if vt.prev_off is not None else None,
                      is_text=vt.is_text.tolist(), pol=st.pol.tolist(),
                      keys=[torch.tensor([k], device=device) for k in range(K)])


_SENT_END = re.compile(r"[.!?][\"'”’)\]]*\s+$")
_PUNCT_END = re.compile(r"[.!?][\"'”’)\]]*$")


def vocab_tables(tokenizer, schema: Schema, vocab: int, device, *, doc_start_ids: Sequence[int] = ()) -> VocabTables:
    """Which attribute group must follow each token, and the two-token rules (see the module docstring); cached."""
    import torch

    device = torch.device(device)
    key = ("vocab", id(tokenizer), len(tokenizer), _layout(schema),
           tuple(tokenizer.convert_tokens_to_ids(t) for t in schema.tag_tokens), vocab, str(device),
           tuple(doc_start_ids))
    return _cached(tokenizer, key, lambda: _vocab_tables(tokenizer, schema, vocab, device, tuple(doc_start_ids)))


def _vocab_tables(tokenizer, schema: Schema, vocab: int, device, doc_start_ids: tuple[int, ...]) -> VocabTables:
    import torch

    order = _order(schema)
    G = len(order)
    n = min(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False) + [""] * (vocab - n)
    tag_ids = [tokenizer.convert_tokens_to_ids(t) for t in schema.tag_tokens]
    group_after = torch.full((vocab,), -1, dtype=torch.long)
    seg = schema.segmenter
    first_seg = len(schema.document_attributes) if schema.segment_attributes else -1
    if schema.render == "prefix":
        for i, t in enumerate(texts):
            if (t.endswith("\n") and seg in ("lines", "sentences")) or (seg == "sentences" and _SENT_END.search(t)) \
                    or (seg == "paragraphs" and t.endswith("\n\n")):
                group_after[i] = first_seg
    for i in doc_start_ids:
        group_after[i] = 0 if G else -1
    if schema.render == "prefix":
        for g, a in enumerate(order):
            for t in a.tags.values():
                group_after[tokenizer.convert_tokens_to_ids(schema.open_token(t))] = g + 1 if g + 1 < G else -1
    # two-token rules: whitespace after sentence punctuation; a newline after a newline (paragraphs)
    ws = torch.tensor([bool(t) and t.isspace() for t in texts])
    if seg == "sentences":
        prev_ok = torch.tensor([bool(_PUNCT_END.search(t)) for t in texts])
    elif seg == "paragraphs":
        prev_ok = torch.tensor([t.endswith("\n") for t in texts])
        ws = ws & prev_ok
    else:
        prev_ok = None
    is_text = torch.ones(vocab, dtype=torch.bool)
    is_text[torch.tensor(tag_ids + list(doc_start_ids), dtype=torch.long)] = False
    gi = group_after + 1
    gi2 = prev_off = None
    if prev_ok is not None:
        gi2 = torch.cat([gi, torch.where((group_after < 0) & ws, first_seg + 1, gi)]).to(device)
        prev_off = (prev_ok.long() * vocab).to(device)
        prev_ok = prev_ok.to(device)
    return VocabTables(group_after=group_after.to(device), ws=ws.to(device), prev_ok=prev_ok, first_seg=first_seg,
                       is_text=is_text.to(device), gi=gi.to(device), gi2=gi2, prev_off=prev_off)


# ---- the one decision: given the rules' latches, what a row may write -------------------------------------------
def apply_rules(plan: Plan, latched, pol, in_text, pending):
    """The policy rows apply after their latched rules: ``(bias (B, S), pending (B,), policy (B,))``.

    ``latched`` (B, R) are the rules latched so far, ``pol`` (B,) each row's policy before this step's rules,
    ``in_text`` (B,) whether it wrote text, ``pending`` (B,) the attribute group the last token asks for (-1: none;
    it stays -1 where the policy forces no tag, before or after a switch). The latest latched switch rule selects
    the policy; latched ban rules add -inf. The compiled paths run it once over every state (:func:`compile_plan`),
    the general path per step.
    """
    import torch

    pending = _mask_pending(pending, plan.mode[pol], in_text)
    if not latched.shape[-1]:
        return plan.bias[pol], pending, pol
    sw = torch.where(latched & (plan.rules.switch >= 0), plan.rules.switch, -1).amax(-1)
    switched = sw >= 0
    pol = torch.where(switched, sw, pol)
    pending = torch.where(switched, _mask_pending(pending, plan.mode[pol], in_text), pending)
    banned = (latched.float() @ plan.rules.ban) > 0
    return plan.bias[pol].masked_fill(banned, float("-inf")), pending, pol


def decide(plan: Plan, bias, pending, pol):
    """Where a tag must come and which tag slots are allowed: ``(forcing (B,), allowed (B, S))``."""
    import torch

    finite = torch.isfinite(bias)
    force_ok = plan.force_ok[pol, pending.clamp(min=0)] & finite                     # (B, S)
    forcing = (pending >= 0) & force_ok.any(-1)                                      # nothing allowed: text may come
    allowed = torch.where(forcing[:, None], force_ok, plan.free_ok[pol] & finite)
    return forcing, allowed


def _mask_pending(pending, mode, in_text):
    """No forced group for rows whose policy forces nowhere (``none``) or only at the start and wrote text."""
    return pending.masked_fill((mode == _MODE_CODE["none"]) | ((mode == _MODE_CODE["start"]) & in_text), -1)


def action_codes(allowed, bias):
    """(B, S) int8: BANNED where not allowed, BIASED where a bias applies, else UNTOUCHED."""
    import torch

    return torch.where(~allowed, BANNED, torch.where(bias != 0, BIASED, UNTOUCHED)).to(torch.int8)


# ---- rule state: the one place rules count and latch -------------------------------------------------------------
def advance(count, latched, held, k, ready, read=True):
    """The rules' semantics, written once: ``(count, latched, fired)`` after one step.

    ``held``: the rule's condition held at this step (it watches nothing, or its reading is above its threshold);
    ``count`` steps in a row it held; ``ready``: the step is at or past the rule's ``after``; ``read``: the rule is
    read at this step (a verdict rule only where its attribute's tag is pending; a step it is not read at leaves
    ``count`` as it was). A rule fires at the first step where it held ``k`` steps in a row, is read and is ready,
    then stays fired (latched). Works alike on (B, R) tensors and on one rule's Python scalars (the one-row path,
    where each tensor op would cost ~3 us).
    """
    new = (count + 1) * held                                                         # consecutive steps, 0 when not
    count = new if read is True else new * read + count * (read ^ True)
    now = latched | ((count >= k) & ready & read)
    return count, now, now ^ latched                                                 # fires once, then latches


class RuleState:
    """Per row and rule: for how many consecutive steps the rule's condition has held, and whether it has fired.

    Every path of :class:`TagProcessor` steps this object, and it steps by :func:`advance`: on (B, R) tensors, or,
    for one row on the host (``host=True``), on Python scalars. The rules themselves are never written.
    """

    def __init__(self, rules: RuleTable, batch: int, device, *, host: bool = False):
        import torch

        self.rules, self.host = rules, host
        R = rules.k.shape[0]
        if host:
            self.count, self.latched = [0] * R, [False] * R
            self._fired: dict[tuple[bool, ...], Any] = {}  # one (1, R) tensor per pattern, made once
            self._bool = (torch.zeros(1, dtype=torch.bool, device=device), torch.ones(1, dtype=torch.bool, device=device))
        else:
            self.count = torch.zeros(batch, R, dtype=torch.long, device=device)
            self.latched = torch.zeros(batch, R, dtype=torch.bool, device=device)

    def step(self, temptation, step: int, group=None):
        """Advance by one step given the (B, S) temptation and, when a rule reads the verdict, the (B,) attribute
        group the text asks for (-1: none; an int on the host); return the (B, R) rules that fired at it."""
        r = self.rules
        if self.host:
            t = temptation[0].tolist()
            # verdicts with the tensor paths' float32 arithmetic, so every path fires on the same step
            v = self._verdicts(temptation)[0].tolist() if r.reads is not None else None
            fired = []
            for j, (w, above, nowatch, k, after, g) in enumerate(r.host):
                if g < 0:
                    held, read = nowatch or t[w] > above, True
                else:
                    held, read = v[j] > above, group == g
                self.count[j], self.latched[j], f = advance(self.count[j], self.latched[j], held, k, step >= after,
                                                            read)
                fired.append(f)
            key = tuple(fired)
            if key not in self._fired:
                self._fired[key] = self._bool[0].new_tensor([key])
            return self._fired[key]
        import torch

        value, read = temptation.index_select(1, r.watch), True                     # (B, R)
        if r.reads is not None:
            verdict = r.reads >= 0
            value = torch.where(verdict, self._verdicts(temptation), value)
            read = ~verdict | (group[:, None] == r.reads)
        held = value > r.above
        if r.nowatch is not None:
            held = held | r.nowatch
        self.count, self.latched, fired = advance(self.count, self.latched, held, r.k,
                                                  True if r.after is None else r.after <= step, read)
        return fired

    def _verdicts(self, temptation):
        """(B, R): each rule's watched temptation over its attribute's (0 / 0 = NaN holds nowhere)."""
        r = self.rules
        return temptation.index_select(1, r.watch) / (temptation.float() @ r.denom).to(temptation.dtype)

    def stopped(self):
        """(B,) bool: a ``stop`` rule has fired; None without stop rules. Never a tensor it writes to later."""
        cols = self.rules.stop_cols
        if not cols:
            return None
        if self.host:
            return self._bool[any(self.latched[j] for j in cols)]
        if len(cols) == 1:
            return self.latched[:, cols[0]]  # a view of a tensor that advance replaces, never writes
        return self.latched[:, list(cols)].any(-1)

    def mask(self):
        """The bitmask of latched ban/switch rules (the ``m`` of a state key): (B,) long, or an int on the host."""
        if self.host:
            return sum(b for b, on in zip(self.rules.host_bits, self.latched) if on)
        return (self.latched * self.rules.bits).sum(-1)

    def reorder(self, rows) -> None:
        """Follow beam search: row i takes the state of row ``rows[i]``."""
        self.count, self.latched = self.count[rows], self.latched[rows]


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

    A step measures the temptation, advances the rules (:class:`RuleState`), looks up the action in the
    :class:`Plan` and records. The plan holds every state a row can be in — which attribute group must follow the
    last token, whether the row has written text, which ban/switch rules have latched — with its action precomputed
    by :func:`decide`, so a step is a table lookup plus one add over the vocabulary (the *compiled* path). With one
    row on the CPU (an interactive session, the server) the lookup runs on Python scalars (:meth:`_call_host`).
    A Python callback (free to change any row's bias) and beam re-ordering need the *general* path, which runs
    :func:`apply_rules` and :func:`decide` per step. ``tests/test_control_oracle.py`` checks all three against a
    direct, slow reference written independently of this module.
    """

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
        # the main policy and every switch target; which one a row applies is this processor's state, never the rule's
        self.policies: list[TagPolicy] = switch_targets(self.policy, schema)
        self.order = _order(schema)
        """The forcing order of the attributes: a step's ``group`` indexes it."""
        self._group_cols = [[self.slots.index(schema.open_token(t)) for t in a.tags.values()] for a in self.order]
        self.plan: Plan | None = None
        self._plan_for: tuple | None = None  # (vocab size, device) the plan was compiled for
        self._torch = torch
        self._general = callback is not None or self.num_beams > 1
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
        self._host = False                 # one row on the CPU: the scalar twin of the compiled path
        self._prev_ids = None
        self._keys: list[Any] = []         # compiled paths: per step (B,) state key; actions/forced derive from it
        self._acts: list[Any] = []         # per step (B, S) int8
        self._forced: list[Any] = []       # per step (B,) bool
        self._groups: list[Any] = []       # per step (B,) long: the group the text asks for

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

    @property
    def groups(self) -> list[Any]:
        """Per step, a (B,) long: the attribute group (index into :attr:`order`) the text asked for, -1: none."""
        self._materialize()
        return self._groups

    def _materialize(self) -> None:
        # the compiled paths record one state key per step; the codes are looked up only when someone reads them
        for key in self._keys[len(self._acts):]:
            self._acts.append(self.plan.states.act[key])
            self._forced.append(self.plan.states.forced[key])
            self._groups.append(self._group_of(key))

    def _group_of(self, keys):
        """The group the text asked for, from compiled state keys: a key's last part (stride 1) is group + 1."""
        return keys % (len(self.order) + 1) - 1

    # -- the call --
    def __call__(self, input_ids, scores):
        B, V = scores.shape
        if self._plan_for != (V, scores.device):
            self._plan_for = (V, scores.device)
            self.plan = compile_plan(self.tokenizer, self.schema, self.policies, V, scores.device,
                                     doc_start_ids=self.doc_start_ids, states=not self._general)
            self._general = self.plan.states is None  # more ban/switch rules than the states can enumerate
        if self.start_len is None:
            self.start_len = input_ids.shape[1]
            self._start(B, scores.device)
        step = input_ids.shape[1] - self.start_len
        if self._general:
            return self._call_general(input_ids, scores, step)
        if self._host:
            return self._call_host(input_ids, scores, step)
        return self._call_compiled(input_ids, scores, step)

    def _start(self, B: int, device) -> None:
        """Per-row state at the first step: policy 0, no text yet, no rule counted or latched, not stopped."""
        torch, st = self._torch, self.plan.states
        self._host = (B == 1 and not self._general and self.repetition_penalty == 1.0 and st is not None
                      and st.host is not None)
        self._rules = RuleState(self.plan.rules, B, device, host=self._host)
        self._pol = torch.zeros(B, dtype=torch.long, device=device)
        self._in_text = torch.zeros(B, dtype=torch.bool, device=device)
        self.stop = torch.zeros(B, dtype=torch.bool, device=device)
        self._host_state = [False, 0]  # the one row's in_text and policy, as Python scalars

    def _call_compiled(self, input_ids, scores, step: int):
        """The compiled path: the state key, one lookup, one add over the vocabulary, then the tag columns."""
        torch, plan = self._torch, self.plan
        vt, st = plan.vocab, plan.states

        # 1. measure: the temptation of every tag slot under the model, before anything changes the logits
        tag_logits = scores.index_select(1, plan.slot_ids)                       # (B, S)
        out = torch.empty_like(scores)                                           # the result; scratch until 3.
        temptation = _tag_probs(scores, tag_logits, plan.slot_ids, out)          # (B, S)

        # 2. look up: which group the last token(s) ask for, whether the row has written text, the latched rules
        last = input_ids[:, -1]
        if vt.gi2 is not None and input_ids.shape[1] > 1:  # two-token rules (sentences, paragraphs)
            key = vt.gi2.index_select(0, last + vt.prev_off.index_select(0, input_ids[:, -2]))  # (B,)
        else:
            key = vt.gi.index_select(0, last)
        group = key - 1 if plan.rules.reads is not None else None               # the group the text asks for
        if st.k_text:
            self._in_text = self._in_text | vt.is_text.index_select(0, last)
            key = key.add(self._in_text, alpha=st.k_text)
        if self.policy.rules:
            self.fired.append(self._rules.step(temptation, step, group))
            self.stop = self._rules.stopped() if plan.rules.stop_cols else self.stop
            if st.k_m:
                m = self._rules.mask()
                if st.k_pol:
                    key = key.add(self._pol, alpha=st.k_pol)
                key = key.add(m, alpha=st.k_m)
                self._pol = st.pol.index_select(0, m)

        # 3. act: one add over the vocabulary (-inf on text where a tag must come), then the tag columns
        src = self._penalise(input_ids, scores) if self.repetition_penalty != 1.0 else scores
        torch.add(src, st.text.index_select(0, key), out=out)                    # (B, V)
        out.index_copy_(1, plan.slot_ids, tag_logits + st.slot.index_select(0, key))  # -inf: not allowed

        # 4. record, O(B x S) per step
        self.temptations.append(temptation)
        self._keys.append(key)
        self.steps += 1
        return out

    def _call_host(self, input_ids, scores, step: int):
        """The compiled path for one row on the CPU, its key computed from Python scalars: reading two ids to the
        host is free there, and each tensor op saved is ~3 us of a ~2 ms step."""
        torch, st = self._torch, self.plan.states
        h, row = st.host, self._host_state
        temptation = torch.softmax(scores, -1).index_select(1, self.plan.slot_ids)  # (1, S), as _tag_probs at B < 8
        last2 = input_ids[0, -2:].tolist()
        last = last2[-1]
        key = h.gi2[last + h.prev_off[last2[0]]] if h.gi2 is not None and len(last2) == 2 else h.gi[last]
        group = key - 1
        if st.k_text:
            row[0] = row[0] or h.is_text[last]
            key += st.k_text * row[0]
        if self.policy.rules:
            self.fired.append(self._rules.step(temptation, step, group))
            self.stop = self._rules.stopped() if self.plan.rules.stop_cols else self.stop
            if st.k_m:
                m = self._rules.mask()
                key += row[1] * st.k_pol + m * st.k_m
                row[1] = h.pol[m]
        out = torch.add(scores, h.all[key])                                      # one add: text and tag columns
        self.temptations.append(temptation)
        self._keys.append(h.keys[key])
        self.steps += 1
        return out

    def _call_general(self, input_ids, scores, step: int):
        """The policy evaluated per step: needed by callbacks (any row's bias may change) and beams."""
        torch, plan = self._torch, self.plan
        if self.num_beams > 1 and self._prev_ids is not None and step > 0:
            self._follow_beams(input_ids)
        if self.num_beams > 1:
            self._prev_ids = input_ids

        # 1. measure
        tag_logits = scores.index_select(1, plan.slot_ids)                       # (B, S)
        out = torch.empty_like(scores)
        temptation = _tag_probs(scores, tag_logits, plan.slot_ids, out)          # (B, S)

        # 2. decide: the group the last token(s) ask for, the rules, then the row's policy
        vt, last = plan.vocab, input_ids[:, -1]
        pending = vt.group_after[last]                                           # (B,)
        if vt.prev_ok is not None and input_ids.shape[1] > 1:
            two = (pending < 0) & vt.ws[last] & vt.prev_ok[input_ids[:, -2]]
            pending = torch.where(two, torch.full_like(pending, vt.first_seg), pending)
        self._groups.append(pending)
        self._in_text = self._in_text | vt.is_text[last]
        if self.policy.rules:
            self.fired.append(self._rules.step(temptation, step, pending))
            stopped = self._rules.stopped()
            if stopped is not None:
                self.stop = self.stop | stopped
        bias, pending, self._pol = apply_rules(plan, self._rules.latched, self._pol, self._in_text, pending)
        if self.callback is not None:
            self._extra_bias = torch.zeros_like(bias)
            self.callback(StepInfo(step, input_ids, temptation, self.slots, self))
            bias = bias + self._extra_bias
        forcing, allowed = decide(plan, bias, pending, self._pol)

        # 3. act: allowed tag slots per row, text banned where a tag must come
        new_tags = torch.where(allowed, tag_logits + torch.where(torch.isfinite(bias), bias, 0.0),
                               torch.full_like(tag_logits, float("-inf")))
        src = self._penalise(input_ids, scores) if self.repetition_penalty != 1.0 else scores
        torch.add(src, torch.zeros_like(tag_logits[:, :1]).masked_fill_(forcing[:, None], float("-inf")), out=out)
        if self.num_beams > 1 and self.eos_id is not None:  # beam search ignores AlarmStop: a stopped beam ends
            out = out.masked_fill(self.stop[:, None], float("-inf"))
            out[:, self.eos_id] = torch.where(self.stop, 0.0, out[:, self.eos_id])
            allowed = allowed & ~self.stop[:, None]
            new_tags = new_tags.masked_fill(self.stop[:, None], float("-inf"))
        out[:, plan.slot_ids] = new_tags

        # 4. record
        self.temptations.append(temptation)
        self._acts.append(action_codes(allowed, bias))
        self._forced.append(forcing)
        self.steps += 1
        return out

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
        self.stop, self._pol, self._in_text = self.stop[parent], self._pol[parent], self._in_text[parent]
        self._rules.reorder(parent)

    def _penalise(self, input_ids, scores):
        """HF's repetition-penalty formula; tag columns are rewritten afterwards, so they are never penalised."""
        torch = self._torch
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
        return scores.scatter(1, input_ids, seen)

    # -- results --
    def records(self) -> dict[str, Any]:
        """Stacked records on the CPU: temptation (B, steps, S), action (B, steps, S), forced (B, steps),
        fired (B, steps, R), group (B, steps): the attribute group (index into :attr:`order`) the text asked for
        at each step, -1 where none (read :meth:`verdicts` from it)."""
        torch = self._torch
        if not self.temptations:
            return {"temptation": None, "action": None, "forced": None, "fired": None, "group": None}
        if self._keys:
            keys = torch.stack(self._keys, 1)                                    # (B, steps)
            action, forced = self.plan.states.act[keys], self.plan.states.forced[keys]
            group = self._group_of(keys)
        else:
            action, forced = torch.stack(self._acts, 1), torch.stack(self._forced, 1)
            group = torch.stack(self._groups, 1)
        return {
            "temptation": torch.stack(self.temptations, 1).cpu(),
            "action": action.cpu(),
            "forced": forced.cpu(),
            "fired": torch.stack(self.fired, 1).cpu() if self.fired else None,
            "group": group.cpu(),
        }

    def verdicts(self, temptation: Sequence[float], group: int) -> dict[str, float]:
        """The verdict at one step from its temptation row (one value per slot) and the group the text asked for:
        tag token -> its share of the probability of that attribute's tags (``Rule.reading``). Empty where no
        group is asked for, for span schemas, or where every tag of the attribute has probability 0."""
        if group < 0 or self.schema.render != "prefix":
            return {}
        cols = self._group_cols[group]
        total = sum(temptation[c] for c in cols)
        return {self.slots[c]: temptation[c] / total for c in cols} if total > 0 else {}


# HF's LogitsProcessorList calls inspect.signature on every processor at every step (~12 us); a precomputed
# signature makes that a lookup (~4 us)
TagProcessor.__call__.__signature__ = inspect.signature(TagProcessor.__call__)  # type: ignore[attr-defined]


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
