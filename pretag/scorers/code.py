"""The paper's PEP8 scorer: pycodestyle violations per character, checked in whole-file context.

Many PEP8 rules only make sense with the surrounding file (E302 "expected 2 blank lines", E128 continuation-line
indentation, W391 blank line at end of file), so the whole document is checked once and each violation is
charged to the physical line pycodestyle reports; a segment's score is the violations on its lines divided by
its length in characters. With the ``lines`` segmenter this is exactly the paper's per-line score; with coarser
segments the violations of their lines add up. Higher is worse; 0 means clean.
"""

from __future__ import annotations

import bisect
import copy
import logging

import pycodestyle

from pretag.scorers import Doc, Scorer
from pretag.segment import lines as segment_lines

log = logging.getLogger(__name__)


class _CountingReport(pycodestyle.BaseReport):
    """Collects (line number -> number of violations) instead of printing."""

    def __init__(self, options) -> None:
        super().__init__(options)
        self.per_line: dict[int, int] = {}

    def error(self, line_number, offset, text, check):
        code = super().error(line_number, offset, text, check)
        if code is not None:  # not ignored by the options
            self.per_line[line_number] = self.per_line.get(line_number, 0) + 1
        return code


def _crashed_check(exc: BaseException, options) -> str | None:
    """The pycodestyle check whose frame raised ``exc`` (innermost first), or None if none of them did."""
    names = {c[0] for kind in ("logical_checks", "physical_checks", "ast_checks") for c in getattr(options, kind)}
    tb, found = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name in names:
            found = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return found


class Pep8Scorer(Scorer):
    name = "pep8"
    meaning = "pycodestyle violations per character (whole-file context); higher is worse, 0 = clean"
    options = {
        "max_line_length": "maximum line length (pycodestyle default 79)",
        "select": "list of error codes to check (default: pycodestyle's defaults)",
        "ignore": "list of error codes to ignore (default: pycodestyle's default ignore list)",
    }

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        kw = {"quiet": True}
        for k in ("max_line_length", "select", "ignore"):
            if k in opts:
                kw[k] = opts[k]
        self._options = pycodestyle.StyleGuide(**kw).options

    def violations(self, text: str) -> dict[int, int]:
        """1-based physical line number -> number of violations, for a whole file.

        pycodestyle's own checks can crash on malformed code (``continued_indentation`` raises IndexError on some
        unbalanced brackets, which a small model's samples produce). Then the crashing check is left out for this
        file and the file is checked again, so one broken sample costs that check's findings on that file, never
        the whole evaluation; ``self.crashes`` counts how often it happened."""
        # the same physical lines as the ``lines`` segmenter (only "\n" ends a line), so line numbers agree
        lines = list(segment_lines(text))
        options = self._options
        while True:
            report = _CountingReport(options)
            try:
                pycodestyle.Checker(lines=lines, options=options, report=report).check_all()
                return report.per_line
            except Exception as e:  # noqa: BLE001  (a bug in a third-party check on this input)
                name = _crashed_check(e, options)
                if name is None:
                    raise
                self.crashes = getattr(self, "crashes", 0) + 1
                log.debug("pycodestyle check %s crashed on a %d-line file (%r); checking without it",
                          name, len(lines), e)
                options = copy.copy(options)
                for kind in ("logical_checks", "physical_checks", "ast_checks"):
                    setattr(options, kind, [c for c in getattr(options, kind) if c[0] != name])

    def score_docs(self, docs: list[Doc]) -> list[list[float | None]]:
        out = []
        for d in docs:
            per_line = self.violations(d.text) if d.text else {}
            # line number (1-based) at which each segment starts
            starts, line = [], 1
            for s in d.segments:
                starts.append(line)
                line += s.count("\n")
            counts = [0] * len(d.segments)
            for ln, n in per_line.items():
                i = max(0, bisect.bisect_right(starts, ln) - 1)  # errors past the end go to the last segment
                if counts:
                    counts[i] += n
            out.append([c / max(len(s), 1) for c, s in zip(counts, d.segments)])
        return out
