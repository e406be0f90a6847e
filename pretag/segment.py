"""Segmenters: cut a document into the units a classifier scores.

The one invariant every stage relies on: ``"".join(segment(text, how)) == text`` byte for byte. Tokenization
rebuilds a document from its segments (with tag tokens in between), so a segmenter that dropped a space or a
newline would silently change the training text. Every segmenter here therefore works on *offsets* into the
original string and returns slices that tile it; nothing is stripped, normalised or re-joined.

    lines       physical lines, newline kept (the paper's PEP8 unit; ``\\r\\n`` stays with its line)
    sentences   pysbd sentences, re-anchored onto the original text; whitespace after a sentence belongs to it
    paragraphs  runs of text ending after one or more blank lines
    document    the whole text as one segment

An empty text has no segments (``[]``), which joins back to ``""``.

Two cuts of one idea, on purpose. Every *whole* text is cut here: corpora at labeling, prompts
(``pretag.tokens.TagVocab.prompt_ids``), samples when their classifiers run. A *continuation* is cut while it is
written: ``pretag.control`` must say at each step, before the next token exists, whether that token starts a
segment (and so must be a tag), from the last one or two tokens' text alone (``_SENT_END``/``_PUNCT_END`` there:
``.!?`` plus closing quotes, then whitespace; a newline; a blank line). pysbd cannot answer that question: it
decides a sentence end by looking *ahead* (``Dr. Smith`` is one sentence, ``He left. Smith`` two), costs
milliseconds per call where the processor has microseconds per step, and may move an earlier cut when more text
arrives. For ``lines`` and ``paragraphs`` the rule is the same (a newline, a blank line), seen at token ends; for
``sentences`` the online cut also splits after an abbreviation's period. Unifying them would change either every
labeled dataset (training text cut online) or generation (no tag could be forced until pysbd had seen what follows),
so they stay two; this is the one place that says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache

logger = logging.getLogger(__name__)

SEGMENTERS = ("lines", "sentences", "paragraphs", "document")

_LINE_END = re.compile(r"\n")
# The end of a paragraph: a newline, then one or more lines holding only horizontal whitespace.
_PARA_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def segment(text: str, how: str) -> list[str]:
    """Split ``text`` into segments; ``"".join(result) == text`` always holds."""
    try:
        fn = _SEGMENTERS[how]
    except KeyError:
        raise ValueError(f"unknown segmenter {how!r}; choose one of {', '.join(SEGMENTERS)}") from None
    if not text:
        return []
    return fn(text)


def segment_offsets(text: str, how: str) -> list[int]:
    """Start offsets of the segments of ``text`` (same cut as :func:`segment`)."""
    out, pos = [], 0
    for s in segment(text, how):
        out.append(pos)
        pos += len(s)
    return out


def _cut(text: str, starts: list[int]) -> list[str]:
    """Slices of ``text`` beginning at each start (sorted, first 0); they tile the text by construction."""
    bounds = [*starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def lines(text: str) -> list[str]:
    """Physical lines with their newline. Only ``\\n`` ends a line (as for Python source), so a form feed or
    U+2028 inside a line does not split it, unlike ``str.splitlines``."""
    return _cut(text, [0, *(m.end() for m in _LINE_END.finditer(text))])


def paragraphs(text: str) -> list[str]:
    """Paragraphs; the blank lines after a paragraph belong to it."""
    return _cut(text, [0, *(m.end() for m in _PARA_BREAK.finditer(text))])


def document(text: str) -> list[str]:
    return [text]


@lru_cache(maxsize=1)
def _pysbd():
    import pysbd

    # clean=False: never rewrite the text; we only need where sentences start.
    return pysbd.Segmenter(language="en", clean=False)


def sentences(text: str) -> list[str]:
    """Sentences from pysbd (a maintained rule-based splitter, the "Golden Rules" test set).

    pysbd may normalise whitespace in what it returns, so its sentences are re-anchored onto the original text:
    each sentence's first non-space characters are searched from the previous cut onwards, and the text between
    two sentence starts becomes one segment. A sentence that cannot be found is merged into the previous one,
    so the worst case is a coarser cut, never a changed text. Paragraphs are split first (sentences never cross a
    blank line, and pysbd's cost grows with the input length).
    """
    starts: list[int] = []
    base = 0
    for para in paragraphs(text):
        starts.append(base)
        cursor, first = 0, True
        for sent in _pysbd().segment(para):
            probe = sent.strip()[:40]
            if not probe:
                continue
            at = para.find(probe, cursor)
            if at < 0:
                logger.debug("sentence not found in text, merged into the previous one: %r", probe)
                continue
            if not first:  # the paragraph's first sentence starts at the paragraph (leading blanks included)
                starts.append(base + at)
            first = False
            cursor = at + len(probe)
        base += len(para)
    # whitespace before the first sentence of a paragraph stays with the previous segment (starts are sorted)
    return _cut(text, sorted(set(starts)))


_SEGMENTERS: dict[str, Callable[[str], list[str]]] = {
    "lines": lines,
    "sentences": sentences,
    "paragraphs": paragraphs,
    "document": document,
}
