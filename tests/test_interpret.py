"""The interpretability bridge on tiny models: a planted feature that probe, attribution and SAE must find and whose
ablation must move P(bad tag); hooks checked against plain forward passes (bit for bit where nothing is edited);
the attribution's parts adding up to the model's own logit difference; the CLI and the generation flag."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.interpret import attribution, probe, sae  # noqa: E402
from pretag.interpret.hooks import Edit, FeatureEdit, Recorder, intervene, layout, on_residual  # noqa: E402
from pretag.schema import schema_from_dict  # noqa: E402

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
SCHEMA = {"name": "planted", "segmenter": "lines", "render": "prefix", "attributes": [
    {"name": "flag", "scorer": {"type": "regex", "patterns": ["zz"]}, "threshold": 0}]}


def planted_texts(n: int, seed: int = 0) -> list[str]:
    """Documents of 6 lines of 3 words. Half are 'wild': their first line ends with the trigger ``qq`` and every
    later line with the word ``zz``, which the classifier (a regex) calls bad. At a segment start (the "\\n"
    token, the same in every line) the model can only know the next line is bad by attending back to the word
    before: the planted feature, which the embeddings there cannot hold and the attention layer must write."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        wild = rng.random() < 0.5
        lines = []
        for i in range(6):
            w = [rng.choice(WORDS) for _ in range(3)]
            if wild:
                w[-1] = "qq" if i == 0 else "zz"
            lines.append(" ".join(w) + "\n")
        docs.append("".join(lines))
    return docs


@pytest.fixture(scope="module")
def toy():
    """A 1-layer GPT-2 (width 32, 2 heads) trained with tags on the planted corpus (plain PyTorch, ~4 s)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretag.label import label_document
    from pretag.tokens import pack, train_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    schema = schema_from_dict(SCHEMA)
    texts = planted_texts(600)
    rows = []
    for t in texts:
        d = label_document(schema, t)
        rows.append({"segments": d.segments, "tag__flag": d.tags["flag"], "score__flag": d.scores["flag"]})
    tok = train_tokenizer(texts, schema, vocab_size=300, min_frequency=1)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=tok.pad_token_id))
    blocks = pack(tok, schema, rows[:500], 64, tags=True)
    x, m = torch.tensor(blocks.input_ids), torch.tensor(blocks.mask)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        i = torch.randint(0, len(x), (16,))
        labels = x[i].masked_fill(~m[i], -100)
        loss = model(x[i], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, schema, rows[500:], loss.item()


@pytest.fixture(scope="module")
def ctx(toy):
    model, tok, schema, held, _ = toy
    return probe.capture(model, probe.build_contexts(model, tok, schema, held))


def _batch(ctx):
    b = ctx.batches[0]
    return b.ids, b.mask


# ---- hooks against plain forward passes --------------------------------------------------------------------------
def test_capture_reads_without_changing_anything(toy, ctx):
    model = toy[0]
    ids, mask = _batch(ctx)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, output_hidden_states=True)
        rec = Recorder([0, 1])
        with on_residual(model, [0, 1], rec):
            hooked = model(ids, attention_mask=mask).logits
    assert torch.equal(plain.logits, hooked)  # reading changes nothing, bit for bit
    got = rec.take()
    # layer 0 is the input of block 0 = HF's hidden_states[0] (hidden_states[-1] is after the final norm)
    assert torch.equal(got[0], plain.hidden_states[0].reshape(-1, 32))
    assert got[1].shape == got[0].shape and not torch.equal(got[1], got[0])


def test_edits_that_change_nothing_are_bit_for_bit_plain(toy, ctx):
    model, tok, schema = toy[:3]
    ids, mask = _batch(ctx)
    sae_model = sae.TopKSAE(32, 16, 4)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with intervene(model, [Edit(torch.randn(32), (0, 1), "steer", 0.0), Edit(torch.zeros(32), (0, 1)),
                               FeatureEdit(sae_model, [], (1,))]):
            null = model(ids, attention_mask=mask).logits
        with intervene(model, [Edit(torch.randn(32), (1,), "steer", 0.5)]):
            moved = model(ids, attention_mask=mask).logits
    assert torch.equal(plain, null)
    assert not torch.allclose(plain, moved)
    # generation: no flag is the plain path, and a null edit around it gives the same tokens
    from pretag.generate import GenerateConfig, generate

    cfg = GenerateConfig(max_new_tokens=12, n=2, do_sample=True, seed=3)
    a = generate(model, tok, schema, ["ab cd\n"], None, cfg)
    with intervene(model, [Edit(torch.randn(32), (0, 1), "steer", 0.0)]):
        b = generate(model, tok, schema, ["ab cd\n"], None, cfg)
    assert [s.to_dict()["ids"] for s in a.sequences] == [s.to_dict()["ids"] for s in b.sequences]


def test_last_layer_ablation_equals_manual_computation(toy, ctx):
    model = toy[0]
    ids, mask = _batch(ctx)
    d = torch.randn(32)
    u = d / d.norm()
    rec = Recorder([1])
    with torch.no_grad():
        with on_residual(model, [1], rec):
            model(ids, attention_mask=mask)
        h = rec.take()[1]  # (B*T, d): the stream the final norm reads, from a plain pass
        manual = model.lm_head(model.transformer.ln_f(h - (h @ u)[:, None] * u))
        rec2 = Recorder([1])
        with intervene(model, [Edit(d, (1,), "ablate")]), on_residual(model, [1], rec2):
            edited = model(ids, attention_mask=mask).logits.reshape(-1, manual.shape[-1])
    assert torch.allclose(edited, manual, atol=1e-5)
    assert rec2.take()[1].matmul(u).abs().max() < 1e-5  # the component is gone where it was removed
    # steering layer 0 = adding the vector to the token embeddings (positions are added after: same sum)
    with torch.no_grad():
        with intervene(model, [Edit(d, (0,), "steer", 1.0)]):
            steered = model(ids, attention_mask=mask).logits
        by_hand = model(inputs_embeds=model.transformer.wte(ids) + d, attention_mask=mask).logits
    assert torch.allclose(steered, by_hand, atol=1e-5)


def test_attribution_parts_add_up_gpt2_and_llama(toy, ctx):
    att = attribution.logit_attribution(toy[0], ctx)
    assert att["contrib"].shape == (len(ctx.label), len(attribution.component_names(toy[0])))
    assert np.abs(att["total"] - att["actual"]).max() < 1e-4
    # a Llama-style model (RMSNorm, o_proj as nn.Linear, grouped-query attention): the same identity must hold
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, schema, held = toy[1], toy[2], toy[3]
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=False)).eval()
    assert layout(llama).norm == "rms" and layout(llama).n_layers == 2
    lctx = probe.capture(llama, probe.build_contexts(llama, tok, schema, held[:20]))
    latt = attribution.logit_attribution(llama, lctx)
    assert np.abs(latt["total"] - latt["actual"]).max() < 1e-4
    assert len(latt["names"]) == 1 + 2 * (4 + 1) + 1


def test_read_direction_ablation_makes_the_tag_preference_constant(toy, ctx):
    """Projecting the read direction out of the last layer leaves logit(bad) - logit(good) equal to the final
    norm's bias term in every context: the model can no longer prefer one tag to the other."""
    from pretag.interpret.hooks import direction_edit

    model, tok, schema = toy[:3]
    edit = direction_edit(model, tok, schema, "bad")
    assert edit.layers == (0, 1)
    with intervene(model, [edit]):
        att = attribution.logit_attribution(model, ctx)
    w = model.lm_head.weight.detach()
    const = float(model.transformer.ln_f.bias.detach() @ (w[ctx.bad_id] - w[ctx.good_id]))
    assert np.abs(att["actual"] - const).max() < 1e-3
    plain = attribution.logit_attribution(model, ctx)["actual"]
    assert plain.std() > 1.0  # while the plain model separates the contexts widely
    with pytest.raises(ValueError, match="not a tag of schema 'planted'.*good, bad"):
        direction_edit(model, tok, schema, "nope")


# ---- the oracle: a planted feature -------------------------------------------------------------------------------
def test_planted_feature_is_found_and_its_ablation_moves_p_bad(toy, ctx):
    model, tok, schema, held, loss = toy
    assert loss < 2.0, f"the toy did not train (loss {loss:.2f}; random words alone cost ln 8 = 2.08 nats)"
    # the model itself knows: P(bad tag) separates the wild documents' later lines from the rest
    from pretag.metrics import auroc

    assert auroc(ctx.p_rel, ctx.label) > 0.95
    layers, dirs = probe.layer_curve(model, tok, schema, ctx, n_resamples=200)
    by = {r["layer"]: r for r in layers}
    # 1. probe: after the attention block the feature is linearly there; in the embeddings it is not
    assert by[1]["probe_auroc"]["lo"] > 0.95 and by[1]["diffmeans_auroc"]["value"] > 0.95
    assert by[0]["probe_auroc"]["value"] < by[1]["probe_auroc"]["value"] - 0.15
    assert probe.best_layer(layers) == 1
    # 2. attribution: what raises logit(bad) - logit(good) when tempted is written by layer 0's parts, not by the
    # embeddings (identical "\n" tokens at every segment start) or the biases
    summ = attribution.attribution_summary(model, ctx, n_resamples=200)
    top = summ["top"][0]
    assert top["component"].startswith("L0.") and top["diff"] > 1.0 and top["lo"] > 0
    emb = summ["components"].index("embed")
    assert abs(summ["tempted"]["diff"][emb]) < 0.5 * top["diff"]
    # 3. SAE: a feature tracks P(bad tag), and its top segments are the bad ones
    X = sae.token_activations(model, ctx, 1)
    sae_model, stats = sae.train_sae(X, n_features=64, k=4, steps=300)
    assert stats["fve"] > 0.5
    feats = sae.rank_features(sae_model, ctx, 1, top=3)
    best = feats[0]
    assert abs(best["corr_p_bad"]) > 0.7 and abs(best["corr_verdict"]) > 0.7
    if best["corr_p_bad"] > 0:
        assert best["examples"] and all(e["bad"] for e in best["examples"])
    # 4. interventions, measured: ablating the direction lowers P(bad tag) where the next line is bad; steering
    # it in raises P(bad tag) where the next line is good
    from pretag.interpret.measure import MeasureConfig, Measurer

    m = Measurer(model, tok, schema, ctx, held[:20], MeasureConfig(samples=0, n_resamples=200))
    abl = m.measure("ablate", [Edit(dirs[1], (1,), "ablate")])
    assert abl["d_temptation_bad_segments"]["hi"] < -0.2
    steer = m.measure("steer", [Edit(dirs[1], (1,), "steer", 1.0)])
    assert steer["d_temptation"]["lo"] > 0.05
    null = m.measure("null", [Edit(dirs[1], (0, 1), "steer", 0.0)])
    assert null["d_temptation"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "n": len(ctx.label)}
    assert null["d_loss"]["value"] == 0.0 and abl["d_loss"]["value"] > 0  # removing the feature costs loss


# ---- the CLI, the report, and the generation flag ----------------------------------------------------------------
def test_cli_interpret_json_report_and_generate_flag(toy, tmp_path, capsys):
    from pretag.cli import main
    from pretag.label import label_corpus
    from pretag.models import save_model_dir

    model, tok, schema = toy[:3]
    md = save_model_dir(model, tok, schema, {"config": {"method": "conditional", "eval_fraction": 0}},
                        tmp_path / "model")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_texts(40, seed=9)))
    label_corpus(str(src), schema, tmp_path / "data", progress=False)
    out = tmp_path / "interp"
    rc = main(["interpret", str(md), "--data", str(tmp_path / "data"), "--out", str(out), "--samples", "6",
               "--max-new-tokens", "16", "--loss-docs", "8", "--sae-features", "32", "--sae-k", "4",
               "--sae-steps", "50", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in res["layers"]] == [0, 1]
    assert {"value", "lo", "hi"} <= set(res["layers"][1]["probe_auroc"]) and "cos_unembed_bad" in res["layers"][1]
    names = [r["intervention"] for r in res["interventions"]]
    assert names[0] == "control: steer by 0" and any("--ablate-direction bad" in n for n in names)
    for r in res["interventions"]:
        assert {"d_temptation", "d_score", "d_loss"} <= set(r) and r["n_samples"] > 0
    assert res["interventions"][0]["d_score"]["value"] == 0.0  # same seeds, nothing edited: the same samples
    html = (out / "report.html").read_text()
    assert "Interventions" in html and html.count("<img") == 2 and "feature" in html
    assert json.loads((out / "interpret.json").read_text())["summary"]["best_layer"] == res["summary"]["best_layer"]
    # the saved direction is a generation flag; so is the tag itself; a wrong spec is one clear error
    for spec in (str(out / "direction.pt"), "bad"):
        assert main(["generate", str(md), "--prompt", "ab cd qq\\n", "--ablate-direction", spec, "--json",
                     "--max-new-tokens", "8", "--seed", "0", "--no-classify"]) == 0
        g = json.loads(capsys.readouterr().out)
        assert g["settings"]["ablate_direction"] == spec and g["sequences"][0]["tokens"]
    assert main(["generate", str(md), "--ablate-direction", "worse", "--max-new-tokens", "4"]) == 2
    assert "'worse' is not a tag" in capsys.readouterr().err


def test_span_schemas_read_every_token_of_tagged_segments(toy):
    """With span rendering a tag can open after any token, so every text token of a tagged segment is a context,
    labelled with its segment's verdict (a prefix schema reads only the segment starts)."""
    import copy

    from pretag.evaluate import render_doc, row_tags
    from pretag.tokens import add_tag_tokens

    model, tok, held = copy.deepcopy(toy[0]), copy.deepcopy(toy[1]), toy[3]  # the module's toy stays as it is
    span = schema_from_dict({**SCHEMA, "render": "span"})
    add_tag_tokens(tok, span)
    model.resize_token_embeddings(len(tok))
    rows = held[:3]
    c = probe.build_contexts(model, tok, span, rows)
    want = labels = 0
    for r in rows:
        doc = render_doc(tok, span, list(r["segments"]), row_tags(span, r))
        n = [len(ch) for (ch, txt), s in zip(doc.chunks, doc.segment) if txt and s >= 0]
        want += sum(n)
        labels += sum(k for k, s in zip(n, [s for (_, txt), s in zip(doc.chunks, doc.segment) if txt and s >= 0])
                      if r["tag__flag"][s] == "bad")
    assert len(c.label) == want and int(c.label.sum()) == labels > 0


def test_auroc_interval_matches_the_pairwise_definition():
    from pretag.metrics import auroc

    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 300).astype(float), rng.random(300) < 0.2  # many ties
    e = probe.auroc_ci(s, y, n_resamples=2000)
    assert e.value == auroc(s, y) and e.lo < e.value < e.hi
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)  # the same stratified bootstrap, one resample at a time
    r = np.random.default_rng(1)
    slow = [auroc(s[i], y[i]) for i in (np.concatenate([r.choice(pos, len(pos)), r.choice(neg, len(neg))])
                                        for _ in range(2000))]
    assert np.allclose([e.lo, e.hi], np.quantile(slow, [0.025, 0.975]), atol=0.01)
    sep = probe.auroc_ci([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert (sep.value, sep.lo, sep.hi) == (1.0, 1.0, 1.0)
