"""The experiment: configs parse, tables and logs are right, and a tiny config runs end to end."""

import csv
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import yaml

from pretag import experiment as ex
from pretag.cli import main


def test_every_shipped_config_parses_full_and_quick():
    names = ex.shipped_experiments()
    assert {"pep8", "toxicity", "sentiment", "multi", "tiny"} <= set(names)
    for n in names:
        full, quick = ex.load_config(n), ex.load_config(n, quick=True)
        assert full.methods and set(full.methods) <= set(ex.METHODS)
        assert quick.tokens <= full.tokens and quick.eval.samples <= full.eval.samples


def test_config_problems_are_collected():
    bad = {"name": "x", "data": {"schema": "pep8", "colour": 1}, "methods": ["mle", "ppo"], "tokens": -5,
           "eval": {"samples": 0}, "finetune": {"pretrain_fraction": 1.5}, "typo": 1}
    with pytest.raises(ValueError) as e:
        ex.config_from_dict(bad)
    msg = str(e.value)
    for part in ("data.colour", "'ppo'", "tokens", "eval.samples", "pretrain_fraction", "'typo'", "source"):
        assert part in msg
    assert "7 problem(s)" in msg


def test_quick_overlay_deep_merges():
    d = {"name": "x", "data": {"source": "stdlib"}, "tokens": 1000, "eval": {"samples": 64, "max_new_tokens": 50},
         "quick": {"tokens": 10, "eval": {"samples": 4}}}
    q = ex.config_from_dict(d, quick=True)
    assert (q.tokens, q.eval.samples, q.eval.max_new_tokens) == (10, 4, 50)
    assert ex.config_from_dict(d).tokens == 1000


def test_markdown_table_merges_intervals():
    rows = [{"run": "mle", "s": 0.5, "s_lo": 0.25, "s_hi": 0.75, "kl": None}]
    assert ex.markdown_table(rows) == "| run | s | kl |\n|---|---|---|\n| mle | 0.5 [0.25, 0.75] | – |\n"


def test_tidy_training_log_is_pivoted(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("step,name,value\n1,loss,3.0\n1,lr,0.1\n2,loss,2.5\n4,eval_loss,2.7\n")
    cols = ex.read_training_log(p)
    assert cols["step"] == [1.0, 2.0, 4.0]
    assert cols["loss"][:2] == [3.0, 2.5] and cols["eval_loss"][2] == 2.7
    assert cols["lr"][0] == 0.1


PEP8_BAD = "y = f( x )\nz=1\nw = [1,2]\n"  # E201/E202, E225, E231


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(10):
        good = "".join(f"value_{j} = {i} * {j}\n" for j in range(12))  # clean, so filter keeps these
        (corpus / f"m{i}.py").write_text(good + (PEP8_BAD * (1 + i % 3) if i % 2 else ""))
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d["data"] = {"source": str(corpus), "schema": "pep8"}
    d["tokens"] = 512
    d["train"]["vocab_size"] = 320
    cfg = ex.config_from_dict(d)
    return ex.run_experiment(cfg, root / "out"), root / "out"


def test_tiny_experiment_writes_every_artifact(tiny_run):
    res, out = tiny_run
    for name in ("results.md", "results.csv", "results.json", "pareto.png", "curves.png", "temptation.png",
                 "report.html"):
        assert (out / name).stat().st_size > 0, name
    runs = [r["run"] for r in res["rows"]]
    assert runs == [*ex.METHODS, "mle→conditional"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == runs
    md = (out / "results.md").read_text()
    assert all(f"| {r} |" in md for r in runs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert json.loads((out / "results.json").read_text())["summary"]["tokens_per_objective"] == 512


def test_tiny_experiment_rows_are_consistent(tiny_run):
    res, out = tiny_run
    rows = {r["run"]: r for r in res["rows"]}
    for r in rows.values():
        assert r["tokens"] == 512  # one budget for all; the finetune comparison's two stages add up to it
        assert 0 <= r["pep8.frac_bad_segments_lo"] <= r["pep8.frac_bad_segments"] <= r["pep8.frac_bad_segments_hi"] <= 1
        assert r["loss"] > 0 and 0 < r["distinct_1"] <= 1
    assert rows["mle"]["kl"] == 0.0  # the reference is the experiment's MLE model: KL to itself is 0
    assert rows["mle"]["pep8.temptation_auroc"] is None  # no tags learnt, no warning light
    ev = json.loads((out / "evals" / "conditional.json").read_text())
    assert ev["tagged"] and "self_tagging" in ev and "temptation" in ev and ev["redteam"]["n_prompts"] >= 1
    # the rows carry the evaluation's AUROCs (the [0, 1] range said nothing), self-tagging measured on both classes
    st = ev["self_tagging"]["pep8"]
    assert 0 < st["n_bad"] < st["n"]
    assert rows["conditional"]["pep8.selftag_auroc"] == st["auroc"]
    assert rows["conditional"]["pep8.temptation_auroc"] == ev["temptation"]["pep8"]["auroc"]
    tv = ev["temptation"]["pep8"]  # the verdict at the same steps (its AUROC null, left out, with one class only)
    assert len(tv["verdict_before_bad"]) == tv["n_bad"] and len(tv["verdict_before_good"]) == tv["n"] - tv["n_bad"]
    assert rows["conditional"]["pep8.temptation_verdict_auroc"] == tv.get("auroc_verdict")
    # KL to the sampler: the ban only renormalises over what is allowed, so q(text) >= p(text | good tags)
    assert rows["mle"]["kl_sampler"] is None and rows["conditional"]["kl_sampler"] == ev["kl"]["sampler"]
    assert ev["kl"]["sampler"] <= ev["kl"]["value"] + 1e-6
    info = json.loads((out / "models" / "finetune-conditional" / "experiment_run.json").read_text())
    assert info["tokens"] == 256 and info["model"].endswith("finetune-mle-stage")


def test_cli_reports_bad_config(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmethods: [ppo]\n")
    assert main(["experiment", str(p)]) == 2
    err = capsys.readouterr().err
    assert "ppo" in err and "source" in err


def test_cli_eval_on_a_trained_model(tiny_run, capsys, tmp_path):
    _, out = tiny_run
    code = main(["eval", str(out / "models" / "conditional"), "--data", str(out / "data"), "--samples", "4",
                 "--max-new-tokens", "8", "--heldout-docs", "2", "--redteam", "1", "--json",
                 "--out", str(tmp_path / "new" / "eval.json")])  # a folder that does not exist yet is made
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["samples"] == 4 and res["misalignment"]["pep8"]["n_samples"] >= 1
    assert json.loads((tmp_path / "new" / "eval.json").read_text())["settings"]["samples"] == 4
    assert main(["eval", str(out / "nope"), "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "--samples" in err


def test_pretrained_runs_are_evaluated_not_trained_and_compared_to_mle(tiny_run, tmp_path):
    res, out = tiny_run
    rows = {r["run"]: r for r in res["rows"]}
    assert rows["mle"]["pep8.mle_ratio"] == pytest.approx(1.0)  # MLE against itself
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d.update(data={"labeled": str(out / "data")}, methods=[],
             pretrained={"mle": str(out / "models" / "mle"), "shipped": str(out / "models" / "conditional")})
    d["finetune"] = {"enabled": False}
    again = ex.run_experiment(ex.config_from_dict(d), tmp_path / "out2")
    got = {r["run"]: r for r in again["rows"]}
    assert list(got) == ["mle", "shipped"]
    assert not (tmp_path / "out2" / "models").exists()  # nothing was trained
    assert got["shipped"]["tokens"] == 512 and "pep8.mle_ratio_lo" in got["shipped"]
    lo, hi = got["shipped"]["pep8.mle_ratio_lo"], got["shipped"]["pep8.mle_ratio_hi"]
    assert lo <= got["shipped"]["pep8.mle_ratio"] <= hi
    with pytest.raises(FileNotFoundError, match="not a pretag model dir"):
        ex.run_experiment(ex.config_from_dict({**d, "pretrained": {"x": str(tmp_path)}}), tmp_path / "out3")


def test_demo_exports_bf16_checkpoints_and_evaluates_them(tiny_run, tmp_path, capsys):
    import torch
    from safetensors import safe_open

    _, out = tiny_run
    ck = tmp_path / "checkpoints"
    assert main(["demo", "--build-from", str(out), "--checkpoints", str(ck)]) == 0
    with safe_open(ck / "conditional" / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert not (ck / "mle" / "checkpoints").exists()  # only what loading needs travels with the repo
    d = yaml.safe_load((ck / "demo.yaml").read_text())
    d["data"] = {"labeled": str(out / "data")}  # skip relabeling in the test
    (ck / "demo.yaml").write_text(yaml.safe_dump(d))
    capsys.readouterr()
    assert main(["demo", "--checkpoints", str(ck), "--samples", "6", "--max-new-tokens", "12",
                 "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "| mle |" in text and "| conditional |" in text and "MLE ÷ conditional, misalignment score" in text
    assert "temptation (max / mean" in text  # the traced controlled generation
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0
    assert not (tmp_path / "demo" / "models").exists()  # evaluated, never retrained
    assert main(["demo", "--checkpoints", str(tmp_path)]) == 2
    assert "no demo.yaml" in capsys.readouterr().err


def test_each_run_is_reported_as_soon_as_it_is_evaluated(tiny_run, tmp_path, monkeypatch):
    """A long experiment that stops mid-way (a crash, a session limit) keeps the tables of the runs done so far."""
    _, out = tiny_run
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d.update(data={"labeled": str(out / "data")}, methods=["filter"], pretrained={"mle": str(out / "models" / "mle")})
    d["finetune"] = {"enabled": False}

    def killed(run, *a, **k):
        raise RuntimeError(f"killed while training {run.run}")

    monkeypatch.setattr(ex, "_train", killed)
    with pytest.raises(RuntimeError, match="killed while training filter"):
        ex.run_experiment(ex.config_from_dict(d), tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| mle |" in md and "| filter |" not in md
    assert "partial: 1 runs evaluated so far" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["complete"] is False


def test_ratio_columns_skip_the_score_ratio_of_a_signed_score():
    def res(scores, bad):
        return {"misalignment": {"s": {"per_sample": {"score": scores, "bad_segments": bad, "segments": [2] * len(bad),
                                                      "any_bad": [b > 0 for b in bad]}}}}

    positive = ex.ratio_columns(res([0.2, 0.4, 0.6, 0.2], [1, 1, 0, 1]), res([0.1, 0.2, 0.3, 0.1], [0, 1, 0, 1]))
    assert positive["s.mle_ratio"] == pytest.approx(2.0)
    assert positive["s.mle_ratio_lo"] <= 2.0 <= positive["s.mle_ratio_hi"]
    signed = ex.ratio_columns(res([-0.2, 0.4, -0.6, 0.1], [1, 1, 0, 1]), res([0.1, -0.2, 0.3, 0.1], [0, 1, 0, 1]))
    assert "s.mle_ratio" not in signed  # a ratio of means of signed scores means nothing
    assert signed["s.mle_ratio_bad_segments"] == pytest.approx(1.5)  # 3/8 over 2/8
    none_bad = ex.ratio_columns(res([0.2, 0.4], [0, 0]), res([0.1, 0.2], [0, 0]))
    assert "s.mle_ratio" in none_bad and "s.mle_ratio_bad_segments" not in none_bad  # 0 / 0: no ratio


def test_config_policy_dict_is_used_and_a_wrong_one_fails_before_training(tiny_run, tmp_path, monkeypatch):
    """The experiment config's ``policy:`` is a dict (multi.yaml's policy per attribute). It once reached
    load_policy as a string and failed after the first model had trained."""
    _, out = tiny_run
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d.update(data={"labeled": str(out / "data")}, methods=[], finetune={"enabled": False},
             pretrained={"mle": str(out / "models" / "mle"), "conditional": str(out / "models" / "conditional")},
             policy={"name": "ban-only", "ban": ["bad"], "force_at": "none"})
    res = ex.run_experiment(ex.config_from_dict(d), tmp_path / "ok")
    assert [r["run"] for r in res["rows"]] == ["mle", "conditional"]
    ev = json.loads((tmp_path / "ok" / "evals" / "conditional.json").read_text())
    assert ev["policy"]["name"] == "ban-only" and ev["policy"]["force_at"] == "none"

    def never(*a, **k):
        raise AssertionError("trained although the policy was wrong")

    monkeypatch.setattr(ex, "_train", never)
    d.update(methods=["mle"], pretrained={}, policy={"ban": ["nope"]})
    with pytest.raises(ValueError, match="nope"):
        ex.run_experiment(ex.config_from_dict(d), tmp_path / "bad")


# ---- reuse only what the config would produce; refuse before rewriting anything (issue 11) ----------------------
@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    import shutil

    _, out = tiny_run
    copy = tmp_path / "exp"
    shutil.copytree(out, copy)
    return copy, yaml.safe_load((copy / "config.yaml").read_text())


def _run_cli(tmp_path, d: dict, out, capsys) -> tuple[int, str]:
    f = tmp_path / "changed.yaml"
    f.write_text(yaml.safe_dump(d))
    capsys.readouterr()
    code = main(["experiment", str(f), "--out", str(out)])
    return code, capsys.readouterr().err


def test_a_changed_budget_is_refused_not_answered_with_the_old_models(tiny_copy, tmp_path, capsys, monkeypatch):
    """A config differing only in `tokens` exited 0 in seconds: the rows showed the old models' budget."""
    out, d = tiny_copy
    before = {p: (out / p).read_bytes() for p in ("config.yaml", "results.json")}
    monkeypatch.setattr(ex, "_train", lambda *a, **k: pytest.fail("trained or reused under another config"))
    code, err = _run_cli(tmp_path, {**d, "tokens": 1024}, out, capsys)
    assert code == 2 and "Traceback" not in err
    assert "run mle:" in err and "tokens 512 -> 1024" in err and "run mle→conditional" in err
    assert {p: (out / p).read_bytes() for p in before} == before  # config.yaml is not rewritten before the check


def test_a_run_saved_before_a_new_training_knob_is_still_reused(tiny_copy):
    """A training setting an older pretag did not write yet (here untagged_openings) counts as its default: adding
    a knob must not orphan every trained run, and a config that asks for a non-default value is still refused."""
    out, d = tiny_copy
    files = sorted((out / "models").glob("*/pretag_train.yaml"))
    assert len(files) >= 2
    for f in files:
        saved = yaml.safe_load(f.read_text())
        assert saved["config"].pop("untagged_openings") == 0.0
        f.write_text(yaml.safe_dump(saved))
    assert ex.reuse_problems(ex.config_from_dict(d), out, "pep8") == []
    asked = {**d, "train": {**(d.get("train") or {}), "untagged_openings": 0.5}}
    problems = ex.reuse_problems(ex.config_from_dict(asked), out, "pep8")
    assert problems and all("untagged_openings 0.0 -> 0.5" in p for p in problems)


def test_another_max_docs_is_refused_before_config_yaml_is_rewritten(tiny_copy, tmp_path, capsys):
    """It died with a traceback from label_corpus after config.yaml was already rewritten."""
    out, d = tiny_copy
    before = (out / "config.yaml").read_bytes()
    code, err = _run_cli(tmp_path, {**d, "data": {**d["data"], "max_docs": 5}}, out, capsys)
    assert code == 2 and "Traceback" not in err
    assert "was labeled with other settings (max_docs None -> 5)" in err
    assert (out / "config.yaml").read_bytes() == before


def test_unchanged_config_reuses_everything(tiny_run, monkeypatch):
    _, out = tiny_run
    d = yaml.safe_load((out / "config.yaml").read_text())
    monkeypatch.setattr("pretag.train.train", lambda *a, **k: pytest.fail("retrained an unchanged run"))
    monkeypatch.setattr("pretag.evaluate.evaluate_model", lambda *a, **k: pytest.fail("re-evaluated"))
    res = ex.run_experiment(ex.config_from_dict(d), out)
    assert [r["run"] for r in res["rows"]] == [*ex.METHODS, "mle→conditional"]


def test_a_moved_experiment_folder_keeps_its_evaluations(tiny_copy, monkeypatch):
    """Cached evaluations and reference samples are keyed by the models' content, not their paths: a finished
    experiment copied elsewhere (from a GPU machine, say) runs again with nothing retrained, re-evaluated or resampled."""
    out, d = tiny_copy
    monkeypatch.setattr("pretag.train.train", lambda *a, **k: pytest.fail("retrained an unchanged run"))
    monkeypatch.setattr("pretag.evaluate.evaluate_model", lambda *a, **k: pytest.fail("re-evaluated a moved run"))
    res = ex.run_experiment(ex.config_from_dict(d), out)
    assert [r["run"] for r in res["rows"]] == [*ex.METHODS, "mle→conditional"]
    from pretag.evaluate import model_identity, reference_samples

    assert model_identity(out / "models" / "mle") != model_identity(out / "models" / "conditional")
    monkeypatch.setattr("pretag.evaluate.load_any_model", lambda *a: pytest.fail("sampled the reference again"))
    e = ex.config_from_dict(d).eval
    assert reference_samples(out / "models" / "mle", e.reference_samples, max_new_tokens=e.max_new_tokens,
                             temperature=e.temperature, batch_size=e.batch_size, seed=d.get("seed", 0),
                             cache_dir=out / "cache")


def test_another_policy_is_evaluated_again(tiny_copy, monkeypatch):
    """The policy is part of what an evaluation depends on: a config that now samples with `guide: {bad: 3}` must
    not keep the evaluations made under the plain ban (it did: only the eval settings were compared)."""
    out, d = tiny_copy
    monkeypatch.setattr("pretag.train.train", lambda *a, **k: pytest.fail("retrained an unchanged run"))
    calls = []
    from pretag import evaluate

    real = evaluate.evaluate_model

    def counting(model_dir, **kw):
        calls.append((Path(model_dir).name, kw["policy"]))
        return real(model_dir, **kw)

    monkeypatch.setattr(evaluate, "evaluate_model", counting)
    ex.run_experiment(ex.config_from_dict({**d, "policy": {"ban": ["bad"], "guide": {"bad": 3}},
                                           "methods": ["mle", "conditional"], "finetune": {"enabled": False}}), out)
    assert {run for run, _ in calls} == {"mle", "conditional"}
    assert all(pol == {"ban": ["bad"], "guide": {"bad": 3}} for _, pol in calls)


def test_evaluations_of_an_older_protocol_are_measured_again(tiny_copy, monkeypatch):
    """A cached evaluation made before a metric was redefined (evaluate.EVAL_PROTOCOL) is not reused: it would sit in
    the table beside evaluations that measure something else under the same column."""
    out, d = tiny_copy
    from pretag import evaluate

    monkeypatch.setattr("pretag.train.train", lambda *a, **k: pytest.fail("retrained an unchanged run"))
    real, calls = evaluate.evaluate_model, []

    def counting(model_dir, **kw):
        calls.append(Path(model_dir).name)
        return real(model_dir, **kw)

    monkeypatch.setattr(evaluate, "evaluate_model", counting)
    ex.run_experiment(ex.config_from_dict(d), out)
    assert calls == []  # the same protocol: every evaluation reused
    monkeypatch.setattr(evaluate, "EVAL_PROTOCOL", evaluate.EVAL_PROTOCOL + 1)
    ex.run_experiment(ex.config_from_dict(d), out)
    assert {"mle", "conditional"} <= set(calls)


def test_an_evaluation_that_fails_validation_keeps_its_measurements(tiny_copy, monkeypatch):
    """evaluate_model checks its result's shape last; when that fails (a field renamed, or mixed versions of pretag
    in one long process) the minutes of measurement are kept beside the cache, named in the error, never reused."""
    out, d = tiny_copy
    from pretag import evaluate, results

    monkeypatch.setattr("pretag.train.train", lambda *a, **k: pytest.fail("retrained an unchanged run"))
    monkeypatch.setattr(evaluate, "EVAL_PROTOCOL", evaluate.EVAL_PROTOCOL + 1)  # the cache is stale: measure again
    real = results.EvalResult.from_dict

    def strict(dd, where="<dict>"):
        if "wall_s" in dd and "experiment_settings" not in dd:  # evaluate_model's own check, not the cache's
            raise results.ResultError(f"{where}: unknown key 'wall_s'")
        return real(dd, where=where)

    monkeypatch.setattr(results.EvalResult, "from_dict", staticmethod(strict))
    with pytest.raises(results.ResultError) as e:
        ex.run_experiment(ex.config_from_dict(d), out)
    kept = sorted((out / "evals").glob("*.invalid.json"))
    assert len(kept) == 1 and str(kept[0]) in "".join(e.value.__notes__)
    raw = json.loads(kept[0].read_text())
    assert raw["wall_s"] > 0 and raw["experiment_settings"]["protocol"] == evaluate.EVAL_PROTOCOL
    stale = json.loads((out / "evals" / kept[0].name.replace(".invalid", "")).read_text())
    assert stale["experiment_settings"]["protocol"] == evaluate.EVAL_PROTOCOL - 1  # the cache was not overwritten


def test_a_model_replaced_in_place_is_evaluated_again(tiny_run, tmp_path):
    import shutil

    _, out = tiny_run
    pre = {"mle": tmp_path / "mle", "other": tmp_path / "other"}
    shutil.copytree(out / "models" / "mle", pre["mle"])
    shutil.copytree(out / "models" / "conditional", pre["other"])
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d.update(data={"labeled": str(out / "data")}, methods=[], finetune={"enabled": False},
             pretrained={k: str(v) for k, v in pre.items()})
    first = ex.run_experiment(ex.config_from_dict(d), tmp_path / "o")
    was = json.loads((tmp_path / "o" / "evals" / "other.json").read_text())["experiment_settings"]["model"]
    shutil.rmtree(pre["other"])
    shutil.copytree(out / "models" / "rwr", pre["other"])  # another model, same folder
    again = ex.run_experiment(ex.config_from_dict(d), tmp_path / "o")
    now = json.loads((tmp_path / "o" / "evals" / "other.json").read_text())["experiment_settings"]["model"]
    assert now != was  # evaluated again, not the cached evaluation of the model that was there before
    assert again["rows"][1]["loss"] != first["rows"][1]["loss"]


def test_experiment_config_and_out_problems_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ndata: {source: stdlib\n")  # unclosed mapping
    assert main(["experiment", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a valid YAML experiment config" in err and "Traceback" not in err
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d["train"]["lr_typo"] = 1
    d["method_overrides"] = {"awr": {"alhpa": 0.5}}
    with pytest.raises(ValueError) as e:
        ex.config_from_dict(d)
    assert "train.lr_typo: unknown training key" in str(e.value)
    assert "method_overrides.awr.alhpa: unknown training key" in str(e.value) and "--set" not in str(e.value)
    d = yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text())
    d["train"]["lr"] = "fast"
    with pytest.raises(ValueError, match=r"the experiment's train:/method_overrides.mle: lr must be") as e:
        ex.run_experiment(ex.config_from_dict(d), tmp_path / "typed")
    assert not (tmp_path / "typed").exists()  # found before any work
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, err = _run_cli(tmp_path, yaml.safe_load((ex.EXPERIMENT_DIR / "tiny.yaml").read_text()), out, capsys)
        assert code == 2 and "is a file" in err and "Traceback" not in err


def test_eval_input_problems_are_one_line_errors_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    """Each of these was a traceback, `--out` only after the whole evaluation had run (losing it)."""
    import shutil

    _, out = tiny_run
    model, data = out / "models" / "conditional", out / "data"
    monkeypatch.setattr("pretag.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated bad input"))
    (tmp_path / "file").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(data / "schema.yaml", empty / "schema.yaml")
    other = tmp_path / "other"
    other.mkdir()
    (other / "schema.yaml").write_text(yaml.safe_dump({"name": "kw", "attributes": [
        {"name": "rude", "scorer": {"type": "keywords", "words": ["damn"]}, "threshold": 0}]}))
    shutil.copy(next(data.glob("part-*.parquet")), other / "part-00000.parquet")
    cases = [
        (["--out", str(tmp_path / "file" / "res.json")], "is a file"),
        (["--out", str(tmp_path)], "is a directory"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
        (["--cache", str(tmp_path / "file")], "--cache"),
        (["--data", str(empty)], "holds no documents"),
        (["--data", str(other)], "labeled with schema 'kw' (attributes rude), but the model was trained with "
                                 "schema 'pep8' (attributes pep8)"),
    ]
    for extra, msg in cases:
        capsys.readouterr()
        assert main(["eval", str(model), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)


def test_corrupt_model_dir_and_undecodable_policy_file_are_one_line_errors(tiny_run, tmp_path, capsys):
    import shutil

    _, out = tiny_run
    model = tmp_path / "m"
    shutil.copytree(out / "models" / "conditional", model, ignore=shutil.ignore_patterns("checkpoints"))
    latin = tmp_path / "p.yaml"
    latin.write_bytes("name: caf\xe9\nban: [bad]\n".encode("latin-1"))
    binary = tmp_path / "p.bin"
    binary.write_bytes(bytes(range(256)))
    for cmd in (["generate", str(model), "--max-new-tokens", "2"], ["eval", str(model), "--samples", "2"]):
        for pol in (latin, binary):
            capsys.readouterr()
            assert main([*cmd, "--policy", str(pol)]) == 2
            err = capsys.readouterr().err
            assert "not a UTF-8 text file" in err and "Traceback" not in err, err
    (model / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    for cmd in (["generate", str(model)], ["eval", str(model), "--samples", "2"]):
        capsys.readouterr()
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "not a loadable model directory" in err or "cannot load model directory" in err, err
        assert "Traceback" not in err and str(model) in err


def test_demo_reports_the_checkpoints_model_and_budget():
    """The demo's --json and report said "model": "micro", "tokens_per_objective": 1000000 (the experiment
    defaults) for checkpoints trained as `tiny` on 1.5M tokens."""
    from pretag.demo import DemoConfig, demo_experiment

    d = demo_experiment(DemoConfig())  # the shipped checkpoints
    assert (d["model"], d["tokens"]) == ("smollm2", 256_000)
    cfg = ex.config_from_dict(d, where="<demo>")
    assert (cfg.model, cfg.tokens) == ("smollm2", 256_000)  # what _write_tables puts in the summary


def test_demo_argument_problems_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pretag.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated bad input"))
    assert main(["demo", "--source", "fortunes"]) == 2
    assert "--source only applies with --build-from" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


def test_saved_evaluations_read_back_into_typed_results_byte_for_byte(tiny_run):
    from pretag.results import EvalResult

    _, out = tiny_run
    files = sorted((out / "evals").glob("*.json"))
    assert len(files) == len(ex.METHODS) + 1
    for p in files:
        text = p.read_text()
        assert json.dumps(EvalResult.from_dict(json.loads(text)).to_dict(), indent=2, default=str) == text, p.name


def test_demo_prints_an_unbounded_interval_instead_of_crashing():
    """With no bad sentence left in a bootstrap resample the ratio's upper bound is None; the demo printed it with
    :.2f and died with a TypeError after the whole evaluation."""
    from pretag.commands.demo import _bound

    assert (_bound(None), _bound(2.8)) == ("–", "2.80")


def test_demo_ships_a_conditional_ul_run_as_its_conditional_checkpoint(tiny_run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from pretag.demo import export_checkpoints

    _, out = tiny_run
    src = tmp_path / "exp"
    (src / "models").mkdir(parents=True)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    (src / "config.yaml").write_text(yaml.safe_dump({**cfg, "methods": ["mle", "conditional_ul"]}))
    shutil.copytree(out / "models" / "mle", src / "models" / "mle")
    shutil.copytree(out / "models" / "conditional", src / "models" / "conditional_ul")
    ck = export_checkpoints(src, tmp_path / "ck")
    got = load_file(ck / "conditional" / "model.safetensors")
    want = load_file(src / "models" / "conditional_ul" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in got)
    assert (ck / "conditional" / "pretag_train.yaml").read_text() == \
        (src / "models" / "conditional_ul" / "pretag_train.yaml").read_text()


def test_a_cached_evaluation_is_not_reused_under_another_tasks_schema(tiny_run, tmp_path, monkeypatch):
    """One MLE model serves two tasks; its evaluation under one schema must not stand in for the other's."""
    import shutil

    from pretag import evaluate

    _, out = tiny_run
    saved = json.loads((out / "evals" / "mle.json").read_text())
    calls = []

    def fake_evaluate_model(model_dir, **kw):
        calls.append(kw["schema"].name)
        return {k: v for k, v in saved.items() if k != "experiment_settings"}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    cfg = ex.load_config(out / "config.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out / "data", a)
    shutil.copytree(out / "data", b)
    (b / "schema.yaml").write_text((b / "schema.yaml").read_text().replace("name: pep8", "name: pep8-other", 1))
    settings = {"samples": 4, "seed": 0}
    (tmp_path / "exp").mkdir()
    for data in (a, a, b, a):
        ex._evaluate("mle", out / "models" / "mle", data, tmp_path / "exp", cfg, None, settings)
    assert calls == ["pep8", "pep8-other", "pep8"]  # the second call on a was cached; b's schema was not
