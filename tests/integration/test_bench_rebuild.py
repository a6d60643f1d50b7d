"""The rebuild benchmark's generator: a small realistic log, what it holds, and that replaying it
gives non-empty read models, the same twice."""

from __future__ import annotations

import json

import psycopg

from bench.rebuild import EVENTS_PER_TEAM, LOGS, Shape, generate
from services.audit import read_model_sources
from services.common.hashchain import verify_chain
from services.common.replay import checksum, replay
from tests.conftest import fresh_database


def test_a_generated_log_is_realistic_chained_and_replays_the_same_twice() -> None:
    with fresh_database() as url:
        assert Shape.for_events(100_000).teams == round(100_000 / EVENTS_PER_TEAM)
        shape = Shape(departments=1, teams=1, company_objectives=1, objectives_per_department=1, objectives_per_team=3)
        generated = generate(url, 0, shape=shape)
        goals, metrics = generated.types["goals"], generated.types["metrics"]
        assert generated.events == {"goals": sum(goals.values()), "metrics": sum(metrics.values())}
        assert goals["Person.Joined"] == generated.people == 1 + 1 + 10
        assert goals["Objective.Created"] == generated.objectives == 1 + 1 + 3
        assert goals["KeyResult.Created"] == goals["Objective.KeyResultAttached"] == generated.key_results
        assert 3 * generated.objectives <= generated.key_results <= 5 * generated.objectives
        assert 10 <= goals["KeyResult.Progressed"] / generated.key_results <= 13  # weekly, ~12 a quarter
        assert metrics["KPI.Defined"] == generated.kpis == 2 + 3
        assert metrics["KPI.Measured"] >= 3 * 87 + 2 * 13  # three daily KPIs over the quarter, two weekly
        assert metrics.get("KPI.ThresholdBreached", 0) > 0

        with psycopg.connect(url) as conn:
            for _, schema, table in LOGS:
                count, first, last = conn.execute(
                    f"SELECT count(*), min(notification_id), max(notification_id) FROM {schema}.{table}").fetchone()
                assert (count, first, last) == (generated.events[schema], 1, generated.events[schema])
            state = conn.execute("SELECT state FROM goals.goals_events WHERE topic LIKE '%KeyResult.Progressed' "
                                 "LIMIT 1").fetchone()[0]
            meta = json.loads(bytes(state))["meta"]
            assert meta["actor"].startswith("person:") and meta["correlation_id"]
        for _, schema, table in LOGS:
            report = verify_chain(url, schema, table)
            assert report.ok and report.records == generated.events[schema], report.line()

        for source in read_model_sources():
            sums = []
            for n in (1, 2):
                schema = f"replay_{source.name.lower()}_{n}"
                replayed = replay(source, url, schema)
                assert replayed.events == sum(generated.events[spec.application_schema] for spec in source.specs)
                with psycopg.connect(url) as conn:
                    sums.append(checksum(conn, source, schema))
            assert sums[0].rows > 0 and all(rows for table, (rows, _) in sums[0].tables.items()
                                            if table not in ("contributions", "kpi_targets", "measurement_corrections",
                                                             "objective_guardrails")), (source.label, sums[0].tables)
            assert sums[0].digest == sums[1].digest, source.label
