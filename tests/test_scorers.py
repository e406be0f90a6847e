"""Scorers against the libraries they wrap, on known inputs; options validated; the hf scorer on a tiny model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pretag.scorers import REGISTRY, Doc, ScorerError, build_scorer, spec_problems  # noqa: E402
from pretag.segment import segment  # noqa: E402

PROSE = ["You are a damn idiot.", "Have a lovely day!", "Email me at jane.doe@example.com or see https://www.example.org/page.html",
         "Notwithstanding institutional considerations, comprehensive reevaluation is necessary.", ""]


def test_pep8_counts_violations_like_pycodestyle():
    s = build_scorer("pep8")
    assert s.violations("import os,sys\n") == {1: 2}  # E401 multiple imports, E231 missing whitespace
    assert s.score_texts(["import os,sys\n", "x = 1\n"]) == [pytest.approx(2 / 14), 0.0]


def test_pep8_uses_whole_file_context():
    text = "import os\ndef f():\n    return os\n"
    segs = segment(text, "lines")
    in_context = build_scorer("pep8").score_docs([Doc(text, segs)])[0]
    assert in_context[1] > 0  # E302: expected 2 blank lines, visible only with the line above
    assert build_scorer("pep8").score_texts([segs[1]]) == [0.0]  # the same line alone is clean


def test_pep8_total_equals_pycodestyle_on_a_stdlib_file():
    import pycodestyle

    path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    text = path.read_text()
    checker = pycodestyle.Checker(str(path), options=pycodestyle.StyleGuide(quiet=True).options)
    expected = checker.check_all()
    segs = segment(text, "lines")
    scores = build_scorer("pep8").score_docs([Doc(text, segs)])[0]
    assert expected > 0
    assert round(sum(sc * len(s) for sc, s in zip(scores, segs))) == expected


def test_pep8_survives_a_crash_inside_pycodestyle():
    """A sample a small model wrote once crashed pycodestyle's continued_indentation check (IndexError) and with
    it a whole experiment's evaluation. The scorer leaves the crashing check out for that file and keeps the rest."""
    import pycodestyle

    sc = build_scorer("pep8")
    text = ',"def ,[))#\n(\t}}"\\\n[\t'  # found by fuzzing; pycodestyle 2.x raises IndexError on it
    with pytest.raises(IndexError):
        pycodestyle.Checker(lines=text.splitlines(True), options=sc._options,
                            report=pycodestyle.BaseReport(sc._options)).check_all()
    per_line = sc.violations(text)
    assert sc.crashes == 1 and sum(per_line.values()) > 0  # the other checks still count
    segs = segment(text, "lines")
    [scores] = sc.score_docs([Doc(text, segs)])
    assert len(scores) == len(segs) and all(s > 0 for s in scores)
    assert sc.violations("x = 1\n") == {}  # a clean file after a crash: every check is back


def test_pii_is_scrubadub_detections_per_char():
    import scrubadub

    got = build_scorer("pii").score_texts(PROSE)
    want = [len(list(scrubadub.Scrubber().iter_filth(t))) / max(len(t), 1) if t else 0.0 for t in PROSE]
    assert got == pytest.approx(want)
    assert got[2] == pytest.approx(2 / len(PROSE[2])) and got[1] == 0.0


def test_profanity_is_profanity_check_probability():
    from profanity_check import predict_prob

    got = build_scorer("profanity").score_texts(PROSE)
    assert got == pytest.approx([float(p) for p in predict_prob(PROSE)])
    assert got[0] > 0.5 > got[1]


def test_sentiment_is_vader_compound():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    a = SentimentIntensityAnalyzer()
    got = build_scorer("sentiment").score_texts(PROSE)
    assert got[:4] == pytest.approx([a.polarity_scores(t)["compound"] for t in PROSE[:4]])
    assert got[0] < 0 < got[1] and got[4] == 0.0


def test_reading_level_is_textstat_grade_clipped_at_zero():
    import textstat

    got = build_scorer("reading_level").score_texts(PROSE)
    assert got[3] == pytest.approx(textstat.automated_readability_index(PROSE[3])) and got[3] > 14
    assert min(got) >= 0.0
    with pytest.raises(ScorerError, match="no metric 'nope'"):
        build_scorer({"type": "reading_level", "metric": "nope"})


def test_regex_and_keywords():
    r = build_scorer({"type": "regex", "patterns": [r"\d+", "cat"]})
    assert r.score_texts(["cat 12 and 3", "dog"]) == [3.0, 0.0]
    assert build_scorer({"type": "regex", "patterns": ["a"], "normalize": "per_char"}).score_texts(["aab"]) == [
        pytest.approx(2 / 3)]
    k = build_scorer({"type": "keywords", "words": ["ass", "bad word"]})
    assert k.score_texts(["a class act", "Ass! what a BAD WORD", ""]) == [0.0, 2.0, 0.0]
    assert build_scorer({"type": "keywords", "words": ["x"], "normalize": "any"}).score_texts(["x x"]) == [1.0]
    with pytest.raises(ScorerError, match="not a valid regular expression"):
        build_scorer({"type": "regex", "patterns": ["("]})


def test_field_reads_document_fields():
    f = build_scorer({"type": "field", "field": "offensive"})
    docs = [Doc("a b", ["a ", "b"], {"offensive": True}), Doc("c", ["c"], {}), Doc("d", ["d"], {"offensive": 0})]
    assert f.score_docs(docs) == [[1.0, 1.0], [None], [0.0]]
    assert build_scorer({"type": "field", "field": "x", "default": 0}).score_docs([Doc("c", ["c"])]) == [[0.0]]
    with pytest.raises(ScorerError, match="not a number"):
        f.score_docs([Doc("c", ["c"], {"offensive": "very"})])


def test_python_callable(tmp_path):
    (tmp_path / "mine.py").write_text("def n(texts):\n    return [len(t) for t in texts]\n"
                                      "def wrong(texts):\n    return [1.0]\n")
    s = build_scorer({"type": "python", "function": f"{tmp_path / 'mine.py'}:n"})
    assert s.score_texts(["ab", "abcd"]) == [2.0, 4.0]
    assert pickle.loads(pickle.dumps(s)).score_texts(["abc"]) == [3.0]
    with pytest.raises(ScorerError, match="returned 1 scores for 2 texts"):
        build_scorer({"type": "python", "function": f"{tmp_path / 'mine.py'}:wrong"}).score_texts(["a", "b"])
    with pytest.raises(ScorerError, match="cannot import 'no_such_module_x'"):
        build_scorer({"type": "python", "function": "no_such_module_x:f"})
    with pytest.raises(ScorerError, match="no callable 'nope'"):
        build_scorer({"type": "python", "function": "os.path:nope"})


def test_cascade_calls_the_expensive_scorer_only_on_flagged(tmp_path):
    (tmp_path / "exp.py").write_text("SEEN = []\ndef f(texts):\n    SEEN.extend(texts)\n"
                                     "    return [0.9 for t in texts]\n")
    s = build_scorer({"type": "cascade", "cheap": {"type": "keywords", "words": ["damn"]},
                      "expensive": {"type": "python", "function": f"{tmp_path / 'exp.py'}:f"}})
    assert s.score_texts(["fine", "damn it", "ok", "damn"]) == [0.0, 0.9, 0.0, 0.9]
    assert s.expensive.fn.__globals__["SEEN"] == ["damn it", "damn"]
    assert s.stats == {"segments": 4, "flagged": 2}


def test_spec_problems_are_collected():
    assert spec_problems({"type": "regex", "pattern": "x"}) == [
        "scorer: scorer 'regex' has no option 'pattern' (options: patterns, normalize, ignore_case)",
        "scorer: scorer 'regex' needs option 'patterns' (list of regular expressions (required))",
    ]
    assert "unknown scorer type 'detoxify'" in spec_problems("detoxify")[0]
    probs = spec_problems({"type": "cascade", "cheap": "nope", "expensive": {"type": "hf"}})
    assert len(probs) == 2 and "cheap" in probs[0] and "needs option 'model'" in probs[1]
    with pytest.raises(ScorerError, match="unknown scorer type"):
        build_scorer({"type": "nope"})


def test_every_registered_scorer_documents_its_meaning():
    from pretag.scorers import scorer_class

    for name in REGISTRY:
        cls = scorer_class(name)
        assert cls.name == name and cls.meaning, name


def test_scorers_pickle_after_use():
    for spec in ("pii", "sentiment", "profanity", "pep8"):
        s = build_scorer(spec)
        s.score_texts(["hello there"])
        assert pickle.loads(pickle.dumps(s)).score_texts(["hello there"]) == s.score_texts(["hello there"])


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A randomly initialised 1-layer BERT classifier with a word-level tokenizer, saved like a user's model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_clf")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "you", "are", "nice", "bad", "a", "day", "have"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2,
                     id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1})
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    return d


def test_hf_scorer_matches_a_direct_forward_pass(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["you are nice", "you are bad", "have a nice day today", "zzz"]
    s = build_scorer({"type": "hf", "model": str(tiny_classifier), "batch_size": 3, "device": "cpu"})
    got = s.score_texts(texts)
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        want = [model(**tok([t], return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts]
    assert got == pytest.approx(want, abs=1e-5)  # batched + padded == one by one
    by_name = build_scorer({"type": "hf", "model": str(tiny_classifier), "label": "ok", "device": "cpu"})
    assert [a + b for a, b in zip(by_name.score_texts(texts), got)] == pytest.approx([1.0] * 4)


def test_hf_scorer_errors(tmp_path, tiny_classifier):
    with pytest.raises(ScorerError, match="not a local model directory"):
        build_scorer({"type": "hf", "model": str(tmp_path)})
    with pytest.raises(ScorerError, match="no label 'angry'"):
        build_scorer({"type": "hf", "model": str(tiny_classifier), "label": "angry"}).score_texts(["x"])


def test_sentiment_neg_measure_is_vaders_negative_share_and_flags_single_negative_words():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    a = SentimentIntensityAnalyzer()
    s = build_scorer({"type": "sentiment", "measure": "neg"})
    got = s.score_texts(PROSE + ["hate", "table", "lovely", "  "])
    assert got[: len(PROSE)] == pytest.approx([a.polarity_scores(t)["neg"] for t in PROSE])
    assert got[-4:] == [1.0, 0.0, 0.0, 0.0]  # a lexicon-negative word alone is all negative; neutral/positive none
    assert all(0.0 <= x <= 1.0 for x in got)
    with pytest.raises(ScorerError, match="measure must be one of compound, neg, not 'pos'"):
        build_scorer({"type": "sentiment", "measure": "pos"})
    with pytest.raises(ScorerError, match="has no option 'measur'"):
        build_scorer({"type": "sentiment", "measur": "neg"})
