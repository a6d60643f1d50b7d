"""The OKR domain: org units, people, cycles, objectives and key results, with scoring,
forecasts and the coaching lints the seed material names.

Pure: imports nothing from infrastructure. Each aggregate's events are nested inside it and
named in the past tense; the contract name of an event is the aggregate's name followed by the
event's (`KeyResult.Progressed` -> `KeyResultProgressed`). Key results are aggregates of their
own so that check-ins on sibling key results never conflict.

Rules that need only one aggregate live here and raise `DomainError`; rules that span
aggregates (alignment cycles, unit-tree cycles, a quarter inside its year, frozen check-ins
after a cycle closes) are checked by the application, which loads the others.

Event bodies only change state; every check happens in the public method before the event is
triggered, so that tightening a rule never stops an old history from replaying.
Aggregate state is kept in JSON-friendly shapes (lists, dicts with string keys) so that
snapshots can store it.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, NamedTuple, Protocol
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event


class DomainError(ValueError):
    """A well-formed command that breaks a rule of the OKR domain."""


class UnitKind(enum.StrEnum):
    company = "company"
    department = "department"
    team = "team"


class CycleKind(enum.StrEnum):
    quarter = "quarter"
    year = "year"


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


# The kinds measured by a number, which a KPI's measurements can move.
NUMERIC_KINDS = frozenset({KeyResultKind.increase_to, KeyResultKind.decrease_to, KeyResultKind.stay_above,
                           KeyResultKind.stay_below, KeyResultKind.stay_within})


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
        # A projected value (a forecast) can lie outside 0..n: count only whole milestones
        # that exist.
        reached = max(0, min(len(self.milestone_weights), int(current)))
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


def _milestone_weights(milestones: Sequence[dict[str, object]]) -> tuple[float, ...]:
    try:
        return tuple(float(m["weight"]) for m in milestones)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise DomainError("every milestone needs a numeric weight") from None


def _require_text(value: str, what: str) -> None:
    if not value or not value.strip():
        raise DomainError(f"{what} cannot be blank")


# Org units -------------------------------------------------------------------------------------

class UnitNotEmpty(DomainError):
    """A unit that still has members or open units below it cannot be dissolved."""


class OrgUnit(Aggregate):
    """A company, department or team; units form a tree through `parent_id`.

    `external_id` is the identifier an HR system (SCIM) knows the unit by. A unit is dissolved
    rather than deleted, so the objectives and the people's history that name it keep their
    meaning; a dissolved unit takes no members, children or changes.
    """

    class Created(Aggregate.Created):
        name: str
        kind: UnitKind
        parent_id: UUID | None
        # Units created before SCIM provisioning have no external id.
        external_id: str | None = None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (6d87ba3 to 1793178) had no `external_id`."""
            state.setdefault("external_id", None)

    @event(Created)
    def __init__(self, name: str, kind: UnitKind, parent_id: UUID | None, external_id: str | None = None) -> None:
        self.name = name
        self.kind = UnitKind(kind)
        self.parent_id = parent_id
        self.external_id = external_id
        self.dissolved_on: date | None = None

    @property
    def is_dissolved(self) -> bool:
        # Snapshots and units created before dissolving existed lack the attribute.
        return getattr(self, "dissolved_on", None) is not None

    @event("Renamed")
    def rename(self, name: str) -> None:
        self.name = name

    def move(self, parent_id: UUID | None, effective_on: date | None = None) -> None:
        """Hang the unit under another parent from a given day. A company is the root of its
        tree, so it never gets a parent, and every other unit keeps one. Whether the new parent
        lies below this unit (a cycle) only the application can see: it walks up from the new
        parent."""
        if parent_id == self.id:
            raise DomainError("a unit cannot be its own parent")
        if self.kind == UnitKind.company and parent_id is not None:
            raise DomainError("a company is the root of its tree and cannot get a parent")
        if self.kind != UnitKind.company and parent_id is None:
            raise DomainError("only a company may have no parent unit")
        if parent_id != self.parent_id:
            self._moved(parent_id=parent_id, effective_on=effective_on)

    class Moved(Aggregate.Event):
        parent_id: UUID | None
        # Moves recorded before they were effective-dated took effect when they were recorded.
        effective_on: date | None = None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (6d87ba3 to 1793178) had no `effective_on`: None, the move took effect when recorded."""
            state.setdefault("effective_on", None)

    @event(Moved)
    def _moved(self, parent_id: UUID | None, effective_on: date | None = None) -> None:
        self.parent_id = parent_id

    def change_external_id(self, external_id: str | None) -> None:
        if external_id != getattr(self, "external_id", None):
            self._external_id_changed(external_id=external_id)

    @event("ExternalIdChanged")
    def _external_id_changed(self, external_id: str | None) -> None:
        self.external_id = external_id

    def dissolve(self, dissolved_on: date) -> None:
        """Once; whether it still has members or open children the application checks."""
        if self.is_dissolved:
            raise DomainError(f"{self.name} was dissolved on {self.dissolved_on.isoformat()}")
        self._dissolved(dissolved_on=dissolved_on)

    @event("Dissolved")
    def _dissolved(self, dissolved_on: date) -> None:
        self.dissolved_on = dissolved_on


# People ----------------------------------------------------------------------------------------

class Person(Aggregate):
    """Someone in the organisation: a member of a unit with a manager, both effective-dated.

    The events are the history: who was in which unit and under whom, from which day. The
    current `unit_id` and `manager_id` are those of the assignment with the latest effective
    date (for the same date, the later recorded); `unit_on(day)` and `manager_on(day)` answer
    for any day. `left_on` is the person's last day.
    """

    class Joined(Aggregate.Created):
        name: str
        email: str
        unit_id: UUID
        manager_id: UUID | None
        joined_on: date
        # What an HR system (SCIM) knows the person by; people who joined before SCIM
        # provisioning have none of it, and are active.
        user_name: str | None = None
        external_id: str | None = None
        given_name: str | None = None
        family_name: str | None = None
        formatted_name: str | None = None
        emails: list[dict[str, Any]] | None = None
        active: bool = True

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (f1f11aa to 1793178) had no SCIM profile: none of it, and active (`emails`
            None means the one primary address `email`, as for a join without emails now)."""
            for name in ("user_name", "external_id", "given_name", "family_name", "formatted_name", "emails"):
                state.setdefault(name, None)
            state.setdefault("active", True)

    @event(Joined)
    def __init__(
        self,
        name: str,
        email: str,
        unit_id: UUID,
        manager_id: UUID | None,
        joined_on: date,
        user_name: str | None = None,
        external_id: str | None = None,
        given_name: str | None = None,
        family_name: str | None = None,
        formatted_name: str | None = None,
        emails: list[dict[str, Any]] | None = None,
        active: bool = True,
    ) -> None:
        self.name = name
        self.email = email
        self.joined_on = joined_on
        self.left_on: date | None = None
        self.units: list[dict[str, Any]] = [{"unit_id": unit_id, "effective_on": joined_on}]
        self.managers: list[dict[str, Any]] = [{"manager_id": manager_id, "effective_on": joined_on}]
        self.unit_id = unit_id
        self.manager_id = manager_id
        self.user_name = user_name
        self.external_id = external_id
        self.given_name = given_name
        self.family_name = family_name
        self.formatted_name = formatted_name
        self.emails = list(emails) if emails is not None else [_primary_email(email)]
        self.active = active

    @classmethod
    def join(
        cls,
        *,
        name: str,
        email: str,
        unit_id: UUID,
        manager_id: UUID | None,
        joined_on: date,
        user_name: str | None = None,
        external_id: str | None = None,
        given_name: str | None = None,
        family_name: str | None = None,
        formatted_name: str | None = None,
        emails: Sequence[dict[str, Any]] | None = None,
        active: bool = True,
    ) -> Person:
        """Check before anything is recorded."""
        _check_profile(name, email, user_name, emails)
        return cls(name=name, email=email, unit_id=unit_id, manager_id=manager_id, joined_on=joined_on,
                   user_name=user_name, external_id=external_id, given_name=given_name, family_name=family_name,
                   formatted_name=formatted_name, emails=None if emails is None else [dict(e) for e in emails],
                   active=active)

    def profile(self) -> dict[str, Any]:
        """Who the person is, as `update_profile` takes it."""
        return {"name": self.name, "email": self.email, "user_name": self.user_name,
                "external_id": self.external_id, "given_name": self.given_name, "family_name": self.family_name,
                "formatted_name": self.formatted_name, "emails": [dict(e) for e in self.emails]}

    def update_profile(
        self,
        *,
        name: str,
        email: str,
        user_name: str | None,
        external_id: str | None,
        given_name: str | None,
        family_name: str | None,
        formatted_name: str | None,
        emails: Sequence[dict[str, Any]],
    ) -> None:
        """Replace what the person is called and reached by (the whole profile: an HR system
        sends it whole); the same profile again records nothing. Someone who left keeps theirs."""
        new = {"name": name, "email": email, "user_name": user_name, "external_id": external_id,
               "given_name": given_name, "family_name": family_name, "formatted_name": formatted_name,
               "emails": [dict(e) for e in emails]}
        if new == self.profile():
            return
        if self.left_on is not None:
            raise DomainError(f"{self.name} left on {self.left_on.isoformat()} and cannot be changed")
        _check_profile(name, email, user_name, emails)
        self._updated(**new)

    @event("Updated")
    def _updated(
        self,
        name: str,
        email: str,
        user_name: str | None,
        external_id: str | None,
        given_name: str | None,
        family_name: str | None,
        formatted_name: str | None,
        emails: list[dict[str, Any]],
    ) -> None:
        self.name = name
        self.email = email
        self.user_name = user_name
        self.external_id = external_id
        self.given_name = given_name
        self.family_name = family_name
        self.formatted_name = formatted_name
        self.emails = emails

    def set_active(self, active: bool) -> None:
        """Deactivated is not gone: the person stays in their unit (an HR system's suspension);
        leaving is `leave`. The same state again records nothing."""
        if active == self.active:
            return
        if self.left_on is not None:
            raise DomainError(f"{self.name} left on {self.left_on.isoformat()} and cannot be changed")
        if active:
            self._reactivated()
        else:
            self._deactivated()

    @event("Deactivated")
    def _deactivated(self) -> None:
        self.active = False

    @event("Reactivated")
    def _reactivated(self) -> None:
        self.active = True

    @property
    def has_left(self) -> bool:
        return self.left_on is not None

    def _require_present(self, what: str, day: date) -> None:
        if self.left_on is not None:
            raise DomainError(f"{self.name} left on {self.left_on.isoformat()} and cannot {what}")
        if day < self.joined_on:
            raise DomainError(f"{what} cannot take effect before {self.name} joined ({self.joined_on.isoformat()})")

    def move_to_unit(self, unit_id: UUID, effective_on: date) -> None:
        """A person who left cannot move; moving to the unit they are in records nothing."""
        self._require_present("move to another unit", effective_on)
        if unit_id != self.unit_id:
            self._moved_unit(unit_id=unit_id, effective_on=effective_on)

    @event("MovedUnit")
    def _moved_unit(self, unit_id: UUID, effective_on: date) -> None:
        self.units.append({"unit_id": unit_id, "effective_on": effective_on})
        self.unit_id = _latest(self.units)["unit_id"]

    def change_manager(self, manager_id: UUID | None, effective_on: date) -> None:
        """Nobody manages themselves; the same manager again records nothing."""
        if manager_id == self.id:
            raise DomainError("a person cannot be their own manager")
        self._require_present("change manager", effective_on)
        if manager_id != self.manager_id:
            self._manager_changed(manager_id=manager_id, effective_on=effective_on)

    @event("ManagerChanged")
    def _manager_changed(self, manager_id: UUID | None, effective_on: date) -> None:
        self.managers.append({"manager_id": manager_id, "effective_on": effective_on})
        self.manager_id = _latest(self.managers)["manager_id"]

    def leave(self, left_on: date) -> None:
        """Leaving is once; the history stays."""
        self._require_present("leave", left_on)
        self._left(left_on=left_on)

    @event("Left")
    def _left(self, left_on: date) -> None:
        self.left_on = left_on

    def unit_on(self, day: date) -> UUID | None:
        """The unit the person belonged to on `day` (None before joining or after leaving)."""
        entry = self._as_of(self.units, day)
        return entry["unit_id"] if entry else None

    def manager_on(self, day: date) -> UUID | None:
        entry = self._as_of(self.managers, day)
        return entry["manager_id"] if entry else None

    def _as_of(self, history: list[dict[str, Any]], day: date) -> dict[str, Any] | None:
        if day < self.joined_on or (self.left_on is not None and day > self.left_on):
            return None
        known = [h for h in history if h["effective_on"] <= day]
        return _latest(known) if known else None


def _latest(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry with the latest effective date; for the same date, the later recorded."""
    best = history[0]
    for h in history[1:]:
        if h["effective_on"] >= best["effective_on"]:
            best = h
    return best


EMAIL_KEYS = frozenset({"value", "type", "primary", "display"})


def _primary_email(email: str) -> dict[str, Any]:
    """The one address of someone who joined with an email only (REST, or before SCIM)."""
    return {"value": email, "type": "work", "primary": True}


def _check_profile(name: str, email: str, user_name: str | None, emails: Sequence[dict[str, Any]] | None) -> None:
    _require_text(name, "a person's name")
    if "@" not in email:
        raise DomainError("a person's email needs an @")
    if user_name is not None:
        _require_text(user_name, "a user name")
    for e in emails or ():
        if set(e) - EMAIL_KEYS or "@" not in str(e.get("value", "")):
            raise DomainError("each email is an address with an @ (and optionally a type, display and primary)")
    if sum(1 for e in emails or () if e.get("primary")) > 1:
        raise DomainError("at most one email is the primary one")


class UserNameTaken(DomainError):
    """A user name that another person who has not left already has."""


def user_name_key(user_name: str) -> str:
    """User names are unique without regard to case (as SCIM compares them): NFC, lower case."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", user_name).lower())


USER_NAME_NAMESPACE = uuid5(NAMESPACE_URL, "https://tandem.dev/goals/user-names")
"""Fixed forever: a user name's id is derived from it."""


class UserName(Aggregate):
    """Who holds a user name: the index that keeps user names unique.

    Its id follows from the name (`create_id`), so two people claiming one name in the same
    moment create the same aggregate, and the second save fails as a conflict instead of
    passing unseen, as a check against a lagging read model would. It is saved in the same
    transaction as the person who takes or gives up the name. A name given up (the person
    left, or was renamed) can be claimed again.
    """

    @staticmethod
    def create_id(user_name: str) -> UUID:
        return uuid5(USER_NAME_NAMESPACE, user_name_key(user_name))

    @event("Claimed")
    def __init__(self, user_name: str, person_id: UUID) -> None:
        self.user_name = user_name
        self.person_id: UUID | None = person_id

    def claim(self, person_id: UUID, user_name: str, held_by_someone_present: bool) -> None:
        """Take the name for `person_id`: free, or held by that person, or by someone who is no
        longer present (`held_by_someone_present` is False: the application knows who left)."""
        if self.person_id == person_id:
            return
        if self.person_id is not None and held_by_someone_present:
            raise UserNameTaken(f"the user name {user_name!r} is taken")
        self._reclaimed(user_name=user_name, person_id=person_id)

    @event("Reclaimed")
    def _reclaimed(self, user_name: str, person_id: UUID) -> None:
        self.user_name = user_name
        self.person_id = person_id

    def release(self, person_id: UUID) -> None:
        if self.person_id == person_id:
            self._released()

    @event("Released")
    def _released(self) -> None:
        self.person_id = None


# Cycles ----------------------------------------------------------------------------------------

YEAR_FROM_DAYS = 200  # a cycle given without a kind and longer than this is a year


def infer_cycle_kind(starts_on: date, ends_on: date) -> CycleKind:
    return CycleKind.year if (ends_on - starts_on).days >= YEAR_FROM_DAYS else CycleKind.quarter


class Cycle(Aggregate):
    """A time box for objectives: a quarter or a year, planning -> active -> closed.

    A quarter may sit inside its year (`parent_id`); the application checks that the parent is
    a year and that the dates lie inside it.
    """

    class Created(Aggregate.Created):
        name: str
        starts_on: date
        ends_on: date
        # Cycles recorded before kinds existed were all quarters.
        kind: CycleKind = CycleKind.quarter
        parent_id: UUID | None = None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (6d87ba3, 8268a14) had no `kind` and no `parent_id`: a quarter inside no year,
            as those cycles have always been read."""
            state.setdefault("kind", CycleKind.quarter.value)
            state.setdefault("parent_id", None)

    @event(Created)
    def __init__(
        self,
        name: str,
        starts_on: date,
        ends_on: date,
        kind: CycleKind = CycleKind.quarter,
        parent_id: UUID | None = None,
    ) -> None:
        if ends_on <= starts_on:
            raise DomainError("a cycle must end after it starts")
        self.name = name
        self.starts_on = starts_on
        self.ends_on = ends_on
        self.kind = CycleKind(kind)
        self.parent_id = parent_id
        self.status = CycleStatus.planning

    @classmethod
    def define(
        cls,
        *,
        name: str,
        starts_on: date,
        ends_on: date,
        kind: CycleKind | None = None,
        parent_id: UUID | None = None,
    ) -> Cycle:
        """Check before anything is recorded; without a kind, a long cycle is a year."""
        if ends_on <= starts_on:
            raise DomainError("a cycle must end after it starts")
        kind = CycleKind(kind) if kind is not None else infer_cycle_kind(starts_on, ends_on)
        if kind == CycleKind.year and parent_id is not None:
            raise DomainError("a year is the top of its cycles and cannot sit inside another cycle")
        return cls(name=name, starts_on=starts_on, ends_on=ends_on, kind=kind, parent_id=parent_id)

    def contains(self, starts_on: date, ends_on: date) -> bool:
        return self.starts_on <= starts_on and ends_on <= self.ends_on

    def activate(self) -> None:
        if self.status != CycleStatus.planning:
            raise DomainError(f"only a cycle in planning can be activated (this one is {self.status})")
        self._activated()

    @event("Activated")
    def _activated(self) -> None:
        self.status = CycleStatus.active

    def close(self) -> None:
        if self.status == CycleStatus.closed:
            raise DomainError("the cycle is already closed")
        self._closed()

    @event("Closed")
    def _closed(self) -> None:
        self.status = CycleStatus.closed


# Objectives ------------------------------------------------------------------------------------

class Objective(Aggregate):
    """A qualitative goal owned by a person or unit in a cycle, aligned to a parent.

    Status: draft -> active -> closed, archived from any of them; a closed objective can be
    reopened until it is graded (the application also refuses once its cycle is closed).
    Besides its one parent it may contribute to other objectives with a weight; the objective
    keeps the ids of its key results so that grading can find them.
    """

    class Created(Aggregate.Created):
        title: str
        description: str
        owner_kind: OwnerKind
        owner_id: UUID
        unit_id: UUID
        cycle_id: UUID
        # Objectives recorded before drafts and carry-over existed were active, carried from none.
        status: ObjectiveStatus = ObjectiveStatus.active
        carried_from: UUID | None = None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (6d87ba3, 8268a14) had no `status` (every objective began active) and no
            `carried_from`."""
            state.setdefault("status", ObjectiveStatus.active.value)
            state.setdefault("carried_from", None)

    @event(Created)
    def __init__(
        self,
        title: str,
        description: str,
        owner_kind: OwnerKind,
        owner_id: UUID,
        unit_id: UUID,
        cycle_id: UUID,
        status: ObjectiveStatus = ObjectiveStatus.active,
        carried_from: UUID | None = None,
    ) -> None:
        self.title = title
        self.description = description
        self.owner_kind = OwnerKind(owner_kind)
        self.owner_id = owner_id
        self.unit_id = unit_id
        self.cycle_id = cycle_id
        self.parent_id: UUID | None = None
        self.status = ObjectiveStatus(status)
        self.carried_from = carried_from
        self.contributions: dict[str, float] = {}  # str(objective id) -> weight
        self.key_result_ids: list[UUID] = []
        self.graded = False
        self.final_score: float | None = None
        self.grade_reason: str | None = None
        self.carried_to_cycles: list[UUID] = []
        self.guardrails: list[UUID] = []  # KPIs (of the metrics service) that must stay healthy

    @classmethod
    def define(
        cls,
        *,
        title: str,
        description: str,
        owner_kind: OwnerKind,
        owner_id: UUID,
        unit_id: UUID,
        cycle_id: UUID,
        status: ObjectiveStatus = ObjectiveStatus.active,
        carried_from: UUID | None = None,
    ) -> Objective:
        """An objective starts as a draft (to be agreed) or active; never closed or archived."""
        _require_text(title, "an objective's title")
        if ObjectiveStatus(status) not in (ObjectiveStatus.draft, ObjectiveStatus.active):
            raise DomainError("an objective is created as a draft or active")
        return cls(title=title, description=description, owner_kind=owner_kind, owner_id=owner_id,
                   unit_id=unit_id, cycle_id=cycle_id, status=ObjectiveStatus(status), carried_from=carried_from)

    @property
    def is_open(self) -> bool:
        return self.status in (ObjectiveStatus.draft, ObjectiveStatus.active)

    @property
    def contributes_to(self) -> dict[UUID, float]:
        return {UUID(k): w for k, w in self.contributions.items()}

    def _require_open(self, what: str) -> None:
        if not self.is_open:
            raise DomainError(f"a {self.status} objective cannot {what}")

    # Alignment and contributions: the graph must stay acyclic (checked by the application).

    def align_to(self, parent_id: UUID | None) -> None:
        if parent_id == self.id:
            raise DomainError("an objective cannot align to itself")
        if parent_id != self.parent_id:
            self._require_open("change its alignment")
            if parent_id is not None and str(parent_id) in self.contributions:
                raise DomainError("the objective already contributes to that objective; "
                                  "remove the contribution before aligning to it, or it would count twice")
            self._aligned(parent_id=parent_id)

    @event("Aligned")
    def _aligned(self, parent_id: UUID | None) -> None:
        self.parent_id = parent_id

    def add_contribution(self, to_objective_id: UUID, weight: float = 1.0) -> None:
        """Contribute to another objective besides the parent. The parent already counts the
        objective once, so contributing to it too would count it twice. Adding an existing
        contribution with another weight changes its weight; with the same weight, nothing."""
        if to_objective_id == self.id:
            raise DomainError("an objective cannot contribute to itself")
        if to_objective_id == self.parent_id:
            raise DomainError("an objective already counts towards its parent and cannot contribute to it twice")
        if not weight > 0:
            raise DomainError("a contribution's weight must be positive")
        self._require_open("change its contributions")
        if self.contributions.get(str(to_objective_id)) != weight:
            self._contribution_added(to_objective_id=to_objective_id, weight=float(weight))

    @event("ContributionAdded")
    def _contribution_added(self, to_objective_id: UUID, weight: float) -> None:
        self.contributions[str(to_objective_id)] = weight

    def remove_contribution(self, to_objective_id: UUID) -> None:
        if str(to_objective_id) not in self.contributions:
            raise DomainError("the objective does not contribute to that objective")
        self._require_open("change its contributions")
        self._contribution_removed(to_objective_id=to_objective_id)

    @event("ContributionRemoved")
    def _contribution_removed(self, to_objective_id: UUID) -> None:
        del self.contributions[str(to_objective_id)]

    # Content.

    def update(
        self,
        *,
        title: str | None = None,
        description: str | None = None,
        owner_kind: OwnerKind | None = None,
        owner_id: UUID | None = None,
    ) -> None:
        """Change what the objective says or who owns it, while it is open. Left out = kept;
        nothing changed records nothing."""
        self._require_open("be edited")
        new = (
            self.title if title is None else title,
            self.description if description is None else description,
            self.owner_kind if owner_kind is None else OwnerKind(owner_kind),
            self.owner_id if owner_id is None else owner_id,
        )
        _require_text(new[0], "an objective's title")
        if new != (self.title, self.description, self.owner_kind, self.owner_id):
            self._updated(title=new[0], description=new[1], owner_kind=new[2], owner_id=new[3])

    @event("Updated")
    def _updated(self, title: str, description: str, owner_kind: OwnerKind, owner_id: UUID) -> None:
        self.title = title
        self.description = description
        self.owner_kind = OwnerKind(owner_kind)
        self.owner_id = owner_id

    # Key results: the objective knows its own, so that grading and carry-over can find them.

    def attach_key_result(self, key_result_id: UUID) -> None:
        self._require_open("get key results")
        if key_result_id not in self.key_result_ids:
            self._key_result_attached(key_result_id=key_result_id)

    @event("KeyResultAttached")
    def _key_result_attached(self, key_result_id: UUID) -> None:
        self.key_result_ids.append(key_result_id)

    def detach_key_result(self, key_result_id: UUID) -> None:
        """A key result recorded before objectives listed theirs is detached without a trace."""
        self._require_open("give up key results")
        if key_result_id in self.key_result_ids:
            self._key_result_detached(key_result_id=key_result_id)

    @event("KeyResultDetached")
    def _key_result_detached(self, key_result_id: UUID) -> None:
        self.key_result_ids.remove(key_result_id)

    # Status.

    def activate(self) -> None:
        if self.status != ObjectiveStatus.draft:
            raise DomainError(f"only a draft objective can be activated (this one is {self.status})")
        self._activated()

    @event("Activated")
    def _activated(self) -> None:
        self.status = ObjectiveStatus.active

    def close(self) -> None:
        """Closing early (done, or given up) before the cycle ends; grading comes with the cycle."""
        if self.status != ObjectiveStatus.active:
            raise DomainError(f"only an active objective can be closed (this one is {self.status})")
        self._closed()

    @event("Closed")
    def _closed(self) -> None:
        self.status = ObjectiveStatus.closed

    def reopen(self) -> None:
        """Undo an early close. A graded objective is final: its score is changed by regrading."""
        if self.status != ObjectiveStatus.closed:
            raise DomainError(f"only a closed objective can be reopened (this one is {self.status})")
        if self.graded:
            raise DomainError("a graded objective cannot be reopened; regrade it instead")
        self._reopened()

    @event("Reopened")
    def _reopened(self) -> None:
        self.status = ObjectiveStatus.active

    def archive(self) -> None:
        """Put away, from any status; archived objectives are left out of grading and lints."""
        if self.status == ObjectiveStatus.archived:
            raise DomainError("the objective is already archived")
        self._archived()

    @event("Archived")
    def _archived(self) -> None:
        self.status = ObjectiveStatus.archived

    # Grading, when the cycle closes.

    def grade(self, final_score: float | None, reason: str) -> None:
        """Keep the score the objective ended its cycle with; it is closed from then on."""
        if self.status == ObjectiveStatus.archived:
            raise DomainError("an archived objective is not graded")
        if self.graded:
            raise DomainError("the objective is already graded; regrade it to change the score")
        _require_score(final_score, allow_none=True)
        self._graded(final_score=final_score, reason=reason)

    @event("Graded")
    def _graded(self, final_score: float | None, reason: str) -> None:
        self.status = ObjectiveStatus.closed
        self.graded = True
        self.final_score = final_score
        self.grade_reason = reason

    def regrade(self, final_score: float, reason: str) -> None:
        """Change a final score after the fact, always saying why."""
        if not self.graded or self.status != ObjectiveStatus.closed:
            raise DomainError("only a closed, graded objective can be regraded")
        _require_text(reason, "the reason for a regrade")
        _require_score(final_score, allow_none=False)
        self._regraded(final_score=final_score, reason=reason)

    @event("Regraded")
    def _regraded(self, final_score: float, reason: str) -> None:
        self.final_score = final_score
        self.grade_reason = reason

    # Guardrails: KPIs that must stay healthy while the objective is pursued. A KPI's id is
    # opaque here (KPIs live in the metrics service); the read model knows their health.

    def add_guardrail(self, kpi_id: UUID) -> None:
        """Name a KPI that must stay healthy; naming it again records nothing."""
        if kpi_id in self.guardrails:
            return
        self._require_open("get guardrails")
        if len(self.guardrails) >= MAX_GUARDRAILS:
            raise DomainError(f"an objective names at most {MAX_GUARDRAILS} guardrail KPIs")
        self._guardrail_added(kpi_id=kpi_id)

    @event("GuardrailAdded")
    def _guardrail_added(self, kpi_id: UUID) -> None:
        self.guardrails.append(kpi_id)

    def remove_guardrail(self, kpi_id: UUID) -> None:
        if kpi_id not in self.guardrails:
            raise DomainError("the objective has no such guardrail KPI")
        self._require_open("give up guardrails")
        self._guardrail_removed(kpi_id=kpi_id)

    @event("GuardrailRemoved")
    def _guardrail_removed(self, kpi_id: UUID) -> None:
        self.guardrails.remove(kpi_id)

    # Carry-over into a later cycle.

    def record_carry_over(self, to_objective_id: UUID, to_cycle_id: UUID) -> None:
        """Only a graded objective is carried over, and into each later cycle once."""
        if not self.graded:
            raise DomainError("only a closed, graded objective can be carried over")
        if to_cycle_id in self.carried_to_cycles:
            raise DomainError("the objective was already carried over into that cycle")
        self._carried_over(to_objective_id=to_objective_id, to_cycle_id=to_cycle_id)

    @event("CarriedOver")
    def _carried_over(self, to_objective_id: UUID, to_cycle_id: UUID) -> None:
        self.carried_to_cycles.append(to_cycle_id)


MAX_GUARDRAILS = 10


def key_result_frozen(objective: Objective, cycle: Cycle) -> str | None:
    """Why a key result of this objective (in this cycle) takes no check-ins now, or None: a
    closed cycle freezes its key results, and so does an objective no longer open."""
    if cycle.status == CycleStatus.closed:
        return "the cycle is closed: its key results are frozen"
    if not objective.is_open:
        return f"the key result's objective is {objective.status}: its key results are frozen"
    return None


def _require_score(score: float | None, *, allow_none: bool) -> None:
    if score is None:
        if not allow_none:
            raise DomainError("a final score is needed")
        return
    if not 0.0 <= score <= 1.0:
        raise DomainError("a final score is from 0.0 to 1.0")


# Key results -----------------------------------------------------------------------------------

class CheckIn(NamedTuple):
    """An effective check-in: the one recorded at `version`, with a correction's values if it
    was corrected."""

    version: int
    valid_on: date
    value: float
    confidence: int | None


def in_valid_order(check_ins: Iterable[CheckIn]) -> list[CheckIn]:
    """Check-ins by the day they apply to, then in recorded order: the last one is the key
    result's current value. The read model orders its rows with this too."""
    return sorted(check_ins, key=lambda c: (c.valid_on, c.version))


class Unchanged(enum.Enum):
    token = "unchanged"


UNCHANGED = Unchanged.token
"""For `KeyResult.revise`: leave this field as it is."""

KPI_CHECK_IN_NOTE = "KPI measurement"


class KeyResult(Aggregate):
    """A measurable result of one objective; each check-in appends `KeyResultProgressed`.

    A correction (`CheckInCorrected`) names the version of the check-in it corrects; both stay
    in the history. The current value is that of the effective check-in with the latest
    `valid_on` (for the same day, the one recorded first as a check-in comes first: a
    correction fixes an entry in place, it does not make it newer).

    A key result of a numeric kind can be bound to a KPI of the metrics service (`kpi_id`):
    each new measurement of the KPI then arrives as a check-in that names the measurement
    (`record_measurement`, appended by the goals service's KPI policy), and a corrected
    measurement corrects that check-in (`correct_measurement`).
    """

    class Progressed(Aggregate.Event):
        """A check-in: a value for a day (`valid_on`), with a confidence and a note."""

        value: float
        confidence: int | None
        note: str
        valid_on: date
        # The KPI measurement the check-in carries, when a bound KPI's measurement made it;
        # check-ins recorded before KPIs drove key results name none.
        measurement_id: UUID | None = None

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (6d87ba3 to c256e20) had no `measurement_id`: a person's check-in."""
            state.setdefault("measurement_id", None)

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
        self.correction_count = 0
        # One entry per check-in (Progressed), in recorded order, with corrections applied.
        self._check_ins: list[dict[str, Any]] = []
        self.kpi_id: UUID | None = None
        # str(measurement id) -> the version of the check-in that carries it.
        self.measurements: dict[str, int] = {}

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
        Measure(kind, start, target, low, high, _milestone_weights(milestones)).validate()
        return cls(objective_id, title, kind, start, target, low, high, milestones, unit, weight, owner_id)

    @property
    def measure(self) -> Measure:
        return Measure(self.kind, self.start, self.target, self.low, self.high,
                       _milestone_weights(self.milestones))

    @property
    def score(self) -> float | None:
        return self.measure.score(self.current)

    @property
    def effective_check_ins(self) -> list[CheckIn]:
        """Every check-in as it stands after corrections, by valid date (then recorded order)."""
        return in_valid_order(CheckIn(c["version"], c["valid_on"], c["value"], c["confidence"]) for c in self._check_ins)

    def forecast(self, cycle_ends_on: date) -> tuple[float | None, float | None]:
        """The projected value and score at the end of the cycle, from the check-in trend."""
        return forecast(self.measure, self.effective_check_ins, cycle_ends_on)

    # Check-ins.

    def _validate_check_in(self, value: float, confidence: int | None) -> None:
        self.measure.validate_value(value)
        if confidence is not None and not 0 <= confidence <= 10:
            raise DomainError("confidence is from 0 to 10")

    def check_in(self, *, value: float, confidence: int | None, note: str, valid_on: date) -> None:
        self._validate_check_in(value, confidence)
        self._progressed(value=value, confidence=confidence, note=note, valid_on=valid_on)

    @event(Progressed)
    def _progressed(self, value: float, confidence: int | None, note: str, valid_on: date,
                    measurement_id: UUID | None = None) -> None:
        # A check-in for an earlier date is history (kept, and used by the forecast) but does
        # not move the key result back: the current value is the one for the latest date.
        self._check_ins.append({"version": self.version + 1, "valid_on": valid_on, "value": value,
                                "confidence": confidence, "note": note, "corrected_by": None,
                                "measurement_id": measurement_id})
        if measurement_id is not None:
            self.measurements[str(measurement_id)] = self.version + 1
        self.check_in_count += 1
        self._recompute_current()

    # Following a KPI.

    def bind_to_kpi(self, kpi_id: UUID) -> None:
        """Follow a KPI: from now on each new measurement of it becomes a check-in. Only a key
        result measured by a number can (not done/not-done, not milestones); binding to another
        KPI replaces the one followed, and to the same one records nothing."""
        if self.kind not in NUMERIC_KINDS:
            raise DomainError(f"a {self.kind.value} key result cannot follow a KPI; only "
                              f"{', '.join(sorted(k.value for k in NUMERIC_KINDS))} key results can")
        if kpi_id != self.kpi_id:
            self._bound_to_kpi(kpi_id=kpi_id)

    @event("BoundToKPI")
    def _bound_to_kpi(self, kpi_id: UUID) -> None:
        self.kpi_id = kpi_id

    def unbind_from_kpi(self) -> None:
        """Stop following the KPI; the check-ins it brought stay."""
        if self.kpi_id is None:
            raise DomainError("the key result is not bound to a KPI")
        self._unbound_from_kpi()

    @event("UnboundFromKPI")
    def _unbound_from_kpi(self) -> None:
        self.kpi_id = None

    def record_measurement(self, *, kpi_id: UUID, measurement_id: UUID, value: float, valid_on: date,
                           note: str = KPI_CHECK_IN_NOTE) -> bool:
        """A measurement of the bound KPI, as a check-in that names it (with no confidence: a
        number from a system says nothing about anyone's belief). Records nothing (False) when
        the key result does not follow that KPI, or already carries the measurement."""
        if kpi_id != self.kpi_id or str(measurement_id) in self.measurements:
            return False
        self._validate_check_in(value, None)
        self._progressed(value=value, confidence=None, note=note, valid_on=valid_on, measurement_id=measurement_id)
        return True

    def correct_measurement(self, *, measurement_id: UUID, value: float, note: str) -> bool:
        """A measurement was corrected in the metrics service: correct the check-in that carries
        it (its day and confidence stay). Records nothing (False) when no check-in carries the
        measurement, or the check-in already says that value."""
        version = self.measurements.get(str(measurement_id))
        if version is None:
            return False
        entry = next(c for c in self._check_ins if c["version"] == version)
        if entry["value"] == value:
            return False
        self._validate_check_in(value, entry["confidence"])
        self._check_in_corrected(corrects_version=version, value=value, confidence=entry["confidence"],
                                 note=note, valid_on=entry["valid_on"])
        return True

    def measurement_of(self, version: int) -> UUID | None:
        """The KPI measurement the check-in recorded at `version` carries, if any."""
        entry = next((c for c in self._check_ins if c["version"] == version), None)
        return entry.get("measurement_id") if entry else None

    def correct_check_in(
        self,
        *,
        corrects_version: int,
        value: float,
        confidence: int | None | Unchanged = UNCHANGED,
        note: str | Unchanged = UNCHANGED,
        valid_on: date | Unchanged = UNCHANGED,
    ) -> None:
        """Replace what an earlier check-in said (its value, confidence, note and date), keeping
        both in the history. A check-in can be corrected again: the latest correction counts.
        What the correction leaves `UNCHANGED` it takes from the check-in as it stands, so the
        event always records the whole corrected entry."""
        entry = next((c for c in self._check_ins if c["version"] == corrects_version), None)
        if entry is None:
            raise DomainError(f"version {corrects_version} of this key result is not a check-in")
        confidence = entry["confidence"] if confidence is UNCHANGED else confidence
        note = entry["note"] if note is UNCHANGED else note
        valid_on = entry["valid_on"] if valid_on is UNCHANGED else valid_on
        self._validate_check_in(value, confidence)
        self._check_in_corrected(corrects_version=corrects_version, value=value, confidence=confidence,
                                 note=note, valid_on=valid_on)

    @event("CheckInCorrected")
    def _check_in_corrected(
        self, corrects_version: int, value: float, confidence: int | None, note: str, valid_on: date
    ) -> None:
        for c in self._check_ins:
            if c["version"] == corrects_version:
                c.update(valid_on=valid_on, value=value, confidence=confidence, note=note,
                         corrected_by=self.version + 1)
        self.correction_count += 1
        self._recompute_current()

    def _recompute_current(self) -> None:
        effective = self.effective_check_ins
        latest = effective[-1] if effective else None
        self.current = latest.value if latest else None
        self.current_valid_on = latest.valid_on if latest else None
        self.confidence = latest.confidence if latest else None

    # Changes to the key result itself.

    def revise(
        self,
        *,
        title: str | Unchanged = UNCHANGED,
        unit: str | Unchanged = UNCHANGED,
        weight: float | Unchanged = UNCHANGED,
        owner_id: UUID | None | Unchanged = UNCHANGED,
        start: float | None | Unchanged = UNCHANGED,
        target: float | None | Unchanged = UNCHANGED,
        low: float | None | Unchanged = UNCHANGED,
        high: float | None | Unchanged = UNCHANGED,
        milestones: list[dict[str, object]] | Unchanged = UNCHANGED,
    ) -> None:
        """Change what the key result measures or who owns it; its kind stays. The new measure
        passes the same rules as a new one, and every check-in so far must still be a valid
        value of it (a milestones key result cannot lose milestones already reached)."""

        def pick(new: Any, old: Any) -> Any:
            return old if new is UNCHANGED else new

        revised = {
            "title": pick(title, self.title), "unit": pick(unit, self.unit),
            "weight": pick(weight, self.weight), "owner_id": pick(owner_id, self.owner_id),
            "start": pick(start, self.start), "target": pick(target, self.target),
            "low": pick(low, self.low), "high": pick(high, self.high),
            "milestones": list(pick(milestones, self.milestones)),
        }
        current = {"title": self.title, "unit": self.unit, "weight": self.weight, "owner_id": self.owner_id,
                   "start": self.start, "target": self.target, "low": self.low, "high": self.high,
                   "milestones": list(self.milestones)}
        if revised == current:
            return
        _require_text(revised["title"], "a key result's title")
        if not revised["weight"] > 0:
            raise DomainError("a key result's weight must be positive")
        measure = Measure(self.kind, revised["start"], revised["target"], revised["low"], revised["high"],
                          _milestone_weights(revised["milestones"]))
        measure.validate()
        for c in self._check_ins:
            try:
                measure.validate_value(c["value"])
            except DomainError as e:
                raise DomainError(f"the check-in at version {c['version']} would no longer be valid: {e}") from None
        self._revised(**revised)

    @event("Revised")
    def _revised(
        self,
        title: str,
        unit: str,
        weight: float,
        owner_id: UUID | None,
        start: float | None,
        target: float | None,
        low: float | None,
        high: float | None,
        milestones: list[dict[str, object]],
    ) -> None:
        self.title = title
        self.unit = unit
        self.weight = weight
        self.owner_id = owner_id
        self.start = start
        self.target = target
        self.low = low
        self.high = high
        self.milestones = milestones

    def move_to(self, objective_id: UUID) -> None:
        """Belong to another objective (the application checks it is open and in the same cycle)."""
        if objective_id == self.objective_id:
            raise DomainError("the key result already belongs to that objective")
        self._moved_to_objective(objective_id=objective_id)

    @event("MovedToObjective")
    def _moved_to_objective(self, objective_id: UUID) -> None:
        self.objective_id = objective_id


# The KPI binding index -------------------------------------------------------------------------

KPI_BINDING_NAMESPACE = uuid5(NAMESPACE_URL, "https://tandem.dev/goals/kpi-bindings")
"""Fixed forever: a binding's id is derived from it and the KPI's id."""


class KPIBinding(Aggregate):
    """The key results bound to one KPI: the index the KPI policy reads to find them.

    Kept in the event store (never only in a read model, which lags), and saved in the same
    transaction as each `KeyResult.BoundToKPI` / `UnboundFromKPI`, so the policy finds exactly
    the key results that follow the KPI as of the events it has seen. Its id follows from the
    KPI's (`create_id`), so anyone holding a KPI id can load it without a lookup.
    """

    @staticmethod
    def create_id(kpi_id: UUID) -> UUID:
        return uuid5(KPI_BINDING_NAMESPACE, str(kpi_id))

    @event("Created")
    def __init__(self, kpi_id: UUID) -> None:
        self.kpi_id = kpi_id
        self.key_result_ids: list[UUID] = []

    def bind(self, key_result_id: UUID) -> None:
        if key_result_id not in self.key_result_ids:
            self._key_result_bound(key_result_id=key_result_id)

    @event("KeyResultBound")
    def _key_result_bound(self, key_result_id: UUID) -> None:
        self.key_result_ids.append(key_result_id)

    def unbind(self, key_result_id: UUID) -> None:
        if key_result_id in self.key_result_ids:
            self._key_result_unbound(key_result_id=key_result_id)

    @event("KeyResultUnbound")
    def _key_result_unbound(self, key_result_id: UUID) -> None:
        self.key_result_ids.remove(key_result_id)


# Scores and forecasts --------------------------------------------------------------------------

class Scored(Protocol):
    @property
    def score(self) -> float | None: ...

    @property
    def weight(self) -> float: ...


def objective_score(key_results: Iterable[Scored]) -> float | None:
    """The weighted mean of the key results' scores by their weights; unscored ones left out."""
    return weighted_mean([(k.score, k.weight) for k in key_results])


def objective_forecast(forecast_scores: Iterable[tuple[float | None, float]]) -> float | None:
    """The objective's projected end-of-cycle score: its key results' forecast scores, each
    (score, weight), weighted as its score is; key results without a forecast left out."""
    return weighted_mean(list(forecast_scores))


def forecast(measure: Measure, check_ins: Sequence[CheckIn], ends_on: date) -> tuple[float | None, float | None]:
    """The projected value at `ends_on` and its score.

    The least-squares line through the check-ins (day ordinal, value) evaluated at `ends_on`.
    With fewer than two distinct days there is no trend, and the projection is the latest value
    (latest day; for the same day, the later recorded). No check-ins: (None, None). The score
    is the measure's, clamped to 0.0-1.0 like any score.
    """
    if not check_ins:
        return None, None
    if len({c.valid_on for c in check_ins}) < 2:
        projected = max(check_ins, key=lambda c: (c.valid_on, c.version)).value
    else:
        xs = [float(c.valid_on.toordinal()) for c in check_ins]
        ys = [float(c.value) for c in check_ins]
        n = len(xs)
        x_mean = sum(xs) / n
        y_mean = sum(ys) / n
        sxx = sum((x - x_mean) ** 2 for x in xs)
        sxy = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
        slope = sxy / sxx
        projected = y_mean + slope * (ends_on.toordinal() - x_mean)
    score = measure.score(projected)
    return projected, None if score is None else _clamp(score)


# Coaching lints --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoachingWarning:
    """A common mistake the seed material names, on an owner, an objective or a key result.
    A warning, never a refusal: the team decides."""

    code: str
    message: str
    subject_kind: str  # "owner", "objective" or "key_result"
    subject_id: UUID


class ObjectiveFacts(Protocol):
    """What the lints read of an objective: an `Objective`, or a read-model row as an object."""

    @property
    def id(self) -> UUID: ...
    @property
    def title(self) -> str: ...
    @property
    def owner_id(self) -> UUID | None: ...
    @property
    def cycle_id(self) -> UUID: ...
    @property
    def status(self) -> str: ...


class KeyResultFacts(Protocol):
    @property
    def id(self) -> UUID: ...
    @property
    def objective_id(self) -> UUID: ...
    @property
    def title(self) -> str: ...
    @property
    def kind(self) -> str: ...


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
# The activity counted ("Post 5 times", "Publish 15 guest posts", "Hire two engineers") or given a
# rhythm ("... a week", "weekly"): output, not outcome.
_COUNTED_ACTIVITY = re.compile(rf"^\w+\s+(\d|(?:{_NUMBER_WORDS})\b)", re.IGNORECASE)
_RHYTHM = re.compile(r"\b(\d+|once|twice)\s+(times?\s+)?(a|per|each|every)\s+(day|week|month)\b"
                     r"|\b(daily|weekly|monthly)\b", re.IGNORECASE)
_HAS_NUMBER = re.compile(r"\d")


def _first_word(title: str) -> str:
    words = re.findall(r"[a-z]+", title.lower())
    return words[0] if words else ""


def reads_as_activity(title: str, kind: str) -> bool:
    """A key result is a task when it starts with an activity verb and either has no
    measurable target (done/not-done or a list of milestones) or counts the activity itself
    ("Post 5 times a week"). "Increase eNPS from 45 to 65" starts with an outcome verb, and
    "Launch Spotify in 15 new markets" measured as increase_to is an outcome with a target."""
    if _first_word(title) not in ACTIVITY_VERBS:
        return False
    if KeyResultKind(kind) in (KeyResultKind.done, KeyResultKind.milestones):
        return True
    return bool(_COUNTED_ACTIVITY.match(title.strip()) or _RHYTHM.search(title))


def only_maintains_a_number(title: str) -> bool:
    """"Maintain NPS above 50", "Keep uptime at 99.9%": a level to hold, which is a KPI. "Keep
    our customers delighted" names no number and stays an objective."""
    return _first_word(title) in MAINTENANCE_VERBS and bool(_HAS_NUMBER.search(title))


def lint_key_result(kr: KeyResultFacts) -> list[CoachingWarning]:
    warnings = []
    if reads_as_activity(kr.title, kr.kind):
        warnings.append(CoachingWarning(
            "key_result_is_a_task",
            f"'{kr.title}' reads as an activity, not an outcome: say what it changes and by how much "
            "(\"Increase LinkedIn engagement by 40%\" rather than \"Post 5 times a week\").",
            "key_result", kr.id))
    if KeyResultKind(kr.kind) == KeyResultKind.done:
        warnings.append(CoachingWarning(
            "done_only_key_result",
            f"'{kr.title}' is only done or not done: did it improve anything? Measure the result it should "
            "bring (\"Increase conversion rate by 15% after launching the new website\").",
            "key_result", kr.id))
    return warnings


def lint_objective(
    objective: ObjectiveFacts, key_results: Sequence[KeyResultFacts], people_who_left: Collection[UUID] = ()
) -> list[CoachingWarning]:
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


class GuardrailFacts(Protocol):
    """What the guardrail lint reads of a guardrail KPI's health (the read model knows it)."""

    @property
    def kpi_id(self) -> UUID: ...
    @property
    def name(self) -> str | None: ...
    @property
    def breached(self) -> bool: ...


def lint_guardrails(objective: ObjectiveFacts, guardrails: Sequence[GuardrailFacts]) -> list[CoachingWarning]:
    """An objective pursued (draft or active) while a KPI it named as a guardrail is breached."""
    if objective.status not in (ObjectiveStatus.draft, ObjectiveStatus.active):
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


def coaching_warnings(
    objectives: Iterable[ObjectiveFacts],
    key_results: Iterable[KeyResultFacts],
    people_who_left: Collection[UUID] = (),
) -> list[CoachingWarning]:
    """Every warning for these objectives and key results: per owner and cycle, per objective,
    per key result. Archived objectives (and their key results) are left out; key results of
    objectives not given are ignored."""
    live = [o for o in objectives if o.status != ObjectiveStatus.archived]
    by_objective: dict[UUID, list[KeyResultFacts]] = {o.id: [] for o in live}
    for kr in key_results:
        if kr.objective_id in by_objective:
            by_objective[kr.objective_id].append(kr)
    warnings: list[CoachingWarning] = []
    per_owner: dict[tuple[UUID, UUID], int] = {}
    for o in live:
        if o.owner_id is not None:
            per_owner[(o.owner_id, o.cycle_id)] = per_owner.get((o.owner_id, o.cycle_id), 0) + 1
    for (owner_id, _cycle_id), count in per_owner.items():
        if count > MAX_OBJECTIVES_PER_OWNER:
            warnings.append(CoachingWarning(
                "too_many_objectives",
                f"this owner has {count} objectives in one cycle; if everything is important, nothing is: "
                f"keep to {MAX_OBJECTIVES_PER_OWNER} at most.",
                "owner", owner_id))
    for o in live:
        krs = by_objective[o.id]
        warnings.extend(lint_objective(o, krs, people_who_left))
        for kr in krs:
            warnings.extend(lint_key_result(kr))
    return warnings


# Webhook subscriptions -------------------------------------------------------------------------

class WebhookStatus(enum.StrEnum):
    active = "active"
    paused = "paused"
    removed = "removed"


class WebhookSubscription(Aggregate):
    """A subscriber to the changes feed over HTTP: where to deliver, which event types, and the
    feed positions delivery starts after.

    Event-sourced so that who registered, paused and resumed a subscriber, and why, is in the
    log like every other change. It holds no secret: the signing secret is derived from the
    server's key and the id (services.goals.webhooks), so nothing secret is ever in the log.
    The delivery worker pauses a subscriber that keeps failing; only an admin resumes it.
    """

    class Registered(Aggregate.Created):
        url: str
        event_types: list[str]
        description: str
        start_goals: int
        start_metrics: int

    @event(Registered)
    def __init__(self, url: str, event_types: list[str], description: str, start_goals: int,
                 start_metrics: int) -> None:
        self.url = url
        self.event_types = list(event_types)
        self.description = description
        self.start_goals = start_goals
        self.start_metrics = start_metrics
        self.status = WebhookStatus.active
        self.paused_reason: str | None = None
        self.resumes = 0

    @classmethod
    def register(cls, *, url: str, event_types: Sequence[str], description: str = "", start_goals: int = 0,
                 start_metrics: int = 0) -> WebhookSubscription:
        """Check before anything is recorded: a URL, at least one event type, sane positions."""
        if not url.strip():
            raise DomainError("a webhook needs a URL")
        if not event_types:
            raise DomainError("a webhook needs at least one event type")
        if start_goals < 0 or start_metrics < 0:
            raise DomainError("feed positions are never negative")
        return cls(url=url, event_types=list(dict.fromkeys(event_types)), description=description,
                   start_goals=start_goals, start_metrics=start_metrics)

    def pause(self, reason: str, failures: int) -> None:
        if self.status != WebhookStatus.active:
            raise DomainError(f"only an active webhook can be paused (this one is {self.status})")
        self._paused(reason=reason, failures=failures)

    @event("Paused")
    def _paused(self, reason: str, failures: int) -> None:
        self.status = WebhookStatus.paused
        self.paused_reason = reason

    def resume(self) -> None:
        if self.status != WebhookStatus.paused:
            raise DomainError(f"only a paused webhook can be resumed (this one is {self.status})")
        self._resumed()

    @event("Resumed")
    def _resumed(self) -> None:
        self.status = WebhookStatus.active
        self.paused_reason = None
        self.resumes += 1

    def remove(self) -> None:
        if self.status == WebhookStatus.removed:
            raise DomainError("the webhook is already removed")
        self._removed()

    @event("Removed")
    def _removed(self) -> None:
        self.status = WebhookStatus.removed


WEBHOOK_REGISTRY_ID = uuid5(NAMESPACE_URL, "https://tandem.dev/goals/webhook-registry")
"""Fixed forever: there is one registry."""


class WebhookRegistry(Aggregate):
    """The webhook subscriptions that are not removed, in the order they were registered: the
    index the API lists and the delivery worker follows, kept in the event store (saved in the
    same transaction as each registration and removal) so it never lags."""

    @staticmethod
    def create_id() -> UUID:
        return WEBHOOK_REGISTRY_ID

    @event("Created")
    def __init__(self) -> None:
        self.subscription_ids: list[UUID] = []

    def add(self, subscription_id: UUID) -> None:
        if subscription_id not in self.subscription_ids:
            self._subscription_added(subscription_id=subscription_id)

    @event("SubscriptionAdded")
    def _subscription_added(self, subscription_id: UUID) -> None:
        self.subscription_ids.append(subscription_id)

    def remove(self, subscription_id: UUID) -> None:
        if subscription_id in self.subscription_ids:
            self._subscription_removed(subscription_id=subscription_id)

    @event("SubscriptionRemoved")
    def _subscription_removed(self, subscription_id: UUID) -> None:
        self.subscription_ids.remove(subscription_id)
