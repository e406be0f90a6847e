"""The GPU recipe's results (issue 12.5) as one table, the budget curve and verbatim samples.

    python docs/results/gpu/summarize.py    # reads docs/results/gpu/<job>/, writes table.md, budget-curve.png, samples.md

Each ``<job>`` folder (``toxicity-s0-12000000``: task, seed, training tokens) holds what ``bash recipes/gpu.sh run``
returned for one ``pretag experiment``: its results table (``results.csv``), both models' evaluations
(``evals/*.json.gz``, with verbatim samples), configs and training logs. Capability is held-out loss per text token
on the same 256 held-out documents: the conditional model's with its classifier tags in context (tags are never
counted), against MLE's on the plain text, as in the README's CPU tables.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
JOB = re.compile(r"(?P<task>toxicity|negativity)-s(?P<seed>\d+)-(?P<tokens>\d+)")


def jobs(folder: Path = HERE) -> list[dict]:
    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and JOB.fullmatch(p.name)):
        m = JOB.fullmatch(d.name)
        rows = {r["run"]: r for r in csv.DictReader((d / "results.csv").open())}
        mle, cond, a = rows["mle"], rows["conditional"], m["task"]
        f = {k: float(v) for k, v in cond.items() if k != "run" and v not in ("", None)}
        train = {r: _yaml(d / f"{r}-train.yaml") for r in ("mle", "conditional")}
        out.append({
            "job": d.name, "task": a, "seed": int(m["seed"]), "tokens": int(m["tokens"]),
            "mle_score": float(mle[f"{a}.score"]), "score": f[f"{a}.score"],
            "ratio": f[f"{a}.mle_ratio"], "lo": f[f"{a}.mle_ratio_lo"], "hi": f[f"{a}.mle_ratio_hi"],
            "ratio_bad": f[f"{a}.mle_ratio_bad_segments"], "bad_lo": f[f"{a}.mle_ratio_bad_segments_lo"],
            "bad_hi": f[f"{a}.mle_ratio_bad_segments_hi"],
            "loss_mle": float(mle["loss"]), "loss_tagged": f["loss_tagged"], "loss_untagged": f["loss"],
            "kl": f["kl"], "selftag": f[f"{a}.selftag_auroc"], "warning": f[f"{a}.warning_auroc"],
            "temptation": f[f"{a}.temptation_auroc"],
            "tok_s": {r: train[r]["result"]["tokens_per_s"] for r in train},
        })
    return sorted(out, key=lambda j: (j["task"], j["tokens"], j["seed"]))


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def table(js: list[dict]) -> str:
    head = ("| task | tokens | seed | MLE score | conditional score | **MLE ÷ conditional** | ÷ on bad sentences | "
            "held-out loss: MLE / conditional with tags (untagged) | capability cost | KL from MLE (nats/sample) | "
            "self-tag AUROC | warning light AUROC | training tokens/s (4 jobs on one GPU) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for j in js:
        cost = 100 * (j["loss_tagged"] / j["loss_mle"] - 1)
        lines.append(
            f"| {j['task']} | {j['tokens'] / 1e6:g}M | {j['seed']} | {j['mle_score']:.4f} | {j['score']:.4f} | "
            f"**{j['ratio']:.2f}× [{j['lo']:.2f}, {j['hi']:.2f}]** | {j['ratio_bad']:.1f}× [{j['bad_lo']:.1f}, "
            f"{j['bad_hi']:.1f}] | {j['loss_mle']:.3f} / {j['loss_tagged']:.3f} ({j['loss_untagged']:.3f}) | "
            f"{cost:+.1f} % | {j['kl']:.1f} | {j['selftag']:.3f} | {j['warning']:.2f} | "
            f"{j['tok_s']['mle'] / 1e3:.0f}k / {j['tok_s']['conditional'] / 1e3:.0f}k |")
    return "\n".join(lines) + "\n"


def samples(folder: Path = HERE, n: int = 4) -> str:
    out = ["# Verbatim samples of the GPU recipe's models (the first of each evaluation's 2,048, unedited)\n"]
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and JOB.fullmatch(p.name)):
        if not d.name.endswith("12000000") and not d.name.startswith("negativity-s0"):
            continue
        for run in ("mle", "conditional"):
            ev = json.loads(gzip.open(d / "evals" / f"{run}.json.gz").read())
            out.append(f"## {d.name}, {run} (held-out loss {ev['loss']['untagged' if run == 'mle' else 'tagged']['loss']:.2f})\n")
            out += ["```text\n" + e.strip() + "\n```\n" for e in ev["examples"][:n]]
    return "\n".join(out)


def curve(js: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, task in enumerate(sorted({j["task"] for j in js})):
        for seed, marker in ((0, "o"), (1, "s")):
            s = [j for j in js if j["task"] == task and j["seed"] == seed]
            if s:
                ax.errorbar([j["tokens"] * (0.96 if seed == 0 else 1.04) for j in s], [j["ratio"] for j in s],
                            yerr=[[j["ratio"] - j["lo"] for j in s], [j["hi"] - j["ratio"] for j in s]],
                            marker=marker, color=f"C{i}", capsize=3, linestyle="-" if seed == 0 else ":",
                            label=f"{task}, seed {seed}")
    ax.axhline(3, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per model (GPT-2 small, 124M, from scratch; fortunes, 1.3M tokens)")
    ax.set_ylabel("MLE ÷ conditional (misalignment score)")
    ax.set_title("GPU recipe: inline tags, one H200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    js = jobs()
    (HERE / "table.md").write_text(table(js))
    (HERE / "samples.md").write_text(samples())
    curve(js, HERE / "budget-curve.png")
    print(table(js))


if __name__ == "__main__":
    main()
