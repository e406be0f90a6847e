"""Generation with a tiny model trained with tags (plain PyTorch, a few seconds): control, monitoring, streaming,
beam search, alarms, tree search, the CLI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.display import render_terminal  # noqa: E402
from pretag.generate import GenerateConfig, generate, replay, stream  # noqa: E402
from pretag.schema import load_schema  # noqa: E402
from pretag.search import tree_search  # noqa: E402

GOOD = ["x = 1\n", "y = 2\n", "return a + b\n", "z = x * y\n"]
BAD = ["x=1\n", "y =2\n", "return a+b\n", "z=x*y\n"]


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer GPT-2 (width 32) trained ~300 steps on tagged lines: <|good|> before PEP8-clean lines, <|bad|>
    before the others, half of each; documents start after EOS."""
    from pretag.tokens import encode_text, train_tokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    schema = load_schema("pep8")
    tok = train_tokenizer(GOOD + BAD, schema, vocab_size=300, min_frequency=1)
    g, b, eos = (tok.convert_tokens_to_ids(t) for t in ("<|good|>", "<|bad|>", tok.eos_token))
    enc = {line: encode_text(tok, line) for line in GOOD + BAD}

    def doc():
        ids = [eos]
        for _ in range(4):
            bad = rng.random() < 0.5
            ids += [b if bad else g] + enc[rng.choice(BAD if bad else GOOD)]
        return ids + [eos]

    model, loss = fit_micro_gpt2([doc() for _ in range(512)], len(tok), eos)
    return model, tok, schema, loss


def fit_micro_gpt2(docs: list[list[int]], vocab: int, eos: int, steps: int = 300):
    """A 1-layer GPT-2 (width 32) fitted to token-id documents (padded with EOS), ready to generate; (model, loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    T = max(len(d) for d in docs)
    x = torch.tensor([d + [eos] * (T - len(d)) for d in docs])
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (32,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.pad_token_id = eos
    return model, loss.item()


def tag_counts(result, tok):
    g, b = tok.convert_tokens_to_ids("<|good|>"), tok.convert_tokens_to_ids("<|bad|>")
    ids = [t.id for s in result.sequences for t in s.tokens]
    return ids.count(g), ids.count(b)


def test_model_learned(tiny):
    assert tiny[3] < 1.0, "the tiny model did not learn the tagged data"


def test_emits_tags_when_allowed_never_when_banned(tiny):
    model, tok, schema, _ = tiny
    cfg = GenerateConfig(n=16, max_new_tokens=20, seed=0)
    free = generate(model, tok, schema, "", "force_at:none", cfg)
    good, bad = tag_counts(free, tok)
    assert good > 0 and bad > 0, (good, bad)
    banned = generate(model, tok, schema, "", "force_at:none,ban:bad", cfg)
    good, bad = tag_counts(banned, tok)
    assert bad == 0 and good > 0
    # the warning light: the ban zeroed <|bad|>, but the model's wish for it was measured
    assert max(s.summary["<|bad|>"]["max"] for s in banned.sequences) > 0.2


def test_default_policy_forces_good_at_every_line_start(tiny):
    model, tok, schema, _ = tiny
    res = generate(model, tok, schema, "", None, GenerateConfig(n=8, max_new_tokens=30, seed=1))
    for s in res.sequences:
        toks = s.tokens
        assert toks and toks[0].text == "<|good|>" and toks[0].forced
        for prev, cur in zip(toks, toks[1:]):
            if prev.text.endswith("\n"):
                assert cur.text == "<|good|>" and cur.forced
            elif not prev.is_tag:
                assert not cur.is_tag
        assert "<|bad|>" in toks[0].banned


def test_prompt_lines_get_tags_and_output_is_mostly_good(tiny):
    model, tok, schema, _ = tiny
    res = generate(model, tok, schema, "x = 1\n", "good", GenerateConfig(max_new_tokens=12))
    s = res.sequences[0]
    assert s.tokens[0].text == "<|good|>"  # the prompt ended a line: a tag is forced first
    assert "\n" in s.text and s.text.split("\n")[0] in [g.strip() for g in GOOD]
    assert set(s.summary) == {"<|good|>", "<|bad|>"}
    assert "\x1b[" in render_terminal(s) and render_terminal(s, colour=False) == "".join(t.text for t in s.tokens)


def test_streaming_yields_the_same_tokens_as_the_batch_call(tiny):
    model, tok, schema, _ = tiny
    cfg = GenerateConfig(max_new_tokens=15)
    batch = generate(model, tok, schema, "y = 2\n", "force_at:none,ban:bad", cfg).sequences[0]
    st = stream(model, tok, schema, "y = 2\n", "force_at:none,ban:bad", cfg)
    got = list(st)
    assert [t.id for t in got] == [t.id for t in batch.tokens]
    assert [t.temptation for t in got] == [t.temptation for t in batch.tokens]
    assert st.result is not None and st.result.sequences[0].text == batch.text


def test_the_trace_shows_the_banned_tags_verdict(tiny):
    from pretag.display import format_trace

    model, tok, schema, _ = tiny
    seq = generate(model, tok, schema, "y = 2\n", "ban:bad", GenerateConfig(max_new_tokens=24, seed=3)).sequences[0]
    vals = [t.verdict["<|bad|>"] for t in seq.tokens if t.verdict]
    trace = format_trace(seq, colour=False).splitlines()
    i = next(k for k, line in enumerate(trace) if line.startswith(f"verdict at the {len(vals)} tag positions"))
    assert trace[i + 1].split() == ["<|bad|>", f"{max(vals):.3f}", "/", f"{sum(vals) / len(vals):.3f}"]


def test_token_records_carry_the_verdict_where_a_tag_is_asked_for(tiny):
    """Under the default policy a tag must come at every line start: there each record's verdict is the tags'
    shares of their probability (summing to 1); elsewhere it is empty. Streaming reports the same."""
    model, tok, schema, _ = tiny
    cfg = GenerateConfig(max_new_tokens=24, seed=3)
    seq = generate(model, tok, schema, "y = 2\n", "ban:bad", cfg).sequences[0]
    asked = [t for t in seq.tokens if t.verdict]
    assert asked and [t.forced for t in seq.tokens] == [bool(t.verdict) for t in seq.tokens]
    for t in asked:
        total = t.temptation["<|good|>"] + t.temptation["<|bad|>"]
        assert t.verdict == pytest.approx({k: t.temptation[k] / total for k in ("<|good|>", "<|bad|>")})
    assert [t.verdict for t in stream(model, tok, schema, "y = 2\n", "ban:bad", cfg)] == \
        [t.verdict for t in seq.tokens]


def test_beam_search_records_follow_final_beams(tiny):
    model, tok, schema, _ = tiny
    res = generate(model, tok, schema, ["", "x = 1\n"], None, GenerateConfig(num_beams=3, n=2, max_new_tokens=10))
    assert len(res.sequences) == 4
    for s in res.sequences:
        assert len(s.tokens) > 0
        assert all(not t.is_tag or t.text == "<|good|>" for t in s.tokens)
        assert all(set(t.temptation) == {"<|good|>", "<|bad|>"} for t in s.tokens)


def test_replay_reproduces_live_records(tiny):
    model, tok, schema, _ = tiny
    from pretag.control import TagProcessor
    from pretag.generate import prompt_ids

    proc = TagProcessor(tok, schema, None)
    ids = torch.tensor([prompt_ids(tok, schema, proc.policy, "x = 1\n")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[proc], max_new_tokens=8,
                         do_sample=False)
    again = replay(model, tok, schema, None, out, ids.shape[1])
    n = out.shape[1] - ids.shape[1]
    assert torch.allclose(torch.stack(proc.temptations[:n], 1), torch.stack(again.temptations, 1), atol=1e-5)


def test_untagged_prompt_lets_the_model_judge_it(tiny):
    """``prompt_tags: none``: the prompt carries no tag (the user's text claims nothing); the first segment the model
    writes is still forced to a good tag, and its temptation is the model's own P(bad) after the plain prompt."""
    model, tok, schema, _ = tiny
    from pretag.generate import prompt_ids
    from pretag.policy import load_policy
    from pretag.tokens import tag_ids

    tags = set(tag_ids(tok, schema).values())
    tagged = prompt_ids(tok, schema, load_policy("ban:bad", schema), "x = 1\ny=2\n")
    plain = prompt_ids(tok, schema, load_policy("ban:bad,prompt_tags:none", schema), "x = 1\ny=2\n")
    assert sum(i in tags for i in tagged) == 2 and not tags & set(plain)
    assert [i for i in tagged if i not in tags] == plain
    res = generate(model, tok, schema, "x = 1\ny=2\n", "ban:bad,prompt_tags:none", GenerateConfig(max_new_tokens=6))
    first = res.sequences[0].tokens[0]
    assert first.is_tag and first.text == "<|good|>"
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([plain])).logits[0, -1].float(), -1)
    assert first.temptation["<|bad|>"] == pytest.approx(float(p[tok.convert_tokens_to_ids("<|bad|>")]), abs=1e-5)


def test_alarm_stops_generation(tiny):
    model, tok, schema, _ = tiny
    cfg = GenerateConfig(max_new_tokens=40)
    free = generate(model, tok, schema, "x = 1\n", "force_at:none,ban:bad", cfg).sequences[0]
    stopped = generate(model, tok, schema, "x = 1\n", "force_at:none,ban:bad,alarm:bad>0.05=stop", cfg).sequences[0]
    assert stopped.stopped_by_alarm and stopped.alarms and stopped.alarms[0].action == "stop"
    k = stopped.alarms[0].step
    assert len(stopped.tokens) == k + 1 < len(free.tokens)
    assert stopped.tokens[k].temptation["<|bad|>"] > 0.05
    assert all(t.temptation["<|bad|>"] <= 0.05 for t in stopped.tokens[:k])


def test_tree_search_prunes_tempted_branches(tiny):
    model, tok, schema, _ = tiny
    res = tree_search(model, tok, schema, "", "force_at:none,ban:bad", GenerateConfig(n=4, max_new_tokens=16, seed=0),
                      tau=0.3, chunk=4)
    assert len(res.sequences) == 4
    rounds = res.settings["tree"]["rounds"]
    assert rounds and sum(r["pruned"] for r in rounds) > 0
    peaks = [max(t.temptation["<|bad|>"] for t in s.tokens) for s in res.sequences]
    assert peaks == sorted(peaks)


def test_classifiers_run_on_output(tiny):
    model, tok, schema, _ = tiny
    res = generate(model, tok, schema, "x = 1\n", None, GenerateConfig(max_new_tokens=12, classify=True))
    seq = res.sequences[0]
    c = seq.classifiers
    assert "error" not in c, c  # pycodestyle is a dependency: the classifiers must run
    assert "".join(c["segments"]) == "x = 1\n" + seq.text and c["generated"][0] is False and any(c["generated"])
    bad = [t == "bad" for t, g in zip(c["tags"]["pep8"], c["generated"]) if g]
    assert c["bad_fraction"] == {"pep8": sum(bad) / len(bad)}


def test_classify_output_judges_only_the_generated_segments():
    from pretag.generate import classify_output

    # the prompt's bad line is context for pycodestyle, not the model's output; of the two generated lines one is bad
    c = classify_output(load_schema("pep8"), "a=1\n", "y=2\nz = 3\n")
    assert c["segments"] == ["a=1\n", "y=2\n", "z = 3\n"] and c["generated"] == [False, True, True]
    assert c["tags"]["pep8"] == ["bad", "bad", "good"] and c["bad_fraction"] == {"pep8": 0.5}


def test_classify_output_reports_a_failing_scorer_beside_the_generation(monkeypatch):
    import pretag.label
    from pretag.generate import classify_output

    def broken(*a, **k):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(pretag.label, "label_document", broken)
    assert classify_output(load_schema("pep8"), "", "x = 1\n") == {"error": "RuntimeError: scorer exploded"}


def test_cli_json_and_errors(tiny, tmp_path, capsys):
    model, tok, schema, _ = tiny
    from pretag.cli import main
    from pretag.models import save_model_dir

    d = save_model_dir(model, tok, schema, {"test": True}, tmp_path / "m")
    rc = main(["generate", str(d), "--policy", "ban:bad,force_at:none,alarm:bad>0.2", "--prompt", "x = 1\\n",
               "--max-new-tokens", "6", "--json", "--no-classify"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    seq = out["sequences"][0]
    assert len(seq["ids"]) == len(seq["tokens"]) > 0 and "<|bad|>" in seq["tokens"][0]["temptation"]
    assert "alarms" in seq and out["policy"]["ban"] == ["bad"]
    rc = main(["generate", str(d), "--policy", "ban:nasty", "--prompt", "x"])
    assert rc == 2 and "unknown tag 'nasty'" in capsys.readouterr().err
    rc = main(["generate", str(d), "--prompt", "x", "--show-temptation", "--max-new-tokens", "4", "--no-classify"])
    assert rc == 0 and "temptation" in capsys.readouterr().out


def test_results_match_the_processor_records(tiny):
    """The result objects are built from stacked records in one pass: texts, ban lists, alarms and summaries must
    still say what the processor did at each token."""
    model, tok, schema, _ = tiny
    from pretag.generate import summarize

    res = generate(model, tok, schema, ["x = 1\n", ""], "force_at:none,ban:bad,alarm:bad>0.05",
                   GenerateConfig(max_new_tokens=10))
    for s in res.sequences:
        assert len(s.tokens) == 10
        for t in s.tokens:
            assert t.text == tok.decode([t.id], skip_special_tokens=False)
            assert t.banned == ["<|bad|>"] and t.biased == [] and not t.forced
        s.tokens[0].banned.append("x")
        assert s.tokens[1].banned == ["<|bad|>"], "token records share a list"
        assert s.summary == summarize(s.tokens, ["<|good|>", "<|bad|>"], (0.1, 0.5))
        tempted = [k for k, t in enumerate(s.tokens) if t.temptation["<|bad|>"] > 0.05]
        assert [a.step for a in s.alarms] == tempted[:1]  # a flag rule fires once, at the first tempted token
        if s.alarms:
            assert s.alarms[0].token == s.tokens[tempted[0]].text
    assert any(s.alarms for s in res.sequences)


def test_stop_at_eos_false_makes_exactly_max_new_tokens(tiny):
    model, tok, schema, _ = tiny
    kw = dict(max_new_tokens=40, n=8, seed=0)
    stopped = generate(model, tok, schema, "x = 1\n", None, GenerateConfig(**kw)).sequences
    fixed = generate(model, tok, schema, "x = 1\n", None, GenerateConfig(**kw, stop_at_eos=False)).sequences
    ended = 0
    for a, b in zip(stopped, fixed):
        ids_a, ids_b = [t.id for t in a.tokens], [t.id for t in b.tokens]
        assert len(ids_b) == 40  # EOS is an ordinary token: the row goes on
        if tok.eos_token_id in ids_b[:-1]:
            k = ids_b.index(tok.eos_token_id)
            assert ids_a == ids_b[: k + 1]  # same sampling up to the EOS, where the default stops
            ended += 1
        else:
            assert ids_a == ids_b[: len(ids_a)]
    assert ended, "no sample reached EOS: the comparison proved little"


def test_prompt_plus_new_tokens_past_the_context_is_refused_up_front(tiny):
    """Issue 11 item 8: the tiny model has 64 positions; before, HF generate died with an IndexError."""
    from pretag.control import load_policy
    from pretag.generate import ContextLengthError, prompt_ids

    model, tok, schema, _ = tiny
    n = len(prompt_ids(tok, schema, load_policy(None, schema), "x = 1\n"))
    with pytest.raises(ContextLengthError, match=rf"{n} tokens .* \+ 100 new tokens = {n + 100} exceeds the model's "
                                                 rf"context of 64 tokens; ask for at most {64 - n} new tokens"):
        generate(model, tok, schema, "x = 1\n", None, GenerateConfig(max_new_tokens=100))
    with pytest.raises(ContextLengthError, match="shorten the prompt"):
        generate(model, tok, schema, ["x", "y = 2\n" * 40], None, GenerateConfig(max_new_tokens=1))
    with pytest.raises(ContextLengthError):
        tree_search(model, tok, schema, "x = 1\n", None, GenerateConfig(n=2, max_new_tokens=100))
    with pytest.raises(ContextLengthError):
        list(stream(model, tok, schema, "x = 1\n", None, GenerateConfig(max_new_tokens=100)))
    # exactly the context is fine: every position is used
    res = generate(model, tok, schema, "x = 1\n", None, GenerateConfig(max_new_tokens=64 - n, stop_at_eos=False))
    assert len(res.sequences[0].tokens) == 64 - n


def test_cli_context_and_invalid_utf8_are_one_line_errors(tiny, tmp_path, capsys):
    """Items 8 and 9: `--max-new-tokens` past the context, and a prompt that is not UTF-8 (the shell's bytes
    reach Python as surrogate escapes), end with one clear line, never a traceback."""
    model, tok, schema, _ = tiny
    from pretag.cli import main
    from pretag.models import save_model_dir

    d = save_model_dir(model, tok, schema, {"test": True}, tmp_path / "m")
    rc = main(["generate", str(d), "--prompt", "x", "--max-new-tokens", "300", "--no-classify"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "pretag generate: error: prompt of 3 tokens (tags included) + 300 new tokens = 303 exceeds the model's "
        "context of 64 tokens; ask for at most 61 new tokens (max_new_tokens, --max-new-tokens) or shorten the prompt"]
    rc = main(["generate", str(d), "--prompt", "a\udcffb", "--no-classify"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt is not valid UTF-8 (byte 0xff at character 1)" in err
    rc = main(["tokenize", str(d), "--text", "a\udcffb"])
    assert rc == 2 and "--text is not valid UTF-8" in capsys.readouterr().err


def test_unpadded_generation_prints_no_spurious_attention_mask_warning(tiny, monkeypatch):
    """transformers drops the all-ones mask pretag passes and then warns that none was passed; pretag filters it."""
    import logging

    from transformers.utils import logging as hf_logging

    model, tok, schema, _ = tiny
    monkeypatch.setattr(model.config, "pad_token_id", tok.convert_tokens_to_ids(tok.eos_token))  # pad == start
    hf_log = logging.getLogger("transformers.modeling_utils")
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    grab = Grab()
    hf_log.addHandler(grab)
    try:
        for filters in (hf_log.filters, []):  # pretag's filter, then none: the warning is really raised here
            monkeypatch.setattr(hf_log, "filters", list(filters))
            hf_logging.warning_once.cache_clear()
            seen.clear()
            generate(model, tok, schema, ["", ""], "ban:bad", GenerateConfig(max_new_tokens=3, seed=0))
            if filters:
                assert not [m for m in seen if "attention_mask" in m]
        assert [m for m in seen if "attention_mask" in m]
    finally:
        hf_log.removeHandler(grab)
