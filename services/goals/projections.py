"""The goals read model: tables in the `goals` schema that the REST reads query.

Written only by `GoalsProjection`, a batch of events per transaction together with the last
one's tracking position (key results and check-ins held in memory for the batch:
services.common.batching); dropped and replayed it gives the same rows, whatever the batches. Every event of an aggregate sets its
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

from services.common.batching import Held
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
    held = (Held("key_results", json=("milestones",),
                 columns=("objective_id", "kind", "start", "target", "low", "high", "milestones", "check_in_count",
                          "correction_count")),
            Held("check_ins", key=("key_result_id", "version"), group="key_result_id",
                 columns=("valid_on", "value", "confidence", "corrects_version", "corrected_by", "measurement_id")))
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

    # Key results: held in memory for the batch (their rows and check-ins), so a check-in costs
    # no round trip of its own; the derived columns are worked out once per batch (`_derive`).

    def prefetch(self, events: Sequence[Any]) -> None:
        """Load the key results a batch's events touch, and the check-ins of those checked in:
        one statement each."""
        self.view.rows("key_results").load(e.originator_id for e in events if isinstance(e, KeyResult.Event))
        self.view.rows("check_ins").load_groups(
            e.originator_id for e in events if isinstance(e, KeyResult.Progressed | KeyResult.CheckInCorrected))

    @process_event.register
    def _(self, e: KeyResult.Created, tracking: Tracking) -> None:
        self.view.rows("key_results").insert(
            id=e.originator_id, objective_id=e.objective_id, title=e.title, kind=str(e.kind),
            start=e.start, target=e.target, low=e.low, high=e.high, milestones=e.milestones,
            unit=e.unit, weight=e.weight, owner_id=e.owner_id, current=None, current_valid_on=None,
            confidence=None, score=None, forecast_value=None, forecast_score=None, check_in_count=0,
            correction_count=0, kpi_id=None, version=e.originator_version, created_at=e.timestamp,
            updated_at=e.timestamp)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.Progressed, tracking: Tracking) -> None:
        self.view.rows("check_ins").insert(
            key_result_id=e.originator_id, version=e.originator_version, value=e.value, confidence=e.confidence,
            note=e.note, valid_on=e.valid_on, corrects_version=None, corrected_by=None, recorded_at=e.timestamp,
            actor=_actor(e), measurement_id=e.measurement_id)
        self._key_result_changed(e, CheckIn(e.originator_version, e.valid_on, e.value, e.confidence), check_ins=1)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.CheckInCorrected, tracking: Tracking) -> None:
        """A correction is a row of its own; the check-in it corrects names it (`corrected_by`),
        and it carries that check-in's measurement."""
        check_ins = self.view.rows("check_ins")
        corrected = check_ins.get(e.originator_id, e.corrects_version)
        check_ins.insert(
            key_result_id=e.originator_id, version=e.originator_version, value=e.value, confidence=e.confidence,
            note=e.note, valid_on=e.valid_on, corrects_version=e.corrects_version, corrected_by=None,
            recorded_at=e.timestamp, actor=_actor(e), measurement_id=None)
        check_ins.update(e.originator_id, e.corrects_version, corrected_by=e.originator_version)
        if corrected is not None:
            check_ins.update(e.originator_id, e.originator_version, measurement_id=corrected["measurement_id"])
        self._key_result_changed(e, CheckIn(e.corrects_version, e.valid_on, e.value, e.confidence), corrections=1)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.Revised, tracking: Tracking) -> None:
        self._key_result_changed(e, title=e.title, unit=e.unit, weight=e.weight, owner_id=e.owner_id, start=e.start,
                                 target=e.target, low=e.low, high=e.high, milestones=e.milestones)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.MovedToObjective, tracking: Tracking) -> None:
        self._key_result_changed(e, objective_id=e.objective_id)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.BoundToKPI, tracking: Tracking) -> None:
        self.view.rows("key_results").update(e.originator_id, kpi_id=e.kpi_id, version=e.originator_version,
                                             updated_at=e.timestamp)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KeyResult.UnboundFromKPI, tracking: Tracking) -> None:
        self.view.rows("key_results").update(e.originator_id, kpi_id=None, version=e.originator_version,
                                             updated_at=e.timestamp)
        self.view.apply(tracking)

    # The KPI binding index: the key results' rows say which KPI each follows.

    @process_event.register
    def _(self, e: KPIBinding.Created | KPIBinding.KeyResultBound | KPIBinding.KeyResultUnbound,
          tracking: Tracking) -> None:
        self.view.apply(tracking)

    def _key_result_changed(self, e: Any, change: CheckIn | None = None, *, check_ins: int = 0,
                            corrections: int = 0, **columns: Any) -> None:
        """The key result's row after the event: its changed columns, counts, version and time
        now; its current value, confidence, score and forecast at the end of the batch
        (`_derive`), from its check-ins as they stand after corrections and the last event's
        `change` (the check-in it records or corrects)."""
        key_results = self.view.rows("key_results")
        kr = key_results.get(e.originator_id)
        if kr is None:
            return
        counts = {"check_in_count": kr["check_in_count"] + check_ins} if check_ins else {}
        if corrections:
            counts["correction_count"] = kr["correction_count"] + corrections
        key_results.update(e.originator_id, **columns, **counts, version=e.originator_version, updated_at=e.timestamp)
        self.view.later(self._derive)[e.originator_id] = change

    def _derive(self, changed: dict[UUID, CheckIn | None]) -> None:
        """Each changed key result's derived columns, worked out with the domain's rules (one
        statement for the cycles' ends, whatever the number of key results)."""
        key_results, check_ins = self.view.rows("key_results"), self.view.rows("check_ins")
        rows = {kr_id: kr for kr_id in changed if (kr := key_results.get(kr_id)) is not None}
        ends_on = {r["id"]: r["ends_on"] for r in self.view.query(
            "SELECT o.id, c.ends_on FROM {schema}.objectives o LEFT JOIN {schema}.cycles c ON c.id = o.cycle_id "
            "WHERE o.id = ANY(%s)", (list({kr["objective_id"] for kr in rows.values()}),))}
        for kr_id, kr in rows.items():
            entries = _effective_check_ins(check_ins.group(kr_id))
            if (change := changed[kr_id]) is not None:
                entries[change.version] = change
            ordered = in_valid_order(entries.values())
            latest = ordered[-1] if ordered else None
            milestones = kr["milestones"] if not isinstance(kr["milestones"], str) else json.loads(kr["milestones"])
            measure = Measure(kr["kind"], kr["start"], kr["target"], kr["low"], kr["high"],
                              tuple(float(m["weight"]) for m in milestones))
            ends = ends_on.get(kr["objective_id"])
            projected, projected_score = forecast(measure, ordered, ends) if ends else (None, None)
            current = latest.value if latest else None
            key_results.update(kr_id, current=current, current_valid_on=latest.valid_on if latest else None,
                               confidence=latest.confidence if latest else None, score=measure.score(current),
                               forecast_value=projected, forecast_score=projected_score)


def _effective_check_ins(rows: Sequence[dict[str, Any]]) -> dict[int, CheckIn]:
    """A key result's check-ins (not its corrections), each with its latest correction's valid
    day, value and confidence if it has one."""
    by_version = {r["version"]: r for r in rows}
    entries = {}
    for o in rows:
        if o["corrects_version"] is None:
            c = by_version.get(o["corrected_by"]) if o["corrected_by"] is not None else None
            entries[o["version"]] = (CheckIn(o["version"], c["valid_on"], c["value"], c["confidence"]) if c
                                     else CheckIn(o["version"], o["valid_on"], o["value"], o["confidence"]))
    return entries


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
