"""REST API of the goals service: `/v1/...` for goal data.

Writes go through the `Goals` application (in the thread pool); reads query the read model with
asyncpg. Every error is RFC 9457 problem details (services.common.problems).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import Field, model_validator

from services.common.auth import READERS, WRITERS, Principal, require
from services.common.problems import Problem
from services.common.schemas import (
    ApiModel,
    Cursor,
    IsoDate,
    Name,
    Number,
    Page,
    Weight,
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
    get_pool,
    if_match_version,
)
from services.goals.application import Goals
from services.goals.domain import DomainError, KeyResultKind, OwnerKind, UnitKind, band
from services.goals.projections import GOALS_PROJECTIONS
from services.goals.settings import GoalsSettings

LOG = "goals"
Reader = Annotated[Principal, Depends(require(*READERS))]
Writer = Annotated[Principal, Depends(require(*WRITERS))]
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]


# Request and response bodies --------------------------------------------------------------

class UnitIn(ApiModel):
    name: Name
    kind: UnitKind
    parent_id: UUID | None = None


class Unit(ApiModel):
    id: UUID
    name: str
    kind: UnitKind
    parent_id: UUID | None
    version: int


class CycleIn(ApiModel):
    name: Name
    starts_on: IsoDate
    ends_on: IsoDate
    status: Literal["planning", "active"] = "planning"


class CycleOut(ApiModel):
    id: UUID
    name: str
    starts_on: date
    ends_on: date
    status: str
    version: int


class Owner(ApiModel):
    kind: OwnerKind
    id: UUID


class ObjectiveIn(ApiModel):
    title: Name
    description: str = Field("", max_length=5000)
    owner: Owner
    unit_id: UUID
    cycle_id: UUID
    parent_id: UUID | None = Field(None, description="The objective this one aligns to.")


class AlignmentIn(ApiModel):
    parent_id: UUID | None


class Milestone(ApiModel):
    title: Name
    weight: Weight = 1.0


class KeyResultIn(ApiModel):
    title: Name
    kind: KeyResultKind
    start: Number | None = None
    target: Number | None = None
    low: Number | None = None
    high: Number | None = None
    milestones: list[Milestone] = Field(default_factory=list, max_length=50)
    unit: str = Field("", max_length=50)
    weight: Weight = 1.0
    owner_id: UUID | None = None


class CheckInIn(ApiModel):
    value: Number
    confidence: WholeNumber | None = Field(None, ge=0, le=10)
    note: str = Field("", max_length=5000)
    valid_on: IsoDate | None = Field(None, description="The day the value applies to; today if left out.")

    @model_validator(mode="after")
    def _not_in_future(self) -> CheckInIn:
        if self.valid_on is not None and self.valid_on > date.today():
            raise ValueError("validOn cannot be in the future")
        return self


class KeyResultOut(ApiModel):
    id: UUID
    objective_id: UUID
    title: str
    kind: KeyResultKind
    start: float | None
    target: float | None
    low: float | None
    high: float | None
    milestones: list[Milestone]
    unit: str
    weight: float
    owner_id: UUID | None
    current: float | None
    current_valid_on: date | None
    confidence: int | None
    score: float | None
    band: str | None
    check_in_count: int
    version: int


class ObjectiveOut(ApiModel):
    id: UUID
    title: str
    description: str
    owner: Owner
    unit_id: UUID
    cycle_id: UUID
    parent_id: UUID | None
    status: str
    score: float | None = Field(description="Weighted mean of the key results' scores.")
    band: str | None
    key_results: list[KeyResultOut]
    version: int


class CheckInOut(ApiModel):
    version: int
    value: float
    confidence: int | None
    note: str
    valid_on: date
    recorded_at: datetime
    actor: str


# Row mapping ------------------------------------------------------------------------------

def _key_result(row: asyncpg.Record) -> KeyResultOut:
    import json

    return KeyResultOut(
        id=row["id"], objective_id=row["objective_id"], title=row["title"], kind=row["kind"],
        start=row["start"], target=row["target"], low=row["low"], high=row["high"],
        milestones=json.loads(row["milestones"]), unit=row["unit"], weight=row["weight"],
        owner_id=row["owner_id"], current=row["current"], current_valid_on=row["current_valid_on"],
        confidence=row["confidence"], score=row["score"], band=band(row["score"]),
        check_in_count=row["check_in_count"], version=row["version"],
    )


def _objective(row: asyncpg.Record, krs: list[KeyResultOut]) -> ObjectiveOut:
    scored = [(k.score, k.weight) for k in krs if k.score is not None]
    total = sum(w for _, w in scored)
    score = sum(s * w for s, w in scored) / total if scored else None
    return ObjectiveOut(
        id=row["id"], title=row["title"], description=row["description"],
        owner=Owner(kind=row["owner_kind"], id=row["owner_id"]), unit_id=row["unit_id"],
        cycle_id=row["cycle_id"], parent_id=row["parent_id"], status=row["status"],
        score=score, band=band(score), key_results=krs, version=row["version"],
    )


# Routes -----------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)


def _app(request: Request) -> Goals:
    return request.app.state.application


@router.post("/units", status_code=201, tags=["org units"], responses=WRITE_RESPONSES)
async def create_unit(body: UnitIn, request: Request, response: Response, principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create a company, department or team under a parent unit."""
    return await execute_write(request, response, principal, LOG, _app(request).create_unit,
                        name=body.name, kind=body.kind, parent_id=body.parent_id,
                        location="/v1/units/{id}",
                               idempotency_key=idempotency_key)


@router.get("/units", tags=["org units"])
async def list_units(pool: Pool, _: Reader, __: ReadYourWrites,
                     limit: Annotated[int, Query(ge=1, le=500)] = 100,
                     after: Cursor = None) -> Page[Unit]:
    """All org units, in the order they were created."""
    last = decode_cursor(after, 1) if after else None
    rows = await pool.fetch(
        "SELECT * FROM units WHERE ($1::uuid IS NULL OR id > $1::uuid) ORDER BY id LIMIT $2",
        UUID(last[0]) if last else None, limit + 1)
    items = [Unit.from_row(r) for r in rows[:limit]]
    return Page(items=items, next_cursor=encode_cursor(items[-1].id) if len(rows) > limit else None)


@router.get("/units/{unit_id}", tags=["org units"])
async def get_unit(unit_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> Unit:
    row = await pool.fetchrow("SELECT * FROM units WHERE id = $1", unit_id)
    if row is None:
        raise Problem(404, "Not Found", "No such org unit.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return Unit.from_row(row)


@router.post("/cycles", status_code=201, tags=["cycles"], responses=WRITE_RESPONSES)
async def create_cycle(body: CycleIn, request: Request, response: Response, principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create a quarter or a year; `status: active` opens it at once."""
    return await execute_write(request, response, principal, LOG, _app(request).create_cycle,
                        name=body.name, starts_on=body.starts_on, ends_on=body.ends_on,
                        activate=body.status == "active", location="/v1/cycles/{id}",
                               idempotency_key=idempotency_key)


@router.get("/cycles", tags=["cycles"])
async def list_cycles(pool: Pool, _: Reader, __: ReadYourWrites) -> list[CycleOut]:
    rows = await pool.fetch("SELECT * FROM cycles ORDER BY starts_on, name")
    return [CycleOut.from_row(r) for r in rows]


@router.get("/cycles/{cycle_id}", tags=["cycles"])
async def get_cycle(cycle_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> CycleOut:
    row = await pool.fetchrow("SELECT * FROM cycles WHERE id = $1", cycle_id)
    if row is None:
        raise Problem(404, "Not Found", "No such cycle.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return CycleOut.from_row(row)


@router.post("/objectives", status_code=201, tags=["objectives"], responses=WRITE_RESPONSES)
async def create_objective(body: ObjectiveIn, request: Request, response: Response, principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create an objective in a cycle for a unit, optionally aligned to a parent objective."""
    return await execute_write(request, response, principal, LOG, _app(request).create_objective,
                        title=body.title, description=body.description, owner_kind=body.owner.kind,
                        owner_id=body.owner.id, unit_id=body.unit_id, cycle_id=body.cycle_id,
                        parent_id=body.parent_id, location="/v1/objectives/{id}",
                               idempotency_key=idempotency_key)


async def _objectives_with_key_results(pool: asyncpg.Pool, rows: list[asyncpg.Record]) -> list[ObjectiveOut]:
    ids = [r["id"] for r in rows]
    kr_rows = await pool.fetch(
        "SELECT * FROM key_results WHERE objective_id = ANY($1::uuid[]) ORDER BY created_at, id", ids)
    by_objective: dict[UUID, list[KeyResultOut]] = {i: [] for i in ids}
    for kr in kr_rows:
        by_objective[kr["objective_id"]].append(_key_result(kr))
    return [_objective(r, by_objective[r["id"]]) for r in rows]


@router.get("/objectives", tags=["objectives"])
async def list_objectives(
    pool: Pool, _: Reader, __: ReadYourWrites,
    cycle: Annotated[UUID | None, Query(description="Only this cycle's objectives.")] = None,
    unit: Annotated[UUID | None, Query(description="Only this unit's objectives.")] = None,
    owner: Annotated[UUID | None, Query(description="Only objectives of this owner.")] = None,
    status: Annotated[Literal["draft", "active", "closed", "archived"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Cursor = None,
) -> Page[ObjectiveOut]:
    """Objectives with their key results and scores, oldest first, a page at a time."""
    created_at, last_id = decode_keyset(after)
    rows = await pool.fetch(
        """SELECT * FROM objectives
           WHERE ($1::uuid IS NULL OR cycle_id = $1) AND ($2::uuid IS NULL OR unit_id = $2)
             AND ($3::uuid IS NULL OR owner_id = $3) AND ($4::text IS NULL OR status = $4)
             AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6::uuid))
           ORDER BY created_at, id LIMIT $7""",
        cycle, unit, owner, status, created_at, last_id, limit + 1)
    page, next_cursor = keyset_next(rows, limit)
    return Page(items=await _objectives_with_key_results(pool, page), next_cursor=next_cursor)


@router.get("/objectives/{objective_id}", tags=["objectives"])
async def get_objective(objective_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> ObjectiveOut:
    """One objective with its key results, their scores and the objective's score."""
    row = await pool.fetchrow("SELECT * FROM objectives WHERE id = $1", objective_id)
    if row is None:
        raise Problem(404, "Not Found", "No such objective.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return (await _objectives_with_key_results(pool, [row]))[0]


@router.put("/objectives/{objective_id}/alignment", tags=["objectives"], responses=WRITE_RESPONSES)
async def align_objective(objective_id: UUID, body: AlignmentIn, request: Request, response: Response,
                          principal: Writer, if_match: IfMatch = None) -> WriteResult:
    """Align the objective to a parent objective (or to none); alignment never forms a cycle."""
    return await execute_write(request, response, principal, LOG, _app(request).align_objective,
                        objective_id, body.parent_id, if_match_version(if_match), status=200)


@router.post("/objectives/{objective_id}/key-results", status_code=201, tags=["key results"],
             responses=WRITE_RESPONSES)
async def add_key_result(objective_id: UUID, body: KeyResultIn, request: Request, response: Response,
                         principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Add a measurable key result to the objective."""
    return await execute_write(request, response, principal, LOG, _app(request).add_key_result,
                        objective_id=objective_id, title=body.title, kind=body.kind, start=body.start,
                        target=body.target, low=body.low, high=body.high,
                        milestones=[m.model_dump() for m in body.milestones], unit=body.unit,
                        weight=body.weight, owner_id=body.owner_id, location="/v1/key-results/{id}",
                               idempotency_key=idempotency_key)


@router.get("/key-results/{key_result_id}", tags=["key results"])
async def get_key_result(key_result_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> KeyResultOut:
    row = await pool.fetchrow("SELECT * FROM key_results WHERE id = $1", key_result_id)
    if row is None:
        raise Problem(404, "Not Found", "No such key result.", kind="not-found")
    response.headers["ETag"] = etag(row["version"])
    return _key_result(row)


@router.post("/key-results/{key_result_id}/check-ins", status_code=201, tags=["key results"],
             responses=WRITE_RESPONSES)
async def check_in(key_result_id: UUID, body: CheckInIn, request: Request, response: Response,
                   principal: Writer, if_match: IfMatch = None,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record a value, a confidence (0-10) and a note; appends `KeyResultProgressed`."""
    return await execute_write(request, response, principal, LOG, _app(request).check_in, key_result_id,
                        value=body.value, confidence=body.confidence, note=body.note,
                        valid_on=body.valid_on or date.today(),
                        expected_version=if_match_version(if_match),
                        location=f"/v1/key-results/{key_result_id}/check-ins",
                               idempotency_key=idempotency_key)


@router.get("/key-results/{key_result_id}/check-ins", tags=["key results"])
async def list_check_ins(key_result_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
                         limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[CheckInOut]:
    """The key result's check-ins, newest recorded first."""
    if await pool.fetchval("SELECT 1 FROM key_results WHERE id = $1", key_result_id) is None:
        raise Problem(404, "Not Found", "No such key result.", kind="not-found")
    rows = await pool.fetch(
        "SELECT * FROM check_ins WHERE key_result_id = $1 ORDER BY version DESC LIMIT $2", key_result_id, limit)
    return [CheckInOut.from_row(r) for r in rows]


def create_app(settings: GoalsSettings | None = None) -> FastAPI:
    settings = settings or GoalsSettings()
    app = create_service_app(
        settings=settings,
        title="Tandem goals",
        description="Org units, cycles, objectives, key results and check-ins, event-sourced.",
        tracked_logs=[TrackedLog.of(LOG, GOALS_PROJECTIONS[0])],
        projections=GOALS_PROJECTIONS,
        application_class=Goals,
        domain_errors=(DomainError,),
    )
    app.include_router(router)
    return app
