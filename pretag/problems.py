"""Collect every problem, then raise once: the one shape of pretag's validation errors.

Schemas, policies, scorer specs and configs are checked in full before anything runs, and the error lists all that
is wrong (``N problem(s) ...:`` then one ``  - `` line each), so a user fixes a file in one pass, not one error at a
time. This module imports nothing from pretag: every floor may use it.
"""

from __future__ import annotations


class Problems(list[str]):
    """A list of problem sentences that can raise itself as one error.

    Examples:
        >>> p = Problems()
        >>> p.append("render 'x' is not one of ('prefix', 'span')")
        >>> p.message("pep8.yaml", of="the schema")
        "pep8.yaml: 1 problem(s) in the schema:\\n  - render 'x' is not one of ('prefix', 'span')"
        >>> Problems().check(ValueError, "anything")  # nothing found: no error
    """

    def message(self, where: str | None = None, *, of: str = "", kind: str = "problem") -> str:
        """``[where: ]N kind(s)[ in of]:`` then each problem on its own ``  - `` line."""
        head = f"{len(self)} {kind}(s)" + (f" in {of}" if of else "")
        head = f"{where}: {head}" if where else head
        return f"{head}:\n  - " + "\n  - ".join(self)

    def check(self, error: type[Exception] = ValueError, where: str | None = None, *, of: str = "",
              kind: str = "problem") -> None:
        """Raise ``error`` with :meth:`message` if any problem was collected."""
        if self:
            raise error(self.message(where, of=of, kind=kind))
