"""A read model whose shape changed is dropped and rebuilt from the log, with the same rows."""

from __future__ import annotations

import asyncio
from datetime import date

import psycopg

from services.common.database import create_pool, ensure_schema, eventsourcing_env, wait_for_position
from services.common.projections import ProjectionSpec, ProjectionThread
from services.goals.application import Goals
from services.goals.domain import KeyResultKind, OwnerKind, UnitKind
from services.goals.projections import GOALS_PROJECTIONS, GoalsReadModel
from tests.conftest import fresh_database

TABLES = ("units", "cycles", "objectives", "key_results", "check_ins")


def snapshot(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM goals.{t} ORDER BY 1, 2").fetchall() for t in TABLES}


async def catch_up(url: str, spec: ProjectionSpec, position: int) -> None:
    thread = ProjectionThread(spec, url)
    thread.start()
    pool = await create_pool(url, "goals", 2)
    try:
        assert await wait_for_position(pool, spec.tracking_table, "Goals", position, timeout=30)
    finally:
        await pool.close()
        thread.stop()
        await asyncio.to_thread(thread.join, 10)


async def test_a_changed_read_model_is_rebuilt_from_the_log() -> None:
    with fresh_database() as url:
        ensure_schema(url, "goals")
        app = Goals(env=eventsourcing_env(url, "goals"))
        company = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
        cycle = app.create_cycle(name="Q4", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31), activate=True)
        objective = app.create_objective(title="Grow", description="", owner_kind=OwnerKind.unit,
                                         owner_id=company.id, unit_id=company.id, cycle_id=cycle.id, parent_id=None)
        kr = app.add_key_result(objective_id=objective.id, title="Revenue", kind=KeyResultKind.increase_to,
                                start=0, target=10, low=None, high=None, milestones=[], unit="", weight=1,
                                owner_id=None)
        last = app.check_in(kr.id, value=4, confidence=6, note="", valid_on=date(2026, 11, 1), expected_version=None)
        app.close()

        spec = GOALS_PROJECTIONS[0]
        spec.create_tables(url)
        await catch_up(url, spec, last.position)
        before = snapshot(url)
        assert len(before["check_ins"]) == 1

        class Reshaped(GoalsReadModel):
            revision = GoalsReadModel.revision + 1

        reshaped = ProjectionSpec(spec.application_class, spec.projection_class, Reshaped,
                                  spec.application_schema, spec.view_schema)
        reshaped.create_tables(url)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM goals.check_ins").fetchone()[0] == 0
            assert conn.execute(f"SELECT count(*) FROM {spec.tracking_table} "
                                "WHERE application_name = 'Goals'").fetchone()[0] == 0
        await catch_up(url, reshaped, last.position)
        assert snapshot(url) == before
