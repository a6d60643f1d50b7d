"""The alignment read model: the org tree with objectives, key results and KPIs, in the
`gateway` schema.

One projection follows two logs (goals and metrics), each through its own runner; both write
the same tables and one tracking table, `gateway.alignment_tracking`, one row per log. Events
arrive as `ContractEvent`s, so nothing here imports the producers' classes. Each event is one
transaction with its tracking position; dropped and replayed the tables come back the same.
Scores are not stored: they are computed at read time from the facts kept here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.projections import ContractEvent, ProjectionSpec, ReadModel, Statement, followed_log
from services.gateway.domain import kpi_state, rule_state, violates


class AlignmentReadModel(ReadModel):
    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.units (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS units_parent ON {schema}.units (parent_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.objectives (
            id uuid PRIMARY KEY, title text NOT NULL, description text NOT NULL,
            status text NOT NULL, owner_kind text NOT NULL, owner_id uuid NOT NULL,
            unit_id uuid NOT NULL, cycle_id uuid NOT NULL, parent_id uuid,
            created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS objectives_unit ON {schema}.objectives (unit_id)",
        "CREATE INDEX IF NOT EXISTS objectives_parent ON {schema}.objectives (parent_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.key_results (
            id uuid PRIMARY KEY, objective_id uuid NOT NULL, title text NOT NULL,
            kind text NOT NULL, start double precision, target double precision,
            low double precision, high double precision,
            milestone_weights double precision[] NOT NULL, unit text NOT NULL,
            weight double precision NOT NULL, current double precision, current_valid_on date,
            confidence smallint, created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS key_results_objective ON {schema}.key_results (objective_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.kpis (
            id uuid PRIMARY KEY, name text NOT NULL, description text NOT NULL,
            unit text NOT NULL, owner_id uuid, unit_id uuid, direction text NOT NULL,
            cadence text NOT NULL, target double precision, state text NOT NULL,
            latest_value double precision, latest_measured_at timestamptz,
            created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS kpis_unit ON {schema}.kpis (unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.kpi_rules (
            kpi_id uuid NOT NULL, rule_id text NOT NULL, ordinal integer NOT NULL,
            kind text NOT NULL, threshold double precision, low double precision,
            high double precision, severity text NOT NULL, pending_count integer NOT NULL,
            recovery double precision, violations integer NOT NULL, breached boolean NOT NULL,
            state text NOT NULL, PRIMARY KEY (kpi_id, rule_id))""",
    )


class AlignmentProjection(Projection[AlignmentReadModel]):
    """Dispatches on the contract's event type name; any other type just moves the position."""

    name = "alignment"

    def process_event(self, domain_event: ContractEvent, tracking: Tracking) -> None:
        handler = HANDLERS.get(domain_event.type)
        statements = handler(self, domain_event, domain_event.data) if handler else []
        self.view.apply(tracking, statements)

    # goals ---------------------------------------------------------------------------------

    def unit_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.units VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["name"], str(d["kind"]), d.get("parent_id"), e.timestamp))]

    def unit_renamed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.units SET name = %s WHERE id = %s", (d["name"], e.originator_id))]

    def unit_moved(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.units SET parent_id = %s WHERE id = %s",
                 (d.get("parent_id"), e.originator_id))]

    def objective_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.objectives VALUES (%s, %s, %s, 'active', %s, %s, %s, %s, NULL, %s) "
                 "ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["title"], d.get("description", ""), str(d["owner_kind"]),
                  d["owner_id"], d["unit_id"], d["cycle_id"], e.timestamp))]

    def objective_aligned(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.objectives SET parent_id = %s WHERE id = %s",
                 (d.get("parent_id"), e.originator_id))]

    def key_result_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        weights = [float(m["weight"]) for m in d.get("milestones") or []]
        return [("INSERT INTO {schema}.key_results VALUES "
                 "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL, NULL, %s) ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["objective_id"], d["title"], str(d["kind"]), d.get("start"),
                  d.get("target"), d.get("low"), d.get("high"), weights, d.get("unit", ""),
                  d.get("weight", 1.0), e.timestamp))]

    def key_result_progressed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        # The current value is the check-in with the latest valid_on; an earlier day is history.
        return [("UPDATE {schema}.key_results SET current = %s, current_valid_on = %s, confidence = %s "
                 "WHERE id = %s AND (current_valid_on IS NULL OR current_valid_on <= %s)",
                 (d["value"], d["valid_on"], d.get("confidence"), e.originator_id, d["valid_on"]))]

    # metrics -------------------------------------------------------------------------------

    def kpi_defined(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        statements: list[Statement] = [(
            "INSERT INTO {schema}.kpis VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'no_data', NULL, NULL, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (e.originator_id, d["name"], d.get("description", ""), d.get("unit", ""), d.get("owner_id"),
             d.get("unit_id"), str(d["direction"]), str(d["cadence"]), d.get("target"), e.timestamp))]
        for i, r in enumerate(d.get("rules") or []):
            statements.append((
                "INSERT INTO {schema}.kpi_rules VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, false, 'ok') "
                "ON CONFLICT DO NOTHING",
                (e.originator_id, str(r["id"]), i, str(r["kind"]), r.get("threshold"), r.get("low"),
                 r.get("high"), str(r["severity"]), int(r.get("pending_count") or 0), r.get("recovery"))))
        return statements

    def kpi_measured(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        kpi = self.view.query("SELECT latest_measured_at IS NULL OR latest_measured_at <= %s AS newest "
                              "FROM {schema}.kpis WHERE id = %s", (d["measured_at"], e.originator_id))
        if not kpi or not kpi[0]["newest"]:
            return []  # a late measurement is history; it does not change the state
        statements: list[Statement] = []
        states = []
        for r in self._rules(e):
            violations = r["violations"] + 1 if violates(
                r["kind"], d["value"], r["threshold"], r["low"], r["high"]) else 0
            states.append(rule_state(r["breached"], violations))
            statements.append(("UPDATE {schema}.kpi_rules SET violations = %s, state = %s "
                               "WHERE kpi_id = %s AND rule_id = %s",
                               (violations, states[-1], e.originator_id, r["rule_id"])))
        statements.append(("UPDATE {schema}.kpis SET latest_value = %s, latest_measured_at = %s, state = %s "
                           "WHERE id = %s",
                           (d["value"], d["measured_at"], kpi_state(True, states), e.originator_id)))
        return statements

    def kpi_breached(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return self._set_breached(e, str(d["rule_id"]), True)

    def kpi_recovered(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return self._set_breached(e, str(d["rule_id"]), False)

    def _rules(self, e: ContractEvent) -> list[dict[str, Any]]:
        return self.view.query("SELECT * FROM {schema}.kpi_rules WHERE kpi_id = %s ORDER BY ordinal",
                               (e.originator_id,))

    def _set_breached(self, e: ContractEvent, rule_id: str, breached: bool) -> list[Statement]:
        rules = self._rules(e)
        rule = next((r for r in rules if r["rule_id"] == rule_id), None)
        if rule is None:
            return []
        rule["breached"] = breached
        if not breached:
            rule["violations"] = 0
        states = [rule_state(r["breached"], r["violations"]) for r in rules]
        return [
            ("UPDATE {schema}.kpi_rules SET breached = %s, violations = %s, state = %s "
             "WHERE kpi_id = %s AND rule_id = %s",
             (breached, rule["violations"], rule_state(breached, rule["violations"]), e.originator_id, rule_id)),
            ("UPDATE {schema}.kpis SET state = CASE WHEN latest_measured_at IS NULL THEN 'no_data' ELSE %s END "
             "WHERE id = %s", (kpi_state(True, states), e.originator_id)),
        ]


HANDLERS: dict[str, Callable[[AlignmentProjection, ContractEvent, dict[str, Any]], list[Statement]]] = {
    "OrgUnitCreated": AlignmentProjection.unit_created,
    "OrgUnitRenamed": AlignmentProjection.unit_renamed,
    "OrgUnitMoved": AlignmentProjection.unit_moved,
    "ObjectiveCreated": AlignmentProjection.objective_created,
    "ObjectiveAligned": AlignmentProjection.objective_aligned,
    "KeyResultCreated": AlignmentProjection.key_result_created,
    "KeyResultProgressed": AlignmentProjection.key_result_progressed,
    "KPIDefined": AlignmentProjection.kpi_defined,
    "KPIMeasured": AlignmentProjection.kpi_measured,
    "KPIThresholdBreached": AlignmentProjection.kpi_breached,
    "KPIRecovered": AlignmentProjection.kpi_recovered,
}

def alignment_projections(schema: str = "gateway") -> list[ProjectionSpec]:
    """The two runners of the one projection: one per followed log, into the same read model."""
    return [
        ProjectionSpec(application_class=followed_log(log), projection_class=AlignmentProjection,
                       view_class=AlignmentReadModel, application_schema=log_schema, view_schema=schema)
        for log, log_schema in (("Goals", "goals"), ("Metrics", "metrics"))
    ]


ALIGNMENT_PROJECTIONS = alignment_projections()
