"""Scorers: classifiers that give each segment one number.

One interface for every family. A scorer sees a *batch of documents*, each with its segments, and returns one
float per segment: most scorers only look at the segment text (``score_texts``), but some need the document
(PEP8 is checked in whole-file context; ``field`` reads a document field), so the batch carries both.

    scorer = build_scorer({"type": "profanity"})
    scorer.score_texts(["hello", "f*** you"])              # -> [0.03, 0.91]
    scorer.score_docs([Doc(text, segments, fields)])        # -> [[...one float per segment...]]

Each family documents what its number means and which direction is worse (``Scorer.meaning``); a schema's
threshold/bands and ``direction`` turn the number into a tag. Families are registered by name in ``REGISTRY``
and imported lazily, so a schema that only uses ``pep8`` never imports scikit-learn or torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ScorerError(ValueError):
    """A scorer spec is invalid (unknown type, bad or missing options); the message lists every problem."""


@dataclass
class Doc:
    """What a scorer sees of one document."""

    text: str
    segments: list[str]
    fields: dict[str, Any] = field(default_factory=dict)
    keep: list[bool] | None = None
    """Partial labeling: only segments with ``keep[i]`` need a score (others may come back as None)."""


class Scorer:
    """Base class. Subclasses implement ``score_texts`` (segment-only scorers) or ``score_docs`` (context)."""

    name: ClassVar[str] = ""
    meaning: ClassVar[str] = ""
    """What the number means and which way is worse; shown in docs and ``pretag label --help``."""
    options: ClassVar[dict[str, str]] = {}
    """Accepted spec options -> one-line help. Unknown options are an error (catches typos like ``treshold``)."""
    required: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **opts: Any) -> None:
        self.opts = opts

    def score_texts(self, texts: list[str]) -> list[float]:
        """One float per text; each text is scored as a whole document of one segment by default."""
        out = self.score_docs([Doc(t, [t]) for t in texts])
        return [s[0] for s in out]  # type: ignore[misc]

    def score_docs(self, docs: list[Doc]) -> list[list[float | None]]:
        """One list of scores per document, one entry per segment (None where ``keep`` says skip)."""
        if type(self).score_texts is Scorer.score_texts:
            raise NotImplementedError(f"{type(self).__name__} implements neither score_texts nor score_docs")
        flat = [s for d in docs for i, s in enumerate(d.segments) if d.keep is None or d.keep[i]]
        scores = iter(self.score_texts(flat) if flat else [])
        return [
            [next(scores) if d.keep is None or d.keep[i] else None for i in range(len(d.segments))] for d in docs
        ]

    def __call__(self, texts: list[str]) -> list[float]:
        return self.score_texts(texts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.opts})"


# name -> "module:Class" (lazy: heavy libraries load only when a schema uses them)
REGISTRY: dict[str, str] = {
    "pep8": "pretag.scorers.code:Pep8Scorer",
    "pii": "pretag.scorers.text:PiiScorer",
    "profanity": "pretag.scorers.text:ProfanityScorer",
    "sentiment": "pretag.scorers.text:SentimentScorer",
    "reading_level": "pretag.scorers.text:ReadingLevelScorer",
    "regex": "pretag.scorers.patterns:RegexScorer",
    "keywords": "pretag.scorers.patterns:KeywordsScorer",
    "field": "pretag.scorers.patterns:FieldScorer",
    "python": "pretag.scorers.patterns:PythonScorer",
    "hf": "pretag.scorers.hf:HFScorer",
    "cascade": "pretag.scorers.cascade:CascadeScorer",
}


def scorer_class(type_name: str) -> type[Scorer]:
    try:
        target = REGISTRY[type_name]
    except KeyError:
        raise ScorerError(f"unknown scorer type {type_name!r}; known: {', '.join(REGISTRY)}") from None
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def spec_problems(spec: Any, where: str = "scorer") -> list[str]:
    """Every problem with a scorer spec, without building it (no model is loaded)."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        return [f"{where}: must be a scorer name or a mapping with a 'type'"]
    t = spec["type"]
    if t not in REGISTRY:
        return [f"{where}: unknown scorer type {t!r}; known: {', '.join(REGISTRY)}"]
    cls = scorer_class(t)
    problems = []
    opts = {k: v for k, v in spec.items() if k != "type"}
    for k in opts:
        if k not in cls.options:
            known = ", ".join(cls.options) or "none"
            problems.append(f"{where}: scorer {t!r} has no option {k!r} (options: {known})")
    for k in cls.required:
        if k not in opts:
            problems.append(f"{where}: scorer {t!r} needs option {k!r} ({cls.options[k]})")
    if t == "cascade":
        for k in ("cheap", "expensive"):
            if k in opts:
                problems += spec_problems(opts[k], f"{where}.{k}")
    return problems


def build_scorer(spec: dict[str, Any] | str) -> Scorer:
    """Build a scorer from its spec (``{"type": "pep8"}``, ``{"type": "regex", "patterns": [...]}``, ...)."""
    problems = spec_problems(spec)
    if problems:
        raise ScorerError("\n".join(problems))
    if isinstance(spec, str):
        spec = {"type": spec}
    opts = {k: v for k, v in spec.items() if k != "type"}
    return scorer_class(spec["type"])(**opts)


_CACHE: dict[str, Scorer] = {}


def cached_scorer(spec: dict[str, Any] | str) -> Scorer:
    """The same scorer object for the same spec within a process (models load once, e.g. for generation)."""
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = build_scorer(spec)
    return _CACHE[key]


__all__ = ["Doc", "REGISTRY", "Scorer", "ScorerError", "build_scorer", "cached_scorer", "spec_problems"]
