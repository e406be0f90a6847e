"""CLI flags derived from the config dataclasses keep their names and defaults, and follow a renamed field."""

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from pretag.cli import build_parser
from pretag.cliargs import add_fields, config_fields

ROOT = Path(__file__).resolve().parents[1]
# the flags and defaults each command declared by hand before they were derived (issue 13): they must not move
BEFORE = {
    ("eval", "m"): {"samples": 256, "max_new_tokens": 128, "reference_samples": 128, "heldout_docs": 64,
                    "redteam": 16, "temperature": 1.0, "batch_size": 16, "seed": 0},
    ("generate", "m"): {"n": 1, "max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "beams": 1,
                        "repetition_penalty": 1.0, "seed": None, "ablate_direction": None},
    ("demo",): {"samples": 384, "max_new_tokens": 48, "prompt": "", "seed": 0},
}


@pytest.mark.parametrize("argv", list(BEFORE))
def test_derived_flags_keep_their_defaults(argv):
    args = vars(build_parser().parse_args(list(argv)))
    assert {k: args[k] for k in BEFORE[argv]} == BEFORE[argv]


def test_defaults_are_the_dataclasses_and_types_parse():
    from pretag.demo import DemoConfig
    from pretag.experiment import EvalConfig
    from pretag.generate import GenerateConfig

    for cls, module in ((EvalConfig, "pretag.experiment"), (GenerateConfig, "pretag.generate"),
                        (DemoConfig, "pretag.demo")):
        read = config_fields(module, cls.__name__)
        assert list(read) == [f.name for f in fields(cls)]
        for f in fields(cls):
            if isinstance(f.default, int | float | str) and not isinstance(f.default, bool):
                assert read[f.name].default == f.default and read[f.name].type is type(f.default), f.name
    args = build_parser().parse_args(["generate", "m", "-n", "3", "--top-p", "0.5", "--seed", "7", "--beams", "4"])
    assert (args.n, args.top_p, args.seed, args.beams) == (3, 0.5, 7, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "m", "--samples", "many"])


def test_a_renamed_field_fails_when_the_parser_is_built():
    with pytest.raises(KeyError, match="sample_count"):
        add_fields(argparse.ArgumentParser(), "pretag.demo", "DemoConfig", ["sample_count"])
    with pytest.raises(TypeError, match="checkpoints"):  # a Path default is no literal: declared by hand
        add_fields(argparse.ArgumentParser(), "pretag.demo", "DemoConfig", ["checkpoints"])


def test_reading_the_fields_imports_no_torch():
    code = ("import argparse, sys\nfrom pretag.commands import eval, generate, demo\n"
            "for m in (eval, generate, demo):\n    m.add_arguments(argparse.ArgumentParser())\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
