"""vLLM as the serving engine (pretag.serve.vllm_engine).

The pure parts (the SamplingParams mapping, the batch-row bookkeeping that routes vLLM's logits rows to pretag's
TagProcessor) run everywhere. The engine tests need vLLM (``make setup-vllm``: its own .venv-vllm, which
``make test`` runs them in) and are skipped where it is not installed. The model is a tiny untrained GPT-2
(1 layer, width 64, one head: vLLM's CPU attention has no kernel for head_dim 16, the 'micro' preset's).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
from enum import Enum  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.control import TagProcessor, load_policy  # noqa: E402
from pretag.models import Preset  # noqa: E402
from pretag.serve.engine import Engine, GenParams  # noqa: E402
from pretag.serve.tiny import build_tiny_model_dir  # noqa: E402
from pretag.serve.vllm_engine import BatchRows, sampling_kwargs  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM and not os.environ.get("PRETAG_REQUIRE_VLLM"),
                                reason="vLLM is not installed here (make setup-vllm; make test runs it)")
TINY64 = Preset("gpt2", 1, 64, 1, 256, note="tests: head_dim 64 for vLLM's CPU attention")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny64"), "toxicity", preset=TINY64)


# ---- pure: runs without vLLM ---------------------------------------------------------------------------------
def test_sampling_kwargs_map_pretag_params():
    kw = sampling_kwargs(GenParams(max_new_tokens=7, temperature=0, top_k=None, top_p=None, seed=3), "k1", 0)
    assert kw == {"max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 3,
                  "extra_args": {"pretag": "k1"}, "detokenize": False, "stop_token_ids": [0]}
    kw = sampling_kwargs(GenParams(temperature=0.7, top_k=5, top_p=0.9), "k2", None)
    assert (kw["temperature"], kw["top_k"], kw["top_p"], kw["seed"]) == (0.7, 5, 0.9, None)
    assert "stop_token_ids" not in kw


class Move(Enum):
    UNIDIRECTIONAL = 1
    SWAP = 2


def test_batch_rows_follow_vllms_updates_and_apply_the_policy(model_dir):
    engine = Engine.from_dir(model_dir, policy="none")
    tok, schema = engine.tokenizer, engine.schema
    bad, good = (tok.convert_tokens_to_ids(schema.open_token(t)) for t in ("bad", "good"))
    a = TagProcessor(tok, schema, load_policy("ban:bad", schema))
    b = TagProcessor(tok, schema, load_policy("ban:good", schema))
    rows = BatchRows({"a": a, "b": b})
    out_a: list[int] = []
    rows.update([], [(0, SimpleNamespace(extra_args={"pretag": "a"}), [5, 6], out_a),
                     (1, SimpleNamespace(extra_args=None), [7], []),
                     (2, SimpleNamespace(extra_args={"pretag": "b"}), [8], [])], [])
    assert sorted(rows.rows) == [0, 2]  # row 1 is another client's: untouched
    logits = torch.zeros(3, len(tok))
    got = rows.apply(logits.clone())
    for row, spec, prompt in ((0, "ban:bad", [5, 6]), (2, "ban:good", [8])):  # what the processor alone gives
        ref = TagProcessor(tok, schema, load_policy(spec, schema))(torch.tensor([prompt]), logits[row:row + 1])
        assert torch.equal(got[row], ref[0])
    assert got[0, bad] == float("-inf") and got[2, good] == float("-inf")
    assert torch.equal(got[1], logits[1])
    assert len(a.temptations) == 1 and a.temptations[0][0].sum() > 0  # measured before the ban
    out_a.append(9)  # vLLM appends to its live list: the processor sees it next step
    rows.update([2], [], [(0, 2, Move.UNIDIRECTIONAL)])
    assert list(rows.rows) == [2] and rows.rows[2][0] is a and rows.rows[2][2] == [9]
    rows.update([], [(0, SimpleNamespace(extra_args={"pretag": "b"}), [1], [])], [(0, 2, Move.SWAP)])
    assert rows.rows[0][0] is a and rows.rows[2][0] is b


# ---- vLLM itself ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(model_dir):
    from pretag.serve.vllm_engine import VllmEngine

    return Engine.from_dir(model_dir, policy="ban:bad"), VllmEngine.from_dir(model_dir, policy="ban:bad")


def _run(engine, prompt, policy, **params):
    events = []
    summary = engine.generate(prompt, policy, GenParams(temperature=0, **params), on_token=events.append,
                              cancelled=lambda: False)
    return summary, events


@needs_vllm
@pytest.mark.slow
def test_parity_greedy_tokens_and_temptation(engines):
    hf, vl = engines
    worst = 0.0
    for prompt, extra in [("Hello. ", {}), ("The quick brown fox", {"bias": {"good": 2.0}}),
                          ("def add(a, b):", {"alarms": {"good": 0.0}})]:
        from pretag.serve.floor import RequestPolicy, merge

        policy = merge(hf.operator, RequestPolicy(**extra), hf.schema)
        s1, e1 = _run(hf, prompt, policy, max_new_tokens=12)
        s2, e2 = _run(vl, prompt, policy, max_new_tokens=12)
        assert [e["id"] for e in e1] == [e["id"] for e in e2], prompt
        assert s1["text"] == s2["text"] and s1["finish_reason"] == s2["finish_reason"]
        for x, y in zip(e1, e2):
            for t in x["temptation"]:
                worst = max(worst, abs(x["temptation"][t] - y["temptation"][t]))
            assert [a["rule"] for a in x["alarms"]] == [a["rule"] for a in y["alarms"]]
        assert all(e["tag"] != "bad" for e in e2) and any(e["temptation"]["bad"] > 0 for e in e2)
    print(f"parity: max |temptation_hf - temptation_vllm| = {worst:.2e}")
    assert worst < 1e-3


@needs_vllm
@pytest.mark.slow
def test_vllm_engine_behind_the_http_api(engines):
    from fastapi.testclient import TestClient

    from pretag.serve.app import ServeConfig, create_app

    _, vl = engines
    with TestClient(create_app(vl, ServeConfig(max_new_tokens=16))) as c:
        r = c.post("/v1/completions", json={"prompt": "Hello. ", "max_tokens": 6, "temperature": 0, "logprobs": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["tokens"][0]["tag"] == "good" and 0 < out["tokens"][0]["temptation"]["bad"] < 1
        assert out["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(0.0, abs=1e-6)  # forced tag
        r = c.post("/v1/completions", json={"prompt": "x", "policy": {"allow": ["bad"]}})
        assert r.status_code == 422 and "banned by the operator's policy" in r.json()["error"]  # the same floor
        stop = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "policy": {
            "alarms": {"good": 0.0}, "stop_on_alarm": True}}).json()
        assert stop["finish_reason"] == "alarm" and stop["n_tokens"] == 1
        with c.stream("POST", "/v1/completions", json={"prompt": "The quick", "max_tokens": 5, "seed": 1,
                                                       "stream": True}) as s:
            blocks = [b.split("\n") for b in s.read().decode().strip().split("\n\n")]
        kinds = [b[0].removeprefix("event: ") for b in blocks]
        done = json.loads(blocks[-1][1].removeprefix("data: "))
        assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") == done["n_tokens"] >= 1
