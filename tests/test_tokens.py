"""Tokenizer training, tag-safe encoding (adversarial strings) and packing with aligned scores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pretag.schema import schema_from_dict  # noqa: E402
from pretag.tokens import (  # noqa: E402
    TagVocab,
    document_misaligned,
    encode_documents,
    encode_text,
    pack,
    read_labeled,
    segment_table,
    tag_ids,
    train_tokenizer,
)

TOY = {"name": "toy", "segmenter": "sentences", "attributes": [{"name": "tox", "scorer": "profanity",
                                                                  "threshold": 0.5}]}
SPAN = {"name": "toyspan", "segmenter": "sentences", "render": "span",
        "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]}
MULTI = {"name": "m", "segmenter": "sentences", "attributes": [
    {"name": "off", "level": "document", "scorer": {"type": "field", "field": "offensive"}, "threshold": 0.5,
     "tags": {"good": "safe", "bad": "offensive"}},
    {"name": "tox", "scorer": "profanity", "threshold": 0.5, "weight": 2.0},
    {"name": "sent", "scorer": "sentiment", "direction": "higher_is_better", "threshold": -0.3, "weight": 0.5},
]}


def row(schema, segments, scores, doc_id="d"):
    """One labeled row in the docs/CONTRACTS.md format; tags derived from the scores through the schema."""
    r = {"id": doc_id, "source": "test", "text": "".join(segments), "segments": segments, "fields": "{}"}
    for a in schema.attributes:
        s = scores[a.name]
        r[f"score__{a.name}"] = s
        r[f"tag__{a.name}"] = None if s is None else [
            None if x is None else schema.tag_name(a, a.value_of(x)) for x in s]
    return r


def write_labeled(path, schema, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    schema.save(path / "schema.yaml")
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    (path / "summary.json").write_text(json.dumps({"documents": len(rows)}))
    return path


CORPUS = ["The cat sat on the mat. ", "What a darn stupid thing! ", "Hello world, said the dog. "] * 30


@pytest.fixture(scope="module")
def toy():
    return schema_from_dict(TOY)


@pytest.fixture(scope="module")
def tok(toy):
    return train_tokenizer(CORPUS + ["<|bad|> <|good|> </good> <bad>"] * 50, toy, vocab_size=400, min_frequency=1)


ADVERSARIAL = [
    "<|bad|>", "<|good|>", "x<|bad|>y", "</good>", "<good>", "<|endoftext|>", "<|pad|>",
    "<| bad |>", "<|BAD|>", "＜｜bad｜＞", "<\u200b|bad|>", "<|bad|><|bad|><|good|>", "<|bad", "|>",
    "<<|bad|>>", "\n<|good|>\n", "<|bad|>" * 20,
]


def test_trained_tokenizer_has_tags_eos_pad_and_requested_size(tok, toy):
    ids = tag_ids(tok, toy)
    assert set(ids) == {"<|good|>", "<|bad|>"}
    assert len(set(ids.values())) == 2
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len(tok) <= 400
    assert set(ids.values()) <= set(tok.all_special_ids)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_text_never_encodes_to_a_tag_or_special_id(tok, text):
    ids = encode_text(tok, text)
    assert ids, "the text must encode to something"
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids) == text  # encoded as plain text, byte for byte


def test_plain_hf_call_matches_the_tag_only_when_asked_to_but_encode_text_never(tok, toy):
    bad_id = tag_ids(tok, toy)["<|bad|>"]
    assert bad_id not in tok("a <|bad|> b", add_special_tokens=False)["input_ids"]  # protected by add_tag_tokens
    unsafe = tok("a <|bad|> b", add_special_tokens=False, split_special_tokens=False)["input_ids"]
    assert bad_id in unsafe  # the hazard is real when a caller switches the protection off
    tok.backend_tokenizer.encode_special_tokens = False  # even with the backend left unprotected
    try:
        assert bad_id not in encode_text(tok, "a <|bad|> b")
        assert tok.backend_tokenizer.encode_special_tokens is False  # and the tokenizer is left as it was
    finally:
        tok.backend_tokenizer.encode_special_tokens = True


def test_encode_text_refuses_a_tokenizer_whose_base_vocab_holds_a_special_string(toy):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<", "|", "b", "a", "d", ">", "<|bad|>"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|bad|>")
    with pytest.raises(ValueError, match="special token ids"):
        encode_text(hf, "<|bad|>")


def test_tag_split_across_segments_stays_text(tok, toy):
    # a segment ending in "<|ba" followed by one starting "d|>": pieces are encoded apart, tags only by id
    r = row(toy, ["one <|ba", "d|> two. ", "</good> three."], {"tox": [0.9, 0.1, 0.0]})
    b = pack(tok, toy, [r], 64, tags=True)
    ids = b.input_ids[0][b.mask[0]]
    tag_set = set(tag_ids(tok, toy).values())
    assert int(np.isin(ids, list(tag_set)).sum()) == 3  # exactly one tag per segment, from the structure
    assert b.is_tag[0][b.mask[0]].sum() == 3
    text_ids = ids[~b.is_tag[0][b.mask[0]]]
    assert tok.decode(text_ids[:-1]) == r["text"]  # the rest is the text (then EOS)


def test_pack_aligns_scores_rewards_and_tags(tok, toy):
    rows = [row(toy, ["Good one. ", "Bad darn one. "], {"tox": [0.1, 0.9]}, "a"),
            row(toy, ["Only good."], {"tox": [0.0]}, "b")]
    b = pack(tok, toy, rows, 16, tags=True)
    ids, sc, rw, bad, tag, m = (x.reshape(-1) if x.ndim == 2 else x.reshape(-1, x.shape[-1])
                                for x in (b.input_ids, b.scores, b.reward, b.bad, b.is_tag, b.mask))
    ids, sc, rw, bad, tag = ids[m], sc[m], rw[m], bad[m], tag[m]
    good_id, bad_id = tag_ids(tok, toy)["<|good|>"], tag_ids(tok, toy)["<|bad|>"]
    eos = tok.eos_token_id
    # walk the stream and rebuild it from the rows: tag, segment text, ..., EOS
    expect = []
    for r in rows:
        for seg, s in zip(r["segments"], r["score__tox"]):
            t = good_id if s <= 0.5 else bad_id
            expect.append((t, s, True))
            expect += [(i, s, False) for i in encode_text(tok, seg)]
        expect.append((eos, math.nan, False))
    assert [e[0] for e in expect] == ids.tolist()
    for (_i, s, is_t), got_s, got_r, got_b, got_t in zip(expect, sc[:, 0], rw, bad, tag):
        assert got_t == is_t
        if math.isnan(s):
            assert math.isnan(got_s) and got_r == 0 and not got_b
        else:
            assert got_s == pytest.approx(s) and got_r == pytest.approx(-s) and got_b == (s > 0.5)
    assert b.input_ids.shape[1] == 16 and (~b.mask).sum() == b.input_ids.size - len(ids)
    assert (b.input_ids[~b.mask] == tok.pad_token_id).all()


def test_no_tags_without_conditional_and_span_render_closes(tok):
    span = schema_from_dict(SPAN)
    t = train_tokenizer(CORPUS, span, vocab_size=400, min_frequency=1)
    r = row(span, ["A. ", "B darn. ", "C darn."], {"tox": [0.0, 0.9, 0.8]})
    plain = pack(t, span, [r], 32, tags=False)
    assert not plain.is_tag.any()
    spanned = pack(t, span, [r], 32, tags=True)
    ids = spanned.input_ids[spanned.mask].tolist()
    tid = tag_ids(t, span)
    seq = [i for i in ids if i in tid.values()]
    assert seq == [tid["<good>"], tid["</good>"], tid["<bad>"], tid["</bad>"]]


def test_tag_dropout_leaves_a_fraction_untagged(tok, toy):
    rows = [row(toy, [f"S{i} a. ", "b. "], {"tox": [0.1, 0.9]}, str(i)) for i in range(200)]
    n_seg = 400
    full = pack(tok, toy, rows, 64, tags=True).is_tag.sum()
    dropped = pack(tok, toy, rows, 64, tags=True, tag_dropout=0.25, seed=1).is_tag.sum()
    assert full == n_seg
    assert 0.15 * n_seg < full - dropped < 0.35 * n_seg
    assert pack(tok, toy, rows, 64, tags=True, tag_dropout=1.0).is_tag.sum() == 0


def test_a_prompt_is_encoded_segment_by_segment_as_training_encodes_documents(toy):
    """Training encodes each segment as its own text piece, so a sentence boundary is a token boundary there. A
    prompt encoded in one piece would merge across it ("sat. " + "What" -> "." + " What"): text the model never saw."""
    from pretag.segment import segment

    text = "The cat sat. What a thing! Hello there.  It is me.\n\t\t-- Bob\n"
    tok = train_tokenizer([text * 40], toy, vocab_size=400, min_frequency=1)
    vocab = TagVocab(tok, toy)
    segs = segment(text, toy.segmenter)
    assert len(segs) >= 4 and vocab.encode(text) != [t for s in segs for t in vocab.encode(s)]  # the test can fail
    r = row(toy, segs, {"tox": [0.0] * len(segs)})
    eos = tok.eos_token_id
    plain = encode_documents(tok, toy, [r], tags=False)[0].tolist()  # an MLE document: text pieces, then EOS
    assert vocab.prompt_ids(text, None) == [eos] + plain[:-1]
    tagged = encode_documents(tok, toy, [r], tags=True)[0].tolist()  # every segment tagged good
    good = {"tox": toy.attributes[0].tags["good"]}
    assert vocab.prompt_ids(text, good, every_segment=True) == [eos] + tagged[:-1]


def test_untagged_openings_leave_a_documents_first_segments_untagged(tok, toy):
    """In the chosen documents the first k (1..n-1) segments carry no tag and the rest keep theirs, so the model must
    read the next tag from untagged text, as after a prompt rendered with prompt_tags: none; single-segment
    documents keep theirs."""
    segs, tags = ["S a. ", "b. ", "c. ", "d. "], ["<|good|>", "<|bad|>", "<|good|>", "<|bad|>"]
    rows = [row(toy, segs, {"tox": [0.1, 0.9, 0.1, 0.9]}, str(i)) for i in range(100)]
    rows.append(row(toy, ["only. "], {"tox": [0.9]}, "single"))
    expected = {k: "".join(segs[:k]) + "".join(t + x for t, x in zip(tags[k:], segs[k:])) for k in range(4)}

    def docs(blocks):  # each document's text as decoded (tags as their strings), split at EOS
        text = tok.decode(blocks.input_ids[blocks.mask].tolist(), skip_special_tokens=False)
        return [d for d in text.split(tok.eos_token) if d]

    assert docs(pack(tok, toy, rows, 64, tags=True)) == [expected[0]] * 100 + ["<|bad|>only. "]
    aug = docs(pack(tok, toy, rows, 64, tags=True, untagged_openings=1.0, seed=3))
    ks = [next(k for k, e in expected.items() if e == d) for d in aug[:-1]]
    assert set(ks) == {1, 2, 3} and aug[-1] == "<|bad|>only. "
    half = docs(pack(tok, toy, rows, 64, tags=True, untagged_openings=0.5, seed=3))
    assert 25 < sum(d != expected[0] for d in half[:-1]) < 75
    with pytest.raises(ValueError, match="untagged_openings"):
        pack(tok, toy, rows, 64, tags=True, untagged_openings=1.5)


def test_multi_attribute_reward_is_weighted_sum_and_document_level_broadcasts():
    m = schema_from_dict(MULTI)
    r = row(m, ["x. ", "y. "], {"off": [1.0], "tox": [0.2, 0.9], "sent": [0.5, -0.8]})
    scores, reward, bad = segment_table(m, r)
    # reward = -1*off + 2*(-tox) + 0.5*sent  (direction flips the sign of higher_is_better)
    assert reward.tolist() == pytest.approx([-1 - 0.4 + 0.25, -1 - 1.8 - 0.4])
    assert scores[:, 0].tolist() == [1.0, 1.0]
    assert bad.tolist() == [True, True]  # the document is offensive
    r2 = row(m, ["x. ", "y. "], {"off": [0.0], "tox": [0.2, 0.2], "sent": [0.5, -0.8]})
    assert segment_table(m, r2)[2].tolist() == [False, True]  # sentence 2 is negative


def test_threshold_zero_means_zero_not_unset(toy):
    r = row(toy, ["a. ", "b. "], {"tox": [0.0, 0.01]})
    assert segment_table(toy, r)[2].tolist() == [False, False]  # schema threshold 0.5
    assert segment_table(toy, r, threshold=0)[2].tolist() == [False, True]  # 0 is a threshold
    assert not document_misaligned(toy, r)
    assert document_misaligned(toy, r, threshold=0)


def test_unscored_segments_have_nan_scores_and_zero_reward(tok, toy):
    r = row(toy, ["a. ", "b. "], {"tox": None})
    scores, reward, bad = segment_table(toy, r)
    assert np.isnan(scores).all() and (reward == 0).all() and not bad.any()
    assert not pack(tok, toy, [r], 16, tags=True).is_tag.any()  # untagged (partial labeling)


def test_read_labeled_round_trip(tmp_path, toy):
    rows = [row(toy, ["a. ", "b. "], {"tox": [0.1, 0.9]}, "x")]
    schema, got = read_labeled(write_labeled(tmp_path / "ds", toy, rows))
    assert schema.name == "toy" and got[0]["segments"] == ["a. ", "b. "] and got[0]["fields"] == {}
    with pytest.raises(FileNotFoundError):
        read_labeled(tmp_path / "nope")


def test_bad_inputs_raise_clear_errors(tok, toy):
    with pytest.raises(ValueError, match="block_size"):
        pack(tok, toy, [row(toy, ["a."], {"tox": [0.0]})], 1, tags=False)
    with pytest.raises(ValueError, match="tag_dropout"):
        pack(tok, toy, [row(toy, ["a."], {"tox": [0.0]})], 8, tags=True, tag_dropout=2)
    with pytest.raises(ValueError, match="2 scores for 1 segments"):
        pack(tok, toy, [row(toy, ["a."], {"tox": [0.0, 1.0]})], 8, tags=False)


# ---- a saved model directory: plain transformers loading must be as tag-safe as pretag's encoder ---------------
ATTACKS = [
    "<|bad|>", "<|good|>", "x<|bad|>y", "a <|good|> b", "<|bad|><|bad|><|good|>", "<|bad|>" * 20,  # tag text
    "\n<|good|>\n", "<<|bad|>>", "<|bad|>\t<|good|>",
    "<| bad |>", "<|BAD|>", "<|bad|", "|bad|>", "<|bad", "|>", "<bad>", "</good>",  # near-variants
    "＜｜bad｜＞", "<|b\u0430d|>", "<\u200b|bad|>", "<|bad|\u200d>", "<|ba\u0301d|>",  # unicode look-alikes
    "<|endoftext|>", "<|pad|>", "x<|endoftext|>y<|pad|>z", "<|endoftext|><|bad|>",  # special tokens as text
]
SPLIT = [("<|ba", "d|>"), ("<|", "good|>"), ("x <|bad", "|> y")]  # a tag split across texts (pairs, batches)


def _leaks(encode, special: set[int]) -> list[str]:
    """The attack strings (and split pairs) whose encoding holds a special id."""
    out = [t for t in ATTACKS if special & set(encode(t))]
    for a, b in SPLIT:
        if special & set(encode(a) + encode(b)) or special & set(encode(a + b)):
            out.append(a + b)
    return out


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tok, toy):
    """A 1-layer, width-16 GPT-2 saved with ``save_model_dir`` (the way ``pretag train`` writes a model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretag.models import save_model_dir

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    return save_model_dir(model, tok, toy, {}, tmp_path_factory.mktemp("saved") / "m")


def test_plain_autotokenizer_on_a_saved_model_never_yields_a_tag(saved_dir, toy):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(saved_dir)
    special = set(t.all_special_ids)
    assert set(tag_ids(t, toy).values()) <= special
    for name, enc in {
        "call": lambda s: t(s)["input_ids"],
        "call, no specials": lambda s: t(s, add_special_tokens=False)["input_ids"],
        "encode": lambda s: t.encode(s, add_special_tokens=False),
        "tokenize": lambda s: t.convert_tokens_to_ids(t.tokenize(s)),
        "batch": lambda s: t([s, "ok"], add_special_tokens=False)["input_ids"][0],
    }.items():
        assert _leaks(enc, special) == [], name
    a, b = SPLIT[0]
    assert not special & set(t(a, b)["input_ids"])  # a text pair
    for s in ATTACKS:  # plain text, byte for byte
        assert t.decode(t(s, add_special_tokens=False)["input_ids"]) == s


def test_pretag_loader_on_a_saved_model_never_yields_a_tag(saved_dir, toy):
    from pretag.models import load_model_dir

    _, t, _ = load_model_dir(saved_dir)
    special = set(t.all_special_ids)
    assert _leaks(lambda s: encode_text(t, s), special) == []
    assert _leaks(lambda s: t(s, add_special_tokens=False)["input_ids"], special) == []
    # insertion by id still works: the tag ids exist and decode to the tag text
    ids = tag_ids(t, toy)
    assert t.decode([ids["<|bad|>"]]) == "<|bad|>"


def test_an_old_model_dir_is_protected_by_pretags_loader_and_by_the_upgrade(saved_dir, tmp_path, toy, caplog):
    """A directory saved before pretag wrote ``split_special_tokens`` (like the demo checkpoints once were)."""
    import shutil

    from transformers import AutoTokenizer

    from pretag.models import load_model_dir
    from pretag.tokens import tokenizer_config_protected, upgrade_tokenizer_config

    old = shutil.copytree(saved_dir, tmp_path / "old")
    cfg_file = old / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["split_special_tokens"]
    cfg_file.write_text(json.dumps(cfg))
    assert tokenizer_config_protected(old) is False
    plain = AutoTokenizer.from_pretrained(old)
    special = set(plain.all_special_ids)
    assert len(_leaks(lambda s: plain(s)["input_ids"], special)) >= 10  # what a plain user of an old dir gets

    with caplog.at_level("WARNING", logger="pretag.models"):
        _, t, _ = load_model_dir(old)
    assert "split_special_tokens" in caplog.text
    assert _leaks(lambda s: t(s)["input_ids"], special) == []  # pretag's loader forces the setting
    assert tokenizer_config_protected(old) is False  # loading never writes

    assert upgrade_tokenizer_config(old) is True and upgrade_tokenizer_config(old) is False
    assert {k: v for k, v in json.loads(cfg_file.read_text()).items() if k != "split_special_tokens"} == cfg
    plain = AutoTokenizer.from_pretrained(old)
    assert _leaks(lambda s: plain(s)["input_ids"], special) == []


def test_shipped_demo_checkpoints_are_tag_safe_for_plain_transformers():
    from pathlib import Path

    from pretag.tokens import tokenizer_config_protected

    root = Path(__file__).resolve().parents[1] / "demo" / "checkpoints"
    dirs = sorted(p.parent for p in root.glob("*/tokenizer_config.json"))
    assert dirs and all(tokenizer_config_protected(d) for d in dirs), dirs


def test_text_that_is_not_unicode_is_a_clear_value_error(tok):
    """Issue 11 item 9: tokenizers raised ``TypeError: TextEncodeInput must be ...`` for these."""
    with pytest.raises(ValueError, match=r"text is not valid UTF-8 \(byte 0xff at character 1\)"):
        encode_text(tok, "a\udcffb")  # what Python makes of the bytes a\xffb in argv
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at character 1"):
        encode_text(tok, "a\ud800b")  # JSON "a\ud800b"
    assert encode_text(tok, "a\u00ffb")  # the character ÿ itself is fine


def test_tokenize_cli_with_invalid_utf8_bytes_is_one_line(saved_dir):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pretag", "tokenize", str(saved_dir), "--text", b"a\xffb"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "pretag tokenize: error: --text is not valid UTF-8 (byte 0xff at character 1)"


def test_tokenize_cli_reports_and_upgrades_an_old_dir(saved_dir, tmp_path, capsys):
    import shutil

    from pretag.cli import main

    old = shutil.copytree(saved_dir, tmp_path / "old")
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    del cfg["split_special_tokens"]
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["tokenize", str(old), "--text", "<|bad|>", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plain_autotokenizer_tag_safe"] is False and out["tag_ids_in_text"] == []
    assert main(["tokenize", str(old), "--text", "<|bad|>", "--upgrade"]) == 0
    assert "split_special_tokens added" in capsys.readouterr().out
    assert main(["tokenize", str(old), "--text", "<|bad|>", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plain_autotokenizer_tag_safe"] is True


def test_percentile_filter_drops_the_worst_fraction_of_documents():
    from pretag.tokens import percentile_filter

    schema = schema_from_dict({"name": "t", "segmenter": "lines",
                               "attributes": [{"name": "x", "scorer": "profanity", "threshold": 0.5}]})
    rows = [row(schema, ["a\n", "b\n"], {"x": [i / 10, i / 10]}, doc_id=str(i)) for i in range(10)]
    kept = percentile_filter(schema, rows, 0.2)
    assert [r["id"] for r in kept] == [str(i) for i in range(8)]  # the two highest averages go
    with pytest.raises(ValueError, match="filter_drop"):
        percentile_filter(schema, rows, 1.0)


def test_good_swap_maps_each_bad_tag_to_its_attributes_good_tag(tok, toy):
    from pretag.tokens import good_swap, tag_ids

    ids = tag_ids(tok, toy)
    swap = good_swap(tok, toy)
    for a in toy.attributes:
        good = next(v for v in a.values if v not in a.bad)
        for v in a.bad:
            assert swap[ids[toy.open_token(a.tags[v])]] == ids[toy.open_token(a.tags[good])]
    assert not set(swap.values()) & set(swap)  # a good tag is never swapped
