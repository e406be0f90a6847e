"""Write an inline-tagged copy of a labeled dataset: the bad tag right before each flagged word.

Every sentence is cut at the runs of words that score worse than --word-threshold *on their own* (the attribute's
scorer, e.g. alt-profanity-check); those runs get the bad tag and the clean text between them the good tag, as in
Safety Pretraining (Maini et al. 2025). Sentence boundaries are kept, so generation, policies and evaluation work
unchanged; conditional training on the copy learns the tag as a local fact ("a flagged word follows"), and the
temptation P(<|bad|>) becomes the urge to write such a word at that very step. See README, Results.

examples:
  pretag inline runs/fortunes-toxicity --out runs/fortunes-toxicity-inline --word-threshold 0.1
  pretag train runs/fortunes-toxicity-inline --method conditional --model smollm2 --set lora=true --out runs/inl
"""

from __future__ import annotations

import argparse

HELP = "copy a labeled dataset with the bad tag inline, before each flagged word"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="a labeled dataset written by `pretag label`")
    p.add_argument("--out", required=True, help="the new dataset folder (must be new or empty)")
    p.add_argument("--word-threshold", type=float, required=True,
                   help="a word whose own score is worse than this is flagged (profanity: 0.1 flags 8%% of words)")
    p.add_argument("--attribute", help="the binary segment-level attribute to tag inline (default: the only one)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier inline copy in --out")
    p.add_argument("--json", action="store_true", help="print what inline.json says as JSON")


def run(args: argparse.Namespace) -> int:
    from pretag.cli import UserError, print_json
    from pretag.inline import inline_dataset

    try:
        info = inline_dataset(args.data, args.out, word_threshold=args.word_threshold, attribute=args.attribute,
                              overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from e
    if args.json:
        print_json(info)
    else:
        print(f"wrote {args.out}: {info['flagged_words']} of {info['distinct_words']} distinct words flagged, "
              f"{info['flagged_runs']} flagged runs among {info['pieces']} pieces")
    return 0
