"""GraphQL on the gateway: the alignment tree from company to teams, with objectives, key
results, scores and KPIs.

Reads only the gateway's own read model. Every POST needs a bearer token (any role) and may
carry `Tandem-Wait-For` to read its own writes; GET only serves GraphiQL. Resolvers walk an
`Alignment` loaded a subtree at a time, so a query costs a bounded number of SQL round trips
however many units it spans; over-deep, over-aliased or over-long queries are refused before
they run.
"""

from __future__ import annotations

import asyncio
import enum
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import strawberry
from fastapi import FastAPI
from graphql import GraphQLError
from starlette.requests import HTTPConnection
from strawberry.extensions import MaskErrors, MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.fastapi import BaseContext
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import Info

from services.common.asof import AsOfViews, Instant
from services.common.auth import DATA_READERS, Principal, authenticate, require
from services.common.problems import Problem
from services.common.schemas import decode_cursor, encode_cursor
from services.common.web import WAIT_HEADER, TrackedLog, create_service_app, wait_for_read_model
from services.gateway.application import KPI as LoadedKPI
from services.gateway.application import Alignment
from services.gateway.application import KeyResult as LoadedKeyResult
from services.gateway.domain import (
    RECENT_DAYS,
    CheckInRecency,
    band,
    days_between,
    fit_points,
    mean_or_none,
    predicted_breach,
    share,
)
from services.gateway.domain import series as domain_series
from services.gateway.history import DEFAULT_PAGE as HISTORY_PAGE
from services.gateway.history import DESCRIPTION as HISTORY_DOC
from services.gateway.history import HistoryConnection
from services.gateway.history import history as history_page
from services.gateway.limits import QueryCostLimiter
from services.gateway.mutations import Mutation, MutationError, forwarding
from services.gateway.projections import alignment_projections
from services.gateway.settings import GatewaySettings
from services.gateway.subscriptions import GraphQLSocketRouter, Subscription

MAX_DEPTH = 20
MAX_ALIASES = 30
MAX_TOKENS = 5000


class BadInput(ValueError):
    """A query argument that cannot be right; its message is shown to the client (other
    errors are masked, so that internals do not leak), marked as the client's error as a
    mutation's refusal is (`extensions.code`, which graphql-core copies from the exception)."""

    @property
    def extensions(self) -> dict[str, str]:
        return {"code": "BAD_USER_INPUT"}


class Context(BaseContext):
    def __init__(self, pool: asyncpg.Pool, principal: Principal | None, as_of_views: AsOfViews | None = None):
        super().__init__()
        self.principal = principal
        self.alignment = Alignment(pool)
        self.as_of_views = as_of_views
        self.views: dict[str, Alignment] = {}
        """The read model of each root field asked `asOf`/`knownAt`, by its response key."""

    async def view_at(self, info: Info[Context, None], as_of: datetime | None, known_at: datetime | None) -> Alignment:
        """The root field's read model: live, or as of an instant (`services.common.asof`),
        which everything below the field then reads too."""
        if as_of is None and known_at is None:
            return self.alignment
        now = datetime.now(UTC)
        for name, value in (("asOf", as_of), ("knownAt", known_at)):
            if value is not None and (value.tzinfo is None or value > now):
                raise BadInput(f"{name} must be a past instant with a time zone")
        assert self.as_of_views is not None
        instant = Instant(as_of, known_at)
        alignment = Alignment(await self.as_of_views.pool(instant), now=instant.moment)
        self.views[info.path.key] = alignment
        return alignment


GraphInfo = Info[Context, None]


def view(info: GraphInfo) -> Alignment:
    """The read model a field reads: the one its root field chose (live unless asOf/knownAt)."""
    path = info.path
    while path.prev is not None:
        path = path.prev
    return info.context.views.get(str(path.key), info.context.alignment)


AS_OF = strawberry.argument(description="Read as things stood at this instant (valid time): check-ins, measurements "
                                        "and moves count from the time they apply to, anything else from when it "
                                        "was recorded. Everything below this field reads the same instant.")
KNOWN_AT = strawberry.argument(description="Read only what had been recorded by this instant (recorded time); with "
                                           "asOf, what was known then about that instant.")


def _uuid(value: str, what: str) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise BadInput(f"{what} is not an id this API gave out") from None


MAX_PAGE = 100
DEFAULT_PAGE = 20
MAX_HORIZON_DAYS = 3650
DEFAULT_HORIZON_DAYS = 30
MAX_TREE_DEPTH = 100
STATUSES = ("draft", "active", "closed", "archived")
NEWEST = 2**62
"""A check-in version after every real one: the first page starts before it."""


def _page_size(first: int) -> int:
    if not 1 <= first <= MAX_PAGE:
        raise BadInput(f"first must be from 1 to {MAX_PAGE}")
    return first


def _cursor(kind: str, *values: Any) -> str:
    return encode_cursor(kind, *values)


def _decode_cursor(after: str, kind: str, arity: int) -> list[str]:
    """The values an opaque cursor of this kind holds; anything else is a BadInput."""
    try:
        values = decode_cursor(after, arity + 1)
    except Problem:
        values = []
    if not values or values[0] != kind:
        raise BadInput("after is not a cursor this API gave out") from None
    return values[1:]


def _cycle_filter(cycle: strawberry.ID | None) -> UUID | None:
    return None if cycle is None else _uuid(cycle, "cycle")


def _id(value: UUID | None) -> strawberry.ID | None:
    return None if value is None else strawberry.ID(str(value))


@strawberry.type(description="Where a page of a connection ends.")
class PageInfo:
    has_next_page: bool
    end_cursor: str | None = strawberry.field(description="Pass as `after` for the next page (null: no items).")


@strawberry.type(description="A planning period: a quarter or a year; planning, active or closed.")
class Cycle:
    id: strawberry.ID
    name: str
    kind: str
    status: str
    starts_on: date
    ends_on: date
    parent_id: strawberry.ID | None = strawberry.field(description="The year a quarter lies in.")

    @classmethod
    def of(cls, row: asyncpg.Record | None) -> Cycle | None:
        if row is None:
            return None
        return cls(id=strawberry.ID(str(row["id"])), name=row["name"], kind=row["kind"], status=row["status"],
                   starts_on=row["starts_on"], ends_on=row["ends_on"], parent_id=_id(row["parent_id"]))


@strawberry.type(description="A common mistake the OKR literature names (a warning, never a refusal); the same "
                             "lints as the goals service's.")
class CoachingWarning:
    code: str = strawberry.field(description="too_few_key_results, too_many_key_results, objective_is_a_kpi, "
                                             "objective_without_owner, guardrail_breached, key_result_is_a_task, "
                                             "done_only_key_result or too_many_objectives.")
    message: str
    subject_kind: str = strawberry.field(description="objective, key_result or owner.")
    subject_id: strawberry.ID


@strawberry.type(description="A check-in as it was first recorded (what a correction corrects).")
class CheckInEntry:
    version: int
    value: float
    confidence: int | None
    note: str
    valid_on: date
    recorded_at: datetime
    actor: str


@strawberry.type(description="A check-in or a correction of one, as the log recorded it.")
class CheckIn:
    version: int = strawberry.field(description="The key result's version that recorded it; pages run newest first.")
    value: float
    confidence: int | None
    note: str
    valid_on: date = strawberry.field(description="The day the value applies to.")
    recorded_at: datetime
    actor: str
    measurement_id: strawberry.ID | None = strawberry.field(
        description="The KPI measurement that made it (for a correction: that of the check-in it corrects).")
    corrects_version: int | None = strawberry.field(description="For a correction: the check-in it corrects.")
    corrects: CheckInEntry | None = strawberry.field(
        description="For a correction: the check-in it corrects, as that was first recorded.")
    corrected_by: int | None = strawberry.field(description="For a corrected check-in: its latest correction.")

    @classmethod
    def of(cls, r: asyncpg.Record) -> CheckIn:
        corrects = None
        if r["corrects_version"] is not None and r["corrected_value"] is not None:
            corrects = CheckInEntry(version=r["corrects_version"], value=r["corrected_value"],
                                    confidence=r["corrected_confidence"], note=r["corrected_note"],
                                    valid_on=r["corrected_valid_on"], recorded_at=r["corrected_recorded_at"],
                                    actor=r["corrected_actor"])
        return cls(version=r["version"], value=r["value"], confidence=r["confidence"], note=r["note"],
                   valid_on=r["valid_on"], recorded_at=r["recorded_at"], actor=r["actor"],
                   measurement_id=_id(r["measurement_id"]), corrects_version=r["corrects_version"],
                   corrects=corrects, corrected_by=r["corrected_by"])


@strawberry.type
class CheckInEdge:
    cursor: str
    node: CheckIn


@strawberry.type(description="A page of a key result's check-ins, newest first.")
class CheckInConnection:
    edges: list[CheckInEdge]
    page_info: PageInfo
    total_count: int = strawberry.field(description="Check-ins and corrections in all.")


@strawberry.type(description="A key result: measurable, scored 0.0-1.0 from its latest check-in.")
class KeyResult:
    id: strawberry.ID
    objective_id: strawberry.ID
    title: str
    kind: str
    start: float | None
    target: float | None
    low: float | None
    high: float | None
    unit: str
    weight: float
    current: float | None
    valid_on: date | None = strawberry.field(description="The day the current value applies to.")
    confidence: int | None = strawberry.field(description="0-10, reported beside the score, never in it.")
    score: float | None
    band: str | None
    uuid: strawberry.Private[UUID]
    kpi_uuid: strawberry.Private[UUID | None]

    @classmethod
    def of(cls, kr: LoadedKeyResult) -> KeyResult:
        r, score = kr.row, kr.score
        return cls(id=strawberry.ID(str(r["id"])), objective_id=strawberry.ID(str(r["objective_id"])),
                   title=r["title"], kind=r["kind"], start=r["start"], target=r["target"], low=r["low"],
                   high=r["high"], unit=r["unit"], weight=r["weight"], current=r["current"],
                   valid_on=r["current_valid_on"], confidence=r["confidence"], score=score, band=band(score),
                   uuid=r["id"], kpi_uuid=r["kpi_id"])

    @strawberry.field(description="The KPI whose measurements move it, if it is bound to one.")
    async def kpi(self, info: GraphInfo) -> KPI | None:
        if self.kpi_uuid is None:
            return None
        loaded = await view(info).kpi(self.kpi_uuid)
        return None if loaded is None else KPI.of(loaded)

    @strawberry.field
    async def objective(self, info: GraphInfo) -> Objective | None:
        alignment = view(info)
        oid = UUID(str(self.objective_id))
        return None if await alignment.objective(oid) is None else Objective.of(alignment, oid)

    @strawberry.field(description=HISTORY_DOC)
    async def history(self, info: GraphInfo, first: int = HISTORY_PAGE,
                      after: str | None = None) -> HistoryConnection | None:
        return await history_page(info, "goals", "key-results", self.uuid, first, after)

    @strawberry.field(description="Its check-ins and corrections, newest first.")
    async def check_ins(self, info: GraphInfo, first: int = DEFAULT_PAGE, after: str | None = None) -> CheckInConnection:
        first = _page_size(first)
        before = NEWEST
        if after is not None:
            kr, version = _decode_cursor(after, "check-in", 2)
            if kr != str(self.uuid) or not version.isdigit() or int(version) > NEWEST:
                raise BadInput("after is not a cursor of this key result's check-ins")
            before = int(version)
        page = await view(info).check_in_pages.load((self.uuid, first, before))
        edges = [CheckInEdge(cursor=_cursor("check-in", self.uuid, r["version"]), node=CheckIn.of(r))
                 for r in page.rows]
        return CheckInConnection(edges=edges, total_count=page.total, page_info=PageInfo(
            has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None))


@strawberry.type(description="An objective this one contributes to besides its parent, with the weight it counts "
                             "with in that one's rolledUpScore.")
class Contribution:
    objective: Objective
    weight: float


@strawberry.type(description="A KPI that must stay healthy while the objective is pursued.")
class Guardrail:
    kpi_id: strawberry.ID
    kpi: KPI | None = strawberry.field(description="Null while the metrics log has not told the gateway of it.")
    breached: bool = strawberry.field(description="Some rule of the KPI fired and has not recovered.")


@strawberry.type(description="An objective with its key results and the objectives aligned to it.")
class Objective:
    id: strawberry.ID
    title: str
    description: str
    status: str
    owner_kind: str
    owner_id: strawberry.ID
    unit_id: strawberry.ID
    cycle_id: strawberry.ID
    parent_id: strawberry.ID | None
    score: float | None = strawberry.field(description="Weighted mean of its own key results' scores.")
    rolled_up_score: float | None = strawberry.field(
        description="Weighted mean over its key results (their weights), the objectives aligned to it "
                    "(weight 1 each) and those contributing to it (their contribution weights), each with its own "
                    "rolledUpScore; archived objectives count in no other's.")
    final_score: float | None = strawberry.field(description="The grade given when its cycle closed.")
    band: str | None = strawberry.field(description="Band of `score`: red < 0.4 <= yellow < 0.7 <= green.")
    uuid: strawberry.Private[UUID]

    @classmethod
    def of(cls, alignment: Alignment, oid: UUID) -> Objective:
        o = alignment.objectives[oid]
        score = alignment.scores[oid]
        return cls(id=strawberry.ID(str(oid)), title=o["title"], description=o["description"],
                   status=o["status"], owner_kind=o["owner_kind"], owner_id=strawberry.ID(str(o["owner_id"])),
                   unit_id=strawberry.ID(str(o["unit_id"])), cycle_id=strawberry.ID(str(o["cycle_id"])),
                   parent_id=_id(o["parent_id"]), score=score, rolled_up_score=alignment.rolled_up[oid],
                   band=band(score), final_score=o["final_score"], uuid=oid)

    @strawberry.field
    def key_results(self, info: GraphInfo) -> list[KeyResult]:
        return [KeyResult.of(kr) for kr in view(info).key_results[self.uuid]]

    @strawberry.field(description="The objectives aligned to this one.")
    def children(self, info: GraphInfo) -> list[Objective]:
        alignment = view(info)
        return [Objective.of(alignment, c) for c in alignment.aligned[self.uuid]]

    @strawberry.field(description="The objective this one aligns to.")
    async def parent(self, info: GraphInfo) -> Objective | None:
        if self.parent_id is None:
            return None
        alignment = view(info)
        parent = await alignment.objective(UUID(self.parent_id))
        return None if parent is None else Objective.of(alignment, parent["id"])

    @strawberry.field(description="The objectives this one contributes to besides its parent, with the weights.")
    async def contributes_to(self, info: GraphInfo) -> list[Contribution]:
        alignment = view(info)
        weights = alignment.contributes_to.get(self.uuid, {})
        targets = await asyncio.gather(*(alignment.objective(t) for t in weights))
        return [Contribution(objective=Objective.of(alignment, t["id"]), weight=weights[t["id"]])
                for t in targets if t is not None]

    @strawberry.field(description="KPIs that must stay healthy while it is pursued, in the order named.")
    def guardrails(self, info: GraphInfo) -> list[Guardrail]:
        alignment = view(info)
        out = []
        for kpi_id in alignment.guardrails.get(self.uuid, ()):
            kpi = alignment.kpis.get(kpi_id)
            out.append(Guardrail(kpi_id=strawberry.ID(str(kpi_id)), kpi=KPI.of(kpi) if kpi else None,
                                 breached=bool(kpi and kpi.breached)))
        return out

    @strawberry.field(description="Coaching warnings on the objective, its guardrails and its key results, as the "
                                  "goals service shows them (none for an archived objective).")
    def warnings(self, info: GraphInfo) -> list[CoachingWarning]:
        return [CoachingWarning(code=w.code, message=w.message, subject_kind=w.subject_kind,
                                subject_id=strawberry.ID(str(w.subject_id)))
                for w in view(info).warnings(self.uuid)]

    @strawberry.field
    async def cycle(self, info: GraphInfo) -> Cycle | None:
        return Cycle.of(await view(info).cycle(UUID(self.cycle_id)))

    @strawberry.field
    async def unit(self, info: GraphInfo) -> Unit | None:
        return Unit.of(await view(info).unit_row(UUID(self.unit_id)))

    @strawberry.field(description=HISTORY_DOC)
    async def history(self, info: GraphInfo, first: int = HISTORY_PAGE,
                      after: str | None = None) -> HistoryConnection | None:
        return await history_page(info, "goals", "objectives", self.uuid, first, after)

    @strawberry.field(description="The person who owns it (null when a unit owns it).")
    async def owner(self, info: GraphInfo) -> Person | None:
        if self.owner_kind != "person":
            return None
        return Person.of(await view(info).person(UUID(self.owner_id)))


@strawberry.type
class ObjectiveEdge:
    cursor: str
    node: Objective


@strawberry.type(description="A page of objectives, in the order they were created.")
class ObjectiveConnection:
    edges: list[ObjectiveEdge]
    page_info: PageInfo
    total_count: int = strawberry.field(description="Objectives that match the filters, on all pages.")


@strawberry.type
class ThresholdRule:
    id: str
    kind: str = strawberry.field(description="below, above or outside.")
    threshold: float | None
    low: float | None
    high: float | None
    severity: str
    pending_count: int = strawberry.field(description="Consecutive violating measurements before it fires.")
    pending_for: int = strawberry.field(
        description="Seconds of valid time the violating measurements must span before it fires.")
    recovery: float | None
    state: str = strawberry.field(
        description="breached (from its breach until it recovers), pending (the latest value violates it, "
                    "not yet fired) or ok.")


@strawberry.enum(description="A calendar period in UTC; weeks start on Monday.")
class Period(enum.Enum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


@strawberry.type(description="One period's measurements (values as last corrected).")
class SeriesPoint:
    start: date = strawberry.field(description="The period's first day.")
    count: int
    mean: float
    min: float
    max: float
    last: float = strawberry.field(description="The value of the period's latest measurement by valid time.")


@strawberry.type
class PredictedBreach:
    rule_id: str
    kind: str
    severity: str
    threshold: float | None
    low: float | None
    high: float | None
    at: datetime = strawberry.field(description="When the trend line crosses the threshold (asOf if it already has).")
    on: date = strawberry.field(description="The day of `at` (UTC).")
    in_days: float


@strawberry.type(description="A least-squares line through the KPI's measurements (value against valid time, in "
                             "days from asOf), as the metrics service's forecast draws it.")
class Forecast:
    as_of: datetime
    horizon_at: datetime = strawberry.field(
        description="`days` after asOf; else the end of the given cycle; else the end of the current cycle (the "
                    "shortest active cycle containing today); else 30 days after asOf.")
    count: int = strawberry.field(description="Measurements the line is fitted to (those up to asOf).")
    slope_per_day: float | None = strawberry.field(description="Null with fewer than two measurement times.")
    intercept: float | None = strawberry.field(description="The line's value at asOf.")
    projected_value: float | None = strawberry.field(description="The line's value at horizonAt.")
    predicted_breach: PredictedBreach | None = strawberry.field(
        description="The first rule the trend line violates before horizonAt, if any.")


@strawberry.type(description="An always-on metric of a unit, with its threshold rules.")
class KPI:
    id: strawberry.ID
    name: str
    unit: str
    unit_id: strawberry.ID | None = strawberry.field(description="The org unit the KPI belongs to.")
    owner_id: strawberry.ID | None
    direction: str
    cadence: str
    target: float | None = strawberry.field(
        description="The target in force today (UTC): the change with the latest effective day on or before "
                    "today, else the target the KPI was defined with.")
    state: str = strawberry.field(
        description="breached, stale, pending, ok or no_data: the first that holds (no_data: never measured).")
    stale: bool = strawberry.field(description="No measurement came within the cadence (until one does).")
    latest_value: float | None = strawberry.field(description="The value of the latest measurement by valid time.")
    latest_measured_at: datetime | None
    rules: list[ThresholdRule]
    uuid: strawberry.Private[UUID]
    loaded: strawberry.Private[LoadedKPI]

    @classmethod
    def of(cls, kpi: LoadedKPI) -> KPI:
        k = kpi.row
        latest = k["latest_value"]
        return cls(
            id=strawberry.ID(str(k["id"])), name=k["name"], unit=k["unit"], unit_id=_id(k["unit_id"]),
            owner_id=_id(k["owner_id"]), direction=k["direction"], cadence=k["cadence"],
            target=kpi.target, state=kpi.state, stale=k["stale"], latest_value=latest,
            latest_measured_at=k["latest_measured_at"], uuid=k["id"], loaded=kpi,
            rules=[ThresholdRule(id=r.id, kind=r.kind, threshold=r.threshold, low=r.low, high=r.high,
                                 severity=r.severity, pending_count=r.pending_count, pending_for=r.pending_for,
                                 recovery=r.recovery, state=r.state(latest))
                   for r in kpi.rules])

    @strawberry.field(description="Count, mean, lowest, highest and last value per period that has measurements, "
                                  "oldest first.")
    async def series(self, info: GraphInfo, period: Period = Period.WEEK) -> list[SeriesPoint]:
        points = await view(info).measurements.load(self.uuid)
        return [SeriesPoint(start=s.start, count=s.count, mean=s.mean, min=s.min, max=s.max, last=s.last)
                for s in domain_series(points, period.value)]

    @strawberry.field(description=HISTORY_DOC)
    async def history(self, info: GraphInfo, first: int = HISTORY_PAGE,
                      after: str | None = None) -> HistoryConnection | None:
        return await history_page(info, "metrics", "kpis", self.uuid, first, after)

    @strawberry.field(description="Where the measurements' trend leads: give `days` or `cycle`, not both.")
    async def forecast(self, info: GraphInfo, days: int | None = None, cycle: strawberry.ID | None = None) -> Forecast:
        alignment = view(info)
        as_of = alignment.now
        if days is not None and cycle is not None:
            raise BadInput("give days or cycle, not both")
        if days is not None:
            if not 1 <= days <= MAX_HORIZON_DAYS:
                raise BadInput(f"days must be from 1 to {MAX_HORIZON_DAYS}")
            horizon = float(days)
        else:
            row = await alignment.cycle(_uuid(cycle, "cycle")) if cycle is not None else await alignment.current_cycle()
            if row is None and cycle is not None:
                raise BadInput("cycle is not a cycle this API knows")
            horizon = DEFAULT_HORIZON_DAYS if row is None else days_between(
                as_of, datetime.combine(row["ends_on"] + timedelta(days=1), time(), tzinfo=UTC))
            if horizon <= 0:
                raise BadInput("the cycle has ended: forecast to a cycle that has not")
        points = await alignment.measurements.load(self.uuid)
        fit = fit_points(points, as_of)
        out = Forecast(as_of=as_of, horizon_at=as_of + timedelta(days=horizon), count=fit.count if fit else sum(
            1 for p in points if p.measured_at <= as_of), slope_per_day=None, intercept=None, projected_value=None,
            predicted_breach=None)
        if fit is None:
            return out
        out.slope_per_day, out.intercept, out.projected_value = fit.slope, fit.intercept, fit.at(horizon)
        breach = predicted_breach(self.loaded.rules, fit, horizon)
        if breach is not None:
            at = as_of + timedelta(days=breach.days)
            r = breach.rule
            out.predicted_breach = PredictedBreach(rule_id=r.id, kind=r.kind, severity=r.severity,
                                                   threshold=r.threshold, low=r.low, high=r.high, at=at,
                                                   on=at.date(), in_days=breach.days)
        return out


@strawberry.type(description="A person in the organisation.")
class Person:
    id: strawberry.ID
    name: str
    email: str
    joined_on: date | None
    left_on: date | None = strawberry.field(description="The last day, once leaving is recorded.")
    uuid: strawberry.Private[UUID]
    unit_uuid: strawberry.Private[UUID]
    manager_uuid: strawberry.Private[UUID | None]

    @classmethod
    def of(cls, row: asyncpg.Record | None) -> Person | None:
        if row is None:
            return None
        return cls(id=strawberry.ID(str(row["id"])), name=row["name"], email=row["email"],
                   joined_on=row["joined_on"], left_on=row["left_on"], uuid=row["id"], unit_uuid=row["unit_id"],
                   manager_uuid=row["manager_id"])

    @strawberry.field(description="The unit the person is in now.")
    async def unit(self, info: GraphInfo) -> Unit | None:
        return Unit.of(await view(info).unit_row(self.unit_uuid))

    @strawberry.field(description="The person's manager now.")
    async def manager(self, info: GraphInfo) -> Person | None:
        if self.manager_uuid is None:
            return None
        return Person.of(await view(info).person(self.manager_uuid))

    @strawberry.field(description=HISTORY_DOC)
    async def history(self, info: GraphInfo, first: int = HISTORY_PAGE,
                      after: str | None = None) -> HistoryConnection | None:
        return await history_page(info, "goals", "people", self.uuid, first, after)

    @strawberry.field(description="The objectives the person owns, optionally of one cycle only.")
    async def objectives(self, info: GraphInfo, cycle: strawberry.ID | None = None) -> list[Objective]:
        alignment = view(info)
        cycle_id = _cycle_filter(cycle)
        return [Objective.of(alignment, o) for o in await alignment.owned_objectives(self.uuid)
                if cycle_id is None or alignment.objectives[o]["cycle_id"] == cycle_id]


@strawberry.type(description="An org unit: the company, a department or a team.")
class Unit:
    id: strawberry.ID
    name: str
    kind: str
    parent_id: strawberry.ID | None
    uuid: strawberry.Private[UUID]
    parent_uuid: strawberry.Private[UUID | None]

    @classmethod
    def of(cls, row: asyncpg.Record | None) -> Unit | None:
        if row is None:
            return None
        return cls(id=strawberry.ID(str(row["id"])), name=row["name"], kind=row["kind"],
                   parent_id=_id(row["parent_id"]), uuid=row["id"], parent_uuid=row["parent_id"])

    async def _loaded(self, info: GraphInfo) -> Alignment:
        alignment = view(info)
        await alignment.unit(self.uuid)
        return alignment

    @strawberry.field
    async def parent(self, info: GraphInfo) -> Unit | None:
        if self.parent_uuid is None:
            return None
        return Unit.of(await view(info).unit_row(self.parent_uuid))

    @strawberry.field(description="The units above this one, the company first.")
    async def ancestors(self, info: GraphInfo) -> list[Unit]:
        return [u for row in await view(info).ancestors(self.uuid) if (u := Unit.of(row))]

    @strawberry.field
    async def children(self, info: GraphInfo) -> list[Unit]:
        alignment = await self._loaded(info)
        return [u for c in alignment.children[self.uuid] if (u := Unit.of(alignment.units[c]))]

    @strawberry.field(description="The units below this one, level by level (by name within a level), down to "
                                  "`depth` levels (all of them when null).")
    async def descendants(self, info: GraphInfo, depth: int | None = None) -> list[Unit]:
        if depth is not None and depth < 0:
            raise BadInput("depth must be at least 0")
        alignment = await self._loaded(info)
        return [u for d in alignment.descendants(self.uuid, depth) if (u := Unit.of(alignment.units[d]))]

    @strawberry.field(description="The people in the unit now, by name (with those who left if includeLeft).")
    async def people(self, info: GraphInfo, include_left: bool = False) -> list[Person]:
        alignment = await self._loaded(info)
        rows = (alignment.people[p] for p in alignment.people_of_unit[self.uuid])
        return [p for row in rows if (include_left or row["left_on"] is None) and (p := Person.of(row))]

    @strawberry.field(description="The unit's own objectives in the order they were created, optionally of one "
                                  "cycle or status only, a page at a time (first: 1-100).")
    async def objectives(self, info: GraphInfo, cycle: strawberry.ID | None = None, status: str | None = None,
                         first: int = DEFAULT_PAGE, after: str | None = None) -> ObjectiveConnection:
        first = _page_size(first)
        cycle_id = _cycle_filter(cycle)
        if status is not None and status not in STATUSES:
            raise BadInput(f"status must be one of {', '.join(STATUSES)}")
        start_after: tuple[datetime, UUID] | None = None
        if after is not None:
            created_at, oid = _decode_cursor(after, "objective", 2)
            try:
                start_after = (datetime.fromisoformat(created_at), UUID(oid))
            except ValueError:
                start_after = None
            if start_after is None or start_after[0].tzinfo is None:
                raise BadInput("after is not a cursor this API gave out")
        alignment = await self._loaded(info)
        rows = [alignment.objectives[o] for o in alignment.objectives_of_unit[self.uuid]]
        rows = [o for o in rows if (cycle_id is None or o["cycle_id"] == cycle_id)
                and (status is None or o["status"] == status)]
        remaining = rows if start_after is None else [o for o in rows if (o["created_at"], o["id"]) > start_after]
        edges = [ObjectiveEdge(cursor=_cursor("objective", o["created_at"].isoformat(), o["id"]),
                               node=Objective.of(alignment, o["id"])) for o in remaining[:first]]
        return ObjectiveConnection(edges=edges, total_count=len(rows), page_info=PageInfo(
            has_next_page=len(remaining) > first, end_cursor=edges[-1].cursor if edges else None))

    @strawberry.field(description=HISTORY_DOC)
    async def history(self, info: GraphInfo, first: int = HISTORY_PAGE,
                      after: str | None = None) -> HistoryConnection | None:
        return await history_page(info, "goals", "units", self.uuid, first, after)

    @strawberry.field
    async def kpis(self, info: GraphInfo) -> list[KPI]:
        alignment = await self._loaded(info)
        return [KPI.of(k) for k in alignment.kpis_of_unit[self.uuid]]


@strawberry.type(description="A unit in the alignment cascade, with its objectives of the cycle and the units "
                             "below it.")
class AlignmentNode:
    unit: Unit
    depth: int = strawberry.field(description="Levels below the node the cascade started from (0 there).")
    score: float | None = strawberry.field(
        description="The plain mean of the rolledUpScore of the unit's own objectives in the cycle (archived ones "
                    "left out), leaving out those without one; null if none has one.")
    band: str | None = strawberry.field(description="Band of `score`: red < 0.4 <= yellow < 0.7 <= green.")
    objectives: list[Objective] = strawberry.field(
        description="The unit's own objectives in the cycle (all cycles when none is given), archived ones left "
                    "out, in the order they were created.")
    cycle_uuid: strawberry.Private[UUID | None]
    max_depth: strawberry.Private[int]

    @classmethod
    def of(cls, alignment: Alignment, unit_id: UUID, cycle: UUID | None, depth: int, max_depth: int) -> AlignmentNode:
        objectives = [Objective.of(alignment, o) for o in alignment.objectives_of_unit[unit_id]
                      if alignment.objectives[o]["status"] != "archived"
                      and (cycle is None or alignment.objectives[o]["cycle_id"] == cycle)]
        score = mean_or_none(o.rolled_up_score for o in objectives)
        return cls(unit=Unit.of(alignment.units[unit_id]), depth=depth, score=score,  # type: ignore[arg-type]
                   band=band(score), objectives=objectives, cycle_uuid=cycle, max_depth=max_depth)

    @strawberry.field(description="The nodes of the units right below, down to the `depth` asked for.")
    def children(self, info: GraphInfo) -> list[AlignmentNode]:
        if self.depth >= self.max_depth:
            return []
        alignment = view(info)
        return [AlignmentNode.of(alignment, c, self.cycle_uuid, self.depth + 1, self.max_depth)
                for c in alignment.children[self.unit.uuid]]


@strawberry.type(description="Meta-metrics of how a unit's subtree (the unit and every unit below it) runs its OKRs, "
                             "over its objectives in the cycle (all cycles when none is given), archived ones left "
                             "out, and their key results.")
class Health:
    unit: Unit
    cycle_id: strawberry.ID | None
    objective_count: int
    key_result_count: int
    checked_in_recently: float | None = strawberry.field(
        description=f"Share of key results whose latest check-in applies to a day at most {RECENT_DAYS} days "
                    "before today (UTC), of all key results (those never checked in count as not recent); null "
                    "without key results.")
    median_days_since_check_in: float | None = strawberry.field(
        description="Median of the days from the latest day a key result's check-ins apply to until today, over "
                    "the key results checked in at all; null if none is.")
    never_checked_in: int = strawberry.field(description="Key results without any check-in.")
    aligned_share: float | None = strawberry.field(
        description="Share of objectives aligned to a parent objective; null without objectives.")
    orphan_objectives: list[Objective] = strawberry.field(
        description="Objectives aligned to no parent that are not in the company (the root unit, whose "
                    "objectives have nothing to align to), in the order they were created.")
    key_results_without_confidence: int = strawberry.field(
        description="Key results checked in whose current check-in carries no confidence (those a KPI moves "
                    "included: a measurement says nothing of anyone's belief).")
    breached_guardrails: int = strawberry.field(
        description="Guardrails (objective, KPI) of these objectives whose KPI is breached.")
    coaching_warnings: int = strawberry.field(
        description="Coaching warnings these objectives show (each objective's `warnings`: its own, its "
                    "guardrails' and its key results').")


async def _health(alignment: Alignment, unit_id: UUID, cycle: UUID | None) -> Health | None:
    unit = await alignment.unit(unit_id)
    if unit is None:
        return None
    units = [unit_id, *alignment.descendants(unit_id)]
    objectives = sorted((o for u in units for o in alignment.objectives_of_unit[u]
                         if alignment.objectives[o]["status"] != "archived"
                         and (cycle is None or alignment.objectives[o]["cycle_id"] == cycle)),
                        key=lambda o: (alignment.objectives[o]["created_at"], o))
    key_results = [kr.row for o in objectives for kr in alignment.key_results[o]]
    recency = CheckInRecency.of((kr["current_valid_on"] for kr in key_results), alignment.today)
    rows = [alignment.objectives[o] for o in objectives]
    orphans = [o["id"] for o in rows if o["parent_id"] is None and alignment.units[o["unit_id"]]["parent_id"] is not None]
    return Health(
        unit=Unit.of(unit), cycle_id=_id(cycle), objective_count=len(objectives),  # type: ignore[arg-type]
        key_result_count=len(key_results), checked_in_recently=recency.recent_share,
        median_days_since_check_in=recency.median_days_since, never_checked_in=recency.never,
        aligned_share=share(sum(1 for o in rows if o["parent_id"] is not None), len(rows)),
        orphan_objectives=[Objective.of(alignment, o) for o in orphans],
        key_results_without_confidence=sum(1 for kr in key_results
                                           if kr["current_valid_on"] is not None and kr["confidence"] is None),
        breached_guardrails=sum(1 for o in objectives for g in alignment.guardrail_facts(o) if g.breached),
        coaching_warnings=sum(len(alignment.warnings(o)) for o in objectives))


@strawberry.type
class Query:
    @strawberry.field(description="The company: the root of the org tree (null before there is one).")
    async def organization(
        self, info: GraphInfo, as_of: Annotated[datetime | None, AS_OF] = None,
        known_at: Annotated[datetime | None, KNOWN_AT] = None,
    ) -> Unit | None:
        return Unit.of(await (await info.context.view_at(info, as_of, known_at)).organization())

    @strawberry.field
    async def unit(
        self, info: GraphInfo, id: strawberry.ID,  # noqa: A002 - GraphQL's name
        as_of: Annotated[datetime | None, AS_OF] = None, known_at: Annotated[datetime | None, KNOWN_AT] = None,
    ) -> Unit | None:
        return Unit.of(await (await info.context.view_at(info, as_of, known_at)).unit(_uuid(id, "id")))

    @strawberry.field(description="The cascade from a unit (the company when none is given) down `depth` levels "
                                  "(0-100), each unit with its objectives of the cycle and its score.")
    async def alignment(self, info: GraphInfo, unit: strawberry.ID | None = None, cycle: strawberry.ID | None = None,
                        depth: int = 10, as_of: Annotated[datetime | None, AS_OF] = None,
                        known_at: Annotated[datetime | None, KNOWN_AT] = None) -> AlignmentNode | None:
        if not 0 <= depth <= MAX_TREE_DEPTH:
            raise BadInput(f"depth must be from 0 to {MAX_TREE_DEPTH}")
        cycle_id = _cycle_filter(cycle)
        alignment = await info.context.view_at(info, as_of, known_at)
        row = await alignment.organization() if unit is None else await alignment.unit(_uuid(unit, "unit"))
        return None if row is None else AlignmentNode.of(alignment, row["id"], cycle_id, 0, depth)

    @strawberry.field(description="How the unit's subtree runs its OKRs (see Health's fields); null for an unknown "
                                  "unit.")
    async def health(self, info: GraphInfo, unit: strawberry.ID, cycle: strawberry.ID | None = None) -> Health | None:
        return await _health(view(info), _uuid(unit, "unit"), _cycle_filter(cycle))

    @strawberry.field
    async def objective(
        self, info: GraphInfo, id: strawberry.ID,  # noqa: A002
        as_of: Annotated[datetime | None, AS_OF] = None, known_at: Annotated[datetime | None, KNOWN_AT] = None,
    ) -> Objective | None:
        alignment = await info.context.view_at(info, as_of, known_at)
        row = await alignment.objective(_uuid(id, "id"))
        return None if row is None else Objective.of(alignment, row["id"])

    @strawberry.field
    async def key_result(
        self, info: GraphInfo, id: strawberry.ID,  # noqa: A002
        as_of: Annotated[datetime | None, AS_OF] = None, known_at: Annotated[datetime | None, KNOWN_AT] = None,
    ) -> KeyResult | None:
        kr = await (await info.context.view_at(info, as_of, known_at)).key_result(_uuid(id, "id"))
        return None if kr is None else KeyResult.of(kr)

    @strawberry.field
    async def kpi(
        self, info: GraphInfo, id: strawberry.ID,  # noqa: A002
        as_of: Annotated[datetime | None, AS_OF] = None, known_at: Annotated[datetime | None, KNOWN_AT] = None,
    ) -> KPI | None:
        kpi = await (await info.context.view_at(info, as_of, known_at)).kpi(_uuid(id, "id"))
        return None if kpi is None else KPI.of(kpi)

    @strawberry.field
    async def person(self, info: GraphInfo, id: strawberry.ID) -> Person | None:  # noqa: A002
        return Person.of(await view(info).person(_uuid(id, "id")))

    @strawberry.field(description="Every cycle, by start (a year before its first quarter).")
    async def cycles(self, info: GraphInfo) -> list[Cycle]:
        return [c for row in await view(info).cycles() if (c := Cycle.of(row))]


def _mask(error: GraphQLError) -> bool:
    """Show validation errors, BadInput and a service's refusal of a mutation; mask anything unexpected."""
    return error.original_error is not None and not isinstance(error.original_error, BadInput | MutationError)


class GatewaySchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        """Log what went wrong on our side; a client's bad query is its answer, not a log line."""
        super().process_errors([e for e in errors if _mask(e)], execution_context)


schema = GatewaySchema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        partial(QueryDepthLimiter, max_depth=MAX_DEPTH),
        partial(MaxAliasesLimiter, max_alias_count=MAX_ALIASES),
        partial(MaxTokensLimiter, max_token_count=MAX_TOKENS),
        partial(QueryCostLimiter, max_aliases=MAX_ALIASES),
        partial(MaskErrors, should_mask_error=_mask),
    ],
)


def schema_sdl() -> str:
    """The schema in SDL, as `contracts/graphql/schema.graphql` holds it."""
    return str(schema)


async def graphql_context(connection: HTTPConnection) -> Context:
    """Authenticate every operation and honour Tandem-Wait-For; GET serves only GraphiQL. A
    websocket authenticates on its connection_init instead (`GraphQLSocketRouter`)."""
    principal = None
    if connection.scope["type"] == "http" and connection.scope.get("method") != "GET":
        principal = require(*DATA_READERS)(authenticate(connection))  # hr_sync: SCIM and the feeds only
        await wait_for_read_model(connection, connection.headers.get(WAIT_HEADER))
    return Context(connection.app.state.pool, principal, connection.app.state.as_of_views)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    projections = alignment_projections(settings.schema_name)
    goals, metrics = projections
    app = create_service_app(
        settings=settings,
        title="Tandem gateway",
        description="GraphQL over the alignment read model: org units, objectives, key results, KPIs.",
        tracked_logs=[TrackedLog.of("goals", goals), TrackedLog.of("metrics", metrics)],
        projections=projections,
    )
    app.include_router(GraphQLSocketRouter(schema, path="/graphql", context_getter=graphql_context,
                                           graphql_ide="graphiql", allow_queries_via_get=False,
                                           subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
                                           lifespan=forwarding))
    return app
