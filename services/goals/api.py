"""REST API of the goals service: `/v1/...` for goal data.

Writes go through the `Goals` application (in the thread pool); reads query the read model with
asyncpg. Every error is RFC 9457 problem details (services.common.problems).

Conventions every route follows: a POST takes an `Idempotency-Key`; a write to an existing
resource takes `If-Match` (its ETag, the aggregate's version); a write answers `WriteResult`
with `ETag`, `Tandem-Position` and, where it creates something, `Location`; a read takes
`Tandem-Wait-For` and answers the read model's version of the resource as its `ETag`; a list
pages with `after` (the previous page's `nextCursor`). An id in the path that names nothing is
404; an id in a body that names nothing, or a rule of the domain broken, is 422. Who may call a
route is its role dependency (`Reader`, `Writer`, or services.goals.access's for what a member
may write), which the contract documents per operation (`x-tandem-roles`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from functools import partial
from types import SimpleNamespace
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from starlette.concurrency import run_in_threadpool

from services.common import database
from services.common.auth import DATA_READERS, READERS, Principal, require
from services.common.eventstore import Written
from services.common.history import add_history_route
from services.common.problems import Problem
from services.common.schemas import (
    ApiModel,
    Cursor,
    IsoDate,
    Label,
    Name,
    Number,
    Page,
    Text,
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
    WAIT_HEADER,
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
    parse_positions,
)
from services.goals import access, domain, scim
from services.goals.access import KeyResultMover, KeyResultWriter, ObjectiveCreator, ObjectiveWriter
from services.goals.application import Goals
from services.goals.domain import (
    CoachingWarning,
    CycleKind,
    CycleStatus,
    DomainError,
    KeyResultKind,
    ObjectiveStatus,
    OwnerKind,
    UnitKind,
    band,
    coaching_warnings,
    lint_guardrails,
    lint_key_result,
    lint_objective,
    objective_forecast,
    objective_score,
    weighted_mean,
)
from services.goals.projections import GOALS_PROJECTIONS, KPI_HEALTH_SPEC, METRICS_LOG, POLICY_SPEC, VIEW_SPEC
from services.goals.settings import GoalsSettings

LOG = "goals"
Reader = Annotated[Principal, Depends(require(*DATA_READERS))]
FeedReader = Annotated[Principal, Depends(require(*READERS))]
"""The feeds (services.goals.feeds) are for every role, hr_sync's above all."""
Writer = access.Operator
"""Units, people, cycles and grades: admin and service. What a member may write takes the
dependencies of services.goals.access (`ObjectiveCreator`, `ObjectiveWriter`, ...) instead."""
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
AsOfPool = Annotated[asyncpg.Pool, Depends(get_as_of_pool)]
"""The live read model, or with `as_of`/`known_at` the one of that instant."""
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
Version = Annotated[int, Path(ge=1, le=2**31, description="The key result's version at which the check-in was recorded.")]

TAGS = [
    {"name": "org units", "description": "Companies, departments and teams, as a tree."},
    {"name": "people", "description": "Members of units with managers; effective-dated history."},
    {"name": "cycles", "description": "Quarters and years: planning, active, closed."},
    {"name": "objectives", "description": "Qualitative goals, aligned and contributing, graded when the cycle closes."},
    {"name": "key results", "description": "Measurable results with check-ins, corrections and forecasts; "
                                            "bound to a KPI, the KPI's measurements check them in."},
    {"name": "coaching", "description": "Warnings about the common mistakes the OKR literature names."},
    {"name": "changes", "description": "The domain events of goals and metrics, merged, for HR systems to poll."},
    {"name": "webhooks", "description": "The changes feed pushed to subscribers, signed, in order, at least once."},
]

Email = Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^\x00\s@]+@[^\x00\s@]+$")]
Score = Annotated[float, Field(strict=True, ge=0, le=1)]




def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def omitted() -> Any:
    """A field of a partial update: left out, it stays as it is."""
    return Field(None, json_schema_extra=_no_default)


class PartialUpdate(ApiModel):
    """A body whose fields left out stay unchanged; `null` is allowed only where it clears a
    value (`clearable`), elsewhere it is refused rather than read as "left out"."""

    clearable: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _null_only_where_clearable(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in cls.clearable:
            raise ValueError("cannot be null; leave the field out to keep it")
        return value

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


def _not_in_future(day: date | None, field: str) -> None:
    if day is not None and day > date.today():
        raise ValueError(f"{field} cannot be in the future")


# Request and response bodies --------------------------------------------------------------

class UnitIn(ApiModel):
    name: Name
    kind: UnitKind
    parent_id: UUID | None = None


class UnitNameIn(ApiModel):
    name: Name


class UnitParentIn(ApiModel):
    parent_id: UUID | None = Field(description="The new parent unit; null only for a company.")


class Unit(ApiModel):
    id: UUID
    name: str
    kind: UnitKind
    parent_id: UUID | None
    version: int


class PersonIn(ApiModel):
    name: Name
    email: Email
    unit_id: UUID
    manager_id: UUID | None = None
    joined_on: IsoDate | None = Field(None, description="The first day; today if left out.")


class PersonUnitIn(ApiModel):
    unit_id: UUID
    effective_on: IsoDate | None = Field(None, description="The first day in the new unit; today if left out.")


class PersonManagerIn(ApiModel):
    manager_id: UUID | None
    effective_on: IsoDate | None = Field(None, description="The first day under the new manager; today if left out.")


class LeaveIn(ApiModel):
    left_on: IsoDate | None = Field(None, description="The last day; today if left out.")


class PersonOut(ApiModel):
    id: UUID
    name: str
    email: str
    unit_id: UUID = Field(description="The current unit.")
    manager_id: UUID | None = Field(description="The current manager.")
    joined_on: date
    left_on: date | None = Field(description="The last day, once leaving is recorded.")
    version: int


class UnitSpan(ApiModel):
    unit_id: UUID
    from_on: date
    to_on: date | None = Field(description="The last day in the unit (inclusive); null while it lasts.")


class ManagerSpan(ApiModel):
    manager_id: UUID | None
    from_on: date
    to_on: date | None = Field(description="The last day under this manager (inclusive); null while it lasts.")


class PersonDetail(PersonOut):
    unit_history: list[UnitSpan] = Field(description="Every unit the person was in, oldest first.")
    manager_history: list[ManagerSpan] = Field(description="Every manager the person had, oldest first.")


class Member(PersonOut):
    from_on: date = Field(description="The first day of this membership.")
    to_on: date | None = Field(description="The last day of this membership (inclusive); null while it lasts.")


class CycleIn(ApiModel):
    name: Name
    kind: CycleKind | None = Field(None, description="Left out: a year if longer than 200 days, else a quarter.")
    parent_id: UUID | None = Field(None, description="The year a quarter lies in.")
    starts_on: IsoDate
    ends_on: IsoDate
    status: Literal["planning", "active"] = "planning"


class CycleOut(ApiModel):
    id: UUID
    name: str
    kind: CycleKind
    parent_id: UUID | None
    starts_on: date
    ends_on: date
    status: CycleStatus
    version: int


class Owner(ApiModel):
    kind: OwnerKind
    id: UUID


class ObjectiveIn(ApiModel):
    title: Name
    description: Text = ""
    owner: Owner
    unit_id: UUID
    cycle_id: UUID
    parent_id: UUID | None = Field(None, description="The objective this one aligns to.")
    status: Literal["draft", "active"] = "active"


class ObjectivePatch(PartialUpdate):
    title: Name | SkipJsonSchema[None] = omitted()
    description: Text | SkipJsonSchema[None] = omitted()
    owner: Owner | SkipJsonSchema[None] = omitted()


class AlignmentIn(ApiModel):
    parent_id: UUID | None


class ContributionIn(ApiModel):
    weight: Weight = Field(1.0, description="How much this objective counts in the other's rolled-up score.")


class RegradeIn(ApiModel):
    final_score: Score
    reason: Annotated[Text, Field(min_length=1)]


class CarryOverIn(ApiModel):
    to_cycle_id: UUID
    status: Literal["draft", "active"] = "active"


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
    unit: Label = ""
    weight: Weight = 1.0
    owner_id: UUID | None = None


class KeyResultPatch(PartialUpdate):
    """The kind stays; what it measures, its title, weight and owner may change."""

    clearable: ClassVar[frozenset[str]] = frozenset({"start", "target", "low", "high", "owner_id"})

    title: Name | SkipJsonSchema[None] = omitted()
    unit: Label | SkipJsonSchema[None] = omitted()
    weight: Weight | SkipJsonSchema[None] = omitted()
    owner_id: UUID | None = omitted()
    start: Number | None = omitted()
    target: Number | None = omitted()
    low: Number | None = omitted()
    high: Number | None = omitted()
    milestones: Annotated[list[Milestone], Field(max_length=50)] | SkipJsonSchema[None] = omitted()


class KeyResultMoveIn(ApiModel):
    objective_id: UUID = Field(description="An open objective of the same cycle.")


class KPIBindingIn(ApiModel):
    kpi_id: UUID = Field(description="A KPI of the metrics service (`/v1/kpis/{id}` there).")


class CheckInIn(ApiModel):
    value: Number
    confidence: WholeNumber | None = Field(None, ge=0, le=10)
    note: Text = ""
    valid_on: IsoDate | None = Field(None, description="The day the value applies to; today if left out.")

    @model_validator(mode="after")
    def _not_in_future(self) -> CheckInIn:
        _not_in_future(self.valid_on, "validOn")
        return self


class CorrectionIn(PartialUpdate):
    """What the check-in should have said; fields left out keep the check-in's."""

    clearable: ClassVar[frozenset[str]] = frozenset({"confidence"})

    value: Number
    confidence: Annotated[WholeNumber, Field(ge=0, le=10)] | None = omitted()
    note: Text | SkipJsonSchema[None] = omitted()
    valid_on: IsoDate | SkipJsonSchema[None] = omitted()

    @model_validator(mode="after")
    def _not_in_future(self) -> CorrectionIn:
        _not_in_future(self.valid_on, "validOn")
        return self


class Forecast(ApiModel):
    value: float | None = Field(description="The value projected for the cycle's last day from the check-in trend.")
    score: float | None = Field(description="The score that value would give.")


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
    forecast: Forecast
    check_in_count: int
    correction_count: int
    kpi_id: UUID | None = Field(description="The KPI whose measurements check this key result in, if bound.")
    version: int


class Contribution(ApiModel):
    to_objective_id: UUID
    weight: float


class WarningOut(ApiModel):
    code: str
    message: str
    subject_kind: Literal["owner", "objective", "key_result"]
    subject_id: UUID


class GuardrailOut(ApiModel):
    kpi_id: UUID
    name: str | None = Field(description="The KPI's name; null until this service has seen the KPI defined.")
    breached: bool = Field(description="A threshold rule of the KPI has fired and not recovered.")
    breached_rules: list[str] = Field(description="The ids of those rules.")
    stale: bool = Field(description="No measurement came within the KPI's cadence.")


class ObjectiveOut(ApiModel):
    id: UUID
    title: str
    description: str
    owner: Owner
    unit_id: UUID
    cycle_id: UUID
    parent_id: UUID | None
    status: ObjectiveStatus
    score: float | None = Field(description="Weighted mean of the key results' scores.")
    rolled_up_score: float | None = Field(
        description="Weighted mean over the key results (their weights) and the objectives aligned (weight 1) "
                    "or contributing (their weight) to this one, each with its own rolled-up score.")
    band: str | None = Field(description="The band of `score`: red, yellow or green.")
    forecast_score: float | None = Field(
        description="The projected end-of-cycle score: the key results' forecast scores, weighted as `score` is.")
    final_score: float | None = Field(description="The grade the cycle's close gave (or a regrade).")
    grade_reason: str | None
    graded: bool
    contributions: list[Contribution] = Field(description="Objectives this one contributes to besides its parent.")
    carried_from: UUID | None
    carried_to: list[UUID] = Field(description="Objectives this one was carried over into.")
    needs_reassignment: bool = Field(description="Open, and owned by a person who has left: it needs a new owner.")
    key_results: list[KeyResultOut]
    guardrails: list[GuardrailOut] = Field(
        description="KPIs that must stay healthy while the objective is pursued, with their health.")
    guardrail_breached: bool = Field(description="Whether any guardrail KPI is breached.")
    warnings: list[WarningOut] = Field(description="Coaching warnings on the objective and its key results.")
    version: int


class CheckInOut(ApiModel):
    version: int
    value: float
    confidence: int | None
    note: str
    valid_on: date
    corrects_version: int | None = Field(description="For a correction: the check-in it corrects.")
    corrected_by: int | None = Field(description="For a corrected check-in: its latest correction.")
    recorded_at: datetime
    actor: str
    measurement_id: UUID | None = Field(
        description="The KPI measurement that made the check-in (for a correction: that of the check-in it "
                    "corrects); null for a check-in a person made.")


class CoachingOut(ApiModel):
    warnings: list[WarningOut]


# Reading the read model -------------------------------------------------------------------

class Where:
    """A WHERE clause built from optional filters, with asyncpg's numbered parameters."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def add(self, condition: str, *values: Any) -> Where:
        """`condition` has a `{}` for each value."""
        marks = []
        for value in values:
            self.params.append(value)
            marks.append(f"${len(self.params)}")
        self.conditions.append(condition.format(*marks))
        return self

    def equal(self, column: str, value: Any) -> Where:
        return self if value is None else self.add(f"{column} = {{}}", value)

    def sql(self) -> str:
        return " AND ".join(self.conditions) or "true"


async def _keyset_page(pool: asyncpg.Pool, select: str, where: Where, limit: int, after: str | None,
                       prefix: str = "") -> tuple[Sequence[asyncpg.Record], str | None]:
    """A page of `select` (which must yield `created_at` and `id`) in creation order."""
    created_at, last_id = decode_keyset(after)
    if created_at is not None:
        where.add(f"({prefix}created_at, {prefix}id) > ({{}}, {{}}::uuid)", created_at, last_id)
    rows = await pool.fetch(
        f"{select} WHERE {where.sql()} ORDER BY {prefix}created_at, {prefix}id LIMIT {limit + 1}", *where.params)
    return keyset_next(rows, limit)


def _not_found(what: str) -> Problem:
    return Problem(404, "Not Found", f"No such {what}.", kind="not-found")


async def _one(pool: asyncpg.Pool, table: str, row_id: UUID, what: str, response: Response) -> asyncpg.Record:
    """The row a path names, with its version as the ETag; 404 if there is none."""
    row = await pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1", row_id)
    if row is None:
        raise _not_found(what)
    response.headers["ETag"] = etag(row["version"])
    return row


def _key_result(row: asyncpg.Record) -> KeyResultOut:
    return KeyResultOut.from_row(
        row, milestones=json.loads(row["milestones"]), band=band(row["score"]),
        forecast=Forecast(value=row["forecast_value"], score=row["forecast_score"]))


def _warning(w: CoachingWarning) -> WarningOut:
    return WarningOut(code=w.code, message=w.message, subject_kind=w.subject_kind, subject_id=w.subject_id)


async def _owners_who_left(pool: asyncpg.Pool, objectives: Sequence[asyncpg.Record]) -> set[UUID]:
    """Person owners who left (or are unknown), for the no-owner lint, as the write side says."""
    owners = {o["owner_id"] for o in objectives if o["owner_kind"] == OwnerKind.person}
    present = await pool.fetch("SELECT id FROM people WHERE id = ANY($1::uuid[]) AND left_on IS NULL", list(owners))
    return owners - {r["id"] for r in present}


# Every objective below the given ones, along parent and contribution edges (archived ones left
# out), and what each one's rolled-up score is made of: its key results and its members.
ROLL_UP = """
WITH RECURSIVE tree(id) AS (
    SELECT unnest($1::uuid[])
  UNION
    SELECT m.member FROM tree t JOIN LATERAL (
        SELECT o.id AS member FROM objectives o WHERE o.parent_id = t.id AND o.status <> 'archived'
        UNION ALL
        SELECT c.objective_id FROM contributions c JOIN objectives o ON o.id = c.objective_id
        WHERE c.to_objective_id = t.id AND o.status <> 'archived') m ON true
)
SELECT o.parent_id AS node, o.id AS member, 1.0::float8 AS weight, NULL::float8 AS score, false AS is_kr
  FROM objectives o WHERE o.parent_id IN (SELECT id FROM tree) AND o.status <> 'archived'
UNION ALL
SELECT c.to_objective_id, c.objective_id, c.weight, NULL, false
  FROM contributions c JOIN objectives o ON o.id = c.objective_id
 WHERE c.to_objective_id IN (SELECT id FROM tree) AND o.status <> 'archived'
UNION ALL
SELECT k.objective_id, k.id, k.weight, k.score, true FROM key_results k WHERE k.objective_id IN (SELECT id FROM tree)
"""


async def _rolled_up_scores(pool: asyncpg.Pool, ids: list[UUID]) -> dict[UUID, float | None]:
    """Rolled-up scores of these objectives: one query for everything below them, then the
    domain's weighted mean from the leaves up (each objective once, however many it counts in)."""
    key_results: dict[UUID, list[tuple[float | None, float]]] = {}
    members: dict[UUID, list[tuple[UUID, float]]] = {}
    for r in await pool.fetch(ROLL_UP, ids):
        if r["is_kr"]:
            key_results.setdefault(r["node"], []).append((r["score"], r["weight"]))
        else:
            members.setdefault(r["node"], []).append((r["member"], r["weight"]))
    scores: dict[UUID, float | None] = {}
    in_progress: set[UUID] = set()
    for root in ids:
        stack = [root]
        while stack:
            node = stack[-1]
            if node in scores:
                stack.pop()
                continue
            pending = [m for m, _ in members.get(node, ()) if m not in scores and m not in in_progress]
            if pending and node not in in_progress:
                in_progress.add(node)
                stack.extend(pending)
                continue
            stack.pop()
            in_progress.discard(node)
            scores[node] = weighted_mean(
                key_results.get(node, []) + [(scores.get(m), w) for m, w in members.get(node, ())])
    return scores


async def _guardrails(pool: asyncpg.Pool, ids: list[UUID]) -> dict[UUID, list[GuardrailOut]]:
    """The objectives' guardrail KPIs (in the order named) with their health, from the
    kpi_health read model (which follows the metrics log)."""
    guardrails: dict[UUID, list[GuardrailOut]] = {i: [] for i in ids}
    for g in await pool.fetch(
            "SELECT g.objective_id, g.kpi_id, h.name, COALESCE(h.breached_rules, ARRAY[]::text[]) AS breached_rules, "
            "COALESCE(h.stale, false) AS stale FROM objective_guardrails g LEFT JOIN kpi_health h ON h.kpi_id = g.kpi_id "
            "WHERE g.objective_id = ANY($1::uuid[]) ORDER BY g.version, g.kpi_id", ids):
        guardrails[g["objective_id"]].append(GuardrailOut(
            kpi_id=g["kpi_id"], name=g["name"], breached=bool(g["breached_rules"]),
            breached_rules=list(g["breached_rules"]), stale=g["stale"]))
    return guardrails


async def _objectives(pool: asyncpg.Pool, rows: Sequence[asyncpg.Record]) -> list[ObjectiveOut]:
    """Objectives with their key results, scores, contributions, guardrails and coaching
    warnings, in a fixed number of queries whatever the number of rows."""
    ids = [r["id"] for r in rows]
    key_results: dict[UUID, list[KeyResultOut]] = {i: [] for i in ids}
    for kr in await pool.fetch(
            "SELECT * FROM key_results WHERE objective_id = ANY($1::uuid[]) ORDER BY created_at, id", ids):
        key_results[kr["objective_id"]].append(_key_result(kr))
    contributions: dict[UUID, list[Contribution]] = {i: [] for i in ids}
    for c in await pool.fetch(
            "SELECT * FROM contributions WHERE objective_id = ANY($1::uuid[]) ORDER BY to_objective_id", ids):
        contributions[c["objective_id"]].append(Contribution.from_row(c))
    rolled_up = await _rolled_up_scores(pool, ids)
    left = await _owners_who_left(pool, rows)
    guardrails = await _guardrails(pool, ids)
    out = []
    for row in rows:
        krs = key_results[row["id"]]
        facts = SimpleNamespace(**row)
        warnings = (lint_objective(facts, krs, left) + lint_guardrails(facts, guardrails[row["id"]])
                    + [w for k in krs for w in lint_key_result(k)])
        score = objective_score(krs)
        out.append(ObjectiveOut.from_row(
            row, owner=Owner(kind=row["owner_kind"], id=row["owner_id"]), score=score,
            rolled_up_score=rolled_up.get(row["id"]), band=band(score),
            forecast_score=objective_forecast((k.forecast.score, k.weight) for k in krs),
            contributions=contributions[row["id"]],
            key_results=krs, guardrails=guardrails[row["id"]],
            guardrail_breached=any(g.breached for g in guardrails[row["id"]]),
            warnings=[_warning(w) for w in warnings]))
    return out


async def wait_for_kpi_health(request: Request) -> None:
    """Guardrails come from the kpi_health read model, which follows the metrics log on its own
    runner: a read that waits for a metrics position (`Tandem-Wait-For`, already checked by
    `ReadYourWrites`) waits for it to get there too."""
    position = parse_positions(request.headers.get(WAIT_HEADER)).get("metrics")
    if not position:
        return
    if not await database.wait_for_position(request.app.state.pool, KPI_HEALTH_SPEC.tracking_table, METRICS_LOG.name,
                                            position, request.app.state.settings.read_wait_timeout_seconds):
        raise Problem(504, "Gateway Timeout", f"The KPI health read model has not reached metrics={position} yet; "
                      "retry.", kind="read-model-behind", headers={"Retry-After": "1"})


KPIHealthCaughtUp = Annotated[None, Depends(wait_for_kpi_health)]


def _app(request: Request) -> Goals:
    return request.app.state.application


def _today(day: date | None) -> date:
    return day or date.today()


# Routes -----------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)


def _transition(resource: str, id_param: str, action: str, command: str, tag: str, doc: str,
                writer: Any = Writer) -> None:
    """A state change of a resource: `POST /v1/{resource}/{id}/{action}`, 200 with the write's
    answer (If-Match and Idempotency-Key as every such write)."""

    async def endpoint(
        resource_id: UUID, request: Request, response: Response,
        principal: Principal, if_match: IfMatch = None, idempotency_key: IdempotencyKey = None,
    ) -> WriteResult:
        return await execute_write(request, response, principal, LOG, getattr(_app(request), command),
                                   resource_id, expected_version=if_match_version(if_match), status=200,
                                   idempotency_key=idempotency_key)

    # The path names its id after the resource; annotations are strings in this module, so the
    # alias is set on the evaluated annotation.
    endpoint.__annotations__["resource_id"] = Annotated[UUID, Path(alias=id_param)]
    endpoint.__annotations__["principal"] = writer
    router.add_api_route(f"/{resource}/{{{id_param}}}/{action}", endpoint, methods=["POST"], name=command,
                         tags=[tag], description=doc, responses=WRITE_RESPONSES, response_model=WriteResult)


# Org units.

@router.post("/units", status_code=201, tags=["org units"], responses=WRITE_RESPONSES)
async def create_unit(body: UnitIn, request: Request, response: Response, principal: Writer,
                      idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create a company, or a department or team under a parent unit."""
    return await execute_write(request, response, principal, LOG, _app(request).create_unit,
                               name=body.name, kind=body.kind, parent_id=body.parent_id,
                               location="/v1/units/{id}", idempotency_key=idempotency_key)


@router.get("/units", tags=["org units"])
async def list_units(pool: AsOfPool, _: Reader, __: ReadYourWrites,
                     parent: Annotated[UUID | None, Query(description="Only the units under this one.")] = None,
                     kind: UnitKind | None = None, limit: Limit = 100, after: Cursor = None) -> Page[Unit]:
    """Org units in the order they were created."""
    rows, next_cursor = await _keyset_page(
        pool, "SELECT * FROM units", Where().equal("parent_id", parent).equal("kind", kind), limit, after)
    return Page(items=[Unit.from_row(r) for r in rows], next_cursor=next_cursor)


@router.get("/units/{unit_id}", tags=["org units"])
async def get_unit(unit_id: UUID, pool: AsOfPool, _: Reader, __: ReadYourWrites, response: Response) -> Unit:
    return Unit.from_row(await _one(pool, "units", unit_id, "org unit", response))


@router.put("/units/{unit_id}/name", tags=["org units"], responses=WRITE_RESPONSES)
async def rename_unit(unit_id: UUID, body: UnitNameIn, request: Request, response: Response,
                      principal: Writer, if_match: IfMatch = None) -> WriteResult:
    return await execute_write(request, response, principal, LOG, _app(request).rename_unit, unit_id, body.name,
                               expected_version=if_match_version(if_match), status=200)


@router.put("/units/{unit_id}/parent", tags=["org units"], responses=WRITE_RESPONSES)
async def move_unit(unit_id: UUID, body: UnitParentIn, request: Request, response: Response,
                    principal: Writer, if_match: IfMatch = None) -> WriteResult:
    """Hang the unit under another parent; never under itself or a unit below it."""
    return await execute_write(request, response, principal, LOG, _app(request).move_unit, unit_id,
                               body.parent_id, expected_version=if_match_version(if_match), status=200)


@router.get("/units/{unit_id}/members", tags=["org units"])
async def list_members(unit_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
                       on: Annotated[IsoDate | None, Query(description="The day; today if left out.")] = None,
                       limit: Limit = 100, after: Cursor = None) -> Page[Member]:
    """Who was in the unit on a given day, from the people's history."""
    if await pool.fetchval("SELECT 1 FROM units WHERE id = $1", unit_id) is None:
        raise _not_found("org unit")
    day = _today(on)
    where = Where().add("pu.unit_id = {}", unit_id).add("pu.effective AND pu.from_on <= {}", day)
    where.add("(pu.to_on IS NULL OR pu.to_on >= {})", day)
    rows, next_cursor = await _keyset_page(
        pool, "SELECT p.*, pu.from_on, pu.to_on FROM person_units pu JOIN people p ON p.id = pu.person_id",
        where, limit, after, prefix="p.")
    return Page(items=[Member.from_row(r) for r in rows], next_cursor=next_cursor)


# People.

@router.post("/people", status_code=201, tags=["people"], responses=WRITE_RESPONSES)
async def join_person(body: PersonIn, request: Request, response: Response, principal: Writer,
                      idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Someone joins a unit (with a manager, who has not left)."""
    return await execute_write(request, response, principal, LOG, _app(request).join_person,
                               name=body.name, email=body.email, unit_id=body.unit_id, manager_id=body.manager_id,
                               joined_on=_today(body.joined_on), location="/v1/people/{id}",
                               idempotency_key=idempotency_key)


@router.get("/people", tags=["people"])
async def list_people(pool: Pool, _: Reader, __: ReadYourWrites,
                      unit: Annotated[UUID | None, Query(description="Only the unit's current members.")] = None,
                      manager: Annotated[UUID | None, Query(description="Only this manager's current reports.")] = None,
                      active: Annotated[bool | None, Query(description="true: only people who have not left; "
                                                                        "false: only those who have.")] = None,
                      limit: Limit = 100, after: Cursor = None) -> Page[PersonOut]:
    """People in the order they joined the system."""
    where = Where().equal("unit_id", unit).equal("manager_id", manager)
    if active is not None:
        where.add("left_on IS NULL" if active else "left_on IS NOT NULL")
    rows, next_cursor = await _keyset_page(pool, "SELECT * FROM people", where, limit, after)
    return Page(items=[PersonOut.from_row(r) for r in rows], next_cursor=next_cursor)


@router.get("/people/{person_id}", tags=["people"])
async def get_person(person_id: UUID, pool: AsOfPool, _: Reader, __: ReadYourWrites, response: Response) -> PersonDetail:
    """A person with every unit and manager they had, and the days of each."""
    row = await _one(pool, "people", person_id, "person", response)
    history = "SELECT * FROM {} WHERE person_id = $1 AND effective ORDER BY from_on, version"
    units = await pool.fetch(history.format("person_units"), person_id)
    managers = await pool.fetch(history.format("person_managers"), person_id)
    return PersonDetail.from_row(row, unit_history=[UnitSpan.from_row(r) for r in units],
                                 manager_history=[ManagerSpan.from_row(r) for r in managers])


@router.put("/people/{person_id}/unit", tags=["people"], responses=WRITE_RESPONSES)
async def move_person(person_id: UUID, body: PersonUnitIn, request: Request, response: Response,
                      principal: Writer, if_match: IfMatch = None) -> WriteResult:
    """Move the person to another unit from a given day (history is kept)."""
    return await execute_write(request, response, principal, LOG, _app(request).move_person, person_id,
                               unit_id=body.unit_id, effective_on=_today(body.effective_on),
                               expected_version=if_match_version(if_match), status=200)


@router.put("/people/{person_id}/manager", tags=["people"], responses=WRITE_RESPONSES)
async def change_manager(person_id: UUID, body: PersonManagerIn, request: Request, response: Response,
                         principal: Writer, if_match: IfMatch = None) -> WriteResult:
    """Give the person another manager (or none) from a given day; never forms a loop."""
    return await execute_write(request, response, principal, LOG, _app(request).change_manager, person_id,
                               manager_id=body.manager_id, effective_on=_today(body.effective_on),
                               expected_version=if_match_version(if_match), status=200)


@router.post("/people/{person_id}/leave", tags=["people"], responses=WRITE_RESPONSES)
async def person_leaves(person_id: UUID, body: LeaveIn, request: Request, response: Response,
                        principal: Writer, if_match: IfMatch = None,
                        idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record the person's last day; their history stays."""
    return await execute_write(request, response, principal, LOG, _app(request).person_leaves, person_id,
                               left_on=_today(body.left_on), expected_version=if_match_version(if_match),
                               status=200, idempotency_key=idempotency_key)


# Cycles.

@router.post("/cycles", status_code=201, tags=["cycles"], responses=WRITE_RESPONSES)
async def create_cycle(body: CycleIn, request: Request, response: Response, principal: Writer,
                       idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create a quarter or a year (a quarter may lie in its year); `status: active` opens it at once."""
    return await execute_write(request, response, principal, LOG, _app(request).create_cycle,
                               name=body.name, starts_on=body.starts_on, ends_on=body.ends_on, kind=body.kind,
                               parent_id=body.parent_id, activate=body.status == "active",
                               location="/v1/cycles/{id}", idempotency_key=idempotency_key)


@router.get("/cycles", tags=["cycles"])
async def list_cycles(pool: Pool, _: Reader, __: ReadYourWrites, kind: CycleKind | None = None,
                      status: CycleStatus | None = None,
                      parent: Annotated[UUID | None, Query(description="Only the quarters of this year.")] = None,
                      limit: Limit = 100, after: Cursor = None) -> Page[CycleOut]:
    """Cycles in the order they were created."""
    where = Where().equal("kind", kind).equal("status", status).equal("parent_id", parent)
    rows, next_cursor = await _keyset_page(pool, "SELECT * FROM cycles", where, limit, after)
    return Page(items=[CycleOut.from_row(r) for r in rows], next_cursor=next_cursor)


@router.get("/cycles/{cycle_id}", tags=["cycles"])
async def get_cycle(cycle_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites, response: Response) -> CycleOut:
    return CycleOut.from_row(await _one(pool, "cycles", cycle_id, "cycle", response))


_transition("cycles", "cycle_id", "activate", "activate_cycle", "cycles", "Open a cycle that is in planning.")


@router.post("/cycles/{cycle_id}/close", tags=["cycles"], responses=WRITE_RESPONSES)
async def close_cycle(cycle_id: UUID, request: Request, response: Response, principal: Writer, pool: Pool,
                      if_match: IfMatch = None, idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Close the cycle: each of its objectives that is not archived is graded with its score
    now and closed, and its key results take no more check-ins."""
    # The cycle does not list its objectives; the read model does, once it has caught up with
    # every write this service knows of.
    tracked: TrackedLog = request.app.state.tracked_logs[LOG]
    position = await run_in_threadpool(_app(request).position)
    if not await database.wait_for_position(pool, tracked.tracking_table, tracked.application_name, position,
                                            request.app.state.settings.read_wait_timeout_seconds):
        raise Problem(504, "Gateway Timeout", "The read model is behind the log; retry.",
                      kind="read-model-behind", headers={"Retry-After": "1"})
    objective_ids = [r["id"] for r in await pool.fetch(
        "SELECT id FROM objectives WHERE cycle_id = $1 ORDER BY created_at, id", cycle_id)]
    return await execute_write(request, response, principal, LOG, _app(request).close_cycle, cycle_id,
                               objective_ids, expected_version=if_match_version(if_match), status=200,
                               idempotency_key=idempotency_key)


# Objectives.

@router.post("/objectives", status_code=201, tags=["objectives"], responses=WRITE_RESPONSES)
async def create_objective(body: ObjectiveIn, request: Request, response: Response, principal: ObjectiveCreator,
                           idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Create an objective (active, or a draft) in an open cycle, optionally aligned to a parent."""
    await access.check_new_objective(request, principal, body.owner.kind, body.owner.id, body.unit_id)
    return await execute_write(request, response, principal, LOG,
                               partial(_app(request).create_objective, status=ObjectiveStatus(body.status)),
                               title=body.title, description=body.description, owner_kind=body.owner.kind,
                               owner_id=body.owner.id, unit_id=body.unit_id, cycle_id=body.cycle_id,
                               parent_id=body.parent_id, location="/v1/objectives/{id}",
                               idempotency_key=idempotency_key)


@router.get("/objectives", tags=["objectives"])
async def list_objectives(
    pool: AsOfPool, _: Reader, __: ReadYourWrites, ___: KPIHealthCaughtUp,
    cycle: Annotated[UUID | None, Query(description="Only this cycle's objectives.")] = None,
    unit: Annotated[UUID | None, Query(description="Only this unit's objectives.")] = None,
    owner: Annotated[UUID | None, Query(description="Only objectives of this owner.")] = None,
    status: ObjectiveStatus | None = None,
    limit: Limit = 50,
    after: Cursor = None,
) -> Page[ObjectiveOut]:
    """Objectives with their key results and scores, oldest first, a page at a time."""
    where = Where().equal("cycle_id", cycle).equal("unit_id", unit).equal("owner_id", owner).equal("status", status)
    rows, next_cursor = await _keyset_page(pool, "SELECT * FROM objectives", where, limit, after)
    return Page(items=await _objectives(pool, rows), next_cursor=next_cursor)


@router.get("/objectives/{objective_id}", tags=["objectives"])
async def get_objective(objective_id: UUID, pool: AsOfPool, _: Reader, __: ReadYourWrites,
                        ___: KPIHealthCaughtUp, response: Response) -> ObjectiveOut:
    """One objective with its key results (scores, forecasts), its score, rolled-up score, its
    guardrail KPIs with their health, and coaching warnings."""
    return (await _objectives(pool, [await _one(pool, "objectives", objective_id, "objective", response)]))[0]


@router.patch("/objectives/{objective_id}", tags=["objectives"], responses=WRITE_RESPONSES)
async def update_objective(objective_id: UUID, body: ObjectivePatch, request: Request, response: Response,
                           principal: ObjectiveWriter, if_match: IfMatch = None) -> WriteResult:
    """Change the title, description or owner of an open objective; fields left out stay."""
    changes = body.changes()
    owner = changes.pop("owner", None)
    if owner is not None:
        changes.update(owner_kind=owner.kind, owner_id=owner.id)
    return await execute_write(request, response, principal, LOG, _app(request).update_objective, objective_id,
                               **changes, expected_version=if_match_version(if_match), status=200)


_transition("objectives", "objective_id", "activate", "activate_objective", "objectives",
            "Make a draft objective active.", ObjectiveWriter)
_transition("objectives", "objective_id", "close", "close_objective", "objectives",
            "Close an active objective early (done, or given up); grading comes when the cycle closes.", ObjectiveWriter)
_transition("objectives", "objective_id", "reopen", "reopen_objective", "objectives",
            "Reopen an objective closed early, while its cycle is open and it is not graded.", ObjectiveWriter)
_transition("objectives", "objective_id", "archive", "archive_objective", "objectives",
            "Put the objective away: it is left out of grading, roll-ups and coaching.", ObjectiveWriter)


@router.put("/objectives/{objective_id}/alignment", tags=["objectives"], responses=WRITE_RESPONSES)
async def align_objective(objective_id: UUID, body: AlignmentIn, request: Request, response: Response,
                          principal: ObjectiveWriter, if_match: IfMatch = None) -> WriteResult:
    """Align the objective to a parent objective (or to none); alignment never forms a cycle."""
    return await execute_write(request, response, principal, LOG, _app(request).align_objective,
                               objective_id, body.parent_id, if_match_version(if_match), status=200)


@router.put("/objectives/{objective_id}/contributions/{to_objective_id}", tags=["objectives"],
            responses=WRITE_RESPONSES)
async def add_contribution(objective_id: UUID, to_objective_id: UUID, body: ContributionIn, request: Request,
                           response: Response, principal: ObjectiveWriter, if_match: IfMatch = None) -> WriteResult:
    """Contribute to another objective besides the parent, with a weight (again: a new weight).
    Contributions and alignment together never form a cycle."""
    application = _app(request)

    def contribute() -> Written:
        application.get_objective(to_objective_id)  # 404 when the path names no objective
        return application.add_contribution(objective_id, to_objective_id, body.weight,
                                            expected_version=if_match_version(if_match))

    return await execute_write(request, response, principal, LOG, contribute, status=200)


@router.delete("/objectives/{objective_id}/contributions/{to_objective_id}", tags=["objectives"],
               responses=WRITE_RESPONSES)
async def remove_contribution(objective_id: UUID, to_objective_id: UUID, request: Request, response: Response,
                              principal: ObjectiveWriter, if_match: IfMatch = None) -> WriteResult:
    application = _app(request)

    def remove() -> Written:
        if to_objective_id not in application.get_objective(objective_id).contributes_to:
            raise _not_found("contribution")
        return application.remove_contribution(objective_id, to_objective_id,
                                               expected_version=if_match_version(if_match))

    return await execute_write(request, response, principal, LOG, remove, status=200)


@router.post("/objectives/{objective_id}/regrade", tags=["objectives"], responses=WRITE_RESPONSES)
async def regrade_objective(objective_id: UUID, body: RegradeIn, request: Request, response: Response,
                            principal: Writer, if_match: IfMatch = None,
                            idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Change a graded objective's final score, saying why."""
    return await execute_write(request, response, principal, LOG, _app(request).regrade_objective, objective_id,
                               final_score=body.final_score, reason=body.reason,
                               expected_version=if_match_version(if_match), status=200,
                               idempotency_key=idempotency_key)


@router.post("/objectives/{objective_id}/carry-over", status_code=201, tags=["objectives"],
             responses=WRITE_RESPONSES)
async def carry_over(objective_id: UUID, body: CarryOverIn, request: Request, response: Response,
                     principal: ObjectiveWriter, if_match: IfMatch = None,
                     idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Carry a graded objective into a later cycle with copies of its key results (baselines,
    targets, weights; no check-ins). Answers with the new objective; `If-Match` is the original's."""
    application = _app(request)

    def carry() -> Written:
        return application.carry_over(objective_id, body.to_cycle_id, status=ObjectiveStatus(body.status),
                                      expected_version=if_match_version(if_match))[0]

    return await execute_write(request, response, principal, LOG, carry, location="/v1/objectives/{id}",
                               idempotency_key=idempotency_key)


@router.put("/objectives/{objective_id}/guardrails/{kpi_id}", tags=["objectives"], responses=WRITE_RESPONSES)
async def add_guardrail(objective_id: UUID, kpi_id: UUID, request: Request, response: Response, principal: ObjectiveWriter,
                        if_match: IfMatch = None, idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Name a KPI of the metrics service that must stay healthy while the objective is pursued
    (again: nothing new). The objective then shows the KPI's health, and a breach is a coaching
    warning while the objective is open."""
    return await execute_write(request, response, principal, LOG, _app(request).add_guardrail, objective_id, kpi_id,
                               expected_version=if_match_version(if_match), status=200,
                               idempotency_key=idempotency_key)


@router.delete("/objectives/{objective_id}/guardrails/{kpi_id}", tags=["objectives"], responses=WRITE_RESPONSES)
async def remove_guardrail(objective_id: UUID, kpi_id: UUID, request: Request, response: Response,
                           principal: ObjectiveWriter, if_match: IfMatch = None) -> WriteResult:
    application = _app(request)

    def remove() -> Written:
        if kpi_id not in application.get_objective(objective_id).guardrails:
            raise _not_found("guardrail")
        return application.remove_guardrail(objective_id, kpi_id, expected_version=if_match_version(if_match))

    return await execute_write(request, response, principal, LOG, remove, status=200)


# Key results.

@router.post("/objectives/{objective_id}/key-results", status_code=201, tags=["key results"],
             responses=WRITE_RESPONSES)
async def add_key_result(objective_id: UUID, body: KeyResultIn, request: Request, response: Response,
                         principal: ObjectiveWriter, idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Add a measurable key result to the objective (whose version moves too)."""
    return await execute_write(request, response, principal, LOG, _app(request).add_key_result,
                               objective_id=objective_id, title=body.title, kind=body.kind, start=body.start,
                               target=body.target, low=body.low, high=body.high,
                               milestones=[m.model_dump() for m in body.milestones], unit=body.unit,
                               weight=body.weight, owner_id=body.owner_id, location="/v1/key-results/{id}",
                               idempotency_key=idempotency_key)


@router.get("/key-results/{key_result_id}", tags=["key results"])
async def get_key_result(key_result_id: UUID, pool: AsOfPool, _: Reader, __: ReadYourWrites,
                         response: Response) -> KeyResultOut:
    """A key result with its current value, score, band and forecast."""
    return _key_result(await _one(pool, "key_results", key_result_id, "key result", response))


@router.patch("/key-results/{key_result_id}", tags=["key results"], responses=WRITE_RESPONSES)
async def revise_key_result(key_result_id: UUID, body: KeyResultPatch, request: Request, response: Response,
                            principal: KeyResultWriter, if_match: IfMatch = None) -> WriteResult:
    """Revise what the key result measures, its title, weight or owner. Fields left out stay;
    `null` clears the owner or a bound the kind does not use."""
    changes = body.changes()
    if "milestones" in changes:
        changes["milestones"] = [m.model_dump() for m in changes["milestones"]]
    return await execute_write(request, response, principal, LOG, _app(request).revise_key_result, key_result_id,
                               **changes, expected_version=if_match_version(if_match), status=200)


@router.put("/key-results/{key_result_id}/objective", tags=["key results"], responses=WRITE_RESPONSES)
async def move_key_result(key_result_id: UUID, body: KeyResultMoveIn, request: Request, response: Response,
                          principal: KeyResultMover, if_match: IfMatch = None) -> WriteResult:
    """Move the key result to another open objective of the same cycle."""
    await access.check_objective(request, principal, body.objective_id, "the target objective")
    return await execute_write(request, response, principal, LOG, _app(request).move_key_result, key_result_id,
                               body.objective_id, expected_version=if_match_version(if_match), status=200)


@router.put("/key-results/{key_result_id}/kpi", tags=["key results"], responses=WRITE_RESPONSES)
async def bind_key_result(key_result_id: UUID, body: KPIBindingIn, request: Request, response: Response,
                          principal: KeyResultWriter, if_match: IfMatch = None,
                          idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Bind the key result (increase_to, decrease_to, stay_above, stay_below or stay_within) to
    a KPI of the metrics service: each measurement of the KPI from then on checks it in
    (`KeyResultProgressed` naming the measurement; the day is the measurement's in UTC), and a
    corrected measurement corrects that check-in. Binding to another KPI replaces the one
    followed. A goals read with `Tandem-Wait-For: metrics=<position of a measurement>` shows
    what the measurement did."""
    return await execute_write(request, response, principal, LOG, _app(request).bind_key_result_to_kpi,
                               key_result_id, body.kpi_id, expected_version=if_match_version(if_match),
                               status=200, idempotency_key=idempotency_key)


@router.delete("/key-results/{key_result_id}/kpi", tags=["key results"], responses=WRITE_RESPONSES)
async def unbind_key_result(key_result_id: UUID, request: Request, response: Response, principal: KeyResultWriter,
                            if_match: IfMatch = None) -> WriteResult:
    """Stop following the KPI; the check-ins it brought stay."""
    application = _app(request)

    def unbind() -> Written:
        if application.get_key_result(key_result_id).kpi_id is None:
            raise _not_found("KPI binding")
        return application.unbind_key_result_from_kpi(key_result_id, expected_version=if_match_version(if_match))

    return await execute_write(request, response, principal, LOG, unbind, status=200)


@router.post("/key-results/{key_result_id}/check-ins", status_code=201, tags=["key results"],
             responses=WRITE_RESPONSES)
async def check_in(key_result_id: UUID, body: CheckInIn, request: Request, response: Response,
                   principal: KeyResultWriter, if_match: IfMatch = None,
                   idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Record a value, a confidence (0-10) and a note; appends `KeyResultProgressed`."""
    return await execute_write(request, response, principal, LOG, _app(request).check_in, key_result_id,
                               value=body.value, confidence=body.confidence, note=body.note,
                               valid_on=_today(body.valid_on), expected_version=if_match_version(if_match),
                               location=f"/v1/key-results/{key_result_id}/check-ins",
                               idempotency_key=idempotency_key)


@router.post("/key-results/{key_result_id}/check-ins/{version}/corrections", status_code=201,
             tags=["key results"], responses=WRITE_RESPONSES)
async def correct_check_in(key_result_id: UUID, version: Version, body: CorrectionIn, request: Request,
                           response: Response, principal: KeyResultWriter, if_match: IfMatch = None,
                           idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Correct the check-in recorded at `version`: both stay in the history, and the key
    result's current value follows the correction."""
    application = _app(request)

    def correct() -> Written:
        kr = application.get_key_result(key_result_id)
        if not any(c.version == version for c in kr.effective_check_ins):
            raise _not_found("check-in")
        return application.correct_check_in(key_result_id, corrects_version=version, **body.changes(),
                                            expected_version=if_match_version(if_match))

    return await execute_write(request, response, principal, LOG, correct,
                               location=f"/v1/key-results/{key_result_id}/check-ins",
                               idempotency_key=idempotency_key)


@router.get("/key-results/{key_result_id}/check-ins", tags=["key results"])
async def list_check_ins(key_result_id: UUID, pool: Pool, _: Reader, __: ReadYourWrites,
                         limit: Limit = 100, after: Cursor = None) -> Page[CheckInOut]:
    """The key result's check-ins and corrections, newest recorded first. A corrected check-in
    names its latest correction (`correctedBy`); a correction names what it corrects."""
    if await pool.fetchval("SELECT 1 FROM key_results WHERE id = $1", key_result_id) is None:
        raise _not_found("key result")
    before = _version_cursor(after)
    rows = await pool.fetch(
        "SELECT * FROM check_ins WHERE key_result_id = $1 AND ($2::bigint IS NULL OR version < $2) "
        "ORDER BY version DESC LIMIT $3", key_result_id, before, limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["version"]) if len(rows) > limit else None
    return Page(items=[CheckInOut.from_row(r) for r in page], next_cursor=next_cursor)


def _version_cursor(after: str | None) -> int | None:
    if not after:
        return None
    value = decode_cursor(after, 1)[0]
    if not value.isdigit() or len(value) > 18:
        raise Problem(422, "Invalid request", "The cursor is not one this service gave out.", kind="bad-cursor")
    return int(value)


# History (services.common.history): every event of an aggregate, for auditors.

def _add_history_routes() -> None:
    for resource, id_param, kind, what, tag in [
        ("units", "unit_id", domain.OrgUnit, "org unit", "org units"),
        ("people", "person_id", domain.Person, "person", "people"),
        ("objectives", "objective_id", domain.Objective, "objective", "objectives"),
        ("key-results", "key_result_id", domain.KeyResult, "key result", "key results"),
    ]:
        add_history_route(router, resource, id_param, kind, what, name=f"{id_param.removesuffix('_id')}_history",
                          tags=[tag])


_add_history_routes()


# Coaching.

@router.get("/coaching", tags=["coaching"])
async def coaching(
    pool: Pool, _: Reader, __: ReadYourWrites, ___: KPIHealthCaughtUp,
    cycle: Annotated[UUID | None, Query(description="Only this cycle's objectives.")] = None,
    owner: Annotated[UUID | None, Query(description="Only objectives of this owner.")] = None,
    unit: Annotated[UUID | None, Query(description="Only this unit's objectives.")] = None,
) -> CoachingOut:
    """Coaching warnings on the chosen objectives, their key results and their owners (an
    owner's objectives are counted per cycle across all units, whatever the filters)."""
    where = Where().equal("cycle_id", cycle).equal("owner_id", owner).equal("unit_id", unit)
    rows = await pool.fetch(
        f"""WITH picked AS (SELECT id, owner_id, cycle_id FROM objectives WHERE {where.sql()})
            SELECT o.*, o.id IN (SELECT id FROM picked) AS picked FROM objectives o
            WHERE (o.owner_id, o.cycle_id) IN (SELECT owner_id, cycle_id FROM picked)
            ORDER BY o.created_at, o.id""", *where.params)
    picked = [r["id"] for r in rows if r["picked"]]
    key_results = await pool.fetch(
        "SELECT id, objective_id, title, kind FROM key_results WHERE objective_id = ANY($1::uuid[]) "
        "ORDER BY created_at, id", picked)
    shown = set(picked) | {k["id"] for k in key_results}
    warnings = coaching_warnings([SimpleNamespace(**r) for r in rows],
                                 [SimpleNamespace(**k) for k in key_results], await _owners_who_left(pool, rows))
    guardrails = await _guardrails(pool, picked)
    warnings += [w for r in rows if r["picked"] for w in lint_guardrails(SimpleNamespace(**r), guardrails[r["id"]])]
    return CoachingOut(warnings=[_warning(w) for w in warnings
                                 if w.subject_kind == "owner" or w.subject_id in shown])


def create_app(settings: GoalsSettings | None = None) -> FastAPI:
    settings = settings or GoalsSettings()
    app = create_service_app(
        settings=settings,
        title="Tandem goals",
        description="Org units, people, cycles, objectives, key results and check-ins, event-sourced.",
        # A metrics position is reached when the KPI policy has handled it and the read model has
        # caught up with what the policy wrote into the goals log.
        tracked_logs=[TrackedLog.of(LOG, VIEW_SPEC), TrackedLog.of("metrics", POLICY_SPEC, feeds=LOG)],
        projections=GOALS_PROJECTIONS,
        application_class=Goals,
        domain_errors=(DomainError,),
        openapi_tags=TAGS,
    )
    app.include_router(router)
    scim.install(app)  # SCIM 2.0 at /scim/v2, with SCIM error messages there
    # What HR systems pull (imported here: those modules build on this one's models and helpers).
    from services.goals import feeds, webhooks

    app.include_router(feeds.router)
    app.include_router(webhooks.router)  # its lifespan runs the webhook delivery worker
    return app
