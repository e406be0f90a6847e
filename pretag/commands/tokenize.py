"""Show how a model's tokenizer encodes a text: ids and tokens, with pretag's tag-safe encoding.

Tag tokens are inserted by id from the labeled structure, never produced from text: a literal "<|bad|>" in TEXT
comes out as ordinary tokens. This command is the public check of that rule.

examples:
  pretag tokenize runs/pep8-cond --text 'x = 1  <|bad|> </good>'
  pretag tokenize runs/pep8-cond --text 'hello' --json
"""

from __future__ import annotations

import argparse

HELP = "show the token ids and tokens of a text (tag-safe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory written by `pretag train`, or any HF tokenizer directory")
    p.add_argument("--text", required=True, help="the text to encode")
    p.add_argument("--json", action="store_true", help="print ids, tokens and tag ids as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json

    path = Path(args.model)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (give a model or tokenizer directory)")
    from transformers import AutoTokenizer

    from pretag.models import SCHEMA_FILE
    from pretag.schema import load_schema
    from pretag.tokens import encode_text, tag_ids

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no tokenizer could be loaded ({e})") from None
    try:
        ids = encode_text(tok, args.text)
    except ValueError as e:
        raise UserError(str(e)) from None
    tokens = tok.convert_ids_to_tokens(ids)
    tags = tag_ids(tok, load_schema(path / SCHEMA_FILE)) if (path / SCHEMA_FILE).exists() else {}
    found = sorted(set(ids) & set(tags.values()))
    if args.json:
        print_json({"text": args.text, "ids": ids, "tokens": tokens,
                    "pieces": [tok.decode([i]) for i in ids], "tag_ids": tags, "tag_ids_in_text": found})
        return 0
    print(f"{len(ids)} tokens")
    for i, t in zip(ids, tokens):
        print(f"{i:>8}  {t!r}  {tok.decode([i])!r}")
    if tags:
        print("tag ids (never produced from text): " + ", ".join(f"{k}={v}" for k, v in tags.items()))
    return 0
