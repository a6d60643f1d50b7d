"""The metrics read model: tables in the `metrics` schema that the REST reads query.

Written only by `MetricsProjection`, one event per transaction together with its tracking
position; dropped and replayed it gives the same rows.

Each KPI row keeps its rules as JSON with, per rule, `consecutive` (violating measurements in a
row, counted from `KPIMeasured` with the domain's own rule check) and `state`. Whether a rule is
breached comes from the log (`KPIThresholdBreached` / `KPIRecovered`), never re-decided here;
`pending` (violated, not yet fired) is not an event at all and is derived from the count.
"""

from __future__ import annotations

import json
from typing import Any

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.projections import ProjectionSpec, ReadModel, Statement
from services.metrics.application import Metrics
from services.metrics.domain import KPI, RuleState, ThresholdRule, kpi_state, next_consecutive, rule_state


class MetricsReadModel(ReadModel):
    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.kpis (
            id uuid PRIMARY KEY, name text NOT NULL, description text NOT NULL, unit text NOT NULL,
            owner_id uuid, unit_id uuid, direction text NOT NULL, cadence text NOT NULL,
            target double precision, state text NOT NULL, latest_value double precision,
            latest_measured_at timestamptz, rules jsonb NOT NULL, measurement_count integer NOT NULL,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS kpis_created ON {schema}.kpis (created_at, id)",
        "CREATE INDEX IF NOT EXISTS kpis_unit ON {schema}.kpis (unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.measurements (
            kpi_id uuid NOT NULL, version bigint NOT NULL, measurement_id uuid NOT NULL UNIQUE,
            value double precision NOT NULL, measured_at timestamptz NOT NULL, source text NOT NULL,
            recorded_at timestamptz NOT NULL, actor text NOT NULL,
            PRIMARY KEY (kpi_id, version))""",
        "CREATE INDEX IF NOT EXISTS measurements_newest ON {schema}.measurements (kpi_id, measured_at DESC)",
    )


def _update_kpi(e: Any, rules: list[dict[str, Any]], has_data: bool, extra_sql: str = "",
                extra_params: tuple[Any, ...] = ()) -> Statement:
    """Write the rules back with the KPI's overall state, version and time of change."""
    state = kpi_state((r["state"] for r in rules), has_data)
    return (
        f"UPDATE {{schema}}.kpis SET rules = %s::jsonb, state = %s, version = %s, updated_at = %s{extra_sql} "
        "WHERE id = %s",
        (json.dumps(rules), state.value, e.originator_version, e.timestamp, *extra_params, e.originator_id),
    )


class MetricsProjection(Projection[MetricsReadModel]):
    name = "metrics_view"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events the read model does not show still move its position."""
        self.view.apply(tracking)

    def _kpi(self, kpi_id: Any) -> dict[str, Any] | None:
        rows = self.view.query("SELECT * FROM {schema}.kpis WHERE id = %s", (kpi_id,))
        return rows[0] if rows else None

    @process_event.register
    def _(self, e: KPI.Defined, tracking: Tracking) -> None:
        rules = [{**r, "state": RuleState.ok.value, "consecutive": 0} for r in e.rules]
        self.view.apply(tracking, [(
            "INSERT INTO {schema}.kpis VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'no_data', NULL, NULL, "
            "%s::jsonb, 0, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            (e.originator_id, e.name, e.description, e.unit, e.owner_id, e.unit_id, e.direction,
             e.cadence, e.target, json.dumps(rules), e.originator_version, e.timestamp, e.timestamp),
        )])

    @process_event.register
    def _(self, e: KPI.Measured, tracking: Tracking) -> None:
        statements: list[Statement] = [(
            "INSERT INTO {schema}.measurements VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (e.originator_id, e.originator_version, e.measurement_id, e.value, e.measured_at, e.source,
             e.timestamp, (getattr(e, "meta", None) or {}).get("actor", "unknown")),
        )]
        kpi = self._kpi(e.originator_id)
        if kpi is not None:
            rules = kpi["rules"]
            latest = kpi["latest_measured_at"]
            is_latest = latest is None or e.measured_at >= latest
            if is_latest:  # an older measurement is history only, as in the domain
                for r in rules:
                    r["consecutive"] = next_consecutive(ThresholdRule.from_dict(r), r["consecutive"], e.value)
                    r["state"] = rule_state(r["state"] == RuleState.breached.value, r["consecutive"]).value
            statements.append(_update_kpi(
                e, rules, True,
                ", latest_value = %s, latest_measured_at = %s, measurement_count = measurement_count + 1",
                (e.value if is_latest else kpi["latest_value"], e.measured_at if is_latest else latest),
            ))
        self.view.apply(tracking, statements)

    @process_event.register
    def _(self, e: KPI.ThresholdBreached, tracking: Tracking) -> None:
        self._set_breached(e, True, tracking)

    @process_event.register
    def _(self, e: KPI.Recovered, tracking: Tracking) -> None:
        self._set_breached(e, False, tracking)

    def _set_breached(self, e: Any, breached: bool, tracking: Tracking) -> None:
        kpi = self._kpi(e.originator_id)
        statements: list[Statement] = []
        if kpi is not None:
            rules = kpi["rules"]
            for r in rules:
                if r["id"] == e.rule_id:
                    r["state"] = rule_state(breached, r["consecutive"]).value
            statements.append(_update_kpi(e, rules, kpi["measurement_count"] > 0))
        self.view.apply(tracking, statements)


METRICS_PROJECTIONS = [
    ProjectionSpec(application_class=Metrics, projection_class=MetricsProjection,
                   view_class=MetricsReadModel, application_schema="metrics", view_schema="metrics"),
]
