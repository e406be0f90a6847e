"""Every path of TagProcessor against an oracle: a direct, slow reference written here from the documented rules.

The oracle shares nothing with ``pretag.control`` but the policy objects: it reads each row's policy, rules and
tokens in plain Python, one row and one step at a time, straight from the module docstring and ``TagPolicy``/``Rule``
docs. Seeded random policies (bans, forces, biases, every force_at, flag/stop/ban/switch rules) and random token
streams then drive the compiled path (several rows), its one-row scalar twin and the general path (a callback) and
compare outputs and records exactly.
"""

import math
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.control import TagProcessor  # noqa: E402
from pretag.policy import PolicyError, Rule, TagPolicy, load_policy  # noqa: E402
from pretag.schema import load_schema, schema_from_dict  # noqa: E402

CORPUS = ["x = 1\n", "def f(a, b):\n    return a + b\n", "Hello there. How are you? Fine!\n\n"] * 10
NEG = float("-inf")
ALLOW, BIAS, BAN = 0, 1, 2  # the documented action codes


class Oracle:
    """The policy applied to one row at a time, as the docs state it.

    Per step and row: the temptation is softmax(scores) at each tag token; rules count consecutive steps whose
    watched temptation is above the threshold (compared in float32, as the processor documents) and latch on the
    first step >= ``after`` where the count reached ``consecutive``; a verdict rule reads P(watch) over the sum of
    its attribute's tags instead, and only at steps where the last token(s) ask for that attribute's tag (other
    steps leave its count alone); the latest latched switch rule picks the policy;
    a tag must come where the last token(s) end a segment (or start the document, or follow a tag of an earlier
    attribute) and both the policy before and after this step's switch force there; text is then banned and only the
    allowed tags of that attribute may come. Elsewhere tags may come only under ``force_at: none`` (or ``start`` for
    prefix schemas) and never a closing span tag. Tag logits are never repetition-penalised.
    """

    def __init__(self, tok, schema, policy, repetition_penalty=1.0):
        self.tok, self.schema, self.penalty = tok, schema, repetition_penalty
        self.policy = load_policy(policy, schema)
        self.span = schema.render == "span"
        self.order = [a for a in schema.attributes if a.level == "document"] + \
                     [a for a in schema.attributes if a.level == "segment"]
        self.slots = []  # (token id, tag name, is a closing tag)
        for a in schema.attributes:
            for v in a.values:
                t = a.tags[v]
                self.slots.append((tok.convert_tokens_to_ids(f"<|{t}|>" if not self.span else f"<{t}>"), t, False))
                if self.span:
                    self.slots.append((tok.convert_tokens_to_ids(f"</{t}>"), t, True))
        self.group_of_open = {i: g for g, a in enumerate(self.order) for (i, t, close) in self.slots
                              if not close and t in a.tags.values()}
        self.starts = {i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None}
        self.tag_ids = {i for i, _, _ in self.slots}
        self.rows = None
        self.texts = {}
        self.fires = {"temptation": 0, "verdict": 0}

    def text(self, i):
        if i not in self.texts:
            self.texts[i] = self.tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.texts[i]

    def target(self, rule):
        return rule.policy if isinstance(rule.policy, TagPolicy) else load_policy(rule.policy, self.schema)

    def pending_group(self, ids):
        """The attribute group (index into the forcing order) the last token(s) ask for, or None."""
        last = ids[-1]
        if self.span:
            return None  # generation starts inside the span: nothing is ever forced
        if last in self.starts:
            return 0 if self.order else None
        if last in self.group_of_open:
            g = self.group_of_open[last] + 1
            return g if g < len(self.order) else None
        segment_attrs = [a for a in self.order if a.level == "segment"]
        if not segment_attrs:
            return None
        first = self.order.index(segment_attrs[0])
        t, seg = self.text(last), self.schema.segmenter
        if seg == "lines" and t.endswith("\n"):
            return first
        if seg == "sentences" and (t.endswith("\n") or re.search(r"[.!?][\"'”’)\]]*\s+$", t)):
            return first
        if seg == "paragraphs" and t.endswith("\n\n"):
            return first
        if len(ids) > 1 and t and t.isspace():
            prev = self.text(ids[-2])
            if seg == "sentences" and re.search(r"[.!?][\"'”’)\]]*$", prev):
                return first
            if seg == "paragraphs" and t.endswith("\n") and prev.endswith("\n"):
                return first
        return None

    def forces_here(self, policy, in_text):
        fa = policy.resolved_force_at(self.schema)
        return fa == "segment" or (fa == "start" and not in_text)

    def __call__(self, input_ids, scores):
        B = scores.shape[0]
        if self.rows is None:
            self.start = input_ids.shape[1]
            R = len(self.policy.rules)
            self.rows = [{"pol": self.policy, "text": False, "count": [0] * R, "latched": [False] * R,
                          "stop": False} for _ in range(B)]
        step = input_ids.shape[1] - self.start
        out, rec = scores.clone(), []
        for b in range(B):
            out[b], r = self.row(input_ids[b].tolist(), scores[b], self.rows[b], step)
            rec.append(r)
        return out, {k: [r[k] for r in rec] for k in rec[0]}

    def row(self, ids, scores, st, step):
        probs = torch.softmax(scores, -1)
        temptation = [float(probs[i]) for i, _, _ in self.slots]
        asked = self.pending_group(ids)  # before any policy: where the text asks for a tag
        # rules
        fired = []
        for j, rule in enumerate(self.policy.rules):
            w = None if rule.watch is None else next(k for k, (_, t, c) in enumerate(self.slots)
                                                     if t == rule.watch and not c)
            above = float(torch.tensor(rule.above or 0.0, dtype=torch.float32))
            if rule.reading == "verdict":
                attr = self.schema.attribute_of_tag(rule.watch)[0]
                if asked is None or self.order[asked].name != attr.name:
                    fired.append(False)  # not read here: the run neither grows nor breaks
                    continue
                total = sum(temptation[k] for k, (_, t, c) in enumerate(self.slots)
                            if not c and t in attr.tags.values())
                holds = total > 0 and temptation[w] / total > above
            else:
                holds = w is None or temptation[w] > above
            st["count"][j] = st["count"][j] + 1 if holds else 0
            fire = (not st["latched"][j] and st["count"][j] >= rule.consecutive and step >= (rule.after or 0))
            self.fires[rule.reading] += fire
            st["latched"][j] = st["latched"][j] or fire
            fired.append(fire)
            if st["latched"][j] and rule.action == "stop":
                st["stop"] = True
        latched = [r for r, on in zip(self.policy.rules, st["latched"]) if on]
        before = st["pol"]
        switches = [r for r in latched if r.action == "switch"]
        pol = self.target(switches[-1]) if switches else before
        st["pol"] = pol
        st["text"] = st["text"] or (ids[-1] not in self.tag_ids and ids[-1] not in self.starts)
        group = self.pending_group(ids)
        if not (self.forces_here(before, st["text"]) and self.forces_here(pol, st["text"])):
            group = None
        # each tag slot's bias (None: banned)
        forced_attrs = {self.schema.attribute_of_tag(t)[0].name for t in pol.force}
        rule_bans = {t for r in latched if r.action == "ban" for t in r.tags}
        bias = []
        for _, tag, _ in self.slots:
            attr = self.schema.attribute_of_tag(tag)[0].name
            banned = tag in pol.ban or tag in rule_bans or (attr in forced_attrs and tag not in pol.force)
            bias.append(None if banned else float(pol.bias.get(tag, 0.0)))
        candidates = [] if group is None else [
            k for k, (i, tag, close) in enumerate(self.slots)
            if not close and bias[k] is not None and tag in self.order[group].tags.values()]
        forcing = bool(candidates)
        fa = pol.resolved_force_at(self.schema)
        free = fa == "none" or (fa == "start" and not self.span)
        allowed = [k in candidates if forcing else (free and bias[k] is not None and not close)
                   for k, (_, _, close) in enumerate(self.slots)]
        # act: text (repetition-penalised), then the tag columns from the raw logits
        out = scores.clone()
        for i in set(ids):  # HF's repetition penalty, in the scores' dtype
            out[i] = scores[i] * self.penalty if scores[i] < 0 else scores[i] / self.penalty
        if forcing:
            out[:] = NEG
        for k, (i, _, _) in enumerate(self.slots):
            out[i] = scores[i] + torch.tensor(bias[k], dtype=scores.dtype) if allowed[k] else NEG
        action = [BAN if not a else BIAS if bias[k] != 0 else ALLOW for k, a in enumerate(allowed)]
        return out, {"temptation": temptation, "action": action, "forced": forcing, "fired": fired,
                     "stop": st["stop"], "group": -1 if asked is None else asked}


# ---- random policies and token streams ---------------------------------------------------------------------------
def random_policy(schema, rng: random.Random) -> TagPolicy:
    """A valid random policy: bans, a force, biases, any force_at, up to four rules of every action."""
    tags = schema.tag_names
    while True:
        p = TagPolicy(name="random", force_at=rng.choice([None, "segment", "start", "none"]))
        p.ban = rng.sample(tags, rng.randint(0, 2))
        if p.force_at != "none" and rng.random() < 0.4:
            p.force = [rng.choice([t for t in tags if t not in p.ban] or tags)]
        p.bias = {t: rng.choice([-2.0, 0.5, 3.0]) for t in rng.sample(tags, rng.randint(0, 2))}
        for _ in range(rng.randint(0, 4)):
            action = rng.choice(["flag", "stop", "ban", "switch"])
            watch = rng.choice([None, *tags]) if action == "ban" else rng.choice(tags)
            after = rng.choice([None, 0, 2, 5]) if watch else rng.choice([0, 2, 5])
            target = None
            if action == "switch":
                target = TagPolicy(ban=rng.sample(tags, 1), force_at=rng.choice([None, "start", "none"]),
                                   bias={rng.choice(tags): 1.5}, name="target")
            reading = "verdict" if watch and schema.render == "prefix" and rng.random() < 0.5 else "temptation"
            p.rules.append(Rule(action, watch=watch, above=rng.choice([0.05, 0.2, 0.5]) if watch else None,
                                consecutive=rng.choice([1, 1, 2, 3]), after=after,
                                tags=tuple(rng.sample(tags, 1)) if action == "ban" else (), policy=target,
                                reading=reading))
        try:
            p.validate(schema)
            return p
        except PolicyError:
            continue


def drive(tok, schema, policy, *, batch, seed, steps=14, penalty=1.0, callback=None, oracle_cls=Oracle):
    """Run the processor and the oracle on the same random prefixes and scores; assert they agree at every step.
    Returns both (the oracle counts the rules that fired)."""
    from pretag.tokens import encode_text

    g = torch.Generator().manual_seed(seed)
    pool = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in schema.tag_tokens]
    for piece in ("x = 1", "\n", "\n\n", "Hello there.", " ", ". ", "! ", "a", "How", "?\n"):
        pool += encode_text(tok, piece)
    pool_t = torch.tensor(pool)
    proc = TagProcessor(tok, schema, policy, repetition_penalty=penalty, callback=callback)
    oracle = oracle_cls(tok, schema, policy, repetition_penalty=penalty)
    ids = pool_t[torch.randint(len(pool), (batch, 3), generator=g)]
    ids[:, 0] = tok.eos_token_id
    expected = []
    for t in range(steps):
        scores = torch.randn(batch, len(tok), generator=g) * 3
        scores[:, proc.slot_ids] += (torch.rand(batch, len(proc.slot_ids), generator=g) < 0.3) * 12.0
        before = scores.clone()
        got = proc(ids, scores)
        want, rec = oracle(ids, scores)
        assert torch.equal(scores, before), "the input was changed in place"
        assert torch.equal(got, want), (policy, t, (got != want).nonzero()[:4].tolist())
        if proc.policy.rules:
            assert proc.fired[-1].tolist() == rec["fired"], (policy, t)
            assert proc.stop.tolist() == rec["stop"], (policy, t)
        expected.append(rec)
        ids = torch.cat([ids, pool_t[torch.randint(len(pool), (batch, 1), generator=g)]], 1)
    r = proc.records()
    for t, rec in enumerate(expected):
        assert torch.allclose(r["temptation"][:, t], torch.tensor(rec["temptation"]), atol=1e-6)
        assert r["action"][:, t].tolist() == rec["action"], (policy, t)
        assert r["forced"][:, t].tolist() == rec["forced"], (policy, t)
        if schema.render == "prefix":  # span schemas never ask for a tag mid-text (and have no verdict)
            assert r["group"][:, t].tolist() == rec["group"], (policy, t)
            assert [int(g) for g in proc.groups[t]] == rec["group"], (policy, t)
    return proc, oracle


def _schemas():
    pep8 = load_schema("pep8")
    multi = load_schema("multi")
    span = schema_from_dict({"name": "sp", "render": "span", "segmenter": "sentences",
                             "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
    para = schema_from_dict({"name": "pa", "render": "prefix", "segmenter": "paragraphs",
                             "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
    return {"pep8": pep8, "multi": multi, "span": span, "paragraphs": para}


@pytest.fixture(scope="module")
def schemas():
    from pretag.tokens import train_tokenizer

    return {k: (s, train_tokenizer(CORPUS, s, vocab_size=300, min_frequency=1)) for k, s in _schemas().items()}


PATHS = {  # name -> (batch, repetition penalty, callback); the assertion after the run checks the path taken
    "compiled": (3, 1.0, None),
    "compiled, 9 rows": (9, 1.0, None),          # the temptation's exp-sum kernel (8+ rows on the CPU)
    "compiled, penalty": (3, 1.3, None),
    "one row": (1, 1.0, None),
    "general": (3, 1.0, lambda info: None),      # a callback that does nothing forces the per-step path
    "general, penalty": (2, 0.8, lambda info: None),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["pep8", "multi", "span", "paragraphs"])
def test_every_path_equals_the_oracle(schemas, name, path):
    schema, tok = schemas[name]
    batch, penalty, callback = PATHS[path]
    rng = random.Random(f"{name}/{path}")
    fired = {"temptation": 0, "verdict": 0}
    for i in range(6):
        policy = random_policy(schema, rng) if i else None  # the default policy first
        if i == 1 and schema.render == "prefix":  # and one that reads the verdict of a tag at every chance
            policy.rules.append(Rule("flag", watch=rng.choice(schema.tag_names), above=0.05, reading="verdict"))
        proc, oracle = drive(tok, schema, policy, batch=batch, seed=rng.randrange(2 ** 31), penalty=penalty,
                             callback=callback, steps=40 if i == 1 else 14)
        fired = {k: v + oracle.fires[k] for k, v in fired.items()}
        assert proc._general == (callback is not None)
        assert proc._host == (path == "one row")
    assert fired["temptation"], "no random rule fired: the comparison proved little about rules"
    if schema.render == "prefix":
        assert fired["verdict"], "no verdict rule fired: the comparison proved little about them"


def test_the_oracle_can_fail(schemas):
    """A wrong oracle (bias on tags ignored) must disagree with the processor: the comparison has teeth."""
    schema, tok = schemas["pep8"]

    class Wrong(Oracle):
        def row(self, ids, scores, st, step):
            out, rec = super().row(ids, scores, st, step)
            out[self.slots[0][0]] = scores[self.slots[0][0]] if math.isfinite(out[self.slots[0][0]]) else NEG
            return out, rec

    drive(tok, schema, "force_at:none,bias:good=+2", batch=2, seed=0)
    with pytest.raises(AssertionError):
        drive(tok, schema, "force_at:none,bias:good=+2", batch=2, seed=0, oracle_cls=Wrong)
