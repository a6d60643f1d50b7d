"""Each service's entry point, and its projection runners apart from the API.

    python -m services.goals.main                      the API, with its projection runners as
                                                       threads (as `make run` starts it)
    python -m services.goals.main --projections-only   only the projection runners (the same as
                                                       TANDEM_RUN_API=false), with /healthz and
                                                       /readyz on the service's port for probes

Past one machine the APIs run with `TANDEM_RUN_PROJECTIONS=false` behind a load balancer, and
the runners as Deployments of their own (`deploy/`). However many replicas run a projection,
one processes events: each runner takes its projection's advisory lock first and the others
stand by (`services.common.projections.ProjectionThread`). A standby is ready: it is what takes
over when the holder goes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common import database
from services.common.projections import ProjectionSpec, start_runners, stop_runners
from services.common.settings import ServiceSettings
from services.common.telemetry import logging_config, setup_telemetry, shutdown_telemetry

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 30
"""How long an idle HTTP connection stays open: longer than clients keep theirs (httpx, 5 s)."""


def create_runner_app(settings: ServiceSettings, projections: Sequence[ProjectionSpec]) -> FastAPI:
    """An app that runs the service's projection runners and answers only `/healthz` and
    `/readyz`: ready while the database answers and every runner either holds its projection's
    lock (and is no more than `ready_max_lag_events` behind its log) or stands by for it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from services.common.web import create_tables  # as the API does; the rest of web is not needed here

        await asyncio.to_thread(create_tables, settings, projections)
        app.state.pool = await database.create_pool(settings.database_url, settings.schema_name, 2)
        threads = start_runners(projections, settings.database_url)
        app.state.projection_threads = threads
        try:
            yield
        finally:
            await stop_runners(threads)
            await app.state.pool.close()
            shutdown_telemetry(app)

    app = FastAPI(title=f"Tandem {settings.service_name}: projection runners", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    setup_telemetry(app, settings)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        pool: asyncpg.Pool = request.app.state.pool
        try:
            await pool.fetchval("SELECT 1")
            checks["database"] = "ok"
        except (OSError, asyncpg.PostgresError) as e:
            checks["database"] = f"unreachable: {type(e).__name__}"
            ok = False
        for t in request.app.state.projection_threads:
            checks[f"projection:{t.lock_key}"] = t.state
            ok = ok and t.ready
            try:
                checks[f"position:{t.lock_key}"] = await database.tracking_position(
                    pool, t.spec.tracking_table, t.spec.application_class.name)
            except (OSError, asyncpg.PostgresError):
                checks[f"position:{t.lock_key}"] = None
        # Imported here: services.common.web imports what a whole service needs, this app none of it.
        from services.common.web import projection_lags

        caught_up, lags = await projection_lags(pool, request.app.state.projection_threads,
                                                settings.ready_max_lag_events)
        checks.update(lags)
        ok = ok and caught_up
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    return app


def _log_config(settings: ServiceSettings) -> dict[str, Any]:
    """One JSON object per line on stderr for every logger of the process, uvicorn's and the
    services' INFO messages (a runner taking its lock or standing by) included, with the trace
    and span ids (`services.common.telemetry.logging_config`)."""
    return logging_config(settings.service_name)


def serve(settings_class: type[ServiceSettings], create_api: Callable[[Any], FastAPI],
          projections: Callable[[Any], Sequence[ProjectionSpec]], argv: Sequence[str] | None = None) -> None:
    """A service's `main`: the API (with or without its runners) or the runners alone (those
    `projections(settings)` names, the ones the API would run)."""
    name = settings_class.model_fields["service_name"].default
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}.main")
    parser.add_argument("--projections-only", action="store_true",
                        help="run only the projection runners (/healthz and /readyz on the port), "
                             "as TANDEM_RUN_API=false does")
    args = parser.parse_args(argv)
    settings = settings_class(run_api=False) if args.projections_only else settings_class()
    if settings.run_api:
        # Idle connections are kept longer than clients keep theirs (httpx: 5 s), so a client
        # never sends on a connection the server is closing at that moment (a reset mid-request).
        uvicorn.run(create_api(settings), host=settings.host, port=settings.port, log_level="info",
                    log_config=_log_config(settings), timeout_keep_alive=KEEP_ALIVE_SECONDS)
        return
    if not settings.run_projections:
        parser.error("TANDEM_RUN_API=false with TANDEM_RUN_PROJECTIONS=false leaves nothing to run")
    uvicorn.run(create_runner_app(settings, projections(settings)), host=settings.host, port=settings.port,
                log_level="info", log_config=_log_config(settings), timeout_keep_alive=KEEP_ALIVE_SECONDS)
