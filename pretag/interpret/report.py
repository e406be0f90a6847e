"""The interpretation report: one HTML file (layer curve, attribution heat map, top features with their segments,
intervention table), ``interpret.json`` with the same content, and the reusable artifacts: ``direction.pt`` (the
best layer's difference-of-means direction, for ``pretag generate --ablate-direction DIR/direction.pt``) and
``sae.pt``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _ci(e: dict | None, digits: int = 3) -> str:
    if not e or e.get("value") is None:
        return "–"
    return f"{e['value']:+.{digits}g} <small>[{e['lo']:+.{digits}g}, {e['hi']:+.{digits}g}]</small>"


def plot_layers(layers: list[dict], model_auroc: dict, path: Path) -> Path:
    from pretag.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, name in (("probe_auroc", "logistic probe"), ("diffmeans_auroc", "difference of means")):
        pts = [(r["layer"], r[key]) for r in layers if r.get(key)]
        if pts:
            x = [p[0] for p in pts]
            y = [p[1]["value"] for p in pts]
            err = [[p[1]["value"] - p[1]["lo"] for p in pts], [p[1]["hi"] - p[1]["value"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    if model_auroc and model_auroc.get("value") is not None:
        ax.axhline(model_auroc["value"], color="grey", ls="--", label="the model's own P(bad tag)")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xlabel("residual stream layer (0 = embeddings)")
    ax.set_ylabel("held-out AUROC vs classifier")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attribution(attr: dict, path: Path) -> Path:
    """Heat map, layers x (heads, MLP): mean direct attribution when tempted minus when not."""
    from pretag.report import _plt

    plt = _plt()
    names, diff = attr["components"], attr["tempted"].get("diff")
    if diff is None:
        return path
    parts = [n.split(".") for n in names if n.startswith("L")]
    n_layers = max(int(p[0][1:]) for p in parts) + 1
    cols = sorted({p[1] for p in parts}, key=lambda c: (c == "mlp", int(c[1:]) if c != "mlp" else 0))
    grid = np.zeros((n_layers, len(cols)))
    for n, v in zip(names, diff):
        if n.startswith("L"):
            layer, c = n.split(".")
            grid[int(layer[1:]), cols.index(c)] = v
    lim = float(np.abs(grid).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.2 + 0.5 * n_layers))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(n_layers), [f"L{i}" for i in range(n_layers)])
    for i in range(n_layers):
        for j in range(len(cols)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("logit(bad) - logit(good): tempted minus not", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layers_table(layers: list[dict]) -> str:
    cols = ("layer", "probe AUROC [95 %]", "diff-of-means AUROC", "cos embed <bad>", "cos unembed <bad>",
            "cos (bad-good) row", "cos read dir.")
    body = "".join(
        f"<tr><td>{r['layer']}</td><td>{_ci(r.get('probe_auroc'))}</td><td>{_ci(r.get('diffmeans_auroc'))}</td>"
        f"<td>{_fmt(r.get('cos_embed_bad'))}</td><td>{_fmt(r.get('cos_unembed_bad'))}</td>"
        f"<td>{_fmt(r.get('cos_unembed_bad_minus_good'))}</td><td>{_fmt(r.get('cos_read_direction'))}</td></tr>"
        for r in layers)
    return "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{body}</table>"


def _features_html(feats: list[dict]) -> str:
    parts = []
    for f in feats:
        ex = "".join(f"<li>{e['activation']:.2f} · {'bad' if e['bad'] else 'good'} · P(bad) {e['p_bad']:.2f} · "
                     f"<code>{html.escape(e['segment'][:200])}</code></li>" for e in f["examples"])
        parts.append(f"<h4>feature {f['feature']}: corr with P(bad) {f['corr_p_bad']:+.3f}, with verdict "
                     f"{f['corr_verdict']:+.3f}, fires at {100 * f['fires']:.1f} % of segment starts</h4><ul>{ex}</ul>")
    return "".join(parts) or "<p>(no feature fires at the segment starts)</p>"


def _interventions_table(recs: list[dict]) -> str:
    cols = ("intervention", "P(bad) before → after", "Δ temptation [95 %]", "Δ temptation, bad segments",
            "Δ misalignment score", "Δ bad-segment fraction", "Δ held-out loss")
    body = "".join(
        f"<tr><td>{html.escape(r['intervention'])}<br><small>{html.escape(r.get('description', ''))}</small></td>"
        f"<td>{_fmt(r['temptation_before'])} → {_fmt(r['temptation_after'])}</td><td>{_ci(r['d_temptation'])}</td>"
        f"<td>{_ci(r.get('d_temptation_bad_segments'))}</td><td>{_ci(r.get('d_score'))}</td>"
        f"<td>{_ci(r.get('d_bad_segment_fraction'))}</td><td>{_ci(r.get('d_loss'))}</td></tr>" for r in recs)
    return "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{body}</table>"


def write_html(result: dict, path: Path, plots: list[Path]) -> Path:
    from pretag.report import _img

    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}pre{background:#f6f6f6;padding:6px;"
             "white-space:pre-wrap}img{max-width:100%}")
    s, a = result["summary"], result["attribution"]
    top = "".join(f"<li>{html.escape(t['component'])}: {_ci({'value': t['diff'], 'lo': t['lo'], 'hi': t['hi']})}"
                  "</li>" for t in a["top"])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pretag interpret</title>",
             f"<style>{style}</style></head><body><h1>pretag interpret: {html.escape(s['attribute'])}</h1>",
             f"<pre>{html.escape(json.dumps(s, indent=2, default=str))}</pre>",
             "<h2>1. Where the attribute lives: probes per layer</h2>", _layers_table(result["layers"])]
    parts += [_img(p) for p in plots[:1] if p.exists()]
    parts += ["<h2>2. What writes the tag logit: direct logit attribution</h2>",
              f"<p>Tempted: {html.escape(a['tempted_rule'])} ({a['tempted']['n_in']} of "
              f"{a['tempted']['n_in'] + a['tempted']['n_out']} contexts). Parts add up to the model's logit "
              f"difference within {a['max_sum_error']:.2g}. Largest tempted-minus-not differences:</p><ul>{top}</ul>"]
    parts += [_img(p) for p in plots[1:2] if p.exists()]
    sae_s = result["sae"]
    parts += [f"<h2>3. Features: TopK SAE on layer {sae_s['layer']}</h2>",
              f"<p>{sae_s['n_features']} features, k = {sae_s['k']}, {sae_s['n_tokens']} tokens; fraction of "
              f"variance explained (held-out tokens) {sae_s['fve']:.3f}; dead {100 * sae_s['dead_fraction']:.1f} %."
              "</p>", _features_html(result["features"]),
              "<h2>4. Interventions</h2>", _interventions_table(result["interventions"]), "</body></html>"]
    path.write_text("\n".join(parts))
    return path


def write_outputs(result: dict, out: Path, *, directions: dict[int, torch.Tensor], sae_model, best: int) -> None:
    """``interpret.json``, ``report.html`` with its two plots, ``direction.pt`` and ``sae.pt`` under ``out``."""
    from pretag.metrics import json_safe

    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_layers(result["layers"], result["summary"]["model_auroc"], out / "layer_curve.png"),
             plot_attribution(result["attribution"], out / "attribution.png")]
    if best in directions:
        torch.save({"direction": directions[best], "layers": [best]}, out / "direction.pt")
    torch.save(sae_model.state_dict(), out / "sae.pt")
    (out / "interpret.json").write_text(json.dumps(json_safe(result), indent=2, default=str))
    write_html(result, out / "report.html", plots)
