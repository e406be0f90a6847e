"""The operator's policy is a floor: a request may tighten it, never lift it.

An operator starts the server with ``--policy FILE`` (a ``pretag.control`` policy: what the model may never be);
each request adds its own tag controls (how this client wants to steer). :func:`merge` builds the request's
effective ``TagPolicy``:

==================  ======================================================================================
request asks to     outcome
==================  ======================================================================================
ban a tag           added to the operator's bans (tightening)
add an alarm        a ``flag`` rule (``stop`` with ``stop_on_alarm``) on the tag's temptation, added to the
                    operator's rules, which are always kept: a lower threshold is tightening
bias a tag          allowed for any tag that is not banned; replaces the operator's bias for that tag
                    (a bias steers, it does not forbid: an operator who needs a guarantee bans)
force a tag         allowed unless banned or the operator forces another value of the same attribute
allow / bias /      **rejected** (422) naming the tag: a request may not lift an operator ban or force
force a banned tag  (``allow``/``bias``/``force`` of a value the operator's ``force`` excludes, ``ban`` of a
                    forced tag)
raise an alarm      **rejected** (422) naming the tag and both thresholds (the operator's alarm would keep
                    firing anyway, so the request would silently not get what it asked for)
turn off stopping   **rejected** (422) when the operator's policy stops generation on an alarm
==================  ======================================================================================

Rejecting rather than silently merging is deliberate: a client that believes it allowed a tag should learn that it
did not, instead of reading output produced under rules it did not ask for. Every problem is reported at once.
The operator's ``force_at``, ``prompt_tags``, dynamic rules (bans after N tokens) and alarms are copied unchanged; a
``switch`` rule's target additionally keeps every ban in force before the switch (the operator's, the request's and
the siblings of every forced tag), since a switch replaces the whole policy and must tighten, never lift.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pretag.control import Rule, TagPolicy, load_policy
from pretag.policy import MAX_BIAS
from pretag.schema import Schema


class PolicyFloorError(ValueError):
    """A request is invalid or tries to lift the operator's floor; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class RequestPolicy:
    """Tag controls as the HTTP API speaks them, by tag name."""

    ban: list[str] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)
    """Tags the client explicitly wants allowed: checked against the operator's bans, so lifting is an error."""
    force: list[str] = field(default_factory=list)
    bias: dict[str, float] = field(default_factory=dict)
    """Tag -> additive logit bias."""
    alarms: dict[str, float] = field(default_factory=dict)
    """Tag -> temptation threshold in [0, 1]: the alarm fires at a step whose temptation exceeds it."""
    stop_on_alarm: bool | None = None
    """The request's alarms stop generation (``stop`` rules) instead of only flagging. None = not set."""


def alarm_thresholds(policy: TagPolicy) -> dict[str, float]:
    """Tag -> the lowest threshold of the policy's temptation rules (any action) watching it (verdict rules
    compare a different reading; ``describe`` lists them among ``rules``)."""
    out: dict[str, float] = {}
    for r in policy.rules:
        if r.watch is not None and r.above is not None and r.reading == "temptation":
            out[r.watch] = min(float(r.above), out.get(r.watch, math.inf))
    return out


def stops_on_alarm(policy: TagPolicy) -> bool:
    return any(r.action == "stop" and r.watch is not None for r in policy.rules)


def describe(policy: TagPolicy) -> dict[str, Any]:
    """A JSON view of a policy for clients (the playground builds its locked rows from it)."""
    return {"name": policy.name, "ban": list(policy.ban), "force": list(policy.force), "bias": dict(policy.bias),
            "force_at": policy.force_at, **({"prompt_tags": policy.prompt_tags} if policy.prompt_tags else {}),
            "alarms": alarm_thresholds(policy), "stop_on_alarm": stops_on_alarm(policy),
            "rules": [r.label for r in policy.rules], **({"guide": dict(policy.guide)} if policy.guide else {})}


def merge(operator: TagPolicy, request: RequestPolicy, schema: Schema) -> TagPolicy:
    """The effective policy for one request, or :class:`PolicyFloorError` naming everything it tried to lift."""
    problems: list[str] = []
    known = schema.tag_names
    names = ", ".join(known)
    for what in ("ban", "allow", "force", "bias", "alarms"):
        for t in getattr(request, what):
            if t not in known:
                problems.append(f"policy.{what}: unknown tag {t!r} (the schema's tags: {names})")
    for t in sorted(set(request.ban) & (set(request.allow) | set(request.force) | set(request.bias))):
        problems.append(f"policy: tag {t!r} is banned by this request, so it cannot also be allowed/forced/biased")
    for t, b in request.bias.items():
        if abs(b) > MAX_BIAS or not math.isfinite(b):
            problems.append(f"policy.bias[{t!r}]: must be a finite number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {b} "
                            "(use ban to forbid a tag)")
    for t, th in request.alarms.items():
        if not 0.0 <= th <= 1.0:
            problems.append(f"policy.alarms[{t!r}]: threshold must be a probability in [0, 1], got {th}")

    op_ban = set(operator.ban)
    for verb in ("allow", "force", "bias"):
        for t in sorted(op_ban & set(getattr(request, verb))):
            problems.append(f"tag {t!r} is banned by the operator's policy; a request may not {verb} it")
    # a forced tag is the only allowed value of its attribute: its siblings are banned as surely as a ban bans
    for f in operator.force:
        attr = schema.attribute_of_tag(f)[0]
        for verb in ("allow", "force", "bias"):
            for t in getattr(request, verb):
                if t != f and t in attr.tags.values():
                    problems.append(f"tag {t!r}: the operator's policy forces {f!r} for attribute {attr.name!r}; "
                                    f"a request may not {verb} another value")
        if f in request.ban:
            problems.append(f"tag {f!r} is forced by the operator's policy; a request may not ban it")
    floors = alarm_thresholds(operator)
    for t, th in sorted(request.alarms.items()):
        if t in floors and th > floors[t]:
            problems.append(f"policy.alarms[{t!r}]: the operator's alarm fires above {floors[t]:g}; a request may "
                            f"lower it, not raise it to {th:g}")
    if stops_on_alarm(operator) and request.stop_on_alarm is False:
        problems.append("policy.stop_on_alarm: the operator's policy stops generation on an alarm; a request may "
                        "not turn that off")
    if problems:
        raise PolicyFloorError(problems)

    ban = list(dict.fromkeys([*operator.ban, *request.ban]))
    force = list(dict.fromkeys([*operator.force, *request.force]))
    bias = {t: b for t, b in {**operator.bias, **request.bias}.items() if t not in ban}
    action = "stop" if request.stop_on_alarm else "flag"
    rules = [_keep_bans(r, ban, force, schema, problems) for r in operator.rules]
    rules += [Rule(action, watch=t, above=float(th), name=f"request:{t}>{th:g}") for t, th in request.alarms.items()]
    if problems:
        raise PolicyFloorError(problems)
    merged = TagPolicy(ban=ban, force=force, allow=[t for t in operator.allow if t not in ban], bias=bias,
                       force_at=operator.force_at, prompt_tags=operator.prompt_tags, rules=rules,
                       name=f"{operator.name}+request",
                       guide=dict(operator.guide))  # the operator's tag guidance is part of the floor
    try:
        merged.validate(schema)
    except ValueError as e:  # e.g. a request that bans every value of an attribute that must be forced
        raise PolicyFloorError([f"the merged policy is invalid: {e}"]) from e
    return merged


def _keep_bans(rule: Rule, ban: list[str], force: list[str], schema: Schema, problems: list[str]) -> Rule:
    """A ``switch`` rule whose target also bans everything the merged policy bans before the switch.

    A switch replaces the row's whole policy, so a target written by the operator (``{ban: [four tags]}``) would
    silently lift a request's own ban (``grade:14+``: written in 4 of 10 seeded requests after the switch) and the
    siblings of every forced tag. A switch may tighten, never lift; a target that forces a tag banned before the
    switch is a problem of the request (or, with an empty request, of the operator's floor).
    """
    if rule.action != "switch" or rule.policy is None:
        return rule
    target = rule.policy if isinstance(rule.policy, TagPolicy) else load_policy(rule.policy, schema)
    kept = list(ban)
    for f in force:  # siblings of a forced tag
        kept += [t for t in schema.attribute_of_tag(f)[0].tags.values() if t != f]
    kept = [t for t in dict.fromkeys(kept) if t not in target.ban]
    for t in kept:
        if t in target.force:
            problems.append(f"the operator's rule {rule.label!r} switches to a policy that forces {t!r}, which is "
                            f"banned before the switch; a switch may not lift a ban")
    if not kept:
        return rule
    new_target = dataclasses.replace(target, ban=[*target.ban, *kept],
                                     allow=[t for t in target.allow if t not in kept],
                                     bias={t: b for t, b in target.bias.items() if t not in kept},
                                     name=f"{target.name}+kept-bans")
    return dataclasses.replace(rule, policy=new_target)
