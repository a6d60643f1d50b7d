"""REST API of the metrics service: `/v1/kpis`, their measurements, targets, rules, trends and
forecasts, and the staleness watch that runs beside it.

Writes go through the `Metrics` application (in the thread pool); reads query the read model
with asyncpg. Every error is RFC 9457 problem details (services.common.problems).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from services.common.auth import DATA_READERS, OPERATORS, Principal, require
from services.common.eventstore import CommandContext, Written, new_correlation_id, run_command
from services.common.history import add_history_route
from services.common.idempotency import request_hash
from services.common.problems import Problem, problem_response
from services.common.schemas import (
    ApiModel,
    Cursor,
    IsoDate,
    IsoDateTime,
    Name,
    Number,
    Page,
    WholeNumber,
    WriteResult,
    decode_cursor,
    decode_keyset,
    encode_cursor,
    keyset_next,
)
from services.common.web import (
    PROBLEM_RESPONSES,
    WRITE_RESPONSES,
    IdempotencyKey,
    IfMatch,
    ReadYourWrites,
    TrackedLog,
    create_service_app,
    etag,
    execute_write,
    get_as_of_pool,
    get_pool,
    if_match_version,
)
from services.metrics import domain
from services.metrics.application import Metrics
from services.metrics.domain import (
    CADENCE_PERIOD,
    MAX_PENDING_FOR,
    Cadence,
    Direction,
    DomainError,
    KPIState,
    Period,
    RuleKind,
    RuleState,
    Severity,
    ThresholdRule,
    UnknownMeasurement,
)
from services.metrics.projections import METRICS_PROJECTIONS
from services.metrics.settings import MetricsSettings

log = logging.getLogger(__name__)

LOG = "metrics"
CLOCK_SKEW = timedelta(minutes=5)
MAX_BULK = 10_000
MAX_HORIZON_DAYS = 3650
# Dates and times the service takes: wide enough for any KPI, narrow enough that period and
# horizon arithmetic never leaves the calendar.
EARLIEST = date(1900, 1, 1)
LATEST = date(2999, 12, 31)
Reader = Annotated[Principal, Depends(require(*DATA_READERS))]
Writer = Annotated[Principal, Depends(require(*OPERATORS))]
"""KPIs, rules, targets and measurements: admin and service (a member writes goals only)."""
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
AsOfPool = Annotated[asyncpg.Pool, Depends(get_as_of_pool)]
"""The live read model, or with `as_of`/`known_at` the one of that instant."""


# Request and response bodies --------------------------------------------------------------

class RuleIn(ApiModel):
    id: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$",
                           description="Names the rule across revisions; `rule-<n>` by position if left out.")
    kind: RuleKind
    threshold: Number | None = Field(None, description="The bound of a below or above rule.")
    low: Number | None = Field(None, description="The lower bound of an outside rule.")
    high: Number | None = Field(None, description="The upper bound of an outside rule.")
    severity: Severity
    pending_count: WholeNumber = Field(1, ge=1, le=1000,
                                       description="Consecutive violating measurements before the rule fires.")
    pending_for: WholeNumber = Field(0, ge=0, le=MAX_PENDING_FOR,
                                     description="Seconds of valid time the violating measurements must span "
                                                 "(first to latest) before the rule fires, as Prometheus' `for:`.")
    recovery: Number | None = Field(None, description="The bound a breached below/above rule's value "
                                    "must cross back over before it clears; the threshold if left out.")


class KPIIn(ApiModel):
    name: Name
    description: str = Field("", max_length=5000)
    unit: str = Field(max_length=50)
    owner_id: UUID | None = None
    unit_id: UUID | None = Field(None, description="The org unit (in goals) the KPI belongs to.")
    direction: Direction
    cadence: Cadence
    target: Number | None = None
    rules: list[RuleIn] = Field(max_length=20)


class RulesIn(ApiModel):
    rules: list[RuleIn] = Field(max_length=20)
    reason: str = Field("", max_length=1000)


class TargetIn(ApiModel):
    target: Number
    effective_from: IsoDate | None = Field(None, description="The day the target applies from; today if left out.")
    reason: str = Field("", max_length=1000)

    @model_validator(mode="after")
    def _in_range(self) -> TargetIn:
        if self.effective_from is not None and not EARLIEST <= self.effective_from <= LATEST:
            raise ValueError(f"effectiveFrom must be from {EARLIEST} to {LATEST}")
        return self


def _check_measured_at(measured_at: datetime | None) -> None:
    if measured_at is None:
        return
    if measured_at.year < EARLIEST.year:
        raise ValueError(f"measuredAt must be after {EARLIEST}")
    if measured_at > datetime.now(UTC) + CLOCK_SKEW:
        raise ValueError("measuredAt cannot be in the future")


class MeasurementIn(ApiModel):
    value: Number
    measured_at: IsoDateTime | None = Field(None, description="When the value applies; now if left out.")
    source: str = Field("api", min_length=1, max_length=100)

    @model_validator(mode="after")
    def _not_in_future(self) -> MeasurementIn:
        _check_measured_at(self.measured_at)
        return self


class BulkMeasurementIn(ApiModel):
    value: Number
    measured_at: IsoDateTime = Field(description="When the value applies.")
    source: str = Field("api", min_length=1, max_length=100)

    @model_validator(mode="after")
    def _not_in_future(self) -> BulkMeasurementIn:
        _check_measured_at(self.measured_at)
        return self


class BulkIn(ApiModel):
    measurements: list[BulkMeasurementIn] = Field(min_length=1, max_length=MAX_BULK)


class CorrectionIn(ApiModel):
    value: Number
    reason: str = Field(min_length=1, max_length=1000, pattern=r"\S")


class RuleOut(ApiModel):
    id: str
    kind: RuleKind
    threshold: float | None
    low: float | None
    high: float | None
    severity: Severity
    pending_count: int
    pending_for: int
    recovery: float | None
    state: RuleState


class TargetOut(ApiModel):
    target: float | None
    effective_from: date | None = Field(description="The day it applies from; null: from the start.")
    reason: str
    recorded_at: datetime
    actor: str | None


class KPIOut(ApiModel):
    id: UUID
    name: str
    description: str
    unit: str
    owner_id: UUID | None
    unit_id: UUID | None
    direction: Direction
    cadence: Cadence
    target: float | None = Field(description="The target in force today.")
    target_history: list[TargetOut] = Field(description="The defined target and every change, as recorded.")
    state: KPIState
    stale: bool
    stale_since: datetime | None = Field(description="When the overdue measurement was due.")
    latest_value: float | None
    latest_measured_at: datetime | None
    measurement_count: int
    rules: list[RuleOut]
    version: int


class CorrectionOut(ApiModel):
    value: float
    previous_value: float
    reason: str
    recorded_at: datetime
    actor: str
    version: int


class MeasurementOut(ApiModel):
    id: UUID
    value: float = Field(description="The current value (after any corrections).")
    measured_at: datetime
    source: str
    recorded_at: datetime
    actor: str
    version: int = Field(description="The KPI's version after this measurement.")
    corrections: list[CorrectionOut] = Field(description="Every correction, oldest first: the earlier values.")


class TrendItem(ApiModel):
    period_start: date
    count: int
    min: float
    max: float
    avg: float
    last: float = Field(description="The value of the period's latest measurement (by valid time).")
    change: float | None = Field(description="avg minus the previous period's avg (null if it had no data).")
    change_percent: float | None = Field(description="change as a percentage of the previous avg's magnitude.")


class TrendOut(ApiModel):
    kpi_id: UUID
    period: Period
    items: list[TrendItem]


class PredictedBreachOut(ApiModel):
    rule_id: str
    kind: RuleKind
    severity: Severity
    threshold: float | None
    low: float | None
    high: float | None
    at: datetime = Field(description="When the trend line crosses the threshold (asOf if it already has).")
    date: date
    in_days: float


class ForecastOut(ApiModel):
    kpi_id: UUID
    as_of: datetime
    horizon_at: datetime
    count: int = Field(description="Measurements the line is fitted to.")
    slope_per_day: float | None = Field(description="Null with fewer than two measurement times.")
    intercept: float | None = Field(description="The line's value at asOf.")
    projected_value: float | None = Field(description="The line's value at horizonAt.")
    predicted_breach: PredictedBreachOut | None = Field(
        description="The first rule the trend line violates before horizonAt, if any.")


# Row mapping ------------------------------------------------------------------------------

KPI_SELECT = """
    SELECT k.*, COALESCE((
        SELECT t.target FROM kpi_targets t
        WHERE t.kpi_id = k.id AND t.effective_from <= (COALESCE(
            NULLIF(current_setting('tandem.as_of', true), '')::timestamptz, now()) AT TIME ZONE 'UTC')::date
        ORDER BY t.effective_from DESC, t.version DESC LIMIT 1), k.target) AS current_target
    FROM kpis k"""


def _rule(r: dict[str, Any]) -> RuleOut:
    rule = ThresholdRule.from_dict(r).as_dict()
    return RuleOut(**{k: rule[k] for k in RuleOut.model_fields if k != "state"}, state=r.get("state", "ok"))


async def _kpis(pool: asyncpg.Pool, rows: Sequence[asyncpg.Record]) -> list[KPIOut]:
    targets: dict[UUID, list[TargetOut]] = {r["id"]: [] for r in rows}
    for r in rows:
        if r["target"] is not None:
            targets[r["id"]].append(TargetOut(target=r["target"], effective_from=None, reason="defined",
                                              recorded_at=r["created_at"], actor=r["created_by"]))
    if rows:
        for t in await pool.fetch("SELECT * FROM kpi_targets WHERE kpi_id = ANY($1::uuid[]) ORDER BY version",
                                  [r["id"] for r in rows]):
            targets[t["kpi_id"]].append(TargetOut.from_row(t))
    return [KPIOut.from_row(r, rules=[_rule(x) for x in json.loads(r["rules"])], target=r["current_target"],
                            target_history=targets[r["id"]], stale_since=r["stale_expected_by"])
            for r in rows]


async def _require_kpi(pool: asyncpg.Pool, kpi_id: UUID) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT id, rules FROM kpis WHERE id = $1", kpi_id)
    if row is None:
        raise Problem(404, "Not Found", "No such KPI.", kind="not-found")
    return row


def _day_in_range(name: str, value: date | None) -> None:
    if value is not None and not EARLIEST <= value <= LATEST:
        raise Problem(422, "Invalid request", f"{name} must be from {EARLIEST} to {LATEST}.", kind="validation")


# Routes -----------------------------------------------------------------------------------

def _app(request: Request) -> Metrics:
    return request.app.state.application


@asynccontextmanager
async def staleness_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the service's own lifespan (the pool and the write side are up): gives the
    write side its grace and starts the staleness watch."""
    settings: MetricsSettings = app.state.settings
    application: Metrics = app.state.application
    application.staleness_grace = timedelta(seconds=settings.staleness_grace_seconds)
    watch = StalenessWatch(app.state.pool, application, application.staleness_grace,
                           settings.staleness_check_interval_seconds)
    app.state.staleness_watch = watch
    task = asyncio.create_task(watch.run(), name="staleness-watch") if settings.run_staleness_watch else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES, tags=["kpis"], lifespan=staleness_lifespan)


@router.post("/kpis", status_code=201, responses=WRITE_RESPONSES)
async def define_kpi(body: KPIIn, request: Request, response: Response, principal: Writer,
                     idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Define a KPI with its target and threshold rules; appends `KPIDefined`."""
    return await execute_write(request, response, principal, LOG, _app(request).define_kpi,
                               name=body.name, description=body.description, unit=body.unit,
                               owner_id=body.owner_id, unit_id=body.unit_id, direction=body.direction,
                               cadence=body.cadence, target=body.target,
                               rules=[r.model_dump(by_alias=False) for r in body.rules],
                               location="/v1/kpis/{id}", idempotency_key=idempotency_key)


@router.get("/kpis")
async def list_kpis(
    pool: AsOfPool, _: Reader, __: ReadYourWrites,
    unit: Annotated[UUID | None, Query(description="Only this org unit's KPIs.")] = None,
    owner: Annotated[UUID | None, Query(description="Only KPIs of this owner.")] = None,
    state: Annotated[KPIState | None, Query(description="Only KPIs in this state (breached outranks stale, "
                                                        "stale outranks pending).")] = None,
    stale: Annotated[bool | None, Query(description="Only stale (true) or fresh (false) KPIs.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Cursor = None,
) -> Page[KPIOut]:
    """KPIs with their rules and states, oldest first, a page at a time."""
    created_at, last_id = decode_keyset(after)
    rows = await pool.fetch(
        f"""{KPI_SELECT}
           WHERE ($1::uuid IS NULL OR k.unit_id = $1) AND ($2::uuid IS NULL OR k.owner_id = $2)
             AND ($3::text IS NULL OR k.state = $3) AND ($4::boolean IS NULL OR k.stale = $4)
             AND ($5::timestamptz IS NULL OR (k.created_at, k.id) > ($5, $6::uuid))
           ORDER BY k.created_at, k.id LIMIT $7""",
        unit, owner, state.value if state else None, stale, created_at, last_id, limit + 1)
    page, next_cursor = keyset_next(rows, limit)
    return Page(items=await _kpis(pool, page), next_cursor=next_cursor)


@router.get("/kpis/{kpi_id}")
async def get_kpi(kpi_id: UUID, pool: AsOfPool, _: Reader, __: ReadYourWrites, response: Response) -> KPIOut:
    """One KPI: its current target and the target's history, its latest value, its state and
    each rule's state."""
    row = await pool.fetchrow(f"{KPI_SELECT} WHERE k.id = $1", kpi_id)
    if row is None:
        raise Problem(404, "Not Found", "No such KPI.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return (await _kpis(pool, [row]))[0]


@router.put("/kpis/{kpi_id}/rules", responses=WRITE_RESPONSES)
async def revise_rules(kpi_id: UUID, body: RulesIn, request: Request, response: Response, principal: Writer,
                       if_match: IfMatch = None) -> WriteResult:
    """Replace the KPI's threshold rules (validated as at definition); appends `KPIRulesRevised`,
    after `KPIRecovered` for a breached rule withdrawn and before the breaches or recoveries the
    new rules imply over the measurements so far. The same rules again append nothing."""
    return await execute_write(request, response, principal, LOG, _app(request).revise_rules, kpi_id,
                               rules=[r.model_dump(by_alias=False) for r in body.rules], reason=body.reason,
                               expected_version=if_match_version(if_match), status=200)


@router.post("/kpis/{kpi_id}/targets", status_code=201, responses=WRITE_RESPONSES)
async def change_target(kpi_id: UUID, body: TargetIn, request: Request, response: Response, principal: Writer,
                        if_match: IfMatch = None, idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Change the target from a day on (the history is kept); appends `KPITargetChanged`."""
    return await execute_write(request, response, principal, LOG, _app(request).change_target, kpi_id,
                               target=body.target, effective_from=body.effective_from or datetime.now(UTC).date(),
                               reason=body.reason, expected_version=if_match_version(if_match),
                               location=f"/v1/kpis/{kpi_id}", idempotency_key=idempotency_key)


@router.post("/kpis/{kpi_id}/measurements", status_code=201, responses=WRITE_RESPONSES)
async def record_measurement(kpi_id: UUID, body: MeasurementIn, request: Request, response: Response,
                             principal: Writer, if_match: IfMatch = None,
                             idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record a value for a moment; appends `KPIMeasured`, and `KPIThresholdBreached` or
    `KPIRecovered` for each rule the value fires or clears. The same time and source again is
    no new measurement: with the same value nothing is appended, with another the earlier one is
    corrected (`KPIMeasurementCorrected`)."""
    return await execute_write(request, response, principal, LOG, _app(request).record_measurement, kpi_id,
                               value=body.value, measured_at=body.measured_at or datetime.now(UTC),
                               source=body.source, expected_version=if_match_version(if_match),
                               location=f"/v1/kpis/{kpi_id}/measurements", idempotency_key=idempotency_key)


@router.post("/kpis/{kpi_id}/measurements/bulk", status_code=201, responses=WRITE_RESPONSES)
async def record_measurements(kpi_id: UUID, body: BulkIn, request: Request, response: Response,
                              principal: Writer, if_match: IfMatch = None,
                              idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record up to 10,000 measurements in one transaction (one save of the KPI), each as the
    single route would, taken in valid-time order; `position` is that of the last event."""
    items = [domain.MeasurementIn(m.value, m.measured_at, m.source) for m in body.measurements]
    return await execute_write(request, response, principal, LOG, _app(request).record_measurements, kpi_id,
                               items, expected_version=if_match_version(if_match),
                               location=f"/v1/kpis/{kpi_id}/measurements", idempotency_key=idempotency_key)


@router.post("/kpis/{kpi_id}/measurements/{measurement_id}/corrections", status_code=201,
             responses=WRITE_RESPONSES)
async def correct_measurement(kpi_id: UUID, measurement_id: UUID, body: CorrectionIn, request: Request,
                              response: Response, principal: Writer, if_match: IfMatch = None,
                              idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Correct a measurement's value, saying why; appends `KPIMeasurementCorrected` (the earlier
    value stays in the history) and whatever breach or recovery the corrected values imply."""
    return await execute_write(request, response, principal, LOG, _app(request).correct_measurement, kpi_id,
                               measurement_id, value=body.value, reason=body.reason,
                               expected_version=if_match_version(if_match),
                               location=f"/v1/kpis/{kpi_id}/measurements", idempotency_key=idempotency_key)


def _add_history_route() -> None:
    """`GET /v1/kpis/{kpi_id}/history` (services.common.history): every event of the KPI, for auditors."""
    add_history_route(router, "kpis", "kpi_id", domain.KPI, "KPI", name="kpi_history")


_add_history_route()


@router.get("/kpis/{kpi_id}/measurements")
async def list_measurements(kpi_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                            after: Cursor = None) -> Page[MeasurementOut]:
    """The KPI's measurements, newest (by when they apply) first, each with its current value and
    the corrections that led to it, a page at a time."""
    await _require_kpi(pool, kpi_id)
    measured_at, version = None, None
    if after:
        raw_at, raw_version = decode_cursor(after, 2)
        try:
            measured_at, version = datetime.fromisoformat(raw_at), int(raw_version)
        except ValueError as e:
            raise Problem(422, "Invalid request", "The cursor is not one this service gave out.",
                          kind="bad-cursor") from e
        if measured_at.tzinfo is None:
            raise Problem(422, "Invalid request", "The cursor is not one this service gave out.", kind="bad-cursor")
    rows = await pool.fetch(
        """SELECT * FROM measurements WHERE kpi_id = $1
             AND ($2::timestamptz IS NULL OR (measured_at, version) < ($2, $3::bigint))
           ORDER BY measured_at DESC, version DESC LIMIT $4""",
        kpi_id, measured_at, version, limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["measured_at"].isoformat(), page[-1]["version"]) if len(rows) > limit else None
    corrections: dict[UUID, list[CorrectionOut]] = {r["measurement_id"]: [] for r in page}
    if page:
        for c in await pool.fetch("SELECT * FROM measurement_corrections WHERE measurement_id = ANY($1::uuid[]) "
                                  "ORDER BY version", list(corrections)):
            corrections[c["measurement_id"]].append(CorrectionOut.from_row(c))
    return Page(items=[MeasurementOut.from_row(r, id=r["measurement_id"], corrections=corrections[r["measurement_id"]])
                       for r in page], next_cursor=next_cursor)


@router.get("/kpis/{kpi_id}/trend")
async def kpi_trend(
    kpi_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
    period: Annotated[Period, Query(description="day, week (from Monday) or month, in UTC.")] = Period.week,
    from_: Annotated[IsoDate | None, Query(alias="from", description="First day; its whole period counts.")] = None,
    to: Annotated[IsoDate | None, Query(description="Last day; its whole period counts.")] = None,
) -> TrendOut:
    """Per period: the count, lowest, highest, mean and last value, and the mean's change from the
    period before (absolute and in percent), from the measurements' current values."""
    _day_in_range("from", from_)
    _day_in_range("to", to)
    if from_ is not None and to is not None and from_ > to:
        raise Problem(422, "Invalid request", "from must not be after to.", kind="validation")
    await _require_kpi(pool, kpi_id)
    first = domain.period_start(from_, period) if from_ else None
    lower = domain.start_of_day(domain.previous_period_start(first, period)) if first else None
    upper = domain.start_of_day(domain.next_period_start(domain.period_start(to, period), period)) if to else None
    rows = await pool.fetch(
        """SELECT (date_trunc($2, measured_at AT TIME ZONE 'UTC'))::date AS start, count(*) AS count,
                  min(value) AS min, max(value) AS max, avg(value) AS avg,
                  (array_agg(value ORDER BY measured_at DESC, version DESC))[1] AS last
           FROM measurements WHERE kpi_id = $1
             AND ($3::timestamptz IS NULL OR measured_at >= $3) AND ($4::timestamptz IS NULL OR measured_at < $4)
           GROUP BY 1 ORDER BY 1""",
        kpi_id, period.value, lower, upper)
    stats = [domain.PeriodStats(r["start"], r["count"], r["min"], r["max"], r["avg"], r["last"]) for r in rows]
    items = [TrendItem(period_start=p.stats.start, count=p.stats.count, min=p.stats.min, max=p.stats.max,
                       avg=p.stats.avg, last=p.stats.last, change=p.change, change_percent=p.change_percent)
             for p in domain.trend(stats, period) if first is None or p.stats.start >= first]
    return TrendOut(kpi_id=kpi_id, period=period, items=items)


@router.get("/kpis/{kpi_id}/forecast")
async def kpi_forecast(
    kpi_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
    horizon_days: Annotated[int | None, Query(ge=1, le=MAX_HORIZON_DAYS,
                                              description="How far ahead; 30 days if neither this nor until.")] = None,
    until: Annotated[IsoDate | None, Query(description="Forecast to the start of this day (UTC) instead.")] = None,
    as_of: Annotated[IsoDateTime | None, Query(description="Forecast as of this moment, from the measurements "
                                                              "that apply up to it; now if left out.")] = None,
    from_: Annotated[IsoDate | None, Query(alias="from", description="Fit only measurements from this day.")] = None,
) -> ForecastOut:
    """A least-squares line through the measurements (value against valid time), its value at the
    horizon, and the first rule it would violate before then."""
    if horizon_days is not None and until is not None:
        raise Problem(422, "Invalid request", "Give horizon_days or until, not both.", kind="validation")
    _day_in_range("until", until)
    _day_in_range("from", from_)
    if as_of is not None and not EARLIEST.year < as_of.year < LATEST.year:
        raise Problem(422, "Invalid request", f"as_of must be from {EARLIEST} to {LATEST}.", kind="validation")
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    horizon = float(horizon_days or 30)
    if until is not None:
        horizon = domain.days_between(as_of, domain.start_of_day(until))
        if not 0 < horizon <= MAX_HORIZON_DAYS:
            raise Problem(422, "Invalid request", f"until must be after as_of and at most {MAX_HORIZON_DAYS} "
                          "days ahead.", kind="validation")
    kpi = await _require_kpi(pool, kpi_id)
    rows = await pool.fetch(
        "SELECT measured_at, value FROM measurements WHERE kpi_id = $1 AND measured_at <= $2 "
        "AND ($3::timestamptz IS NULL OR measured_at >= $3) ORDER BY measured_at",
        kpi_id, as_of, domain.start_of_day(from_) if from_ else None)
    fit = domain.linear_fit([(domain.days_between(as_of, r["measured_at"]), r["value"]) for r in rows])
    horizon_at = as_of + timedelta(days=horizon)
    out = ForecastOut(kpi_id=kpi_id, as_of=as_of, horizon_at=horizon_at, count=len(rows), slope_per_day=None,
                      intercept=None, projected_value=None, predicted_breach=None)
    if fit is None or not all(map(_finite, (fit.slope, fit.intercept, fit.at(horizon)))):
        return out
    out.slope_per_day, out.intercept, out.projected_value = fit.slope, fit.intercept, fit.at(horizon)
    rules = [ThresholdRule.from_dict(r) for r in json.loads(kpi["rules"])]
    breach = domain.predicted_breach(rules, fit, horizon)
    if breach is not None:
        at = as_of + timedelta(days=breach.days)
        out.predicted_breach = PredictedBreachOut(
            rule_id=breach.rule.id, kind=breach.rule.kind, severity=breach.rule.severity,
            threshold=breach.rule.threshold, low=breach.rule.low, high=breach.rule.high,
            at=at, date=at.date(), in_days=breach.days)
    return out


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# The staleness watch ----------------------------------------------------------------------

class StalenessWatch:
    """Finds KPIs whose next measurement is overdue and has each one's aggregate decide.

    Candidates come from the read model (not stale, and the latest valid time, or the definition
    before any measurement, plus the cadence's period plus the grace is past); each is then loaded
    and saved through the application, which appends `KPIStale` once per gap. The first check runs
    at start-up, so whatever went stale while the service was down is caught up at once; a read
    model that lags only delays a KPI to a later check, it never makes one stale twice.
    """

    def __init__(self, pool: asyncpg.Pool, application: Metrics, grace: timedelta, interval: float):
        self.pool = pool
        self.application = application
        self.grace = grace
        self.interval = interval
        self.checked = asyncio.Event()
        """Set after each check: a test can wait for the start-up check instead of sleeping."""

    async def candidates(self, now: datetime, grace: timedelta, kpi_ids: Sequence[UUID] | None = None) -> list[UUID]:
        periods = [CADENCE_PERIOD[c] for c in (Cadence.daily, Cadence.weekly, Cadence.monthly, Cadence.quarterly)]
        rows = await self.pool.fetch(
            """SELECT id FROM kpis WHERE NOT stale
                 AND COALESCE(latest_measured_at, created_at) + CASE cadence WHEN 'daily' THEN $1::interval
                     WHEN 'weekly' THEN $2::interval WHEN 'monthly' THEN $3::interval ELSE $4::interval END
                     + $5::interval <= $6
                 AND ($7::uuid[] IS NULL OR id = ANY($7::uuid[]))
               ORDER BY id""",
            *periods, grace, now, list(kpi_ids) if kpi_ids is not None else None)
        return [r["id"] for r in rows]

    async def check(self, now: datetime | None = None, *, grace: timedelta | None = None,
                    kpi_ids: Sequence[UUID] | None = None) -> list[Written]:
        """One round: what it appended (one `KPIStale` per KPI that went stale)."""
        now = now or datetime.now(UTC)
        grace = self.grace if grace is None else grace
        context = CommandContext(actor="metrics:staleness-watch", correlation_id=new_correlation_id())
        written: list[Written] = []
        for kpi_id in await self.candidates(now, grace, kpi_ids):
            try:
                result = await run_command(context, self.application.check_staleness, kpi_id, now=now, grace=grace)
            except Exception:  # noqa: BLE001 - one KPI's failure must not stop the others
                log.exception("staleness check of KPI %s failed", kpi_id)
                continue
            if result is not None:
                written.append(result)
        if written:
            log.info("%d KPI(s) went stale", len(written))
        return written

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except (OSError, asyncpg.PostgresError) as e:
                log.warning("staleness check failed, retrying in %.0fs: %s", self.interval, e)
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("staleness check failed")
            self.checked.set()
            await asyncio.sleep(self.interval)


class StalenessCheckOut(ApiModel):
    stale: list[UUID] = Field(description="The KPIs this check found overdue (each got one `KPIStale`).")
    position: int = Field(description="Log position of the last `KPIStale` appended (0: none).")


Operator = Writer


@router.post("/staleness-checks", responses=WRITE_RESPONSES)
async def check_staleness_now(request: Request, response: Response, principal: Operator,
                              __: ReadYourWrites, idempotency_key: IdempotencyKey = None) -> StalenessCheckOut:
    """Run the staleness check now rather than at the watch's next round (after restoring a
    backup, or to see a demo's overdue KPI at once). The aggregates decide, as in the watch: a
    KPI already stale for its current gap gets nothing new. Candidates come from the read model,
    so `Tandem-Wait-For` makes the check see the latest measurements.

    Under an Idempotency-Key a retry gets the first answer again (`Idempotent-Replayed: true`).
    A check writes one save per stale KPI, so its answer is kept by itself rather than with one
    save's events; a twin racing the first appends nothing either way (the KPIs decide once per
    gap) and answers as the first did."""
    pool: asyncpg.Pool = request.app.state.pool
    claim = None
    if idempotency_key is not None:
        claim = (principal.subject, idempotency_key, request_hash(request.method, request.url.path,
                                                                  await request.body()))
        await pool.execute(STALENESS_ANSWERS_DDL)
        if (earlier := await _staleness_answer(pool, *claim)) is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return _answered(response, earlier)
    watch: StalenessWatch = request.app.state.staleness_watch
    written = await watch.check()
    answer = StalenessCheckOut(stale=[w.id for w in written], position=max((w.position for w in written), default=0))
    if claim is not None:
        stored = await pool.fetchval(
            "INSERT INTO staleness_check_answers (subject, key, request_hash, answer) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING RETURNING 1", *claim, answer.model_dump_json())
        if stored is None:  # a twin answered first
            return _answered(response, await _staleness_answer(pool, *claim))
    return _answered(response, answer)


STALENESS_ANSWERS_DDL = """CREATE TABLE IF NOT EXISTS staleness_check_answers (
    subject text NOT NULL, key text NOT NULL, request_hash text NOT NULL, answer jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (subject, key))"""


async def _staleness_answer(pool: asyncpg.Pool, subject: str, key: str, fingerprint: str) -> StalenessCheckOut | None:
    row = await pool.fetchrow("SELECT request_hash, answer FROM staleness_check_answers WHERE subject = $1 AND key = $2",
                              subject, key)
    if row is None:
        return None
    if row["request_hash"] != fingerprint:
        raise Problem(422, "Idempotency-Key reused",
                      "This Idempotency-Key was used for a different request; use a new key.",
                      kind="idempotency-key-reused")
    return StalenessCheckOut.model_validate_json(row["answer"])


def _answered(response: Response, answer: StalenessCheckOut | None) -> StalenessCheckOut:
    assert answer is not None
    if answer.position:
        response.headers["Tandem-Position"] = f"{LOG}={answer.position}"
    return answer


def create_app(settings: MetricsSettings | None = None) -> FastAPI:
    settings = settings or MetricsSettings()
    app = create_service_app(
        settings=settings,
        title="Tandem metrics",
        description="KPIs, their measurements, targets and threshold rules, trends and forecasts, event-sourced.",
        tracked_logs=[TrackedLog.of(LOG, METRICS_PROJECTIONS[0])],
        projections=METRICS_PROJECTIONS,
        application_class=Metrics,
        domain_errors=(DomainError,),
    )

    @app.exception_handler(UnknownMeasurement)
    async def _unknown_measurement(request: Request, exc: UnknownMeasurement) -> JSONResponse:
        return problem_response(request, 404, "Not Found", "The KPI has no such measurement.", kind="not-found")

    app.include_router(router)
    return app
