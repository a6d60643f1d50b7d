"""REST API of the metrics service: `/v1/kpis` and their measurements.

Writes go through the `Metrics` application (in the thread pool); reads query the read model
with asyncpg. Every error is RFC 9457 problem details (services.common.problems).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import Field, model_validator

from services.common.auth import READERS, WRITERS, Principal, require
from services.common.problems import Problem
from services.common.schemas import (
    ApiModel,
    Cursor,
    IsoDateTime,
    Name,
    Number,
    Page,
    WholeNumber,
    WriteResult,
    decode_keyset,
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
    get_pool,
    if_match_version,
)
from services.metrics.application import Metrics
from services.metrics.domain import Cadence, Direction, DomainError, KPIState, RuleKind, RuleState, Severity
from services.metrics.projections import METRICS_PROJECTIONS
from services.metrics.settings import MetricsSettings

LOG = "metrics"
CLOCK_SKEW = timedelta(minutes=5)
Reader = Annotated[Principal, Depends(require(*READERS))]
Writer = Annotated[Principal, Depends(require(*WRITERS))]
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]


# Request and response bodies --------------------------------------------------------------

class RuleIn(ApiModel):
    kind: RuleKind
    threshold: Number | None = Field(None, description="The bound of a below or above rule.")
    low: Number | None = Field(None, description="The lower bound of an outside rule.")
    high: Number | None = Field(None, description="The upper bound of an outside rule.")
    severity: Severity
    pending_count: WholeNumber = Field(1, ge=1, le=1000,
                               description="Consecutive violating measurements before the rule fires.")
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


class MeasurementIn(ApiModel):
    value: Number
    measured_at: IsoDateTime | None = Field(None, description="When the value applies; now if left out.")
    source: str = Field("api", min_length=1, max_length=100)

    @model_validator(mode="after")
    def _not_in_future(self) -> MeasurementIn:
        if self.measured_at is not None and self.measured_at > datetime.now(UTC) + CLOCK_SKEW:
            raise ValueError("measuredAt cannot be in the future")
        return self


class RuleOut(ApiModel):
    id: str
    kind: RuleKind
    threshold: float | None
    low: float | None
    high: float | None
    severity: Severity
    pending_count: int
    recovery: float | None
    state: RuleState


class KPIOut(ApiModel):
    id: UUID
    name: str
    description: str
    unit: str
    owner_id: UUID | None
    unit_id: UUID | None
    direction: Direction
    cadence: Cadence
    target: float | None
    state: KPIState
    latest_value: float | None
    latest_measured_at: datetime | None
    rules: list[RuleOut]
    version: int


class MeasurementOut(ApiModel):
    id: UUID
    value: float
    measured_at: datetime
    source: str
    recorded_at: datetime
    actor: str
    version: int = Field(description="The KPI's version after this measurement.")


# Row mapping ------------------------------------------------------------------------------

def _kpi(row: asyncpg.Record) -> KPIOut:
    rules = [RuleOut(**{k: r[k] for k in RuleOut.model_fields}) for r in json.loads(row["rules"])]
    return KPIOut.from_row(row, rules=rules)


def _measurement(row: asyncpg.Record) -> MeasurementOut:
    return MeasurementOut.from_row(row, id=row["measurement_id"])


# Routes -----------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES, tags=["kpis"])


def _app(request: Request) -> Metrics:
    return request.app.state.application


@router.post("/kpis", status_code=201, responses=WRITE_RESPONSES)
async def define_kpi(body: KPIIn, request: Request, response: Response, principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Define a KPI with its threshold rules; appends `KPIDefined`."""
    return await execute_write(request, response, principal, LOG, _app(request).define_kpi,
                        name=body.name, description=body.description, unit=body.unit,
                        owner_id=body.owner_id, unit_id=body.unit_id, direction=body.direction,
                        cadence=body.cadence, target=body.target,
                        rules=[r.model_dump(by_alias=False) for r in body.rules],
                        location="/v1/kpis/{id}",
                               idempotency_key=idempotency_key)


@router.get("/kpis")
async def list_kpis(
    pool: Pool, _: Reader, __: ReadYourWrites,
    unit: Annotated[UUID | None, Query(description="Only this org unit's KPIs.")] = None,
    owner: Annotated[UUID | None, Query(description="Only KPIs of this owner.")] = None,
    state: Annotated[KPIState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Cursor = None,
) -> Page[KPIOut]:
    """KPIs with their rules and states, oldest first, a page at a time."""
    created_at, last_id = decode_keyset(after)
    rows = await pool.fetch(
        """SELECT * FROM kpis
           WHERE ($1::uuid IS NULL OR unit_id = $1) AND ($2::uuid IS NULL OR owner_id = $2)
             AND ($3::text IS NULL OR state = $3)
             AND ($4::timestamptz IS NULL OR (created_at, id) > ($4, $5::uuid))
           ORDER BY created_at, id LIMIT $6""",
        unit, owner, state.value if state else None, created_at, last_id, limit + 1)
    page, next_cursor = keyset_next(rows, limit)
    return Page(items=[_kpi(r) for r in page], next_cursor=next_cursor)


@router.get("/kpis/{kpi_id}")
async def get_kpi(kpi_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> KPIOut:
    """One KPI: its latest value, its state and each rule's state."""
    row = await pool.fetchrow("SELECT * FROM kpis WHERE id = $1", kpi_id)
    if row is None:
        raise Problem(404, "Not Found", "No such KPI.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return _kpi(row)


@router.post("/kpis/{kpi_id}/measurements", status_code=201, responses=WRITE_RESPONSES)
async def record_measurement(kpi_id: UUID, body: MeasurementIn, request: Request, response: Response,
                             principal: Writer, if_match: IfMatch = None,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record a value for a moment; appends `KPIMeasured`, and `KPIThresholdBreached` or
    `KPIRecovered` for each rule the value fires or clears."""
    return await execute_write(request, response, principal, LOG, _app(request).record_measurement, kpi_id,
                        value=body.value, measured_at=body.measured_at or datetime.now(UTC),
                        source=body.source, expected_version=if_match_version(if_match),
                        location=f"/v1/kpis/{kpi_id}/measurements",
                               idempotency_key=idempotency_key)


@router.get("/kpis/{kpi_id}/measurements")
async def list_measurements(kpi_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[MeasurementOut]:
    """The KPI's measurements, newest (by when they apply) first."""
    if await pool.fetchval("SELECT 1 FROM kpis WHERE id = $1", kpi_id) is None:
        raise Problem(404, "Not Found", "No such KPI.", kind="not-found")
    rows = await pool.fetch(
        "SELECT * FROM measurements WHERE kpi_id = $1 ORDER BY measured_at DESC, version DESC LIMIT $2",
        kpi_id, limit)
    return [_measurement(r) for r in rows]


def create_app(settings: MetricsSettings | None = None) -> FastAPI:
    settings = settings or MetricsSettings()
    app = create_service_app(
        settings=settings,
        title="Tandem metrics",
        description="KPIs, their measurements and threshold rules, event-sourced.",
        tracked_logs=[TrackedLog.of(LOG, METRICS_PROJECTIONS[0])],
        projections=METRICS_PROJECTIONS,
        application_class=Metrics,
        domain_errors=(DomainError,),
    )
    app.include_router(router)
    return app
