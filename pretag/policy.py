"""Tag policies: which control tags a model may write at inference, and rules that change that while it writes.

A :class:`TagPolicy` says, per tag, ``allow`` / ``ban`` / ``force`` and a logit ``bias``, where tags are forced
(``force_at``: every segment start, the start of generation, or nowhere) and which :class:`Rule`s run at every
step (ban after N tokens; flag, stop or switch policy when a tag's temptation, or its verdict at segment starts,
stays above a threshold). Policies come from YAML files, shipped names (``pretag/configs/policies``) or a compact
string (``ban:bad,bias:grade:6-10=+2,alarm:bad>0.3x2=stop,verdict:bad>0.5=stop``), and are validated against the
model's schema: every problem is reported at once. :class:`pretag.control.TagProcessor` applies them inside
``model.generate``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretag.problems import Problems
from pretag.schema import Schema

POLICY_DIR = Path(__file__).parent / "configs" / "policies"
FORCE_AT = ("segment", "start", "none")
PROMPT_TAGS = ("every", "first", "none")
RULE_ACTIONS = ("flag", "stop", "switch", "ban")
RULE_READINGS = ("temptation", "verdict")
MAX_BIAS = 1e4
"""Largest |bias| accepted: e^10000 already decides any choice; beyond ~1e38 a float32 logit overflows to inf and
the softmax turns into NaN (the server answered 500 to a bias of 1e300). Use ``ban`` to forbid a tag."""


class PolicyError(ValueError):
    """A policy (file, string or dict) has problems; the message lists all of them."""


# ---- policy ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A dynamic rule, evaluated at every step; once it fires it stays fired (latches) for that sequence.

    It fires at step ``t`` (0 = the first generated token) when ``t >= after`` (if set) and, if ``watch`` is set,
    the temptation of ``watch`` was above ``above`` for ``consecutive`` steps in a row ending at ``t``.
    Examples: ``Rule("ban", after=50, tags=["bad"])`` bans ``bad`` from token 50 on;
    ``Rule("stop", watch="bad", above=0.3, consecutive=3)`` ends the generation after 3 tempted tokens.

    ``reading`` says what the rule compares with ``above``: the ``temptation`` (default; P(watch) at every step), or
    the ``verdict``: P(watch) / P(any tag of watch's attribute), read only where the text asks for that attribute's
    tag (a segment start; prefix schemas), the model's choice once a tag must come. Other steps neither count nor
    reset a verdict rule's run. The temptation is the verdict times P(a tag here), which the shape of the text moves
    as much as its content; on a context label the verdict is the reading that separates (``docs/evaluation.md``).
    ``Rule("stop", watch="bad", above=0.5, reading="verdict")`` stops at the first segment start where the model
    would rather write ``bad`` than any other value.

    Frozen (``tags`` is kept as a tuple): the server's operator policy shares its rules across concurrent requests,
    so per-run state (counters, latches, switch targets) lives in the ``TagProcessor``, never on the rule.
    Derive a changed rule with ``dataclasses.replace``.
    """

    action: str
    """``flag`` (record an alarm), ``stop`` (end the sequence), ``switch`` (to ``policy``), ``ban`` (``tags``)."""
    watch: str | None = None
    above: float | None = None
    consecutive: int = 1
    after: int | None = None
    tags: tuple[str, ...] = ()
    policy: TagPolicy | str | None = None
    """``switch`` target: a policy, a shipped policy name, a YAML file or a compact string."""
    name: str = ""
    reading: str = "temptation"
    """``temptation`` or ``verdict`` (see above)."""

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):
            object.__setattr__(self, "tags", (self.tags,))
        elif not isinstance(self.tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        cond = []
        if self.watch is not None:
            watched = f"verdict({self.watch})" if self.reading == "verdict" else self.watch
            cond.append(f"{watched}>{self.above:g}" + (f"x{self.consecutive}" if self.consecutive > 1 else ""))
        if self.after is not None:
            cond.append(f"@{self.after}")
        return f"{' '.join(cond) or 'always'}={self.action}"


@dataclass
class TagPolicy:
    """What generation may do with each tag. Tags are schema tag *names* (``bad``, ``grade:6-10``)."""

    ban: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    """A forced tag is the only allowed value of its attribute (the others are banned)."""
    allow: list[str] = field(default_factory=list)
    bias: dict[str, float] = field(default_factory=dict)
    force_at: str | None = None
    """``segment`` | ``start`` | ``none``; None = the schema's default (prefix: segment, span: start)."""
    prompt_tags: str | None = None
    """How the prompt itself is tagged: ``every`` segment with the start tag (as if the prompt were text the policy
    wrote), the ``first`` one only, or ``none`` (the prompt is the user's text and claims nothing; with ``force_at:
    segment`` tags are still forced from the first segment start after it). None = as ``force_at`` implies (segment: every, start: first,
    none: none). ``none`` is how a warning light reads a context: the model judges the prompt instead of being
    told it is good."""
    rules: list[Rule] = field(default_factory=list)
    name: str = "policy"
    guide: dict[str, float] = field(default_factory=dict)
    """Tag guidance (``pretag.guidance``): tag -> weight; the text is steered away from what the tag announces
    (usually the banned tags, e.g. ``{bad: 2}``). Sampling and greedy decoding with ``pretag.generate.generate``."""

    def resolved_force_at(self, schema: Schema) -> str:
        return self.force_at or ("segment" if schema.render == "prefix" else "start")

    def resolved_prompt_tags(self, schema: Schema) -> str:
        return self.prompt_tags or {"segment": "every", "start": "first", "none": "none"}[self.resolved_force_at(schema)]

    def validate(self, schema: Schema) -> None:
        """Raise :class:`PolicyError` listing every problem (unknown tags name the known ones)."""
        problems = Problems()
        known = schema.tag_names
        unknown_msg = f"schema {schema.name!r} has tags: {', '.join(known)}"

        def check(tag: Any, where: str) -> bool:
            if tag not in known:
                problems.append(f"{where}: unknown tag {tag!r}; {unknown_msg}")
                return False
            return True

        for verb in ("ban", "force", "allow"):
            for t in getattr(self, verb):
                check(t, verb)
        for t, b in self.bias.items():
            check(t, "bias")
            if isinstance(b, bool) or not isinstance(b, int | float) or abs(b) > MAX_BIAS or not math.isfinite(b):
                problems.append(f"bias: value for {t!r} must be a finite number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                                f"got {b!r} (use ban to forbid a tag)")
        from pretag.guidance import MAX_GUIDE

        for t, w in self.guide.items():
            check(t, "guide")
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= MAX_GUIDE:
                problems.append(f"guide: weight for {t!r} must be a number in (0, {MAX_GUIDE:g}], got {w!r}")
        if self.force_at is not None and self.force_at not in FORCE_AT:
            problems.append(f"force_at {self.force_at!r} is not one of {FORCE_AT}")
        if self.prompt_tags is not None and self.prompt_tags not in PROMPT_TAGS:
            problems.append(f"prompt_tags {self.prompt_tags!r} is not one of {PROMPT_TAGS}")
        elif self.prompt_tags == "every" and self.resolved_force_at(schema) != "segment":
            problems.append("prompt_tags 'every' needs force_at 'segment' (a tag before every prompt segment is what "
                            "segment forcing writes)")
        elif self.prompt_tags == "first" and self.resolved_force_at(schema) == "none":
            problems.append("prompt_tags 'first' needs force_at 'segment' or 'start' (force_at 'none' forces no tag)")
        for t in set(self.ban) & (set(self.force) | set(self.allow)):
            problems.append(f"tag {t!r} is both banned and forced/allowed")
        for a in schema.attributes:
            tags = list(a.tags.values())
            forced = [t for t in self.force if t in tags]
            if len(forced) > 1:
                problems.append(f"attribute {a.name!r}: at most one tag can be forced, got {forced}")
            if tags and all(t in self.ban for t in tags) and self.resolved_force_at(schema) != "none":
                problems.append(f"attribute {a.name!r}: every value is banned ({tags}) but a tag must be forced; "
                                "allow one or use force_at: none")
        if self.force and self.force_at == "none":
            problems.append("force needs force_at 'segment' or 'start' (force_at 'none' forces nothing)")
        for i, r in enumerate(self.rules):
            w = f"rules[{i}] ({r.label})"
            if r.action not in RULE_ACTIONS:
                problems.append(f"{w}: action {r.action!r} is not one of {RULE_ACTIONS}")
            if r.reading not in RULE_READINGS:
                problems.append(f"{w}: reading {r.reading!r} is not one of {RULE_READINGS}")
            elif r.reading == "verdict":
                if r.watch is None:
                    problems.append(f"{w}: reading 'verdict' needs 'watch' (the tag whose share of its attribute "
                                    "is read)")
                if schema.render != "prefix":
                    problems.append(f"{w}: reading 'verdict' needs a prefix schema (span tags are never chosen "
                                    "mid-text, so there is no step where the model picks among them)")
            if r.watch is not None:
                check(r.watch, w)
                if r.above is None or not 0.0 <= float(r.above) <= 1.0:
                    problems.append(f"{w}: 'above' must be a probability in [0, 1] when 'watch' is set")
            elif r.after is None:
                problems.append(f"{w}: set 'watch' (with 'above') and/or 'after'")
            if not isinstance(r.consecutive, int) or r.consecutive < 1:
                problems.append(f"{w}: consecutive must be an integer >= 1, got {r.consecutive!r}")
            if r.after is not None and (not isinstance(r.after, int) or r.after < 0):
                problems.append(f"{w}: after must be an integer >= 0, got {r.after!r}")
            if r.action == "ban":
                if not r.tags:
                    problems.append(f"{w}: action 'ban' needs 'tags'")
                for t in r.tags:
                    check(t, w)
            if r.action == "switch":
                if r.policy is None:
                    problems.append(f"{w}: action 'switch' needs 'policy'")
                else:
                    try:
                        target = load_policy(r.policy, schema) if not isinstance(r.policy, TagPolicy) else r.policy
                        target.validate(schema)
                        if target.rules:
                            problems.append(f"{w}: a switch target may not have rules of its own")
                        if target.guide != self.guide:
                            problems.append(f"{w}: a switch target may not change guide (guidance is set once, "
                                            "for the whole generation)")
                    except PolicyError as e:
                        problems.append(f"{w}: switch target: {e}")
        problems.check(PolicyError, f"policy {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        for k in ("ban", "force", "allow"):
            if getattr(self, k):
                d[k] = list(getattr(self, k))
        if self.bias:
            d["bias"] = dict(self.bias)
        if self.force_at:
            d["force_at"] = self.force_at
        if self.prompt_tags:
            d["prompt_tags"] = self.prompt_tags
        if self.guide:
            d["guide"] = dict(self.guide)
        if self.rules:
            d["rules"] = [{k: (v.to_dict() if isinstance(v, TagPolicy) else list(v) if isinstance(v, tuple) else v)
                           for k, v in r.__dict__.items()
                           if v not in (None, [], (), "") and not (k == "consecutive" and v == 1)
                           and not (k == "reading" and v == "temptation")}
                          for r in self.rules]
        return d


def default_policy(schema: Schema) -> TagPolicy:
    """Ban every bad value; force an allowed tag where the schema's render style expects one."""
    return TagPolicy(ban=[a.tags[v] for a in schema.attributes for v in a.bad], name="default")


def policy_from_dict(d: dict[str, Any], *, where: str = "<dict>") -> TagPolicy:
    """Build a policy from a YAML mapping; shape problems are collected, tag problems come from ``validate``."""
    if not isinstance(d, dict):
        raise PolicyError(f"{where}: a policy must be a mapping, got {type(d).__name__}")
    problems = Problems()
    known = {"name", "description", "schema", "ban", "force", "allow", "bias", "force_at", "prompt_tags", "rules",
             "guide"}
    for k in d:
        if k not in known:
            problems.append(f"unknown key {k!r} (known: {', '.join(sorted(known))})")
    lists = {}
    for k in ("ban", "force", "allow"):
        v = d.get(k) or []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            problems.append(f"{k}: must be a tag name or a list of tag names")
            v = []
        lists[k] = [str(t) for t in v]
    bias = d.get("bias") or {}
    if not isinstance(bias, dict):
        problems.append("bias: must map tag names to numbers")
        bias = {}
    guide = d.get("guide") or {}
    if not isinstance(guide, dict):
        problems.append("guide: must map tag names to weights, e.g. {bad: 2}")
        guide = {}
    rules = []
    rkeys = set(Rule.__dataclass_fields__)
    for i, r in enumerate(d.get("rules") or []):
        if not isinstance(r, dict) or "action" not in r:
            problems.append(f"rules[{i}]: must be a mapping with an 'action'")
            continue
        bad = [k for k in r if k not in rkeys]
        if bad:
            problems.append(f"rules[{i}]: unknown key(s) {bad} (known: {', '.join(sorted(rkeys))})")
            continue
        r = dict(r)
        if isinstance(r.get("tags"), str):
            r["tags"] = [r["tags"]]
        if isinstance(r.get("policy"), dict):
            r["policy"] = policy_from_dict(r["policy"], where=f"{where} rules[{i}].policy")
        rules.append(Rule(**r))
    problems.check(PolicyError, where, of="the policy")
    return TagPolicy(ban=lists["ban"], force=lists["force"], allow=lists["allow"],
                     bias={str(k): v for k, v in bias.items()}, force_at=d.get("force_at"),
                     prompt_tags=d.get("prompt_tags"), rules=rules,
                     guide={str(k): v for k, v in guide.items()},
                     name=str(d.get("name") or Path(where).stem))


_RULE_RE = re.compile(r"^(?P<tag>[^>]+)>(?P<above>[0-9.eE+-]+)(?:x(?P<k>\d+))?(?:@(?P<after>\d+))?"
                      r"(?:=(?P<action>flag|stop|switch:.+))?$")


def parse_policy(text: str, *, name: str = "cli") -> TagPolicy:
    """Parse the compact form: comma-separated ``verb:arg`` items.

    ``ban:TAG`` (``ban:TAG@N`` = ban from generated token N on), ``force:TAG``, ``allow:TAG``, ``bias:TAG=+2``,
    ``guide:TAG=2`` (tag guidance, ``pretag.guidance``), ``force_at:segment|start|none``,
    ``prompt_tags:every|first|none``, ``alarm:TAG>0.3`` (flag), ``alarm:TAG>0.3x3=stop`` (3 consecutive tokens),
    ``alarm:TAG>0.3=switch:POLICY`` (a shipped policy name or file), ``verdict:TAG>0.5=stop`` (the same rule on the
    verdict, :class:`Rule` ``reading``). Tags may contain ``:`` (``grade:6-10``).
    """
    problems = Problems()
    p = TagPolicy(name=name)
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        verb, sep, arg = item.partition(":")
        if not sep or not arg:
            problems.append(f"{item!r}: expected verb:argument (verbs: ban, force, allow, bias, guide, force_at, prompt_tags, alarm, verdict)")
        elif verb == "ban" and "@" in arg:
            tag, _, n = arg.rpartition("@")
            if not n.isdigit():
                problems.append(f"{item!r}: 'ban:TAG@N' needs an integer N")
            else:
                p.rules.append(Rule("ban", after=int(n), tags=[tag]))
        elif verb in ("ban", "force", "allow"):
            getattr(p, verb).append(arg)
        elif verb == "bias":
            tag, eq, val = arg.rpartition("=")
            try:
                p.bias[tag] = float(val)
                if not eq:
                    raise ValueError
            except ValueError:
                problems.append(f"{item!r}: expected bias:TAG=NUMBER (e.g. bias:grade:6-10=+2)")
                continue
            if not math.isfinite(p.bias[tag]):
                problems.append(f"{item!r}: a bias must be a finite number, got {val} (use ban:{tag} to forbid a tag)")
        elif verb == "guide":
            tag, eq, val = arg.rpartition("=")
            try:
                p.guide[tag or arg] = float(val) if eq else 1.0
            except ValueError:
                problems.append(f"{item!r}: expected guide:TAG or guide:TAG=WEIGHT (e.g. guide:bad=2)")
        elif verb == "force_at":
            p.force_at = arg
        elif verb == "prompt_tags":
            p.prompt_tags = arg
        elif verb in ("alarm", "verdict"):
            m = _RULE_RE.match(arg)
            if not m:
                problems.append(f"{item!r}: expected {verb}:TAG>P[xK][@N][=flag|stop|switch:POLICY]")
                continue
            action = m["action"] or "flag"
            target = None
            if action.startswith("switch:"):
                action, target = "switch", action.split(":", 1)[1]
            p.rules.append(Rule(action, watch=m["tag"], above=float(m["above"]), consecutive=int(m["k"] or 1),
                                after=int(m["after"]) if m["after"] else None, policy=target,
                                reading="verdict" if verb == "verdict" else "temptation"))
        else:
            problems.append(f"{item!r}: unknown verb {verb!r} (verbs: ban, force, allow, bias, guide, force_at, prompt_tags, alarm, verdict)")
    problems.check(PolicyError, f"policy string {text!r}")
    return p


def shipped_policies() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def load_policy(spec: TagPolicy | dict | str | Path | None, schema: Schema) -> TagPolicy:
    """A policy from a YAML file, a shipped policy name, a compact string or a dict (the YAML file's content, e.g.
    an experiment config's ``policy:``); validated against ``schema``."""
    if spec is None:
        policy = default_policy(schema)
    elif isinstance(spec, TagPolicy):
        policy = spec
    elif isinstance(spec, dict):
        policy = policy_from_dict(spec, where="policy")
    else:
        s = str(spec)
        path = Path(s)
        if not path.exists() and (POLICY_DIR / f"{s}.yaml").exists():
            path = POLICY_DIR / f"{s}.yaml"
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise PolicyError(f"policy file {s!r} not found (shipped policies: {', '.join(shipped_policies())})")
            try:
                d = yaml.safe_load(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:  # a binary or latin-1 file: a clear error, not a traceback
                raise PolicyError(f"{path}: not a UTF-8 text file (byte {e.object[e.start:e.start + 1]!r} at "
                                  f"offset {e.start}); a policy file is YAML") from e
            except OSError as e:
                raise PolicyError(f"{path}: cannot read the policy file: {e.strerror or e}") from e
            except yaml.YAMLError as e:
                raise PolicyError(f"{path}: not valid YAML: {e}") from e
            policy = policy_from_dict(d, where=str(path))
        else:
            policy = parse_policy(s)
    policy.validate(schema)
    return policy
