"""Metrics against hand-computed values on tiny cases; model-based metrics on tiny models built in the test."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pretag import evaluate as ev


# ---- statistics -------------------------------------------------------------------------------------------
def test_bootstrap_of_a_constant_is_a_point():
    e = ev.bootstrap_ci([0.25] * 17)
    assert (e.value, e.lo, e.hi, e.n) == (0.25, 0.25, 0.25, 17)


def test_bootstrap_interval_contains_mean_and_is_deterministic():
    x = [0, 1] * 20
    a, b = ev.bootstrap_ci(x, seed=3), ev.bootstrap_ci(x, seed=3)
    assert a == b
    assert a.lo < 0.5 < a.hi and a.value == 0.5
    # the 95% interval of a mean of 40 fair coins is about ±1.96*0.5/sqrt(40) = ±0.155
    assert 0.08 < a.hi - 0.5 < 0.25


def test_bootstrap_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        ev.bootstrap_ci([])


def test_auroc_perfect_inverse_and_ties():
    assert ev.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert ev.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert ev.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # pairs (pos, neg): (0.5 vs 0.1)=1, (0.5 vs 0.5)=1/2, (0.9 vs 0.1)=1, (0.9 vs 0.5)=1 -> 3.5/4
    assert ev.auroc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    assert math.isnan(ev.auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert ev.auroc(s, y) == pytest.approx(np.mean(pairs))


def test_calibration_table():
    t = ev.calibration_table([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 1], n_bins=2)
    lo, hi = t["bins"]
    assert (lo["n"], lo["mean_prob"], lo["frac_positive"]) == (2, pytest.approx(0.1), 0.5)
    assert (hi["n"], hi["mean_prob"], hi["frac_positive"]) == (2, pytest.approx(0.975), 1.0)
    # ece = 1/2*|0.1-0.5| + 1/2*|0.975-1| = 0.2125
    assert t["ece"] == pytest.approx(0.2125)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.calibration_table([1.5], [1])


def test_distinct_n():
    texts = ["a b a b", "a b c"]
    # unigrams a b a b a b c: 3 unique / 7; bigrams ab ba ab ab bc: 3 unique / 5; trigrams aba bab abc: 3 / 3
    assert ev.distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert ev.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert ev.distinct_n(texts, 3) == 1.0
    assert ev.distinct_n([""], 2) == 0.0


def test_expected_max_exact_and_by_enumeration():
    # 2-subsets of {1,2,3}: maxima 2, 3, 3 -> 8/3
    assert ev.expected_max([3, 1, 2], k=2) == pytest.approx(8 / 3)
    assert ev.expected_max([3, 1, 2], k=1) == pytest.approx(2.0)
    assert ev.expected_max([3, 1, 2], k=3) == 3.0
    from itertools import combinations

    x = [0.3, 0.1, 0.9, 0.4, 0.4, 0.0]
    want = np.mean([max(c) for c in combinations(x, 4)])
    assert ev.expected_max(x, 4) == pytest.approx(want)
    with pytest.raises(ValueError, match="k must be"):
        ev.expected_max([1.0], k=2)


# ---- misalignment -----------------------------------------------------------------------------------------
def test_strip_tags_and_partial_segment():
    assert ev.strip_tags("<|bad|>x = 1\n<|good|>y", ["<|good|>", "<|bad|>"]) == "x = 1\ny"
    assert ev.scorable_segments(["a\n", "b\n", "c"], truncated=True) == [0, 1]
    assert ev.scorable_segments(["a\n", "b\n", "c"], truncated=False) == [0, 1, 2]
    assert ev.scorable_segments(["abc"], truncated=True) == [0]


def test_sample_score_is_character_weighted():
    # 2 violations/char over 1 char and 0 over 3 chars -> 2 violations in 4 chars = 0.5
    assert ev.sample_score(["a", "bcd"], [2.0, 0.0]) == 0.5
    assert ev.sample_score(["a", "bcd"], [None, 1.0]) == 1.0
    assert ev.sample_score(["a"], [None]) is None


def test_misalignment_summary_hand_computed():
    segs = [["aa", "bb"], ["cccc"], ["d", "e", "f", "g"]]
    scores = [[1.0, 0.0], [0.0], [0.0, 0.0, 0.0, 1.0]]
    m = ev.misalignment_summary(segs, scores, lambda s: s > 0, k=2, n_resamples=200)
    assert m["n_samples"] == 3 and m["n_segments"] == 7
    # per-sample per-char scores: 0.5, 0, 0.25 -> mean 0.25
    assert m["score"]["value"] == pytest.approx(0.25)
    assert m["frac_samples_any_bad"]["value"] == pytest.approx(2 / 3)
    assert m["frac_bad_segments"]["value"] == pytest.approx(2 / 7)
    # E[max of 2 of {0, .25, .5}] = (0.25 + 0.5 + 0.5) / 3
    assert m["expected_max"] == pytest.approx(1.25 / 3) and m["expected_max_k"] == 2
    neg = ev.misalignment_summary(segs, scores, lambda s: s > 0, higher_is_worse=False, n_resamples=10)
    assert neg["score"]["value"] == pytest.approx(-0.25)


# ---- model-based ------------------------------------------------------------------------------------------
def tiny_char_tokenizer(extra_special: list[str] | None = None):
    """A character-level fast tokenizer over a small alphabet; BOS/EOS/PAD specials; optional tag tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 =.<>|\n")
    vocab = {c: i for i, c in enumerate(["<s>", "</s>", "<pad>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces: decode(encode(s)) == s
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    if extra_special:
        t.add_special_tokens({"additional_special_tokens": extra_special})
    return t


def tiny_model(vocab_size: int, seed: int = 0, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def test_uniform_model_logprob_is_minus_n_log_v():
    tok = tiny_char_tokenizer()
    m = tiny_model(len(tok))
    with torch.no_grad():
        m.lm_head.weight.zero_()  # tied to the input embeddings: all logits 0 -> uniform
    lp = ev.sequence_logprobs(m, tok, ["abc", "x = 1", "a"])
    V = len(tok)
    assert lp == pytest.approx([-3 * math.log(V), -5 * math.log(V), -1 * math.log(V)], rel=1e-5)


def test_logprob_matches_manual_chain_rule_and_is_batch_invariant():
    tok = tiny_char_tokenizer()
    m = tiny_model(len(tok), seed=1)
    texts = ["hello world", "ab", "the cat sat."]
    ids = [tok.bos_token_id, *ev.encode_plain(tok, texts[0])]
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids])).logits[0], -1)
    manual = sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    one = ev.sequence_logprobs(m, tok, texts, batch_size=1)
    many = ev.sequence_logprobs(m, tok, texts, batch_size=3)  # padding must not change anything
    assert one[0] == pytest.approx(manual, abs=1e-4)
    assert many == pytest.approx(one, abs=1e-4)


def test_kl_of_a_model_against_itself_is_zero_and_positive_against_another():
    tok = tiny_char_tokenizer()
    ref, other = tiny_model(len(tok), seed=1), tiny_model(len(tok), seed=2)
    torch.manual_seed(0)
    start = torch.full((64, 1), tok.bos_token_id)
    with torch.no_grad():
        out = ref.generate(start, do_sample=True, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                           eos_token_id=None, top_k=0, suppress_tokens=list(range(4)))  # no specials
    samples = [tok.decode(o[1:]) for o in out]
    assert all(ev.encode_plain(tok, s) == o[1:].tolist() for s, o in zip(samples, out))  # exact round trip
    lp_ref = ev.sequence_logprobs(ref, tok, samples)
    kl_self = ev.kl_from_reference(lp_ref, ev.sequence_logprobs(ref, tok, samples))
    assert (kl_self.value, kl_self.lo, kl_self.hi) == (0.0, 0.0, 0.0)
    kl = ev.kl_from_reference(lp_ref, ev.sequence_logprobs(other, tok, samples))
    assert kl.value > 0


def test_lm_loss_excludes_tag_tokens():
    tok = tiny_char_tokenizer(["<|good|>", "<|bad|>"])
    m = tiny_model(len(tok))
    with torch.no_grad():
        m.lm_head.weight.zero_()
    good = tok.convert_tokens_to_ids("<|good|>")
    docs = [[([good], False), (ev.encode_plain(tok, "ab"), True), ([good], False), (ev.encode_plain(tok, "c"), True)]]
    out = ev.lm_loss(m, docs, start_id=tok.bos_token_id)
    assert out["n_tokens"] == 3
    assert out["loss"] == pytest.approx(math.log(len(tok)), rel=1e-5)
    # no oracle: the two tag tokens' log-probabilities are paid for too, still per text token
    joint = ev.lm_loss(m, docs, start_id=tok.bos_token_id, count_tags=True)
    assert joint["n_tokens"] == 3 and joint["loss"] == pytest.approx(5 / 3 * math.log(len(tok)), rel=1e-5)
    # a special-token string in user text is text, never the tag
    assert good not in ev.encode_plain(tok, "<|good|>")


def test_lm_loss_counts_the_text_tokens_token_logprobs_scores():
    """lm_loss counts the predicted text tokens from the chunks (one forward pass, tags counted or not): the same
    count token_logprobs reports, with or without a start token, across context windows."""
    tok = tiny_char_tokenizer(["<|good|>"])
    m = tiny_model(len(tok), n_positions=8)
    good = tok.convert_tokens_to_ids("<|good|>")
    docs = [[(ev.encode_plain(tok, "abcdefghij" * 2), True)],  # 20 tokens > context 8: windowed
            [([good], False), (ev.encode_plain(tok, "ab"), True), ([good], False), (ev.encode_plain(tok, "cde"), True)]]
    for start in (tok.bos_token_id, None):
        want = sum(n for _, n in ev.token_logprobs(m, docs, start_id=start))
        assert ev.lm_loss(m, docs, start_id=start)["n_tokens"] == want
        assert ev.lm_loss(m, docs, start_id=start, count_tags=True)["n_tokens"] == want


def test_token_logprobs_a_few_rows_at_a_time_is_the_log_softmax(monkeypatch):
    """Log-probs are taken a few rows at a time (a whole batch's float32 log-softmax ran a shared GPU out of
    memory): one row at a time gives the full log-softmax's numbers, padding and all."""
    tok = tiny_char_tokenizer()
    m = tiny_model(len(tok), n_positions=32)
    docs = [[(ev.encode_plain(tok, t), True)] for t in ("abcabc", "hello world", "z", "the cat sat on the mat")]
    whole = ev.token_logprobs(m, docs, start_id=tok.bos_token_id, batch_size=4)
    ids = [[tok.bos_token_id, *d[0][0]] for d in docs]
    with torch.no_grad():
        want = [float(torch.log_softmax(m(input_ids=torch.tensor([i])).logits[0, :-1], -1)
                      .gather(-1, torch.tensor(i[1:]).unsqueeze(-1)).sum()) for i in ids]
    assert [s for s, _ in whole] == pytest.approx(want, abs=1e-4)
    monkeypatch.setattr(ev, "LOGPROB_CHUNK", 1)  # one row at a time
    rowwise = ev.token_logprobs(m, docs, start_id=tok.bos_token_id, batch_size=4)
    assert [n for _, n in rowwise] == [n for _, n in whole] == [6, 11, 1, 22]
    assert [s for s, _ in rowwise] == pytest.approx([s for s, _ in whole], abs=1e-5)


def test_long_documents_are_windowed_to_the_context():
    tok = tiny_char_tokenizer()
    m = tiny_model(len(tok), n_positions=8)
    text = "abcdefghij" * 3  # 30 tokens > context 8
    [(s, n)] = ev.token_logprobs(m, [[(ev.encode_plain(tok, text), True)]], start_id=tok.bos_token_id)
    assert n == 30 and math.isfinite(s)


# ---- self-tagging, with an oracle model whose behaviour is known ------------------------------------------
def xschema():
    from pretag.schema import schema_from_dict

    return schema_from_dict({"name": "x", "segmenter": "lines",
                             "attributes": [{"name": "x", "scorer": {"type": "regex", "patterns": ["x"]}, "threshold": 0}]})


class Oracle(torch.nn.Module):
    """Predicts <|bad|> before a segment that starts with 'x' (it peeks ahead: a perfect tagger), and after a bad
    tag makes 'x' likely (+3), after a good tag unlikely (-3): so log p(seg | bad) > log p(seg | good) iff x."""

    def __init__(self, tok, strength: float = 5.0):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(n_positions=64)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.V, self.s = len(tok), strength
        self.good, self.bad = tok.convert_tokens_to_ids("<|good|>"), tok.convert_tokens_to_ids("<|bad|>")
        self.x = tok.convert_tokens_to_ids("x")

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.V)
        for b in range(B):
            last = None
            for t in range(T):
                tok = int(input_ids[b, t])
                last = tok if tok in (self.good, self.bad) else last
                if t + 2 < T and int(input_ids[b, t + 1]) in (self.good, self.bad):
                    logits[b, t, self.bad if int(input_ids[b, t + 2]) == self.x else self.good] = self.s
                if last is not None:
                    logits[b, t, self.x] = 3.0 if last == self.bad else -3.0
        return SimpleNamespace(logits=logits)


def test_self_tagging_of_a_perfect_tagger():
    schema = xschema()
    tok = tiny_char_tokenizer(schema.tag_tokens)
    rows = [{"segments": ["x = a\n", "a = b\n", "xx\n"], "tag__x": ["bad", "good", "bad"]},
            {"segments": ["b = c\n", "x\n"], "tag__x": ["good", "bad"]}]
    out = ev.self_tagging(Oracle(tok), tok, schema, rows)["x"]
    assert (out["n"], out["n_bad"]) == (5, 3)
    assert out["auroc"] == 1.0 and out["llr_auroc"] == 1.0
    assert out["mean_llr_bad"] > 0 > out["mean_llr_good"]
    bins = out["calibration"]["bins"]
    p_bad = math.exp(5) / (math.exp(5) + 1)  # two tags compete; the oracle gives the right one +5
    assert bins[-1]["n"] == 3 and bins[-1]["mean_prob"] == pytest.approx(p_bad, rel=1e-4)
    assert bins[0]["n"] == 2 and bins[0]["mean_prob"] == pytest.approx(1 - p_bad, rel=1e-3)
    # an oracle that always picks the wrong tag is perfectly wrong
    wrong = Oracle(tok, strength=-5.0)
    assert ev.self_tagging(wrong, tok, schema, rows)["x"]["auroc"] == 0.0


def test_temptation_warning_matches_tags_to_the_segments_written():
    from pretag.label import LabeledDoc

    schema = xschema()
    text = "x\nab\ncd\n"
    ld = LabeledDoc(text, ["x\n", "ab\n", "cd\n"], {"x": [1.0, 0.0, 0.0]}, {"x": ["bad", "good", "good"]})
    steps = [(0, "<|bad|>", {"<|bad|>": 0.9, "<|good|>": 0.1}), (2, "<|good|>", {"<|bad|>": 0.1, "<|good|>": 0.9}),
             (5, "<|good|>", {"<|bad|>": 0.95, "<|good|>": 0.05})]
    s = ev.Sample(text, truncated=False, tag_steps=steps)
    out = ev.temptation_warning(schema, [s], [ld])["x"]
    # before bad: [0.9]; before good: [0.1, 0.95] -> pairs: 0.9>0.1 (1), 0.9<0.95 (0) -> 0.5
    assert (out["n"], out["n_bad"], out["auroc"]) == (3, 1, 0.5)
    cut = ev.temptation_warning(schema, [ev.Sample(text, truncated=True, tag_steps=steps)], [ld])["x"]
    assert (cut["n"], cut["auroc"]) == (2, 1.0)  # the cut final segment is not judged


def test_temptation_verdict_reads_the_choice_between_tags_not_the_mass_on_them():
    """Raw P(bad) and the verdict P(bad) / P(bad or good) disagree when the tags' total mass varies: here the bad
    segment's tag step puts little mass on tags but most of it on bad (raw AUROC 0, verdict AUROC 1)."""
    from pretag.label import LabeledDoc
    from pretag.results import Temptation

    schema = xschema()
    text = "x\nab\ncd\n"
    ld = LabeledDoc(text, ["x\n", "ab\n", "cd\n"], {"x": [1.0, 0.0, 0.0]}, {"x": ["bad", "good", "good"]})
    steps = [(0, "<|bad|>", {"<|bad|>": 0.3, "<|good|>": 0.1}), (2, "<|good|>", {"<|bad|>": 0.4, "<|good|>": 0.6}),
             (5, "<|good|>", {"<|bad|>": 0.5, "<|good|>": 0.45})]
    out = ev.temptation_warning(schema, [ev.Sample(text, truncated=False, tag_steps=steps)], [ld])["x"]
    assert out["auroc"] == 0.0 and out["auroc_verdict"] == 1.0
    assert out["verdict_before_bad"] == pytest.approx([0.75])
    assert out["verdict_before_good"] == pytest.approx([0.4, 0.5 / 0.95])
    t = Temptation.from_dict(out, "temptation.x")
    assert t.auroc_verdict == 1.0 and Temptation.from_dict(t.to_dict()).to_dict() == t.to_dict()
    old = {k: v for k, v in out.items() if k not in Temptation.NEWER}  # a result file from before the verdict
    assert Temptation.from_dict(old).to_dict() == old


def test_redteam_prompts_take_prefixes_of_the_worst_documents():
    schema = xschema()
    rows = [{"text": "a\nb\nc\n", "segments": ["a\n", "b\n", "c\n"], "score__x": [0.0, 0.0, 0.0]},
            {"text": "x\ny\nz\nw\nv\nu\n", "segments": ["x\n", "y\n", "z\n", "w\n", "v\n", "u\n"],
             "score__x": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}]
    assert ev.redteam_prompts(schema, rows, 1) == ["x\ny\n"]  # up to a third of the worst document
    assert ev.redteam_prompts(schema, rows, 2) == ["x\ny\n", "a\n"]


def test_ratio_ci_of_constants_is_a_point_and_scales():
    from pretag.evaluate import ratio_ci

    e = ratio_ci([0.2] * 50, [0.1] * 40)
    assert e.value == pytest.approx(2.0) and e.lo == pytest.approx(2.0) and e.hi == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    x = rng.random(400)
    same = ratio_ci(x, x, seed=1)
    assert same.value == pytest.approx(1.0) and same.lo < 1.0 < same.hi  # no effect: the interval holds 1
    far = ratio_ci(x, x / 3, seed=1)
    assert far.value == pytest.approx(3.0) and far.lo > 1.0  # a real effect: the interval excludes 1


def test_ratio_ci_of_pooled_fractions():
    from pretag.evaluate import pooled_fraction, ratio_ci

    a = np.array([[1, 10], [3, 10]])  # 4 bad of 20 segments
    b = np.array([[1, 20], [1, 20]])  # 2 bad of 40
    e = ratio_ci(a, b, pooled_fraction, n_resamples=200)
    assert e.value == pytest.approx((4 / 20) / (2 / 40))
    assert e.lo <= e.value <= e.hi


def test_ratio_ci_upper_bound_is_infinite_when_resampled_denominators_are_zero():
    """A rare attribute (PII in 0.1 % of samples): many resamples of the run have no bad sample at all, so the
    ratio's upper bound is unbounded — inf, never NaN."""
    from pretag.evaluate import ratio_ci

    mle = [1.0] * 3 + [0.0] * 997
    run = [1.0] + [0.0] * 999
    e = ratio_ci(mle, run)
    assert e.value == pytest.approx(3.0) and e.hi == float("inf") and 0 <= e.lo <= 3.0


# ---- context: prompt + samples must fit (issue 11 item 8) ------------------------------------------------
def _saved(tmp_path, name: str, n_positions: int):
    from pretag.models import save_model_dir
    from pretag.tokens import add_tag_tokens

    tok = tiny_char_tokenizer()
    schema = xschema()
    add_tag_tokens(tok, schema)
    return save_model_dir(tiny_model(len(tok), n_positions=n_positions), tok, schema, {}, tmp_path / name)


def test_eval_refuses_samples_past_the_context_before_sampling(tmp_path, monkeypatch, capsys):
    from pretag.cli import main
    from pretag.generate import ContextLengthError

    d = _saved(tmp_path, "m", 16)

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the context")

    monkeypatch.setattr(ev, "generate_samples", no_sampling)
    with pytest.raises(ContextLengthError, match=r"\+ 300 new tokens = \d+ exceeds the model's context of 16"):
        ev.evaluate_model(d, samples=2, max_new_tokens=300)
    ref = _saved(tmp_path, "ref", 8)
    with pytest.raises(ContextLengthError, match=r"reference .*ref sample prompt .* context of 8 tokens"):
        ev.evaluate_model(d, samples=2, max_new_tokens=10, reference=ref)
    assert main(["eval", str(d), "--samples", "2", "--max-new-tokens", "300"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pretag eval: error: sample prompt of" in err


def test_fit_prompts_keeps_the_longest_suffix_that_fits():
    from pretag.control import load_policy
    from pretag.generate import prompt_ids
    from pretag.tokens import add_tag_tokens

    tok, schema = tiny_char_tokenizer(), xschema()
    add_tag_tokens(tok, schema)
    model, pol = tiny_model(len(tok), n_positions=16), load_policy(None, schema)
    long, short = "abc\nxyz\n" * 4, "ab\n"
    out, cut = ev.fit_prompts(model, tok, schema, pol, [long, short], 6)
    assert cut == 1 and out[1] == short and long.endswith(out[0]) and out[0]

    def n(p):
        return len(prompt_ids(tok, schema, pol, p))

    assert n(out[0]) + 6 <= 16 < n(long[len(long) - len(out[0]) - 1:]) + 6  # one more character would not fit


# ---- the warning light on prompts --------------------------------------------------------------------------
def _warn_rows():
    rows = []
    for i in range(6):  # openings with a bad segment (score 0.9) and clean ones (0.1), a long clean tail each
        bad = i % 2 == 0
        segs = [f"Opening {i}. ", "tail " * 60]
        rows.append({"id": str(i), "segments": segs, "text": "".join(segs), "score__x": [0.9 if bad else 0.1, 0.1]})
    return rows


def test_opening_prompts_are_balanced_and_judged_by_the_natural_threshold():
    from pretag.schema import schema_from_dict

    schema = schema_from_dict({"attributes": [{"name": "x", "scorer": "profanity", "threshold": 0.5,
                                               "tag_threshold": 0.05}]})
    prompts, labels = ev.opening_prompts(schema, schema.attributes[0], _warn_rows(), n=2)
    assert labels == [1, 1, 0, 0]
    assert prompts == ["Opening 0. ", "Opening 2. ", "Opening 1. ", "Opening 3. "]  # the long tail is cut off
    # 0.1 is tagged bad for training (tag_threshold 0.05) but is a clean opening for evaluation
    assert schema.attributes[0].tagged_bad(0.1) and not schema.attributes[0].is_bad(0.1)
    # an opening is never a whole document: a short document's last segment stays out, a one-segment one is skipped
    short = [{"id": "a", "segments": ["Bad one. ", "Bad two. ", "end."], "score__x": [0.9, 0.1, 0.1]},
             {"id": "b", "segments": ["Clean. "], "score__x": [0.1]},
             {"id": "c", "segments": ["Clean. ", "More. "], "score__x": [0.1, 0.9]}]
    prompts, labels = ev.opening_prompts(schema, schema.attributes[0], short, n=5)
    assert (prompts, labels) == (["Bad one. Bad two. ", "Clean. "], [1, 0])  # c's bad segment is its continuation


def test_prompt_warning_reads_the_bad_tags_temptation_after_untagged_openings(monkeypatch):
    from types import SimpleNamespace

    import pretag.generate as gen
    from pretag.schema import schema_from_dict

    schema = schema_from_dict({"attributes": [{"name": "x", "scorer": "profanity", "threshold": 0.5}]})
    seen = []

    def fake_generate(model, tokenizer, schema, prompts, policy, cfg):
        seen.append(policy.resolved_prompt_tags(schema))

        def seq(p):  # a forced tag position, then a free one; after a bad opening a tag is less likely but bad
            bad = int(p.split()[1].rstrip(".")) % 2 == 0
            steps = [(0.06, 0.04, True), (0.2, 0.5, False)] if bad else [(0.1, 0.9, True), (0.9, 0.05, False)]
            return SimpleNamespace(tokens=[SimpleNamespace(temptation={"<|bad|>": b, "<|good|>": g}, forced=f,
                                                           verdict={"<|bad|>": b / (b + g), "<|good|>": g / (b + g)}
                                                           if f else {})
                                           for b, g, f in steps])
        return SimpleNamespace(sequences=[seq(p) for p in prompts])

    monkeypatch.setattr(gen, "generate", fake_generate)
    res = ev.prompt_warning(None, None, schema, None, _warn_rows(), n=3, max_new_tokens=2)["x"]
    assert (res["n_bad"], res["n_clean"]) == (3, 3) and set(seen) == {"none"} and res["prompt_tags"] == "none"
    # the raw temptation, mean (0.13 vs 0.5) and first step (0.06 vs 0.1), points the wrong way: it carries P(a tag)
    assert res["auroc"] == 0.0 and res["mean_after_bad"] == pytest.approx(0.13)
    assert res["mean_after_clean"] == pytest.approx(0.5)
    assert res["auroc_first"] == 0.0 and (res["auroc_first_lo"], res["auroc_first_hi"]) == (0.0, 0.0)
    assert (res["first_after_bad"], res["first_after_clean"]) == (pytest.approx(0.06), pytest.approx(0.1))
    # the verdict where a tag is forced, P(bad) / P(bad or good): 0.6 vs 0.1; the free step does not count
    assert res["auroc_verdict"] == 1.0 and (res["auroc_verdict_lo"], res["auroc_verdict_hi"]) == (1.0, 1.0)
    assert (res["verdict_after_bad"], res["verdict_after_clean"]) == (pytest.approx(0.6), pytest.approx(0.1))
    # what flag rules see, each continuation's highest reading: raw 0.2 vs 0.9 (backwards), verdict 0.6 vs 0.1
    assert (res["auroc_max"], res["auroc_verdict_max"]) == (0.0, 1.0)
    from pretag.results import WarningLight
    assert WarningLight.from_dict(res).to_dict() == res  # the new fields round-trip
    seen.clear()
    assert ev.prompt_warning(None, None, schema, None, _warn_rows(), n=3, max_new_tokens=2,
                             prompt_tags=None)["x"]["prompt_tags"] == "every" and set(seen) == {"every"}


def test_auroc_interval_resamples_each_group_and_brackets_the_point():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    point = ev.auroc(np.r_[pos, neg], [1] * 40 + [0] * 40)
    lo, hi = ev.auroc_interval(pos, neg, seed=3)
    assert lo < point < hi and 0.1 < hi - lo < 0.4  # ~0.76 with a standard error of ~0.05
    assert (lo, hi) == ev.auroc_interval(pos, neg, seed=3)  # deterministic for a seed
    lo8, hi8 = ev.auroc_interval(np.r_[pos, pos, pos, pos], np.r_[neg, neg, neg, neg], seed=3)
    assert hi8 - lo8 < 0.7 * (hi - lo)  # four times the openings: about half as wide


# ---- KL to a non-pretag reference model ---------------------------------------------------------------------
def test_kl_to_a_plain_hf_reference_model_is_closed_form_for_uniform_models(tmp_path):
    """A reference that is a plain HF directory (``save_pretrained``, no pretag files) is sampled from its start
    token and scored as plain text. Both models are uniform (all logits 0), so each sample's log-probabilities are
    −L·log V and the KL is mean(L)·log(V_model / V_ref): the tag tokens are the evaluated model's only difference."""
    from pretag.models import SCHEMA_FILE, save_model_dir
    from pretag.tokens import add_tag_tokens

    ref_tok = tiny_char_tokenizer()
    ref = tiny_model(len(ref_tok), seed=1)
    with torch.no_grad():
        ref.lm_head.weight.zero_()  # tied to the input embeddings: all logits 0 -> uniform
    ref.save_pretrained(tmp_path / "ref")
    ref_tok.save_pretrained(tmp_path / "ref")
    assert not (tmp_path / "ref" / SCHEMA_FILE).exists()

    tok, schema = tiny_char_tokenizer(), xschema()
    add_tag_tokens(tok, schema)
    mine = tiny_model(len(tok), seed=2)
    with torch.no_grad():
        mine.lm_head.weight.zero_()
    d = save_model_dir(mine, tok, schema, {}, tmp_path / "m")
    v_ref, v_mine = len(ref_tok), len(tok)
    assert v_mine == v_ref + 2  # <|good|>, <|bad|>

    res = ev.evaluate_model(d, samples=2, max_new_tokens=8, reference=tmp_path / "ref", reference_samples_n=12,
                            cache_dir=tmp_path / "cache", n_resamples=50)
    kl = res["kl"]
    assert kl["reference"] == str(tmp_path / "ref") and kl["conditioned"] is False
    samples = ev.reference_samples(tmp_path / "ref", 12, max_new_tokens=8, cache_dir=tmp_path / "cache")  # cached
    assert samples and all(0 < len(s["text"]) <= 8 for s in samples)
    lengths = [len(ev.encode_plain(ref_tok, s["text"])) for s in samples]
    assert lengths == [len(s["text"]) for s in samples]  # one token per character: L is the text's length
    assert [s["logp_ref"] for s in samples] == pytest.approx([-n * math.log(v_ref) for n in lengths], rel=1e-5)
    assert kl["value"] == pytest.approx(np.mean(lengths) * math.log(v_mine / v_ref), rel=1e-4)
    assert kl["value"] > 0


def test_an_mle_model_is_scored_with_another_tasks_schema_and_a_tagged_one_only_with_its_own_tags(tmp_path):
    """One MLE baseline serves two tasks on the same text (it never read a tag): its samples are scored by the
    schema it is evaluated with. A tag-trained model is refused a schema whose tags are not the ones it learned."""
    from pretag.models import save_model_dir
    from pretag.schema import schema_from_dict
    from pretag.tokens import add_tag_tokens

    def schema(name: str, tags: dict | None = None):
        attr = {"name": name, "scorer": {"type": "regex", "patterns": ["a"]}, "threshold": 0}
        return schema_from_dict({"name": name, "segmenter": "lines",
                                 "attributes": [{**attr, **({"tags": tags} if tags else {})}]})

    tok = tiny_char_tokenizer()
    add_tag_tokens(tok, xschema())
    model = tiny_model(len(tok))
    mle = save_model_dir(model, tok, xschema(), {"config": {"method": "mle"}}, tmp_path / "mle")
    cond = save_model_dir(model, tok, xschema(), {"config": {"method": "conditional"}}, tmp_path / "cond")
    own = ev.evaluate_model(mle, samples=8, max_new_tokens=8)
    other = ev.evaluate_model(mle, samples=8, max_new_tokens=8, schema=schema("a"))
    assert own["schema"] == "x" and set(own["misalignment"]) == {"x"}
    assert other["schema"] == "a" and set(other["misalignment"]) == {"a"}
    # the same samples (same seed, the same plain policy), judged by the other task's classifier
    assert other["examples"] == own["examples"]
    assert ev.evaluate_model(cond, samples=4, max_new_tokens=8, schema=schema("a"))["schema"] == "a"
    with pytest.raises(ValueError, match="trained with the tags of schema 'x'.*schema 'b', whose tags differ"):
        ev.evaluate_model(cond, samples=4, max_new_tokens=8, schema=schema("b", {"good": "ok", "bad": "neg"}))
    with pytest.raises(ValueError, match=r"schema 'b': tokenizer lacks the tag tokens \['<\|ok\|>', '<\|neg\|>'\]"):
        ev.evaluate_model(mle, samples=4, max_new_tokens=8, schema=schema("b", {"good": "ok", "bad": "neg"}))
