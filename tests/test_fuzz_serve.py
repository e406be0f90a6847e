"""Fuzz the HTTP API over its request schema: whatever a client sends, the answer is a 200 or a 4xx in the
documented ``{"error", "problems"}`` shape, never a 5xx, and a 200 never carries a tag the effective policy bans.

Hypothesis draws bodies field by field from the API's schema (``pretag.serve.app.CompletionIn``), mixing valid
values with the wrong types, non-finite and huge numbers, lone surrogates, unknown tags and unknown fields. The
operator's floor is the hard case: four bans plus a ``switch`` rule that fires at the first step. Derandomized and
bounded (``max_examples``, 8 new tokens), so it runs in well under 30 s on two cores and fails the same way twice.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from pretag.serve.app import ServeConfig, create_app  # noqa: E402
from pretag.serve.engine import Engine  # noqa: E402
from pretag.serve.tiny import build_tiny_model_dir  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FOUR = ["offensive", "profane", "pii", "neg"]
OPERATOR = {"ban": ["offensive"], "rules": [
    {"name": "tempted", "watch": "pii", "above": 0.4, "action": "flag"},
    {"name": "switch", "watch": "safe", "above": 0.0, "action": "switch", "policy": {"ban": FOUR}}]}
TAGS = ["safe", "offensive", "clean", "profane", "nopii", "pii", "ok", "neg",
        "grade:0-6", "grade:6-10", "grade:10-14", "grade:14+"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = Engine.from_dir(build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), "multi"), policy=OPERATOR)
    with TestClient(create_app(engine, ServeConfig(max_new_tokens=8, max_prompt_tokens=64))) as c:
        yield c


junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
numbers = st.one_of(st.floats(-3, 3), st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([1e300, 1e-300]))
tag = st.one_of(st.sampled_from(TAGS), st.text(max_size=6), st.just("a\ud800b"))
policy = st.one_of(st.fixed_dictionaries({}, optional={
    "ban": st.one_of(st.lists(tag, max_size=3), junk),
    "allow": st.one_of(st.lists(tag, max_size=2), junk),
    "force": st.one_of(st.lists(tag, max_size=2), junk),
    "bias": st.one_of(st.dictionaries(tag, numbers, max_size=3), junk),
    "alarms": st.one_of(st.dictionaries(tag, st.one_of(st.floats(0, 1), numbers), max_size=2), junk),
    "stop_on_alarm": st.one_of(st.booleans(), junk),
    "colour": junk,
}), junk)
# bodies the schema accepts (most reach generation, where the banned-tag check bites; drawn twice as often) ...
GOOD = ["safe", "clean", "nopii", "ok", "grade:0-6", "grade:6-10", "grade:10-14", "grade:14+"]
valid_policy = st.fixed_dictionaries({}, optional={
    "ban": st.lists(st.sampled_from(TAGS), max_size=3, unique=True),
    "allow": st.lists(st.sampled_from(GOOD), max_size=1),
    "force": st.lists(st.sampled_from(GOOD), max_size=1),
    "bias": st.dictionaries(st.sampled_from([t for t in TAGS if t != "offensive"]), st.floats(-20, 20), max_size=3),
    "alarms": st.dictionaries(st.sampled_from(TAGS), st.floats(0, 1), max_size=2),
    "stop_on_alarm": st.booleans(),
})
valid = st.fixed_dictionaries({"prompt": st.text(st.characters(codec="utf-8"), max_size=40)}, optional={
    "max_new_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 3),
    "top_k": st.integers(1, 400),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
    "policy": valid_policy,
})
# ... and anything else: wrong types, non-finite and huge numbers, surrogates, unknown tags and fields
body = st.one_of(valid, valid, st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=40), st.just("a\ud800b. "), junk)},
                                       optional={
    "max_new_tokens": st.one_of(st.integers(-2, 10), junk),
    "temperature": st.one_of(st.floats(0, 2), numbers, junk),
    "top_k": st.one_of(st.integers(-1, 50), junk),
    "top_p": st.one_of(st.floats(0, 1), numbers, junk),
    "seed": st.one_of(st.integers(0, 100), st.integers(-(2**70), 2**70), numbers, junk),
    "stream": st.one_of(st.booleans(), junk),
    "policy": policy,
    "extra": junk,
}), junk)


def _banned(effective: dict) -> set[str]:
    """Tags the effective policy forbids for the whole generation: its bans and the siblings of its forced tags."""
    out = set(effective["ban"])
    for f in effective["force"]:
        prefix = f.split(":")[0] + ":" if ":" in f else None
        pairs = [("safe", "offensive"), ("clean", "profane"), ("nopii", "pii"), ("ok", "neg")]
        group = next((set(p) for p in pairs if f in p), {t for t in TAGS if prefix and t.startswith(prefix)})
        out |= group - {f}
    return out


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body)
def test_fuzz_completions_never_5xx_never_a_banned_tag(client, body):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # NaN/Infinity as Python's JSON writes them
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    event(f"status {r.status_code}")  # --hypothesis-show-statistics: how many bodies reached generation
    if r.status_code != 200:
        err = r.json()
        assert set(err) == {"error", "problems"} and err["problems"], err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in r.text.strip().split("\n\n")]
        assert events[0][0] == "start" and events[-1][0] == "done", events[-1]
        effective, tokens = events[0][1]["policy"], [d for k, d in events if k == "token"]
    else:
        out = r.json()
        effective, tokens = out["policy"], out["tokens"]
    banned = _banned(effective) | {"offensive"}
    assert not [t["tag"] for t in tokens if t["tag"] in banned], (effective, [t["tag"] for t in tokens])
