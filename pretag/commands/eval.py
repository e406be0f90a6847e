"""Evaluate a trained model the way the paper did, plus our additions.

  pretag eval runs/pep8/conditional --data runs/pep8/data --reference runs/pep8/mle
  pretag eval MODEL --samples 4096 --json > eval.json

Misalignment of unconditional samples (mean per-character score, expected max over 25, fraction of samples with a
bad segment, fraction of bad segments, bootstrap 95% intervals); with --data: held-out loss, red-team prompts,
self-tagging agreement; with --reference: KL from the reference model; diversity (distinct-1/2/3); and, for a
model trained with tags, the temptation as a warning light.
"""

from __future__ import annotations

HELP = "evaluate a model: misalignment, capability (loss, KL), red-team, self-tagging, temptation, diversity"


def add_arguments(p) -> None:
    from pretag.cliargs import add_fields

    p.add_argument("model", help="model directory written by `pretag train`")
    p.add_argument("--data", help="labeled dataset: held-out loss, self-tagging and red-team prompts use the "
                                  "documents training held out (all of them if the model was trained elsewhere)")
    p.add_argument("--reference", help="a local model dir (HF, pretag, .gguf or 'smollm2') for KL(ref || model)")
    # the same settings as an experiment's eval: section (pretag.experiment.EvalConfig), documented there
    add_fields(p, "pretag.experiment", "EvalConfig", ["samples", "max_new_tokens", "reference_samples",
                                                      "heldout_docs", "redteam_prompts"],
               flags={"redteam_prompts": "--redteam"},
               help={"reference_samples": "Reference samples for the KL estimate (cached, see --cache)"})
    p.add_argument("--policy", help="sampling policy (file, shipped name or compact string); default: a "
                                    "tag-trained model bans the bad tags, any other model writes no tags")
    add_fields(p, "pretag.experiment", "EvalConfig", ["temperature", "batch_size"])
    add_fields(p, "pretag.experiment", "ExperimentConfig", ["seed"])
    p.add_argument("--cache", help="folder for cached reference samples (default: MODEL/eval_cache)")
    p.add_argument("--out", help="also write the full result as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _problems(args) -> list[str]:
    """Every problem with the arguments, found before the (long) evaluation: a file --out that cannot be written
    must not lose the result after the work is done."""
    import math
    from pathlib import Path

    from pretag.folders import FolderError, check_dir, check_file

    out = []
    if not Path(args.model).is_dir():
        out.append(f"model {args.model!r} is not a directory")
    if args.data:
        out += _data_problems(args.model, args.data)
    for k in ("samples", "max_new_tokens", "reference_samples", "heldout_docs", "batch_size"):
        if getattr(args, k) < 1:
            out.append(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.redteam < 0:
        out.append(f"--redteam must be >= 0, got {args.redteam}")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        out.append(f"--temperature must be a finite number > 0, got {args.temperature}")
    for check, value, what in ((check_dir, args.cache, "--cache"), (check_file, args.out, "--out")):
        try:
            if value:
                check(value, what)
        except FolderError as e:
            out.append(str(e))
    return out


def _data_problems(model: str, data: str) -> list[str]:
    """--data must be a labeled dataset with documents, labeled with the model's schema."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from pretag.label import shard_files
    from pretag.models import SCHEMA_FILE
    from pretag.schema import SchemaError, load_schema

    if not (Path(data) / "schema.yaml").exists():
        return [f"--data {data!r} is not a labeled dataset (no schema.yaml)"]
    if sum(pq.read_metadata(p).num_rows for p in shard_files(data)) == 0:
        return [f"--data {data!r} holds no documents"]
    if not (Path(model) / SCHEMA_FILE).exists():
        return []  # reported when the model loads
    try:
        theirs, mine = load_schema(Path(data) / "schema.yaml"), load_schema(Path(model) / SCHEMA_FILE)
    except SchemaError as e:
        return [str(e)]

    def sig(s) -> tuple:
        return s.name, s.segmenter, tuple((a.name, a.level, tuple(a.tags.values())) for a in s.attributes)

    if sig(theirs) != sig(mine):
        return [f"--data {data!r} was labeled with schema {theirs.name!r} (attributes "
                f"{', '.join(a.name for a in theirs.attributes)}), but the model was trained with schema "
                f"{mine.name!r} (attributes {', '.join(a.name for a in mine.attributes)})"]
    return []


def run(args) -> int:
    import json
    from pathlib import Path

    from pretag.cli import UserError, print_json

    problems = _problems(args)
    if problems:
        raise UserError("\n  - ".join(["bad arguments:", *problems]))
    from pretag.control import PolicyError
    from pretag.evaluate import evaluate_model
    from pretag.generate import ContextLengthError

    try:
        res = evaluate_model(
            args.model, data=args.data, samples=args.samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, reference=args.reference, reference_samples_n=args.reference_samples,
            cache_dir=args.cache or Path(args.model) / "eval_cache", heldout_docs=args.heldout_docs,
            redteam_n=args.redteam, policy=args.policy, batch_size=args.batch_size, seed=args.seed)
    except (PolicyError, ContextLengthError) as e:
        raise UserError(str(e)) from e
    if args.out:  # checked before the work: a folder that does not exist yet may be made
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    if args.json:
        print_json(res)
        return 0
    from pretag.report import format_summary
    from pretag.results import EvalResult

    print(format_summary(EvalResult.from_dict(res)))
    return 0
