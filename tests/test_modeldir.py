"""ModelDir: the one reader of what a model directory says (method, tags, resolved lr/beta, status)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
from test_train import cfg_for, make_dataset  # noqa: E402

from pretag.modeldir import TRAIN_FILE, ModelDir, ModelDirError  # noqa: E402


def _write(d, saved):
    d.mkdir(parents=True, exist_ok=True)
    (d / TRAIN_FILE).write_text(yaml.safe_dump(saved))
    return d


def test_the_lr_and_beta_a_run_used_are_saved_and_read_back(tmp_path):
    from pretag.train import train

    data = make_dataset(tmp_path / "ds", n_docs=12)
    res = train(cfg_for("rwr", beta="auto"), data, tmp_path / "m")  # no lr set: the preset's default
    saved = yaml.safe_load((res.out / TRAIN_FILE).read_text())
    assert saved["config"]["lr"] is None and saved["resolved"]["lr"] == 1e-3
    md = ModelDir(res.out)
    assert md.lr == 1e-3 and md.beta == res.stats["beta"] != "auto"
    assert (md.method, md.tagged, md.done) == ("rwr", False, True)
    # the saved value wins over the default computation (a future default cannot change what an old run says)
    saved["resolved"]["lr"] = 7e-4
    (res.out / TRAIN_FILE).write_text(yaml.safe_dump(saved))
    assert ModelDir(res.out).lr == 7e-4


def test_a_dir_trained_before_lr_was_saved_falls_back_to_the_default(tmp_path):
    preset = _write(tmp_path / "a", {"config": {"method": "conditional", "model": "micro", "lr": None}})
    assert ModelDir(preset).lr == 1e-3 and ModelDir(preset).tagged
    lora = _write(tmp_path / "b", {"config": {"method": "mle", "model": "smollm2", "lora": True}})
    assert ModelDir(lora).lr == 2e-4
    full = _write(tmp_path / "c", {"config": {"method": "mle", "model": "smollm2", "eval_fraction": 0.1}})
    assert ModelDir(full).lr == 1e-4 and ModelDir(full).eval_fraction == 0.1
    given = _write(tmp_path / "d", {"config": {"method": "awr", "model": "micro", "lr": 5e-4, "beta": 2.0}})
    assert ModelDir(given).lr == 5e-4 and ModelDir(given).beta == 2.0 and not ModelDir(given).done


def test_a_plain_dir_says_nothing_and_a_broken_file_is_an_error(tmp_path):
    md = ModelDir(tmp_path)
    assert not md.is_pretag and md.config == {} and md.lr is None and md.method is None and not md.tagged
    assert md.eval_fraction == 0 and md.status is None
    (tmp_path / TRAIN_FILE).write_text("config: [unclosed\n")
    with pytest.raises(ModelDirError, match=TRAIN_FILE):
        _ = ModelDir(tmp_path).config
    (tmp_path / TRAIN_FILE).write_text("- a list\n")
    with pytest.raises(ModelDirError, match="not a mapping"):
        _ = ModelDir(tmp_path).config
