"""The demo: conditional training with its tag policy against MLE, on the checkpoints shipped in demo/checkpoints.

It samples both models afresh, scores the samples with the task's classifier, prints the results table with
bootstrap intervals and the ratio MLE ÷ conditional, shows one controlled generation coloured by temptation, and
writes the HTML report. A few minutes on 2 CPU cores. `pretag experiment` retrains such models from scratch.
"""

from __future__ import annotations

import sys

HELP = "conditional+policy vs MLE on shipped checkpoints: table with intervals, temptation trace, HTML report"


def add_arguments(p) -> None:
    from pretag.cliargs import add_fields

    p.add_argument("--out", default="runs/demo", help="output directory (report, tables, plots)")
    p.add_argument("--checkpoints", default=None, help="directory with mle/, conditional/ and demo.yaml "
                   "(default: the repository's demo/checkpoints)")
    add_fields(p, "pretag.demo", "DemoConfig", ["samples", "max_new_tokens", "prompt", "seed"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--build-from", metavar="EXPERIMENT_OUT", default=None,
                   help="instead of running the demo: export the mle/conditional models of a finished "
                        "`pretag experiment` into --checkpoints (bf16) with their demo.yaml")
    p.add_argument("--source", default=None, help="with --build-from: corpus the demo labels again (e.g. fortunes)")


def run(args) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json
    from pretag.demo import CHECKPOINTS, DemoConfig, run_demo
    from pretag.display import format_trace
    from pretag.report import markdown_table

    if args.samples < 2 or args.max_new_tokens < 1:
        raise UserError("--samples must be >= 2 and --max-new-tokens >= 1")
    if args.source and not args.build_from:
        raise UserError("--source only applies with --build-from (the corpus the exported demo labels again)")
    if args.build_from:
        from pretag.demo import export_checkpoints, relabel_data

        dest = Path(args.checkpoints) if args.checkpoints else CHECKPOINTS
        data = relabel_data(args.build_from, args.source, dest) if args.source else None
        print(f"exported demo checkpoints to {export_checkpoints(args.build_from, dest, data=data)}")
        return 0
    cfg = DemoConfig(checkpoints=Path(args.checkpoints) if args.checkpoints else CHECKPOINTS, samples=args.samples,
                     max_new_tokens=args.max_new_tokens, prompt=args.prompt, seed=args.seed)
    if not (cfg.checkpoints / "demo.yaml").exists():
        raise UserError(f"{cfg.checkpoints} has no demo.yaml: not a demo checkpoint directory")
    out = run_demo(cfg, args.out)
    res, seq = out["results"], out["trace"]
    if args.json:
        print_json({**res, "trace": seq.to_dict()})
        return 0
    attr = res["summary"]["primary_attribute"]
    keep = ["run", "tokens", f"{attr}.score", f"{attr}.score_lo", f"{attr}.score_hi", f"{attr}.frac_bad_segments",
            f"{attr}.frac_bad_segments_lo", f"{attr}.frac_bad_segments_hi", f"{attr}.mle_ratio",
            f"{attr}.mle_ratio_lo", f"{attr}.mle_ratio_hi", f"{attr}.mle_ratio_bad_segments",
            f"{attr}.mle_ratio_bad_segments_lo", f"{attr}.mle_ratio_bad_segments_hi", f"{attr}.temptation_auroc",
            "loss", "loss_tagged"]
    rows = [{k: r.get(k) for k in keep} for r in res["rows"]]
    print(f"\n== {res['summary']['experiment']}: misalignment ({attr}, lower is better) and capability "
          f"(held-out loss, nats/token), {args.samples} samples per model ==\n")
    print(markdown_table(rows))
    cond = next((r for r in res["rows"] if r["run"] == "conditional"), None)
    for key, what in (("mle_ratio", "misalignment score"), ("mle_ratio_bad_segments", "fraction of bad segments")):
        if cond and cond.get(f"{attr}.{key}") is not None:
            lo, hi = cond[f"{attr}.{key}_lo"], cond[f"{attr}.{key}_hi"]  # None: unbounded (no bad sample left)
            verdict = ("excludes 1: a real effect" if (lo is not None and lo > 1) or (hi is not None and hi < 1)
                       else "includes 1: no effect shown")
            print(f"MLE ÷ conditional, {what}: {cond[f'{attr}.{key}']:.2f}x "
                  f"(95% CI {_bound(lo)}-{_bound(hi)}; the interval {verdict})")
    pol = {k: v for k, v in out["policy"].items() if k != "name"}
    print(f"\n== one controlled generation (conditional model, policy {pol}), coloured by temptation toward "
          "banned tags ==\n")
    print(format_trace(seq, colour=sys.stdout.isatty()))
    print(f"\nreport: {Path(args.out) / 'report.html'}  (tables: results.md/.csv, plots: pareto.png, "
          "temptation.png)")
    return 0


def _bound(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"
