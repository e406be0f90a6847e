"""Label a corpus: cut documents into segments, score each segment, tag it, and write Parquet shards.

Examples:
  pretag label stdlib --schema pep8 --out runs/stdlib-pep8 --num-proc 2
  pretag label fortunes --schema multi --out runs/fortunes-multi
  pretag label data.jsonl --text-column body --schema my_schema.yaml --out runs/mine --engine ray

SOURCE is a built-in corpus (stdlib, site-packages, fortunes), a file or directory of text files, a glob, python:DIR (a Python
source tree), a JSONL/Parquet/CSV/TSV file (one document per row, see --text-column), or a Hugging Face dataset
saved with save_to_disk. Empty, binary and non-UTF-8 files are skipped and counted. The run is resumable: run
the same command again after an interruption and finished shards are kept.

Output (DIR): part-NNNNN.parquet (one row per document: id, source, text, segments, fields, score__<attr>,
tag__<attr>), schema.yaml, run.json, summary.json.
"""

from __future__ import annotations

import argparse

HELP = "segment, score and tag a corpus into a labeled Parquet dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="corpus: stdlib, site-packages, fortunes, a path, a glob, python:DIR, ...")
    p.add_argument("--schema", required=True, metavar="NAME|FILE",
                   help="a shipped schema (pep8, pii, toxicity, sentiment, multi) or a YAML file")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reused to resume)")
    p.add_argument("--num-proc", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local processes, or Ray Data (a local Ray instance, or RAY_ADDRESS's cluster)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="label only the first N documents")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose relative path or name matches GLOB (repeatable)")
    p.add_argument("--include-all", action="store_true",
                   help="stdlib: keep the tests and encodings/ codec tables that are left out by default")
    p.add_argument("--text-column", default="text", help="text column of JSONL/Parquet/CSV/HF sources")
    p.add_argument("--fallback-encoding", default=None, metavar="ENC",
                   help="decode non-UTF-8 files with ENC (e.g. latin-1) instead of skipping them")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="documents per shard (default 1000)")
    p.add_argument("--shard-chars", type=int, default=1_000_000, metavar="N",
                   help="characters per shard at most (default 1,000,000)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def format_summary(s: dict) -> str:
    c = s["corpus"]
    lines = [
        f"labeled {s['documents']} documents, {s['segments']} segments ({s['segmenter']}) with schema "
        f"{s['schema']!r} into {s['out']} in {s['seconds']:.1f}s",
        f"shards: {s['shards']['total']} ({s['shards']['written']} written now, {s['shards']['resumed']} resumed)",
        f"skipped: {c['skipped_total']}" + (f" ({', '.join(f'{k} {v}' for k, v in c['skipped'].items())})"
                                             if c["skipped"] else ""),
    ]
    lines += [f"note: {n}" for n in c.get("notes", [])]
    for name, a in s["attributes"].items():
        tags = ", ".join(f"{t} {100 * f:.1f}%" for t, f in a["tag_fraction"].items())
        q = a["score_quantiles"]
        qs = ", ".join(f"q{float(k) * 100:g}={v:.4g}" for k, v in q.items() if k in ("0.5", "0.9", "0.99", "1.0"))
        untagged = f", untagged {a['untagged']}" if a["untagged"] else ""
        lines.append(f"  {name} [{a['level']}, {a['scorer']}]: {tags}{untagged}; scores {qs}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pretag.cli import UserError, print_json
    from pretag.label import label_corpus
    from pretag.scorers import ScorerError

    try:
        summary = label_corpus(
            args.source, args.schema, args.out, num_proc=args.num_proc, engine=args.engine, limit=args.limit,
            shard_size=args.shard_size, shard_chars=args.shard_chars, exclude=args.exclude,
            include_all=args.include_all, text_column=args.text_column, fallback_encoding=args.fallback_encoding,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (ValueError, ScorerError) as e:
        from pretag.schema import SchemaError

        if isinstance(e, SchemaError):
            raise
        raise UserError(str(e)) from e
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
        print(f"summary: {args.out}/summary.json")
    return 0
