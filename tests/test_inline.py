"""Inline tags: sentences cut at flagged words, the bad tag before each flagged run, training and the CLI on it."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from pretag.cli import main  # noqa: E402
from pretag.inline import WORD, inline_dataset, split_flagged  # noqa: E402
from pretag.label import load_labeled  # noqa: E402
from pretag.schema import schema_from_dict  # noqa: E402

SCHEMA = {"name": "tox", "segmenter": "sentences", "label_fraction": 0.5,
          "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]}
DOCS = [
    ["This damn shit is stupid. ", "The weather is fine today. "],
    ["We like tea and cake. ", "What a fucking idiot, said Bob. "],
    ["Nothing here at all. "],
]


def test_split_flagged_keeps_the_text_and_gives_flagged_runs_their_space():
    seg = "Well, Damn  it all, damn! said the idiot's friend."
    pieces = split_flagged(seg, {"damn", "it", "idiot's"})
    assert "".join(p.text for p in pieces) == seg
    assert [(p.text, p.flagged) for p in pieces] == [
        ("Well,", False), (" Damn  it", True), (" all,", False), (" damn", True), ("! said the", False),
        (" idiot's", True), (" friend.", False)]
    assert [(p.text, p.flagged) for p in split_flagged("damn.", {"damn"})] == [("damn", True), (".", False)]
    assert [(p.text, p.flagged) for p in split_flagged("clean 42", {"damn"})] == [("clean 42", False)]
    assert WORD.findall("don't x2 l'été") == ["don't", "x", "l'été"]  # digits are never words


def _dataset(tmp_path, docs=DOCS, schema=SCHEMA, untag=()):
    src = tmp_path / "src"
    src.mkdir()
    s = schema_from_dict(schema)
    s.save(src / "schema.yaml")
    rows = [{"id": f"d{i}", "source": "t", "text": "".join(d), "segments": d, "fields": "{}",
             "score__tox": [0.5] * len(d), "tag__tox": [None if (i, j) in untag else "bad" for j in range(len(d))]}
            for i, d in enumerate(docs)]
    pq.write_table(pa.Table.from_pylist(rows), src / "part-00000.parquet")
    return src


def test_inline_dataset_tags_flagged_words_bad_and_the_rest_good(tmp_path):
    src = _dataset(tmp_path, untag={(1, 0)})
    info = inline_dataset(src, tmp_path / "out", word_threshold=0.5)
    schema, rows = load_labeled(tmp_path / "out")
    assert {"damn", "shit", "fucking", "idiot"} <= set(info["worst_words"]) and "tea" not in info["worst_words"]
    for row, doc in zip(rows, DOCS):
        assert "".join(row["segments"]) == row["text"] == "".join(doc)  # nothing lost, nothing added
        assert len(row["segments"]) == len(row["score__tox"]) == len(row["tag__tox"])
        for seg, tag, score in zip(row["segments"], row["tag__tox"], row["score__tox"]):
            words = {w.lower() for w in WORD.findall(seg)}
            if tag == "bad":
                assert words <= set(info["worst_words"]) | {"shit"} and score > 0.5  # flagged: bad on its own
            elif tag == "good":
                assert not words & {"damn", "shit", "fucking", "idiot"}
    first = rows[0]
    assert first["tag__tox"][:3] == ["good", "bad", "good"] and first["segments"][1] == " damn shit"
    assert rows[1]["segments"][0] == "We like tea and cake. " and rows[1]["tag__tox"][0] is None  # untagged stays
    assert rows[2]["tag__tox"] == ["good"]  # a clean sentence is one good piece
    saved = json.loads((tmp_path / "out" / "inline.json").read_text())
    assert saved["word_threshold"] == 0.5 and saved["flagged_runs"] == sum(t == "bad" for r in rows for t in
                                                                           r["tag__tox"])
    assert "Inline tags on tox" in schema.description
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["inline"]["flagged_words"] == info["flagged_words"] and summary["segments"] == info["pieces"]


def test_inline_refuses_the_source_a_used_folder_and_an_unknown_attribute(tmp_path):
    src = _dataset(tmp_path)
    with pytest.raises(ValueError, match="is the source dataset"):
        inline_dataset(src, src, word_threshold=0.5)
    with pytest.raises(ValueError, match="'nope' is not a binary segment-level attribute.*those are: tox"):
        inline_dataset(src, tmp_path / "o", word_threshold=0.5, attribute="nope")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        inline_dataset(src, used, word_threshold=0.5)
    assert (used / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="not a labeled dataset"):
        inline_dataset(tmp_path / "nothing", tmp_path / "o2", word_threshold=0.5)


def test_cli_inline_then_conditional_training_sees_the_inline_tags(tmp_path, capsys):
    from pretag.train import resolve_config, train

    src = _dataset(tmp_path, docs=DOCS * 6)
    assert main(["inline", str(src), "--out", str(tmp_path / "inl"), "--word-threshold", "0.5"]) == 0
    assert "flagged runs" in capsys.readouterr().out
    assert main(["inline", str(src), "--out", str(tmp_path / "inl"), "--word-threshold", "0.5"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    cfg = resolve_config("conditional", tokens=2 * 4 * 32, sets={
        "model": "micro", "block_size": 32, "batch_size": 4, "vocab_size": 300, "eval_steps": 2, "save_steps": 2,
        "tag_dropout": 0.0})
    plain = train(cfg, src, tmp_path / "plain")
    inl = train(cfg, tmp_path / "inl", tmp_path / "m")
    assert inl.stats["tag_tokens"] > plain.stats["tag_tokens"]  # a tag before each flagged run, not one a sentence


def test_experiment_trains_on_an_inline_copy_made_once_per_threshold(tmp_path):
    from pretag import experiment as ex

    src = _dataset(tmp_path)
    dest = ex._inline_copy(src, tmp_path / "out" / "data-inline", 0.5)
    info = dest / "inline.json"
    first = info.stat().st_mtime_ns
    assert ex._inline_copy(src, dest, 0.5) == dest and info.stat().st_mtime_ns == first  # reused
    ex._inline_copy(src, dest, 0.9)
    assert json.loads(info.read_text())["word_threshold"] == 0.9  # another threshold: made again
    d = {"name": "x", "data": {"labeled": str(src), "inline_word_threshold": 0.1}, "methods": ["conditional"]}
    assert ex.config_from_dict(d).data.inline_word_threshold == 0.1
    with pytest.raises(ValueError, match="inline_word_threshold"):
        ex.config_from_dict({**d, "data": {"labeled": str(src), "inline_word_threshold": "lots"}})


def test_demo_rebuilds_an_inline_experiments_data_from_the_source(tmp_path):
    import yaml

    from pretag.demo import DemoConfig, relabel_data

    src = _dataset(tmp_path)
    inline_dataset(src, tmp_path / "inl", word_threshold=0.5)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump({"data": {"labeled": str(tmp_path / "inl"), "schema": "pep8"}}))
    dest = tmp_path / "ckpt"
    data = relabel_data(exp, "fortunes", dest)
    assert data == {"source": "fortunes", "schema": "schema.yaml", "label_options": {"num_proc": 2},
                    "inline_word_threshold": 0.5}
    assert (dest / "schema.yaml").read_text() == (src / "schema.yaml").read_text()  # the source's, not the copy's
    (dest / "demo.yaml").write_text(yaml.safe_dump({"name": "d", "data": data}))
    for run in ("mle", "conditional"):
        (dest / run).mkdir()
        (dest / run / "adapter_config.json").write_text("{}")  # a LoRA dir saved small counts as a checkpoint
    from pretag.demo import demo_experiment

    d = demo_experiment(DemoConfig(checkpoints=dest))
    assert d["data"]["schema"] == str(dest / "schema.yaml") and d["data"]["inline_word_threshold"] == 0.5


def test_experiment_refuses_models_trained_on_another_inline_threshold(tmp_path):
    from pretag import experiment as ex

    src = _dataset(tmp_path)
    out = tmp_path / "out"
    ex._inline_copy(src, out / "data-inline", 0.5)
    (out / "models").mkdir()
    d = {"name": "x", "data": {"labeled": str(src), "inline_word_threshold": 0.9}, "methods": ["mle"],
         "model": "micro"}
    problems = ex.reuse_problems(ex.config_from_dict(d), out, "tox")
    assert any("word threshold 0.5" in p and "0.9" in p for p in problems), problems
    d["data"]["inline_word_threshold"] = 0.5
    assert not [p for p in ex.reuse_problems(ex.config_from_dict(d), out, "tox") if "inline" in p]
