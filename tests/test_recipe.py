"""The GPU recipe (recipes/gpu.sh), run end to end at toy scale on the CPU: the same script, config and data path
the device runs, with the config's quick overlay (micro model, a few thousand tokens, 8 samples)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    from pretag.label import label_corpus
    from pretag.tokens import read_labeled, train_tokenizer

    pack = tmp_path / "pack"
    summary = label_corpus("fortunes", ROOT / "recipes" / "toxicity-q25-schema.yaml", pack / "labeled", limit=120,
                           progress=False)
    # the recipe's cut: the safest 25 % of sentences are good, resolved once at labeling
    assert summary["resolved_thresholds"]["toxicity"]["good_fraction"] == 0.25
    schema, rows = read_labeled(pack / "labeled")
    train_tokenizer((r["text"] for r in rows), schema, vocab_size=512).save_pretrained(pack / "tokenizer")
    env = {**os.environ, "PY": sys.executable, "PACK_DIR": str(pack), "TOKENS": "8192", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", str(ROOT / "recipes" / "gpu.sh"), "toy"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results-8192.json").read_text())
    runs = {row["run"]: row for row in res["rows"]}
    assert set(runs) == {"mle", "conditional"}
    assert all(runs[r]["toxicity.score"] is not None for r in runs)  # scored with the real classifier
    assert (tmp_path / "out" / "results-8192.md").read_text().count("|") > 10
