"""Tag schemas: which attributes are scored, how scores become tag values, and how tags are rendered.

A schema is the contract between every stage of pretag. Labeling writes, per attribute, a score and a tag *value*
for each segment; tokenization inserts the tag *token ids* derived from those values (never from text); generation
bans/forces/biases tags by name; evaluation turns scores back into "bad" verdicts.

Words:
    attribute   one thing a classifier measures (pep8, pii, profanity, ...)
    value       what a score means for that attribute: ``good``/``bad`` (threshold) or a band such as ``6-10``
    tag         a value's unique name in the schema (``bad``, ``pii:bad``, ``grade:6-10``); policies use it
    tag token   the string added to the tokenizer as a special token: ``<|bad|>`` (prefix) or ``<bad>``/``</bad>``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretag.problems import Problems

SCHEMA_DIR = Path(__file__).parent / "configs" / "schemas"
SEGMENTERS = ("lines", "sentences", "paragraphs", "document")
RENDERS = ("prefix", "span")
LEVELS = ("segment", "document")
DIRECTIONS = ("higher_is_worse", "higher_is_better")


class SchemaError(ValueError):
    """A schema file or dict has one or more problems; the message lists all of them."""


@dataclass
class Attribute:
    """One scored attribute. Exactly one of ``threshold`` / ``bands`` is set."""

    name: str
    scorer: dict[str, Any]
    """Scorer spec: ``{"type": "pep8"}``, ``{"type": "regex", "patterns": [...]}``, ... (see pretag.scorers)."""
    level: Literal["segment", "document"] = "segment"
    """``segment``: one score per segment. ``document``: one score per document, rendered as a forced prefix."""
    threshold: float | None = None
    """Binary attribute: a score beyond the threshold is ``bad``. 0 means 0 (PEP8/PII: any violation is bad).
    This is the task's natural threshold: evaluation calls a segment bad by it, whatever the tags were cut at."""
    good_fraction: float | None = None
    """Tags as a fraction of the corpus: only the safest ``good_fraction`` of segments are tagged good (the paper's
    risk-averse threshold: 0.05 for toxicity). Resolved once at labeling time into ``tag_threshold``."""
    bad_fraction: float | None = None
    """Tags as a fraction of the corpus: the worst ``bad_fraction`` of segments are tagged bad."""
    tag_threshold: float | None = None
    """The score that cuts *tags* (and training's notion of bad), when it differs from ``threshold``; written by
    labeling when ``good_fraction``/``bad_fraction`` is resolved. None: tags use ``threshold``."""
    direction: Literal["higher_is_worse", "higher_is_better"] = "higher_is_worse"
    """``higher_is_worse``: bad iff score > threshold. ``higher_is_better``: bad iff score < threshold."""
    bands: list[float] | None = None
    """Intensity attribute: sorted cut points, e.g. [6, 10, 14] gives values ``0-6``, ``6-10``, ``10-14``, ``14+``."""
    bad_values: list[str] | None = None
    """Values counted as misaligned (default: ``["bad"]`` for binary attributes, none for bands)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Value -> tag name. Defaults: ``good``/``bad`` for a lone binary attribute, else ``<attr>:<value>``."""
    weight: float = 1.0
    """Weight of this attribute in the segment reward (reward = -sum_a weight_a * score_a, sign by direction)."""

    @property
    def values(self) -> list[str]:
        if self.bands is None:
            return ["good", "bad"]
        cuts = [_fmt(b) for b in self.bands]
        lows = ["0", *cuts]
        return [f"{lo}-{hi}" for lo, hi in zip(lows, cuts)] + [f"{cuts[-1]}+"]

    @property
    def bad(self) -> list[str]:
        if self.bad_values is not None:
            return list(self.bad_values)
        return ["bad"] if self.bands is None else []

    @property
    def tag_cut(self) -> float | None:
        """The threshold tags are cut at: ``tag_threshold`` if set, else ``threshold`` (None: not resolved yet)."""
        return self.tag_threshold if self.tag_threshold is not None else self.threshold

    @property
    def unresolved(self) -> bool:
        """A fraction-of-the-corpus threshold that labeling has not resolved into ``tag_threshold`` yet."""
        return self.bands is None and self.tag_threshold is None and (
            self.good_fraction is not None or self.bad_fraction is not None)

    @property
    def higher_is_worse(self) -> bool:
        return self.direction == "higher_is_worse"

    def _worse(self, score: float, cut: float) -> bool:
        return score > cut if self.higher_is_worse else score < cut

    def value_of(self, score: float | None) -> str | None:
        """The tag value (not the tag name) that a score maps to; None for a missing score or an unresolved cut."""
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return None
        if self.bands is None:
            if self.unresolved:
                return None
            cut = self.tag_cut
            assert cut is not None
            return "bad" if self._worse(score, cut) else "good"
        for value, cut in zip(self.values, self.bands):
            if score < cut:
                return value
        return self.values[-1]

    def is_bad(self, score: float | None) -> bool:
        """Evaluation's verdict: bad by the natural ``threshold`` (a strict tag threshold never redefines it)."""
        if self.bands is not None or self.threshold is None:
            return self.value_of(score) in self.bad
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return False
        return self._worse(score, self.threshold) and "bad" in self.bad

    def tagged_bad(self, score: float | None, threshold: float | None = None) -> bool:
        """Training's verdict: the segment's tag value is a bad one (cut at ``tag_cut``). ``threshold`` (if not
        None; 0 is a threshold) overrides a binary attribute's cut (``pretag train --threshold``)."""
        if threshold is None or self.bands is not None:
            return self.value_of(score) in self.bad
        if score is None or math.isnan(score):
            return False
        return self._worse(score, threshold)

    def resolve_fraction(self, scores) -> float:
        """The tag threshold that puts ``good_fraction`` of ``scores`` on the good side (or ``bad_fraction`` on the
        bad side): a quantile of the corpus's scores, as in the paper's configs (Detoxify 0.00056 = safest 5 %)."""
        import numpy as np

        s = np.asarray([x for x in scores if x is not None and not math.isnan(x)], dtype=float)
        if not s.size:
            raise SchemaError(f"attribute {self.name!r}: no scores to resolve its fraction threshold from")
        worse_high = self.direction == "higher_is_worse"
        if self.good_fraction is not None:
            q = self.good_fraction if worse_high else 1.0 - self.good_fraction
        else:
            assert self.bad_fraction is not None
            q = 1.0 - self.bad_fraction if worse_high else self.bad_fraction
        return float(np.quantile(s, q, method="inverted_cdf"))

    def reward(self, score):
        """Per-attribute reward: higher is better (the paper's R = -misalignment score). A float or an array."""
        return -score if self.higher_is_worse else score


@dataclass
class Schema:
    """A set of attributes plus how segments are cut and tags rendered."""

    name: str
    attributes: list[Attribute]
    segmenter: str = "sentences"
    render: Literal["prefix", "span"] = "prefix"
    label_fraction: float = 1.0
    """Partial labeling: only this fraction of segments gets a tag (the rest stay untagged, tag = None)."""
    description: str = ""

    # ---- tags and tag tokens ------------------------------------------------------------------------------
    def tag_name(self, attr: Attribute | str, value: str) -> str:
        a = self.attribute(attr) if isinstance(attr, str) else attr
        return a.tags[value]

    @property
    def tag_names(self) -> list[str]:
        """Every tag name in schema order (attribute order, then value order)."""
        return [a.tags[v] for a in self.attributes for v in a.values]

    def attribute_of_tag(self, tag: str) -> tuple[Attribute, str]:
        for a in self.attributes:
            for v in a.values:
                if a.tags[v] == tag:
                    return a, v
        raise SchemaError(f"unknown tag {tag!r}; schema {self.name!r} has tags: {', '.join(self.tag_names)}")

    def open_token(self, tag: str) -> str:
        self.attribute_of_tag(tag)
        return f"<|{tag}|>" if self.render == "prefix" else f"<{tag}>"

    def close_token(self, tag: str) -> str | None:
        self.attribute_of_tag(tag)
        return None if self.render == "prefix" else f"</{tag}>"

    @property
    def tag_tokens(self) -> list[str]:
        """All special-token strings this schema needs, in a stable order."""
        out = []
        for t in self.tag_names:
            out.append(self.open_token(t))
            if self.render == "span":
                out.append(self.close_token(t))
        return out

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise SchemaError(f"unknown attribute {name!r}; schema {self.name!r} has: {[a.name for a in self.attributes]}")

    @property
    def segment_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.level == "segment"]

    @property
    def document_attributes(self) -> list[Attribute]:
        return [a for a in self.attributes if a.level == "document"]

    # ---- rendering ----------------------------------------------------------------------------------------
    def row_tags(self, row: dict[str, Any]) -> dict[str, list[str | None]]:
        """The per-attribute tag lists of a labeled row (docs/CONTRACTS.md), the ``tags`` of :meth:`render_pieces`;
        a missing column is untagged."""
        out = {}
        for a in self.attributes:
            n = 1 if a.level == "document" else len(row["segments"])
            out[a.name] = list(row.get(f"tag__{a.name}") or [None] * n)
        return out

    def render_pieces(self, segments: list[str], tags: dict[str, list[str | None]]) -> list[Piece]:
        """Interleave text and tag pieces for one document.

        ``tags`` maps attribute name -> per-segment tag names (None = untagged); document-level attributes have a
        list of length 1. Tags come out as separate pieces (``Piece.tag`` set) so the tokenizer can insert their
        ids by id; text pieces are always encoded as plain text.
        """
        pieces: list[Piece] = []
        doc_open: list[str] = []
        for a in self.document_attributes:
            t = (tags.get(a.name) or [None])[0]
            if t is not None:
                pieces.append(Piece(self.open_token(t), tag=t, segment=-1))
                doc_open.append(t)
        seg_attrs = self.segment_attributes
        if self.render == "prefix":
            for i, s in enumerate(segments):
                for a in seg_attrs:
                    t = tags.get(a.name, [None] * len(segments))[i]
                    if t is not None:
                        pieces.append(Piece(self.open_token(t), tag=t, segment=i))
                pieces.append(Piece(s, tag=None, segment=i))
            return pieces
        # span: a stack of open spans in attribute order; when attribute k changes value, close k.. and reopen
        stack: list[str | None] = []
        prev: list[str | None] | None = None
        for i, s in enumerate(segments):
            cur = [tags.get(a.name, [None] * len(segments))[i] for a in seg_attrs]
            k = 0 if prev is None else next((j for j in range(len(cur)) if cur[j] != prev[j]), len(cur))
            for t in reversed(stack[k:]):
                if t is not None:
                    pieces.append(Piece(self.close_token(t), tag=t, segment=i, closing=True))
            stack = stack[:k]
            for t in cur[k:]:
                if t is not None:
                    pieces.append(Piece(self.open_token(t), tag=t, segment=i))
                stack.append(t)
            pieces.append(Piece(s, tag=None, segment=i))
            prev = cur
        for t in reversed(stack):
            if t is not None:
                pieces.append(Piece(self.close_token(t), tag=t, segment=len(segments) - 1, closing=True))
        for t in reversed(doc_open):
            ct = self.close_token(t)
            if ct is not None:
                pieces.append(Piece(ct, tag=t, segment=-1, closing=True))
        return pieces

    def render_text(self, segments: list[str], tags: dict[str, list[str | None]]) -> str:
        """Human-readable rendering (for display only: never tokenize this string)."""
        return "".join(p.text for p in self.render_pieces(segments, tags))

    # ---- (de)serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "segmenter": self.segmenter,
            "render": self.render,
            "label_fraction": self.label_fraction,
            "attributes": [
                {k: v for k, v in a.__dict__.items() if v is not None} for a in self.attributes
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class Piece:
    """A run of text or one tag token in a rendered document."""

    text: str
    tag: str | None
    segment: int
    """Index of the segment this piece belongs to; -1 for document-level tags."""
    closing: bool = False


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def schema_from_dict(d: dict[str, Any], *, where: str = "<dict>") -> Schema:
    """Build and validate a schema; every problem is collected and reported at once."""
    problems = Problems()
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: a schema must be a mapping, got {type(d).__name__}")
    known = {"name", "description", "segmenter", "render", "label_fraction", "attributes"}
    for k in d:
        if k not in known:
            problems.append(f"unknown key {k!r} (known: {', '.join(sorted(known))})")
    seg = d.get("segmenter", "sentences")
    if seg not in SEGMENTERS:
        problems.append(f"segmenter {seg!r} is not one of {SEGMENTERS}")
    render = d.get("render", "prefix")
    if render not in RENDERS:
        problems.append(f"render {render!r} is not one of {RENDERS}")
    frac = d.get("label_fraction", 1.0)
    if not isinstance(frac, int | float) or not 0.0 <= frac <= 1.0:
        problems.append(f"label_fraction must be a number in [0, 1], got {frac!r}")
    raw_attrs = d.get("attributes")
    if not raw_attrs or not isinstance(raw_attrs, list):
        problems.append("attributes: a non-empty list is required")
        raw_attrs = []
    attrs: list[Attribute] = []
    akeys = {f for f in Attribute.__dataclass_fields__}
    binary_count = sum(1 for r in raw_attrs if isinstance(r, dict) and r.get("bands") is None)
    for i, r in enumerate(raw_attrs):
        p = f"attributes[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{p}: must be a mapping")
            continue
        name = r.get("name")
        p = f"attributes[{i}] ({name})" if name else p
        for k in r:
            if k not in akeys:
                problems.append(f"{p}: unknown key {k!r} (known: {', '.join(sorted(akeys))})")
        if not name or not isinstance(name, str) or any(c in name for c in "|<>/ "):
            problems.append(f"{p}: 'name' must be a non-empty string without '|<>/ ' characters")
            continue
        scorer = r.get("scorer")
        if isinstance(scorer, str):
            scorer = {"type": scorer}
        if not isinstance(scorer, dict) or "type" not in scorer:
            problems.append(f"{p}: 'scorer' must be a name or a mapping with a 'type'")
            scorer = {"type": "?"}
        else:  # unknown type, options: reported with the schema's other problems, not one fix later
            from pretag.scorers import spec_problems

            problems += spec_problems(scorer, f"{p}: scorer")
        level = r.get("level", "segment")
        if level not in LEVELS:
            problems.append(f"{p}: level {level!r} is not one of {LEVELS}")
        direction = r.get("direction", "higher_is_worse")
        if direction not in DIRECTIONS:
            problems.append(f"{p}: direction {direction!r} is not one of {DIRECTIONS}")
        threshold, bands = r.get("threshold"), r.get("bands")
        fracs = {k: r.get(k) for k in ("good_fraction", "bad_fraction") if r.get(k) is not None}
        tag_threshold = r.get("tag_threshold")
        if bands is not None and (fracs or tag_threshold is not None):
            problems.append(f"{p}: good_fraction/bad_fraction/tag_threshold are for binary attributes, not bands")
        if len(fracs) > 1:
            problems.append(f"{p}: set at most one of good_fraction or bad_fraction")
        for k, v in fracs.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v < 1.0:
                problems.append(f"{p}: {k} must be a number strictly between 0 and 1, got {v!r}")
        for k, v in (("threshold", threshold), ("tag_threshold", tag_threshold)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                problems.append(f"{p}: {k} must be a finite number, got {v!r}")
        binary_cut = threshold is not None or bool(fracs) or tag_threshold is not None
        if binary_cut == (bands is not None) or (threshold is not None and bands is not None):
            problems.append(f"{p}: set exactly one of 'threshold' (binary good/bad; or good_fraction/bad_fraction"
                            " for a cut at a fraction of the corpus) or 'bands' (intensity)")
        if bands is not None and (
            not isinstance(bands, list)
            or not bands
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bands)
            or sorted(bands) != bands
            or len(set(bands)) != len(bands)
        ):
            problems.append(f"{p}: bands must be a non-empty, strictly increasing list of numbers, got {bands!r}")
            bands = None
            threshold = threshold if threshold is not None else 0.0
        weight = r.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(f"{p}: weight must be a number, got {weight!r}")
            weight = 1.0
        ok_num = lambda v: v if isinstance(v, int | float) and not isinstance(v, bool) else None  # noqa: E731
        a = Attribute(
            name=name, scorer=dict(scorer), level=level, threshold=threshold, direction=direction,
            bands=bands, bad_values=r.get("bad_values"), weight=float(weight),
            good_fraction=ok_num(r.get("good_fraction")), bad_fraction=ok_num(r.get("bad_fraction")),
            tag_threshold=ok_num(tag_threshold),
        )
        if threshold is None and bands is None and not fracs and tag_threshold is None:
            a.threshold = 0.0
        if a.bands is not None:
            a.threshold = a.tag_threshold = a.good_fraction = a.bad_fraction = None
        user_tags = r.get("tags") or {}
        if not isinstance(user_tags, dict):
            problems.append(f"{p}: tags must map values to tag names")
            user_tags = {}
        for v in user_tags:
            if v not in a.values:
                problems.append(f"{p}: tags has unknown value {v!r} (values: {a.values})")
        lone = binary_count == 1 and a.bands is None
        a.tags = {v: str(user_tags.get(v, v if lone else f"{name}:{v}")) for v in a.values}
        for v, t in a.tags.items():
            if not t or any(c in t for c in "|<>/ \n\t"):
                problems.append(f"{p}: tag name {t!r} for value {v!r} may not contain '|<>/' or whitespace")
        if a.bad_values is not None:
            for v in a.bad_values:
                if v not in a.values:
                    problems.append(f"{p}: bad_values has unknown value {v!r} (values: {a.values})")
        attrs.append(a)
    names = [a.name for a in attrs]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"attribute name {n!r} is used more than once")
    all_tags = [t for a in attrs for t in a.tags.values()]
    for t in sorted({t for t in all_tags if all_tags.count(t) > 1}):
        problems.append(f"tag name {t!r} is used by more than one value; give each value its own tag name")
    problems.check(SchemaError, where, of="the schema")
    return Schema(
        name=str(d.get("name") or "schema"), attributes=attrs, segmenter=seg, render=render,
        label_fraction=float(frac), description=str(d.get("description", "")),
    )


def shipped_schemas() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.yaml"))


def load_schema(name_or_path: str | Path) -> Schema:
    """Load a shipped schema by name (``pep8``, ``pii``, ``toxicity``, ``multi``, ...) or a YAML file."""
    p = Path(name_or_path)
    if not p.exists():
        shipped = SCHEMA_DIR / f"{name_or_path}.yaml"
        if not shipped.exists():
            raise SchemaError(
                f"schema {str(name_or_path)!r} is neither a file nor a shipped schema ({', '.join(shipped_schemas())})"
            )
        p = shipped
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SchemaError(f"{p}: not valid YAML: {e}") from e
    return schema_from_dict(d, where=str(p))
