"""The one collector of validation problems: every problem in one error, in the house format."""

import pytest

from pretag.problems import Problems
from pretag.schema import SchemaError


def test_no_problem_raises_nothing():
    Problems().check(ValueError, "x")


def test_every_problem_is_listed_with_count_where_and_what():
    p = Problems(["a is wrong"])
    p += ["b is wrong"]
    p.append("c is wrong")
    with pytest.raises(SchemaError) as e:
        p.check(SchemaError, "f.yaml", of="the schema")
    assert str(e.value) == "f.yaml: 3 problem(s) in the schema:\n  - a is wrong\n  - b is wrong\n  - c is wrong"
    assert p.message(kind="scorer problem") == "3 scorer problem(s):\n  - a is wrong\n  - b is wrong\n  - c is wrong"


def test_schema_and_policy_report_through_it():
    from pretag.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError, match=r"^policy string 'frob:x,ban': 2 problem\(s\):\n  - ") as e:
        parse_policy("frob:x,ban")
    assert str(e.value).count("\n  - ") == 2
