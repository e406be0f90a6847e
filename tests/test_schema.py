import dataclasses

import pytest

from pretag.schema import SchemaError, load_schema, schema_from_dict, shipped_schemas


def test_every_shipped_schema_loads():
    names = shipped_schemas()
    assert {"pep8", "pii", "toxicity", "multi"} <= set(names)
    for n in names:
        s = load_schema(n)
        assert len(set(s.tag_tokens)) == len(s.tag_tokens)


def test_threshold_zero_means_zero():
    a = load_schema("pep8").attribute("pep8")
    assert a.threshold == 0
    assert a.value_of(0.0) == "good"
    assert a.value_of(1e-9) == "bad"
    assert a.value_of(None) is None


def test_higher_is_better_and_bands():
    s = load_schema("multi")
    sent = s.attribute("sentiment")
    assert sent.value_of(-0.5) == "bad" and sent.value_of(0.2) == "good"
    grade = s.attribute("grade")
    assert grade.values == ["0-6", "6-10", "10-14", "14+"]
    assert [grade.value_of(x) for x in (0, 5.9, 6, 13.9, 14, 30)] == ["0-6", "0-6", "6-10", "10-14", "14+", "14+"]
    assert s.tag_name("grade", "6-10") == "grade:6-10"
    assert s.open_token("grade:6-10") == "<|grade:6-10|>"


def test_lone_binary_attribute_gets_plain_good_bad_tags():
    rx = {"type": "regex", "patterns": ["x"]}
    s = schema_from_dict({"attributes": [{"name": "x", "scorer": rx, "threshold": 0.5}]})
    assert s.tag_names == ["good", "bad"]
    s2 = schema_from_dict({"attributes": [{"name": "x", "scorer": rx, "threshold": 0.5},
                                          {"name": "y", "scorer": "pii", "threshold": 0}]})
    assert s2.tag_names == ["x:good", "x:bad", "y:good", "y:bad"]


def test_validation_reports_every_problem_at_once():
    bad = {
        "segmenter": "words",
        "render": "inline",
        "colour": "red",
        "attributes": [
            {"name": "a", "scorer": "pep8"},  # neither threshold nor bands
            {"name": "b", "scorer": "pep8", "threshold": 0, "bands": [1, 2]},
            {"name": "c", "scorer": "pep8", "bands": [3, 1]},
            {"name": "d", "scorer": "pep8", "threshold": 0, "tags": {"bad": "x", "good": "x"}},
        ],
    }
    with pytest.raises(SchemaError) as e:
        schema_from_dict(bad)
    msg = str(e.value)
    for needle in ("words", "inline", "colour", "(a)", "(b)", "(c)", "'x'"):
        assert needle in msg, needle


def test_unknown_tag_names_the_known_ones():
    s = load_schema("sentiment")
    with pytest.raises(SchemaError, match="ok, neg"):
        s.open_token("angry")


def test_missing_schema_is_a_clear_error(tmp_path):
    with pytest.raises(SchemaError, match="neither a file nor a shipped schema"):
        load_schema("nope")
    p = tmp_path / "s.yaml"
    p.write_text("attributes: [unclosed")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_schema(p)


def test_prefix_rendering_puts_tags_as_separate_pieces():
    s = load_schema("multi")
    tags = {"offensive": ["offensive"], "profanity": ["clean", "profane"], "pii": [None, None],
            "sentiment": ["ok", None], "grade": [None, None]}
    pieces = s.render_pieces(["Hi. ", "Bye."], tags)
    assert [(p.tag, p.segment) for p in pieces] == [
        ("offensive", -1), ("clean", 0), ("ok", 0), (None, 0), ("profane", 1), (None, 1)]
    assert "".join(p.text for p in pieces if p.tag is None) == "Hi. Bye."


def test_span_rendering_merges_equal_neighbours_and_closes():
    s = dataclasses.replace(load_schema("pep8"), render="span")
    text = s.render_text(["a\n", "b\n", "c\n", "d\n"], {"pep8": ["good", "good", "bad", None]})
    assert text == "<good>a\nb\n</good><bad>c\n</bad>d\n"
    assert s.tag_tokens == ["<good>", "</good>", "<bad>", "</bad>"]


def test_schema_round_trips_through_yaml(tmp_path):
    s = load_schema("multi")
    s.save(tmp_path / "s.yaml")
    s2 = load_schema(tmp_path / "s.yaml")
    assert s2.tag_tokens == s.tag_tokens and s2.segmenter == s.segmenter


def test_scorer_problems_are_reported_with_the_schemas_other_problems():
    """Issue 11: an unknown scorer and a bad direction used to come out one per run (the scorer only at labeling)."""
    bad = {"attributes": [
        {"name": "a", "scorer": "nope", "direction": "up", "threshold": 0},
        {"name": "b", "scorer": {"type": "regex", "patern": "x"}, "threshold": 0},
        {"name": "c", "scorer": {"type": "cascade", "cheap": "pep8", "expensive": {"type": "hf"}}, "threshold": 0},
    ]}
    with pytest.raises(SchemaError) as e:
        schema_from_dict(bad)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for needle in ("(a): scorer: unknown scorer type 'nope'", "(a): direction 'up'", "(b): scorer: scorer 'regex' "
                   "has no option 'patern'", "(b): scorer: scorer 'regex' needs option 'patterns'",
                   "(c): scorer.expensive: scorer 'hf' needs option 'model'"):
        assert needle in msg, needle
