"""Commands and queries of the goals service over the `eventsourcing` application.

Commands are synchronous (the library's PostgreSQL persistence is psycopg 3); the API runs them
in a thread pool. Each returns what the client needs to read its own write: the aggregate's id,
its new version (the ETag) and the log position of the last event stored. A command that
writes several aggregates saves them in one transaction, and every `Written` it returns carries
the position of that transaction's last event, so waiting for any of them sees the whole
command.

The rules that span aggregates live here: alignment and contributions never form a cycle, the
unit tree and the management chain neither, a quarter lies inside its year, check-ins freeze
once the cycle is closed, a key result moves only within its cycle, carry-over goes forward.

KPIs drive key results: `KPIProgress` is the policy that follows the metrics service's log (as
the contract describes it, never through the metrics classes) and appends a check-in naming
the measurement to each key result bound to a measured KPI, in the goals log, with its tracking
position in the same transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, ProcessingEvent
from eventsourcing.domain import Aggregate, MutableOrImmutableAggregate
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Tracking
from eventsourcing.projection import EventSourcedProjection

from services.common.eventstore import (
    SNAPSHOT_EVERY,
    CommandContext,
    TandemApplication,
    Written,
    in_context,
    new_correlation_id,
    retry_on_conflict,
)
from services.goals.domain import (
    KPI_CHECK_IN_NOTE,
    UNCHANGED,
    WEBHOOK_REGISTRY_ID,
    CoachingWarning,
    Cycle,
    CycleKind,
    CycleStatus,
    DomainError,
    KeyResult,
    KeyResultKind,
    KPIBinding,
    Objective,
    ObjectiveStatus,
    OrgUnit,
    OwnerKind,
    Person,
    Unchanged,
    UnitKind,
    UnitNotEmpty,
    UserName,
    WebhookRegistry,
    WebhookStatus,
    WebhookSubscription,
    coaching_warnings,
    key_result_frozen,
    objective_score,
    user_name_key,
)
from services.goals.snapshots import register_goals_state

log = logging.getLogger(__name__)

MAX_ALIGNMENT_NODES = 10_000  # objectives visited looking for an alignment cycle
MAX_TREE_DEPTH = 64  # levels walked up the unit tree or the management chain


class Goals(TandemApplication):
    """The goals service's write side. Its log is the table `goals.goals_events`."""

    name = "Goals"
    # Check-ins make key results the long histories: loaded from a snapshot at most 100 events back.
    snapshotting_intervals: ClassVar[dict[type[Aggregate], int]] = {KeyResult: SNAPSHOT_EVERY, Objective: SNAPSHOT_EVERY}

    def register_snapshot_transcodings(self, transcoder: JSONTranscoder) -> None:
        """The snapshot store's transcodings, and one for each type in a key result's or an
        objective's state they lack (`services.goals.snapshots`); events keep the application's."""
        super().register_snapshot_transcodings(transcoder)
        register_goals_state(transcoder)

    def _load(self, cls: type, aggregate_id: UUID, *, read_only: bool = False):  # noqa: ANN202
        """The aggregate a path names; AggregateNotFoundError (404) if it is not one of `cls`.
        `read_only`: the cached instance itself rather than a copy, for a command that only
        looks at it (never changes or saves it)."""
        aggregate = self.repository.get(aggregate_id, deepcopy_from_cache=not read_only)
        if not isinstance(aggregate, cls):
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def _existing(self, cls: type, aggregate_id: UUID, what: str):  # noqa: ANN202
        """An aggregate a request body refers to; a DomainError (422) if there is none."""
        try:
            return self._load(cls, aggregate_id)
        except AggregateNotFoundError:
            raise DomainError(f"no {what} with id {aggregate_id}") from None

    def save_together(self, *aggregates: MutableOrImmutableAggregate[UUID]) -> list[Written]:
        """Save several aggregates in one transaction; each `Written` carries the position of
        the transaction's last event."""
        recordings = self.save(*aggregates)
        position = max((r.notification.id for r in recordings), default=0)
        return [Written(a.id, a.version, position) for a in aggregates]

    # Org units -----------------------------------------------------------------------------

    def create_unit(
        self, *, name: str, kind: UnitKind, parent_id: UUID | None, external_id: str | None = None,
        add_members: Sequence[UUID] = (), effective_on: date | None = None,
    ) -> Written:
        """A company, or a unit under an open parent; `add_members` move into it from
        `effective_on` (today if not given), in the same transaction."""
        if parent_id is not None:
            self._open_unit(parent_id, "org unit")
            if kind == UnitKind.company:
                raise DomainError("a company is the root of its tree and cannot get a parent")
        elif kind is not UnitKind.company:
            raise DomainError("only a company may have no parent unit")
        if not name.strip():
            raise DomainError("a unit's name cannot be blank")
        unit = OrgUnit(name=name, kind=kind, parent_id=parent_id, external_id=external_id)
        people = self._add_members(unit, add_members, effective_on or date.today())
        return self.save_together(unit, *people)[0]

    def _add_members(self, unit: OrgUnit, person_ids: Sequence[UUID], day: date) -> list[Person]:
        people = [self._present_person(person_id, "member") for person_id in dict.fromkeys(person_ids)]
        for person in people:
            person.move_to_unit(unit.id, day)
        return people

    def get_unit(self, unit_id: UUID) -> OrgUnit:
        return self._load(OrgUnit, unit_id)

    def _open_unit(self, unit_id: UUID, what: str) -> OrgUnit:
        """A unit a request names that takes members or children: it exists (else 422) and is
        not dissolved."""
        unit = self._existing(OrgUnit, unit_id, what)
        if unit.is_dissolved:
            raise DomainError(f"the {what} {unit.name} was dissolved on {unit.dissolved_on.isoformat()}")
        return unit

    def _changeable_unit(self, unit_id: UUID, expected_version: int | None) -> OrgUnit:
        unit = self.get_unit(unit_id)
        self.check_version(unit, expected_version)
        if unit.is_dissolved:
            raise DomainError(f"{unit.name} was dissolved on {unit.dissolved_on.isoformat()} and cannot change")
        return unit

    @retry_on_conflict
    def rename_unit(self, unit_id: UUID, name: str, expected_version: int | None = None) -> Written:
        unit = self._changeable_unit(unit_id, expected_version)
        if not name.strip():
            raise DomainError("a unit's name cannot be blank")
        if name != unit.name:
            unit.rename(name)
        return self.save_written(unit)

    @retry_on_conflict
    def move_unit(
        self, unit_id: UUID, parent_id: UUID | None, expected_version: int | None = None,
        effective_on: date | None = None,
    ) -> Written:
        """Hang a unit under another parent from a day (today if not given); never under
        itself or anything below it."""
        unit = self._changeable_unit(unit_id, expected_version)
        self._move_unit(unit, parent_id, effective_on or date.today())
        return self.save_written(unit)

    def _move_unit(self, unit: OrgUnit, parent_id: UUID | None, effective_on: date) -> None:
        if parent_id is not None and parent_id != unit.id:
            self._open_unit(parent_id, "org unit")
            self._refuse_unit_cycle(unit.id, parent_id)
        unit.move(parent_id, effective_on)

    def _refuse_unit_cycle(self, unit_id: UUID, parent_id: UUID) -> None:
        """Walk up from the new parent: meeting the unit itself would close a loop."""
        current: UUID | None = parent_id
        for _ in range(MAX_TREE_DEPTH):
            if current is None:
                return
            if current == unit_id:
                raise DomainError("this move would form a cycle in the unit tree: the new parent lies below the unit")
            current = self.get_unit(current).parent_id
        raise DomainError(f"unit trees are limited to {MAX_TREE_DEPTH} levels")

    @retry_on_conflict
    def update_unit(
        self,
        unit_id: UUID,
        *,
        name: str | Unchanged = UNCHANGED,
        parent_id: UUID | None | Unchanged = UNCHANGED,
        external_id: str | None | Unchanged = UNCHANGED,
        add_members: Sequence[UUID] = (),
        remove_members: Sequence[UUID] = (),
        effective_on: date | None = None,
        expected_version: int | None = None,
    ) -> Written:
        """An HR system's change to a unit (a SCIM group), in one transaction: its name, parent
        and external id, and who is in it. Adding a person moves them into the unit; removing
        one moves them up to the unit's parent (a person always has a unit, so nobody is removed
        from a company, the root). Moves take effect on `effective_on` (today if not given).
        The `Written` is the unit's; If-Match is checked against the unit's version."""
        day = effective_on or date.today()
        unit = self._changeable_unit(unit_id, expected_version)
        if not isinstance(name, Unchanged):
            if not name.strip():
                raise DomainError("a unit's name cannot be blank")
            if name != unit.name:
                unit.rename(name)
        if not isinstance(parent_id, Unchanged):
            self._move_unit(unit, parent_id, day)
        if not isinstance(external_id, Unchanged):
            unit.change_external_id(external_id)
        people = {p.id: p for p in self._add_members(unit, add_members, day)}
        for person_id in dict.fromkeys(remove_members):
            if person_id in people:
                raise DomainError(f"person {person_id} cannot be both added to and removed from {unit.name}")
            person = self._present_person(person_id, "member")
            if person.unit_id != unit.id:
                continue  # not a member (any more): nothing to remove
            if unit.parent_id is None:
                raise DomainError(f"{person.name} cannot be removed from {unit.name}, the root unit: a person "
                                  "always belongs to a unit; add them to another unit instead")
            person.move_to_unit(unit.parent_id, day)
            people[person_id] = person
        return self.save_together(unit, *people.values())[0]

    @retry_on_conflict
    def dissolve_unit(
        self,
        unit_id: UUID,
        *,
        dissolved_on: date | None = None,
        member_ids: Sequence[UUID] = (),
        child_unit_ids: Sequence[UUID] = (),
        expected_version: int | None = None,
    ) -> Written:
        """Dissolve an empty unit (its history stays). `member_ids` and `child_unit_ids` are
        the unit's members and children as the caller read them from the read model (the unit
        records neither); each that still is one refuses the dissolution."""
        unit = self._changeable_unit(unit_id, expected_version)
        for person_id in member_ids:
            person = self._existing(Person, person_id, "person")
            if person.unit_id == unit_id and not person.has_left:
                raise UnitNotEmpty(f"{unit.name} still has members ({person.name}, ...): move them first")
        for child_id in child_unit_ids:
            child = self._existing(OrgUnit, child_id, "org unit")
            if child.parent_id == unit_id and not child.is_dissolved:
                raise UnitNotEmpty(f"{unit.name} still has units below it ({child.name}, ...): move or dissolve "
                                   "them first")
        unit.dissolve(dissolved_on or date.today())
        return self.save_written(unit)

    # People --------------------------------------------------------------------------------

    def get_person(self, person_id: UUID) -> Person:
        return self._load(Person, person_id)

    def _present_person(self, person_id: UUID, what: str) -> Person:
        person = self._existing(Person, person_id, what)
        if person.has_left:
            raise DomainError(f"{person.name} ({what}) left on {person.left_on.isoformat()}")
        return person

    def _claim_user_name(self, person_id: UUID, old: str | None, new: str | None) -> list[UserName]:
        """The user name index entries to save with a person whose user name goes from `old` to
        `new`: the new one claimed (UserNameTaken if someone present holds it), the old released."""
        if old == new:
            return []
        changed: list[UserName] = []
        if new is not None:
            try:
                index: UserName = self._load(UserName, UserName.create_id(new))
            except AggregateNotFoundError:
                changed.append(UserName(user_name=new, person_id=person_id))
            else:
                holder = index.person_id
                present = False
                if holder is not None and holder != person_id:
                    try:
                        present = not self.get_person(holder).has_left
                    except AggregateNotFoundError:
                        present = False
                index.claim(person_id, new, held_by_someone_present=present)
                changed.append(index)
        if old is not None and (new is None or user_name_key(old) != user_name_key(new)):
            try:
                index = self._load(UserName, UserName.create_id(old))
            except AggregateNotFoundError:
                pass
            else:
                index.release(person_id)
                changed.append(index)
        return changed

    @retry_on_conflict
    def join_person(
        self,
        *,
        name: str,
        email: str,
        unit_id: UUID,
        manager_id: UUID | None = None,
        joined_on: date,
        user_name: str | None = None,
        external_id: str | None = None,
        given_name: str | None = None,
        family_name: str | None = None,
        formatted_name: str | None = None,
        emails: Sequence[dict[str, Any]] | None = None,
        active: bool = True,
    ) -> Written:
        """Someone joins a unit; a user name (SCIM's `userName`) is theirs alone among the people
        who have not left (UserNameTaken otherwise, also against a concurrent claim)."""
        self._open_unit(unit_id, "org unit")
        if manager_id is not None:
            self._present_person(manager_id, "manager")
        person = Person.join(name=name, email=email, unit_id=unit_id, manager_id=manager_id, joined_on=joined_on,
                             user_name=user_name, external_id=external_id, given_name=given_name,
                             family_name=family_name, formatted_name=formatted_name, emails=emails, active=active)
        return self.save_together(person, *self._claim_user_name(person.id, None, user_name))[0]

    @retry_on_conflict
    def move_person(
        self, person_id: UUID, *, unit_id: UUID, effective_on: date, expected_version: int | None = None
    ) -> Written:
        person = self.get_person(person_id)
        self.check_version(person, expected_version)
        self._open_unit(unit_id, "org unit")
        person.move_to_unit(unit_id, effective_on)
        return self.save_written(person)

    @retry_on_conflict
    def change_manager(
        self, person_id: UUID, *, manager_id: UUID | None, effective_on: date, expected_version: int | None = None
    ) -> Written:
        """Nobody manages themselves, directly or up the chain."""
        person = self.get_person(person_id)
        self.check_version(person, expected_version)
        self._change_manager(person, manager_id, effective_on)
        return self.save_written(person)

    def _change_manager(self, person: Person, manager_id: UUID | None, effective_on: date) -> None:
        if manager_id is not None and manager_id != person.id:
            self._present_person(manager_id, "manager")
            self._refuse_management_cycle(person.id, manager_id)
        person.change_manager(manager_id, effective_on)

    def _refuse_management_cycle(self, person_id: UUID, manager_id: UUID) -> None:
        current: UUID | None = manager_id
        for _ in range(MAX_TREE_DEPTH):
            if current is None:
                return
            if current == person_id:
                raise DomainError("this change would form a cycle in the management chain")
            current = self.get_person(current).manager_id
        raise DomainError(f"management chains are limited to {MAX_TREE_DEPTH} levels")

    @retry_on_conflict
    def update_person(
        self,
        person_id: UUID,
        *,
        profile: dict[str, Any] | None = None,
        unit_id: UUID | None = None,
        manager_id: UUID | None | Unchanged = UNCHANGED,
        active: bool | None = None,
        effective_on: date | None = None,
        expected_version: int | None = None,
    ) -> Written:
        """An HR system's change to a person (a SCIM user), in one transaction: the whole
        profile (`Person.update_profile`'s fields), the unit and manager from `effective_on`
        (today if not given), and whether they are active. None / UNCHANGED: kept."""
        day = effective_on or date.today()
        person = self.get_person(person_id)
        self.check_version(person, expected_version)
        claims: list[UserName] = []
        if profile is not None:
            claims = self._claim_user_name(person.id, person.user_name, profile.get("user_name"))
            person.update_profile(**profile)
        if unit_id is not None:
            self._open_unit(unit_id, "org unit")
            person.move_to_unit(unit_id, day)
        if not isinstance(manager_id, Unchanged):
            self._change_manager(person, manager_id, day)
        if active is not None:
            person.set_active(active)
        return self.save_together(person, *claims)[0]

    @retry_on_conflict
    def person_leaves(self, person_id: UUID, *, left_on: date, expected_version: int | None = None) -> Written:
        """The person's last day; their history stays, and their user name is free again."""
        person = self.get_person(person_id)
        self.check_version(person, expected_version)
        person.leave(left_on)
        return self.save_together(person, *self._claim_user_name(person.id, person.user_name, None))[0]

    # Cycles --------------------------------------------------------------------------------

    def create_cycle(
        self,
        *,
        name: str,
        starts_on: date,
        ends_on: date,
        activate: bool,
        kind: CycleKind | None = None,
        parent_id: UUID | None = None,
    ) -> Written:
        """A quarter or a year (without `kind`, inferred from its length). A quarter may sit
        inside an open year that holds its dates."""
        cycle = Cycle.define(name=name, starts_on=starts_on, ends_on=ends_on, kind=kind, parent_id=parent_id)
        if parent_id is not None:
            parent = self._existing(Cycle, parent_id, "cycle")
            if parent.kind != CycleKind.year:
                raise DomainError("a quarter sits inside a year, and the parent cycle is not a year")
            if parent.status == CycleStatus.closed:
                raise DomainError("the parent year is closed")
            if not parent.contains(starts_on, ends_on):
                raise DomainError(
                    f"the quarter's dates must lie inside its year ({parent.starts_on.isoformat()} to "
                    f"{parent.ends_on.isoformat()})")
        if activate:
            cycle.activate()
        return self.save_written(cycle)

    def get_cycle(self, cycle_id: UUID) -> Cycle:
        return self._load(Cycle, cycle_id)

    @retry_on_conflict
    def activate_cycle(self, cycle_id: UUID, expected_version: int | None = None) -> Written:
        cycle = self.get_cycle(cycle_id)
        self.check_version(cycle, expected_version)
        cycle.activate()
        return self.save_written(cycle)

    @retry_on_conflict
    def close_cycle(
        self,
        cycle_id: UUID,
        objective_ids: Sequence[UUID] = (),
        *,
        reason: str = "graded when the cycle closed",
        expected_version: int | None = None,
    ) -> Written:
        """Close the cycle and grade its objectives, in one transaction.

        `objective_ids` are the cycle's objectives (the caller reads them from the read model;
        the cycle records nothing about its objectives). Each one that is not archived gets
        `Graded` with its score (the weighted mean of its key results' scores) and is closed.
        From then on, its key results take no check-ins. The `Written` is the cycle's.
        """
        cycle = self.get_cycle(cycle_id)
        self.check_version(cycle, expected_version)
        objectives = []
        for objective_id in dict.fromkeys(objective_ids):
            objective = self._existing(Objective, objective_id, "objective")
            if objective.cycle_id != cycle_id:
                raise DomainError(f"objective {objective_id} is not in this cycle")
            objectives.append(objective)
        cycle.close()
        graded = []
        for objective in objectives:
            if objective.status == ObjectiveStatus.archived:
                continue
            objective.grade(objective_score(self.key_results_of(objective)), reason)
            graded.append(objective)
        return self.save_together(cycle, *graded)[0]

    # Objectives ----------------------------------------------------------------------------

    def _check_owner(self, owner_kind: OwnerKind, owner_id: UUID) -> None:
        if owner_kind == OwnerKind.unit:
            self._existing(OrgUnit, owner_id, "org unit")
        else:
            self._present_person(owner_id, "owner")

    def create_objective(
        self,
        *,
        title: str,
        description: str,
        owner_kind: OwnerKind,
        owner_id: UUID,
        unit_id: UUID,
        cycle_id: UUID,
        parent_id: UUID | None,
        status: ObjectiveStatus = ObjectiveStatus.active,
    ) -> Written:
        """An objective, active or as a draft, in an open cycle; its owner is a unit or a person
        who has not left."""
        self._existing(OrgUnit, unit_id, "org unit")
        cycle = self._existing(Cycle, cycle_id, "cycle")
        if cycle.status == CycleStatus.closed:
            raise DomainError("objectives cannot be added to a closed cycle")
        self._check_owner(owner_kind, owner_id)
        objective = Objective.define(title=title, description=description, owner_kind=owner_kind,
                                     owner_id=owner_id, unit_id=unit_id, cycle_id=cycle_id, status=status)
        if parent_id is not None:
            self._target_objective(parent_id)
            objective.align_to(parent_id)
        return self.save_written(objective)

    def get_objective(self, objective_id: UUID) -> Objective:
        return self._load(Objective, objective_id)

    def _target_objective(self, objective_id: UUID) -> Objective:
        """An objective another one aligns or contributes to: it exists and is not archived."""
        target = self._existing(Objective, objective_id, "objective")
        if target.status == ObjectiveStatus.archived:
            raise DomainError("an archived objective takes no alignments or contributions")
        return target

    @retry_on_conflict
    def update_objective(
        self,
        objective_id: UUID,
        *,
        title: str | None = None,
        description: str | None = None,
        owner_kind: OwnerKind | None = None,
        owner_id: UUID | None = None,
        expected_version: int | None = None,
    ) -> Written:
        """Change the title, description or owner (left out = kept)."""
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        if owner_kind is not None or owner_id is not None:
            self._check_owner(owner_kind or objective.owner_kind, owner_id or objective.owner_id)
        objective.update(title=title, description=description, owner_kind=owner_kind, owner_id=owner_id)
        return self.save_written(objective)

    @retry_on_conflict
    def activate_objective(self, objective_id: UUID, expected_version: int | None = None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.activate()
        return self.save_written(objective)

    @retry_on_conflict
    def close_objective(self, objective_id: UUID, expected_version: int | None = None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.close()
        return self.save_written(objective)

    @retry_on_conflict
    def reopen_objective(self, objective_id: UUID, expected_version: int | None = None) -> Written:
        """Only while its cycle is open: a closed cycle's grades are final."""
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        if self.get_cycle(objective.cycle_id).status == CycleStatus.closed:
            raise DomainError("the objective's cycle is closed; regrade the objective instead of reopening it")
        objective.reopen()
        return self.save_written(objective)

    @retry_on_conflict
    def archive_objective(self, objective_id: UUID, expected_version: int | None = None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.archive()
        return self.save_written(objective)

    @retry_on_conflict
    def regrade_objective(
        self, objective_id: UUID, *, final_score: float, reason: str, expected_version: int | None = None
    ) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.regrade(final_score, reason)
        return self.save_written(objective)

    @retry_on_conflict
    def align_objective(self, objective_id: UUID, parent_id: UUID | None, expected_version: int | None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        if parent_id is not None and parent_id != objective_id:
            self._target_objective(parent_id)
            self._refuse_alignment_cycle(objective_id, parent_id, "this alignment would form a cycle")
        objective.align_to(parent_id)
        return self.save_written(objective)

    @retry_on_conflict
    def add_contribution(
        self, objective_id: UUID, to_objective_id: UUID, weight: float = 1.0, expected_version: int | None = None
    ) -> Written:
        """Contribute to another objective with a weight (again: a new weight)."""
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        if to_objective_id != objective_id:
            self._target_objective(to_objective_id)
            self._refuse_alignment_cycle(objective_id, to_objective_id,
                                         "this contribution would form a cycle in the alignment graph")
        objective.add_contribution(to_objective_id, weight)
        return self.save_written(objective)

    @retry_on_conflict
    def remove_contribution(
        self, objective_id: UUID, to_objective_id: UUID, expected_version: int | None = None
    ) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.remove_contribution(to_objective_id)
        return self.save_written(objective)

    def _refuse_alignment_cycle(self, objective_id: UUID, target_id: UUID, message: str) -> None:
        """A new edge objective -> target closes a loop if the objective can be reached from the
        target along parent and contribution edges (together they form one graph)."""
        seen: set[UUID] = set()
        stack = [target_id]
        while stack:
            current = stack.pop()
            if current == objective_id:
                raise DomainError(message)
            if current in seen:
                continue
            seen.add(current)
            if len(seen) > MAX_ALIGNMENT_NODES:
                raise DomainError(f"alignment graphs are limited to {MAX_ALIGNMENT_NODES} objectives")
            try:
                node = self.get_objective(current)
            except AggregateNotFoundError:
                continue
            if node.parent_id is not None:
                stack.append(node.parent_id)
            stack.extend(node.contributes_to)

    @retry_on_conflict
    def carry_over(
        self,
        objective_id: UUID,
        to_cycle_id: UUID,
        *,
        status: ObjectiveStatus = ObjectiveStatus.active,
        expected_version: int | None = None,
    ) -> list[Written]:
        """Carry a graded objective into a later cycle: a new objective with the same title,
        description, owner and unit (`carried_from` names the original; no alignment, which
        belonged to the old cycle) and a copy of each key result with its kind, baseline,
        targets, milestones, unit, weight and owner (no check-ins). The original records
        `CarriedOver`. Returns the new objective's `Written`, then each new key result's, then
        the original's."""
        original = self.get_objective(objective_id)
        self.check_version(original, expected_version)
        if not original.graded:
            raise DomainError("only a closed, graded objective can be carried over")
        source = self.get_cycle(original.cycle_id)
        target = self._existing(Cycle, to_cycle_id, "cycle")
        if target.status == CycleStatus.closed:
            raise DomainError("the target cycle is closed")
        if target.starts_on <= source.ends_on:
            raise DomainError(
                f"an objective is carried forward: the target cycle must start after {source.ends_on.isoformat()}")
        new = Objective.define(title=original.title, description=original.description,
                               owner_kind=original.owner_kind, owner_id=original.owner_id,
                               unit_id=original.unit_id, cycle_id=to_cycle_id, status=status,
                               carried_from=original.id)
        copies = []
        bindings: dict[UUID, KPIBinding] = {}
        for kr in self.key_results_of(original):
            copy = KeyResult.define(objective_id=new.id, title=kr.title, kind=kr.kind, start=kr.start,
                                    target=kr.target, low=kr.low, high=kr.high,
                                    milestones=[dict(m) for m in kr.milestones], unit=kr.unit,
                                    weight=kr.weight, owner_id=kr.owner_id)
            if kr.kpi_id is not None:  # the copy follows the same KPI
                copy.bind_to_kpi(kr.kpi_id)
                bindings.setdefault(kr.kpi_id, self._kpi_binding(kr.kpi_id)).bind(copy.id)
            new.attach_key_result(copy.id)
            copies.append(copy)
        original.record_carry_over(new.id, to_cycle_id)
        return self.save_together(new, *copies, original, *bindings.values())[:len(copies) + 2]

    def key_results_of(self, objective: Objective) -> list[KeyResult]:
        """The objective's key results, as it lists them."""
        krs = [self.get_key_result(i) for i in objective.key_result_ids]
        return [kr for kr in krs if kr.objective_id == objective.id]

    def objective_score(self, objective_id: UUID) -> float | None:
        return objective_score(self.key_results_of(self.get_objective(objective_id)))

    def lint_objectives(self, objective_ids: Sequence[UUID]) -> list[CoachingWarning]:
        """The coaching warnings for these objectives (say, an owner's or a cycle's), their key
        results and their owners, from the write side."""
        objectives = [self._existing(Objective, i, "objective") for i in dict.fromkeys(objective_ids)]
        key_results = [kr for o in objectives for kr in self.key_results_of(o)]
        left = set()
        for o in objectives:
            if o.owner_kind == OwnerKind.person:
                try:
                    if self.get_person(o.owner_id).has_left:
                        left.add(o.owner_id)
                except AggregateNotFoundError:
                    left.add(o.owner_id)
        return coaching_warnings(objectives, key_results, left)

    # Key results ---------------------------------------------------------------------------

    @retry_on_conflict
    def add_key_result(
        self,
        *,
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
    ) -> Written:
        """A key result and, on its objective, `KeyResultAttached`, in one transaction. The
        `Written` is the key result's."""
        objective = self.get_objective(objective_id)
        if objective.status in ("closed", "archived"):
            raise DomainError(f"key results cannot be added to a {objective.status} objective")
        if owner_id is not None:
            self._present_person(owner_id, "owner")
        kr = KeyResult.define(objective_id=objective_id, title=title, kind=kind, start=start,
                              target=target, low=low, high=high, milestones=milestones,
                              unit=unit, weight=weight, owner_id=owner_id)
        objective.attach_key_result(kr.id)
        return self.save_together(kr, objective)[0]

    def get_key_result(self, key_result_id: UUID) -> KeyResult:
        return self._load(KeyResult, key_result_id)

    def _refuse_if_frozen(self, kr: KeyResult) -> None:
        """A key result moves only while its objective is open and its cycle is not closed."""
        objective = self._load(Objective, kr.objective_id, read_only=True)
        reason = key_result_frozen(objective, self._load(Cycle, objective.cycle_id, read_only=True))
        if reason is not None:
            raise DomainError(reason)

    def _key_result_to_move(self, key_result_id: UUID, expected_version: int | None) -> KeyResult:
        """The key result a check-in or a correction changes (a copy), after its If-Match (412)
        and the frozen check (its objective open, its cycle not closed: 422). When the three are
        cached (the usual case) they are brought up to date with the log in one query
        (`up_to_date_cached`), not three; what the three loads would give, read at one moment.
        Else (one not cached, or the key result moved to another objective since it was
        cached), one by one as `repository.get` does."""
        kr: Any = self._cached(key_result_id)
        objective: Any = self._cached(kr.objective_id) if isinstance(kr, KeyResult) else None
        if isinstance(objective, Objective):
            fresh = self.up_to_date_cached(key_result_id, objective.id, objective.cycle_id,
                                           copy_first=self.repository.deepcopy_from_cache)
            if fresh is not None:
                kr, objective, cycle = fresh
                if (isinstance(kr, KeyResult) and isinstance(objective, Objective) and isinstance(cycle, Cycle)
                        and kr.objective_id == objective.id and objective.cycle_id == cycle.id):
                    self.check_version(kr, expected_version)
                    reason = key_result_frozen(objective, cycle)
                    if reason is not None:
                        raise DomainError(reason)
                    return kr
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        self._refuse_if_frozen(kr)
        return kr

    def _cached(self, aggregate_id: UUID) -> Any:
        """The aggregate cache's instance (maybe behind the log), or None."""
        cache = self.repository.cache
        try:
            return cache.get(aggregate_id) if cache is not None else None
        except KeyError:
            return None

    @retry_on_conflict
    def check_in(
        self,
        key_result_id: UUID,
        *,
        value: float,
        confidence: int | None,
        note: str,
        valid_on: date,
        expected_version: int | None,
    ) -> Written:
        kr = self._key_result_to_move(key_result_id, expected_version)
        kr.check_in(value=value, confidence=confidence, note=note, valid_on=valid_on)
        return self.save_written(kr)

    @retry_on_conflict
    def correct_check_in(
        self,
        key_result_id: UUID,
        *,
        corrects_version: int,
        value: float,
        confidence: int | None | Unchanged = UNCHANGED,
        note: str | Unchanged = UNCHANGED,
        valid_on: date | Unchanged = UNCHANGED,
        expected_version: int | None = None,
    ) -> Written:
        """Correct the check-in recorded at `corrects_version`; both stay in the history. What
        is left `UNCHANGED` keeps the check-in's own confidence, note or date."""
        kr = self._key_result_to_move(key_result_id, expected_version)
        kr.correct_check_in(corrects_version=corrects_version, value=value, confidence=confidence,
                            note=note, valid_on=valid_on)
        return self.save_written(kr)

    @retry_on_conflict
    def revise_key_result(
        self,
        key_result_id: UUID,
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
        expected_version: int | None = None,
    ) -> Written:
        """Change the key result's measure, title, weight or owner; fields left out are kept
        (`UNCHANGED`), so `None` clears an optional one such as the owner."""
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        self._refuse_if_frozen(kr)
        if owner_id is not UNCHANGED and owner_id is not None:
            self._present_person(owner_id, "owner")
        kr.revise(title=title, unit=unit, weight=weight, owner_id=owner_id, start=start, target=target,
                  low=low, high=high, milestones=milestones)
        return self.save_written(kr)

    @retry_on_conflict
    def move_key_result(
        self, key_result_id: UUID, to_objective_id: UUID, expected_version: int | None = None
    ) -> Written:
        """Move a key result to another open objective of the same cycle: the key result, the
        objective it leaves and the one it joins are saved together. The `Written` is the key
        result's."""
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        if to_objective_id == kr.objective_id:
            raise DomainError("the key result already belongs to that objective")
        source = self.get_objective(kr.objective_id)
        target = self._existing(Objective, to_objective_id, "objective")
        if not target.is_open:
            raise DomainError(f"a key result cannot move to a {target.status} objective")
        if target.cycle_id != source.cycle_id:
            raise DomainError("a key result moves only to an objective of the same cycle")
        self._refuse_if_frozen(kr)
        kr.move_to(to_objective_id)
        source.detach_key_result(kr.id)
        target.attach_key_result(kr.id)
        return self.save_together(kr, source, target)[0]

    # Key results that follow KPIs -----------------------------------------------------------

    def get_kpi_binding(self, kpi_id: UUID) -> KPIBinding | None:
        """The key results bound to a KPI, from the event store (None: none ever was)."""
        try:
            return self._load(KPIBinding, KPIBinding.create_id(kpi_id))
        except AggregateNotFoundError:
            return None

    def _kpi_binding(self, kpi_id: UUID) -> KPIBinding:
        return self.get_kpi_binding(kpi_id) or KPIBinding(kpi_id=kpi_id)

    @retry_on_conflict
    def bind_key_result_to_kpi(self, key_result_id: UUID, kpi_id: UUID, expected_version: int | None = None) -> Written:
        """Bind a key result of a numeric kind to a KPI (an id of the metrics service, opaque
        here): from then on each new measurement of the KPI becomes a check-in. The key result
        and the KPI's binding index (and, when it followed another KPI, that one's) are saved in
        one transaction. Binding to the KPI already followed records nothing. The `Written` is
        the key result's."""
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        if kr.kpi_id == kpi_id:
            return self.save_written(kr)
        self._refuse_if_frozen(kr)
        previous = kr.kpi_id
        kr.bind_to_kpi(kpi_id)
        binding = self._kpi_binding(kpi_id)
        binding.bind(kr.id)
        changed: list[MutableOrImmutableAggregate[UUID]] = [kr, binding]
        old = self.get_kpi_binding(previous) if previous is not None else None
        if old is not None:
            old.unbind(kr.id)
            changed.append(old)
        return self.save_together(*changed)[0]

    @retry_on_conflict
    def unbind_key_result_from_kpi(self, key_result_id: UUID, expected_version: int | None = None) -> Written:
        """Stop following the KPI (also once frozen: it only stops what would come). The
        check-ins it brought stay. The `Written` is the key result's."""
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        previous = kr.kpi_id
        kr.unbind_from_kpi()
        changed: list[MutableOrImmutableAggregate[UUID]] = [kr]
        binding = self.get_kpi_binding(previous) if previous is not None else None
        if binding is not None:
            binding.unbind(kr.id)
            changed.append(binding)
        return self.save_together(*changed)[0]

    # Guardrails ----------------------------------------------------------------------------

    @retry_on_conflict
    def add_guardrail(self, objective_id: UUID, kpi_id: UUID, expected_version: int | None = None) -> Written:
        """Name a KPI that must stay healthy while the objective is pursued (again: nothing)."""
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.add_guardrail(kpi_id)
        return self.save_written(objective)

    @retry_on_conflict
    def remove_guardrail(self, objective_id: UUID, kpi_id: UUID, expected_version: int | None = None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        objective.remove_guardrail(kpi_id)
        return self.save_written(objective)

    def forecast_key_result(self, key_result_id: UUID) -> tuple[float | None, float | None]:
        """The projected value and score at the end of the key result's cycle."""
        kr = self.get_key_result(key_result_id)
        cycle = self.get_cycle(self.get_objective(kr.objective_id).cycle_id)
        return kr.forecast(cycle.ends_on)


# The KPI policy ----------------------------------------------------------------------------------

POLICY_ACTOR = "kpi-policy"
CAUSED_BY_METRICS = "metrics:{}"
"""A check-in the policy appends names the metrics log position that caused it."""


class KPIProgress(EventSourcedProjection[UUID], TandemApplication):
    """The policy by which KPIs drive key results.

    It follows the metrics log as contract events (`services.common.projections.ContractEvent`:
    a type name and the JSON state, no metrics classes). For each `KPIMeasured` it finds the
    key results bound to the KPI in the KPI's `KPIBinding` (in the event store, so never behind
    the bindings committed before it looks) and appends to each one that takes check-ins a
    `KeyResultProgressed` naming the measurement (value, the day of `measured_at` in UTC, no
    confidence); for each `KPIMeasurementCorrected` it corrects the check-in that carries the
    measurement. A key result whose objective is closed or archived, or whose cycle is closed, or
    that has been unbound since, is skipped (the event is still tracked).

    Its recorder is the library's process recorder for the name "Goals": the events go into the
    goals log (`goals.goals_events`, which the `Goals` application writes too; aggregate versions
    keep the two apart, and a lost race is run again) and the tracking position into
    `goals.goals_tracking`, in the same transaction: each measurement moves each bound key result
    exactly once, across restarts of either service.
    """

    name = "Goals"
    snapshotting_intervals: ClassVar[dict[type[Aggregate], int]] = {KeyResult: SNAPSHOT_EVERY}

    def register_snapshot_transcodings(self, transcoder: JSONTranscoder) -> None:
        """As `Goals` does: the two write key result snapshots into the same table."""
        super().register_snapshot_transcodings(transcoder)
        register_goals_state(transcoder)

    def __init__(self, env: Any = None) -> None:
        super().__init__(env)
        self._in_hand = threading.Lock()

    def __exit__(self, *exc_info: Any) -> None:
        """The library's runner leaves the projection (closing its connections) before it joins
        the thread that processes events: let the event in hand finish first, so that stopping
        never cuts one off (it would roll back, and be processed again on the next start)."""
        with self._in_hand:
            super().__exit__(*exc_info)

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Handle one metrics event with the metadata every stored event carries: the policy as
        the actor, the measurement's correlation and trace, and the metrics log position as the
        cause."""
        with self._in_hand:
            self._process_in_context(domain_event, tracking)

    def _process_in_context(self, domain_event: Any, tracking: Tracking) -> None:
        meta = getattr(domain_event, "meta", None) or {}
        context = CommandContext(
            actor=POLICY_ACTOR,
            correlation_id=str(meta.get("correlation_id") or new_correlation_id()),
            causation_id=CAUSED_BY_METRICS.format(tracking.notification_id),
            trace_id=meta.get("trace_id"),
        )
        with in_context(context):
            self._process(domain_event, tracking)

    @retry_on_conflict
    def _process(self, domain_event: Any, tracking: Tracking) -> None:
        """The library's processing (policy, then events and tracking in one transaction), run
        again from a fresh load when a key result changed under it (a check-in through the API
        took its next version), as every command is. If the position turns out to be tracked
        already (another runner got there first), there is nothing left to do."""
        try:
            super().process_event(domain_event, tracking)
        except IntegrityError:
            if not self.recorder.has_tracking_id(tracking.application_name, tracking.notification_id):
                raise

    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:  # type: ignore[override]
        if domain_event.type == "KPIMeasured":
            self._measured(domain_event, processing_event)
        elif domain_event.type == "KPIMeasurementCorrected":
            self._measurement_corrected(domain_event, processing_event)

    def _measured(self, e: Any, processing_event: ProcessingEvent[UUID]) -> None:
        measured_at: datetime = e.data["measured_at"]
        for kr in self.followers(e.originator_id):
            with _refused_is_skipped(kr, e):
                if kr.record_measurement(kpi_id=e.originator_id, measurement_id=e.data["measurement_id"],
                                         value=float(e.data["value"]), valid_on=measured_at.astimezone(UTC).date(),
                                         note=KPI_CHECK_IN_NOTE):
                    processing_event.collect_events(kr)

    def _measurement_corrected(self, e: Any, processing_event: ProcessingEvent[UUID]) -> None:
        note = f"{KPI_CHECK_IN_NOTE}, corrected: {e.data.get('reason') or 'no reason given'}"
        for kr in self.followers(e.originator_id):
            with _refused_is_skipped(kr, e):
                if kr.correct_measurement(measurement_id=e.data["measurement_id"], value=float(e.data["value"]),
                                          note=note):
                    processing_event.collect_events(kr)

    def followers(self, kpi_id: UUID) -> list[KeyResult]:
        """The key results bound to the KPI that take check-ins now."""
        try:
            binding = self.repository.get(KPIBinding.create_id(kpi_id))
        except AggregateNotFoundError:
            return []
        out = []
        for key_result_id in binding.key_result_ids:
            kr: KeyResult = self.repository.get(key_result_id)
            if kr.kpi_id != kpi_id:
                continue
            objective: Objective = self.repository.get(kr.objective_id)
            if key_result_frozen(objective, self.repository.get(objective.cycle_id)) is None:
                out.append(kr)
        return out


@contextmanager
def _refused_is_skipped(kr: KeyResult, e: Any) -> Iterator[None]:
    """A key result that refuses a measurement is skipped (and said so), never retried forever:
    one event the domain will not take must not stop the policy."""
    try:
        yield
    except DomainError as error:
        log.warning("key result %s skipped %s of KPI %s: %s", kr.id, e.type, e.originator_id, error)


# Webhook subscriptions -----------------------------------------------------------------------
# Commands over the `Goals` application, kept together with the rest of the webhook code in
# mind (services.goals.webhooks): the subscription and the registry that lists it change in one
# transaction, so the list the worker follows is never behind the log.

def _webhook_registry(goals: Goals) -> WebhookRegistry:
    try:
        return goals.repository.get(WEBHOOK_REGISTRY_ID)
    except AggregateNotFoundError:
        return WebhookRegistry()


def get_webhook(goals: Goals, subscription_id: UUID) -> WebhookSubscription:
    """A subscription that is not removed; AggregateNotFoundError (404) otherwise."""
    subscription = goals._load(WebhookSubscription, subscription_id)
    if subscription.status == WebhookStatus.removed:
        raise AggregateNotFoundError(subscription_id)
    return subscription


def list_webhooks(goals: Goals) -> list[WebhookSubscription]:
    """Every subscription not removed, in the order of registration."""
    return [goals.repository.get(i) for i in _webhook_registry(goals).subscription_ids]


@retry_on_conflict
def register_webhook(goals: Goals, *, url: str, event_types: Sequence[str], description: str = "",
                     start_goals: int, start_metrics: int) -> Written:
    subscription = WebhookSubscription.register(url=url, event_types=event_types, description=description,
                                                start_goals=start_goals, start_metrics=start_metrics)
    registry = _webhook_registry(goals)
    registry.add(subscription.id)
    return goals.save_together(subscription, registry)[0]


@retry_on_conflict
def pause_webhook(goals: Goals, subscription_id: UUID, *, reason: str, failures: int,
                  expected_version: int | None = None) -> Written:
    subscription = get_webhook(goals, subscription_id)
    goals.check_version(subscription, expected_version)
    subscription.pause(reason, failures)
    return goals.save_written(subscription)


@retry_on_conflict
def resume_webhook(goals: Goals, subscription_id: UUID, expected_version: int | None = None) -> Written:
    subscription = get_webhook(goals, subscription_id)
    goals.check_version(subscription, expected_version)
    subscription.resume()
    return goals.save_written(subscription)


@retry_on_conflict
def remove_webhook(goals: Goals, subscription_id: UUID, expected_version: int | None = None) -> Written:
    subscription = get_webhook(goals, subscription_id)
    goals.check_version(subscription, expected_version)
    subscription.remove()
    registry = _webhook_registry(goals)
    registry.remove(subscription.id)
    return goals.save_together(subscription, registry)[0]
