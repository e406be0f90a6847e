"""Segmenters: each cut is what its name says, and every cut rebuilds the document byte for byte."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import pytest  # noqa: E402

from pretag.corpus import open_corpus  # noqa: E402
from pretag.segment import SEGMENTERS, segment, segment_offsets  # noqa: E402

TRICKY = [
    "",
    "x",
    "no newline at end",
    "a\nb\n",
    "crlf line\r\nnext\r\n",
    "form\x0cfeed and\u2028line separator\nend",
    "\n\n\nleading blanks",
    "  Dr. Smith went to Washington.  He said: \"Hi!\" Then left...\n\n\n  New para. e.g. this one.\nx",
    "emoji 🎉 and accents: café. Next sentence!   \t\n\n",
    "Mr. A. B. Jones, Ph.D., arrived at 5 p.m. on Jan. 3. He left.",
]


@pytest.mark.parametrize("how", SEGMENTERS)
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_on_tricky_texts(how, text):
    segs = segment(text, how)
    assert "".join(segs) == text
    assert all(segs), "no empty segments"
    assert segment_offsets(text, how) == [sum(map(len, segs[:i])) for i in range(len(segs))]


def test_lines_keep_newlines_and_split_only_on_newline():
    assert segment("a\nb\r\nc", "lines") == ["a\n", "b\r\n", "c"]
    # a form feed is part of a Python source line, not a line break (unlike str.splitlines)
    assert segment("x = 1\x0cy\n", "lines") == ["x = 1\x0cy\n"]


def test_sentences_come_from_pysbd_and_keep_whitespace():
    text = "Dr. Smith went to Washington.  He said hi. Then he left."
    assert segment(text, "sentences") == ["Dr. Smith went to Washington.  ", "He said hi. ", "Then he left."]


def test_sentences_never_cross_paragraphs():
    segs = segment("First one\n\nSecond one. Third.", "sentences")
    assert segs == ["First one\n\n", "Second one. ", "Third."]


def test_paragraphs_own_their_trailing_blank_lines():
    assert segment("a\nb\n\n \nc\n", "paragraphs") == ["a\nb\n\n \n", "c\n"]


def test_document_is_one_segment_and_empty_is_none():
    assert segment("a\n\nb", "document") == ["a\n\nb"]
    assert segment("", "lines") == []


def test_unknown_segmenter_names_the_choices():
    with pytest.raises(ValueError, match="unknown segmenter 'words'.*lines"):
        segment("x", "words")


def _broken(args):
    how, texts = args
    return [i for i, t in texts if "".join(segment(t, how)) != t]


def _check_corpus(name, hows, **kw):
    docs = [(d.id, d.text) for d in open_corpus(name, **kw)]
    assert len(docs) > 500
    for how in hows:
        if how == "sentences":  # pysbd is slow: spread over the CPUs
            chunks = [(how, docs[i::8]) for i in range(8)]
            with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
                bad = [i for part in ex.map(_broken, chunks) for i in part]
        else:
            bad = _broken((how, docs))
        assert bad == [], f"{how}: {len(bad)} documents do not rebuild, e.g. {bad[:3]}"


def test_invariant_whole_stdlib_and_fortunes_fast_segmenters():
    _check_corpus("stdlib", ["lines", "paragraphs", "document"], include_all=True)
    _check_corpus("fortunes", ["lines", "paragraphs", "document"])


@pytest.mark.slow
def test_invariant_sentences_all_fortunes():
    _check_corpus("fortunes", ["sentences"])  # ~30 s on one core


@pytest.mark.slow
def test_invariant_sentences_whole_stdlib():
    _check_corpus("stdlib", ["sentences"], include_all=True)  # ~4 min on one core, split over the CPUs
