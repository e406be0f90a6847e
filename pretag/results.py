"""Typed results of ``pretag eval``: what ``evaluate_model`` measured, as dataclasses instead of nested dicts.

Tables, plots and summaries (``pretag.report``) read attributes of an :class:`EvalResult`, so a renamed field is an
``AttributeError`` (or, reading a JSON file, a ``ValueError`` naming the key) instead of a silent "–" in a table.
``to_dict`` gives back exactly the JSON ``evaluate_model`` has always written (same keys, same order), so result
files on disk and cached evaluations do not change; ``from_dict`` reads one, refusing missing and unknown keys.
An optional section (``kl``, ``loss``, ``redteam``, ...) is None when it was not measured, and absent in the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from pretag.metrics import Estimate


class ResultError(ValueError):
    """A result dict that does not have the shape ``evaluate_model`` writes."""


def _take(cls, d: Any, where: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``d``'s values for ``cls``'s fields; a missing required key or an unknown key is a ResultError."""
    if not isinstance(d, dict):
        raise ResultError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in names]
    missing = [k for k in names if k not in d and k not in optional]
    if unknown or missing:
        raise ResultError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    return {k: d.get(k) for k in names}


def _drop_none(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


class _Flat:
    """A result whose dict is its fields, in order: ``from_dict`` checks the keys (where = ``WHERE`` by default),
    ``to_dict`` writes them back in the order ``evaluate_model`` writes them."""

    WHERE: ClassVar[str] = ""
    NEWER: ClassVar[tuple[str, ...]] = ()
    """Fields added after result files existed: optional when read, left out when None (old files stay valid and
    a new file without the measurement is byte-identical to an old one)."""

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None):
        return cls(**_take(cls, d, where or cls.WHERE, optional=cls.NEWER))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({f.name: getattr(self, f.name) for f in fields(self)}, self.NEWER)


def estimate(d: Any, where: str) -> Estimate:
    """An ``Estimate`` from its dict (values may be None: json_safe turns an undefined NaN into null)."""
    return Estimate(**_take(Estimate, d, where))


# ---- misalignment -----------------------------------------------------------------------------------------
@dataclass
class PerSample(_Flat):
    """Per-sample numbers kept so two runs can be compared with an interval on their ratio (``ratio_ci``)."""

    score: list[float]
    any_bad: list[float]
    bad_segments: list[int]
    segments: list[int]

    WHERE = "per_sample"


_SCORED = ("score", "expected_max", "expected_max_k", "frac_samples_any_bad", "frac_bad_segments", "per_sample")


@dataclass
class Misalignment:
    """``pretag.metrics.misalignment_summary`` of one attribute (plus its direction). With nothing scored
    (``n_samples`` 0) only the counts are there: every other field is None."""

    n_samples: int
    n_segments: int
    score: Estimate | None = None
    expected_max: float | None = None
    expected_max_k: int | None = None
    frac_samples_any_bad: Estimate | None = None
    frac_bad_segments: Estimate | None = None
    per_sample: PerSample | None = None
    direction: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "misalignment") -> Misalignment:
        scored = isinstance(d, dict) and bool(d.get("n_samples"))
        v = _take(cls, d, where, optional=("direction",) + (() if scored else _SCORED))
        if scored:
            for k in ("score", "frac_samples_any_bad", "frac_bad_segments"):
                v[k] = estimate(v[k], f"{where}.{k}")
            v["per_sample"] = PerSample.from_dict(v["per_sample"], f"{where}.per_sample")
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_samples": self.n_samples, "n_segments": self.n_segments}
        if self.n_samples:
            out.update(score=self.score.to_dict(), expected_max=self.expected_max, expected_max_k=self.expected_max_k,
                       frac_samples_any_bad=self.frac_samples_any_bad.to_dict(),
                       frac_bad_segments=self.frac_bad_segments.to_dict(), per_sample=self.per_sample.to_dict())
        if self.direction is not None:
            out["direction"] = self.direction
        return out


def _per_attr(cls, d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ResultError(f"{where}: expected a mapping of attributes, got {type(d).__name__}")
    return {a: cls.from_dict(v, f"{where}.{a}") for a, v in d.items()}


def _attr_dicts(d: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if d is None else {a: v.to_dict() for a, v in d.items()}


# ---- capability -------------------------------------------------------------------------------------------
@dataclass
class KL(_Flat):
    """KL(reference || model) in nats per sample, with its bootstrap interval."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int
    reference: str
    conditioned: bool
    """The model's log-probabilities were conditioned on its policy's start tags (a tag-trained model)."""
    sampler: float | None = None
    """KL(reference || the sampler): log-probabilities after the policy's processors and guidance
    (``pretag.evaluate.sampler_logprobs``), the distribution a tag-trained model's samples really come from."""
    sampler_lo: float | None = None
    sampler_hi: float | None = None

    WHERE = "kl"
    NEWER = ("sampler", "sampler_lo", "sampler_hi")


@dataclass
class LMLoss(_Flat):
    """Held-out LM loss in nats per text token, pooled over documents."""

    loss: float
    perplexity: float
    n_tokens: int
    n_docs: int

    WHERE = "loss"


@dataclass
class HeldoutLoss:
    untagged: LMLoss
    """The documents as training tokenized them, with no tag between segments."""
    tagged: LMLoss
    """With the classifier's tags (context only, never counted)."""
    joint: LMLoss | None = None
    """A tag-trained model only: with the classifier's tags, counting the tag tokens too, per text token:
    −log p(text, tags) / n_text. No oracle: the model pays for predicting its own tags, so this bounds its loss on
    plain text from above (p(text) ≥ p(text, tags)), where ``tagged`` is helped by tags that announce what follows."""

    @classmethod
    def from_dict(cls, d: Any, where: str = "loss") -> HeldoutLoss:
        v = _take(cls, d, where, optional=("joint",))
        joint = v.get("joint")
        return cls(LMLoss.from_dict(v["untagged"], f"{where}.untagged"), LMLoss.from_dict(v["tagged"], f"{where}.tagged"),
                   None if joint is None else LMLoss.from_dict(joint, f"{where}.joint"))

    def to_dict(self) -> dict[str, Any]:
        out = {"untagged": self.untagged.to_dict(), "tagged": self.tagged.to_dict()}
        if self.joint is not None:
            out["joint"] = self.joint.to_dict()
        return out


@dataclass
class Diversity(_Flat):
    distinct_1: float
    distinct_2: float
    distinct_3: float

    WHERE = "diversity"


# ---- does the model know? ---------------------------------------------------------------------------------
@dataclass
class SelfTagging(_Flat):
    """P(bad tag) at held-out segment starts, and the bad-vs-good log-likelihood ratio, against the classifier."""

    n: int
    n_bad: int
    auroc: float | None
    calibration: dict[str, Any]
    mean_tag_mass: float | None
    llr_auroc: float | None
    mean_llr_bad: float | None
    mean_llr_good: float | None

    WHERE = "self_tagging"


@dataclass
class Temptation(_Flat):
    """Temptation of the bad tag before segments the classifier then judged bad vs good (unbanned samples)."""

    auroc: float | None
    n: int
    n_bad: int
    mean_before_bad: float | None
    mean_before_good: float | None
    before_bad: list[float]
    before_good: list[float]
    auroc_verdict: float | None = None
    """The same steps read as P(bad tag) / P(the attribute's tags): the tag the model would choose, before the ban."""
    verdict_before_bad: list[float] | None = None
    verdict_before_good: list[float] | None = None

    WHERE = "temptation"
    NEWER = ("auroc_verdict", "verdict_before_bad", "verdict_before_good")


@dataclass
class WarningLight:
    """Pre-ban P(bad tag) continuing bad vs clean held-out openings (AUROC): ``auroc`` of its mean over the
    continuation, ``auroc_first`` of its value at the first generated position. With no openings of both kinds only
    the counts (0, 0) are there. Older results lack the first-step fields and ``prompt_tags`` (they tagged the
    openings as the policy does: ``every`` for prefix schemas)."""

    auroc: float | None
    n_bad: int
    n_clean: int
    mean_after_bad: float | None = None
    mean_after_clean: float | None = None
    auroc_lo: float | None = None
    """95 % interval of the AUROC (bad and clean openings resampled separately); absent in older results."""
    auroc_hi: float | None = None
    auroc_first: float | None = None
    auroc_first_lo: float | None = None
    auroc_first_hi: float | None = None
    first_after_bad: float | None = None
    first_after_clean: float | None = None
    prompt_tags: str | None = None
    """How the openings were rendered (``none``: plain text, the model judges them)."""
    auroc_verdict: float | None = None
    """AUROC of the mean *verdict* over the continuation's forced tag positions: P(bad tags) / P(the attribute's
    tags), the model's choice among the tags where the policy makes one come, before the ban. The raw temptation
    also carries P(a tag here), which the text's shape moves as much as its content."""
    auroc_verdict_lo: float | None = None
    auroc_verdict_hi: float | None = None
    verdict_after_bad: float | None = None
    verdict_after_clean: float | None = None
    auroc_max: float | None = None
    """AUROC of the *highest* raw temptation over the continuation: what a flag rule (``alarm:bad>T``) sees, since
    it fires on a continuation iff that maximum is above its threshold; its ROC is the rule's over all T."""
    auroc_verdict_max: float | None = None
    """The same for the highest verdict: a ``verdict:bad>T`` rule's ROC over all T."""
    auroc_max_lo: float | None = None
    auroc_max_hi: float | None = None
    auroc_verdict_max_lo: float | None = None
    auroc_verdict_max_hi: float | None = None

    _FIRST = ("auroc_first", "auroc_first_lo", "auroc_first_hi", "first_after_bad", "first_after_clean", "prompt_tags")
    _VERDICT = ("auroc_verdict", "auroc_verdict_lo", "auroc_verdict_hi", "verdict_after_bad", "verdict_after_clean",
                "auroc_max", "auroc_max_lo", "auroc_max_hi", "auroc_verdict_max", "auroc_verdict_max_lo",
                "auroc_verdict_max_hi")
    _NEWER = ("auroc_lo", "auroc_hi", *_FIRST, *_VERDICT)  # absent in older results

    @classmethod
    def from_dict(cls, d: Any, where: str = "warning_light") -> WarningLight:
        some = isinstance(d, dict) and bool(d.get("n_bad") or d.get("n_clean"))
        opt = cls._NEWER if some else ("mean_after_bad", "mean_after_clean", *cls._NEWER)
        return cls(**_take(cls, d, where, optional=opt))

    def to_dict(self) -> dict[str, Any]:
        out = {"auroc": self.auroc, "n_bad": self.n_bad, "n_clean": self.n_clean}
        if self.n_bad or self.n_clean:
            out.update(mean_after_bad=self.mean_after_bad, mean_after_clean=self.mean_after_clean)
        if self.auroc_lo is not None:
            out.update(auroc_lo=self.auroc_lo, auroc_hi=self.auroc_hi)
        out.update({k: getattr(self, k) for k in (*self._FIRST, *self._VERDICT) if getattr(self, k) is not None})
        return out


@dataclass
class RedTeam:
    """Misalignment of continuations of the worst-scored held-out documents' openings."""

    n_prompts: int
    n_trimmed: int
    misalignment: dict[str, Misalignment]
    examples: list[dict[str, str]]

    @classmethod
    def from_dict(cls, d: Any, where: str = "redteam") -> RedTeam:
        v = _take(cls, d, where)
        v["misalignment"] = _per_attr(Misalignment, v["misalignment"], f"{where}.misalignment")
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        return {"n_prompts": self.n_prompts, "n_trimmed": self.n_trimmed,
                "misalignment": _attr_dicts(self.misalignment), "examples": self.examples}


# ---- everything, for one model ----------------------------------------------------------------------------
_OPTIONAL = ("temptation", "kl", "loss", "self_tagging", "warning_light", "redteam", "experiment_settings")


@dataclass
class EvalResult:
    """Every metric ``evaluate_model`` measured for one model directory (see docs/evaluation.md for each)."""

    model: str
    schema: str
    tagged: bool
    policy: dict[str, Any]
    settings: dict[str, Any]
    misalignment: dict[str, Misalignment]
    diversity: Diversity
    truncated_fraction: float
    examples: list[str]
    temptation: dict[str, Temptation] | None = None
    kl: KL | None = None
    loss: HeldoutLoss | None = None
    self_tagging: dict[str, SelfTagging] | None = None
    warning_light: dict[str, WarningLight] | None = None
    redteam: RedTeam | None = None
    wall_s: float | None = None
    experiment_settings: dict[str, Any] | None = None
    """Added by ``pretag experiment`` to its cached evaluations: the settings (and model) they were made with."""

    @classmethod
    def from_dict(cls, d: Any, where: str = "result") -> EvalResult:
        v = _take(cls, d, where, optional=_OPTIONAL)
        v["misalignment"] = _per_attr(Misalignment, v["misalignment"], f"{where}.misalignment")
        v["diversity"] = Diversity.from_dict(v["diversity"], f"{where}.diversity")
        for key, kind in (("temptation", Temptation), ("self_tagging", SelfTagging), ("warning_light", WarningLight)):
            if v[key] is not None:
                v[key] = _per_attr(kind, v[key], f"{where}.{key}")
        for key, kind in (("kl", KL), ("loss", HeldoutLoss), ("redteam", RedTeam)):
            if v[key] is not None:
                v[key] = kind.from_dict(v[key], f"{where}.{key}")
        return cls(**v)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``evaluate_model`` writes: the same keys in the same order; unmeasured sections left out."""
        out = {"model": self.model, "schema": self.schema, "tagged": self.tagged, "policy": self.policy,
               "settings": self.settings, "misalignment": _attr_dicts(self.misalignment),
               "diversity": self.diversity.to_dict(), "truncated_fraction": self.truncated_fraction,
               "examples": self.examples, "temptation": _attr_dicts(self.temptation),
               "kl": self.kl and self.kl.to_dict(), "loss": self.loss and self.loss.to_dict(),
               "self_tagging": _attr_dicts(self.self_tagging), "warning_light": _attr_dicts(self.warning_light),
               "redteam": self.redteam and self.redteam.to_dict(), "wall_s": self.wall_s,
               "experiment_settings": self.experiment_settings}
        return _drop_none(out, _OPTIONAL)
