"""The command line: `pretag --help`, every registered subcommand's --help, and a tiny end-to-end label run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pretag.cli import COMMANDS, build_parser, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _built():
    import importlib

    out = []
    for name, mod in COMMANDS.items():
        try:
            importlib.import_module(mod)
            out.append(name)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return out


def test_top_level_help_lists_the_built_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pretag" in out
    for name in _built():
        assert name in out


@pytest.mark.parametrize("name", _built())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: pretag {name}" in capsys.readouterr().out


def test_help_is_fast_and_works_as_a_program():
    r = subprocess.run([sys.executable, "-m", "pretag", "label", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0 and "--num-proc" in r.stdout and "--engine" in r.stdout


def test_label_end_to_end_json(tmp_path, capsys):
    src = tmp_path / "code"
    src.mkdir()
    (src / "a.py").write_text("import os,sys\nx = 1\n")
    (src / "b.py").write_text("def f( x ):\n    return x\n")
    rc = main(["label", f"python:{src}", "--schema", "pep8", "--out", str(tmp_path / "out"), "--json",
               "--no-progress"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["documents"] == 2 and s["segments"] == 4
    assert s["attributes"]["pep8"]["tag_fraction"] == {"good": 0.5, "bad": 0.5}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["segments"] == 4
    rc = main(["label", f"python:{src}", "--schema", "pep8", "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "(0 written now, 1 resumed)" in out and "pep8 [segment, pep8]: good 50.0%, bad 50.0%" in out


def test_label_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["label", "no/such/dir", "--schema", "pep8", "--out", str(tmp_path / "o")]) == 2
    assert "corpus 'no/such/dir' not found" in capsys.readouterr().err
    assert main(["label", "stdlib", "--schema", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "neither a file nor a shipped schema" in capsys.readouterr().err
    assert main(["label", "stdlib", "--schema", "pep8", "--out", str(tmp_path / "o"), "--num-proc", "0"]) == 2
    assert "num_proc must be >= 1" in capsys.readouterr().err


def test_parser_builds():
    assert build_parser().prog == "pretag"
