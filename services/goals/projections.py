"""The goals read model: tables in the `goals` schema that the REST reads query.

Written only by `GoalsProjection`, one event per transaction together with its tracking
position; dropped and replayed it gives the same rows.
"""

from __future__ import annotations

import json
from typing import Any

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.projections import ProjectionSpec, ReadModel
from services.goals.application import Goals
from services.goals.domain import Cycle, KeyResult, Measure, Objective, OrgUnit


class GoalsReadModel(ReadModel):
    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.units (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            version bigint NOT NULL, updated_at timestamptz NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {schema}.cycles (
            id uuid PRIMARY KEY, name text NOT NULL, starts_on date NOT NULL, ends_on date NOT NULL,
            status text NOT NULL, version bigint NOT NULL, updated_at timestamptz NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {schema}.objectives (
            id uuid PRIMARY KEY, title text NOT NULL, description text NOT NULL,
            owner_kind text NOT NULL, owner_id uuid NOT NULL, unit_id uuid NOT NULL,
            cycle_id uuid NOT NULL, parent_id uuid, status text NOT NULL,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS objectives_cycle_unit ON {schema}.objectives (cycle_id, unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.key_results (
            id uuid PRIMARY KEY, objective_id uuid NOT NULL, title text NOT NULL, kind text NOT NULL,
            start double precision, target double precision, low double precision,
            high double precision, milestones jsonb NOT NULL, unit text NOT NULL,
            weight double precision NOT NULL, owner_id uuid, current double precision,
            current_valid_on date, confidence smallint, score double precision,
            check_in_count integer NOT NULL, version bigint NOT NULL,
            created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS key_results_objective ON {schema}.key_results (objective_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.check_ins (
            key_result_id uuid NOT NULL, version bigint NOT NULL, value double precision NOT NULL,
            confidence smallint, note text NOT NULL, valid_on date NOT NULL,
            recorded_at timestamptz NOT NULL, actor text NOT NULL,
            PRIMARY KEY (key_result_id, version))""",
    )


class GoalsProjection(Projection[GoalsReadModel]):
    name = "goals_view"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events the read model does not show still move its position."""
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: OrgUnit.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "INSERT INTO {schema}.units VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (e.originator_id, e.name, str(e.kind), e.parent_id, e.originator_version, e.timestamp),
        )])

    @process_event.register
    def _(self, e: OrgUnit.Renamed, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "UPDATE {schema}.units SET name = %s, version = %s, updated_at = %s WHERE id = %s",
            (e.name, e.originator_version, e.timestamp, e.originator_id),
        )])

    @process_event.register
    def _(self, e: OrgUnit.Moved, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "UPDATE {schema}.units SET parent_id = %s, version = %s, updated_at = %s WHERE id = %s",
            (e.parent_id, e.originator_version, e.timestamp, e.originator_id),
        )])

    @process_event.register
    def _(self, e: Cycle.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "INSERT INTO {schema}.cycles VALUES (%s, %s, %s, %s, 'planning', %s, %s) ON CONFLICT (id) DO NOTHING",
            (e.originator_id, e.name, e.starts_on, e.ends_on, e.originator_version, e.timestamp),
        )])

    @process_event.register
    def _(self, e: Cycle.Activated, tracking: Tracking) -> None:
        self._cycle_status(e, "active", tracking)

    @process_event.register
    def _(self, e: Cycle.Closed, tracking: Tracking) -> None:
        self._cycle_status(e, "closed", tracking)

    def _cycle_status(self, e: Any, status: str, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "UPDATE {schema}.cycles SET status = %s, version = %s, updated_at = %s WHERE id = %s",
            (status, e.originator_version, e.timestamp, e.originator_id),
        )])

    @process_event.register
    def _(self, e: Objective.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "INSERT INTO {schema}.objectives VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, NULL, 'active', %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (e.originator_id, e.title, e.description, str(e.owner_kind), e.owner_id, e.unit_id,
             e.cycle_id, e.originator_version, e.timestamp, e.timestamp),
        )])

    @process_event.register
    def _(self, e: Objective.Aligned, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "UPDATE {schema}.objectives SET parent_id = %s, version = %s, updated_at = %s WHERE id = %s",
            (e.parent_id, e.originator_version, e.timestamp, e.originator_id),
        )])

    @process_event.register
    def _(self, e: KeyResult.Created, tracking: Tracking) -> None:
        self.view.apply(tracking, [(
            "INSERT INTO {schema}.key_results VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "NULL, NULL, NULL, NULL, 0, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (e.originator_id, e.objective_id, e.title, str(e.kind), e.start, e.target, e.low, e.high,
             json.dumps(e.milestones), e.unit, e.weight, e.owner_id, e.originator_version,
             e.timestamp, e.timestamp),
        )])

    @process_event.register
    def _(self, e: KeyResult.Progressed, tracking: Tracking) -> None:
        rows = self.view.query("SELECT * FROM {schema}.key_results WHERE id = %s", (e.originator_id,))
        statements = [(
            "INSERT INTO {schema}.check_ins VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (e.originator_id, e.originator_version, e.value, e.confidence, e.note, e.valid_on,
             e.timestamp, (getattr(e, "meta", None) or {}).get("actor", "unknown")),
        )]
        if rows:
            kr = rows[0]
            is_latest = kr["current_valid_on"] is None or e.valid_on >= kr["current_valid_on"]
            current = e.value if is_latest else kr["current"]
            measure = Measure(kr["kind"], kr["start"], kr["target"], kr["low"], kr["high"],
                              tuple(float(m["weight"]) for m in kr["milestones"]))
            statements.append((
                "UPDATE {schema}.key_results SET current = %s, current_valid_on = %s, "
                "confidence = %s, score = %s, check_in_count = check_in_count + 1, version = %s, "
                "updated_at = %s WHERE id = %s",
                (current, e.valid_on if is_latest else kr["current_valid_on"],
                 e.confidence if is_latest else kr["confidence"], measure.score(current),
                 e.originator_version, e.timestamp, e.originator_id),
            ))
        self.view.apply(tracking, statements)


GOALS_PROJECTIONS = [
    ProjectionSpec(application_class=Goals, projection_class=GoalsProjection,
                   view_class=GoalsReadModel, application_schema="goals", view_schema="goals"),
]
