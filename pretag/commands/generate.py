"""Generate from a tag-trained model under a tag policy, and monitor its temptation toward banned tags.

Examples:
  pretag generate runs/pep8 --prompt "def f(x):\n" --show-temptation
  pretag generate runs/pep8 --policy ban:bad,force_at:none --prompt "import os\n" -n 4 --json
  pretag generate runs/multi --policy multi-safe --prompt "The" --tree 0.3
Policies: a YAML file, a shipped name (good, ban-bad-free, watchdog, multi-safe) or a compact string such as
ban:bad,bias:grade:6-10=+2,alarm:bad>0.3x3=stop (see docs/generation.md). Default: ban every bad value and force
an allowed tag at every segment start.
"""

from __future__ import annotations

import sys

HELP = "generate under a tag policy; report per-token temptation, alarms and output-classifier scores"


def add_arguments(p) -> None:
    from pretag.cliargs import add_fields

    p.add_argument("model", help="model directory written by `pretag train`")
    p.add_argument("--policy", default=None, help="policy: YAML file, shipped name or compact string")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeatable; \\n and \\t escapes are expanded); default: empty")
    # decoding settings are pretag.generate.GenerateConfig's fields (types, defaults and docs from there)
    add_fields(p, "pretag.generate", "GenerateConfig", ["n", "max_new_tokens"], flags={"n": "-n"})
    p.add_argument("--sample", action="store_true", help="sample even for n = 1")
    add_fields(p, "pretag.generate", "GenerateConfig",
               ["temperature", "top_k", "top_p", "num_beams", "repetition_penalty", "seed"],
               flags={"num_beams": "--beams"},
               help={"num_beams": "beam search with this many beams", "repetition_penalty":
                     "HF's formula; tag ids are exempt"})
    p.add_argument("--tree", type=float, default=None, metavar="TAU",
                   help="pruned tree search: drop sampled branches whose temptation crosses TAU")
    p.add_argument("--chunk", type=int, default=8, help="tokens between pruning decisions in --tree")
    add_fields(p, "pretag.generate", "GenerateConfig", ["ablate_direction"], metavar={"ablate_direction": "SPEC"},
               help={"ablate_direction": "project a direction out of every layer while writing: a tag (bad), "
                                         "embed:TAG, or the direction.pt of `pretag interpret` (see docs/interpret.md)"})
    p.add_argument("--no-classify", action="store_true", help="skip running the schema's scorers on the output")
    p.add_argument("--show-temptation", action="store_true",
                   help="colour each token by its temptation toward banned tags, with a summary and alarms")
    p.add_argument("--json", action="store_true", help="tokens, ids, temptation per tag, alarms, classifier scores")


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def run(args) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json
    from pretag.control import PolicyError, load_policy

    if not Path(args.model).is_dir():
        raise UserError(f"model directory {args.model!r} does not exist")
    from pretag.tokens import text_problem

    prompts = [_unescape(p) for p in (args.prompt or [""])]
    problems = [p for p in (text_problem(t, "--prompt") for t in prompts) if p]
    if problems:  # before loading the model: a prompt no tokenizer can take
        raise UserError("; ".join(problems))
    from pretag.display import format_trace
    from pretag.generate import GenerateConfig, generate
    from pretag.models import load_model_dir
    from pretag.search import tree_search

    try:
        model, tokenizer, schema = load_model_dir(args.model, device="auto")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model directory {args.model!r}: {e}") from e
    model.eval()
    try:
        policy = load_policy(args.policy, schema)
    except PolicyError as e:
        raise UserError(str(e)) from e
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, n=args.n, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, num_beams=args.beams, seed=args.seed,
                         repetition_penalty=args.repetition_penalty, classify=not args.no_classify,
                         do_sample=True if args.sample else None, ablate_direction=args.ablate_direction)
    try:
        cfg.validate()
        if args.tree is not None:
            if len(prompts) != 1:
                raise UserError("--tree takes exactly one --prompt")
            result = tree_search(model, tokenizer, schema, prompts[0], policy, cfg, tau=args.tree, chunk=args.chunk)
        else:
            result = generate(model, tokenizer, schema, prompts, policy, cfg)
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.json:
        print_json(result.to_dict())
        return 0
    colour = args.show_temptation and sys.stdout.isatty()
    for i, seq in enumerate(result.sequences):
        if len(result.sequences) > 1:
            print(f"--- sequence {i}")
        if args.show_temptation:
            print(format_trace(seq, colour=colour))
        else:
            print(seq.prompt + seq.text)
    return 0
