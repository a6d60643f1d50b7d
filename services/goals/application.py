"""Commands and queries of the goals service over the `eventsourcing` application.

Commands are synchronous (the library's PostgreSQL persistence is psycopg 3); the API runs them
in a thread pool. Each returns what the client needs to read its own write: the aggregate's id,
its new version (the ETag) and the log position of the last event stored.
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from services.common.eventstore import TandemApplication, Written, retry_on_conflict
from services.goals.domain import (
    Cycle,
    DomainError,
    KeyResult,
    KeyResultKind,
    Objective,
    OrgUnit,
    OwnerKind,
    UnitKind,
)

MAX_ALIGNMENT_DEPTH = 64


class Goals(TandemApplication):
    """The goals service's write side. Its log is the table `goals.goals_events`."""

    name = "Goals"

    def _load(self, cls: type, aggregate_id: UUID):  # noqa: ANN202
        """The aggregate a path names; AggregateNotFoundError (404) if it is not one of `cls`."""
        aggregate = self.repository.get(aggregate_id)
        if not isinstance(aggregate, cls):
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def _existing(self, cls: type, aggregate_id: UUID, what: str):  # noqa: ANN202
        """An aggregate a request body refers to; a DomainError (422) if there is none."""
        try:
            return self._load(cls, aggregate_id)
        except AggregateNotFoundError:
            raise DomainError(f"no {what} with id {aggregate_id}") from None

    # Org units -----------------------------------------------------------------------------

    def create_unit(self, *, name: str, kind: UnitKind, parent_id: UUID | None) -> Written:
        if parent_id is not None:
            self._existing(OrgUnit, parent_id, "org unit")
        elif kind is not UnitKind.company:
            raise DomainError("only a company may have no parent unit")
        return self.save_written(OrgUnit(name=name, kind=kind, parent_id=parent_id))

    def get_unit(self, unit_id: UUID) -> OrgUnit:
        return self._load(OrgUnit, unit_id)

    # Cycles --------------------------------------------------------------------------------

    def create_cycle(self, *, name: str, starts_on: date, ends_on: date, activate: bool) -> Written:
        cycle = Cycle(name=name, starts_on=starts_on, ends_on=ends_on)
        if activate:
            cycle.activate()
        return self.save_written(cycle)

    # Objectives ----------------------------------------------------------------------------

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
    ) -> Written:
        self._existing(OrgUnit, unit_id, "org unit")
        cycle = self._existing(Cycle, cycle_id, "cycle")
        if cycle.status == "closed":
            raise DomainError("objectives cannot be added to a closed cycle")
        if owner_kind is OwnerKind.unit:
            self._existing(OrgUnit, owner_id, "org unit")
        objective = Objective(title=title, description=description, owner_kind=owner_kind,
                              owner_id=owner_id, unit_id=unit_id, cycle_id=cycle_id)
        if parent_id is not None:
            self._existing(Objective, parent_id, "objective")
            objective.align_to(parent_id)
        return self.save_written(objective)

    def get_objective(self, objective_id: UUID) -> Objective:
        return self._load(Objective, objective_id)

    @retry_on_conflict
    def align_objective(self, objective_id: UUID, parent_id: UUID | None, expected_version: int | None) -> Written:
        objective = self.get_objective(objective_id)
        self.check_version(objective, expected_version)
        if parent_id is not None:
            self._existing(Objective, parent_id, "objective")
            self._refuse_alignment_cycle(objective_id, parent_id)
        objective.align_to(parent_id)
        return self.save_written(objective)

    def _refuse_alignment_cycle(self, objective_id: UUID, parent_id: UUID) -> None:
        """Walk up from the new parent: meeting the objective itself would close a loop."""
        current: UUID | None = parent_id
        for _ in range(MAX_ALIGNMENT_DEPTH):
            if current is None:
                return
            if current == objective_id:
                raise DomainError("this alignment would form a cycle")
            current = self.get_objective(current).parent_id
        raise DomainError(f"alignment chains are limited to {MAX_ALIGNMENT_DEPTH} levels")

    # Key results ---------------------------------------------------------------------------

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
        objective = self.get_objective(objective_id)
        if objective.status in ("closed", "archived"):
            raise DomainError(f"key results cannot be added to a {objective.status} objective")
        kr = KeyResult.define(objective_id=objective_id, title=title, kind=kind, start=start,
                              target=target, low=low, high=high, milestones=milestones,
                              unit=unit, weight=weight, owner_id=owner_id)
        return self.save_written(kr)

    def get_key_result(self, key_result_id: UUID) -> KeyResult:
        return self._load(KeyResult, key_result_id)

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
        kr = self.get_key_result(key_result_id)
        self.check_version(kr, expected_version)
        kr.check_in(value=value, confidence=confidence, note=note, valid_on=valid_on)
        return self.save_written(kr)
