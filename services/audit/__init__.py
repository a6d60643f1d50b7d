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
