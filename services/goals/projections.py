"""The goals read model: tables in the `goals` schema that the REST reads query.

Written only by `GoalsProjection`, one event per transaction together with its tracking
position; dropped and replayed it gives the same rows. Every event of an aggregate sets its
row's `version`, so a read's ETag is the aggregate's version.

History is kept where the domain keeps it: `person_units` and `person_managers` hold every
effective-dated assignment with the days it was in force (`from_on` to `to_on`, both
inclusive; `effective` is false for one that never was, such as an assignment replaced on its
own first day), and `check_ins` holds each check-in and each correction as its own row.
Derived values (a key result's current value, score and forecast) come from the domain's own
functions, so that the read model and the write side always agree.

`objectives.needs_reassignment` flags an open objective whose person owner has left (a SCIM
DELETE, or a recorded last day): recomputed from the rows whenever an owner, a status or a
person's leaving changes, so a replay gives the same flags.

Beside it, following the metrics log (as contract events): the KPI policy (`KPIProgress`, an
event-sourced projection that writes into the goals log) and `kpi_health`, a small read model of
which KPIs are breached or stale, for the guardrails of objectives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any
from uuid import UUID

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.projections import ContractEvent, ProjectionSpec, ReadModel, Statement, followed_log
from services.goals.application import Goals, KPIProgress
from services.goals.domain import (
    CheckIn,
    Cycle,
    KeyResult,
    KPIBinding,
    Measure,
    Objective,
    OrgUnit,
    Person,
    UserName,
    forecast,
    in_valid_order,
)

PROJECTION_NAME = "goals_view"  # the tracking table is `<name>_tracking`
TABLES = ("units", "people", "person_units", "person_managers", "cycles", "objectives", "contributions",
          "objective_guardrails", "key_results", "check_ins")


class GoalsReadModel(ReadModel):
    tables = (
        # external_id and dissolved_on: what SCIM groups need (services.goals.scim).
        """CREATE TABLE IF NOT EXISTS {schema}.units (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            external_id text, dissolved_on date)""",
        "CREATE INDEX IF NOT EXISTS units_parent ON {schema}.units (parent_id)",
        "CREATE INDEX IF NOT EXISTS units_name ON {schema}.units (lower(name))",
        # From user_name on: the SCIM profile (services.goals.scim); `emails` always holds at
        # least the person's `email`.
        """CREATE TABLE IF NOT EXISTS {schema}.people (
            id uuid PRIMARY KEY, name text NOT NULL, email text NOT NULL, unit_id uuid NOT NULL,
            manager_id uuid, joined_on date NOT NULL, left_on date,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            user_name text, external_id text, given_name text, family_name text, formatted_name text,
            emails jsonb NOT NULL DEFAULT '[]', active boolean NOT NULL DEFAULT true)""",
        "CREATE INDEX IF NOT EXISTS people_unit ON {schema}.people (unit_id)",
        "CREATE INDEX IF NOT EXISTS people_manager ON {schema}.people (manager_id)",
        "CREATE INDEX IF NOT EXISTS people_user_name ON {schema}.people (lower(COALESCE(user_name, email)))",
        """CREATE TABLE IF NOT EXISTS {schema}.person_units (
            person_id uuid NOT NULL, version bigint NOT NULL, unit_id uuid NOT NULL,
            from_on date NOT NULL, to_on date, effective boolean NOT NULL,
            PRIMARY KEY (person_id, version))""",
        "CREATE INDEX IF NOT EXISTS person_units_unit ON {schema}.person_units (unit_id, from_on)",
        """CREATE TABLE IF NOT EXISTS {schema}.person_managers (
            person_id uuid NOT NULL, version bigint NOT NULL, manager_id uuid,
            from_on date NOT NULL, to_on date, effective boolean NOT NULL,
            PRIMARY KEY (person_id, version))""",
        """CREATE TABLE IF NOT EXISTS {schema}.cycles (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            starts_on date NOT NULL, ends_on date NOT NULL, status text NOT NULL,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {schema}.objectives (
            id uuid PRIMARY KEY, title text NOT NULL, description text NOT NULL,
            owner_kind text NOT NULL, owner_id uuid NOT NULL, unit_id uuid NOT NULL,
            cycle_id uuid NOT NULL, parent_id uuid, status text NOT NULL,
            graded boolean NOT NULL, final_score double precision, grade_reason text,
            carried_from uuid, carried_to uuid[] NOT NULL,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            needs_reassignment boolean NOT NULL DEFAULT false)""",
        "CREATE INDEX IF NOT EXISTS objectives_cycle_unit ON {schema}.objectives (cycle_id, unit_id)",
        "CREATE INDEX IF NOT EXISTS objectives_owner ON {schema}.objectives (owner_id, cycle_id)",
        "CREATE INDEX IF NOT EXISTS objectives_parent ON {schema}.objectives (parent_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.contributions (
            objective_id uuid NOT NULL, to_objective_id uuid NOT NULL, weight double precision NOT NULL,
            PRIMARY KEY (objective_id, to_objective_id))""",
        "CREATE INDEX IF NOT EXISTS contributions_to ON {schema}.contributions (to_objective_id)",
        # The KPIs an objective names as guardrails (`version`: the objective's, when added).
        """CREATE TABLE IF NOT EXISTS {schema}.objective_guardrails (
            objective_id uuid NOT NULL, kpi_id uuid NOT NULL, version bigint NOT NULL,
            PRIMARY KEY (objective_id, kpi_id))""",
        """CREATE TABLE IF NOT EXISTS {schema}.key_results (
            id uuid PRIMARY KEY, objective_id uuid NOT NULL, title text NOT NULL, kind text NOT NULL,
            start double precision, target double precision, low double precision,
            high double precision, milestones jsonb NOT NULL, unit text NOT NULL,
            weight double precision NOT NULL, owner_id uuid, current double precision,
            current_valid_on date, confidence smallint, score double precision,
            forecast_value double precision, forecast_score double precision,
            check_in_count integer NOT NULL, correction_count integer NOT NULL, kpi_id uuid,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS key_results_objective ON {schema}.key_results (objective_id)",
        "CREATE INDEX IF NOT EXISTS key_results_kpi ON {schema}.key_results (kpi_id)",
        # A check-in (corrects_version null; corrected_by: its latest correction, if any) or a
        # correction of one (corrects_version: the check-in it replaces). measurement_id: the
        # KPI measurement a check-in carries (a correction: that of the check-in it corrects).
        """CREATE TABLE IF NOT EXISTS {schema}.check_ins (
            key_result_id uuid NOT NULL, version bigint NOT NULL, value double precision NOT NULL,
            confidence smallint, note text NOT NULL, valid_on date NOT NULL,
            corrects_version bigint, corrected_by bigint,
            recorded_at timestamptz NOT NULL, actor text NOT NULL, measurement_id uuid,
            PRIMARY KEY (key_result_id, version))""",
    )


def _set(table: str, e: Any, **columns: Any) -> Statement:
    """The UPDATE every event makes to its aggregate's row: its columns, version and time."""
    assignments = "".join(f"{name} = %s, " for name in columns)
    return (f"UPDATE {{schema}}.{table} SET {assignments}version = %s, updated_at = %s WHERE id = %s",
            (*columns.values(), e.originator_version, e.timestamp, e.originator_id))


def _insert(table: str, **columns: Any) -> Statement:
    return (f"INSERT INTO {{schema}}.{table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
            "ON CONFLICT DO NOTHING", tuple(columns.values()))


def _assignment(history: str, column: str, e: Any, value: UUID | None, from_on: date) -> list[Statement]:
    """Record an effective-dated assignment of a person (unit or manager), make the person's
    current one the latest (latest day; for the same day, the later recorded, as the domain
    says), and recompute the days each assignment was in force."""
    return [
        _insert(history, person_id=e.originator_id, version=e.originator_version, **{column: value},
                from_on=from_on, to_on=None, effective=True),
        _set("people", e),
        (f"UPDATE {{schema}}.people SET {column} = (SELECT {column} FROM {{schema}}.{history} "
         "WHERE person_id = %s ORDER BY from_on DESC, version DESC LIMIT 1) WHERE id = %s",
         (e.originator_id, e.originator_id)),
        _spans(history, e.originator_id),
    ]


def _needs_reassignment(where: str, *params: Any) -> Statement:
    """An open objective whose owner is a person who has left needs a new owner: recomputed
    for the objectives `where` selects (over `o`) after every event that changes an objective's
    owner or status, and after a person leaves."""
    return ("UPDATE {schema}.objectives o SET needs_reassignment = (o.owner_kind = 'person' "
            "AND o.status IN ('draft', 'active') AND EXISTS (SELECT 1 FROM {schema}.people p "
            f"WHERE p.id = o.owner_id AND p.left_on IS NOT NULL)) WHERE {where}", params)


def _reassignment_of(e: Any) -> Statement:
    return _needs_reassignment("o.id = %s", e.originator_id)


def _emails(e: Any) -> str:
    return json.dumps(e.emails if e.emails is not None else [{"value": e.email, "type": "work", "primary": True}])


def _spans(history: str, person_id: UUID) -> Statement:
    """Each assignment lasts until the day before the next one starts, and at most until the
    person's last day; one followed by another on its own first day never took effect."""
    return (f"""UPDATE {{schema}}.{history} h SET effective = s.effective,
                   to_on = CASE WHEN s.effective THEN LEAST(s.next_from - 1, s.left_on) END
               FROM (SELECT version, next_from, left_on,
                            (next_from IS NULL OR next_from > from_on)
                            AND (left_on IS NULL OR from_on <= left_on) AS effective
                     FROM (SELECT a.version, a.from_on, p.left_on,
                                  lead(a.from_on) OVER (ORDER BY a.from_on, a.version) AS next_from
                           FROM {{schema}}.{history} a JOIN {{schema}}.people p ON p.id = a.person_id
                           WHERE a.person_id = %s) ordered) s
               WHERE h.person_id = %s AND h.version = s.version""", (person_id, person_id))


class GoalsProjection(Projection[GoalsReadModel]):
    name = PROJECTION_NAME

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events the read model does not show still move its position."""
        self.view.apply(tracking)

    # Org units.

    @process_event.register
    def _(self, e: OrgUnit.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [_insert(
            "units", id=e.originator_id, name=e.name, kind=str(e.kind), parent_id=e.parent_id,
            version=e.originator_version, created_at=e.timestamp, updated_at=e.timestamp,
            external_id=e.external_id, dissolved_on=None)])

    @process_event.register
    def _(self, e: OrgUnit.ExternalIdChanged, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("units", e, external_id=e.external_id)])

    @process_event.register
    def _(self, e: OrgUnit.Dissolved, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("units", e, dissolved_on=e.dissolved_on)])

    @process_event.register
    def _(self, e: OrgUnit.Renamed, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("units", e, name=e.name)])

    @process_event.register
    def _(self, e: OrgUnit.Moved, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("units", e, parent_id=e.parent_id)])

    # People.

    @process_event.register
    def _(self, e: Person.Joined, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            _insert("people", id=e.originator_id, name=e.name, email=e.email, unit_id=e.unit_id,
                    manager_id=e.manager_id, joined_on=e.joined_on, left_on=None,
                    version=e.originator_version, created_at=e.timestamp, updated_at=e.timestamp,
                    user_name=e.user_name, external_id=e.external_id, given_name=e.given_name,
                    family_name=e.family_name, formatted_name=e.formatted_name, emails=_emails(e),
                    active=e.active),
            *_assignment("person_units", "unit_id", e, e.unit_id, e.joined_on),
            *_assignment("person_managers", "manager_id", e, e.manager_id, e.joined_on),
        ])

    @process_event.register
    def _(self, e: Person.MovedUnit, tracking: Tracking) -> None:
        self.view.apply(tracking, _assignment("person_units", "unit_id", e, e.unit_id, e.effective_on))

    @process_event.register
    def _(self, e: Person.ManagerChanged, tracking: Tracking) -> None:
        self.view.apply(tracking, _assignment("person_managers", "manager_id", e, e.manager_id, e.effective_on))

    @process_event.register
    def _(self, e: Person.Left, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("people", e, left_on=e.left_on),
                                   _spans("person_units", e.originator_id),
                                   _spans("person_managers", e.originator_id),
                                   _needs_reassignment("o.owner_id = %s", e.originator_id)])

    @process_event.register
    def _(self, e: Person.Updated, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set(
            "people", e, name=e.name, email=e.email, user_name=e.user_name, external_id=e.external_id,
            given_name=e.given_name, family_name=e.family_name, formatted_name=e.formatted_name,
            emails=json.dumps(e.emails))])

    @process_event.register
    def _(self, e: Person.Deactivated, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("people", e, active=False)])

    @process_event.register
    def _(self, e: Person.Reactivated, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("people", e, active=True)])

    # The user name index: the people's rows say who has which user name.

    @process_event.register
    def _(self, e: UserName.Claimed | UserName.Reclaimed | UserName.Released, tracking: Tracking) -> None:
        self.view.apply(tracking)

    # Cycles.

    @process_event.register
    def _(self, e: Cycle.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [_insert(
            "cycles", id=e.originator_id, name=e.name, kind=str(e.kind), parent_id=e.parent_id,
            starts_on=e.starts_on, ends_on=e.ends_on, status="planning",
            version=e.originator_version, created_at=e.timestamp, updated_at=e.timestamp)])

    @process_event.register
    def _(self, e: Cycle.Activated, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("cycles", e, status="active")])

    @process_event.register
    def _(self, e: Cycle.Closed, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("cycles", e, status="closed")])

    # Objectives.

    @process_event.register
    def _(self, e: Objective.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [_insert(
            "objectives", id=e.originator_id, title=e.title, description=e.description,
            owner_kind=str(e.owner_kind), owner_id=e.owner_id, unit_id=e.unit_id, cycle_id=e.cycle_id,
            parent_id=None, status=str(e.status), graded=False, final_score=None, grade_reason=None,
            carried_from=e.carried_from, carried_to=[], version=e.originator_version,
            created_at=e.timestamp, updated_at=e.timestamp), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.Aligned, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, parent_id=e.parent_id)])

    @process_event.register
    def _(self, e: Objective.ContributionAdded, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            ("INSERT INTO {schema}.contributions VALUES (%s, %s, %s) "
             "ON CONFLICT (objective_id, to_objective_id) DO UPDATE SET weight = EXCLUDED.weight",
             (e.originator_id, e.to_objective_id, e.weight)),
            _set("objectives", e)])

    @process_event.register
    def _(self, e: Objective.ContributionRemoved, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            ("DELETE FROM {schema}.contributions WHERE objective_id = %s AND to_objective_id = %s",
             (e.originator_id, e.to_objective_id)),
            _set("objectives", e)])

    @process_event.register
    def _(self, e: Objective.Updated, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, title=e.title, description=e.description,
                                        owner_kind=str(e.owner_kind), owner_id=e.owner_id), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.KeyResultAttached | Objective.KeyResultDetached, tracking: Tracking) -> None:
        """The key result's own row says which objective it belongs to; the objective's
        version still moves."""
        self.view.apply(tracking, [_set("objectives", e)])

    @process_event.register
    def _(self, e: Objective.Activated | Objective.Reopened, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, status="active"), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.Closed, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, status="closed"), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.Archived, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, status="archived"), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.Graded, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, status="closed", graded=True,
                                        final_score=e.final_score, grade_reason=e.reason), _reassignment_of(e)])

    @process_event.register
    def _(self, e: Objective.Regraded, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("objectives", e, final_score=e.final_score, grade_reason=e.reason)])

    @process_event.register
    def _(self, e: Objective.GuardrailAdded, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            _insert("objective_guardrails", objective_id=e.originator_id, kpi_id=e.kpi_id, version=e.originator_version),
            _set("objectives", e)])

    @process_event.register
    def _(self, e: Objective.GuardrailRemoved, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            ("DELETE FROM {schema}.objective_guardrails WHERE objective_id = %s AND kpi_id = %s",
             (e.originator_id, e.kpi_id)),
            _set("objectives", e)])

    @process_event.register
    def _(self, e: Objective.CarriedOver, tracking: Tracking) -> None:
        self.view.apply(tracking, [
            ("UPDATE {schema}.objectives SET carried_to = array_append(carried_to, %s) WHERE id = %s",
             (e.to_objective_id, e.originator_id)),
            _set("objectives", e)])

    # Key results.

    @process_event.register
    def _(self, e: KeyResult.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [_insert(
            "key_results", id=e.originator_id, objective_id=e.objective_id, title=e.title, kind=str(e.kind),
            start=e.start, target=e.target, low=e.low, high=e.high, milestones=json.dumps(e.milestones),
            unit=e.unit, weight=e.weight, owner_id=e.owner_id, current=None, current_valid_on=None,
            confidence=None, score=None, forecast_value=None, forecast_score=None, check_in_count=0,
            correction_count=0, kpi_id=None, version=e.originator_version, created_at=e.timestamp,
            updated_at=e.timestamp)])

    @process_event.register
    def _(self, e: KeyResult.Progressed, tracking: Tracking) -> None:
        def add(entries: dict[int, CheckIn]) -> None:
            entries[e.originator_version] = CheckIn(e.originator_version, e.valid_on, e.value, e.confidence)

        self.view.apply(tracking, [
            _insert("check_ins", key_result_id=e.originator_id, version=e.originator_version, value=e.value,
                    confidence=e.confidence, note=e.note, valid_on=e.valid_on, corrects_version=None,
                    corrected_by=None, recorded_at=e.timestamp, actor=_actor(e), measurement_id=e.measurement_id),
            *self._key_result_changed(e, add, check_ins=1),
        ])

    @process_event.register
    def _(self, e: KeyResult.CheckInCorrected, tracking: Tracking) -> None:
        def correct(entries: dict[int, CheckIn]) -> None:
            entries[e.corrects_version] = CheckIn(e.corrects_version, e.valid_on, e.value, e.confidence)

        self.view.apply(tracking, [
            _insert("check_ins", key_result_id=e.originator_id, version=e.originator_version, value=e.value,
                    confidence=e.confidence, note=e.note, valid_on=e.valid_on, corrects_version=e.corrects_version,
                    corrected_by=None, recorded_at=e.timestamp, actor=_actor(e)),
            ("UPDATE {schema}.check_ins SET corrected_by = %s WHERE key_result_id = %s AND version = %s",
             (e.originator_version, e.originator_id, e.corrects_version)),
            ("UPDATE {schema}.check_ins c SET measurement_id = o.measurement_id FROM {schema}.check_ins o "
             "WHERE c.key_result_id = %s AND c.version = %s AND o.key_result_id = c.key_result_id "
             "AND o.version = %s", (e.originator_id, e.originator_version, e.corrects_version)),
            *self._key_result_changed(e, correct, corrections=1),
        ])

    @process_event.register
    def _(self, e: KeyResult.Revised, tracking: Tracking) -> None:
        self.view.apply(tracking, self._key_result_changed(
            e, title=e.title, unit=e.unit, weight=e.weight, owner_id=e.owner_id, start=e.start,
            target=e.target, low=e.low, high=e.high, milestones=json.dumps(e.milestones)))

    @process_event.register
    def _(self, e: KeyResult.MovedToObjective, tracking: Tracking) -> None:
        self.view.apply(tracking, self._key_result_changed(e, objective_id=e.objective_id))

    @process_event.register
    def _(self, e: KeyResult.BoundToKPI, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("key_results", e, kpi_id=e.kpi_id)])

    @process_event.register
    def _(self, e: KeyResult.UnboundFromKPI, tracking: Tracking) -> None:
        self.view.apply(tracking, [_set("key_results", e, kpi_id=None)])

    # The KPI binding index: the key results' rows say which KPI each follows.

    @process_event.register
    def _(self, e: KPIBinding.Created | KPIBinding.KeyResultBound | KPIBinding.KeyResultUnbound,
          tracking: Tracking) -> None:
        self.view.apply(tracking)

    def _key_result_changed(
        self, e: Any, change: Callable[[dict[int, CheckIn]], None] | None = None, *,
        check_ins: int = 0, corrections: int = 0, **columns: Any,
    ) -> list[Statement]:
        """The key result's row after the event: its changed columns, and its current value,
        confidence, score and forecast recomputed with the domain's rules from its check-ins as
        they stand after corrections (plus `change`, this event's, not yet written)."""
        rows = self.view.query(
            "SELECT k.*, c.ends_on FROM {schema}.key_results k "
            "LEFT JOIN {schema}.objectives o ON o.id = COALESCE(%s, k.objective_id) "
            "LEFT JOIN {schema}.cycles c ON c.id = o.cycle_id WHERE k.id = %s",
            (columns.get("objective_id"), e.originator_id))
        if not rows:
            return []
        kr = {**rows[0], **columns}
        entries = {r["version"]: CheckIn(r["version"], r["valid_on"], r["value"], r["confidence"])
                   for r in self.view.query(
                       "SELECT o.version, COALESCE(c.valid_on, o.valid_on) AS valid_on, "
                       "COALESCE(c.value, o.value) AS value, "
                       "CASE WHEN c.version IS NULL THEN o.confidence ELSE c.confidence END AS confidence "
                       "FROM {schema}.check_ins o LEFT JOIN {schema}.check_ins c "
                       "ON c.key_result_id = o.key_result_id AND c.version = o.corrected_by "
                       "WHERE o.key_result_id = %s AND o.corrects_version IS NULL", (e.originator_id,))}
        if change is not None:
            change(entries)
        ordered = in_valid_order(entries.values())
        latest = ordered[-1] if ordered else None
        milestones = kr["milestones"] if isinstance(kr["milestones"], list) else json.loads(kr["milestones"])
        measure = Measure(kr["kind"], kr["start"], kr["target"], kr["low"], kr["high"],
                          tuple(float(m["weight"]) for m in milestones))
        projected, projected_score = forecast(measure, ordered, kr["ends_on"]) if kr["ends_on"] else (None, None)
        current = latest.value if latest else None
        return [
            _set("key_results", e, **columns, current=current,
                 current_valid_on=latest.valid_on if latest else None,
                 confidence=latest.confidence if latest else None, score=measure.score(current),
                 forecast_value=projected, forecast_score=projected_score),
            ("UPDATE {schema}.key_results SET check_in_count = check_in_count + %s, "
             "correction_count = correction_count + %s WHERE id = %s", (check_ins, corrections, e.originator_id)),
        ]


def _actor(e: Any) -> str:
    return (getattr(e, "meta", None) or {}).get("actor", "unknown")


def handled_event_types() -> Sequence[type]:
    """The event classes the projection has a handler of its own for (the rest only move its
    position); a test checks that every goals event is among them."""
    registry = GoalsProjection.__dict__["process_event"].dispatcher.registry
    return [t for t in registry if t is not object]


# KPI health ----------------------------------------------------------------------------------

KPI_HEALTH_NAME = "kpi_health"  # the tracking table is `kpi_health_tracking`


class KPIHealthReadModel(ReadModel):
    """Which KPIs of the metrics service are breached (the ids of their rules that fired and
    have not recovered) or stale, with their names: what the guardrails of objectives show."""

    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.kpi_health (
            kpi_id uuid PRIMARY KEY, name text, breached_rules text[] NOT NULL, stale boolean NOT NULL,
            updated_at timestamptz NOT NULL)""",
    )


def _kpi_health(e: ContractEvent, update: str, *params: Any, name: str | None = None,
                breached: Sequence[str] = (), stale: bool = False) -> Statement:
    """Upsert the KPI's row: as given when it is new, else `update` (assignments to `h`)."""
    return ("INSERT INTO {schema}.kpi_health AS h (kpi_id, name, breached_rules, stale, updated_at) "
            f"VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kpi_id) DO UPDATE SET {update}, updated_at = %s",
            (e.originator_id, name, list(breached), stale, e.timestamp, *params, e.timestamp))


KPI_HEALTH_HANDLERS: dict[str, Callable[[ContractEvent], list[Statement]]] = {
    "KPIDefined": lambda e: [_kpi_health(e, "name = %s", e.data["name"], name=e.data["name"])],
    "KPIThresholdBreached": lambda e: [_kpi_health(
        e, "breached_rules = CASE WHEN %s = ANY(h.breached_rules) THEN h.breached_rules "
           "ELSE array_append(h.breached_rules, %s) END",
        e.data["rule_id"], e.data["rule_id"], breached=[e.data["rule_id"]])],
    "KPIRecovered": lambda e: [_kpi_health(e, "breached_rules = array_remove(h.breached_rules, %s)",
                                           e.data["rule_id"])],
    "KPIStale": lambda e: [_kpi_health(e, "stale = true", stale=True)],
    "KPIFreshened": lambda e: [_kpi_health(e, "stale = false")],
}


class KPIHealthProjection(Projection[KPIHealthReadModel]):
    """Follows the metrics log's explicit events (KPIDefined, KPIThresholdBreached, KPIRecovered,
    KPIStale, KPIFreshened); every other event only moves the position."""

    name = KPI_HEALTH_NAME

    def process_event(self, domain_event: ContractEvent, tracking: Tracking) -> None:
        handler = KPI_HEALTH_HANDLERS.get(domain_event.type)
        self.view.apply(tracking, handler(domain_event) if handler else [])


METRICS_LOG = followed_log("Metrics")

GOALS_PROJECTIONS = [
    ProjectionSpec(application_class=Goals, projection_class=GoalsProjection,
                   view_class=GoalsReadModel, application_schema="goals", view_schema="goals"),
    # The KPI policy: metrics measurements -> KeyResultProgressed in the goals log; its tracking
    # rows are in goals.goals_tracking.
    ProjectionSpec(application_class=METRICS_LOG, projection_class=KPIProgress, view_class=None,
                               application_schema="metrics", view_schema="goals"),
    ProjectionSpec(application_class=METRICS_LOG, projection_class=KPIHealthProjection,
                   view_class=KPIHealthReadModel, application_schema="metrics", view_schema="goals"),
]
VIEW_SPEC, POLICY_SPEC, KPI_HEALTH_SPEC = GOALS_PROJECTIONS
