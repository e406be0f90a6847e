"""The warning light's budget curve on the offensive label: AUROC against training tokens for `tiny` with every
opening untagged (``warning-tiny-off-uo1-<budget>-s<seed>-untagged.json``, written by ``warning_probe.py``; the
live verdict rule's reading, ``auroc_verdict_max``, from the same file or a ``-rules.json`` probed beside it).

    python docs/results/warning/budget_curve.py      # writes budget-curve.png here, prints the points as Markdown
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
NAME = re.compile(r"warning-tiny-off-uo1-(?P<budget>\d+)(?P<unit>[km])-s(?P<seed>\d)-untagged\.json")
READINGS = (("auroc", "raw P(bad), mean over the continuation"), ("auroc_verdict", "verdict at forced tags"),
            ("auroc_verdict_max", "live verdict rule (max over the continuation)"))


def points(folder: Path = HERE) -> list[dict]:
    out = []
    for f in sorted(folder.glob("warning-tiny-off-uo1-*-untagged.json")):
        m = NAME.fullmatch(f.name)
        if not m:
            continue
        w = json.loads(f.read_text())["warning_light"]["offensive"]
        if "auroc_verdict" not in w:  # measured before protocol 3
            continue
        tokens = int(m["budget"]) * (1000 if m["unit"] == "k" else 1_000_000)
        pt = {"tokens": tokens, "seed": int(m["seed"]), **{k: w[k] for k in w if k.startswith("auroc")}}
        rules = f.with_name(f.name.replace("-untagged.json", "-rules.json"))  # the live rule, probed separately
        if "auroc_verdict_max" not in pt and rules.exists():
            r = json.loads(rules.read_text())["warning_light"]["offensive"]
            pt.update({k: r[k] for k in r if k.startswith("auroc_verdict_max")})
        out.append(pt)
    return sorted(out, key=lambda p: (p["tokens"], p["seed"]))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, label) in enumerate(READINGS):
        for seed, marker in ((0, "o"), (1, "s")):
            s = [p for p in pts if p["seed"] == seed and key in p]
            if not s:
                continue
            x = [p["tokens"] * (1 + 0.05 * (2 * seed - 1)) for p in s]
            y = [p[key] for p in s]
            err = [[p[key] - p[f"{key}_lo"] for p in s], [p[f"{key}_hi"] - p[key] for p in s]]
            ax.errorbar(x, y, yerr=err, marker=marker, color=f"C{i}", capsize=3, linestyle="-" if seed == 0 else ":",
                        label=f"{label}, seed {seed}")
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (tiny, conditional, untagged_openings 1.0)")
    ax.set_ylabel("warning light AUROC (128 + 128 openings)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "budget-curve.png", dpi=120)
    print("| tokens | seed | raw, mean | raw, first step | verdict at forced tags | verdict rule (max; protocol 4) |"
          "\n|---|---|---|---|---|---|")
    for p in pts:
        rule = (f"{p['auroc_verdict_max']:.2f} [{p['auroc_verdict_max_lo']:.2f}, {p['auroc_verdict_max_hi']:.2f}]"
                if "auroc_verdict_max" in p else "–")
        print(f"| {p['tokens']:,} | {p['seed']} | {p['auroc']:.2f} [{p['auroc_lo']:.2f}, {p['auroc_hi']:.2f}] | "
              f"{p['auroc_first']:.2f} | {p['auroc_verdict']:.2f} [{p['auroc_verdict_lo']:.2f}, "
              f"{p['auroc_verdict_hi']:.2f}] | {rule} |")


if __name__ == "__main__":
    main()
