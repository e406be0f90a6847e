"""TagProcessor and policies: uniform-logit tests with exact values (the HF logits-processor test style)."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.control import (  # noqa: E402
    AlarmStop,
    PolicyError,
    Rule,
    TagPolicy,
    TagProcessor,
    load_policy,
    parse_policy,
    shipped_policies,
)
from pretag.schema import load_schema, schema_from_dict  # noqa: E402

CORPUS = ["x = 1\n", "def f(a, b):\n    return a + b\n", "Hello there. How are you? Fine!\n"] * 10


def tiny_tokenizer(schema):
    from pretag.tokens import train_tokenizer

    return train_tokenizer(CORPUS, schema, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def pep8():
    s = load_schema("pep8")
    return s, tiny_tokenizer(s)


@pytest.fixture(scope="module")
def multi():
    s = load_schema("multi")
    return s, tiny_tokenizer(s)


def ids_of(tok, text, start=True):
    from pretag.tokens import encode_text

    return torch.tensor([([tok.eos_token_id] if start else []) + encode_text(tok, text)])


def uniform(tok, batch=1):
    return torch.zeros(batch, len(tok))


def tag_id(tok, schema, tag):
    return tok.convert_tokens_to_ids(schema.open_token(tag))


def test_ban_free_mode_exact(pep8):
    s, tok = pep8
    p = TagProcessor(tok, s, "force_at:none,ban:bad")
    ids, scores = ids_of(tok, "x = 1"), uniform(tok)
    before = scores.clone()
    out = p(ids, scores)
    assert torch.equal(scores, before), "input modified in place"
    assert out is not scores
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    assert out[0, bad] == float("-inf")
    others = torch.ones(len(tok), dtype=torch.bool)
    others[bad] = False
    assert torch.equal(out[0, others], scores[0, others])  # everything else untouched, tags included
    assert out[0, good] == 0.0
    # temptation = softmax probability before the ban: 1/V under uniform logits
    assert p.temptations[0][0].tolist() == pytest.approx([1 / len(tok)] * 2)


def test_temptation_is_pre_ban_softmax(pep8):
    s, tok = pep8
    p = TagProcessor(tok, s, "force_at:none,ban:bad")
    scores = torch.randn(3, len(tok))
    scores[1, tag_id(tok, s, "bad")] = 8.0
    p(torch.cat([ids_of(tok, "x = 1")] * 3), scores)
    want = torch.softmax(scores, -1)[:, p.slot_ids]
    assert torch.allclose(p.temptations[0], want)
    assert p.temptations[0][1, 1] > 0.5  # the tempted row


def test_bias_and_force(pep8):
    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    p = TagProcessor(tok, s, "force_at:none,bias:good=+2,bias:bad=-1.5")
    out = p(ids_of(tok, "x"), uniform(tok))
    assert out[0, good] == 2.0 and out[0, bad] == -1.5
    assert p.actions[0][0].tolist() == [1, 1]  # both biased
    # force:good at a segment start (after a newline): only <|good|> is finite
    p = TagProcessor(tok, s, "force:good")
    out = p(ids_of(tok, "x = 1\n"), uniform(tok))
    finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert finite == [good]
    assert p.forced[0].tolist() == [True]
    # mid-line, the default segment mode bans every tag and leaves text alone
    out = p(ids_of(tok, "x = 1\nx"), uniform(tok))
    assert out[0, good] == out[0, bad] == float("-inf")
    assert torch.isfinite(out[0]).sum() == len(tok) - 2


def test_segment_start_heuristics(multi, pep8):
    s, tok = multi  # sentences, one document-level attribute (offensive) then four segment attributes
    p = TagProcessor(tok, s, "ban:profane,force:safe")
    eos = tok.eos_token_id
    order = ["offensive", "profanity", "pii", "sentiment", "grade"]

    def allowed(ids):
        out = p(torch.tensor([ids]), uniform(tok))
        return {t for t in s.tag_names if torch.isfinite(out[0, tag_id(tok, s, t)])}, bool(p.forced[-1][0])

    got, forced = allowed([eos])  # document start: the document-level tag comes first
    assert forced and got == {"safe"}
    prefix = [eos, tag_id(tok, s, "safe")]
    got, forced = allowed(prefix)
    assert forced and got == {"clean"}  # profane banned
    prefix.append(tag_id(tok, s, "clean"))
    got, _ = allowed(prefix)
    assert got == {"nopii", "pii"}
    from pretag.tokens import encode_text

    mid = encode_text(tok, "Hello there")
    got, forced = allowed(prefix + mid)
    assert not forced and got == set()
    end = encode_text(tok, "Hello there. ")
    got, forced = allowed(prefix + end)
    assert forced and got == {"clean"}, tok.convert_ids_to_tokens(end)
    got, forced = allowed(prefix + encode_text(tok, "Hello there.") + encode_text(tok, " "))  # "." then " "
    assert forced
    assert order[0] == s.attributes[0].name
    # lines: only a newline ends a segment
    s2, tok2 = pep8
    p2 = TagProcessor(tok2, s2, None)
    p2(ids_of(tok2, "x = 1. "), uniform(tok2))
    p2(ids_of(tok2, "x = 1\n"), uniform(tok2))
    assert [f.item() for f in p2.forced] == [False, True]


def test_ban_only_and_start_modes(pep8):
    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    p = TagProcessor(tok, s, "ban:bad,force_at:none")
    out = p(ids_of(tok, "x = 1\n"), uniform(tok))
    assert not p.forced[0].item() and out[0, good] == 0.0 and out[0, bad] == float("-inf")
    p = TagProcessor(tok, s, "force:good,force_at:start")
    p(torch.tensor([[tok.eos_token_id]]), uniform(tok))
    assert p.forced[0].item()
    out = p(torch.tensor([[tok.eos_token_id, good] + ids_of(tok, "x\n", start=False)[0].tolist()]), uniform(tok))
    assert not p.forced[1].item() and out[0, good] == 0.0 and out[0, bad] == float("-inf")


def test_span_schema_bans_every_tag_inside_the_span():
    s = schema_from_dict({"name": "sp", "render": "span", "segmenter": "sentences",
                          "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
    tok = tiny_tokenizer(s)
    p = TagProcessor(tok, s, None)
    out = p(torch.tensor([[tok.eos_token_id, tok.convert_tokens_to_ids("<good>")]]), uniform(tok))
    for t in s.tag_tokens:
        assert out[0, tok.convert_tokens_to_ids(t)] == float("-inf"), t
    assert len(p.temptations[0][0]) == 4  # <good> </good> <bad> </bad> all measured


def test_rule_ban_after_n_fires_at_the_right_step(pep8):
    s, tok = pep8
    bad = tag_id(tok, s, "bad")
    p = TagProcessor(tok, s, "force_at:none,ban:bad@3")
    ids = ids_of(tok, "x")
    for step in range(5):
        out = p(ids, uniform(tok))
        assert (out[0, bad] == float("-inf")) == (step >= 3), step
        ids = torch.cat([ids, ids[:, -1:]], 1)
    fired = torch.stack(p.fired, 1)[0, :, 0].tolist()
    assert fired == [False, False, False, True, False]  # fires once, then stays latched


def test_alarm_consecutive_stop_and_stopping_criteria(pep8):
    s, tok = pep8
    bad = tag_id(tok, s, "bad")
    p = TagProcessor(tok, s, "force_at:none,ban:bad,alarm:bad>0.5x2=stop")
    stop = AlarmStop(p)
    ids = torch.cat([ids_of(tok, "x")] * 2)
    tempted = torch.zeros(2, len(tok))
    tempted[0, bad] = 20.0  # row 0 wants <|bad|> every step; row 1 never
    seq = [tempted, uniform(tok, 2), tempted, tempted, tempted]
    stops = []
    for scores in seq:
        p(ids, scores)
        ids = torch.cat([ids, ids[:, -1:]], 1)
        stops.append(stop(ids, None).tolist())
    assert stops == [[False, False], [False, False], [False, False], [True, False], [True, False]]
    assert torch.stack(p.fired, 1)[0, :, 0].tolist() == [False, False, False, True, False]


def test_verdict_rule_reads_the_choice_among_tags_only_where_a_tag_is_asked_for(pep8):
    """A verdict rule compares P(bad) / P(good or bad) with its threshold, and only at a segment start: where the
    model barely wants any tag (temptation 0.001) but would pick ``bad`` if one came (verdict 0.9), it fires and the
    temptation rule with the same threshold does not; mid-line, the same logits leave its run untouched."""
    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    policy = "ban:bad,verdict:bad>0.5x2=flag,alarm:bad>0.5=flag"
    scores = torch.zeros(1, len(tok))
    p_bad = 1e-3                                       # P(bad) = 0.001, P(good) = P(bad) / 9: the verdict is 0.9
    scores[0, bad] = math.log(p_bad * (len(tok) - 2) / (1 - p_bad * 10 / 9))
    scores[0, good] = scores[0, bad] - math.log(9)
    ids = ids_of(tok, "x = 1\n")
    nl, x = ids[:, -1:], ids_of(tok, "x", start=False)
    steps = [ids, torch.cat([ids, x], 1), torch.cat([ids, x, nl], 1), torch.cat([ids, x, nl, x], 1)]
    for general in (False, True):
        p = TagProcessor(tok, s, policy, callback=(lambda info: None) if general else None)
        fired = []
        for ids in steps:                              # asked, not asked, asked: two readings in a row
            p(ids, scores)
            fired.append(p.fired[-1][0].tolist())
        assert p.temptations[0][0, 1].item() == pytest.approx(p_bad, rel=1e-3)
        assert fired == [[False, False], [False, False], [True, False], [False, False]], general
        assert [int(g[0]) for g in p.groups] == [0, -1, 0, -1]
        row = p.temptations[0][0].tolist()
        assert p.verdicts(row, 0) == pytest.approx({"<|good|>": 0.1, "<|bad|>": 0.9}, rel=1e-3)
        assert p.verdicts(row, -1) == {}


def test_verdict_rules_parse_validate_and_round_trip(pep8):
    s, _ = pep8
    r = load_policy("ban:bad,verdict:bad>0.5x2@3=stop", s).rules[0]
    assert (r.reading, r.watch, r.above, r.consecutive, r.after, r.action) == ("verdict", "bad", 0.5, 2, 3, "stop")
    assert r.label == "verdict(bad)>0.5x2 @3=stop"
    assert load_policy("alarm:bad>0.5", s).rules[0].reading == "temptation"
    p = load_policy({"ban": ["bad"], "rules": [{"action": "flag", "watch": "bad", "above": 0.4, "reading": "verdict"}]},
                    s)
    assert p.rules[0].reading == "verdict" and load_policy(p.to_dict(), s).rules == p.rules
    assert "reading" not in load_policy("alarm:bad>0.5", s).to_dict()["rules"][0]
    with pytest.raises(PolicyError, match="reading 'odds' is not one of"):
        load_policy({"rules": [{"action": "flag", "watch": "bad", "above": 0.4, "reading": "odds"}]}, s)
    with pytest.raises(PolicyError, match="reading 'verdict' needs 'watch'"):
        load_policy({"rules": [{"action": "flag", "after": 2, "reading": "verdict"}]}, s)
    span = schema_from_dict({"name": "sp", "render": "span", "segmenter": "sentences",
                             "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
    with pytest.raises(PolicyError, match="reading 'verdict' needs a prefix schema"):
        load_policy("verdict:bad>0.5", span)


def test_switch_policy_and_callback(pep8):
    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    pol = TagPolicy(force_at="none", rules=[Rule("switch", watch="bad", above=0.5,
                                                 policy=TagPolicy(ban=["bad"], force_at="none"))])
    p = TagProcessor(tok, s, pol)
    tempted = torch.zeros(1, len(tok))
    tempted[0, bad] = 20.0
    assert p(ids_of(tok, "x"), uniform(tok))[0, bad] == 0.0
    assert p(ids_of(tok, "x"), tempted)[0, bad] == float("-inf")  # switched at the tempted step
    assert p(ids_of(tok, "x"), uniform(tok))[0, bad] == float("-inf")  # and stays switched

    seen = []

    def cb(info):
        seen.append(info.step)
        if info.temptation[0, 1] > 0.5:
            info.bias("good", 3.0)
            info.flag("tempted")
    p = TagProcessor(tok, s, "force_at:none", callback=cb)
    out = p(ids_of(tok, "x"), tempted)
    assert out[0, good] == 3.0 and seen == [0] and p.callback_alarms == [(0, 0, "tempted")]


def test_callback_ban_and_stop_act_on_the_chosen_rows(pep8):
    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")

    def cb(info):
        info.ban("good", rows=[0])  # this step only
        if info.step == 1:
            info.stop(rows=[1])  # for good

    p = TagProcessor(tok, s, "force_at:none", callback=cb)
    stop = AlarmStop(p)
    ids = torch.cat([ids_of(tok, "x")] * 2)
    out = p(ids, uniform(tok, 2))
    assert out[0, good] == float("-inf") and out[1, good] == 0.0 and out[0, bad] == out[1, bad] == 0.0
    assert p.actions[0][:, p.slot_of_tag("good")].tolist() == [2, 0]  # BANNED, UNTOUCHED
    ids = torch.cat([ids, ids[:, -1:]], 1)
    assert stop(ids, None).tolist() == [False, False]
    p(ids, uniform(tok, 2))
    ids = torch.cat([ids, ids[:, -1:]], 1)
    assert stop(ids, None).tolist() == [False, True]
    p(ids, uniform(tok, 2))
    assert stop(ids, None).tolist() == [False, True]  # a stop stays


@pytest.mark.parametrize("callback", [None, lambda info: None])  # the compiled path and the general path
def test_repetition_penalty_is_hfs_on_text_and_spares_tags(pep8, callback):
    from transformers import RepetitionPenaltyLogitsProcessor

    s, tok = pep8
    bad, good = tag_id(tok, s, "bad"), tag_id(tok, s, "good")
    ids = torch.cat([ids_of(tok, "x = 1"), ids_of(tok, "x = 1").flip(1)])
    ids[:, 1] = torch.tensor([good, bad])  # tags already in the prefix: HF would penalise them
    scores = torch.randn(2, len(tok), generator=torch.Generator().manual_seed(0)) * 3
    scores[:, [good, bad]] = torch.tensor([[2.0, -1.0], [-2.0, 1.5]])
    p = TagProcessor(tok, s, "force_at:none", repetition_penalty=1.7, callback=callback)
    out = p(ids, scores)
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, scores.clone())
    text = torch.ones(len(tok), dtype=torch.bool)
    text[[good, bad]] = False
    assert torch.equal(out[:, text], want[:, text])
    assert not torch.equal(want[:, [good, bad]], scores[:, [good, bad]])  # HF did penalise the tags ...
    assert torch.equal(out[:, [good, bad]], scores[:, [good, bad]])  # ... the processor leaves them as the model said
    assert torch.equal(p.temptations[0], torch.softmax(scores, -1)[:, p.slot_ids])  # measured before the penalty


def test_beam_state_follows_parent_rows(pep8):
    s, tok = pep8
    bad = tag_id(tok, s, "bad")
    a, b = tok.convert_tokens_to_ids("x"), tok.convert_tokens_to_ids("=")
    tempted = torch.zeros(2, len(tok))
    tempted[1, bad] = 20.0  # only beam 1 is tempted: it switches to the banning policy

    def run(parents):
        p = TagProcessor(tok, s, "force_at:none,alarm:bad>0.5=switch:ban-bad-free", num_beams=2)
        ids = ids_of(tok, "x").repeat(2, 1)
        p(ids, uniform(tok, 2))
        ids = torch.cat([ids, torch.tensor([[a], [b]])], 1)  # two different beams
        out = p(ids, tempted)
        assert out[0, bad] == 0.0 and out[1, bad] == float("-inf")
        ids = torch.cat([ids[parents], torch.tensor([[a], [a]])], 1)  # HF re-orders the rows
        return p(ids, uniform(tok, 2))[:, bad].tolist()

    assert run([1, 1]) == [float("-inf")] * 2
    assert run([0, 0]) == [0.0, 0.0]
    assert run([1, 0]) == [float("-inf"), 0.0]


def test_processors_sharing_rules_do_not_interfere(pep8):
    """The server's operator floor hands the same Rule objects to every request's processor: a processor must keep
    its per-run state (here: which policy a switch rule selects) to itself, and rules cannot be changed at all."""
    import dataclasses

    s, tok = pep8
    bad = tag_id(tok, s, "bad")
    shared = Rule("switch", watch="bad", above=0.5, policy=TagPolicy(ban=["bad"], force_at="none"))
    other = Rule("switch", watch="good", above=0.99, policy=TagPolicy(force_at="none", bias={"good": 1.0}))
    a = TagProcessor(tok, s, TagPolicy(force_at="none", rules=[shared]))
    b = TagProcessor(tok, s, TagPolicy(force_at="none", rules=[other, shared]))  # `shared` at another index
    tempted = torch.zeros(1, len(tok))
    tempted[0, bad] = 20.0
    for p in (a, b, a, b):  # interleaved, as overlapping requests would run
        p(ids_of(tok, "x"), uniform(tok))
    assert a(ids_of(tok, "x"), tempted)[0, bad] == float("-inf")  # a switched to its own target: bad banned
    assert b(ids_of(tok, "x"), tempted)[0, bad] == float("-inf")
    assert a.records()["fired"][0, -1].tolist() == [True] and b.records()["fired"][0, -1].tolist() == [False, True]
    assert shared.__dict__.keys() == {f.name for f in dataclasses.fields(Rule)}  # nothing written onto the rule
    with pytest.raises(dataclasses.FrozenInstanceError):
        shared.watch = "good"  # type: ignore[misc]
    assert Rule("ban", after=3, tags=["bad"]).tags == ("bad",)


def test_non_finite_bias_is_rejected(pep8):
    s, _ = pep8
    for spec in ("bias:bad=inf", "bias:bad=-inf", "bias:bad=nan"):
        with pytest.raises(PolicyError, match="finite"):
            load_policy(spec, s)
    with pytest.raises(PolicyError, match="finite"):
        load_policy({"bias": {"bad": float("inf")}}, s)
    assert load_policy("bias:bad=-1e3", s).bias == {"bad": -1000.0}


def test_policy_parsing_and_validation(multi):
    s, _ = multi
    p = load_policy("ban:profane,bias:grade:6-10=+2,force:safe", s)
    assert p.ban == ["profane"] and p.bias == {"grade:6-10": 2.0} and p.force == ["safe"]
    with pytest.raises(PolicyError) as e:
        load_policy("ban:nasty,bias:grade:6-10=x,force:safe,force:offensive,frob:1", s)
    msg = str(e.value)
    assert "frob" in msg and "bias:grade:6-10=x" in msg  # parse problems reported together
    with pytest.raises(PolicyError) as e:
        load_policy("ban:nasty,force:safe,force:offensive,alarm:zzz>0.3", s)
    msg = str(e.value)
    for needle in ("'nasty'", "at most one tag can be forced", "'zzz'", "has tags: safe"):
        assert needle in msg, needle
    with pytest.raises(PolicyError, match="every value is banned"):
        load_policy("ban:clean,ban:profane", s)
    r = parse_policy("alarm:bad>0.25x3@10=stop").rules[0]
    assert (r.watch, r.above, r.consecutive, r.after, r.action) == ("bad", 0.25, 3, 10, "stop")


def test_prompt_tags_parse_validate_and_round_trip(pep8):
    s, _ = pep8
    p = load_policy("ban:bad,prompt_tags:none", s)
    assert p.prompt_tags == "none" and p.resolved_prompt_tags(s) == "none" and p.resolved_force_at(s) == "segment"
    assert load_policy(p.to_dict(), s).prompt_tags == "none"
    # unset: as force_at implies
    assert [load_policy(f"force_at:{fa}", s).resolved_prompt_tags(s) for fa in ("segment", "start", "none")] == \
        ["every", "first", "none"]
    with pytest.raises(PolicyError, match="prompt_tags 'some' is not one of"):
        load_policy("prompt_tags:some", s)
    with pytest.raises(PolicyError, match="prompt_tags 'every' needs force_at 'segment'"):
        load_policy("force_at:start,prompt_tags:every", s)
    with pytest.raises(PolicyError, match="prompt_tags 'first' needs force_at"):
        load_policy({"force_at": "none", "prompt_tags": "first"}, s)


def test_shipped_policies_validate():
    names = shipped_policies()
    assert names, "no shipped policies"
    for n in names:
        import yaml

        from pretag.control import POLICY_DIR

        schema = load_schema(yaml.safe_load((POLICY_DIR / f"{n}.yaml").read_text()).get("schema", "pep8"))
        load_policy(n, schema)


# ---- the compiled path (state tables) must equal the general path (policy evaluated per step) -----------------
def _random_run(tok, schema, policy, *, general: bool, seed: int, batch: int = 3, steps: int = 12):
    """Feed one processor random prefixes built from line/sentence ends, tags, EOS and text, with random scores
    whose tag columns are sometimes boosted (so alarms fire); return its outputs and records."""
    g = torch.Generator().manual_seed(seed)
    from pretag.tokens import encode_text

    pool = [tok.eos_token_id] + [tok.convert_tokens_to_ids(t) for t in schema.tag_tokens]
    for piece in ("x = 1", "\n", "\n\n", "Hello there.", " ", ". ", "! ", "a", "How"):
        pool += encode_text(tok, piece)
    pool_t = torch.tensor(pool)
    p = TagProcessor(tok, schema, policy)
    p._general = general
    ids = pool_t[torch.randint(len(pool), (batch, 3), generator=g)]
    ids[:, 0] = tok.eos_token_id
    outs = []
    for _ in range(steps):
        scores = torch.randn(batch, len(tok), generator=g) * 3
        boost = torch.rand(batch, len(p.slot_ids), generator=g) < 0.3
        scores[:, p.slot_ids] += boost * 12.0
        before = scores.clone()
        outs.append(p(ids, scores))
        assert torch.equal(scores, before)
        ids = torch.cat([ids, pool_t[torch.randint(len(pool), (batch, 1), generator=g)]], 1)
    return p, outs


def _same_run(tok, schema, policy, seed):
    for batch in (3, 1):  # 3: the compiled tensor path; 1: its scalar twin (one row on the CPU)
        rec = _same_run_batch(tok, schema, policy, seed, batch)
    return rec


def _same_run_batch(tok, schema, policy, seed, batch):
    fast, out_f = _random_run(tok, schema, policy, general=False, seed=seed, batch=batch)
    slow, out_s = _random_run(tok, schema, policy, general=True, seed=seed, batch=batch)
    assert not fast._general, "the compiled path was not used"
    assert fast._host == (batch == 1), "the scalar path runs exactly when there is one row"
    for t, (a, b) in enumerate(zip(out_f, out_s)):
        assert torch.equal(a, b), (policy, t)
    rf, rs = fast.records(), slow.records()
    assert torch.allclose(rf["temptation"], rs["temptation"], atol=1e-6)
    for k in ("action", "forced", "fired"):
        assert (rf[k] is None and rs[k] is None) or torch.equal(rf[k], rs[k]), (policy, k)
    assert [a.tolist() for a in fast.actions] == [a.tolist() for a in slow.actions]
    assert [f.tolist() for f in fast.forced] == [f.tolist() for f in slow.forced]
    if fast.stop is not None:
        assert torch.equal(fast.stop, slow.stop)
    return rf


@pytest.mark.parametrize("policy", [
    None, "force:good", "force_at:none,ban:bad", "force:good,force_at:start", "force_at:none,bias:good=+2,ban:bad@3",
    "force_at:none,alarm:bad>0.3x2=stop,alarm:good>0.5", "force_at:start,alarm:bad>0.2@2=switch:good",
    "ban:bad@2,alarm:bad>0.4=stop,alarm:good>0.6=switch:ban-bad-free",
    TagPolicy(force_at="none", rules=[Rule("switch", watch="bad", above=0.3, policy=TagPolicy(force=["good"])),
                                      Rule("ban", after=4, tags=["good", "bad"])]),
])
def test_compiled_path_equals_general_path_lines(pep8, policy):
    s, tok = pep8
    fired_any = False
    for seed in range(3):
        rec = _same_run(tok, s, policy, seed)
        fired_any |= rec["fired"] is not None and bool(rec["fired"].any())
    if policy is not None and not isinstance(policy, str) or (isinstance(policy, str) and "alarm" in policy):
        assert fired_any, "the random runs never fired a rule: the comparison proved little"


@pytest.mark.parametrize("policy", [
    None, "ban:profane,force:safe", "force_at:start,bias:grade:6-10=+2,alarm:pii>0.2=stop,ban:neg@2",
    TagPolicy(ban=["pii"], force_at="none", rules=[
        Rule("switch", watch="profane", above=0.1, consecutive=2, policy=TagPolicy(force=["safe", "clean", "ok"])),
        Rule("stop", watch="neg", above=0.3)]),
])
def test_compiled_path_equals_general_path_sentences(multi, policy):
    s, tok = multi
    for seed in range(3):
        _same_run(tok, s, policy, seed)


@pytest.mark.parametrize("spec", [("span", "sentences", None), ("span", "sentences", "force_at:none,ban:bad@2"),
                                  ("prefix", "paragraphs", None), ("prefix", "paragraphs", "force_at:start")])
def test_compiled_path_equals_general_path_span_and_paragraphs(spec):
    render, seg, policy = spec
    s = schema_from_dict({"name": "sp", "render": render, "segmenter": seg,
                          "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
    tok = tiny_tokenizer(s)
    for seed in range(2):
        _same_run(tok, s, policy, seed)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: logits past exp's safe range take the shifted form
def test_temptation_equals_softmax_in_every_kernel(pep8, batch, scale):
    s, tok = pep8
    p = TagProcessor(tok, s, "force_at:none")
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, len(tok), generator=g) * scale
    scores[0, p.slot_ids[0]] = 3.0 * scale
    p(torch.cat([ids_of(tok, "x")] * batch), scores)
    exact = torch.softmax(scores.double(), -1)[:, p.slot_ids].float()  # the float64 truth
    # float32 keeps ~7 digits of a logit: at |logit| ~ 300 a probability is good to a few |logit| * 2^-24 relative
    assert torch.allclose(p.temptations[0], exact, rtol=1e-6 + scale * 5e-7, atol=1e-7)
