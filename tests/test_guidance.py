"""Tag guidance (pretag.guidance): the processor's arithmetic against a from-scratch forward, its effect on a model
that leaks a bad word without its tag, and the policy surface (YAML, compact form, refusals)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.control import TagPolicy, load_policy, parse_policy  # noqa: E402
from pretag.generate import GenerateConfig, generate  # noqa: E402
from pretag.guidance import TagGuidance  # noqa: E402
from pretag.policy import PolicyError  # noqa: E402
from pretag.schema import load_schema  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"]
LEAK = "darn"


@pytest.fixture(scope="module")
def leaky():
    """A 1-layer GPT-2 (width 32) on word salad in which ``darn`` follows ``<|bad|>`` 70 % of the time and stands
    alone the other 30 %: a model that learned the tag but still writes the bad word without it, like a pretrained
    model whose prior the tag has not overcome."""
    from test_generate import fit_micro_gpt2

    from pretag.tokens import encode_text, train_tokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    schema = load_schema("toxicity")
    tok = train_tokenizer([" ".join(WORDS + [LEAK])] * 4, schema, vocab_size=300, min_frequency=1)
    bad, eos = tok.convert_tokens_to_ids("<|bad|>"), tok.eos_token_id
    enc = {w: encode_text(tok, " " + w) for w in WORDS + [LEAK]}
    assert len(enc[LEAK]) == 1

    def doc():
        ids = [eos]
        for _ in range(12):
            if rng.random() < 0.2:
                ids += ([bad] if rng.random() < 0.7 else []) + enc[LEAK]
            else:
                ids += enc[rng.choice(WORDS)]
        return ids + [eos]

    model, _ = fit_micro_gpt2([doc() for _ in range(512)], len(tok), eos)
    return model, tok, schema, enc[LEAK][0]


def test_penalty_matches_a_from_scratch_forward_with_left_padding(leaky):
    """Cached and incremental (one KV cache, the tag cropped off each step) = a fresh forward of prefix + tag."""
    model, tok, schema, _ = leaky
    bad, eos = tok.convert_tokens_to_ids("<|bad|>"), tok.eos_token_id
    ids = torch.tensor([[eos, eos, 5, 6, 7], [eos, 8, 9, 5, 6]])  # row 0 is left-padded by one
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    w = 2.5
    proc = TagGuidance(model, {bad: w}, mask)

    def last_logits(seq, m):
        pos = (m.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].float()

    seq, m = ids, mask
    for step in range(3):
        scores = last_logits(seq, m)
        scores[:, bad] = float("-inf")  # as TagProcessor leaves it: the tag banned
        with torch.no_grad():
            got = proc(seq, scores.clone())
        after = torch.log_softmax(last_logits(torch.cat([seq, torch.full((2, 1), bad)], 1),
                                              torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)), -1)
        logp = torch.log_softmax(scores, -1)
        want = scores - w * (after - logp).clamp(min=0).nan_to_num(posinf=0.0)
        assert torch.allclose(got[:, :bad], want[:, :bad], atol=1e-4), step
        assert torch.isinf(got[:, bad]).all()  # a banned tag stays banned
        seq = torch.cat([seq, torch.tensor([[3 + step], [4 + step]])], 1)
        m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)


def test_guidance_removes_the_word_the_ban_leaves(leaky):
    model, tok, schema, leak = leaky
    cfg = GenerateConfig(n=48, max_new_tokens=24, seed=0)

    def leaked(policy):
        res = generate(model, tok, schema, [""], policy, cfg)
        assert all("<|bad|>" in t.temptation for s in res.sequences for t in s.tokens)  # still measured
        return sum(t.id == leak for s in res.sequences for t in s.tokens), res

    banned, _ = leaked("force_at:none,ban:bad")
    guided, res = leaked("force_at:none,ban:bad,guide:bad=3")
    assert banned >= 20, banned  # the ban alone leaves the word ~30 % of its natural rate
    assert guided * 5 < banned, (guided, banned)
    assert res.policy["guide"] == {"bad": 3.0}
    with pytest.raises(ValueError, match="beam search"):
        generate(model, tok, schema, [""], "force_at:none,ban:bad,guide:bad=3",
                 GenerateConfig(n=2, num_beams=2, max_new_tokens=4))
    from pretag.search import tree_search

    with pytest.raises(PolicyError, match="tree search"):
        tree_search(model, tok, schema, "", "ban:bad,guide:bad", GenerateConfig(n=2, max_new_tokens=4))


def test_guide_in_yaml_and_compact_form_validated():
    schema = load_schema("toxicity")
    p = load_policy({"ban": ["bad"], "guide": {"bad": 2}}, schema)
    assert p.guide == {"bad": 2} and p.to_dict()["guide"] == {"bad": 2}
    assert load_policy(p.to_dict(), schema).guide == {"bad": 2}
    assert parse_policy("ban:bad,guide:bad").guide == {"bad": 1.0}
    assert parse_policy("guide:bad=0.5").guide == {"bad": 0.5}
    with pytest.raises(PolicyError, match="guide:TAG=WEIGHT"):
        parse_policy("guide:bad=lots")
    for guide, msg in (({"worse": 1}, "unknown tag 'worse'"), ({"bad": 0}, r"\(0, 10\]"),
                       ({"bad": True}, r"\(0, 10\]"), ({"bad": 11}, r"\(0, 10\]")):
        with pytest.raises(PolicyError, match=msg):
            TagPolicy(ban=["bad"], guide=guide).validate(schema)
    with pytest.raises(PolicyError, match="must map tag names"):
        load_policy({"guide": ["bad"]}, schema)
    switch = {"ban": ["bad"], "guide": {"bad": 2},
              "rules": [{"action": "switch", "watch": "bad", "above": 0.5, "policy": {"ban": ["bad"]}}]}
    with pytest.raises(PolicyError, match="may not change guide"):
        load_policy(switch, schema)


@pytest.mark.parametrize("policy", ["force_at:none,ban:bad", "force_at:none,ban:bad,guide:bad=3"])
def test_sampler_logprobs_score_text_as_the_guided_sampler_draws_it(leaky, policy):
    """``sampler_logprobs`` (teacher-forced, one row at a time) = the log-probability HF ``generate`` itself gave
    each token it drew under the same processors (its processed scores), for the ban alone and with guidance; and
    guidance makes the leaked word less likely to the sampler than the ban alone does."""
    from pretag.control import TagProcessor
    from pretag.evaluate import sampler_logprobs
    from pretag.generate import prompt_ids
    from pretag.guidance import guidance_for

    model, tok, schema, leak = leaky
    pol = load_policy(policy, schema)
    ids = prompt_ids(tok, schema, pol, "")
    n = 6
    start = torch.tensor([ids] * n)
    mask = torch.ones_like(start)
    procs = [TagProcessor(tok, schema, pol)]
    guide = guidance_for(model, tok, schema, pol, mask)
    procs += [guide] if guide is not None else []
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(start, attention_mask=mask, logits_processor=procs, do_sample=True, top_k=0,
                             max_new_tokens=10, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
    want, texts = [], []
    for r in range(n):
        gen = out.sequences[r, len(ids):].tolist()
        steps = gen.index(tok.eos_token_id) if tok.eos_token_id in gen else len(gen)
        want.append(sum(float(torch.log_softmax(out.scores[t][r].float(), -1)[gen[t]]) for t in range(steps)))
        texts.append(tok.decode(gen[:steps]))
    assert any(texts)
    got = sampler_logprobs(model, tok, schema, texts, pol)
    assert got == pytest.approx(want, abs=1e-3)
    darn = " darn darn"
    q_ban, q_guide = (sampler_logprobs(model, tok, schema, [darn], p)[0]
                      for p in ("force_at:none,ban:bad", "force_at:none,ban:bad,guide:bad=3"))
    assert q_guide < q_ban - 1.0, (q_guide, q_ban)
