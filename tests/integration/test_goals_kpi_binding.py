"""KPIs drive key results and guard objectives, with the goals and metrics services in process
against real PostgreSQL: a measurement posted to metrics moves the bound key result in goals
through the KPI policy, exactly once across restarts; guardrails show the KPIs' health. Every
wait is a read with `Tandem-Wait-For`, never a sleep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from services.goals.api import create_app as create_goals
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import fresh_database, ok, refused, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

TODAY = datetime.now(UTC).date()
YESTERDAY = datetime.combine(TODAY - timedelta(days=1), datetime.min.time(), tzinfo=UTC)
ROUNDS, PER_ROUND = 5, 40  # goals restarts and measurements per restart in the exactly-once test
FLOOR = {"id": "floor", "kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}


@dataclass
class Service:
    client: httpx.AsyncClient
    app: FastAPI


@asynccontextmanager
async def serve(app: FastAPI, headers: dict[str, str]) -> AsyncIterator[Service]:
    """The app with its lifespan, left normally at the end (its projection threads stop)."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
            yield Service(client, app)


@pytest.fixture(scope="module")
async def metrics(auth: Callable[..., dict[str, str]]) -> AsyncIterator[Service]:
    app = create_metrics(MetricsSettings(run_staleness_watch=False))
    async for client in serve_in_process(app):
        client.headers.update(auth("admin", "ada"))
        yield Service(client, app)


@pytest.fixture
async def goals(auth: Callable[..., dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    """A goals service of the test's own: the exactly-once test starts and stops its own, and no
    other one may be following the metrics log meanwhile."""
    async with serve(create_goals(), auth("admin", "ada")) as service:
        yield service.client


async def read(client: httpx.AsyncClient, path: str, wait_for: str) -> dict[str, Any]:
    r = await client.get(path, headers={"Tandem-Wait-For": wait_for})
    assert r.status_code == 200, r.text
    return r.json()


async def seed(goals: httpx.AsyncClient) -> dict[str, str]:
    """A unit, a cycle open around today, an objective, and an increase_to key result 0 -> 100."""
    unit = await ok(goals, "POST", "/v1/units", {"name": "Acme", "kind": "company"}, 201)
    cycle = await ok(goals, "POST", "/v1/cycles", {
        "name": "Now", "startsOn": (TODAY - timedelta(days=45)).isoformat(),
        "endsOn": (TODAY + timedelta(days=45)).isoformat(), "status": "active"}, 201)
    objective = await ok(goals, "POST", "/v1/objectives", {
        "title": "Delight customers", "owner": {"kind": "unit", "id": unit["id"]}, "unitId": unit["id"],
        "cycleId": cycle["id"]}, 201)
    kr = await ok(goals, "POST", f"/v1/objectives/{objective['id']}/key-results", {
        "title": "Increase CSAT to 100", "kind": "increase_to", "start": 0, "target": 100}, 201)
    return {"unit": unit["id"], "cycle": cycle["id"], "objective": objective["id"], "kr": kr["id"],
            "position": kr["position"]}


async def define_kpi(metrics: httpx.AsyncClient, *rules: dict[str, Any], name: str = "CSAT") -> dict[str, Any]:
    return await ok(metrics, "POST", "/v1/kpis", {"name": name, "unit": "%", "direction": "higher_is_better",
                                                  "cadence": "daily", "rules": list(rules)}, 201)


async def measure(metrics: httpx.AsyncClient, kpi_id: str, value: float, at: datetime,
                  **headers: str) -> dict[str, Any]:
    return await ok(metrics, "POST", f"/v1/kpis/{kpi_id}/measurements",
                    {"value": value, "measuredAt": at.isoformat(), "source": "test"}, 201, **headers)


async def bind(goals: httpx.AsyncClient, kr_id: str, kpi_id: str, **headers: str) -> dict[str, Any]:
    return await ok(goals, "PUT", f"/v1/key-results/{kr_id}/kpi", {"kpiId": kpi_id}, **headers)


def stored_events(database_url: str, aggregate_id: str, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """The aggregate's events of one kind in the goals log: (version, stored state)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT originator_version, state FROM goals.goals_events WHERE originator_id = %s "
                            "AND topic = %s ORDER BY originator_version",
                            (aggregate_id, f"services.goals.domain:{kind}")).fetchall()
    return [(v, json.loads(bytes(s))) for v, s in rows]


def metrics_position(database_url: str, kpi_id: str, topic: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        return [n for (n,) in conn.execute(
            "SELECT notification_id FROM metrics.metrics_events WHERE originator_id = %s AND topic = %s "
            "ORDER BY notification_id", (kpi_id, f"services.metrics.domain:{topic}")).fetchall()]


def uuid_of(tagged: dict[str, str] | None) -> str | None:
    return None if tagged is None else str(UUID(tagged["_data_"]))


# Binding and measuring ------------------------------------------------------------------------

async def test_a_measurement_moves_the_bound_key_result_and_its_check_in_names_it(
        goals: httpx.AsyncClient, metrics: Service, database_url: str) -> None:
    ids = await seed(goals)
    kpi = await define_kpi(metrics.client)
    bound = await bind(goals, ids["kr"], kpi["id"], **{"If-Match": '"1"', "Idempotency-Key": "bind-1"})
    assert bound["version"] == 2
    again = await goals.put(f"/v1/key-results/{ids['kr']}/kpi", json={"kpiId": kpi["id"]},
                            headers={"If-Match": '"1"', "Idempotency-Key": "bind-1"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == bound
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"goals={bound['position']}")
    assert (kr["kpiId"], kr["current"], kr["score"], kr["version"]) == (kpi["id"], None, None, 2)

    written = await measure(metrics.client, kpi["id"], 40, YESTERDAY + timedelta(hours=23, minutes=30),
                            **{"X-Correlation-ID": "measure-40"})
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={written['position']}")
    assert (kr["current"], kr["score"], kr["band"], kr["currentValidOn"], kr["checkInCount"], kr["version"]) == (
        40, pytest.approx(0.4), "yellow", YESTERDAY.date().isoformat(), 1, 3)
    [measurement] = (await read(metrics.client, f"/v1/kpis/{kpi['id']}/measurements",
                                f"metrics={written['position']}"))["items"]
    [check_in] = (await goals.get(f"/v1/key-results/{ids['kr']}/check-ins")).json()["items"]
    assert (check_in["measurementId"], check_in["actor"], check_in["note"], check_in["confidence"]) == (
        measurement["id"], "kpi-policy", "KPI measurement", None)

    # The stored event: the policy as actor, the measurement's correlation, the metrics
    # notification that caused it.
    [(version, state)] = stored_events(database_url, ids["kr"], "KeyResult.Progressed")
    [cause] = metrics_position(database_url, kpi["id"], "KPI.Measured")
    assert version == 3 and uuid_of(state["measurement_id"]) == measurement["id"]
    assert state["meta"]["actor"] == "kpi-policy"
    assert state["meta"]["correlation_id"] == "measure-40"
    assert state["meta"]["causation_id"] == f"metrics:{cause}"

    # A read that waits for the measurement's position sees the objective moved too.
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"metrics={written['position']}")
    assert objective["score"] == pytest.approx(0.4)


async def test_unbinding_stops_the_kpi_moving_the_key_result(goals: httpx.AsyncClient, metrics: Service) -> None:
    ids = await seed(goals)
    first, second = await define_kpi(metrics.client), await define_kpi(metrics.client, name="NPS")
    await bind(goals, ids["kr"], first["id"])
    m = await measure(metrics.client, first["id"], 10, YESTERDAY)
    assert (await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}"))["current"] == 10

    await bind(goals, ids["kr"], second["id"])  # rebinding: the first KPI no longer counts
    m = await measure(metrics.client, first["id"], 20, YESTERDAY + timedelta(hours=1))
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}")
    assert (kr["current"], kr["checkInCount"], kr["kpiId"]) == (10, 1, second["id"])
    m = await measure(metrics.client, second["id"], 30, YESTERDAY + timedelta(hours=2))
    assert (await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}"))["current"] == 30

    unbound = await ok(goals, "DELETE", f"/v1/key-results/{ids['kr']}/kpi")
    m = await measure(metrics.client, second["id"], 50, YESTERDAY + timedelta(hours=3))
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}, goals={unbound['position']}")
    assert (kr["current"], kr["checkInCount"], kr["kpiId"]) == (30, 2, None)
    await refused(goals, "DELETE", f"/v1/key-results/{ids['kr']}/kpi", None, 404)


async def test_a_frozen_key_result_is_skipped(goals: httpx.AsyncClient, metrics: Service) -> None:
    ids = await seed(goals)
    second = await ok(goals, "POST", "/v1/objectives", {
        "title": "Closed early", "owner": {"kind": "unit", "id": ids["unit"]}, "unitId": ids["unit"],
        "cycleId": ids["cycle"]}, 201)
    early = await ok(goals, "POST", f"/v1/objectives/{second['id']}/key-results",
                     {"title": "Reach 50", "kind": "stay_above", "target": 50}, 201)
    kpi = await define_kpi(metrics.client)
    await bind(goals, ids["kr"], kpi["id"])
    await bind(goals, early["id"], kpi["id"])
    await ok(goals, "POST", f"/v1/objectives/{second['id']}/close")
    m = await measure(metrics.client, kpi["id"], 60, YESTERDAY)
    assert (await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}"))["current"] == 60
    assert (await read(goals, f"/v1/key-results/{early['id']}", f"metrics={m['position']}"))["checkInCount"] == 0

    closed = await ok(goals, "POST", f"/v1/cycles/{ids['cycle']}/close")
    m = await measure(metrics.client, kpi["id"], 70, YESTERDAY + timedelta(hours=1))
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}, goals={closed['position']}")
    assert (kr["current"], kr["checkInCount"]) == (60, 1)


async def test_a_corrected_measurement_corrects_the_check_in(goals: httpx.AsyncClient, metrics: Service,
                                                             database_url: str) -> None:
    ids = await seed(goals)
    kpi = await define_kpi(metrics.client)
    await bind(goals, ids["kr"], kpi["id"])
    at = YESTERDAY + timedelta(hours=9)
    m = await measure(metrics.client, kpi["id"], 40, at)
    [measurement] = (await read(metrics.client, f"/v1/kpis/{kpi['id']}/measurements",
                                f"metrics={m['position']}"))["items"]
    corrected = await ok(metrics.client, "POST", f"/v1/kpis/{kpi['id']}/measurements/{measurement['id']}/corrections",
                         {"value": 45, "reason": "the survey tool double-counted"}, 201)
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={corrected['position']}")
    assert (kr["current"], kr["score"], kr["checkInCount"], kr["correctionCount"]) == (45, pytest.approx(0.45), 1, 1)
    correction, original = (await goals.get(f"/v1/key-results/{ids['kr']}/check-ins")).json()["items"]
    assert (original["value"], original["correctedBy"], original["measurementId"]) == (
        40, correction["version"], measurement["id"])
    assert (correction["value"], correction["correctsVersion"], correction["measurementId"], correction["actor"],
            correction["validOn"]) == (45, original["version"], measurement["id"], "kpi-policy", original["validOn"])
    assert "double-counted" in correction["note"]

    # The same moment and source again with another value is a correction in metrics too.
    resent = await measure(metrics.client, kpi["id"], 42, at)
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={resent['position']}")
    assert (kr["current"], kr["correctionCount"]) == (42, 2)
    [(_, state)] = stored_events(database_url, ids["kr"], "KeyResult.CheckInCorrected")[-1:]
    assert state["meta"]["actor"] == "kpi-policy" and state["meta"]["causation_id"].startswith("metrics:")


async def test_bad_bindings_get_problem_details(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    done = await ok(goals, "POST", f"/v1/objectives/{ids['objective']}/key-results",
                    {"title": "Ship the survey", "kind": "done"}, 201)
    kpi = str(uuid4())
    problem = await refused(goals, "PUT", f"/v1/key-results/{done['id']}/kpi", {"kpiId": kpi}, 422)
    assert "cannot follow a KPI" in problem["detail"]
    await refused(goals, "PUT", f"/v1/key-results/{uuid4()}/kpi", {"kpiId": kpi}, 404)
    await refused(goals, "PUT", f"/v1/key-results/{ids['kr']}/kpi", {"kpiId": "not-a-uuid"}, 422)
    await refused(goals, "PUT", f"/v1/key-results/{ids['kr']}/kpi", {}, 422)
    await refused(goals, "PUT", f"/v1/key-results/{ids['kr']}/kpi", {"kpiId": kpi}, 412, **{"If-Match": '"7"'})
    await refused(goals, "DELETE", f"/v1/key-results/{ids['kr']}/kpi", None, 404)
    await refused(goals, "PUT", f"/v1/objectives/{uuid4()}/guardrails/{kpi}", None, 404)
    await refused(goals, "DELETE", f"/v1/objectives/{ids['objective']}/guardrails/{kpi}", None, 404)
    await refused(goals, "GET", f"/v1/key-results/{ids['kr']}", None, 422, **{"Tandem-Wait-For": "metrics=999999"})


# Exactly once -----------------------------------------------------------------------------------

async def test_each_measurement_moves_the_key_result_once_across_restarts(
        metrics: Service, auth: Callable[..., dict[str, str]], database_url: str) -> None:
    """Measurements keep flowing while the goals service is stopped (its lifespan left) and
    started again, several times; in the end each one was checked in exactly once."""
    headers = auth("admin", "ada")
    async with serve(create_goals(), headers) as goals:
        ids = await seed(goals.client)
        kpi = await define_kpi(metrics.client, name="Flowing")
        await bind(goals.client, ids["kr"], kpi["id"])

    positions: list[int] = []
    budget = 0
    stopping, more, posted = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def flow() -> None:
        """Measurements one after another, up to the budget each round gives."""
        n = 0
        while not stopping.is_set():
            if n >= budget:
                more.clear()
                await more.wait()
                continue
            written = await measure(metrics.client, kpi["id"], n % 100, YESTERDAY + timedelta(seconds=n))
            positions.append(written["position"])
            posted.set()
            n += 1

    flowing = asyncio.create_task(flow())
    try:
        for _ in range(ROUNDS):
            async with serve(create_goals(), headers) as goals:
                first = len(positions)
                posted.clear()
                budget += PER_ROUND // 2
                more.set()
                await posted.wait()
                # This service's policy handles a measurement of this round ...
                await read(goals.client, f"/v1/key-results/{ids['kr']}", f"metrics={positions[first]}")
                # ... and the rest of the round's measurements flow while it stops and the next
                # one starts.
                budget += PER_ROUND - PER_ROUND // 2
                more.set()
    finally:
        stopping.set()
        more.set()
        await flowing
    assert len(positions) > ROUNDS

    async with serve(create_goals(), headers) as goals:
        kr = await read(goals.client, f"/v1/key-results/{ids['kr']}", f"metrics={positions[-1]}")
    assert kr["checkInCount"] == len(positions)
    progressed = stored_events(database_url, ids["kr"], "KeyResult.Progressed")
    carried = [uuid_of(state["measurement_id"]) for _, state in progressed if state.get("measurement_id")]
    measured = (await read(metrics.client, f"/v1/kpis/{kpi['id']}/measurements?limit=1000",
                           f"metrics={positions[-1]}"))["items"]
    assert len(carried) == len(set(carried)) == len(measured) == len(positions)
    assert set(carried) == {m["id"] for m in measured}
    causes = [state["meta"]["causation_id"] for _, state in progressed]
    assert causes == [f"metrics:{n}" for n in metrics_position(database_url, kpi["id"], "KPI.Measured")]


async def test_each_measurement_moves_the_key_result_once_across_restarts_of_metrics(
        goals: httpx.AsyncClient, auth: Callable[..., dict[str, str]], database_url: str) -> None:
    """The other side: metrics stopped and started again several times while goals follows its
    log, each instance taking new measurements and a resend of the last one (same time and
    source: stored once); in the end each measurement was checked in exactly once."""
    headers = auth("admin", "ada")
    ids = await seed(goals)
    positions: list[int] = []
    times: list[datetime] = []
    kpi: dict[str, Any] = {}
    for round_ in range(3):
        async with serve(create_metrics(MetricsSettings(run_staleness_watch=False)), headers) as metrics:
            if not kpi:
                kpi = await define_kpi(metrics.client, name="Restarted")
                await bind(goals, ids["kr"], kpi["id"])
            if times:  # the last measurement again, as a client retrying after the restart would
                again = await measure(metrics.client, kpi["id"], (len(times) - 1) % 100, times[-1])
                assert again["position"] <= positions[-1]
            for _ in range(10):
                times.append(YESTERDAY + timedelta(minutes=len(times)))
                written = await measure(metrics.client, kpi["id"], (len(times) - 1) % 100, times[-1])
                positions.append(written["position"])
            await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={positions[-1]}")
        assert round_ < 2 or len(positions) == 30
    kr = await read(goals, f"/v1/key-results/{ids['kr']}", f"metrics={positions[-1]}")
    assert kr["checkInCount"] == len(positions) == len(set(positions))
    carried = [uuid_of(state["measurement_id"])
               for _, state in stored_events(database_url, ids["kr"], "KeyResult.Progressed")]
    assert len(carried) == len(set(carried)) == len(metrics_position(database_url, kpi["id"], "KPI.Measured"))


async def test_goals_starts_before_the_metrics_log_exists(auth: Callable[..., dict[str, str]]) -> None:
    """On a database of its own: the policy's runner retries until the metrics log's table is
    there, and then catches up."""
    headers = auth("admin", "ada")
    with fresh_database() as url:
        async with serve(create_goals(GoalsSettings(DATABASE_URL=url)), headers) as goals:
            ids = await seed(goals.client)
            await refused(goals.client, "GET", f"/v1/key-results/{ids['kr']}", None, 422,
                          **{"Tandem-Wait-For": "metrics=1"})  # no such position yet
            async with serve(create_metrics(MetricsSettings(DATABASE_URL=url, run_staleness_watch=False)),
                             headers) as metrics:
                kpi_id = (await define_kpi(metrics.client))["id"]
                await bind(goals.client, ids["kr"], kpi_id)
                m = await measure(metrics.client, kpi_id, 25, YESTERDAY)
                kr = await read(goals.client, f"/v1/key-results/{ids['kr']}", f"metrics={m['position']}")
                assert kr["current"] == 25
                # The guardrails' read model has caught up too (it waits for it): all runners run.
                objective = await read(goals.client, f"/v1/objectives/{ids['objective']}", f"metrics={m['position']}")
                assert objective["score"] == pytest.approx(0.25)
                assert (await goals.client.get("/readyz")).status_code == 200


# Guardrails -------------------------------------------------------------------------------------

async def test_a_breached_guardrail_shows_on_the_objective_and_clears_on_recovery(
        goals: httpx.AsyncClient, metrics: Service) -> None:
    ids = await seed(goals)
    kpi = await define_kpi(metrics.client, FLOOR, name="Uptime")
    unknown = str(uuid4())
    added = await ok(goals, "PUT", f"/v1/objectives/{ids['objective']}/guardrails/{kpi['id']}",
                     **{"If-Match": '"2"', "Idempotency-Key": "guard-1"})
    assert added["version"] == 3
    again = await ok(goals, "PUT", f"/v1/objectives/{ids['objective']}/guardrails/{kpi['id']}")
    assert again["version"] == 3  # named already: nothing new
    added = await ok(goals, "PUT", f"/v1/objectives/{ids['objective']}/guardrails/{unknown}")
    objective = await read(goals, f"/v1/objectives/{ids['objective']}",
                           f"goals={added['position']}, metrics={kpi['position']}")
    assert objective["guardrails"] == [
        {"kpiId": kpi["id"], "name": "Uptime", "breached": False, "breachedRules": [], "stale": False},
        {"kpiId": unknown, "name": None, "breached": False, "breachedRules": [], "stale": False}]
    assert objective["guardrailBreached"] is False

    breach = await measure(metrics.client, kpi["id"], 85, YESTERDAY)
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"metrics={breach['position']}")
    assert objective["guardrails"][0] == {"kpiId": kpi["id"], "name": "Uptime", "breached": True,
                                          "breachedRules": ["floor"], "stale": False}
    assert objective["guardrailBreached"] is True
    assert "guardrail_breached" in [w["code"] for w in objective["warnings"]]
    listed = await read(goals, f"/v1/objectives?cycle={ids['cycle']}", f"metrics={breach['position']}")
    assert [o["guardrailBreached"] for o in listed["items"]] == [True]
    coaching = await read(goals, f"/v1/coaching?cycle={ids['cycle']}", f"metrics={breach['position']}")
    assert ("guardrail_breached", ids["objective"]) in [(w["code"], w["subjectId"]) for w in coaching["warnings"]]

    hovering = await measure(metrics.client, kpi["id"], 91, YESTERDAY + timedelta(hours=1))  # above, not past 92
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"metrics={hovering['position']}")
    assert objective["guardrailBreached"] is True
    recovered = await measure(metrics.client, kpi["id"], 93, YESTERDAY + timedelta(hours=2))
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"metrics={recovered['position']}")
    assert (objective["guardrails"][0]["breached"], objective["guardrailBreached"]) == (False, False)
    assert "guardrail_breached" not in [w["code"] for w in objective["warnings"]]

    # Staleness shows too (the staleness watch driven with a later `now`, as metrics' tests do).
    await read(metrics.client, f"/v1/kpis/{kpi['id']}", f"metrics={recovered['position']}")
    [stale] = await metrics.app.state.staleness_watch.check(datetime.now(UTC) + timedelta(days=3),
                                                           kpi_ids=[UUID(kpi["id"])])
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"metrics={stale.position}")
    assert (objective["guardrails"][0]["stale"], objective["guardrailBreached"]) == (True, False)

    removed = await ok(goals, "DELETE", f"/v1/objectives/{ids['objective']}/guardrails/{kpi['id']}")
    objective = await read(goals, f"/v1/objectives/{ids['objective']}", f"goals={removed['position']}")
    assert [g["kpiId"] for g in objective["guardrails"]] == [unknown]
    await refused(goals, "DELETE", f"/v1/objectives/{ids['objective']}/guardrails/{kpi['id']}", None, 404)

