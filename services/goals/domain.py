"""The OKR domain: org units, cycles, objectives and key results, with scoring.

Pure: imports nothing from infrastructure. Each aggregate's events are nested inside it and
named in the past tense; the contract name of an event is the aggregate's name followed by the
event's (`KeyResult.Progressed` -> `KeyResultProgressed`). Key results are aggregates of their
own so that check-ins on sibling key results never conflict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class DomainError(ValueError):
    """A well-formed command that breaks a rule of the OKR domain."""


class UnitKind(enum.StrEnum):
    company = "company"
    department = "department"
    team = "team"


class CycleStatus(enum.StrEnum):
    planning = "planning"
    active = "active"
    closed = "closed"


class ObjectiveStatus(enum.StrEnum):
    draft = "draft"
    active = "active"
    closed = "closed"
    archived = "archived"


class OwnerKind(enum.StrEnum):
    person = "person"
    unit = "unit"


class KeyResultKind(enum.StrEnum):
    increase_to = "increase_to"
    decrease_to = "decrease_to"
    stay_above = "stay_above"
    stay_below = "stay_below"
    stay_within = "stay_within"
    done = "done"
    milestones = "milestones"


# Bands on the 0.0-1.0 scale (DESIGN.md, "Scoring, exactly").
RED_BELOW = 0.4
GREEN_FROM = 0.7


def band(score: float | None) -> str | None:
    if score is None:
        return None
    if score < RED_BELOW:
        return "red"
    return "yellow" if score < GREEN_FROM else "green"


@dataclass(frozen=True)
class Measure:
    """What a key result measures and how its latest value scores.

    increase_to / decrease_to: `start` and `target`; stay_above / stay_below: `target` is the
    bound; stay_within: `low` and `high`; done: a value of 1 is done; milestones: the value is
    how many of the ordered milestones are reached, and each milestone carries a weight.
    """

    kind: KeyResultKind
    start: float | None = None
    target: float | None = None
    low: float | None = None
    high: float | None = None
    milestone_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", KeyResultKind(self.kind))

    def validate(self) -> None:
        k = self.kind
        if k in (KeyResultKind.increase_to, KeyResultKind.decrease_to):
            if self.start is None or self.target is None:
                raise DomainError(f"a {k.value} key result needs a start and a target")
            if self.start == self.target:
                raise DomainError("start and target must differ")
            if k is KeyResultKind.increase_to and self.target < self.start:
                raise DomainError("an increase_to key result needs a target above its start")
            if k is KeyResultKind.decrease_to and self.target > self.start:
                raise DomainError("a decrease_to key result needs a target below its start")
        elif k in (KeyResultKind.stay_above, KeyResultKind.stay_below):
            if self.target is None:
                raise DomainError(f"a {k.value} key result needs a target (the bound)")
        elif k is KeyResultKind.stay_within:
            if self.low is None or self.high is None or self.low > self.high:
                raise DomainError("a stay_within key result needs low <= high")
        elif k is KeyResultKind.milestones:
            if not self.milestone_weights:
                raise DomainError("a milestones key result needs at least one milestone")
            if any(w <= 0 for w in self.milestone_weights):
                raise DomainError("milestone weights must be positive")

    def validate_value(self, value: float) -> None:
        if self.kind is KeyResultKind.done and value not in (0, 1):
            raise DomainError("a done key result is checked in with 1 (done) or 0 (not done)")
        if self.kind is KeyResultKind.milestones and (
            value != int(value) or not 0 <= value <= len(self.milestone_weights)
        ):
            raise DomainError(
                f"a milestones check-in is the number of milestones reached, 0 to {len(self.milestone_weights)}"
            )

    def score(self, current: float | None) -> float | None:
        """0.0-1.0 for the latest value; None before the first check-in."""
        if current is None:
            return None
        k = self.kind
        if k in (KeyResultKind.increase_to, KeyResultKind.decrease_to):
            assert self.start is not None and self.target is not None
            return _clamp((current - self.start) / (self.target - self.start))
        if k is KeyResultKind.stay_above:
            assert self.target is not None
            return 1.0 if current >= self.target else 0.0
        if k is KeyResultKind.stay_below:
            assert self.target is not None
            return 1.0 if current <= self.target else 0.0
        if k is KeyResultKind.stay_within:
            assert self.low is not None and self.high is not None
            return 1.0 if self.low <= current <= self.high else 0.0
        if k is KeyResultKind.done:
            return 1.0 if current >= 1 else 0.0
        reached = int(current)
        return sum(self.milestone_weights[:reached]) / sum(self.milestone_weights)


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))


def weighted_mean(pairs: list[tuple[float | None, float]]) -> float | None:
    """Weighted mean of (score, weight) pairs, leaving out those with no score."""
    scored = [(s, w) for s, w in pairs if s is not None and w > 0]
    total = sum(w for _, w in scored)
    if not scored or total == 0:
        return None
    return sum(s * w for s, w in scored) / total


class OrgUnit(Aggregate):
    """A company, department or team; units form a tree through `parent_id`."""

    @event("Created")
    def __init__(self, name: str, kind: UnitKind, parent_id: UUID | None) -> None:
        self.name = name
        self.kind = UnitKind(kind)
        self.parent_id = parent_id

    @event("Renamed")
    def rename(self, name: str) -> None:
        self.name = name

    @event("Moved")
    def move(self, parent_id: UUID | None) -> None:
        self.parent_id = parent_id


class Cycle(Aggregate):
    """A time box for objectives: a quarter or a year, planning -> active -> closed."""

    @event("Created")
    def __init__(self, name: str, starts_on: date, ends_on: date) -> None:
        if ends_on <= starts_on:
            raise DomainError("a cycle must end after it starts")
        self.name = name
        self.starts_on = starts_on
        self.ends_on = ends_on
        self.status = CycleStatus.planning

    def activate(self) -> None:
        if self.status is not CycleStatus.planning:
            raise DomainError(f"only a cycle in planning can be activated (this one is {self.status.value})")
        self._activated()

    @event("Activated")
    def _activated(self) -> None:
        self.status = CycleStatus.active

    def close(self) -> None:
        if self.status is CycleStatus.closed:
            raise DomainError("the cycle is already closed")
        self._closed()

    @event("Closed")
    def _closed(self) -> None:
        self.status = CycleStatus.closed


class Objective(Aggregate):
    """A qualitative goal owned by a person or unit in a cycle, aligned to a parent."""

    @event("Created")
    def __init__(
        self,
        title: str,
        description: str,
        owner_kind: OwnerKind,
        owner_id: UUID,
        unit_id: UUID,
        cycle_id: UUID,
    ) -> None:
        self.title = title
        self.description = description
        self.owner_kind = OwnerKind(owner_kind)
        self.owner_id = owner_id
        self.unit_id = unit_id
        self.cycle_id = cycle_id
        self.parent_id: UUID | None = None
        self.status = ObjectiveStatus.active

    def align_to(self, parent_id: UUID | None) -> None:
        if parent_id == self.id:
            raise DomainError("an objective cannot align to itself")
        if parent_id != self.parent_id:
            self._aligned(parent_id=parent_id)

    @event("Aligned")
    def _aligned(self, parent_id: UUID | None) -> None:
        self.parent_id = parent_id


class KeyResult(Aggregate):
    """A measurable result of one objective; each check-in appends `KeyResultProgressed`."""

    @event("Created")
    def __init__(
        self,
        objective_id: UUID,
        title: str,
        kind: KeyResultKind,
        start: float | None,
        target: float | None,
        low: float | None,
        high: float | None,
        milestones: list[dict[str, object]],
        unit: str,
        weight: float,
        owner_id: UUID | None,
    ) -> None:
        self.objective_id = objective_id
        self.title = title
        self.kind = KeyResultKind(kind)
        self.start = start
        self.target = target
        self.low = low
        self.high = high
        self.milestones = milestones
        self.unit = unit
        self.weight = weight
        self.owner_id = owner_id
        self.current: float | None = None
        self.current_valid_on: date | None = None
        self.confidence: int | None = None
        self.check_in_count = 0

    @classmethod
    def define(
        cls,
        *,
        objective_id: UUID,
        title: str,
        kind: KeyResultKind,
        start: float | None = None,
        target: float | None = None,
        low: float | None = None,
        high: float | None = None,
        milestones: list[dict[str, object]] | None = None,
        unit: str = "",
        weight: float = 1.0,
        owner_id: UUID | None = None,
    ) -> KeyResult:
        """Check the measure first, so that no invalid key result is ever recorded."""
        if weight <= 0:
            raise DomainError("a key result's weight must be positive")
        milestones = milestones or []
        Measure(kind, start, target, low, high, tuple(float(m["weight"]) for m in milestones)).validate()  # type: ignore[arg-type]
        return cls(objective_id, title, kind, start, target, low, high, milestones, unit, weight, owner_id)

    @property
    def measure(self) -> Measure:
        return Measure(self.kind, self.start, self.target, self.low, self.high,
                       tuple(float(m["weight"]) for m in self.milestones))  # type: ignore[arg-type]

    @property
    def score(self) -> float | None:
        return self.measure.score(self.current)

    def check_in(self, *, value: float, confidence: int | None, note: str, valid_on: date) -> None:
        self.measure.validate_value(value)
        if confidence is not None and not 0 <= confidence <= 10:
            raise DomainError("confidence is from 0 to 10")
        self._progressed(value=value, confidence=confidence, note=note, valid_on=valid_on)

    @event("Progressed")
    def _progressed(self, value: float, confidence: int | None, note: str, valid_on: date) -> None:
        # The current value is the one for the latest date; a check-in for an earlier date is
        # history (it is kept in the log) but does not move the key result back.
        if self.current_valid_on is None or valid_on >= self.current_valid_on:
            self.current = value
            self.current_valid_on = valid_on
            self.confidence = confidence
        self.check_in_count += 1
