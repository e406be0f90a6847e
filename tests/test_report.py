"""Typed results and the tables drawn from them: a renamed field fails loudly, never as a silent "–"."""

import json

import pytest

from pretag.metrics import misalignment_summary
from pretag.report import format_summary, markdown_table, ratio_columns, result_row
from pretag.results import EvalResult, ResultError


def _mis(scores):
    m = misalignment_summary([["a", "b"]] * len(scores), scores, lambda x: x > 0.5, k=2, n_resamples=50)
    return {**m, "direction": "higher_is_worse"}


def fake_result(**over):
    """A result dict with the shape evaluate_model writes (every optional section present)."""
    est = {"value": 0.5, "lo": 0.25, "hi": 0.75, "n": 4}
    d = {"model": "m", "schema": "toy", "tagged": True, "policy": {"name": "default"},
         "settings": {"samples": 4, "max_new_tokens": 8, "temperature": 1.0, "seed": 0},
         "misalignment": {"tox": _mis([[0.9, 0.1], [0.1, 0.1], [0.8, 0.7], [0.2, 0.1]])},
         "diversity": {"distinct_1": 0.5, "distinct_2": 0.75, "distinct_3": 0.875},
         "truncated_fraction": 0.25, "examples": ["a b"],
         "temptation": {"tox": {"auroc": 0.625, "n": 3, "n_bad": 1, "mean_before_bad": 0.5, "mean_before_good": 0.25,
                                "before_bad": [0.5], "before_good": [0.25, 0.25], "auroc_verdict": 0.875,
                                "verdict_before_bad": [0.75], "verdict_before_good": [0.5, 0.25]}},
         "kl": {**est, "reference": "ref", "conditioned": True, "sampler": 1.5, "sampler_lo": 1.0, "sampler_hi": 2.0},
         "loss": {"untagged": {"loss": 2.5, "perplexity": 12.2, "n_tokens": 40, "n_docs": 2},
                  "tagged": {"loss": 2.25, "perplexity": 9.5, "n_tokens": 40, "n_docs": 2},
                  "joint": {"loss": 2.375, "perplexity": 10.75, "n_tokens": 40, "n_docs": 2}},
         "self_tagging": {"tox": {"n": 4, "n_bad": 2, "auroc": 0.75, "calibration": {"bins": [], "ece": 0.125, "n": 4},
                                  "mean_tag_mass": 0.5, "llr_auroc": 0.5, "mean_llr_bad": 0.25, "mean_llr_good": -0.25}},
         "warning_light": {"tox": {"auroc": 0.875, "n_bad": 1, "n_clean": 1, "mean_after_bad": 0.5,
                                   "mean_after_clean": 0.25, "auroc_lo": 0.75, "auroc_hi": 1.0,
                                   "auroc_verdict": 1.0, "auroc_verdict_lo": 1.0, "auroc_verdict_hi": 1.0,
                                   "verdict_after_bad": 0.75, "verdict_after_clean": 0.125}},
         "redteam": {"n_prompts": 2, "n_trimmed": 0, "misalignment": {"tox": _mis([[0.9, 0.9], [0.6, 0.1]])},
                     "examples": [{"prompt": "p", "continuation": "c"}]},
         "wall_s": 1.5}
    return {**d, **over}


def test_to_dict_gives_back_the_same_json_keys_and_order():
    d = fake_result()
    assert json.dumps(EvalResult.from_dict(d).to_dict()) == json.dumps(d)
    bare = {k: v for k, v in d.items() if k not in ("temptation", "kl", "loss", "self_tagging", "warning_light",
                                                     "redteam")}
    bare["misalignment"] = {"tox": {"n_samples": 0, "n_segments": 0, "direction": "higher_is_worse"}}
    assert json.dumps(EvalResult.from_dict(bare).to_dict()) == json.dumps(bare)


def test_every_measured_cell_of_the_row_is_filled():
    row = result_row("conditional", EvalResult.from_dict(fake_result()), {"tokens": 512, "wall_s": 3.0})
    assert all(v is not None for v in row.values()), [k for k, v in row.items() if v is None]
    assert (row["tox.redteam_score"], row["tox.selftag_auroc"], row["tox.temptation_auroc"]) == (
        pytest.approx(0.625), 0.75, 0.625)  # (0.9 + 0.35) / 2
    assert (row["tox.warning_auroc"], row["kl"], row["loss"], row["loss_tagged"], row["loss_joint"]) == (
        0.875, 0.5, 2.5, 2.25, 2.375)
    assert (row["tox.warning_auroc_lo"], row["tox.warning_auroc_hi"]) == (0.75, 1.0)
    assert (row["tox.warning_verdict_auroc"], row["tox.warning_verdict_auroc_lo"]) == (1.0, 1.0)
    assert (row["tox.temptation_verdict_auroc"], row["kl_sampler"], row["kl_sampler_lo"]) == (0.875, 1.5, 1.0)
    assert "–" not in markdown_table([row])


def test_a_renamed_field_fails_loudly_instead_of_printing_a_dash():
    d = fake_result()
    d["self_tagging"]["tox"]["auc"] = d["self_tagging"]["tox"].pop("auroc")  # a rename in evaluate.py
    with pytest.raises(ResultError, match=r"self_tagging\.tox: missing auroc; unknown auc"):
        EvalResult.from_dict(d)
    d = fake_result()
    d["loss"]["untagged"].pop("loss")
    with pytest.raises(ResultError, match=r"loss\.untagged: missing loss"):
        EvalResult.from_dict(d)

    class Renamed:  # a result object whose field was renamed: the table raises rather than show "–"
        def __init__(self, res):
            self.__dict__.update({("heldout" if k == "loss" else k): v for k, v in vars(res).items()})

    with pytest.raises(AttributeError, match="loss"):
        result_row("x", Renamed(EvalResult.from_dict(fake_result())))


def test_unmeasured_sections_are_dashes_and_the_summary_reads_attributes():
    res = EvalResult.from_dict({k: v for k, v in fake_result().items() if k not in ("kl", "loss", "redteam")})
    row = result_row("mle", res)
    assert row["kl"] is None and row["loss"] is None and row["tox.redteam_score"] is None
    assert "| – |" in markdown_table([row])
    text = format_summary(EvalResult.from_dict(fake_result()))
    assert "KL from ref: 0.5 [0.25, 0.75]" in text and "self-tagging tox: AUROC 0.75, ECE 0.125" in text
    assert "held-out loss: 2.5 nats/token untagged, 2.25 with tags (2 docs)" in text


def test_ratio_columns_of_typed_results_match_those_of_dicts():
    base, run = fake_result(), fake_result(misalignment={"tox": _mis([[0.1, 0.1], [0.2, 0.1], [0.8, 0.1],
                                                                       [0.1, 0.3]])})
    typed = ratio_columns(EvalResult.from_dict(base), EvalResult.from_dict(run))
    assert typed == ratio_columns(base, run)
    assert typed["tox.mle_ratio"] > 1 and typed["tox.mle_ratio_bad_segments"] == pytest.approx(3.0)
