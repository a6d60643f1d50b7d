"""The gateway's KPIs follow the metrics service's semantics from its events alone.

Goals, metrics and the gateway run in process on a database of this module's own; the metrics
REST API writes the events (its staleness watch is driven directly with an injected `now`), and
every GraphQL read waits for the gateway's projection with `Tandem-Wait-For` (never a sleep).
Breach and recovery come only from the metrics log; pending is read off the latest value by
valid time; stale over pending; corrections, rule revisions and target changes as recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.gateway.api import create_app as create_gateway
from services.gateway.settings import GatewaySettings
from services.goals.api import create_app as create_goals
from services.goals.settings import GoalsSettings
from services.metrics.api import StalenessWatch
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

Headers = Callable[..., dict[str, str]]

GRACE = timedelta(hours=1)
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(days=10)
TODAY = NOW.date()

KPIS = """query($id: ID!) { unit(id: $id) { kpis {
    id name target state stale latestValue latestMeasuredAt
    rules { id kind threshold low high severity pendingCount pendingFor recovery state } } } }"""


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat()


@dataclass
class Metrics:
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def watch(self) -> StalenessWatch:
        return self.app.state.staleness_watch


@pytest.fixture(scope="module")
async def goals(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_goals(GoalsSettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def metrics(own_database: str) -> AsyncIterator[Metrics]:
    app = create_metrics(MetricsSettings(DATABASE_URL=own_database, run_staleness_watch=False,
                                         staleness_grace_seconds=GRACE.total_seconds()))
    async for client in serve_in_process(app):
        yield Metrics(client, app)


@pytest.fixture(scope="module")
async def gateway(own_database: str, goals: httpx.AsyncClient, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_gateway(GatewaySettings(DATABASE_URL=own_database))):
        yield client


@dataclass(frozen=True)
class Unit:
    id: str
    position: int


@pytest.fixture(scope="module")
async def unit(goals: httpx.AsyncClient, auth: Headers) -> Unit:
    r = await goals.post("/v1/units", json={"name": "Acme", "kind": "company", "parentId": None},
                         headers=auth("admin"))
    assert r.status_code == 201, r.text
    return Unit(r.json()["id"], r.json()["position"])


class KPI:
    """One KPI: written through the metrics REST API, read through the gateway's GraphQL."""

    def __init__(self, metrics: Metrics, gateway: httpx.AsyncClient, unit: Unit, headers: dict[str, str]):
        self.metrics, self.gateway, self.unit, self.headers = metrics, gateway, unit, headers
        self.id = ""
        self.position = 0

    async def write(self, method: str, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
        r = await self.metrics.client.request(method, path, json=body, headers=self.headers)
        assert r.status_code == status, r.text
        self.position = max(self.position, r.json()["position"])
        return r.json()

    async def define(self, name: str, rules: list[dict[str, Any]], **body: Any) -> KPI:
        self.id = (await self.write("POST", "/v1/kpis", {
            "name": name, "unit": "%", "unitId": self.unit.id, "direction": "higher_is_better",
            "cadence": "daily", "rules": rules, **body}))["id"]
        return self

    async def measure(self, value: float, measured_at: str, source: str = "api") -> None:
        await self.write("POST", f"/v1/kpis/{self.id}/measurements",
                         {"value": value, "measuredAt": measured_at, "source": source})

    async def correct(self, measurement_id: str, value: float) -> None:
        await self.write("POST", f"/v1/kpis/{self.id}/measurements/{measurement_id}/corrections",
                         {"value": value, "reason": "the probe was misconfigured"})

    async def revise(self, *rules: dict[str, Any]) -> None:
        await self.write("PUT", f"/v1/kpis/{self.id}/rules", {"rules": list(rules), "reason": "tuning"}, status=200)

    async def change_target(self, target: float, effective_from: date | None) -> None:
        await self.write("POST", f"/v1/kpis/{self.id}/targets", {
            "target": target, "effectiveFrom": effective_from.isoformat() if effective_from else None,
            "reason": "the board asked"})

    async def measurement_ids(self) -> dict[tuple[datetime, str], str]:
        """(measuredAt, source) -> id, from the metrics read model once it has this KPI's writes."""
        r = await self.metrics.client.get(f"/v1/kpis/{self.id}/measurements?limit=1000",
                                          headers={**self.headers, "Tandem-Wait-For": f"metrics={self.position}"})
        assert r.status_code == 200, r.text
        return {(datetime.fromisoformat(m["measuredAt"]), m["source"]): m["id"] for m in r.json()["items"]}

    async def read(self, gateway: httpx.AsyncClient | None = None) -> dict[str, Any]:
        r = await (gateway or self.gateway).post("/graphql", json={"query": KPIS, "variables": {"id": self.unit.id}},
                                                 headers={**self.headers, "Tandem-Wait-For":
                                                          f"goals={self.unit.position}, metrics={self.position}"})
        assert r.status_code == 200, r.text
        assert "errors" not in r.json(), r.json()["errors"]
        [k] = [k for k in r.json()["data"]["unit"]["kpis"] if k["id"] == self.id]
        return k

    async def states(self) -> tuple[str, bool, float | None, dict[str, str]]:
        """The KPI's state, stale flag, latest value and each rule's state."""
        k = await self.read()
        return k["state"], k["stale"], k["latestValue"], {r["id"]: r["state"] for r in k["rules"]}


@pytest.fixture
def kpi(metrics: Metrics, gateway: httpx.AsyncClient, unit: Unit, auth: Headers) -> KPI:
    return KPI(metrics, gateway, unit, auth("admin"))


AVAIL = {"id": "avail", "kind": "below", "threshold": 99.5, "severity": "critical", "pendingCount": 2,
         "recovery": 99.7}


async def test_pending_is_read_off_the_latest_value_by_valid_time(kpi: KPI) -> None:
    await kpi.define("Availability", [AVAIL], target=99.9)
    assert await kpi.states() == ("no_data", False, None, {"avail": "ok"})

    await kpi.measure(99.0, at(1))  # one violation of two: pending
    assert await kpi.states() == ("pending", False, 99.0, {"avail": "pending"})
    await kpi.measure(98.0, at(3))  # the second fires the rule
    assert await kpi.states() == ("breached", False, 98.0, {"avail": "breached"})

    # Late, and it cuts the run (99.0, 99.9, 98.0): the metrics service recovers the rule. The
    # latest value still violates it, so it is pending again, not ok.
    await kpi.measure(99.9, at(2))
    assert await kpi.states() == ("pending", False, 98.0, {"avail": "pending"})

    # Late again, and this one completes a run (97.0, 98.0): breached, on the service's word.
    await kpi.measure(97.0, at(2.5))
    assert await kpi.states() == ("breached", False, 98.0, {"avail": "breached"})

    await kpi.measure(99.6, at(4))  # off the threshold, short of the recovery bound
    assert await kpi.states() == ("breached", False, 99.6, {"avail": "breached"})
    await kpi.measure(99.8, at(5))
    assert await kpi.states() == ("ok", False, 99.8, {"avail": "ok"})

    await kpi.measure(99.0, at(7))
    await kpi.measure(99.9, at(6))  # arrived last, but older: the latest is still 99.0
    k = await kpi.read()
    assert (k["state"], k["latestValue"], datetime.fromisoformat(k["latestMeasuredAt"])) == (
        "pending", 99.0, T0 + timedelta(hours=7))
    await kpi.measure(99.95, at(7), source="probe-b")  # the same moment from another source: arrived later
    assert await kpi.states() == ("ok", False, 99.95, {"avail": "ok"})


async def test_a_correction_of_the_latest_measurement_moves_the_state(kpi: KPI) -> None:
    await kpi.define("Checkout success", [{**AVAIL, "pendingCount": 3}])
    await kpi.measure(99.9, at(1))
    await kpi.measure(99.8, at(2))
    ids = await kpi.measurement_ids()

    await kpi.correct(ids[(T0 + timedelta(hours=2), "api")], 99.0)  # the latest
    assert await kpi.states() == ("pending", False, 99.0, {"avail": "pending"})
    await kpi.correct(ids[(T0 + timedelta(hours=1), "api")], 98.0)  # an older one: two of three, still pending
    assert await kpi.states() == ("pending", False, 99.0, {"avail": "pending"})

    await kpi.measure(99.9, at(3))
    await kpi.measure(99.95, at(3), source="probe-b")  # the same moment, arrived later: the latest
    assert await kpi.states() == ("ok", False, 99.95, {"avail": "ok"})
    ids = await kpi.measurement_ids()
    # The one of the same moment that is not the latest: (98.0, 99.0, 90.0) fires and 99.95 clears
    # again, so nothing is announced and the latest value is untouched.
    await kpi.correct(ids[(T0 + timedelta(hours=3), "api")], 90.0)
    assert await kpi.states() == ("ok", False, 99.95, {"avail": "ok"})

    # The same moment and source again with another value is a correction too (of the latest).
    await kpi.measure(99.2, at(3), source="probe-b")
    assert await kpi.states() == ("breached", False, 99.2, {"avail": "breached"})


async def test_revised_rules_keep_their_breach_by_id(kpi: KPI) -> None:
    avail = {**AVAIL, "pendingCount": 1}
    spike = {"id": "spike", "kind": "above", "threshold": 1000, "severity": "warning", "pendingFor": 600}
    await kpi.define("Uptime", [avail])
    await kpi.measure(99.0, at(1))
    assert await kpi.states() == ("breached", False, 99.0, {"avail": "breached"})

    await kpi.revise(avail, spike)  # avail stays, still breached; spike is new and ok
    k = await kpi.read()
    assert (k["state"], [(r["id"], r["state"], r["pendingFor"]) for r in k["rules"]]) == (
        "breached", [("avail", "breached", 0), ("spike", "ok", 600)])

    await kpi.revise({**avail, "pendingFor": 3600}, spike)  # a single violation spans no time: recovered
    k = await kpi.read()
    assert k["state"] == "pending"
    assert k["rules"][0] == {"id": "avail", "kind": "below", "threshold": 99.5, "low": None, "high": None,
                             "severity": "critical", "pendingCount": 1, "pendingFor": 3600, "recovery": 99.7,
                             "state": "pending"}
    await kpi.measure(98.5, at(2))  # an hour of violations: fires
    assert await kpi.states() == ("breached", False, 98.5, {"avail": "breached", "spike": "ok"})

    await kpi.revise(spike)  # the breached rule withdrawn: recovered first
    assert await kpi.states() == ("ok", False, 98.5, {"spike": "ok"})
    await kpi.revise({**avail, "pendingCount": 5}, spike)  # back, as a new rule: not breached
    assert await kpi.states() == ("pending", False, 98.5, {"avail": "pending", "spike": "ok"})


async def test_stale_outranks_pending_and_breached_outranks_stale(kpi: KPI) -> None:
    await kpi.define("Orders per day", [AVAIL])
    await kpi.measure(99.0, (NOW - timedelta(days=3)).isoformat())
    assert await kpi.states() == ("pending", False, 99.0, {"avail": "pending"})
    await kpi.measurement_ids()  # the metrics read model, where the watch looks, has it too

    [stale] = await kpi.metrics.watch.check(NOW, kpi_ids=[uuid.UUID(kpi.id)])
    kpi.position = max(kpi.position, stale.position)
    assert await kpi.states() == ("stale", True, 99.0, {"avail": "pending"})

    await kpi.measure(98.0, (NOW - timedelta(days=3) + timedelta(hours=1)).isoformat())  # still overdue; fires
    assert await kpi.states() == ("breached", True, 98.0, {"avail": "breached"})
    await kpi.measure(99.9, NOW.isoformat())  # on time again: recovered and freshened
    assert await kpi.states() == ("ok", False, 99.9, {"avail": "ok"})


async def test_a_kpi_never_measured_goes_stale(kpi: KPI) -> None:
    await kpi.define("Net promoter score", [])
    assert await kpi.states() == ("no_data", False, None, {})
    await kpi.measurement_ids()
    [stale] = await kpi.metrics.watch.check(NOW + timedelta(days=2), kpi_ids=[uuid.UUID(kpi.id)])
    kpi.position = max(kpi.position, stale.position)
    assert await kpi.states() == ("stale", True, None, {})


async def test_the_target_in_force_is_the_latest_effective_change(kpi: KPI, metrics: Metrics,
                                                                  gateway: httpx.AsyncClient, unit: Unit,
                                                                  auth: Headers) -> None:
    await kpi.define("Latency", [], target=99.9)
    assert (await kpi.read())["target"] == 99.9
    await kpi.change_target(99.95, TODAY - timedelta(days=1))
    assert (await kpi.read())["target"] == 99.95
    await kpi.change_target(99.99, TODAY + timedelta(days=1))  # not yet
    await kpi.change_target(99.0, TODAY - timedelta(days=10))  # recorded later, in force earlier
    assert (await kpi.read())["target"] == 99.95
    await kpi.change_target(99.97, TODAY - timedelta(days=1))  # the same day: the later recorded
    assert (await kpi.read())["target"] == 99.97
    await kpi.change_target(99.5, None)  # from today
    assert (await kpi.read())["target"] == 99.5

    undefined = await KPI(metrics, gateway, unit, auth("admin")).define("Churn", [])
    await undefined.change_target(2.0, TODAY + timedelta(days=30))
    assert (await undefined.read())["target"] is None


async def test_a_replayed_read_model_shows_the_same_kpis(
        kpi: KPI, metrics: Metrics, unit: Unit, own_database: str, auth: Headers) -> None:
    """A second gateway on a schema of its own replays both logs from the start."""
    await kpi.define("Position marker", [])  # past every event the other tests wrote
    settings = GatewaySettings(DATABASE_URL=own_database, schema_name="gateway_replay")
    query = {"query": KPIS, "variables": {"id": unit.id}}
    headers = {**auth(), "Tandem-Wait-For": f"goals={unit.position}, metrics={kpi.position}"}
    async for replay in serve_in_process(create_gateway(settings)):
        replayed = (await replay.post("/graphql", json=query, headers=headers)).json()
    original = (await kpi.gateway.post("/graphql", json=query, headers=headers)).json()
    assert "errors" not in original and original["data"]["unit"]["kpis"]
    assert replayed == original
