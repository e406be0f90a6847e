"""Inline tags: a bad tag right before each word that is bad on its own, not only at the start of its sentence.

Korbak et al. put one tag in front of each sentence. Safety Pretraining (Maini et al. 2025) also puts its tag
*inline*, before the offending words themselves. Then the tag carries a local, easily learned fact — "a flagged word
follows" — and a model that never saw a flagged word without ``<|bad|>`` before it cannot write one once the tag is
banned; the pre-ban P(<|bad|>) at each step is the temptation to write such a word right there.

:func:`inline_dataset` turns a labeled dataset into an inline-tagged one. Every segment (sentence) is cut into
pieces: each maximal run of flagged words (a word whose own score is worse than ``word_threshold``; runs joined by
whitespace only) with the whitespace before it, and the clean text between runs. Flagged runs get the attribute's
bad tag, clean pieces its good tag, and every piece is scored again by the attribute's scorer. Sentence boundaries
are kept (a sentence's first piece starts where the sentence did), so generation's segment cut, the policy's forced
good tag at segment starts and evaluation's sentence scores mean what they meant; only training sees the finer tags.
Other segment-level attributes are copied to each piece of their segment; document-level ones are unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretag.schema import Attribute, Schema

log = logging.getLogger(__name__)

WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
"""A word: letters, with inner apostrophes (``don't``); digits and punctuation are never flagged."""
INFO_FILE = "inline.json"


@dataclass(frozen=True)
class Piece:
    text: str
    flagged: bool | None
    """None: left untagged (a segment that partial labeling did not tag)."""


def split_flagged(segment: str, flagged: set[str]) -> list[Piece]:
    """Cut ``segment`` into clean pieces and flagged runs (lower-cased words in ``flagged``); the pieces concatenate
    back to ``segment``. A flagged run takes the whitespace before it, so a BPE tokenizer still sees " word"."""
    spans: list[list[int]] = []  # [start, end) of flagged runs, start moved back over preceding whitespace
    for m in WORD.finditer(segment):
        if m.group(0).lower() not in flagged:
            continue
        start = m.start()
        while start > 0 and segment[start - 1].isspace():
            start -= 1
        if spans and start <= spans[-1][1]:  # only whitespace since the previous flagged word: one run
            spans[-1][1] = m.end()
        else:
            spans.append([start, m.end()])
    pieces, at = [], 0
    for s, e in spans:
        if s > at:
            pieces.append(Piece(segment[at:s], False))
        pieces.append(Piece(segment[s:e], True))
        at = e
    if at < len(segment):
        pieces.append(Piece(segment[at:], False))
    return pieces or [Piece(segment, False)]


def _inline_attribute(schema: Schema, name: str | None) -> Attribute:
    binary = [a for a in schema.segment_attributes if a.bands is None]
    if name is None:
        if len(binary) != 1:
            raise ValueError(f"schema {schema.name!r} has {len(binary)} binary segment-level attributes "
                             f"({', '.join(a.name for a in binary) or 'none'}); name the one to tag inline")
        return binary[0]
    for a in binary:
        if a.name == name:
            return a
    raise ValueError(f"attribute {name!r} is not a binary segment-level attribute of schema {schema.name!r} "
                     f"(those are: {', '.join(a.name for a in binary) or 'none'})")


def flagged_words(attr: Attribute, words: list[str], word_threshold: float) -> dict[str, float]:
    """Score each distinct word on its own with the attribute's scorer; the words worse than ``word_threshold``."""
    from pretag.scorers import build_scorer

    scores = build_scorer(attr.scorer).score_texts(words) if words else []
    worse = (lambda s: s > word_threshold) if attr.direction == "higher_is_worse" else (lambda s: s < word_threshold)
    return {w: float(s) for w, s in zip(words, scores) if s is not None and worse(s)}


def inline_row(schema: Schema, attr: Attribute, row: dict[str, Any], flagged: set[str]) -> dict[str, Any]:
    """One labeled row with its segments cut into pieces and the pieces tagged (see the module docstring); the
    attribute's scores are left to the caller (one scorer call per shard: ``inline_dataset``)."""
    good, bad = attr.tags["good"], attr.tags["bad"]
    pieces, parent = [], []
    was = row.get(f"tag__{attr.name}") or [None] * len(row["segments"])
    for i, seg in enumerate(row["segments"]):
        # a segment partial labeling left untagged stays whole and untagged
        for p in split_flagged(seg, flagged) if was[i] is not None else [Piece(seg, None)]:
            pieces.append(p)
            parent.append(i)
    out = dict(row)
    out["segments"] = [p.text for p in pieces]
    for a in schema.segment_attributes:
        if a.name == attr.name:
            continue
        for col in (f"score__{a.name}", f"tag__{a.name}"):
            if row.get(col) is not None:
                out[col] = [row[col][i] for i in parent]
    out[f"score__{attr.name}"] = [None] * len(pieces)
    out[f"tag__{attr.name}"] = [None if p.flagged is None else bad if p.flagged else good for p in pieces]
    return out


def inline_dataset(src: str | Path, out: str | Path, *, word_threshold: float, attribute: str | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write an inline-tagged copy of the labeled dataset ``src`` to ``out``; returns what ``inline.json`` says.

    ``word_threshold`` is on the attribute's own scale and direction (profanity: a word scoring above 0.1 alone).
    """
    from pretag.label import atomic_write_bytes, read_shard, schema_yaml, shard_files, summarize, write_rows
    from pretag.schema import load_schema
    from pretag.scorers import build_scorer

    src, out = Path(src), Path(out)
    if not (src / "schema.yaml").exists():
        raise FileNotFoundError(f"{src} is not a labeled dataset (no schema.yaml in it)")
    if src.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the source dataset; write the inline copy to a new folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists and is not an empty folder (pass overwrite to replace it)")
    schema = load_schema(src / "schema.yaml")
    attr = _inline_attribute(schema, attribute)
    files = shard_files(src)
    if not files:
        raise FileNotFoundError(f"{src} holds no part-*.parquet shards")
    words: set[str] = set()
    for f in files:
        for segs in read_shard(f, ["segments"]).column("segments").to_pylist():
            words.update(m.group(0).lower() for s in segs for m in WORD.finditer(s))
    flagged = flagged_words(attr, sorted(words), word_threshold)
    log.info("%s: %d of %d distinct words score worse than %g on their own", attr.name, len(flagged), len(words),
             word_threshold)
    out.mkdir(parents=True, exist_ok=True)
    for stale in shard_files(out):
        stale.unlink()
    scorer = build_scorer(attr.scorer)
    schema.description = (
        f"Inline tags on {attr.name}: {schema.open_token(attr.tags['bad'])} before each run of words scoring worse than "
        f"{word_threshold:g} on their own, {schema.open_token(attr.tags['good'])} before the text between them (see "
        f"{INFO_FILE}); evaluation keeps the natural threshold. Copied from {src.name}: {schema.description}").strip()
    n_seg = n_flag = 0
    flagged_set = set(flagged)
    for f in files:
        rows = [inline_row(schema, attr, r, flagged_set) for r in read_shard(f).to_pylist()]
        scores = iter(scorer.score_texts([p for r in rows for p in r["segments"]]))
        for r in rows:
            r[f"score__{attr.name}"] = [None if (x := next(scores)) is None else float(x) for _ in r["segments"]]
        n_seg += sum(len(r["segments"]) for r in rows)
        n_flag += sum(t == attr.tags["bad"] for r in rows for t in r[f"tag__{attr.name}"])
        write_rows(out / f.name, schema, rows)
    atomic_write_bytes(out / "schema.yaml", schema_yaml(schema))
    info = {"source": str(src), "attribute": attr.name, "word_threshold": word_threshold,
            "distinct_words": len(words), "flagged_words": len(flagged), "pieces": n_seg, "flagged_runs": n_flag,
            "worst_words": sorted(flagged, key=flagged.get, reverse=attr.direction == "higher_is_worse")[:20]}
    atomic_write_bytes(out / INFO_FILE, json.dumps(info, indent=2).encode())
    atomic_write_bytes(out / "summary.json", json.dumps({**summarize(out, schema), "inline": info}, indent=2).encode())
    return info
