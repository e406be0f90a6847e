"""Run the paper's experiment: all six objectives on the same data and token budget, side by side.

  pretag experiment pep8 --quick            # a few minutes on 2 CPU cores
  pretag experiment pep8 --out runs/exp-pep8
  pretag experiment my_experiment.yaml --json

Labels (or reuses) the data, trains mle, filter, conditional, unlikelihood, rwr and awr (and, when the config
enables it, MLE-then-conditional fine-tuning), evaluates each with the same samples budget and writes
results.md/.csv/.json, pareto.png, curves.png, temptation.png and report.html to --out. Re-running the same
command reuses finished labeling, models and evaluations.
"""

from __future__ import annotations

HELP = "train and evaluate all six objectives on one budget; tables, plots and an HTML report"


def add_arguments(p) -> None:
    from pretag.experiment import shipped_experiments

    p.add_argument("config", help=f"a shipped experiment ({', '.join(shipped_experiments())}) or a YAML file")
    p.add_argument("--quick", action="store_true", help="the config's quick overlay: a few minutes on 2 CPU cores")
    p.add_argument("--out", help="output folder (default: runs/experiment-<name>[-quick])")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    from pretag.cli import UserError, print_json
    from pretag.experiment import load_config, run_experiment

    try:
        cfg = load_config(args.config, quick=args.quick)
    except ValueError as e:
        raise UserError(str(e)) from e
    out = args.out or f"runs/experiment-{cfg.name}{'-quick' if args.quick else ''}"
    try:
        res = run_experiment(cfg, out)
    except ValueError as e:  # a config that cannot run there, found before any work (or a bad input met later)
        raise UserError(str(e)) from e
    if args.json:
        print_json(res)
        return 0
    s = res["summary"]
    print(f"experiment {s['experiment']}: {s['tokens_per_objective']} tokens per objective, "
          f"{s['samples_per_model']} samples per model, {s['wall_s']:.0f}s in all\n")
    print(open(res["artifacts"]["results.md"]).read())
    print(f"report: {res['artifacts']['report.html']}")
    return 0
