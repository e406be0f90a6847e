"""The terminal view of a monitored generation: tokens coloured by temptation, the summary, alarms, classifiers.

Plain strings with ANSI colour codes, so the CLI (``pretag generate --show-temptation``) and the demo print them;
nothing here touches a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretag.generate import SequenceResult


def _colour(p: float) -> str:
    if p >= 0.5:
        return "\x1b[1;31m"  # bold red
    if p >= 0.2:
        return "\x1b[31m"
    if p >= 0.05:
        return "\x1b[33m"
    return "\x1b[32m"


def render_terminal(seq: SequenceResult, colour: bool = True) -> str:
    """The generation with each token coloured by its highest temptation toward a banned tag (green < 0.05,
    yellow < 0.2, red < 0.5, bold red >= 0.5); tag tokens are shown in cyan."""
    parts = []
    for t in seq.tokens:
        if not colour:
            parts.append(t.text)
        elif t.is_tag:
            parts.append(f"\x1b[36m{t.text}\x1b[0m")
        else:
            parts.append(f"{_colour(t.max_banned_temptation)}{t.text}\x1b[0m")
    return "".join(parts)


def format_trace(seq: SequenceResult, colour: bool = True) -> str:
    """The terminal view of one monitored generation: coloured tokens, per-tag temptation summary, alarms and the
    output classifiers' verdict (``pretag generate --show-temptation`` and the demo)."""
    lines = [seq.prompt + render_terminal(seq, colour=colour)]
    if seq.summary:
        thresholds = ", ".join(next(iter(seq.summary.values()))["first_above"])
        lines.append(f"temptation (max / mean / first step above {thresholds}):")
        for tag, s in seq.summary.items():
            firsts = ", ".join(str(v) for v in s["first_above"].values())
            lines.append(f"  {tag:>16}  {s['max']:.3f} / {s['mean']:.3f}  first above: {firsts}")
    asked = [t for t in seq.tokens if t.verdict]
    banned = list(dict.fromkeys(b for t in asked for b in t.banned if b in t.verdict))
    if banned:
        lines.append(f"verdict at the {len(asked)} tag positions, the banned tag's share of its attribute's tags "
                     "(max / mean):")
        for tag in banned:
            vals = [t.verdict[tag] for t in asked if tag in t.verdict]
            lines.append(f"  {tag:>16}  {max(vals):.3f} / {sum(vals) / len(vals):.3f}")
    lines += [f"  ALARM {a.rule} ({a.action}) at token {a.step} {a.token!r}" for a in seq.alarms]
    if seq.classifiers:
        if "error" in seq.classifiers:
            lines.append(f"  output classifiers: {seq.classifiers['error']}")
        else:
            lines.append("  output classifiers, bad fraction of generated segments: " + ", ".join(
                f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in seq.classifiers["bad_fraction"].items()))
    return "\n".join(lines)
