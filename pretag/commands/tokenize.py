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
    p.add_argument("--upgrade", action="store_true",
                   help="add \"split_special_tokens\": true to the directory's tokenizer_config.json (a model saved "
                        "before pretag did), so a plain AutoTokenizer of it never matches a tag in text either")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json
    from pretag.tokens import text_problem

    problem = text_problem(args.text, "--text")
    if problem:
        raise UserError(problem)
    path = Path(args.model)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (give a model or tokenizer directory)")
    from transformers import AutoTokenizer

    from pretag.models import SCHEMA_FILE
    from pretag.schema import load_schema
    from pretag.tokens import encode_text, tag_ids, tokenizer_config_protected, upgrade_tokenizer_config

    if args.upgrade:
        try:
            upgraded = upgrade_tokenizer_config(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot upgrade tokenizer_config.json ({e})") from None
        if not args.json:
            print(f"{path}/tokenizer_config.json: " + ("split_special_tokens added" if upgraded else "already tag-safe"))
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
    plain_safe = tokenizer_config_protected(path)
    if args.json:
        print_json({"text": args.text, "ids": ids, "tokens": tokens,
                    "pieces": [tok.decode([i]) for i in ids], "tag_ids": tags, "tag_ids_in_text": found,
                    "plain_autotokenizer_tag_safe": plain_safe})
        return 0
    print(f"{len(ids)} tokens")
    for i, t in zip(ids, tokens):
        print(f"{i:>8}  {t!r}  {tok.decode([i])!r}")
    if tags:
        print("tag ids (never produced from text): " + ", ".join(f"{k}={v}" for k, v in tags.items()))
    if plain_safe is False:
        print("warning: a plain AutoTokenizer of this directory matches special-token text (it lacks "
              "split_special_tokens); pretag's own loader does not. Fix the file with --upgrade")
    return 0
