"""Training end to end on a tiny labeled dataset: config layering, all six methods, resume after SIGKILL, CLI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np
import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.schema import schema_from_dict  # noqa: E402
from pretag.train import CONFIG_DIR, last_checkpoint, parse_sets, resolve_config, train  # noqa: E402

TOY = {"name": "toy", "segmenter": "sentences", "attributes": [{"name": "tox", "scorer": "profanity",
                                                                  "threshold": 0.5}]}
GOOD = ["The cat sat on the mat. ", "Hello world, said the dog. ", "We like tea. ", "It rains today. "]
BAD = ["What a darn stupid thing! ", "Damn this crap. "]
SMALL = {"model": "micro", "block_size": 32, "batch_size": 4, "vocab_size": 300, "logging_steps": 1,
         "eval_steps": 4, "save_steps": 4, "precision": "bf16"}


def make_dataset(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A labeled dataset in the docs/CONTRACTS.md format: 5 sentences per doc, ~30% of them 'bad'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = schema_from_dict(TOY)
    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        segs = [rng.choice(BAD if rng.random() < 0.3 else GOOD) for _ in range(5)]
        scores = [0.9 if s in BAD else 0.05 for s in segs]
        rows.append({"id": f"doc{i}", "source": "test", "text": "".join(segs), "segments": segs, "fields": "{}",
                     "score__tox": scores, "tag__tox": ["bad" if x > 0.5 else "good" for x in scores]})
    path.mkdir(parents=True, exist_ok=True)
    schema.save(path / "schema.yaml")
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "toy")


def cfg_for(method, tokens=4 * 4 * 32, **kw):
    return resolve_config(method, sets={**SMALL, **kw}, tokens=tokens)


# ---- config ------------------------------------------------------------------------------------------------------
def test_paper_presets_layer_and_threshold_zero_is_kept():
    c = resolve_config("unlikelihood", schema_name="pep8")
    assert c.alpha == 0.01 and c.threshold == 0.0 and c.threshold is not None
    c = resolve_config("awr", schema_name="pep8")
    assert (c.alpha, c.beta) == (0.05, 1.0)
    assert resolve_config("rwr", schema_name="pep8").beta == 10
    assert resolve_config("conditional", schema_name="pep8").tag_dropout == 0.1
    assert resolve_config("conditional", schema_name="toxicity").tag_dropout == 0.01
    assert resolve_config("unlikelihood", schema_name="toxicity").threshold is None  # the schema's own
    c = resolve_config("unlikelihood", schema_name="pep8", sets={"alpha": 0.5, "threshold": 0})
    assert c.alpha == 0.5 and c.threshold == 0.0
    assert c.sources[-1] == "--set"


def test_user_config_file_and_methods_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.0003\nmethods:\n  rwr: {beta: 3}\n  awr: {beta: 7}\n")
    assert resolve_config("rwr", schema_name="pep8", config_file=f).beta == 3
    assert resolve_config("rwr", schema_name="pep8", config_file=f).lr == 0.0003
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it spells
    f.write_text("lr: 1e-3\nmethods:\n  rwr: {beta: 2E+1}\n")
    c = resolve_config("rwr", schema_name="pep8", config_file=f, sets=parse_sets(["weight_clip=5e2"]))
    assert (c.lr, c.beta, c.weight_clip) == (0.001, 20.0, 500.0)
    with pytest.raises(ValueError, match="lr must be float"):
        resolve_config("mle", sets=parse_sets(["lr=1e-3x"]))


def test_config_problems_are_all_reported_at_once(tmp_path):
    with pytest.raises(ValueError) as e:
        resolve_config("awr", sets={"alpha": 2, "beta": 0, "nope": 1, "tokens": "many", "precision": "fp8",
                                    "tag_weight": 0})
    msg = str(e.value)
    for needle in ("alpha", "beta must be > 0", "unknown key 'nope'", "tokens must be int", "precision",
                   "tag_weight must be > 0"):
        assert needle in msg
    with pytest.raises(ValueError, match="unknown method"):
        resolve_config("dpo")
    with pytest.raises(ValueError, match="lora needs a pretrained model"):
        resolve_config("mle", sets={"lora": True})


def test_every_shipped_config_resolves_for_every_method():
    for task in sorted(p.stem for p in (CONFIG_DIR / "tasks").glob("*.yaml")):
        for m in ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr"):
            assert resolve_config(m, sets={"task": task}).method == m


# ---- training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mle", "filter", "conditional", "unlikelihood", "rwr", "awr", "conditional_ul"])
def test_each_method_changes_parameters_with_finite_losses(data, tmp_path, method, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    from pretag.models import build_model

    unmasked = []  # forwards without an attention mask: transformers warns "your input_ids may be padded"
    check = PreTrainedModel.warn_if_padding_and_no_attention_mask
    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask",
                        lambda self, ids, mask: (unmasked.append(ids.shape) if mask is None else None,
                                                 check(self, ids, mask))[1])
    cfg = cfg_for(method, threshold=0.5 if method == "filter" else None)
    res = train(cfg, data, tmp_path / method)
    assert not unmasked, f"{len(unmasked)} training forwards without an attention mask"
    assert res.steps == 4
    assert torch.isfinite(torch.tensor(res.train_loss)) and torch.isfinite(torch.tensor(res.eval_loss))
    tok = AutoTokenizer.from_pretrained(res.out)
    trained = AutoModelForCausalLM.from_pretrained(res.out)
    init = build_model("micro", len(tok), seed=cfg.seed)
    changed = [n for n, p in trained.state_dict().items()
               if p.is_floating_point() and not torch.equal(p, init.state_dict()[n])]
    assert len(changed) >= 0.8 * sum(1 for p in init.state_dict().values() if p.is_floating_point())
    if method in ("conditional", "conditional_ul"):
        assert res.stats["tag_tokens"] > 0
    else:
        assert res.stats["tag_tokens"] == 0
    if method == "filter":
        assert res.stats["filtered_out"] > 0  # documents averaging above 0.5 are gone
    if method == "awr":
        assert (res.out / "value_head.pt").exists()
        assert not any("value_head" in k for k in trained.state_dict())
    metrics = (res.out / "metrics.csv").read_text()
    assert "tokens_per_s" in metrics and "eval_loss" in metrics
    if method == "conditional_ul":  # the counterfactual term ran and was logged
        assert "obj/ul_bad_under_good" in metrics
    assert list((res.out / "tensorboard").glob("events.*"))


def test_filter_threshold_zero_drops_every_doc_with_a_violation(data, tmp_path):
    with pytest.raises(ValueError, match="every training document is misaligned"):
        train(cfg_for("filter", threshold=0), data, tmp_path / "f0")  # every toy doc has a score > 0


def test_resuming_with_a_different_config_is_refused(data, tmp_path):
    train(cfg_for("mle"), data, tmp_path / "r")
    with pytest.raises(ValueError, match="different config"):
        train(cfg_for("mle", lr=0.5), data, tmp_path / "r")


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / ".staging" / "checkpoint-8").mkdir(parents=True)  # killed mid-write
    (tmp_path / "checkpoint-12").mkdir()  # no trainer_state.json: not ours / incomplete
    assert last_checkpoint(tmp_path).name == "checkpoint-4"


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pretag", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_and_rerun_ends_where_an_uninterrupted_run_ends(data, tmp_path):
    steps = 40
    sets = [f"--set={k}={v}" for k, v in {**SMALL, "save_steps": 2, "eval_steps": 1000}.items()]
    cmd = [str(data), "--method", "awr", "--tokens", str(steps * 4 * 32), *sets]
    ref = _cli("train", *cmd, "--out", str(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    out = tmp_path / "killed"
    p = _cli("train", *cmd, "--out", str(out))
    deadline = time.time() + 120
    while last_checkpoint(out / "checkpoints") is None and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    at_kill = last_checkpoint(out / "checkpoints")
    assert at_kill is not None and int(at_kill.name.split("-")[1]) < steps, "the run must be killed mid-way"
    assert not (out / "model.safetensors").exists()
    again = _cli("train", *cmd, "--out", str(out), "--json")
    text = again.communicate(timeout=300)[0]
    assert again.returncode == 0, text
    summary = json.loads(text[text.index("{"):])
    assert summary["resumed_from"] is not None and summary["steps"] == steps
    a, b = _weights(tmp_path / "ref"), _weights(out)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k
    la = _losses(tmp_path / "ref")
    lb = _losses(out)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))  # every step logged once, none twice
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-3, abs=1e-4), s


def _losses(out):
    import csv

    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == "loss"]
    return {int(r["step"]): float(r["value"]) for r in rows}


def test_output_loads_with_plain_transformers_and_cli_tokenize(data, tmp_path):
    res = train(cfg_for("conditional"), data, tmp_path / "m")
    code = (
        "import sys, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(res.out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(res.out)!r})\n"
        "ids = t.convert_tokens_to_ids(['<|good|>', '<|bad|>'])\n"
        "assert 'pretag' not in sys.modules\n"
        "print(json.dumps({'n': len(t), 'v': m.config.vocab_size, 'ids': ids}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert got["n"] == got["v"] and all(isinstance(i, int) and i >= 0 for i in got["ids"])
    assert (res.out / "pretag_schema.yaml").exists() and (res.out / "pretag_train.yaml").exists()
    p = _cli("tokenize", str(res.out), "--text", "a <|bad|> b </good><|good|>", "--json")
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    js = json.loads(out[out.index("{"):])
    assert js["tag_ids_in_text"] == [] and not set(js["ids"]) & set(js["tag_ids"].values())
    assert "".join(js["pieces"]) == "a <|bad|> b </good><|good|>"


def test_cli_reports_bad_input_clearly(data, tmp_path):
    p = _cli("train", str(data), "--method", "rwr", "--out", str(tmp_path / "x"), "--set", "beta=-1",
             "--set", "bogus=1")
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2
    assert "beta must be > 0" in out and "unknown key 'bogus'" in out and "Traceback" not in out
    p = _cli("train", str(tmp_path / "nothing"), "--out", str(tmp_path / "y"))
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "not a labeled dataset" in out
    (tmp_path / "bin.yaml").write_bytes(b"lr: \xff\xfe\x00")
    p = _cli("train", str(data), "--config", str(tmp_path / "bin.yaml"), "--out", str(tmp_path / "z"))
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "not a UTF-8 text file" in out and "Traceback" not in out


def test_beta_auto_is_the_reward_spread_and_trains(data, tmp_path):
    from types import SimpleNamespace

    from pretag.train import auto_beta

    blocks = SimpleNamespace(reward=np.array([[-1.0, -3.0, 9.0, np.nan]], dtype=np.float32),
                             mask=np.array([[True, True, False, True]]), is_tag=np.zeros((1, 4), dtype=bool))
    assert auto_beta(blocks) == pytest.approx(1.0)  # std of {-1, -3}; the padded and NaN tokens do not count
    blocks.reward[:] = -2.0
    assert auto_beta(blocks) == 1.0  # a constant reward: no scale to match
    with pytest.raises(ValueError, match="beta must be > 0 or 'auto'"):
        resolve_config("rwr", sets={"beta": "hot"})
    res = train(cfg_for("rwr", beta="auto"), data, tmp_path / "rwr-auto")
    assert res.stats["beta"] > 0 and res.stats["beta"] != 1.0
    assert torch.isfinite(torch.tensor(res.train_loss))


# ---- the output folder: never overwrite silently; resume reports the same summary (issue 11) -------------------
def test_train_refuses_a_folder_holding_another_model_unless_overwrite(data, tmp_path):
    """A second run into a trained model's folder replaced model.safetensors and the schema, with exit 0."""
    out = tmp_path / "m"
    train(cfg_for("mle"), data, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds a run with a different config \(method 'mle' -> 'conditional'"):
        train(cfg_for("conditional"), data, out)
    assert (out / "model.safetensors").read_bytes() == before
    res = train(cfg_for("mle"), data, out)  # the same command: the same run, resumed (here: already finished)
    assert res.resumed_from is not None and (out / "model.safetensors").exists()
    import shutil

    shutil.rmtree(out / "checkpoints")  # a finished model, its checkpoints removed to save space
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="different config"):
        train(cfg_for("mle", lr=0.5), data, out)
    assert (out / "model.safetensors").read_bytes() == before
    res = train(cfg_for("conditional"), data, out, overwrite=True)
    assert res.resumed_from is None and res.steps == 4
    assert "conditional" in (out / "pretag_train.yaml").read_text()
    assert sorted(json.loads((out / "checkpoints" / "checkpoint-4" / "pretag_losses.json").read_text())) == \
        ["1", "2", "3", "4"]


def test_train_refuses_a_plain_hf_model_a_dataset_and_a_file(data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(hf)
    with pytest.raises(ValueError, match="holds a Hugging Face model"):
        train(cfg_for("mle"), data, hf)
    with pytest.raises(ValueError, match="holds a labeled dataset"):
        train(cfg_for("mle"), data, data, overwrite=True)  # never, not even with --overwrite: it is the input
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(cfg_for("mle"), data, tmp_path / "f")
    with pytest.raises(ValueError, match="is a file, so no directory"):
        train(cfg_for("mle"), data, tmp_path / "f" / "sub")
    p = _cli("train", str(data), "--out", str(hf), "--model", "micro", "--tokens", "512")
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "Hugging Face model" in out and "--overwrite" in out and "Traceback" not in out


def test_resumed_training_reports_the_same_summary_and_throughput_rows(data, tmp_path):
    """Resumed from checkpoint-4 of 8 steps: HF's training_loss averaged only steps 5-8, and the first step
    logged after the resume had no tokens_per_s row."""
    import csv
    import shutil

    cfg = cfg_for("mle", tokens=8 * 4 * 32, logging_steps=2, save_steps=4, eval_steps=1000)
    ref = train(cfg, data, tmp_path / "ref")
    out = tmp_path / "resumed"
    train(cfg, data, out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")  # as if killed between step 4 and step 8
    (out / "model.safetensors").unlink()
    res = train(cfg, data, out)
    assert res.resumed_from == "checkpoint-4" and res.steps == ref.steps == 8
    assert res.train_loss == ref.train_loss
    assert res.eval_loss == pytest.approx(ref.eval_loss, rel=1e-6)

    def rows(path):
        with (path / "metrics.csv").open() as f:
            return sorted((int(r["step"]), r["name"]) for r in csv.DictReader(f))

    assert rows(out) == rows(tmp_path / "ref")
    assert [s for s, n in rows(out) if n == "tokens_per_s"] == [2, 4, 6, 8]
