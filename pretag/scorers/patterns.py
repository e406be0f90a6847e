"""User-defined scorers: regular expressions, keyword lists, a value already in the data, a Python callable."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path

from pretag.scorers import Doc, Scorer, ScorerError

_NORMALIZE = ("count", "per_char", "any")


def _normalize(n: int, text: str, how: str) -> float:
    if how == "any":
        return float(n > 0)
    if how == "per_char":
        return n / max(len(text), 1)
    return float(n)


class RegexScorer(Scorer):
    """Matches of user regular expressions (Python ``re`` syntax)."""

    name = "regex"
    meaning = "number of matches of the patterns (or per character, or 0/1); higher is worse"
    options = {
        "patterns": "list of regular expressions (required)",
        "normalize": "count (default) | per_char | any",
        "ignore_case": "match case-insensitively (default false)",
    }
    required = ("patterns",)

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        pats = opts["patterns"]
        if isinstance(pats, str):
            pats = [pats]
        self.normalize = opts.get("normalize", "count")
        problems = []
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
            problems.append(f"{self.name}: 'patterns' must be a non-empty list of strings, got {pats!r}")
            pats = []
        if self.normalize not in _NORMALIZE:
            problems.append(f"{self.name}: normalize must be one of {_NORMALIZE}, got {self.normalize!r}")
        flags = re.IGNORECASE if opts.get("ignore_case") else 0
        self.regexes = []
        for p in self._to_regexes(pats):
            try:
                self.regexes.append(re.compile(p, flags))
            except re.error as e:
                problems.append(f"{self.name}: pattern {p!r} is not a valid regular expression: {e}")
        if problems:
            raise ScorerError("\n".join(problems))

    def _to_regexes(self, pats: list[str]) -> list[str]:
        return pats

    def score_texts(self, texts: list[str]) -> list[float]:
        return [_normalize(sum(len(r.findall(t)) for r in self.regexes), t, self.normalize) for t in texts]


class KeywordsScorer(RegexScorer):
    """Occurrences of whole words or phrases from a list (case-insensitive by default)."""

    name = "keywords"
    meaning = "number of keyword occurrences (or per character, or 0/1); higher is worse"
    options = {
        "words": "list of words or phrases (required)",
        "normalize": "count (default) | per_char | any",
        "ignore_case": "match case-insensitively (default true)",
    }
    required = ("words",)

    def __init__(self, **opts) -> None:
        words = opts.get("words")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise ScorerError(f"keywords: 'words' must be a non-empty list of strings, got {words!r}")
        # one alternation, longest first, on word boundaries: "ass" must not fire inside "class"
        alt = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        super().__init__(patterns=[rf"(?<!\w)(?:{alt})(?!\w)"], normalize=opts.get("normalize", "count"),
                         ignore_case=opts.get("ignore_case", True))
        self.opts = opts


class FieldScorer(Scorer):
    """A value already in the data, e.g. the human ``offensive`` label of a fortune: the same value for every
    segment of the document (use it with ``level: document``). Booleans become 0/1; a missing field is None
    (not scored) unless ``default`` is given."""

    name = "field"
    meaning = "a numeric document field (booleans as 0/1); direction as the data defines it"
    options = {"field": "name of the document field (required)", "default": "value when the field is missing"}
    required = ("field",)

    def score_docs(self, docs: list[Doc]) -> list[list[float | None]]:
        key = self.opts["field"]
        out = []
        for d in docs:
            v = d.fields.get(key, self.opts.get("default"))
            if v is None:
                score = None
            else:
                try:
                    score = float(v)
                except (TypeError, ValueError):
                    raise ScorerError(f"field: value {v!r} of field {key!r} is not a number") from None
                if math.isnan(score):
                    score = None
            out.append([score] * len(d.segments))
        return out


class PythonScorer(Scorer):
    """A user function ``module:function`` (or ``path/to/file.py:function``): ``list[str] -> list[float]``."""

    name = "python"
    meaning = "whatever the user's function returns; declare the direction in the schema"
    options = {"function": "'module:function' or 'file.py:function' taking list[str], returning list[float]"}
    required = ("function",)

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        self.fn = load_callable(opts["function"])

    def score_texts(self, texts: list[str]) -> list[float]:
        out = list(self.fn(list(texts)))
        if len(out) != len(texts):
            raise ScorerError(f"python: {self.opts['function']} returned {len(out)} scores for {len(texts)} texts")
        return [None if v is None else float(v) for v in out]

    def __getstate__(self):
        return {**self.__dict__, "fn": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.fn = load_callable(self.opts["function"])


def load_callable(ref: str):
    if not isinstance(ref, str) or ":" not in ref:
        raise ScorerError(f"python: function must look like 'module:function' or 'file.py:function', got {ref!r}")
    mod_name, _, attr = ref.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise ScorerError(f"python: file {mod_name!r} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ScorerError(f"python: cannot import {mod_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScorerError(f"python: {mod_name!r} has no callable {attr!r}")
    return fn
