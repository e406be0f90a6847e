"""``cascade``: a cheap high-recall scorer first, the expensive one only on what the cheap one flags.

Labeling a web-scale corpus with a neural classifier is the costly step; most segments are obviously fine. A
keyword list or a linear model flags candidates (``cheap`` score > ``flag_above``) and only those go to the
``expensive`` scorer; the others get ``default`` (0 unless set: "not flagged = clean"). ``stats`` counts how many
segments each stage saw, so the saving is visible in the summary.
"""

from __future__ import annotations

from pretag.scorers import Doc, Scorer, build_scorer


class CascadeScorer(Scorer):
    name = "cascade"
    meaning = "the expensive scorer's value on segments the cheap one flags, `default` elsewhere"
    options = {
        "cheap": "scorer spec run on every segment (required)",
        "expensive": "scorer spec run on flagged segments only (required)",
        "flag_above": "cheap score above which a segment is flagged (default 0)",
        "default": "score of segments that are not flagged (default 0.0)",
    }
    required = ("cheap", "expensive")

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        self.cheap = build_scorer(opts["cheap"])
        self.expensive = build_scorer(opts["expensive"])
        self.flag_above = float(opts.get("flag_above", 0.0))
        self.default = float(opts.get("default", 0.0))
        self.stats = {"segments": 0, "flagged": 0}

    def score_docs(self, docs: list[Doc]) -> list[list[float | None]]:
        cheap = self.cheap.score_docs(docs)
        flagged_docs = []
        for d, scores in zip(docs, cheap):
            keep = [s is not None and s > self.flag_above for s in scores]
            self.stats["segments"] += sum(s is not None for s in scores)
            self.stats["flagged"] += sum(keep)
            flagged_docs.append(Doc(d.text, d.segments, d.fields, keep))
        expensive = self.expensive.score_docs(flagged_docs)
        out = []
        for cs, es in zip(cheap, expensive):
            out.append([None if c is None else (e if c > self.flag_above else self.default) for c, e in zip(cs, es)])
        return out
