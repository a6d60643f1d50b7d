"""Audit tools over the services' event logs: `python -m services.audit <command>`.

Each command is a module here with `register(subparsers)`, listed once in `__main__.COMMANDS`.
They reach PostgreSQL through `database.connect_database()`: `DATABASE_URL` when set, else the
embedded server under `.data/` (started for the command and stopped after it, unless it was
already running).
"""

from __future__ import annotations

# The logs of Tandem: (log name, schema, events table).
SERVICE_LOGS: tuple[tuple[str, str, str], ...] = (
    ("goals", "goals", "goals_events"),
    ("metrics", "metrics", "metrics_events"),
)


def read_model_sources() -> list:  # list[services.common.replay.ReadModelSource]
    """Every read model of Tandem, each with the logs that feed it, in the order to rebuild them."""
    from services.common.replay import read_model_sources as sources
    from services.gateway.projections import ALIGNMENT_PROJECTIONS
    from services.goals.projections import GOALS_PROJECTIONS
    from services.metrics.projections import METRICS_PROJECTIONS

    return [s for specs in (GOALS_PROJECTIONS, METRICS_PROJECTIONS, ALIGNMENT_PROJECTIONS) for s in sources(specs)]


def replay_all(jobs: list, database_url: str, *, batch_size: int = 1000, processes: int | None = None) -> list:
    """`services.common.replay.replay` of each job, (read model label, schema, stops), in
    processes of their own side by side, at most `processes` at a time (default: one per CPU):
    the read models are independent, and a replay is mostly its projection's Python, which one
    process runs on one CPU. The reports (`ReplayReport`), in the order of `jobs`; with one
    process (or one job), replayed in this one."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    processes = min(len(jobs), processes or os.cpu_count() or 1)
    if processes <= 1:
        return [_replay_job(*job, database_url, batch_size) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no connection or thread of this one crosses over
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        futures = [pool.submit(_replay_job, *job, database_url, batch_size) for job in jobs]
        return [f.result() for f in futures]


def _replay_job(label: str, schema: str, stops: dict | None, database_url: str, batch_size: int):  # noqa: ANN202
    from services.common.replay import replay

    source = next(s for s in read_model_sources() if s.label == label)
    return replay(source, database_url, schema, stops=stops, batch_size=batch_size)
