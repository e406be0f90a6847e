"""The GPU recipe (recipes/gpu.sh), run end to end at toy scale on the CPU: the same script, configs and data layout
the device runs (two tasks side by side, results packed into $OUT), with the configs' quick overlay (micro model, a
few thousand tokens, 8 samples)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    from pretag.inline import inline_dataset
    from pretag.label import label_corpus
    from pretag.tokens import read_labeled, train_tokenizer

    pack = tmp_path / "pack"
    for task, schema_file, word in (("tox", "toxicity-q25-schema.yaml", 0.05), ("neg", "negativity-schema.yaml", 0.5)):
        label_corpus("fortunes", ROOT / "recipes" / schema_file, tmp_path / f"{task}-labeled", limit=120,
                     progress=False)
        inline_dataset(tmp_path / f"{task}-labeled", pack / ("tox-inline05" if task == "tox" else "neg-inline"),
                       word_threshold=word)
    schema, rows = read_labeled(pack / "tox-inline05")
    train_tokenizer((r["text"] for r in rows), schema, vocab_size=512).save_pretrained(pack / "tokenizer")
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "PACK_DIR": str(pack), "OUT": str(out), "WORK": str(tmp_path / "work"),
           "JOBS": "toxicity:0:8192 negativity:1:8192"}
    r = subprocess.run(["bash", str(ROOT / "recipes" / "gpu.sh"), "toy"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "summary.md"]  # what comes back from the device
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        assert not [n for n in names if n.endswith(".safetensors")]  # weights stay on the device
        for job, attr in (("toxicity-s0-8192", "toxicity"), ("negativity-s1-8192", "negativity")):
            res = json.load(tar.extractfile(f"{job}/results.json"))
            runs = {row["run"]: row for row in res["rows"]}
            assert set(runs) == {"mle", "conditional"}
            assert all(runs[r][f"{attr}.score"] is not None for r in runs)  # scored with the real classifier
            assert f"{job}/evals/conditional.json" in names and f"{job}.log" in names
        cfg = tar.extractfile("negativity-s1-8192.yaml").read().decode()
        assert "seed: 1" in cfg and str(pack) in cfg  # the job's seed and the pack it read
    summary = (out / "summary.md").read_text()
    assert "## toxicity-s0-8192" in summary and "## negativity-s1-8192" in summary
