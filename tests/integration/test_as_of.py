"""As-of reads: an objective, a key result, a KPI and a unit subtree as they stood at an
instant, by valid time, by recorded time, and both ("what did we know on 31 March about 31
March"), over REST and GraphQL; and replays that give the live read model's checksum.

The history is written with the recorded clock set by hand (the library stamps each event with
`eventsourcing.domain.datetime_now_with_tzinfo`), so that recorded and valid times differ as
they do in real use: a check-in for 25 March recorded on 2 April.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import eventsourcing.domain
import httpx
import psycopg
import pytest

from services.common.database import ensure_schema, eventsourcing_env
from services.common.replay import checksum, drop_schema, live_checksum, read_model_sources, replay
from services.gateway.api import create_app as create_gateway
from services.gateway.projections import ALIGNMENT_PROJECTIONS
from services.gateway.settings import GatewaySettings
from services.goals.api import create_app as create_goals
from services.goals.application import Goals
from services.goals.domain import KeyResultKind, OwnerKind, UnitKind
from services.goals.projections import GOALS_PROJECTIONS
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.application import Metrics
from services.metrics.projections import METRICS_PROJECTIONS
from services.metrics.settings import MetricsSettings
from tests.conftest import ok, refused, serve_in_process


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


@dataclass
class History:
    unit: UUID
    objective: UUID
    key_result: UUID
    kpi: UUID


@pytest.fixture(scope="module")
def history(own_database: str) -> Iterator[History]:
    """Q1 2026 as it happened:

    - 1 Mar: Support, its objective, a KR "response time 8 h -> 3 h" and a KPI (floor 90).
    - 10 Mar: check-in 5.5 h for 10 Mar; CSAT 95 measured.
    - 2 Apr: check-in 4 h for 25 Mar (late); CSAT 85 for 28 Mar (late).
    - 5 Apr: check-in 3 h for 5 Apr.
    """
    url = own_database
    clock = [at("2026-03-01")]
    original = eventsourcing.domain.datetime_now_with_tzinfo
    eventsourcing.domain.datetime_now_with_tzinfo = lambda: clock[0]
    try:
        for schema in ("goals", "metrics"):
            ensure_schema(url, schema)
        goals = Goals(env=eventsourcing_env(url, "goals"))
        metrics = Metrics(env=eventsourcing_env(url, "metrics"))
        unit = goals.create_unit(name="Support", kind=UnitKind.company, parent_id=None).id
        cycle = goals.create_cycle(name="Q1 2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 3, 31),
                                   activate=True).id
        objective = goals.create_objective(title="Deliver exceptional support", description="",
                                           owner_kind=OwnerKind.unit, owner_id=unit, unit_id=unit, cycle_id=cycle,
                                           parent_id=None).id
        kr = goals.add_key_result(objective_id=objective, title="Reduce response time from 8 h to 3 h",
                                  kind=KeyResultKind.decrease_to, start=8, target=3, low=None, high=None,
                                  milestones=[], unit="h", weight=1, owner_id=None).id
        kpi = metrics.define_kpi(name="CSAT", unit="%", direction="higher_is_better", cadence="monthly",
                                 rules=[{"id": "floor", "kind": "below", "threshold": 90, "severity": "critical"}],
                                 unit_id=unit).id
        clock[0] = at("2026-03-10")
        goals.check_in(kr, value=5.5, confidence=6, note="", valid_on=date(2026, 3, 10), expected_version=None)
        metrics.record_measurement(kpi, value=95, measured_at=at("2026-03-10"), source="survey", now=clock[0])
        clock[0] = at("2026-04-02")
        goals.check_in(kr, value=4, confidence=7, note="late", valid_on=date(2026, 3, 25), expected_version=None)
        metrics.record_measurement(kpi, value=85, measured_at=at("2026-03-28"), source="survey", now=clock[0])
        clock[0] = at("2026-04-05")
        goals.check_in(kr, value=3, confidence=9, note="", valid_on=date(2026, 4, 5), expected_version=None)
        goals.close()
        metrics.close()
    finally:
        eventsourcing.domain.datetime_now_with_tzinfo = original
    # The live read models, brought up to date here rather than by runners, so that nothing
    # else writes them while the replay test compares.
    for specs in (GOALS_PROJECTIONS, METRICS_PROJECTIONS, ALIGNMENT_PROJECTIONS):
        for source in read_model_sources(specs):
            replay(source, url, source.schema)
    yield History(unit, objective, kr, kpi)


@pytest.fixture(scope="module")
async def goals(own_database: str, history: History) -> AsyncIterator[httpx.AsyncClient]:
    settings = GoalsSettings(DATABASE_URL=own_database, run_projections=False, run_webhook_worker=False)
    async for client in serve_in_process(create_goals(settings)):
        yield client


@pytest.fixture(scope="module")
async def metrics(own_database: str, history: History) -> AsyncIterator[httpx.AsyncClient]:
    settings = MetricsSettings(DATABASE_URL=own_database, run_projections=False)
    async for client in serve_in_process(create_metrics(settings)):
        yield client


@pytest.fixture(scope="module")
async def gateway(own_database: str, history: History) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(DATABASE_URL=own_database, run_projections=False)
    async for client in serve_in_process(create_gateway(settings)):
        yield client


async def key_result(client: httpx.AsyncClient, h: History, auth: Any, **params: str) -> dict[str, Any]:
    r = await client.get(f"/v1/key-results/{h.key_result}", params=params, headers=auth("auditor"))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_key_result_by_valid_time_recorded_time_and_both(goals: httpx.AsyncClient, history: History,
                                                                 auth: Any) -> None:
    # What we know now about 31 March: the late check-in for 25 March counts.
    assert (await key_result(goals, history, auth, as_of="2026-03-31T23:59:59Z"))["current"] == 4
    # What we knew on 31 March about 31 March: only the check-in of 10 March. 5.5 h of 8 -> 3 is 0.5.
    then = await key_result(goals, history, auth, as_of="2026-03-31T23:59:59Z", known_at="2026-03-31T23:59:59Z")
    assert (then["current"], then["score"]) == (5.5, 0.5)
    # What had been recorded by 3 April, about any time: the latest by valid time, 25 March.
    assert (await key_result(goals, history, auth, known_at="2026-04-03T00:00:00Z"))["current"] == 4
    # Live: the check-in of 5 April.
    assert (await key_result(goals, history, auth))["current"] == 3


@pytest.mark.asyncio(loop_scope="session")
async def test_before_it_existed_there_is_nothing(goals: httpx.AsyncClient, history: History, auth: Any) -> None:
    for path in (f"/v1/key-results/{history.key_result}", f"/v1/objectives/{history.objective}",
                 f"/v1/units/{history.unit}"):
        await refused(goals, "GET", f"{path}?as_of=2026-02-01T00:00:00Z", None, 404, **auth("auditor"))


@pytest.mark.asyncio(loop_scope="session")
async def test_an_objective_as_of_carries_its_score(goals: httpx.AsyncClient, history: History, auth: Any) -> None:
    path = f"/v1/objectives/{history.objective}"
    then = await ok(goals, "GET", f"{path}?as_of=2026-03-15T00:00:00Z", **auth("auditor"))
    now = await ok(goals, "GET", path, **auth("auditor"))
    assert then["score"] == pytest.approx(0.5)
    assert now["score"] == pytest.approx(1.0)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_instant_in_the_future_or_malformed_is_refused(goals: httpx.AsyncClient, metrics: httpx.AsyncClient,
                                                                history: History, auth: Any) -> None:
    await refused(goals, "GET", f"/v1/key-results/{history.key_result}?as_of=2999-01-01T00:00:00Z", None, 422,
                  **auth("auditor"))
    await refused(goals, "GET", f"/v1/key-results/{history.key_result}?known_at=yesterday", None, 422,
                  **auth("auditor"))
    await refused(metrics, "GET", f"/v1/kpis/{history.kpi}?as_of=2999-01-01T00:00:00Z", None, 422, **auth("auditor"))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_kpi_as_of(metrics: httpx.AsyncClient, history: History, auth: Any) -> None:
    path = f"/v1/kpis/{history.kpi}"
    on_the_20th = await ok(metrics, "GET", f"{path}?as_of=2026-03-20T00:00:00Z", **auth("auditor"))
    assert (on_the_20th["latestValue"], on_the_20th["state"]) == (95, "ok")
    known_then = await ok(metrics, "GET", f"{path}?as_of=2026-03-31T00:00:00Z&known_at=2026-03-31T00:00:00Z",
                          **auth("auditor"))
    assert (known_then["latestValue"], known_then["state"]) == (95, "ok")
    known_now = await ok(metrics, "GET", f"{path}?as_of=2026-03-31T00:00:00Z", **auth("auditor"))
    assert (known_now["latestValue"], known_now["state"]) == (85, "breached")


ALIGNMENT = """query($unit: ID!, $asOf: DateTime, $knownAt: DateTime) {
  alignment(unit: $unit, asOf: $asOf, knownAt: $knownAt) {
    unit { name kpis { state } }
    objectives { title score keyResults { current score } }
  }
  live: unit(id: $unit) { objectives { edges { node { keyResults { current } } } } }
}"""


@pytest.mark.asyncio(loop_scope="session")
async def test_a_unit_subtree_as_of_over_graphql(gateway: httpx.AsyncClient, history: History, auth: Any) -> None:
    async def alignment(**instants: str) -> dict[str, Any]:
        r = await gateway.post("/graphql", headers=auth("auditor"), json={
            "query": ALIGNMENT, "variables": {"unit": str(history.unit), **instants}})
        body = r.json()
        assert "errors" not in body, body
        return body["data"]

    known_then = await alignment(asOf="2026-03-31T23:59:59Z", knownAt="2026-03-31T23:59:59Z")
    objective = known_then["alignment"]["objectives"][0]
    assert objective["keyResults"] == [{"current": 5.5, "score": 0.5}]
    assert known_then["alignment"]["unit"]["kpis"] == [{"state": "ok"}]
    # The other root field of the same request reads the live read model.
    assert known_then["live"]["objectives"]["edges"][0]["node"]["keyResults"] == [{"current": 3.0}]

    known_now = await alignment(asOf="2026-03-31T23:59:59Z")
    assert known_now["alignment"]["objectives"][0]["keyResults"] == [{"current": 4.0, "score": 0.8}]
    assert known_now["alignment"]["unit"]["kpis"] == [{"state": "breached"}]

    before = await alignment(asOf="2026-02-01T00:00:00Z")
    assert before["alignment"] is None

    r = await gateway.post("/graphql", headers=auth("auditor"), json={
        "query": ALIGNMENT, "variables": {"unit": str(history.unit), "asOf": "2999-01-01T00:00:00Z"}})
    assert "asOf must be a past instant" in r.json()["errors"][0]["message"]


def test_a_replay_gives_the_live_read_models_checksum(own_database: str, history: History) -> None:
    """Every read model replayed into a schema of its own has the live one's rows."""
    url = own_database
    for specs in (GOALS_PROJECTIONS, METRICS_PROJECTIONS, ALIGNMENT_PROJECTIONS):
        for source in read_model_sources(specs):
            scratch = f"replay_{source.name.lower()}"
            try:
                # The services may have appended since (metrics finds the KPI stale on start-up):
                # a rebuild goes as far as the live read model has.
                live = live_checksum(url, source)
                report = replay(source, url, scratch, stops=live.positions, batch_size=3)
                with psycopg.connect(url) as conn:
                    rebuilt = checksum(conn, source, scratch)
                assert report.events == sum(live.positions.values()) > 0
                assert rebuilt.rows > 0
                assert (rebuilt.digest, rebuilt.positions) == (live.digest, live.positions), source.label
            finally:
                drop_schema(url, scratch)
