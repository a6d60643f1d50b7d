"""What every service's HTTP app shares: start-up and shut-down of the database pool and the
projection threads, problem details, health and readiness, the command context of a request,
and read-your-writes positions.

Positions: a write answers with the header `Tandem-Position: <log>=<n>` (and `position` in its
body); a read sent with `Tandem-Wait-For: <log>=<n>[, <log>=<n>]` is answered once the read
model has processed those positions, or with 504 if it does not within the read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from services.common import audit_routes, database
from services.common.asof import AsOfViews, Instant, instant_of, read_pool
from services.common.auth import Principal, TokenVerifier
from services.common.eventstore import CommandContext, TandemApplication, Written, new_correlation_id, run_command
from services.common.idempotency import IdempotencyClaim, KeyReused, request_hash
from services.common.problems import Problem, ProblemDetail, install_problem_handlers
from services.common.projections import ProjectionSpec, ProjectionThread, start_runners, stop_runners
from services.common.schemas import WriteResult
from services.common.settings import ServiceSettings
from services.common.telemetry import current_trace_id, setup_telemetry, shutdown_telemetry

log = logging.getLogger(__name__)

POSITION_HEADER = "Tandem-Position"
READ_POSITION_HEADER = "Tandem-Read-Position"
WAIT_HEADER = "Tandem-Wait-For"
CORRELATION_HEADER = "X-Correlation-ID"

# Error answers every operation may give, documented once for the OpenAPI contracts.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDetail, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {400: "Bad request", 401: "Missing or invalid bearer token",
                         403: "The token's role may not do this", 404: "Not found",
                         422: "Invalid input, or a domain rule violated",
                         504: "The read model did not reach the requested position in time"}.items()
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    409: {"model": ProblemDetail, "content": {"application/problem+json": {}},
          "description": "Conflicting concurrent change"},
    412: {"model": ProblemDetail, "content": {"application/problem+json": {}},
          "description": "If-Match names a stale version"},
}


@dataclass(frozen=True)
class TrackedLog:
    """An event log a service's read model follows: its name in positions, the table it is
    stored in, and where the projection's tracking rows are."""

    name: str
    events_table: str
    tracking_table: str
    application_name: str
    feeds: str | None = None
    """The service's own log, when what follows this log is a policy that writes there (goals
    appends KeyResultProgressed for KPI measurements): a wait for this log then also waits for
    the read model to catch up with what the policy wrote."""

    @classmethod
    def of(cls, name: str, spec: ProjectionSpec, feeds: str | None = None) -> TrackedLog:
        return cls(name, spec.events_table, spec.tracking_table, spec.application_class.name, feeds)


# The event logs of Tandem, by the names positions use.
LOG_NAMES = ("goals", "metrics")
_POSITION = rf" *({'|'.join(LOG_NAMES)}) *= *[0-9]{{1,18}} *"
WAIT_PATTERN = rf"^( *|{_POSITION}(,{_POSITION})*)$"  # blank: nothing to wait for


def parse_positions(header: str | None) -> dict[str, int]:
    if header is None or not header.strip():
        return {}
    if not re.fullmatch(WAIT_PATTERN, header):
        raise Problem(422, "Invalid request", f"{WAIT_HEADER} must look like 'goals=42, metrics=7'.",
                      kind="validation")
    out: dict[str, int] = {}
    for part in header.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = int(value)
    return out


def format_position(log_name: str, position: int) -> str:
    return f"{log_name}={position}"


def create_service_app(
    *,
    settings: ServiceSettings,
    title: str,
    description: str,
    version: str = "1.0.0",
    tracked_logs: Sequence[TrackedLog],
    projections: Sequence[ProjectionSpec],
    application_class: type[TandemApplication] | None = None,
    domain_errors: tuple[type[Exception], ...] = (),
    openapi_tags: list[dict[str, Any]] | None = None,
) -> FastAPI:
    """A FastAPI app with the plumbing every Tandem service has.

    `application_class` is the service's write side: an `eventsourcing` application on the
    service's schema, built at start-up (in a thread: it connects with psycopg) as
    `app.state.application` and closed at shut-down. The gateway has none.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(create_tables, settings, projections, application_class, app)
        app.state.pool = await database.create_pool(
            settings.database_url, settings.schema_name, settings.database_pool_size
        )
        app.state.as_of_views = AsOfViews(settings.database_url, projections, settings.schema_name)
        await asyncio.to_thread(app.state.as_of_views.sweep)
        threads = start_runners(projections, settings.database_url, run=settings.run_projections)
        app.state.projection_threads = threads
        try:
            yield
        finally:
            await stop_runners(threads)
            await app.state.as_of_views.close()
            await app.state.pool.close()
            if application_class is not None:
                await asyncio.to_thread(app.state.application.close)
            shutdown_telemetry(app)

    app = FastAPI(title=title, description=description, version=version, lifespan=lifespan,
                  openapi_tags=openapi_tags)
    app.state.settings = settings
    app.state.tracked_logs = {t.name: t for t in tracked_logs}
    app.state.token_verifier = TokenVerifier(settings)
    install_problem_handlers(app, domain_errors)
    setup_telemetry(app, settings)
    if application_class is not None:  # a service with a log of its own: the auditors' check of it
        app.include_router(audit_routes.router)

    @app.get("/healthz", tags=["operations"], include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        try:
            await request.app.state.pool.fetchval("SELECT 1")
            checks["database"] = "ok"
        except (OSError, asyncpg.PostgresError) as e:
            checks["database"] = f"unreachable: {type(e).__name__}"
            ok = False
        for t in request.app.state.projection_threads:
            # running (holds the projection's lock) or standing by (another replica holds it)
            checks[f"projection:{t.lock_key}"] = t.state if settings.run_projections else "runs elsewhere"
            ok = ok and (t.ready or not settings.run_projections)
        lags_ok, lags = await projection_lags(request.app.state.pool, request.app.state.projection_threads,
                                              settings.ready_max_lag_events)
        checks.update(lags)
        ok = ok and lags_ok
        for tracked in request.app.state.tracked_logs.values():
            try:
                checks[f"position:{tracked.name}"] = await database.tracking_position(
                    request.app.state.pool, tracked.tracking_table, tracked.application_name)
            except asyncpg.PostgresError:
                checks[f"position:{tracked.name}"] = None
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    return app


async def projection_lags(pool: asyncpg.Pool, threads: Sequence[ProjectionThread],
                          max_lag: int) -> tuple[bool, dict[str, int]]:
    """How many events each projection running in this process is behind its log's head
    (`lag:<projection>`), and whether none is more than `max_lag` behind (readiness). A standby
    has no lag of its own: the runner holding the lock has."""
    ok, lags = True, {}
    for t in threads:
        if not t.running.is_set():
            continue
        try:
            head = await database.log_head(pool, t.spec.events_table)
            position = await database.tracking_position(pool, t.spec.tracking_table, t.spec.application_class.name)
        except (OSError, asyncpg.PostgresError):
            continue  # not there yet: the projection's state says so already
        lags[f"lag:{t.lock_key}"] = max(head - position, 0)
        ok = ok and lags[f"lag:{t.lock_key}"] <= max_lag
    return ok, lags


def create_tables(settings: ServiceSettings, projections: Sequence[ProjectionSpec],
                  application_class: type[TandemApplication] | None = None, app: FastAPI | None = None) -> None:
    """The service's schema and tables (read models, tracking, its log and snapshots through
    its write side, built here as `app.state.application`), one replica at a time."""
    with database.creating_tables(settings.database_url, settings.schema_name):
        database.ensure_schema(settings.database_url, settings.schema_name)
        AsOfViews.create_registry(settings.database_url, settings.schema_name)
        for spec in projections:
            spec.create_tables(settings.database_url)
        if application_class is not None and app is not None:
            env = database.eventsourcing_env(settings.database_url, settings.schema_name)
            app.state.application = application_class(env)


async def get_pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


async def get_as_of_pool(request: Request, instant: Annotated[Instant, Depends(instant_of)]) -> asyncpg.Pool:
    """The read model a GET reads: the live one, or with `as_of`/`known_at` the one of that
    instant (`services.common.asof`)."""
    return await read_pool(request, instant)


async def wait_for_read_model(
    request: HTTPConnection,
    wait_for: Annotated[
        str,
        Header(alias=WAIT_HEADER, pattern=WAIT_PATTERN,
               description="Log positions to wait for before reading, as writes report them in "
                           "Tandem-Position, e.g. 'goals=42, metrics=7'."),
    ] = None,
    response: Response = None,  # type: ignore[assignment] - FastAPI passes it; direct callers need not
) -> None:
    """Read-your-writes: hold the read until the read model has caught up. A position in a log
    this service's read model does not follow is already reflected (nothing in it can change).

    The answer says in `Tandem-Read-Position` which positions the read reflects at least, so a
    client can carry them on to another service (`Tandem-Wait-For` there)."""
    logs: dict[str, TrackedLog] = request.app.state.tracked_logs
    pool: asyncpg.Pool = request.app.state.pool
    for name, position in parse_positions(wait_for).items():
        tracked = logs.get(name)
        if tracked is None:
            continue
        await _wait_for(pool, request.app.state.settings, tracked, position)
        if tracked.feeds in logs:  # then also what the policy wrote into our own log
            own = logs[tracked.feeds]
            await _wait_for(pool, request.app.state.settings, own, await database.log_head(pool, own.events_table))
    if response is not None and logs:
        reflected = [format_position(t.name, await database.tracking_position(pool, t.tracking_table,
                                                                             t.application_name))
                     for t in logs.values()]
        response.headers[READ_POSITION_HEADER] = ", ".join(reflected)


async def _wait_for(pool: asyncpg.Pool, settings: ServiceSettings, tracked: TrackedLog, position: int) -> None:
    head = await database.log_head(pool, tracked.events_table)
    if position > head:
        raise Problem(422, "Invalid request", f"The {tracked.name} log has no position {position} (its last "
                      f"is {head}); wait only for positions that writes reported.", kind="no-such-position")
    reached = await database.wait_for_position(pool, tracked.tracking_table, tracked.application_name,
                                               position, settings.read_wait_timeout_seconds)
    if not reached:
        raise Problem(504, "Gateway Timeout", f"The read model has not reached {tracked.name}={position} yet; retry.",
                      kind="read-model-behind", headers={"Retry-After": "1"})


ReadYourWrites = Annotated[None, Depends(wait_for_read_model)]


def command_context(request: HTTPConnection, principal: Principal) -> CommandContext:
    return CommandContext(
        actor=principal.subject,
        correlation_id=request.headers.get(CORRELATION_HEADER) or new_correlation_id(),
        trace_id=current_trace_id(),
    )


def set_position(response: Response, log_name: str, position: int) -> None:
    response.headers[POSITION_HEADER] = format_position(log_name, position)


IdempotencyKey = Annotated[str, Header(
    alias="Idempotency-Key", pattern=r"^[\x21-\x7e]{1,200}$",
    description="Makes a retry safe: the same key with the same request appends nothing new and "
                "gets the first answer again (with `Idempotent-Replayed: true`); with another "
                "request it is refused.")]


async def execute_write(
    request: Request, response: Response, principal: Principal, log_name: str,
    command: Callable[..., Written], *args: Any, status: int = 201, location: str | None = None,
    idempotency_key: str | None = None, **kwargs: Any,
) -> WriteResult:
    """Run a command under the request's context and answer as every write does: the status,
    `ETag` (the new version), `Location` (with `{id}` filled in) and `Tandem-Position`. Under an
    Idempotency-Key, a retry gets the first answer and appends nothing."""
    context = command_context(request, principal)
    if idempotency_key is None:
        written = await run_command(context, command, *args, **kwargs)
    else:
        claim = IdempotencyClaim(principal.subject, idempotency_key,
                                 request_hash(request.method, request.url.path, await request.body()))
        application: TandemApplication = request.app.state.application
        try:
            written, earlier = await run_command(context, application.answer_once, claim, command, *args, **kwargs)
        except KeyReused:
            raise Problem(422, "Idempotency-Key reused",
                          "This Idempotency-Key was used for a different request; use a new key.",
                          kind="idempotency-key-reused") from None
        if earlier is not None:
            response.headers["Idempotent-Replayed"] = "true"
    response.status_code = status
    response.headers["ETag"] = etag(written.version)
    if location:
        response.headers["Location"] = location.format(id=written.id)
    set_position(response, log_name, written.position)
    return WriteResult(id=written.id, version=written.version, position=written.position)


def etag(version: int) -> str:
    return f'"{version}"'


IfMatch = Annotated[str, Header(alias="If-Match", pattern=r'^(\*|(W/)?"[0-9]{1,18}")$',
                                 description="ETag of the version this write is based on.")]


def if_match_version(if_match: str | None) -> int | None:
    """The aggregate version an If-Match header names (None when absent or '*')."""
    if if_match is None or if_match.strip() == "*":
        return None
    value = if_match.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    if not value.isdigit():
        raise Problem(400, "Bad Request", "If-Match must be an ETag this service gave, like \"3\".",
                      kind="bad-if-match")
    return int(value)
