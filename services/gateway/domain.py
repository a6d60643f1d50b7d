"""Scoring and roll-up of the alignment tree, and KPI states: pure functions, no infrastructure.

The gateway keeps its own copy of the rules of DESIGN.md ("Scoring, exactly") rather than
importing the goals service's domain: services share the contract, never code. The unit tests
pin both copies to the same hand-computed numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any
from uuid import UUID

RED_BELOW = 0.4
GREEN_FROM = 0.7

Weighted = tuple[float | None, float]
"""A (score, weight) pair; a score of None is left out of a mean."""


def band(score: float | None) -> str | None:
    """red < 0.4 <= yellow < 0.7 <= green; no score, no band."""
    if score is None:
        return None
    if score < RED_BELOW:
        return "red"
    return "yellow" if score < GREEN_FROM else "green"


def weighted_mean(pairs: Iterable[Weighted]) -> float | None:
    """Weighted mean of the pairs that have a score (and a positive weight); None if none."""
    scored = [(s, w) for s, w in pairs if s is not None and w > 0]
    total = sum(w for _, w in scored)
    return sum(s * w for s, w in scored) / total if scored else None


@dataclass(frozen=True)
class Measure:
    """What a key result measures, as its KeyResultCreated event described it.

    A measure the goals service would have refused (start == target, a missing bound) scores
    None here rather than failing: a read model shows what it can.
    """

    kind: str
    start: float | None = None
    target: float | None = None
    low: float | None = None
    high: float | None = None
    milestone_weights: Sequence[float] = ()

    def score(self, current: float | None) -> float | None:
        """0.0-1.0 for the latest value; None before the first check-in."""
        if current is None:
            return None
        k, start, target = self.kind, self.start, self.target
        if k in ("increase_to", "decrease_to"):
            if start is None or target is None or start == target:
                return None
            return max(0.0, min(1.0, (current - start) / (target - start)))
        if k in ("stay_above", "stay_below"):
            if target is None:
                return None
            holds = current >= target if k == "stay_above" else current <= target
            return 1.0 if holds else 0.0
        if k == "stay_within":
            if self.low is None or self.high is None:
                return None
            return 1.0 if self.low <= current <= self.high else 0.0
        if k == "done":
            return 1.0 if current >= 1 else 0.0
        if k == "milestones":
            total = sum(self.milestone_weights)
            if total <= 0:
                return None
            reached = max(0, min(int(current), len(self.milestone_weights)))
            return sum(self.milestone_weights[:reached]) / total
        return None


@dataclass(frozen=True)
class CheckIn:
    """A check-in as the log tells it: a KeyResultProgressed (corrects None) or a
    KeyResultCheckInCorrected naming the version of the check-in it corrects."""

    version: int
    valid_on: date
    value: float
    confidence: int | None
    corrects: int | None = None


def current_check_in(check_ins: Iterable[CheckIn]) -> CheckIn | None:
    """The check-in that gives a key result its current value: each check-in as last corrected
    (a correction fixes it in place), then the one with the latest valid_on (ties: the later
    check-in). An earlier day's check-in is history."""
    effective: dict[int, CheckIn] = {}
    for c in sorted(check_ins, key=lambda c: c.version):
        if c.corrects is None:
            effective[c.version] = c
        elif c.corrects in effective:
            effective[c.corrects] = CheckIn(c.corrects, c.valid_on, c.value, c.confidence)
    return max(effective.values(), key=lambda c: (c.valid_on, c.version), default=None)


@dataclass(frozen=True)
class ObjectiveNode:
    """What the roll-up needs of one objective: whom it aligns to, what it contributes to (with
    weights) and its KRs' (score, weight)."""

    parent_id: UUID | None
    key_results: Sequence[Weighted] = field(default_factory=tuple)
    contributes_to: Mapping[UUID, float] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        return weighted_mean(self.key_results)


def rolled_up_scores(objectives: Mapping[UUID, ObjectiveNode]) -> dict[UUID, float | None]:
    """Each objective's rolledUpScore: the weighted mean over its own KRs (their weights), the
    objectives aligned to it (weight 1 each) and those contributing to it (their contribution
    weights), each with its own rolledUpScore, leaving out those with no score.

    Objectives whose parent is not in `objectives` are roots here. An alignment loop (which the
    goals service refuses) cannot recurse forever: the edge that closes it counts as no score.
    """
    children: dict[UUID, list[tuple[UUID, float]]] = {}
    for oid, node in objectives.items():
        if node.parent_id is not None and node.parent_id in objectives:
            children.setdefault(node.parent_id, []).append((oid, 1.0))
        for target, weight in node.contributes_to.items():
            if target in objectives:
                children.setdefault(target, []).append((oid, weight))
    done: dict[UUID, float | None] = {}
    visiting: set[UUID] = set()

    def visit(oid: UUID) -> float | None:
        if oid in done:
            return done[oid]
        if oid in visiting:
            return None
        visiting.add(oid)
        pairs = [*objectives[oid].key_results, *((visit(c), w) for c, w in children.get(oid, ()))]
        visiting.discard(oid)
        done[oid] = weighted_mean(pairs)
        return done[oid]

    for oid in objectives:
        visit(oid)
    return done


# KPIs ------------------------------------------------------------------------------------
#
# The metrics service decides when a rule fires and clears, and says so in the log
# (KPIThresholdBreached / KPIRecovered): the only source of "breached". Everything else the
# gateway shows of a KPI follows from facts its events carry, by the rules below.

def violates(kind: str, value: float, threshold: float | None, low: float | None,
             high: float | None) -> bool:
    """Whether one measurement breaks a threshold rule (below / above / outside [low, high])."""
    if kind == "below":
        return threshold is not None and value < threshold
    if kind == "above":
        return threshold is not None and value > threshold
    if kind == "outside":
        return (low is not None and value < low) or (high is not None and value > high)
    return False


def rule_state(breached: bool, latest_violates: bool) -> str:
    """breached from KPIThresholdBreached until KPIRecovered; else pending while the latest
    value (by valid time) violates the rule, which the metrics service has not (yet) fired
    (its pending window, `pending_count` and `pending_for`, is counting); else ok."""
    if breached:
        return "breached"
    return "pending" if latest_violates else "ok"


def kpi_state(measured: bool, rule_states: Iterable[str], stale: bool = False) -> str:
    """breached over stale over pending over ok; no_data before the first measurement (unless
    the KPI is already stale, which one never measured becomes in time)."""
    states = set(rule_states)
    if "breached" in states:
        return "breached"
    if stale:
        return "stale"
    if not measured:
        return "no_data"
    return "pending" if "pending" in states else "ok"


def supersedes(latest_measured_at: datetime | None, measured_at: datetime) -> bool:
    """Whether a new measurement becomes the KPI's latest: the latest is the one with the latest
    valid time; of two at the same time the later to arrive (as the metrics service orders
    them). A late measurement (an older valid time) is history and changes no state."""
    return latest_measured_at is None or measured_at >= latest_measured_at


@dataclass(frozen=True)
class Rule:
    """A threshold rule as KPIDefined and KPIRulesRevised carry it, and whether it is breached."""

    id: str
    kind: str
    severity: str
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    pending_count: int = 1
    pending_for: int = 0
    recovery: float | None = None
    breached: bool = False

    @classmethod
    def from_contract(cls, data: Mapping[str, Any], position: int = 1, breached: bool = False) -> Rule:
        """From the event's JSON; a field a rule was recorded without gets the metrics service's
        default (fire at the first violating measurement), a rule without an id is named by
        its position, as the metrics service names it."""
        pending_count, pending_for = data.get("pending_count"), data.get("pending_for")
        return cls(id=str(data.get("id") or f"rule-{position}"), kind=str(data["kind"]),
                   severity=str(data["severity"]), threshold=data.get("threshold"), low=data.get("low"),
                   high=data.get("high"), pending_count=1 if pending_count is None else int(pending_count),
                   pending_for=0 if pending_for is None else int(pending_for), recovery=data.get("recovery"),
                   breached=breached)

    def state(self, latest_value: float | None) -> str:
        """This rule's state given the KPI's latest value (None before any measurement)."""
        return rule_state(self.breached, latest_value is not None and violates(
            self.kind, latest_value, self.threshold, self.low, self.high))


def revise_rules(current: Iterable[Rule], revised: Iterable[Mapping[str, Any]]) -> list[Rule]:
    """The rules after KPIRulesRevised: the revised set, in its order; a rule that stays (by id)
    keeps its breach, a new one starts unbreached. (The metrics service recovers a breached rule
    it withdraws before revising, and announces what the new rules imply after.)"""
    breached = {r.id for r in current if r.breached}
    rules = [Rule.from_contract(r, n) for n, r in enumerate(revised, start=1)]
    return [replace(r, breached=r.id in breached) for r in rules]


@dataclass(frozen=True)
class TargetChange:
    """A KPITargetChanged: the target from a day on, and the KPI version that recorded it."""

    target: float
    effective_from: date
    version: int


def target_in_force(defined: float | None, changes: Iterable[TargetChange], today: date) -> float | None:
    """The target on `today`: the change with the latest effective_from on or before it (of two
    from the same day, the later recorded); before any change takes effect, the defined one."""
    current = max((c for c in changes if c.effective_from <= today),
                  key=lambda c: (c.effective_from, c.version), default=None)
    return defined if current is None else current.target
