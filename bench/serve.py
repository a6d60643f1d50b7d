"""A service as production serves it, plus the benchmark's own routes: what `bench.writes` and
`bench.ingest` send their load to.

    python -m bench.serve goals|metrics      (DATABASE_URL, TANDEM_PORT, TANDEM_JWT_SECRET, ...)

The app is the service's real one (`create_app(settings)`: its lifespan with the projection
runners, authentication, problem handlers, telemetry as the environment configures it), served
by uvicorn as `services.common.runner.serve` serves it. `mount_bench_routes` adds, in this
process only (never in the production app):

- `POST /bench/key-results/{key_result_id}/raw-insert`: the baseline of a check-in. It takes the
  same body (`CheckInIn`, validated the same way) and the same bearer token (an operator's role),
  and does one raw asyncpg `INSERT` into `bench.raw_check_ins` through the app's own pool; no
  command, no event, no group commit, no projection.
- `GET /bench/group-commit`: the log writer's counters (`batches`, `saves`), read before and
  after a run, so a run's average batch size is the difference of the two.
"""


import os
import sys
from datetime import date
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, Request

RAW_TABLE = "bench.raw_check_ins"
RAW_TABLE_DDL = (
    "CREATE SCHEMA IF NOT EXISTS bench",
    f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (id bigserial PRIMARY KEY, key_result_id uuid NOT NULL, "
    "value double precision NOT NULL, confidence integer, note text NOT NULL, valid_on date NOT NULL, "
    "actor text NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())",
)
RAW_INSERT = (f"INSERT INTO {RAW_TABLE} (key_result_id, value, confidence, note, valid_on, actor) "
              "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id")


def mount_bench_routes(app: FastAPI) -> FastAPI:
    """Add the benchmark's routes to a service app (see the module's docstring)."""
    from services.common.auth import OPERATORS, Principal, require
    from services.goals.api import CheckInIn

    operator = Annotated[Principal, Depends(require(*OPERATORS))]

    @app.post("/bench/key-results/{key_result_id}/raw-insert", status_code=201, include_in_schema=False)
    async def raw_insert(key_result_id: UUID, body: CheckInIn, request: Request,
                         principal: operator) -> dict[str, Any]:
        row_id = await request.app.state.pool.fetchval(
            RAW_INSERT, key_result_id, float(body.value), body.confidence, body.note,
            body.valid_on or date.today(), principal.subject)
        return {"id": row_id}

    @app.get("/bench/group-commit", include_in_schema=False)
    async def group_commit(request: Request, principal: operator) -> dict[str, int]:
        committer = request.app.state.application.recorder.group_commit
        return {"batches": committer.batches, "saves": committer.saves}

    return app


def create_bench_app(service: str) -> FastAPI:
    if service == "goals":
        from services.goals.api import create_app as create_goals
        from services.goals.settings import GoalsSettings

        return mount_bench_routes(create_goals(GoalsSettings()))
    if service == "metrics":
        from services.metrics.api import create_app as create_metrics
        from services.metrics.settings import MetricsSettings

        return mount_bench_routes(create_metrics(MetricsSettings()))
    raise SystemExit(f"python -m bench.serve goals|metrics, not {service!r}")


class ThreadProfiles:
    """cProfile in every thread of the process (the event loop's, the thread pool's that run
    commands, the log writer's, the projection runners'), merged into one file at the end:
    `TANDEM_BENCH_PROFILE=<path>` (what `python -m bench --only writes --profile` sets). Wall
    time per thread: waiting (for the log's writer, a pooled connection, the database, the GIL)
    counts where it happens, which is where a request's time goes; sum over threads, not
    per request."""

    def __init__(self) -> None:
        import cProfile
        import threading

        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

        def start(frame: Any, event: str, arg: Any) -> None:
            profile = cProfile.Profile()
            with self._lock:
                self._profiles.append(profile)
            profile.enable()  # replaces this hook in the new thread

        threading.setprofile(start)
        main = cProfile.Profile()
        self._profiles.append(main)
        main.enable()

    def dump(self, path: str) -> None:
        import pstats
        import threading

        threading.setprofile(None)  # type: ignore[arg-type]
        with self._lock:
            profiles = list(self._profiles)
        for profile in profiles:
            profile.disable()  # the main thread's; the others stop counting once their thread ends
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            try:
                stats.add(profile)
            except TypeError:  # a thread that never ran a profiled call
                continue
        stats.dump_stats(path)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from services.common.telemetry import logging_config

    argv = sys.argv[1:] if argv is None else argv
    service = argv[0] if argv else "goals"
    profile_path = os.environ.get("TANDEM_BENCH_PROFILE")
    profiles = ThreadProfiles() if profile_path else None
    if profiles is not None:
        import signal

        # uvicorn raises the SIGTERM it stopped on again once it has shut down, with the handler
        # it found: this one, which lets `run` return so that the profiles are written.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    app = create_bench_app(service)
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["TANDEM_PORT"]), log_level="info",
                log_config=logging_config(service))
    if profiles is not None and profile_path:
        profiles.dump(profile_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
