"""The HTTP API: the policy floor, validation, generation with temptation, streaming, queueing, metrics, CLI.

Every test runs against a real tiny model directory (untrained GPT-2, 1 layer, width 32) built in-test.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from pretag.control import TagPolicy, load_policy  # noqa: E402
from pretag.schema import load_schema  # noqa: E402
from pretag.serve.app import ServeConfig, background_server, create_app  # noqa: E402
from pretag.serve.engine import Engine  # noqa: E402
from pretag.serve.floor import PolicyFloorError, RequestPolicy, merge  # noqa: E402
from pretag.serve.tiny import build_tiny_model_dir  # noqa: E402
from pretag.serve.worker import Job, QueueFull, Worker  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), "toxicity")


@pytest.fixture(scope="module")
def client(model_dir):
    engine = Engine.from_dir(model_dir, policy="ban:bad,alarm:bad>0.5")
    with TestClient(create_app(engine, ServeConfig(max_new_tokens=16, max_prompt_tokens=40))) as c:
        yield c


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ---- the policy floor ------------------------------------------------------------------------------------------
SCHEMA = load_schema("multi")


def test_floor_request_tightens_bans_and_alarms():
    op = load_policy("ban:profane,alarm:profane>0.4=stop", SCHEMA)
    got = merge(op, RequestPolicy(ban=["pii"], alarms={"profane": 0.1, "neg": 0.2}, stop_on_alarm=True), SCHEMA)
    assert set(got.ban) == {"profane", "pii"}
    labels = [r.label for r in got.rules]
    assert "profane>0.4=stop" in labels  # the operator's rule is always kept
    assert {(r.watch, r.above, r.action) for r in got.rules} >= {("profane", 0.1, "stop"), ("neg", 0.2, "stop")}
    assert op.ban == ["profane"] and len(op.rules) == 1  # the operator's policy was not mutated


def test_the_operators_tag_guidance_survives_every_merge():
    """A guided operator policy (`pretag serve --policy ban:profane,guide:profane=3`) must guide every request,
    not be dropped when the request's controls are merged in; clients see it in GET /v1/policy's description."""
    from pretag.serve.floor import describe

    op = load_policy("ban:profane,guide:profane=3", SCHEMA)
    for req in (RequestPolicy(), RequestPolicy(ban=["pii"], alarms={"neg": 0.2})):
        assert merge(op, req, SCHEMA).guide == {"profane": 3.0}
    assert describe(op)["guide"] == {"profane": 3.0} and "guide" not in describe(load_policy("ban:profane", SCHEMA))


def test_the_operators_prompt_rendering_survives_every_merge():
    """An operator who serves with untagged prompts (the warning light reads the user's text) keeps that for every
    request; describe() shows it."""
    from pretag.serve.floor import describe

    op = load_policy("ban:profane,prompt_tags:none", SCHEMA)
    for req in (RequestPolicy(), RequestPolicy(ban=["pii"], alarms={"neg": 0.2})):
        assert merge(op, req, SCHEMA).resolved_prompt_tags(SCHEMA) == "none"
    assert describe(op)["prompt_tags"] == "none" and "prompt_tags" not in describe(load_policy("ban:profane", SCHEMA))


def test_floor_rejects_every_attempt_to_lift_at_once():
    op = load_policy("ban:profane,alarm:pii>0.3=stop,force:safe", SCHEMA)
    req = RequestPolicy(allow=["profane"], bias={"profane": 5.0}, force=["offensive"], alarms={"pii": 0.9},
                        stop_on_alarm=False)
    with pytest.raises(PolicyFloorError) as e:
        merge(op, req, SCHEMA)
    msg = str(e.value)
    assert "'profane' is banned by the operator's policy; a request may not allow it" in msg
    assert "may not bias it" in msg
    assert "forces 'safe'" in msg and "'offensive'" in msg
    assert "fires above 0.3" in msg and "0.9" in msg
    assert "stop_on_alarm" in msg
    assert len(e.value.problems) == 5


def test_floor_names_unknown_tags_and_bad_numbers():
    with pytest.raises(PolicyFloorError) as e:
        merge(TagPolicy(), RequestPolicy(ban=["nope"], alarms={"pii": 1.5}, bias={"neg": float("inf")}), SCHEMA)
    msg = str(e.value)
    assert "unknown tag 'nope'" in msg and "profane" in msg  # names the known tags
    assert "[0, 1]" in msg and "finite" in msg


def test_floor_request_bias_overrides_operator_bias_but_not_bans():
    op = TagPolicy(ban=["profane"], bias={"neg": -2.0, "pii": -1.0})
    got = merge(op, RequestPolicy(bias={"neg": 1.0}, ban=["pii"]), SCHEMA)
    assert got.bias == {"neg": 1.0}  # pii is banned now, so its bias is gone
    assert set(got.ban) == {"profane", "pii"}


# ---- the API ---------------------------------------------------------------------------------------------------
def test_health_policy_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["schema"] == "toxicity"
    p = client.get("/v1/policy").json()
    assert p["tags"] == ["good", "bad"] and p["operator"]["ban"] == ["bad"] and p["operator"]["alarms"] == {"bad": 0.5}
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_banned_tag_is_measured_but_never_generated(client, model_dir):
    # After a sentence end the prefix schema forces a tag: with `bad` banned by the operator it must be `good`,
    # while the model's wish for `bad` is still measured (temptation > 0).
    r = client.post("/v1/completions", json={"prompt": "Hello. ", "max_new_tokens": 6, "seed": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    first = out["tokens"][0]
    assert first["tag"] == "good" and first["text"] == "<|good|>"
    assert 0 < first["temptation"]["bad"] < 1
    assert all(t["tag"] != "bad" for t in out["tokens"])
    assert out["usage"]["completion_tokens"] == out["n_tokens"] == len(out["tokens"]) <= 6
    # the request can tighten: ban `good` too -> every value banned while a tag must be forced: a clear 422
    r = client.post("/v1/completions", json={"prompt": "", "policy": {"ban": ["good"]}})
    assert r.status_code == 422 and "every value is banned" in r.json()["error"]


def test_request_that_lifts_the_floor_gets_422_naming_it(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "policy": {"allow": ["bad"], "alarms": {"bad": 0.9}}})
    assert r.status_code == 422
    body = r.json()
    assert "'bad' is banned by the operator's policy" in body["error"]
    assert any("0.5" in p and "0.9" in p for p in body["problems"])


def test_bad_requests_get_4xx_naming_every_problem(client):
    r = client.post("/v1/completions", json={"prompt": "x", "colour": "red", "max_new_tokens": "many"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert "colour: unknown field" in err and "max_new_tokens" in err
    r = client.post("/v1/completions", json={"prompt": "word " * 60, "max_new_tokens": 99, "temperature": -1,
                                             "top_p": 0})
    probs = r.json()["problems"]
    assert r.status_code == 422 and len(probs) == 4
    assert any("max_new_tokens: must be between 1 and 16, got 99" in p for p in probs)
    assert any(p.startswith("prompt:") and "tokens exceeds the limit of 40" in p for p in probs)
    r = client.post("/v1/completions", json={"prompt": "y" * 9000})
    assert r.status_code == 422 and "9000 characters exceeds the limit of 8000" in r.json()["error"]
    assert client.post("/v1/completions", content=b"{not json").status_code == 422


def test_alarm_fires_flags_and_stops(client):
    # threshold 0: any positive temptation fires, at the first step, once (rules latch)
    out = client.post("/v1/completions", json={"prompt": "Hello", "max_new_tokens": 5, "seed": 1,
                                               "policy": {"alarms": {"good": 0.0}}}).json()
    mine = [a for a in out["alarms"] if a["source"] == "request"]
    assert len(mine) == 1 and mine[0]["tag"] == "good" and mine[0]["step"] == 0 and mine[0]["p"] > 0
    assert out["tokens"][0]["alarms"] == mine and out["finish_reason"] in ("length", "stop")
    quiet = client.post("/v1/completions", json={"prompt": "Hello", "max_new_tokens": 5,
                                                 "policy": {"alarms": {"good": 0.49}}}).json()
    assert [a for a in quiet["alarms"] if a["source"] == "request"] == []  # an untrained model is not tempted
    stop = client.post("/v1/completions", json={"prompt": "Hello", "max_new_tokens": 8, "policy": {
        "alarms": {"good": 0.0}, "stop_on_alarm": True}}).json()
    assert stop["finish_reason"] == "alarm" and stop["n_tokens"] == 1


def test_stream_sends_start_tokens_done_in_order(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "The quick", "max_new_tokens": 8, "seed": 3,
                                                        "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    tokens = [d for k, d in events if k == "token"]
    done = events[-1][1]
    assert [t["index"] for t in tokens] == list(range(done["n_tokens"]))
    assert all(set(t["temptation"]) == {"good", "bad"} for t in tokens)
    assert all(0 <= p <= 1 for t in tokens for p in t["temptation"].values())
    assert events[0][1]["policy"]["ban"] == ["bad"]
    text = "".join(t["text"] for t in tokens)
    # the pieces add up to the rendered output (at most a held-back partial UTF-8 character is missing)
    assert done["rendered"].startswith(text) and len(done["rendered"]) - len(text) <= 1


def test_token_events_carry_the_verdict_and_verdict_rules_report_it(model_dir):
    """Where a tag is asked for (here, forced: it is exactly where the model writes one) the event carries the
    verdict, each tag's share of the tags' probability; an operator's verdict rule reports that reading."""
    engine = Engine.from_dir(model_dir, policy="ban:bad,verdict:good>0.01=flag")
    with TestClient(create_app(engine, ServeConfig(max_new_tokens=24))) as c:
        out = c.post("/v1/completions", json={"prompt": "Hello. ", "max_new_tokens": 24, "seed": 1}).json()
    tokens = out["tokens"]
    assert [t["tag"] is not None for t in tokens] == ["verdict" in t for t in tokens]
    asked = [t for t in tokens if "verdict" in t]
    assert asked and "verdict" in tokens[0]  # after "Hello. " a tag is asked for first
    for t in asked:
        total = t["temptation"]["good"] + t["temptation"]["bad"]
        assert t["verdict"] == pytest.approx({k: t["temptation"][k] / total for k in ("good", "bad")}, rel=1e-5)
    (alarm,) = out["alarms"]
    assert alarm["reading"] == "verdict" and alarm["rule"] == "verdict(good)>0.01=flag"
    assert alarm["p"] == pytest.approx(tokens[alarm["step"]]["verdict"]["good"]) and alarm["p"] > 0.01


def test_metrics_count_requests(client):
    before = client.get("/metrics").json()
    client.post("/v1/completions", json={"prompt": "a", "max_new_tokens": 2})
    client.post("/v1/completions", json={"prompt": "a", "bogus": 1})
    after = client.get("/metrics").json()
    assert after["completed"] == before["completed"] + 1 and after["rejected"] == before["rejected"] + 1
    assert after["latency_s"]["p50"] > 0 and after["tokens"] >= before["tokens"] + 1
    prom = client.get("/metrics?format=prometheus").text
    assert f"pretag_completed_total {after['completed']}" in prom


# ---- concurrency -----------------------------------------------------------------------------------------------
def test_concurrent_clients_all_answered_in_full(model_dir):
    engine = Engine.from_dir(model_dir, policy="none")
    with background_server(create_app(engine)) as url:
        def one(i):
            body = {"prompt": f"client {i}", "max_new_tokens": 6, "seed": i, "stream": i % 2 == 0}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            if body["stream"]:
                ev = sse(r.text)
                return r.status_code, ev[-1][0], ev[-1][1]["n_tokens"], sum(k == "token" for k, _ in ev)
            j = r.json()
            return r.status_code, "done", j["n_tokens"], len(j["tokens"])

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(12)))
        assert all(s == 200 and last == "done" and n == k and n >= 1 for s, last, n, k in results), results
        m = httpx.get(url + "/metrics").json()
        assert m["completed"] == 12 and m["errors"] == 0


class _Gated(Engine):
    """The real engine, but each generation first waits for a gate (to hold the worker busy) or fails on demand."""

    gate = threading.Event()
    fail_next = False

    def generate(self, *a, **kw):
        assert self.gate.wait(30)
        if _Gated.fail_next:
            _Gated.fail_next = False
            raise RuntimeError("boom")
        return super().generate(*a, **kw)


def test_full_queue_answers_503_and_a_failing_request_does_not_kill_the_worker(model_dir):
    from pretag.models import load_model_dir

    m, tok, schema = load_model_dir(model_dir)
    engine = _Gated(m, tok, schema, TagPolicy(name="none"))
    with background_server(create_app(engine, ServeConfig(max_queue=1))) as url:
        body = {"prompt": "x", "max_new_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
            for _ in range(200):  # wait until the first request holds the worker
                if httpx.get(url + "/health").json()["queue"]["busy"]:
                    break
                threading.Event().wait(0.01)
            waiting = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
            for _ in range(200):
                if httpx.get(url + "/health").json()["queue"]["waiting"] == 1:
                    break
                threading.Event().wait(0.01)
            full = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert full.status_code == 503 and "queue is full" in full.json()["error"]
            assert full.headers["retry-after"] == "1"
            _Gated.fail_next = True
            _Gated.gate.set()
            first, second = running.result(), waiting.result()
        assert first.status_code == 500 and "boom" in first.json()["error"]
        assert second.status_code == 200 and second.json()["n_tokens"] >= 1
        m = httpx.get(url + "/metrics").json()
        assert m["queue_full"] == 1 and m["errors"] == 1 and m["completed"] == 1


def test_worker_rejects_beyond_its_bound_and_runs_in_order():
    import asyncio

    loop = asyncio.new_event_loop()
    seen, gate = [], threading.Event()
    w = Worker(lambda job: (gate.wait(5), seen.append(job.payload)), max_queue=2)
    try:
        jobs = [Job(payload=i, loop=loop, events=asyncio.Queue()) for i in range(3)]
        w.submit(jobs[0])
        for _ in range(100):
            if w.busy:
                break
            threading.Event().wait(0.01)
        w.submit(jobs[1])
        w.submit(jobs[2])
        with pytest.raises(QueueFull):
            w.submit(Job(payload=9, loop=loop, events=asyncio.Queue()))
        gate.set()
        for _ in range(500):
            if len(seen) == 3:
                break
            threading.Event().wait(0.01)
    finally:
        w.close()
        loop.close()
    assert seen == [0, 1, 2]


# ---- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_help_and_bad_arguments(tmp_path, capsys):
    from pretag.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--policy" in capsys.readouterr().out
    assert main(["serve", str(tmp_path / "missing"), "--policy", str(tmp_path / "p.yaml"), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "no such file" in err and "--port" in err


def test_cancel_ends_the_generation_and_keeps_the_fast_path(model_dir, monkeypatch):
    """A client that goes away ends the generation after the current token, through a StoppingCriteria (a
    processor callback would force the processor's slow per-step path)."""
    import pretag.control as control
    from pretag.serve.engine import GenParams

    engine = Engine.from_dir(model_dir, policy="none")
    made = []
    monkeypatch.setattr(control.TagProcessor, "reset", lambda self, orig=control.TagProcessor.reset: (
        made.append(self), orig(self))[1])
    events = []
    res = engine.generate("x = 1\n", engine.operator, GenParams(max_new_tokens=40, temperature=0),
                          events.append, cancelled=lambda: len(events) >= 3)
    # HF checks stopping criteria before it streams the step's token: the cancel seen at step 4 ends after token 4
    assert res["finish_reason"] == "cancelled" and res["n_tokens"] == 4 == len(events)
    assert made and not made[-1]._general and made[-1]._host  # one row on the CPU: the scalar path
    full = engine.generate("x = 1\n", engine.operator, GenParams(max_new_tokens=12, temperature=0),
                           lambda e: None, cancelled=lambda: False)
    assert full["finish_reason"] in ("length", "stop") and full["n_tokens"] > 3


# ---- hardening (issue 11) --------------------------------------------------------------------------------------
FOUR = ["offensive", "profane", "pii", "neg"]


def test_switch_keeps_the_requests_and_the_floors_bans(tmp_path):
    """An operator switch rule whose target bans only the floor's four tags must not lift the request's own ban:
    before, 4 of these 10 seeded requests wrote <|grade:14+|> after the switch (0 of 10 with action flag)."""
    engine = Engine.from_dir(build_tiny_model_dir(tmp_path, "multi"), policy={
        "ban": FOUR, "rules": [{"watch": "safe", "above": 0.0, "action": "switch", "policy": {"ban": FOUR}}]})
    with TestClient(create_app(engine)) as c:
        for seed in range(10):
            out = c.post("/v1/completions", json={"prompt": "Hello. ", "max_new_tokens": 24, "seed": seed,
                                                  "policy": {"ban": ["grade:14+"]}}).json()
            assert [a["rule"] for a in out["alarms"]] == ["safe>0=switch"]  # the switch happened at step 0
            assert "grade:14+" in out["policy"]["ban"]
            assert not [t for t in out["tokens"] if t["tag"] in ["grade:14+", *FOUR]], seed
    # the merged switch target carries every ban in force before the switch, and the siblings of forced tags
    op = load_policy({"ban": ["pii"], "rules": [{"watch": "neg", "above": 0.5, "action": "switch",
                                                "policy": {"bias": {"grade:0-6": 1.0}}}]}, SCHEMA)
    got = merge(op, RequestPolicy(ban=["grade:14+"], force=["safe"]), SCHEMA)
    target = got.rules[0].policy
    assert set(target.ban) == {"pii", "grade:14+", "offensive"} and target.bias == {"grade:0-6": 1.0}
    assert op.rules[0].policy.ban == []  # the operator's rule was not changed
    # a switch target that forces a tag banned before the switch is refused, naming the rule
    op = load_policy({"rules": [{"name": "to-neg", "watch": "neg", "above": 0.5, "action": "switch",
                                 "policy": {"force": ["neg"]}}]}, SCHEMA)
    with pytest.raises(PolicyFloorError, match="'to-neg' switches to a policy that forces 'neg'"):
        merge(op, RequestPolicy(ban=["neg"]), SCHEMA)


def test_a_request_may_not_lift_an_operator_force(model_dir):
    """The shipped watchdog forces `good`: allowing, biasing or forcing `bad`, or banning `good`, is a 422."""
    engine = Engine.from_dir(model_dir, policy="watchdog")
    with TestClient(create_app(engine, ServeConfig(max_new_tokens=8))) as c:
        for policy in ({"allow": ["bad"]}, {"bias": {"bad": 1e9}}, {"bias": {"bad": 1.0}}, {"force": ["bad"]},
                       {"ban": ["good"]}):
            r = c.post("/v1/completions", json={"prompt": "x", "policy": policy})
            assert r.status_code == 422, (policy, r.text)
            body = r.json()
            assert set(body) == {"error", "problems"}
            assert ("the operator's policy forces 'good'" in body["error"]
                    or "'good' is forced by the operator's policy" in body["error"])
        ok = c.post("/v1/completions", json={"prompt": "x", "max_new_tokens": 3, "policy": {"bias": {"good": 2}}})
        assert ok.status_code == 200 and ok.json()["policy"]["force"] == ["good"]


BAD_BODIES = [
    '{"prompt": "x", "temperature": NaN}',
    '{"prompt": "x", "temperature": Infinity}',
    '{"prompt": "x", "temperature": -Infinity}',
    '{"prompt": "x", "temperature": 1e308}',
    '{"prompt": "x", "temperature": 8.6e-133}',
    '{"prompt": "x", "seed": 1e30}',
    '{"prompt": "x", "seed": 1000000000000000000000000000000}',
    '{"prompt": "x", "seed": -1}',
    '{"prompt": "x", "policy": {"bias": {"good": 1e300}}}',
    '{"prompt": "x", "policy": {"bias": {"good": NaN}}}',
    '{"prompt": "x", "policy": {"bias": {"good": "2"}}}',
    '{"prompt": "x", "policy": {"bias": "good"}}',
    '{"prompt": "a\\ud800b"}',
    '{"prompt": "x", "policy": {"ban": ["a\\udfffb"], "bias": {"\\ud800": 1}}}',
    '{"prompt": "x", "max_new_tokens": "10"}',
    '{"prompt": "x", "max_new_tokens": true}',
    '{"prompt": "x", "max_new_tokens": 4.5}',
    '{"prompt": "x", "stream": "yes"}',
    '{"prompt": "x", "policy": {"stop_on_alarm": 1}}',
    '{"prompt": 5}',
    '{"prompt": "x", "top_k": 0}',
    '[1, 2]',
    '"just a string"',
    '{"prompt": "x", "policy": ' + "[" * 100_000 + "]" * 100_000 + "}",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_input_is_a_4xx_in_the_documented_shape_never_a_500(client, body):
    r = client.post("/v1/completions", content=body.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    got = r.json()
    assert set(got) == {"error", "problems"} and got["problems"] and isinstance(got["error"], str)


def test_errors_are_capped_and_big_bodies_refused(client):
    many = {"prompt": "x", "policy": {"ban": [f"tag{i}" for i in range(5000)]}}
    r = client.post("/v1/completions", json=many)
    assert r.status_code == 422 and len(r.content) < 20_000
    probs = r.json()["problems"]
    assert len(probs) == 21 and probs[-1] == "... and 4980 more problems" and "unknown tag 'tag0'" in probs[0]
    huge = {"prompt": "x", "policy": {"ban": [f"t{i}" for i in range(200_000)]}}  # ~2.5 MB
    r = client.post("/v1/completions", json=huge)
    assert r.status_code == 413 and "exceeds the limit of 262144 bytes" in r.json()["error"]
    assert len(r.content) < 1000

    def chunks():  # no Content-Length: counted while it is read
        for _ in range(100):
            yield b" " * 10_000

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than" in r.json()["error"]
    assert client.get("/nope").json()["error"] == "Not Found"  # FastAPI's own errors in the same shape


def test_advertised_max_new_tokens_fits_the_context(model_dir):
    engine = Engine.from_dir(model_dir, policy="none")
    assert engine.context_length == 256
    with TestClient(create_app(engine, ServeConfig(max_new_tokens=256))) as c:
        limit = c.get("/v1/policy").json()["limits"]["max_new_tokens"]
        assert limit == 256 - len(engine.encode(""))
        r = c.post("/v1/completions", json={"prompt": "", "max_new_tokens": limit, "temperature": 0})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"prompt": "", "max_new_tokens": limit + 1})
        assert r.status_code == 422 and f"between 1 and {limit}" in r.json()["error"]


def test_loopback_server_checks_the_host_header(model_dir):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 must not reach the API."""
    engine = Engine.from_dir(model_dir, policy="none")
    with background_server(create_app(engine, ServeConfig(allowed_hosts=("pretag.internal",)))) as url:
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            r = httpx.get(url + "/health", headers={"Host": host})
            assert r.status_code == 421 and "is not served here" in r.json()["error"], host
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_new_tokens": 2},
                       headers={"Host": "evil.example"})
        assert r.status_code == 421
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", "pretag.internal", "LOCALHOST",
                     "127.0.0.2", f"[::1]:{port}"):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
        assert httpx.get(url + "/health").status_code == 200


# ---- OpenAI's completions fields ------------------------------------------------------------------------------
def _greedy(client, **extra):
    r = client.post("/v1/completions", json={"prompt": "The quick", "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_fields_and_shape(client):
    a = _greedy(client, max_tokens=5)
    b = _greedy(client, max_new_tokens=5)
    assert a["tokens"] == b["tokens"] and a["n_tokens"] == 5  # max_tokens is max_new_tokens
    assert a["object"] == "text_completion" and a["id"].startswith("cmpl-") and a["model"] == a["model"]
    (c,) = a["choices"]
    assert c["index"] == 0 and c["text"] == a["text"] and c["finish_reason"] == "length" and c["logprobs"] is None
    assert c["tokens"] == a["tokens"] and set(c["max_temptation"]) == {"good", "bad"}
    assert a["usage"] == {"prompt_tokens": a["usage"]["prompt_tokens"], "completion_tokens": 5,
                          "total_tokens": a["usage"]["prompt_tokens"] + 5}
    served = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get("/openai/v1/models").json()["data"][0]["id"] == served == a["model"]
    assert _greedy(client, max_tokens=2, model=served, user="u1")["n_tokens"] == 2
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "max_new_tokens": 4, "model": "gpt-4",
                                             "n": 0, "logprobs": 6, "stop": ["a", "b", "c", "d", ""]})
    probs = r.json()["problems"]
    assert r.status_code == 422 and len(probs) == 6, probs
    assert any("model: this server serves" in p and "'gpt-4'" in p for p in probs)
    assert any(p.startswith("max_tokens (3) and max_new_tokens (4)") for p in probs)
    assert any(p.startswith("n: must be between 1 and 8") for p in probs)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 99})
    assert r.status_code == 422 and "max_tokens: must be between 1 and 16, got 99" in r.json()["error"]


def test_n_choices_are_seeded_one_after_another(client):
    many = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "n": 3, "seed": 7}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for i, c in enumerate(many["choices"]):
        one = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "seed": 7 + i}).json()
        assert c["text"] == one["text"] and [t["id"] for t in c["tokens"]] == [t["id"] for t in one["tokens"]]
        assert all(t["choice"] == i for t in c["tokens"])
    assert len({c["text"] for c in many["choices"]}) > 1  # sampled, not one answer three times
    assert many["usage"]["completion_tokens"] == sum(c["n_tokens"] for c in many["choices"])


def test_stop_cuts_the_text_before_the_sequence(client):
    ask = {"prompt": "Hello world", "seed": 1, "max_tokens": 12}  # seeded sampling: '...zhat... write'
    full = client.post("/v1/completions", json=ask).json()
    text = full["text"]
    assert "hat" in text, text
    cut = text[:text.find("hat")]
    out = client.post("/v1/completions", json={**ask, "stop": ["hat", "never appears"]}).json()
    assert out["text"] == out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    assert out["n_tokens"] < full["n_tokens"]
    # the streamed pieces (OpenAI chunks) add up to the cut text, however the sequence is split over tokens
    r = client.post("/openai/v1/completions", json={**ask, "stop": "hat", "stream": True})
    datas = [b.removeprefix("data: ") for b in r.text.strip().split("\n\n")]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert chunks[0]["choices"] == [] and chunks[0]["policy"]["ban"] == ["bad"]
    assert "".join(c["choices"][0]["text"] for c in chunks[1:]) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(set(c["choices"][0]["temptation"]) == {"good", "bad"} for c in chunks[1:-1])


def test_stopwatch_holds_back_a_partial_stop_sequence():
    from pretag.serve.openai_api import StopWatch

    sent = []
    w = StopWatch(["\n\n"], sent.append)
    for i, (text, tag) in enumerate([("a", None), ("\n", None), ("<|good|>", "good"), ("\n", None), ("b", None)]):
        w.token({"index": i, "text": text, "tag": tag})
        if i == 1:
            assert [e["text"] for e in sent] == ["a"]  # "\n" might begin the stop sequence: held
    assert w.hit and w.text == "a" and w.rendered == "a<|good|>"
    assert [e["text"] for e in sent] == ["a", "", "<|good|>", ""]  # the tag between the newlines does not count
    w = StopWatch(["xyz"], sent.append)
    w.token({"text": "x", "tag": None})
    w.finish()
    assert not w.hit and w.text == "x" and sent[-1]["text"] == "x"


def test_logprobs_are_under_the_policy(client):
    out = _greedy(client, prompt="Hello. ", max_tokens=6, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == out["n_tokens"]
    assert out["tokens"][0]["tag"] == "good" and lp["token_logprobs"][0] == pytest.approx(0.0, abs=1e-6)  # forced
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the likeliest
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert "<|bad|>" not in top  # banned: never an alternative
    assert lp["text_offset"][1:] == [len("".join(t["text"] for t in out["tokens"][1:i])) for i in range(1, 6)]
