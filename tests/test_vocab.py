"""TagVocab (a tokenizer and a schema bound once) and the schema's reward and badness: checked against direct,
slow renderings written out here, so a change to the shared code cannot hide behind itself."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pretag.schema import schema_from_dict  # noqa: E402
from pretag.segment import segment  # noqa: E402
from pretag.tokens import TagVocab, encode_text, train_tokenizer  # noqa: E402

PREFIX = {"name": "toy", "segmenter": "sentences", "attributes": [{"name": "tox", "scorer": "profanity",
                                                                   "threshold": 0.5}]}
SPAN = {**PREFIX, "name": "toyspan", "render": "span"}
MULTI = {"name": "m", "segmenter": "sentences", "attributes": [
    {"name": "off", "level": "document", "scorer": {"type": "field", "field": "offensive"}, "threshold": 0.5,
     "tags": {"good": "safe", "bad": "offensive"}},
    {"name": "tox", "scorer": "profanity", "threshold": 0.5},
    {"name": "sent", "scorer": "sentiment", "direction": "higher_is_better", "threshold": -0.3},
]}
CORPUS = ["The cat sat on the mat. ", "What a darn stupid thing! ", "Hello world, said the dog. "] * 20
PROMPTS = ["", "The cat sat. What a darn thing! Hello", "x <|bad|> y. <|good|>z"]


@pytest.fixture(scope="module", params=[PREFIX, SPAN, MULTI], ids=["prefix", "span", "multi"])
def bound(request):
    schema = schema_from_dict(request.param)
    return schema, train_tokenizer(CORPUS, schema, vocab_size=400, min_frequency=1)


def direct_prompt_ids(tok, schema, prompt, start_tags, every_segment):
    """The prompt rendering written out step by step (the pre-TagVocab ``generate.prompt_ids``)."""
    tid = tok.convert_tokens_to_ids
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [start]
    enc = lambda t: encode_text(tok, t) if t else []  # noqa: E731
    segs = segment(prompt, schema.segmenter)  # one text piece per segment, as training encodes them
    if start_tags is None:
        return ids + [t for s in segs for t in enc(s)]
    ids += [tid(schema.open_token(start_tags[a.name])) for a in schema.document_attributes]
    seg_tags = [tid(schema.open_token(start_tags[a.name])) for a in schema.segment_attributes]
    if schema.render == "span":
        return ids + seg_tags + [t for s in segs for t in enc(s)]
    for i, s in enumerate(segs):
        if i == 0 or every_segment:
            ids += seg_tags
        ids += enc(s)
    return ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_match_the_direct_rendering(bound, prompt):
    schema, tok = bound
    vocab = TagVocab(tok, schema)
    good = {a.name: a.tags[a.values[0]] for a in schema.attributes}
    bad = {a.name: a.tags["bad"] for a in schema.attributes}
    for tags in (good, bad, None):
        for every in (False, True):
            assert vocab.prompt_ids(prompt, tags, every_segment=every) == \
                direct_prompt_ids(tok, schema, prompt, tags, every)
    assert vocab.prompt_ids(prompt, None)[0] == tok.eos_token_id  # no BOS: the EOS separator starts a document


def test_render_inserts_tags_by_id_and_text_tag_safe(bound):
    schema, tok = bound
    vocab = TagVocab(tok, schema)
    segs = ["A <|bad|> b. ", "<safe> c. ", "d."]
    tags = {a.name: (["offensive"] if a.level == "document" else [a.tags["bad"], a.tags["good"], None])
            for a in schema.attributes}
    doc = vocab.render(segs, tags)
    pieces = schema.render_pieces(segs, tags)
    assert len(doc.chunks) == len(doc.segment) == len(pieces)
    tag_ids = set(vocab.ids.values())
    for (ids, is_text), seg, p in zip(doc.chunks, doc.segment, pieces):
        assert seg == p.segment and is_text == (p.tag is None)
        if is_text:
            assert ids == encode_text(tok, p.text) and not tag_ids.intersection(ids)
        else:
            assert ids == [tok.convert_tokens_to_ids(p.text)]
    assert [(t, s) for _, t, s in doc.opens] == [(p.tag, p.segment) for p in pieces if p.tag and not p.closing]
    assert all(doc.chunks[ci] == ([vocab.open_id[t]], False) for ci, t, _ in doc.opens)
    closes = sum(p.closing for p in pieces)
    assert len(vocab.render(segs, tags, close=False).chunks) == len(pieces) - closes
    assert (closes > 0) == (schema.render == "span")
    many = vocab.render_many([(segs, tags), (segs[:1], {})])
    assert many[0] == doc and many[1].ids == encode_text(tok, segs[0])


def test_ids_start_pad_texts_and_missing_tags(bound):
    schema, tok = bound
    vocab = TagVocab(tok, schema)
    assert vocab.start_id == tok.eos_token_id and vocab.pad_id == tok.pad_token_id != tok.eos_token_id
    assert vocab.tag_of_id == {tok.convert_tokens_to_ids(schema.open_token(t)): t for t in schema.tag_names}
    assert all(vocab.text(i) == tok.decode([i], skip_special_tokens=False) for i in [*vocab.ids.values(), 5, 77])
    other = schema_from_dict({**PREFIX, "attributes": [{**PREFIX["attributes"][0], "tags": {"bad": "awful"}}]})
    assert TagVocab(tok, schema).checked() is not None
    with pytest.raises(ValueError, match="lacks the tag tokens"):
        TagVocab(tok, other).checked()


def test_bos_starts_a_document_and_eos_pads_without_a_pad_token(bound):
    schema, tok = bound
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>", bos_token="<|pad|>")
    vocab = TagVocab(tok, schema)
    assert tok.pad_token is None
    assert vocab.start_id == tok.bos_token_id != tok.eos_token_id and vocab.pad_id == tok.eos_token_id


def test_context_limit_reads_models_configs_and_config_json():
    from transformers import GPT2Config

    from pretag.generate import context_limit

    assert context_limit(GPT2Config(n_positions=64)) == 64
    assert context_limit({"n_positions": 96}) == 96 and context_limit({"max_position_embeddings": 32}) == 32
    assert context_limit({}) is None and context_limit({"n_positions": True}, 2048) == 2048


def test_attribute_owns_reward_sign_and_the_threshold_override():
    schema = schema_from_dict(MULTI)
    tox, sent = schema.attribute("tox"), schema.attribute("sent")
    assert tox.higher_is_worse and not sent.higher_is_worse
    assert tox.reward(0.25) == -0.25 and sent.reward(0.25) == 0.25
    assert np.array_equal(tox.reward(np.array([1.0, -2.0])), [-1.0, 2.0])
    assert tox.tagged_bad(0.6) and not tox.tagged_bad(0.4)
    assert tox.tagged_bad(0.4, threshold=0.3) and not tox.tagged_bad(0.6, threshold=0.7)
    assert tox.tagged_bad(0.1, threshold=0) and not tox.tagged_bad(0.0, threshold=0)  # 0 is a threshold
    assert sent.tagged_bad(-0.5) and sent.tagged_bad(0.1, threshold=0.2) and not sent.tagged_bad(0.3, threshold=0.2)
    assert not tox.tagged_bad(math.nan, threshold=0.0) and not tox.tagged_bad(None)
