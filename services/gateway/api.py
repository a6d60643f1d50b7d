"""GraphQL on the gateway: the alignment tree from company to teams, with objectives, key
results, scores and KPIs.

Reads only the gateway's own read model. Every POST needs a bearer token (any role) and may
carry `Tandem-Wait-For` to read its own writes; GET only serves GraphiQL. Resolvers walk an
`Alignment` loaded a subtree at a time, so a query costs a bounded number of SQL round trips
however many units it spans; over-deep, over-aliased or over-long queries are refused before
they run.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import asyncpg
import strawberry
from fastapi import FastAPI
from graphql import GraphQLError
from starlette.requests import HTTPConnection
from strawberry.extensions import MaskErrors, MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.fastapi import BaseContext, GraphQLRouter
from strawberry.types import Info

from services.common.auth import READERS, Principal, authenticate, require
from services.common.web import WAIT_HEADER, TrackedLog, create_service_app, wait_for_read_model
from services.gateway.application import KPI as LoadedKPI
from services.gateway.application import Alignment
from services.gateway.domain import band
from services.gateway.projections import alignment_projections
from services.gateway.settings import GatewaySettings

MAX_DEPTH = 20
MAX_ALIASES = 30
MAX_TOKENS = 5000


class BadInput(ValueError):
    """A query argument that cannot be right; its message is shown to the client (other
    errors are masked, so that internals do not leak)."""


class Context(BaseContext):
    def __init__(self, pool: asyncpg.Pool, principal: Principal | None):
        super().__init__()
        self.principal = principal
        self.alignment = Alignment(pool)


GraphInfo = Info[Context, None]


def _uuid(value: str, what: str) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise BadInput(f"{what} is not an id this API gave out") from None


@strawberry.type(description="A key result: measurable, scored 0.0-1.0 from its latest check-in.")
class KeyResult:
    id: strawberry.ID
    title: str
    kind: str
    start: float | None
    target: float | None
    low: float | None
    high: float | None
    unit: str
    weight: float
    current: float | None
    confidence: int | None = strawberry.field(description="0-10, reported beside the score, never in it.")
    score: float | None
    band: str | None


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
                    "(weight 1 each) and those contributing to it (their contribution weights).")
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
                   parent_id=strawberry.ID(str(o["parent_id"])) if o["parent_id"] else None,
                   score=score, rolled_up_score=alignment.rolled_up[oid], band=band(score),
                   final_score=o["final_score"], uuid=oid)

    @strawberry.field
    def key_results(self, info: GraphInfo) -> list[KeyResult]:
        out = []
        for kr in info.context.alignment.key_results[self.uuid]:
            r, score = kr.row, kr.score
            out.append(KeyResult(
                id=strawberry.ID(str(r["id"])), title=r["title"], kind=r["kind"], start=r["start"],
                target=r["target"], low=r["low"], high=r["high"], unit=r["unit"], weight=r["weight"],
                current=r["current"], confidence=r["confidence"], score=score, band=band(score)))
        return out

    @strawberry.field(description="The objectives aligned to this one.")
    def children(self, info: GraphInfo) -> list[Objective]:
        alignment = info.context.alignment
        return [Objective.of(alignment, c) for c in alignment.aligned[self.uuid]]


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


@strawberry.type(description="An always-on metric of a unit, with its threshold rules.")
class KPI:
    id: strawberry.ID
    name: str
    unit: str
    direction: str
    target: float | None = strawberry.field(
        description="The target in force today (UTC): the change with the latest effective day on or before "
                    "today, else the target the KPI was defined with.")
    state: str = strawberry.field(
        description="breached, stale, pending, ok or no_data: the first that holds (no_data: never measured).")
    stale: bool = strawberry.field(description="No measurement came within the cadence (until one does).")
    latest_value: float | None = strawberry.field(description="The value of the latest measurement by valid time.")
    latest_measured_at: datetime | None
    rules: list[ThresholdRule]

    @classmethod
    def of(cls, kpi: LoadedKPI) -> KPI:
        k = kpi.row
        latest = k["latest_value"]
        return cls(
            id=strawberry.ID(str(k["id"])), name=k["name"], unit=k["unit"], direction=k["direction"],
            target=kpi.target, state=kpi.state, stale=k["stale"], latest_value=latest,
            latest_measured_at=k["latest_measured_at"],
            rules=[ThresholdRule(id=r.id, kind=r.kind, threshold=r.threshold, low=r.low, high=r.high,
                                 severity=r.severity, pending_count=r.pending_count, pending_for=r.pending_for,
                                 recovery=r.recovery, state=r.state(latest))
                   for r in kpi.rules])


@strawberry.type(description="An org unit: the company, a department or a team.")
class Unit:
    id: strawberry.ID
    name: str
    kind: str
    uuid: strawberry.Private[UUID]
    parent_uuid: strawberry.Private[UUID | None]

    @classmethod
    def of(cls, row: asyncpg.Record | None) -> Unit | None:
        if row is None:
            return None
        return cls(id=strawberry.ID(str(row["id"])), name=row["name"], kind=row["kind"],
                   uuid=row["id"], parent_uuid=row["parent_id"])

    @strawberry.field
    async def parent(self, info: GraphInfo) -> Unit | None:
        if self.parent_uuid is None:
            return None
        return Unit.of(await info.context.alignment.unit(self.parent_uuid))

    @strawberry.field
    def children(self, info: GraphInfo) -> list[Unit]:
        alignment = info.context.alignment
        return [u for c in alignment.children[self.uuid] if (u := Unit.of(alignment.units[c]))]

    @strawberry.field(description="The unit's own objectives, optionally of one cycle only.")
    def objectives(self, info: GraphInfo, cycle: strawberry.ID | None = None) -> list[Objective]:
        alignment = info.context.alignment
        cycle_id = _uuid(cycle, "cycle") if cycle is not None else None
        return [Objective.of(alignment, o) for o in alignment.objectives_of_unit[self.uuid]
                if cycle_id is None or alignment.objectives[o]["cycle_id"] == cycle_id]

    @strawberry.field
    def kpis(self, info: GraphInfo) -> list[KPI]:
        return [KPI.of(k) for k in info.context.alignment.kpis_of_unit[self.uuid]]


@strawberry.type
class Query:
    @strawberry.field(description="The company: the root of the org tree (null before there is one).")
    async def organization(self, info: GraphInfo) -> Unit | None:
        return Unit.of(await info.context.alignment.organization())

    @strawberry.field
    async def unit(self, info: GraphInfo, id: strawberry.ID) -> Unit | None:  # noqa: A002 - GraphQL's name
        return Unit.of(await info.context.alignment.unit(_uuid(id, "id")))


def _mask(error: GraphQLError) -> bool:
    """Show validation errors and BadInput; mask anything unexpected."""
    return error.original_error is not None and not isinstance(error.original_error, BadInput)


class GatewaySchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        """Log what went wrong on our side; a client's bad query is its answer, not a log line."""
        super().process_errors([e for e in errors if _mask(e)], execution_context)


schema = GatewaySchema(
    query=Query,
    extensions=[
        partial(QueryDepthLimiter, max_depth=MAX_DEPTH),
        partial(MaxAliasesLimiter, max_alias_count=MAX_ALIASES),
        partial(MaxTokensLimiter, max_token_count=MAX_TOKENS),
        partial(MaskErrors, should_mask_error=_mask),
    ],
)


def schema_sdl() -> str:
    """The schema in SDL, as `contracts/graphql/schema.graphql` holds it."""
    return str(schema)


async def graphql_context(connection: HTTPConnection) -> Context:
    """Authenticate every operation and honour Tandem-Wait-For; GET serves only GraphiQL."""
    principal = None
    if connection.scope.get("method") != "GET":
        principal = require(*READERS)(authenticate(connection))
        await wait_for_read_model(connection, connection.headers.get(WAIT_HEADER))
    return Context(connection.app.state.pool, principal)


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
    app.include_router(GraphQLRouter(schema, path="/graphql", context_getter=graphql_context,
                                     graphql_ide="graphiql", allow_queries_via_get=False,
                                     subscription_protocols=()))
    return app
