"""The metrics read model: tables in the `metrics` schema that the REST reads query.

Written only by `MetricsProjection`, a batch of events per transaction together with the last
one's tracking position (KPIs held in memory for the batch, measurements inserted at its end:
services.common.batching); dropped and replayed it gives the same rows, whatever the batches.

- `kpis`: one row per KPI with its rules as JSON, each with its `state`. Whether a rule is
  breached comes from the log (`KPIThresholdBreached` / `KPIRecovered`), never re-decided here;
  `pending` (violated, not yet fired) is not an event at all: a rule not breached whose latest
  value (by valid time) violates it is pending. Staleness comes from `KPIStale` / `KPIFreshened`.
- `measurements`: one row per measurement with its current value; `measurement_corrections`
  keeps every earlier value with who changed it, when and why.
- `kpi_targets`: every `KPITargetChanged`; the target defined with the KPI is `kpis.target`
  and holds from the start, until the change with the latest `effective_from` on or before a day.

Tables created before a column existed get it from `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`
(with the value every earlier event implies), and inserts name their columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from services.common.batching import Held
from services.common.projections import ProjectionSpec, ReadModel, Statement
from services.metrics.application import Metrics
from services.metrics.domain import KPI, RuleState, ThresholdRule, kpi_state, rule_state


class MetricsReadModel(ReadModel):
    held = (Held("kpis", json=("rules",),
                 columns=("rules", "latest_value", "latest_measured_at", "measurement_count", "stale")),
            Held("measurements", key=("kpi_id", "version"), blind=True))
    tables = (
        """CREATE TABLE IF NOT EXISTS {schema}.kpis (
            id uuid PRIMARY KEY, name text NOT NULL, description text NOT NULL, unit text NOT NULL,
            owner_id uuid, unit_id uuid, direction text NOT NULL, cadence text NOT NULL,
            target double precision, state text NOT NULL, latest_value double precision,
            latest_measured_at timestamptz, rules jsonb NOT NULL, measurement_count integer NOT NULL,
            version bigint NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            stale boolean NOT NULL DEFAULT false, stale_expected_by timestamptz, created_by text)""",
        "ALTER TABLE {schema}.kpis ADD COLUMN IF NOT EXISTS stale boolean NOT NULL DEFAULT false",
        "ALTER TABLE {schema}.kpis ADD COLUMN IF NOT EXISTS stale_expected_by timestamptz",
        "ALTER TABLE {schema}.kpis ADD COLUMN IF NOT EXISTS created_by text",
        "CREATE INDEX IF NOT EXISTS kpis_created ON {schema}.kpis (created_at, id)",
        "CREATE INDEX IF NOT EXISTS kpis_unit ON {schema}.kpis (unit_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.measurements (
            kpi_id uuid NOT NULL, version bigint NOT NULL, measurement_id uuid NOT NULL UNIQUE,
            value double precision NOT NULL, measured_at timestamptz NOT NULL, source text NOT NULL,
            recorded_at timestamptz NOT NULL, actor text NOT NULL,
            PRIMARY KEY (kpi_id, version))""",
        "CREATE INDEX IF NOT EXISTS measurements_newest ON {schema}.measurements (kpi_id, measured_at DESC)",
        """CREATE TABLE IF NOT EXISTS {schema}.measurement_corrections (
            kpi_id uuid NOT NULL, version bigint NOT NULL, measurement_id uuid NOT NULL,
            value double precision NOT NULL, previous_value double precision NOT NULL, reason text NOT NULL,
            recorded_at timestamptz NOT NULL, actor text NOT NULL, PRIMARY KEY (kpi_id, version))""",
        "CREATE INDEX IF NOT EXISTS measurement_corrections_of ON {schema}.measurement_corrections (measurement_id)",
        """CREATE TABLE IF NOT EXISTS {schema}.kpi_targets (
            kpi_id uuid NOT NULL, version bigint NOT NULL, target double precision NOT NULL,
            effective_from date NOT NULL, reason text NOT NULL, recorded_at timestamptz NOT NULL,
            actor text NOT NULL, PRIMARY KEY (kpi_id, version))""",
    )


def _actor(e: Any) -> str:
    return (getattr(e, "meta", None) or {}).get("actor", "unknown")


def rule_states(rules: list[dict[str, Any]], latest_value: float | None) -> list[dict[str, Any]]:
    """Each rule with its state: breached as the log says; otherwise pending if the latest value
    violates it, else ok. (Counts of an older version of this read model are dropped.)"""
    out = []
    for r in rules:
        rule = {k: v for k, v in r.items() if k not in ("state", "consecutive")}
        breached = r.get("state") == RuleState.breached.value
        violates = latest_value is not None and ThresholdRule.from_dict(rule).violated_by(latest_value)
        out.append({**rule, "state": rule_state(breached, violates).value})
    return out


class MetricsProjection(Projection[MetricsReadModel]):
    """The KPIs' rows are held in memory for a batch and measurements inserted in bulk at its
    end (services.common.batching), so a measurement costs no round trip of its own."""

    name = "metrics_view"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events the read model does not show still move its position."""
        self.view.apply(tracking)

    def prefetch(self, events: Sequence[Any]) -> None:
        """Load the KPIs a batch's events touch, with one statement; and for those with a
        corrected measurement, the newest measurement (`_newest`), with another."""
        self.view.rows("kpis").load(e.originator_id for e in events)
        corrected = {e.originator_id for e in events if isinstance(e, KPI.MeasurementCorrected)}
        if corrected:
            newest = self.view.memo("newest")
            for r in self.view.query(
                    "SELECT DISTINCT ON (kpi_id) kpi_id, measured_at, version, measurement_id "
                    "FROM {schema}.measurements WHERE kpi_id = ANY(%s) ORDER BY kpi_id, measured_at DESC, version DESC",
                    (list(corrected),)):
                newest[r["kpi_id"]] = (r["measured_at"], r["version"], r["measurement_id"])
            for kpi_id in corrected:
                newest.setdefault(kpi_id, None)

    def _newest(self, kpi_id: Any) -> Any:
        """The id of the KPI's newest measurement (latest valid time, then latest version): as
        `prefetch` found it and the batch's measurements since moved it, or read now."""
        newest = self.view.memo("newest")
        if kpi_id in newest:
            return newest[kpi_id] and newest[kpi_id][2]
        rows = self.view.query("SELECT measurement_id FROM {schema}.measurements WHERE kpi_id = %s "
                               "ORDER BY measured_at DESC, version DESC LIMIT 1", (kpi_id,))
        return rows[0]["measurement_id"] if rows else None

    def _kpi(self, kpi_id: Any) -> dict[str, Any] | None:
        return self.view.rows("kpis").get(kpi_id)

    def _update_kpi(self, e: Any, rules: list[dict[str, Any]], has_data: bool, is_stale: bool, **columns: Any) -> None:
        """Write the rules back with the KPI's overall state, version and time of change."""
        state = kpi_state((r["state"] for r in rules), has_data, is_stale)
        self.view.rows("kpis").update(e.originator_id, rules=rules, state=state.value, version=e.originator_version,
                                      updated_at=e.timestamp, **columns)

    def _restate(self, e: Any, tracking: Tracking, change: Any = None, statements: Sequence[Statement] = (),
                 stale: bool | None = None, **columns: Any) -> None:
        """Apply the statements and write the KPI's rules and state back after `change(rules)`."""
        kpi = self._kpi(e.originator_id)
        if stale is not None:
            columns["stale"] = stale
        if kpi is not None:
            rules = kpi["rules"]
            if change is not None:
                rules = change(rules)
            rules = rule_states(rules, kpi["latest_value"])
            self._update_kpi(e, rules, kpi["measurement_count"] > 0, kpi["stale"] if stale is None else stale,
                             **columns)
        self.view.apply(tracking, statements)

    @process_event.register
    def _(self, e: KPI.Defined, tracking: Tracking) -> None:
        rules = [{**ThresholdRule.from_dict(r).as_dict(), "state": RuleState.ok.value} for r in e.rules]
        self.view.rows("kpis").insert(
            id=e.originator_id, name=e.name, description=e.description, unit=e.unit, owner_id=e.owner_id,
            unit_id=e.unit_id, direction=e.direction, cadence=e.cadence, target=e.target, state="no_data",
            latest_value=None, latest_measured_at=None, rules=rules, measurement_count=0,
            version=e.originator_version, created_at=e.timestamp, updated_at=e.timestamp, stale=False,
            stale_expected_by=None, created_by=_actor(e))
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KPI.Measured, tracking: Tracking) -> None:
        self.view.rows("measurements").insert(
            kpi_id=e.originator_id, version=e.originator_version, measurement_id=e.measurement_id, value=e.value,
            measured_at=e.measured_at, source=e.source, recorded_at=e.timestamp, actor=_actor(e))
        newest = self.view.memo("newest")
        if e.originator_id in newest and (newest[e.originator_id] is None
                                          or (e.measured_at, e.originator_version) > newest[e.originator_id][:2]):
            newest[e.originator_id] = (e.measured_at, e.originator_version, e.measurement_id)
        kpi = self._kpi(e.originator_id)
        if kpi is not None:
            latest = kpi["latest_measured_at"]
            is_latest = latest is None or e.measured_at >= latest  # later arrival wins a tie, as in the domain
            latest_value = e.value if is_latest else kpi["latest_value"]
            self._update_kpi(e, rule_states(kpi["rules"], latest_value), True, kpi["stale"],
                             latest_value=latest_value, latest_measured_at=e.measured_at if is_latest else latest,
                             measurement_count=kpi["measurement_count"] + 1)
        self.view.apply(tracking)

    @process_event.register
    def _(self, e: KPI.MeasurementCorrected, tracking: Tracking) -> None:
        statements: list[Statement] = [
            ("INSERT INTO {schema}.measurement_corrections (kpi_id, version, measurement_id, value, previous_value, "
             "reason, recorded_at, actor) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
             (e.originator_id, e.originator_version, e.measurement_id, e.value, e.previous_value, e.reason,
              e.timestamp, _actor(e))),
            ("UPDATE {schema}.measurements SET value = %s WHERE measurement_id = %s", (e.value, e.measurement_id)),
        ]
        kpi = self._kpi(e.originator_id)
        if kpi is not None:
            latest_value = e.value if self._newest(e.originator_id) == e.measurement_id else kpi["latest_value"]
            self._update_kpi(e, rule_states(kpi["rules"], latest_value), True, kpi["stale"], latest_value=latest_value)
        self.view.apply(tracking, statements)

    @process_event.register
    def _(self, e: KPI.ThresholdBreached, tracking: Tracking) -> None:
        self._restate(e, tracking, _set_state(e.rule_id, RuleState.breached))

    @process_event.register
    def _(self, e: KPI.Recovered, tracking: Tracking) -> None:
        self._restate(e, tracking, _set_state(e.rule_id, RuleState.ok))

    @process_event.register
    def _(self, e: KPI.Stale, tracking: Tracking) -> None:
        self._restate(e, tracking, stale=True, stale_expected_by=e.expected_by)

    @process_event.register
    def _(self, e: KPI.Freshened, tracking: Tracking) -> None:
        self._restate(e, tracking, stale=False, stale_expected_by=None)

    @process_event.register
    def _(self, e: KPI.TargetChanged, tracking: Tracking) -> None:
        self._restate(e, tracking, statements=[(
            "INSERT INTO {schema}.kpi_targets (kpi_id, version, target, effective_from, reason, recorded_at, actor) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (e.originator_id, e.originator_version, e.target, e.effective_from, e.reason, e.timestamp, _actor(e)))])

    @process_event.register
    def _(self, e: KPI.RulesRevised, tracking: Tracking) -> None:
        def revise(old: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # A rule that stays (by id) keeps its breach; the metrics service recovers a withdrawn
            # breached rule before revising, and announces whatever the new rules imply after.
            breached = {r["id"] for r in old if r.get("state") == RuleState.breached.value}
            return [{**ThresholdRule.from_dict(r).as_dict(),
                     "state": RuleState.breached.value if r["id"] in breached else RuleState.ok.value}
                    for r in e.rules]

        self._restate(e, tracking, revise)


def _set_state(rule_id: str, state: RuleState) -> Any:
    def change(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "state": state.value} if r["id"] == rule_id else r for r in rules]

    return change


METRICS_PROJECTIONS = [
    ProjectionSpec(application_class=Metrics, projection_class=MetricsProjection,
                   view_class=MetricsReadModel, application_schema="metrics", view_schema="metrics"),
]
