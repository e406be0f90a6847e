"""The budget curve of the inline-tag design: MLE ÷ conditional on the misalignment score against training tokens.

    python docs/results/inline/budget_curve.py       # reads docs/results/inline/results-*.csv, writes budget-curve.png

Each results table names its word threshold and seed in its file name (``results-tiny-inline05-2m-s1.csv``: 0.05,
2M tokens, seed 1; no ``05``: threshold 0.1; ``-guide3``: sampled with tag guidance ``{bad: 3}`` besides the
ban, its own series); the ratio and its bootstrap interval come from the table's
conditional row. Also prints the points as a Markdown table for the README.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
NAME = re.compile(r"results-tiny-(?P<task>inline|neg-inline)(?P<t05>05)?(?:-guide(?P<guide>\d+))?"
                  r"(?:-(?P<budget>[0-9.]+[mk]))?-s(?P<seed>\d)\.csv")


def points(folder: Path = HERE) -> list[dict]:
    out = []
    for f in sorted(folder.glob("results-tiny-*.csv")):
        m = NAME.fullmatch(f.name)
        if not m:
            continue
        rows = {r["run"]: r for r in csv.DictReader(f.open())}
        row = rows.get("conditional")
        attr = "toxicity" if m["task"] == "inline" else "negativity"
        if row is None or not row.get(f"{attr}.mle_ratio"):
            continue
        out.append({"task": attr, "threshold": 0.05 if m["t05"] else (0.1 if attr == "toxicity" else 0.5),
                    "guide": int(m["guide"] or 0), "tokens": int(row["tokens"]), "seed": int(m["seed"]),
                    "ratio": float(row[f"{attr}.mle_ratio"]),
                    "lo": float(row[f"{attr}.mle_ratio_lo"]), "hi": float(row[f"{attr}.mle_ratio_hi"]),
                    "file": f.name})
    return sorted(out, key=lambda p: (p["task"], p["threshold"], p["guide"], p["tokens"], p["seed"]))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    if not pts:
        sys.exit("no results-tiny-*.csv with a conditional row here")
    fig, ax = plt.subplots(figsize=(9, 4))
    series = sorted({(p["task"], p["threshold"], p["guide"]) for p in pts})
    for i, (task, thr, guide) in enumerate(series):
        for seed, marker in ((0, "o"), (1, "s")):
            s = [p for p in pts if (p["task"], p["threshold"], p["guide"], p["seed"]) == (task, thr, guide, seed)]
            if not s:
                continue
            x = [p["tokens"] * (1 + 0.04 * (seed - 0.5) * 2) for p in s]  # seeds side by side
            y = [p["ratio"] for p in s]
            err = [[p["ratio"] - p["lo"] for p in s], [p["hi"] - p["ratio"] for p in s]]
            ax.errorbar(x, y, yerr=err, marker=marker, color=f"C{i}", capsize=3, linestyle="-" if seed == 0 else ":",
                        label=f"{task}, word threshold {thr:g}{f', guide {guide}' if guide else ''}, seed {seed}")
    ax.axhline(3, color="grey", linestyle="--", linewidth=1)
    ax.axhline(1, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (model tiny, 5.4M parameters, from scratch)")
    ax.set_ylabel("MLE ÷ conditional, misalignment score")
    ax.set_title("Inline tags: the effect against the budget (95 % intervals)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(HERE / "budget-curve.png", dpi=120)
    print("| task | word threshold | sampling | tokens | seed | MLE ÷ conditional |\n|---|---|---|---|---|---|")
    for p in pts:
        how = f"ban + guide {p['guide']}" if p["guide"] else "ban"
        print(f"| {p['task']} | {p['threshold']:g} | {how} | {p['tokens'] / 1e6:g}M | {p['seed']} | "
              f"{p['ratio']:.2f}× [{p['lo']:.2f}, {p['hi']:.2f}] |")


if __name__ == "__main__":
    main()
