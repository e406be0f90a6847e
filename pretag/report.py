"""Tables, plots and the HTML report: how results are shown, shared by ``pretag eval``, ``experiment`` and ``demo``.

Rows are built from typed results (``pretag.results.EvalResult``) by attribute, so a field renamed in the results
fails here (AttributeError) instead of printing "–"; a "–" means the metric was not measured (an optional section
is None) or is undefined (a NaN AUROC, saved as null). Plots and the report write files only (matplotlib's Agg).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretag.results import EvalResult, PerSample

log = logging.getLogger(__name__)


# ---- results table ----------------------------------------------------------------------------------------
def result_row(run: str, result: EvalResult, train_info: dict | None = None) -> dict[str, Any]:
    """One flat row of the results table from an ``evaluate_model`` result (intervals as _lo/_hi columns)."""
    row: dict[str, Any] = {"run": run}
    info = train_info or {}
    row["tokens"] = info.get("tokens")
    row["train_wall_s"] = info.get("wall_s")
    row["eval_wall_s"] = result.wall_s

    def est(prefix: str, e) -> None:
        row[prefix] = None if e is None else e.value
        row[prefix + "_lo"] = None if e is None else e.lo
        row[prefix + "_hi"] = None if e is None else e.hi

    def of(section: dict | None, attr: str):
        return None if section is None else section.get(attr)

    redteam = None if result.redteam is None else result.redteam.misalignment
    for attr, m in result.misalignment.items():
        est(f"{attr}.score", m.score)
        row[f"{attr}.expected_max"] = m.expected_max
        est(f"{attr}.frac_any_bad", m.frac_samples_any_bad)
        est(f"{attr}.frac_bad_segments", m.frac_bad_segments)
        rt = of(redteam, attr)
        row[f"{attr}.redteam_score"] = None if rt is None or rt.score is None else rt.score.value
        for col, section in (("selftag_auroc", result.self_tagging), ("temptation_auroc", result.temptation),
                             ("warning_auroc", result.warning_light)):
            t = of(section, attr)
            row[f"{attr}.{col}"] = None if t is None else t.auroc
            if col == "temptation_auroc":  # the same steps read as P(bad) / P(the attribute's tags)
                row[f"{attr}.temptation_verdict_auroc"] = None if t is None else t.auroc_verdict
            if col == "warning_auroc" and t is not None and t.auroc_lo is not None:
                row[f"{attr}.{col}_lo"], row[f"{attr}.{col}_hi"] = t.auroc_lo, t.auroc_hi
            if col == "warning_auroc" and t is not None and t.auroc_first is not None:
                row[f"{attr}.warning_first_auroc"] = t.auroc_first
                row[f"{attr}.warning_first_auroc_lo"] = t.auroc_first_lo
                row[f"{attr}.warning_first_auroc_hi"] = t.auroc_first_hi
            if col == "warning_auroc" and t is not None and t.auroc_verdict is not None:
                row[f"{attr}.warning_verdict_auroc"] = t.auroc_verdict
                row[f"{attr}.warning_verdict_auroc_lo"] = t.auroc_verdict_lo
                row[f"{attr}.warning_verdict_auroc_hi"] = t.auroc_verdict_hi
    est("kl", result.kl)
    k = result.kl  # KL to what the sampler draws (after the policy's ban and guidance); tag-trained models only
    row["kl_sampler"] = None if k is None else k.sampler
    row["kl_sampler_lo"], row["kl_sampler_hi"] = (None, None) if k is None else (k.sampler_lo, k.sampler_hi)
    row["loss"] = None if result.loss is None else result.loss.untagged.loss
    row["loss_tagged"] = None if result.loss is None else result.loss.tagged.loss
    row["loss_joint"] = None if result.loss is None or result.loss.joint is None else result.loss.joint.loss
    for n in (1, 2, 3):
        row[f"distinct_{n}"] = getattr(result.diversity, f"distinct_{n}")
    return row


def _per_sample(result: EvalResult | Mapping) -> dict[str, PerSample | None]:
    """Each attribute's per-sample numbers: of an EvalResult, or of a bare ``{"misalignment": {attr:
    {"per_sample": ...}}}`` mapping (what the ratios need, and all they need)."""
    if isinstance(result, EvalResult):
        return {a: m.per_sample for a, m in result.misalignment.items()}
    return {a: None if m.get("per_sample") is None else PerSample.from_dict(m["per_sample"], f"misalignment.{a}")
            for a, m in result["misalignment"].items()}


def ratio_columns(baseline: EvalResult | Mapping, result: EvalResult | Mapping) -> dict[str, Any]:
    """``<attr>.mle_ratio``: the baseline's (MLE's) misalignment score ÷ this run's, with a bootstrap interval over
    both runs' samples — the paper's headline figure (≈ 13× on toxicity at its scale). Above 1: this run is better.
    Attributes where higher is better are oriented already (scores are "higher is worse" in the summary); when
    scores can be negative (a signed score such as VADER's compound) the score ratio is left out, and the ratios of
    bad segments and of samples with any bad segment remain."""
    import numpy as np

    from pretag.metrics import pooled_fraction, ratio_ci

    cols: dict[str, Any] = {}
    base = _per_sample(baseline)
    for attr, ps_b in _per_sample(result).items():
        ps_a = base.get(attr)
        if ps_a is None or ps_b is None or not ps_a.score or not ps_b.score:
            continue
        a, b = ps_a.score, ps_b.score
        if min(a) >= 0 and min(b) >= 0:  # a ratio of means needs non-negative scores; a signed score (VADER's
            e = ratio_ci(a, b)           # compound, oriented) has none: read its bad-segment ratio instead
            cols[f"{attr}.mle_ratio"], cols[f"{attr}.mle_ratio_lo"], cols[f"{attr}.mle_ratio_hi"] = e.value, e.lo, e.hi
        if not sum(ps_a.bad_segments) and not sum(ps_b.bad_segments):
            continue  # no bad segment in either (an attribute with bands has no bad value): 0 / 0 is no ratio
        e = ratio_ci(np.stack([ps_a.bad_segments, ps_a.segments], 1),
                     np.stack([ps_b.bad_segments, ps_b.segments], 1), pooled_fraction)
        cols[f"{attr}.mle_ratio_bad_segments"] = e.value
        cols[f"{attr}.mle_ratio_bad_segments_lo"], cols[f"{attr}.mle_ratio_bad_segments_hi"] = e.lo, e.hi
        if ps_a.any_bad and ps_b.any_bad:
            e = ratio_ci(ps_a.any_bad, ps_b.any_bad)
            cols[f"{attr}.mle_ratio_any_bad"] = e.value
            cols[f"{attr}.mle_ratio_any_bad_lo"], cols[f"{attr}.mle_ratio_any_bad_hi"] = e.lo, e.hi
    return cols


def temptations(results: Mapping[str, EvalResult], attr: str) -> dict[str, dict[str, list[float]]]:
    """Per run that measured it, the temptation before bad and before good segments of ``attr`` (for the plot)."""
    out = {}
    for run, res in results.items():
        t = None if res.temptation is None else res.temptation.get(attr)
        if t is not None:
            out[run] = {"bad": t.before_bad or [], "good": t.before_good or []}
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cells(row: dict[str, Any], cols: list[str], interval: str) -> list[str]:
    """Each column's value, followed by ``interval`` filled with its ``_lo``/``_hi`` bounds where the row has them."""
    out = []
    for c in cols:
        cell = _fmt(row.get(c))
        if row.get(c + "_lo") is not None:
            cell += interval.format(_fmt(row[c + "_lo"]), _fmt(row[c + "_hi"]))
        out.append(cell)
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table; ``x``, ``x_lo``, ``x_hi`` columns collapse into one ``x [lo, hi]`` cell."""
    if not rows:
        return ""
    cols = [c for c in rows[0] if not c.endswith(("_lo", "_hi"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, cols, " [{}, {}]")) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# ---- plots ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: list[dict[str, Any]], attr: str, path: Path) -> Path:
    """Misalignment score against capability (KL from the reference if measured, else held-out loss), with
    bootstrap intervals: the paper's Fig. 2 view, where down-left is better."""
    plt = _plt()
    use_kl = any(r.get("kl") is not None for r in rows)
    xk = "kl" if use_kl else "loss"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        x, y = r.get(xk), r.get(f"{attr}.score")
        if x is None or y is None:
            continue
        yerr = [[y - r[f"{attr}.score_lo"]], [r[f"{attr}.score_hi"] - y]]
        xerr = [[x - r["kl_lo"]], [r["kl_hi"] - x]] if use_kl else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=r["run"])
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("KL from reference (nats/sample)" if use_kl else "held-out loss (nats/text token)")
    ax.set_ylabel(f"misalignment score ({attr})")
    ax.set_title("misalignment vs capability (lower-left is better)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path, dpi=110)


def _save(plt, fig, path: Path, dpi: int) -> Path:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_training_log(path: Path) -> dict[str, list[float]]:
    """A training CSV log as columns of floats. Reads both a wide log (one column per metric) and the tidy
    ``step,name,value`` log ``pretag train`` writes (pivoted: ``step`` plus one column per name, NaN-filled)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) == {"step", "name", "value"}:
        steps = sorted({int(_float(r["step"])) for r in rows})
        at = {s: i for i, s in enumerate(steps)}
        cols: dict[str, list[float]] = {"step": [float(s) for s in steps]}
        for r in rows:
            col = cols.setdefault(r["name"], [float("nan")] * len(steps))
            col[at[int(_float(r["step"]))]] = _float(r["value"])
        return cols
    cols = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(_float(v))
    return cols


def plot_training_curves(logs: dict[str, Path], path: Path, tokens_per_step: dict[str, int] | None = None) -> Path:
    """Training loss against tokens seen for every run, from each run's CSV log (steps x tokens per step).

    Each objective's loss is its own quantity (RWR/AWR are weighted, unlikelihood adds a term), so the curves
    show convergence, not a ranking."""
    tokens_per_step = tokens_per_step or {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run, p in logs.items():
        cols = read_training_log(p)
        xk = next((k for k in ("tokens", "tokens_seen", "step") if k in cols), None)
        yk = next((k for k in ("loss", "train_loss", "train/loss") if k in cols), None)
        scale = float(tokens_per_step.get(run, 1)) if xk == "step" else 1.0
        if xk is None or yk is None:
            log.warning("%s: no tokens/step and loss columns (has %s); not plotted", p, sorted(cols))
            continue
        pts = [(x, y) for x, y in zip(cols[xk], cols[yk]) if not (math.isnan(x) or math.isnan(y))]
        if pts:
            ax.plot([x * scale for x, _ in pts], [y for _, y in pts], label=run)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("training loss (objective)")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(plt, fig, path, dpi=110)


def plot_temptation(temptations: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Per run, histograms of the temptation measured before segments the classifier then judged bad vs good."""
    plt = _plt()
    runs = list(temptations) or ["(none)"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3 * len(runs), 2.8), squeeze=False, sharey=False)
    for ax, run in zip(axes[0], runs):
        t = temptations.get(run, {})
        bins = [i / 20 for i in range(21)]
        for key, color in (("good", "tab:blue"), ("bad", "tab:red")):
            if t.get(key):
                ax.hist(t[key], bins=bins, alpha=0.6, color=color, label=f"before {key} ({len(t[key])})")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("temptation", fontsize=8)
        if ax.patches:
            ax.legend(fontsize=7)
    return _save(plt, fig, path, dpi=100)


# ---- HTML report ------------------------------------------------------------------------------------------
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(no results)</p>"
    cols = [c for c in rows[0] if not c.endswith(("_lo", "_hi"))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in _cells(r, cols, "<br><small>[{}, {}]</small>")) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(path: Path, *, title: str, summary: dict[str, Any], rows: list[dict[str, Any]],
                 plots: list[Path], samples: dict[str, list[str]] | None = None) -> Path:
    """One self-contained HTML file: settings, the results table, the plots (embedded) and a few samples."""
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}pre{background:#f6f6f6;padding:6px;"
             "white-space:pre-wrap}img{max-width:100%}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre>",
             "<h2>Results</h2>", _html_table(rows), "<h2>Plots</h2>"]
    parts += [f"<h3>{html.escape(p.stem)}</h3>{_img(p)}" for p in plots if p.exists()]
    if samples:
        parts.append("<h2>Samples</h2>")
        for run, texts in samples.items():
            parts.append(f"<h3>{html.escape(run)}</h3>")
            parts += [f"<pre>{html.escape(t)}</pre>" for t in texts]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


# ---- one model's summary ----------------------------------------------------------------------------------
def format_summary(res: EvalResult) -> str:
    """A readable digest of an ``evaluate_model`` result (``pretag eval`` without --json)."""
    def est(e) -> str:
        return "–" if e is None or e.value is None else f"{e.value:.4g} [{e.lo:.4g}, {e.hi:.4g}]"

    def num(x) -> str:
        return "–" if x is None else f"{x:.4g}"

    s = res.settings
    lines = [f"model {res.model} (schema {res.schema}, {'tag-trained' if res.tagged else 'no tags'}); "
             f"{s['samples']} samples of <= {s['max_new_tokens']} tokens, policy {res.policy.get('name')}"]
    for attr, m in res.misalignment.items():
        if not m.n_samples:
            lines.append(f"  {attr}: nothing scored")
            continue
        lines.append(f"  {attr}: score {est(m.score)}  expected max@{m.expected_max_k} {num(m.expected_max)}"
                     f"  any-bad {est(m.frac_samples_any_bad)}  bad segments {est(m.frac_bad_segments)}")
    if res.kl is not None:
        lines.append(f"  KL from {res.kl.reference}: {est(res.kl)} nats/sample")
        if res.kl.sampler is not None:
            lines.append(f"  KL from {res.kl.reference} to the sampler (policy's ban and guidance applied): "
                         f"{num(res.kl.sampler)} [{num(res.kl.sampler_lo)}, {num(res.kl.sampler_hi)}] nats/sample")
    if res.loss is not None:
        lines.append(f"  held-out loss: {num(res.loss.untagged.loss)} nats/token untagged, "
                     f"{num(res.loss.tagged.loss)} with tags ({res.loss.untagged.n_docs} docs)")
    if res.redteam is not None:
        for attr, m in res.redteam.misalignment.items():
            lines.append(f"  red-team ({res.redteam.n_prompts} prompts) {attr}: score {est(m.score)}")
    for attr, t in (res.self_tagging or {}).items():
        lines.append(f"  self-tagging {attr}: AUROC {num(t.auroc)}, ECE {num(t.calibration['ece'])}, "
                     f"LLR AUROC {num(t.llr_auroc)} (n={t.n}, bad={t.n_bad})")
    for attr, t in (res.temptation or {}).items():
        verdict = "" if t.auroc_verdict is None else f", verdict AUROC {num(t.auroc_verdict)}"
        lines.append(f"  temptation {attr}: AUROC {num(t.auroc)}{verdict} (n={t.n}, bad={t.n_bad})")
    d = res.diversity
    lines.append(f"  distinct-1/2/3: {d.distinct_1:.3f} / {d.distinct_2:.3f} / {d.distinct_3:.3f}")
    lines.append(f"  ({res.wall_s:.1f}s)")
    return "\n".join(lines)
