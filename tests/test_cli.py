"""The command line: `pretag --help`, every registered subcommand's --help, and a tiny end-to-end label run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pretag.cli import COMMANDS, build_parser, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_registered_command_is_built():
    # build_parser leaves out a command whose module is missing; no registered command may be missing
    assert list(_subcommands(build_parser())) == list(COMMANDS)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pretag" in out
    for name in COMMANDS:
        assert f"    {name} " in out, name


@pytest.mark.parametrize("name", list(COMMANDS))
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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_parses_the_same_when_only_its_arguments_are_declared(name):
    # main declares only the running command's arguments (so `pretag label` skips experiment's imports)
    full, only = _subcommands(build_parser())[name], _subcommands(build_parser(only=name))[name]
    assert only.format_help() == full.format_help()
    others = [p for n, p in _subcommands(build_parser(only=name)).items() if n != name]
    assert all(len(p._actions) == 1 for p in others)  # just -h


HEAVY = ("torch", "transformers", "ray", "datasets", "pandas", "pretag.experiment", "pretag.objectives")


def _imported_after(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[-1].split()  # the last line: the command may print before it


def test_labeling_imports_no_model_libraries(tmp_path):
    # import, --help and a whole PEP8 run: labeling imports none of these (torch's start-up alone was ~2 s of a
    # 100k-line job; pandas, which pyarrow imports to ask whether a list is a DataFrame, ~0.4 s)
    src = tmp_path / "code"
    src.mkdir()
    (src / "a.py").write_text("import os,sys\nx = 1\n")
    for code in ("import pretag, pretag.label, pretag.commands.label",
                 "from pretag.cli import main\ntry:\n    main(['label', '--help'])\nexcept SystemExit:\n    pass",
                 f"from pretag.cli import main\nassert main(['label', 'python:{src}', '--schema', 'pep8', '--out', "
                 f"'{tmp_path / 'out'}', '--no-progress']) == 0"):
        mods = _imported_after(code)
        assert "pretag.label" in mods or "pretag.commands.label" in mods
        assert [m for m in HEAVY if m in mods] == [], code
