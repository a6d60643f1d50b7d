"""The alignment read model: the org tree with objectives, key results and KPIs, in the
`gateway` schema.

One projection follows two logs (goals and metrics), each through its own runner; both write
the same tables and one tracking table, `gateway.alignment_tracking`, one row per log. Events
arrive as `ContractEvent`s, so nothing here imports the producers' classes. Each batch of
events is one transaction with the last one's tracking position (key results, check-ins, KPIs
and measurements held in memory for the batch: services.common.batching; the goals runner
writes only the first two, the metrics runner the others, so neither holds what the other
writes); dropped and replayed the tables come back the same, whatever the batches.
Scores, KPI states and the target in force are not stored: they are computed at read time
from the facts kept here (`services.gateway.domain`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.batching import Held
from services.common.projections import ContractEvent, ProjectionSpec, ReadModel, Statement, followed_log
from services.gateway.domain import CheckIn, Rule, current_check_in, revise_rules, supersedes
from services.gateway.subscriptions import announcements


class AlignmentReadModel(ReadModel):
    held = (Held("key_results", columns=()),
            Held("check_ins", key=("key_result_id", "version"), group="key_result_id",
                 columns=("valid_on", "value", "confidence", "corrects_version")),
            Held("kpis", columns=("latest_measured_at", "latest_measurement_id")),
            Held("measurements", key=("measurement_id",), blind=True))
    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.units (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS units_parent ON {schema}.units (parent_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.people (
            id uuid PRIMARY KEY, name text NOT NULL, email text NOT NULL, unit_id uuid NOT NULL,
            manager_id uuid, joined_on date, left_on date, created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS people_manager ON {schema}.people (manager_id)",
        "CREATE INDEX IF NOT EXISTS people_unit ON {schema}.people (unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.cycles (
            id uuid PRIMARY KEY, name text NOT NULL, kind text NOT NULL, parent_id uuid,
            starts_on date NOT NULL, ends_on date NOT NULL, status text NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {schema}.objectives (
            id uuid PRIMARY KEY, title text NOT NULL, description text NOT NULL,
            status text NOT NULL, owner_kind text NOT NULL, owner_id uuid NOT NULL,
            unit_id uuid NOT NULL, cycle_id uuid NOT NULL, parent_id uuid,
            final_score double precision, carried_from uuid, created_at timestamptz NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {schema}.contributions (
            objective_id uuid NOT NULL, to_objective_id uuid NOT NULL, weight double precision NOT NULL,
            PRIMARY KEY (objective_id, to_objective_id))""",
        "CREATE INDEX IF NOT EXISTS contributions_to ON {schema}.contributions (to_objective_id)",
        "CREATE INDEX IF NOT EXISTS objectives_unit ON {schema}.objectives (unit_id)",
        "CREATE INDEX IF NOT EXISTS objectives_parent ON {schema}.objectives (parent_id)",
        "CREATE INDEX IF NOT EXISTS objectives_owner ON {schema}.objectives (owner_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.objective_guardrails (
            objective_id uuid NOT NULL, kpi_id uuid NOT NULL, version bigint NOT NULL,
            PRIMARY KEY (objective_id, kpi_id))""",
        """CREATE TABLE IF NOT EXISTS {schema}.key_results (
            id uuid PRIMARY KEY, objective_id uuid NOT NULL, title text NOT NULL,
            kind text NOT NULL, start double precision, target double precision,
            low double precision, high double precision,
            milestone_weights double precision[] NOT NULL, unit text NOT NULL,
            weight double precision NOT NULL, current double precision, current_valid_on date,
            confidence smallint, owner_id uuid, kpi_id uuid, created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS key_results_objective ON {schema}.key_results (objective_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.check_ins (
            key_result_id uuid NOT NULL, version bigint NOT NULL, valid_on date NOT NULL,
            value double precision NOT NULL, confidence smallint, note text NOT NULL,
            corrects_version bigint, recorded_at timestamptz NOT NULL, actor text NOT NULL,
            measurement_id uuid, PRIMARY KEY (key_result_id, version))""",
        """CREATE TABLE IF NOT EXISTS {schema}.kpis (
            id uuid PRIMARY KEY, name text NOT NULL, description text NOT NULL,
            unit text NOT NULL, owner_id uuid, unit_id uuid, direction text NOT NULL,
            cadence text NOT NULL, target double precision, latest_value double precision,
            latest_measured_at timestamptz, latest_measurement_id uuid, stale boolean NOT NULL,
            created_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS kpis_unit ON {schema}.kpis (unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.kpi_rules (
            kpi_id uuid NOT NULL, rule_id text NOT NULL, ordinal integer NOT NULL,
            kind text NOT NULL, threshold double precision, low double precision,
            high double precision, severity text NOT NULL, pending_count integer NOT NULL,
            pending_for integer NOT NULL, recovery double precision, breached boolean NOT NULL,
            PRIMARY KEY (kpi_id, rule_id))""",
        """CREATE TABLE IF NOT EXISTS {schema}.kpi_targets (
            kpi_id uuid NOT NULL, version bigint NOT NULL, target double precision NOT NULL,
            effective_from date NOT NULL, reason text NOT NULL, recorded_at timestamptz NOT NULL,
            PRIMARY KEY (kpi_id, version))""",
        """CREATE TABLE IF NOT EXISTS {schema}.measurements (
            measurement_id uuid PRIMARY KEY, kpi_id uuid NOT NULL, version bigint NOT NULL,
            measured_at timestamptz NOT NULL, value double precision NOT NULL, source text NOT NULL,
            recorded_at timestamptz NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS measurements_kpi ON {schema}.measurements (kpi_id, measured_at)",
    )


RULE_COLUMNS = ("rule_id AS id, kind, severity, threshold, low, high, pending_count, pending_for, recovery, "
                "breached")
"""A kpi_rules row as `Rule.from_contract` reads it."""

Handler = Callable[["AlignmentProjection", ContractEvent, dict[str, Any]], list[Statement]]


class AlignmentProjection(Projection[AlignmentReadModel]):
    """Dispatches on the contract's event type name; any other type just moves the position."""

    name = "alignment"

    def process_event(self, domain_event: ContractEvent, tracking: Tracking) -> None:
        handler = HANDLERS.get(domain_event.type)
        statements = handler(self, domain_event, domain_event.data) if handler else []
        self.view.apply(tracking, [*statements, *(announcements(domain_event) if self.view.announces else [])])

    def prefetch(self, events: Sequence[ContractEvent]) -> None:
        """Load the key results, check-ins and KPIs a batch's events touch: one statement each
        (services.common.batching)."""
        self.view.rows("key_results").load(e.originator_id for e in events if e.type in KEY_RESULT_ROW_EVENTS)
        self.view.rows("check_ins").load_groups(e.originator_id for e in events if e.type in CHECK_IN_EVENTS)
        self.view.rows("kpis").load(e.originator_id for e in events if e.type in KPI_ROW_EVENTS)

    # goals ---------------------------------------------------------------------------------

    def unit_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.units VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["name"], str(d["kind"]), d.get("parent_id"), e.timestamp))]

    def unit_renamed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.units SET name = %s WHERE id = %s", (d["name"], e.originator_id))]

    def unit_moved(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.units SET parent_id = %s WHERE id = %s",
                 (d.get("parent_id"), e.originator_id))]

    def person_joined(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.people (id, name, email, unit_id, manager_id, joined_on, left_on, created_at) "
                 "VALUES (%s, %s, %s, %s, %s, %s, NULL, %s) ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["name"], d.get("email", ""), d["unit_id"], d.get("manager_id"),
                  d.get("joined_on"), e.timestamp))]

    def person_moved(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.people SET unit_id = %s WHERE id = %s", (d["unit_id"], e.originator_id))]

    def person_manager_changed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.people SET manager_id = %s WHERE id = %s", (d.get("manager_id"), e.originator_id))]

    def person_updated(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """A profile change (over SCIM): the name and email the graph shows."""
        return [("UPDATE {schema}.people SET name = %s, email = %s WHERE id = %s",
                 (d["name"], d["email"], e.originator_id))]

    def person_left(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.people SET left_on = %s WHERE id = %s", (d["left_on"], e.originator_id))]

    def cycle_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.cycles VALUES (%s, %s, %s, %s, %s, %s, 'planning') ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["name"], str(d.get("kind") or "quarter"), d.get("parent_id"),
                  d["starts_on"], d["ends_on"]))]

    def objective_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.objectives VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL, %s, %s) "
                 "ON CONFLICT (id) DO NOTHING",
                 (e.originator_id, d["title"], d.get("description", ""), str(d.get("status") or "active"),
                  str(d["owner_kind"]), d["owner_id"], d["unit_id"], d["cycle_id"], d.get("carried_from"),
                  e.timestamp))]

    def objective_updated(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.objectives SET title = %s, description = %s, owner_kind = %s, owner_id = %s "
                 "WHERE id = %s", (d["title"], d["description"], str(d["owner_kind"]), d["owner_id"],
                                   e.originator_id))]

    def objective_graded(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        status = ", status = 'closed'" if e.type == "ObjectiveGraded" else ""
        return [("UPDATE {schema}.objectives SET final_score = %s" + status + " WHERE id = %s",
                 (d.get("final_score"), e.originator_id))]

    def objective_aligned(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("UPDATE {schema}.objectives SET parent_id = %s WHERE id = %s",
                 (d.get("parent_id"), e.originator_id))]

    def contribution_added(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.contributions VALUES (%s, %s, %s) ON CONFLICT (objective_id, to_objective_id) "
                 "DO UPDATE SET weight = EXCLUDED.weight", (e.originator_id, d["to_objective_id"], d["weight"]))]

    def contribution_removed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("DELETE FROM {schema}.contributions WHERE objective_id = %s AND to_objective_id = %s",
                 (e.originator_id, d["to_objective_id"]))]

    # Key results and their check-ins are held in memory for a batch (services.common.batching).

    def key_result_created(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        self.view.rows("key_results").insert(
            id=e.originator_id, objective_id=d["objective_id"], title=d["title"], kind=str(d["kind"]),
            start=d.get("start"), target=d.get("target"), low=d.get("low"), high=d.get("high"),
            milestone_weights=[float(m["weight"]) for m in d.get("milestones") or []], unit=d.get("unit", ""),
            weight=d.get("weight", 1.0), current=None, current_valid_on=None, confidence=None,
            owner_id=d.get("owner_id"), kpi_id=None, created_at=e.timestamp)
        return []

    def key_result_revised(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        self.view.rows("key_results").update(
            e.originator_id, title=d["title"], unit=d.get("unit", ""), weight=d["weight"], start=d.get("start"),
            target=d.get("target"), low=d.get("low"), high=d.get("high"),
            milestone_weights=[float(m["weight"]) for m in d.get("milestones") or []], owner_id=d.get("owner_id"))
        return []

    def key_result_moved(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        self.view.rows("key_results").update(e.originator_id, objective_id=d["objective_id"])
        return []

    def key_result_checked_in(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """A check-in or a correction of one: kept as history; the current value is the one
        `current_check_in` picks from all of them, once per batch (`_current`)."""
        self.view.rows("check_ins").insert(
            key_result_id=e.originator_id, version=e.version, valid_on=d["valid_on"], value=d["value"],
            confidence=d.get("confidence"), note=d.get("note", ""), corrects_version=d.get("corrects_version"),
            recorded_at=e.timestamp, actor=e.meta.get("actor", "unknown"), measurement_id=d.get("measurement_id"))
        if self.view.rows("key_results").get(e.originator_id) is not None:
            self.view.later(self._current)[e.originator_id] = None
        return []

    def _current(self, checked_in: dict[UUID, None]) -> None:
        key_results, check_ins = self.view.rows("key_results"), self.view.rows("check_ins")
        for kr_id in checked_in:
            current = current_check_in(CheckIn(r["version"], r["valid_on"], r["value"], r["confidence"],
                                               r["corrects_version"]) for r in check_ins.group(kr_id))
            assert current is not None
            key_results.update(kr_id, current=current.value, current_valid_on=current.valid_on,
                               confidence=current.confidence)

    def key_result_bound(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """KeyResultBoundToKPI names the KPI; KeyResultUnboundFromKPI clears it."""
        self.view.rows("key_results").update(e.originator_id, kpi_id=d.get("kpi_id"))
        return []

    def guardrail_added(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.objective_guardrails (objective_id, kpi_id, version) VALUES (%s, %s, %s) "
                 "ON CONFLICT DO NOTHING", (e.originator_id, d["kpi_id"], e.version))]

    def guardrail_removed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("DELETE FROM {schema}.objective_guardrails WHERE objective_id = %s AND kpi_id = %s",
                 (e.originator_id, d["kpi_id"]))]

    # metrics -------------------------------------------------------------------------------
    #
    # Facts only: each rule's breach as the log announces it, the latest measurement (by valid
    # time), staleness and the target history. States and the target in force are worked out
    # at read time (`services.gateway.domain`), the target because it depends on the day.

    def kpi_defined(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        self.view.rows("kpis").insert(
            id=e.originator_id, name=d["name"], description=d.get("description", ""), unit=d.get("unit", ""),
            owner_id=d.get("owner_id"), unit_id=d.get("unit_id"), direction=str(d["direction"]),
            cadence=str(d["cadence"]), target=d.get("target"), latest_value=None, latest_measured_at=None,
            latest_measurement_id=None, stale=False, created_at=e.timestamp)
        rules = [Rule.from_contract(r, n) for n, r in enumerate(d.get("rules") or [], start=1)]
        return self._insert_rules(e, rules)

    def kpi_rules_revised(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        current = [Rule.from_contract(r, breached=r["breached"]) for r in self.view.query(
            f"SELECT {RULE_COLUMNS} FROM {{schema}}.kpi_rules WHERE kpi_id = %s", (e.originator_id,))]
        return [("DELETE FROM {schema}.kpi_rules WHERE kpi_id = %s", (e.originator_id,)),
                *self._insert_rules(e, revise_rules(current, d.get("rules") or []))]

    def _insert_rules(self, e: ContractEvent, rules: list[Rule]) -> list[Statement]:
        return [("INSERT INTO {schema}.kpi_rules (kpi_id, rule_id, ordinal, kind, threshold, low, high, severity, "
                 "pending_count, pending_for, recovery, breached) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                 (e.originator_id, r.id, i, r.kind, r.threshold, r.low, r.high, r.severity, r.pending_count,
                  r.pending_for, r.recovery, r.breached))
                for i, r in enumerate(rules)]

    def kpi_measured(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """Every measurement goes into the series; only one that supersedes the latest (by valid
        time) changes the KPI's latest value: a late one is history."""
        self.view.rows("measurements").insert(
            measurement_id=d["measurement_id"], kpi_id=e.originator_id, version=e.version,
            measured_at=d["measured_at"], value=d["value"], source=d.get("source", ""), recorded_at=e.timestamp)
        kpi = self.view.rows("kpis").get(e.originator_id)
        if kpi is not None and supersedes(kpi["latest_measured_at"], d["measured_at"]):
            self.view.rows("kpis").update(e.originator_id, latest_value=d["value"], latest_measured_at=d["measured_at"],
                                          latest_measurement_id=d["measurement_id"])
        return []

    def kpi_measurement_corrected(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """Only a correction of the latest measurement changes the latest value. The latest is
        named by its id: of two measurements at the same valid time (two sources), only the one
        that is the latest counts."""
        kpi = self.view.rows("kpis").get(e.originator_id)
        latest = kpi and kpi["latest_measurement_id"]
        if latest is not None and _uuid(latest) == _uuid(d["measurement_id"]):
            self.view.rows("kpis").update(e.originator_id, latest_value=d["value"])
        return [("UPDATE {schema}.measurements SET value = %s WHERE measurement_id = %s",
                 (d["value"], d["measurement_id"]))]

    def kpi_breached(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return self._set_breached(e, str(d["rule_id"]), True)

    def kpi_recovered(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return self._set_breached(e, str(d["rule_id"]), False)

    def _set_breached(self, e: ContractEvent, rule_id: str, breached: bool) -> list[Statement]:
        return [("UPDATE {schema}.kpi_rules SET breached = %s WHERE kpi_id = %s AND rule_id = %s",
                 (breached, e.originator_id, rule_id))]

    def kpi_staleness(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        """KPIStale until KPIFreshened."""
        self.view.rows("kpis").update(e.originator_id, stale=e.type == "KPIStale")
        return []

    def kpi_target_changed(self, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [("INSERT INTO {schema}.kpi_targets (kpi_id, version, target, effective_from, reason, recorded_at) "
                 "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                 (e.originator_id, e.version, d["target"], d["effective_from"], d.get("reason", ""), e.timestamp))]


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


KEY_RESULT_ROW_EVENTS = frozenset({"KeyResultCreated", "KeyResultRevised", "KeyResultMovedToObjective",
                               "KeyResultProgressed", "KeyResultCheckInCorrected", "KeyResultBoundToKPI",
                               "KeyResultUnboundFromKPI"})
CHECK_IN_EVENTS = frozenset({"KeyResultProgressed", "KeyResultCheckInCorrected"})
KPI_ROW_EVENTS = frozenset({"KPIDefined", "KPIMeasured", "KPIMeasurementCorrected", "KPIStale", "KPIFreshened"})
"""The events whose handlers change held rows, which `prefetch` loads."""


def set_status(table: str, status: str) -> Handler:
    """A handler for an event whose only news is a new status (CycleClosed, ObjectiveArchived)."""

    def handler(self: AlignmentProjection, e: ContractEvent, d: dict[str, Any]) -> list[Statement]:
        return [(f"UPDATE {{schema}}.{table} SET status = %s WHERE id = %s", (status, e.originator_id))]

    return handler


P = AlignmentProjection
HANDLERS: dict[str, Handler] = {
    "OrgUnitCreated": P.unit_created,
    "OrgUnitRenamed": P.unit_renamed,
    "OrgUnitMoved": P.unit_moved,
    "PersonJoined": P.person_joined,
    "PersonMovedUnit": P.person_moved,
    "PersonManagerChanged": P.person_manager_changed,
    "PersonUpdated": P.person_updated,
    "PersonLeft": P.person_left,
    "CycleCreated": P.cycle_created,
    "CycleActivated": set_status("cycles", "active"),
    "CycleClosed": set_status("cycles", "closed"),
    "ObjectiveCreated": P.objective_created,
    "ObjectiveUpdated": P.objective_updated,
    "ObjectiveActivated": set_status("objectives", "active"),
    "ObjectiveClosed": set_status("objectives", "closed"),
    "ObjectiveReopened": set_status("objectives", "active"),
    "ObjectiveArchived": set_status("objectives", "archived"),
    "ObjectiveGraded": P.objective_graded,
    "ObjectiveRegraded": P.objective_graded,
    "ObjectiveAligned": P.objective_aligned,
    "ObjectiveContributionAdded": P.contribution_added,
    "ObjectiveContributionRemoved": P.contribution_removed,
    "ObjectiveGuardrailAdded": P.guardrail_added,
    "ObjectiveGuardrailRemoved": P.guardrail_removed,
    "KeyResultCreated": P.key_result_created,
    "KeyResultRevised": P.key_result_revised,
    "KeyResultMovedToObjective": P.key_result_moved,
    "KeyResultProgressed": P.key_result_checked_in,
    "KeyResultCheckInCorrected": P.key_result_checked_in,
    "KeyResultBoundToKPI": P.key_result_bound,
    "KeyResultUnboundFromKPI": P.key_result_bound,
    "KPIDefined": P.kpi_defined,
    "KPIMeasured": P.kpi_measured,
    "KPIThresholdBreached": P.kpi_breached,
    "KPIRecovered": P.kpi_recovered,
    "KPIMeasurementCorrected": P.kpi_measurement_corrected,
    "KPIRulesRevised": P.kpi_rules_revised,
    "KPIStale": P.kpi_staleness,
    "KPIFreshened": P.kpi_staleness,
    "KPITargetChanged": P.kpi_target_changed,
}


def alignment_projections(schema: str = "gateway") -> list[ProjectionSpec]:
    """The two runners of the one projection: one per followed log, into the same read model."""
    return [
        ProjectionSpec(application_class=followed_log(log), projection_class=AlignmentProjection,
                       view_class=AlignmentReadModel, application_schema=log_schema, view_schema=schema)
        for log, log_schema in (("Goals", "goals"), ("Metrics", "metrics"))
    ]


ALIGNMENT_PROJECTIONS = alignment_projections()
