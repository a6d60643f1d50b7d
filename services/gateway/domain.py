"""Scoring and roll-up of the alignment tree, KPI states, series and forecasts, coaching lints
and the health of a subtree: pure functions, no infrastructure.

The gateway keeps its own copy of the rules of DESIGN.md ("Scoring, exactly"), of the goals
service's coaching lints and of the metrics service's trend and forecast maths rather than
importing the other services' domains: services share the contract, never code. The unit tests
pin the copies to the same hand-computed numbers, and to the originals.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
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


# KPI series and forecasts -----------------------------------------------------------------
#
# The same maths as the metrics service's trend and forecast endpoints (`/v1/kpis/{id}/trend`,
# `/v1/kpis/{id}/forecast`), kept here as the gateway's own copy: periods in UTC, weeks from
# Monday; a least-squares line of value against valid time in days from `as_of`; the first rule
# the line violates within the horizon.

PERIODS = ("day", "week", "month")


@dataclass(frozen=True)
class Point:
    """One measurement as the series reads it: its valid time, its value as last corrected, and
    the KPI version that recorded it (which of two at the same time came later)."""

    measured_at: datetime
    value: float
    version: int = 0


def period_start(day: date, period: str) -> date:
    """The first day of the period that contains `day` (weeks start on Monday, as ISO's do)."""
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"period is one of {', '.join(PERIODS)}")


@dataclass(frozen=True)
class PeriodStats:
    """One period's measurements: how many, their mean, lowest, highest and the last value."""

    start: date
    count: int
    mean: float
    min: float
    max: float
    last: float


def series(points: Iterable[Point], period: str) -> list[PeriodStats]:
    """Per calendar period (UTC) that has measurements, oldest first; `last` is the value of the
    period's latest measurement by valid time (of two at the same time, the later recorded)."""
    groups: dict[date, list[Point]] = {}
    for p in points:
        groups.setdefault(period_start(p.measured_at.astimezone(UTC).date(), period), []).append(p)
    out = []
    for start in sorted(groups):
        values = [p.value for p in groups[start]]
        last = max(groups[start], key=lambda p: (p.measured_at, p.version))
        out.append(PeriodStats(start, len(values), math.fsum(values) / len(values), min(values), max(values),
                               last.value))
    return out


@dataclass(frozen=True)
class LinearFit:
    """A least-squares line through (days, value) points: value = intercept + slope * days."""

    slope: float
    intercept: float
    count: int

    def at(self, days: float) -> float:
        return self.intercept + self.slope * days


def linear_fit(points: Sequence[tuple[float, float]]) -> LinearFit | None:
    """Ordinary least squares; None with fewer than two distinct times (no line to draw).
    Centred on the means, so that large x values lose no precision."""
    n = len(points)
    if n < 2:
        return None
    mean_x = math.fsum(x for x, _ in points) / n
    mean_y = math.fsum(y for _, y in points) / n
    sxx = math.fsum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = math.fsum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    fit = LinearFit(slope, mean_y - slope * mean_x, n)
    return fit if math.isfinite(fit.slope) and math.isfinite(fit.intercept) else None


def days_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 86400


def fit_points(points: Iterable[Point], as_of: datetime) -> LinearFit | None:
    """The line through the measurements that apply up to `as_of`, x in days from `as_of`."""
    return linear_fit([(days_between(as_of, p.measured_at), p.value) for p in points if p.measured_at <= as_of])


def _first_below(fit: LinearFit, bound: float) -> float | None:
    """Days from 0 until the line is first below `bound` (0 if it already is; None if never)."""
    if fit.at(0) < bound:
        return 0.0
    if fit.slope >= 0:
        return None
    return (bound - fit.intercept) / fit.slope


def _first_above(fit: LinearFit, bound: float) -> float | None:
    if fit.at(0) > bound:
        return 0.0
    if fit.slope <= 0:
        return None
    return (bound - fit.intercept) / fit.slope


def first_violation(rule: Rule, fit: LinearFit) -> float | None:
    """Days from the fit's origin until the trend line crosses the rule's threshold into
    violation (0 when it is already past it), or None if it never does (or the rule lacks its
    bound)."""
    if rule.kind in ("below", "above"):
        if rule.threshold is None:
            return None
        return (_first_below if rule.kind == "below" else _first_above)(fit, rule.threshold)
    if rule.kind == "outside":
        crossings = [d for d in (None if rule.low is None else _first_below(fit, rule.low),
                                 None if rule.high is None else _first_above(fit, rule.high)) if d is not None]
        return min(crossings) if crossings else None
    return None


@dataclass(frozen=True)
class PredictedBreach:
    rule: Rule
    days: float


def predicted_breach(rules: Iterable[Rule], fit: LinearFit, horizon_days: float) -> PredictedBreach | None:
    """The first rule the trend line violates within the horizon (earliest; the first rule on
    a tie), or None."""
    best: PredictedBreach | None = None
    for rule in rules:
        days = first_violation(rule, fit)
        if days is not None and days <= horizon_days and (best is None or days < best.days):
            best = PredictedBreach(rule, days)
    return best


# Coaching lints ---------------------------------------------------------------------------
#
# The goals service's lints (`services.goals.domain`), kept here as the gateway's own copy so
# GraphQL shows the same warnings from its read model; the unit tests pin both to the seeds'
# examples.

@dataclass(frozen=True)
class CoachingWarning:
    """A common mistake the seed material names, on an owner, an objective or a key result.
    A warning, never a refusal: the team decides."""

    code: str
    message: str
    subject_kind: str  # "owner", "objective" or "key_result"
    subject_id: UUID


@dataclass(frozen=True)
class ObjectiveFacts:
    id: UUID
    title: str
    owner_id: UUID | None
    cycle_id: UUID
    status: str


@dataclass(frozen=True)
class KeyResultFacts:
    id: UUID
    objective_id: UUID
    title: str
    kind: str


@dataclass(frozen=True)
class GuardrailFacts:
    kpi_id: UUID
    name: str | None
    breached: bool


MAX_OBJECTIVES_PER_OWNER = 5
MIN_KEY_RESULTS = 3
MAX_KEY_RESULTS = 5

# Verbs that name something a team does rather than a change it causes ("Launch new website",
# "Post 5 times a week"). Outcome verbs (increase, reduce, grow, achieve, reach...) are not here.
ACTIVITY_VERBS = frozenset({
    "launch", "post", "create", "build", "write", "publish", "hold", "run", "implement", "complete",
    "hire", "attend", "send", "organise", "organize", "host", "ship", "develop", "design", "deliver",
    "conduct", "finish", "introduce", "roll", "set", "prepare", "draft", "plan", "schedule",
    "migrate", "redesign", "rebuild", "release", "start", "begin", "call", "meet", "visit",
    "interview", "blog", "tweet", "email", "present", "perform", "execute", "install", "deploy",
})
# Verbs that keep a level rather than change it ("Maintain NPS above 50").
MAINTENANCE_VERBS = frozenset({"maintain", "keep", "stay", "sustain", "remain"})
_NUMBER_WORDS = r"one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|fifty|hundred"
# The activity counted ("Post 5 times", "Hire two engineers") or given a rhythm ("... a week").
_COUNTED_ACTIVITY = re.compile(rf"^\w+\s+(\d|(?:{_NUMBER_WORDS})\b)", re.IGNORECASE)
_RHYTHM = re.compile(r"\b(\d+|once|twice)\s+(times?\s+)?(a|per|each|every)\s+(day|week|month)\b"
                     r"|\b(daily|weekly|monthly)\b", re.IGNORECASE)
_HAS_NUMBER = re.compile(r"\d")


def _first_word(title: str) -> str:
    words = re.findall(r"[a-z]+", title.lower())
    return words[0] if words else ""


def reads_as_activity(title: str, kind: str) -> bool:
    """A key result is a task when it starts with an activity verb and either has no measurable
    target (done/not-done or milestones) or counts the activity itself ("Post 5 times a week")."""
    if _first_word(title) not in ACTIVITY_VERBS:
        return False
    if kind in ("done", "milestones"):
        return True
    return bool(_COUNTED_ACTIVITY.match(title.strip()) or _RHYTHM.search(title))


def only_maintains_a_number(title: str) -> bool:
    """"Maintain NPS above 50": a level to hold, which is a KPI; "Keep our customers delighted"
    names no number and stays an objective."""
    return _first_word(title) in MAINTENANCE_VERBS and bool(_HAS_NUMBER.search(title))


def lint_key_result(kr: KeyResultFacts) -> list[CoachingWarning]:
    warnings = []
    if reads_as_activity(kr.title, kr.kind):
        warnings.append(CoachingWarning(
            "key_result_is_a_task",
            f"'{kr.title}' reads as an activity, not an outcome: say what it changes and by how much "
            "(\"Increase LinkedIn engagement by 40%\" rather than \"Post 5 times a week\").",
            "key_result", kr.id))
    if kr.kind == "done":
        warnings.append(CoachingWarning(
            "done_only_key_result",
            f"'{kr.title}' is only done or not done: did it improve anything? Measure the result it should "
            "bring (\"Increase conversion rate by 15% after launching the new website\").",
            "key_result", kr.id))
    return warnings


def lint_objective(objective: ObjectiveFacts, key_results: Sequence[KeyResultFacts],
                   people_who_left: Collection[UUID] = ()) -> list[CoachingWarning]:
    """The objective's own warnings (its key results' are `lint_key_result`'s)."""
    warnings = []
    if objective.owner_id is None or objective.owner_id in people_who_left:
        why = "has no owner" if objective.owner_id is None else "is owned by someone who has left"
        warnings.append(CoachingWarning(
            "objective_without_owner",
            f"'{objective.title}' {why}: every objective needs one directly responsible owner.",
            "objective", objective.id))
    if only_maintains_a_number(objective.title):
        warnings.append(CoachingWarning(
            "objective_is_a_kpi",
            f"'{objective.title}' only maintains a number: track it as a KPI with a threshold rule, and keep "
            "objectives for the change you want.",
            "objective", objective.id))
    n = len(key_results)
    if n < MIN_KEY_RESULTS:
        warnings.append(CoachingWarning(
            "too_few_key_results",
            f"'{objective.title}' has {n} key result{'s' if n != 1 else ''}; "
            f"{MIN_KEY_RESULTS}-{MAX_KEY_RESULTS} show whether it was achieved.",
            "objective", objective.id))
    elif n > MAX_KEY_RESULTS:
        warnings.append(CoachingWarning(
            "too_many_key_results",
            f"'{objective.title}' has {n} key results; keep to {MIN_KEY_RESULTS}-{MAX_KEY_RESULTS} that matter most.",
            "objective", objective.id))
    return warnings


def lint_guardrails(objective: ObjectiveFacts, guardrails: Sequence[GuardrailFacts]) -> list[CoachingWarning]:
    """An objective pursued (draft or active) while a KPI it named as a guardrail is breached."""
    if objective.status not in ("draft", "active"):
        return []
    breached = [g.name or str(g.kpi_id) for g in guardrails if g.breached]
    if not breached:
        return []
    which = (f"its guardrail KPI '{breached[0]}' is" if len(breached) == 1
             else "its guardrail KPIs " + ", ".join(f"'{n}'" for n in breached) + " are")
    return [CoachingWarning(
        "guardrail_breached",
        f"'{objective.title}' is pursued while {which} breached: the push may be costing the floor; "
        "fix the KPI before pushing on.",
        "objective", objective.id)]


def objective_warnings(objective: ObjectiveFacts, key_results: Sequence[KeyResultFacts],
                       guardrails: Sequence[GuardrailFacts] = (),
                       people_who_left: Collection[UUID] = ()) -> list[CoachingWarning]:
    """What an objective shows, as the goals service's objective shows it: its own warnings, its
    guardrails' and its key results'. Archived objectives are put away: none."""
    if objective.status == "archived":
        return []
    return (lint_objective(objective, key_results, people_who_left) + lint_guardrails(objective, guardrails)
            + [w for kr in key_results for w in lint_key_result(kr)])


def owner_warnings(objectives: Iterable[ObjectiveFacts]) -> list[CoachingWarning]:
    """More than five live objectives for one owner in one cycle."""
    per_owner: dict[tuple[UUID, UUID], int] = {}
    for o in objectives:
        if o.owner_id is not None and o.status != "archived":
            per_owner[(o.owner_id, o.cycle_id)] = per_owner.get((o.owner_id, o.cycle_id), 0) + 1
    return [CoachingWarning(
        "too_many_objectives",
        f"this owner has {count} objectives in one cycle; if everything is important, nothing is: "
        f"keep to {MAX_OBJECTIVES_PER_OWNER} at most.",
        "owner", owner_id) for (owner_id, _), count in per_owner.items() if count > MAX_OBJECTIVES_PER_OWNER]


# Health of a subtree ----------------------------------------------------------------------

RECENT_DAYS = 7


@dataclass(frozen=True)
class CheckInRecency:
    """How current a set of key results is, from the latest day each one's check-ins apply to
    (valid time, as corrected): the share checked in within the last RECENT_DAYS days (of all,
    never-checked-in ones included; None without key results), the median days since (of those
    checked in; None if none) and how many were never checked in."""

    recent_share: float | None
    median_days_since: float | None
    never: int

    @classmethod
    def of(cls, latest_days: Iterable[date | None], today: date) -> CheckInRecency:
        latest = list(latest_days)
        since = sorted((today - d).days for d in latest if d is not None)
        recent = sum(1 for d in since if d <= RECENT_DAYS)
        return cls(recent / len(latest) if latest else None, statistics.median(since) if since else None,
                   len(latest) - len(since))


def share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The plain mean of the values that are there; None if none are."""
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None
