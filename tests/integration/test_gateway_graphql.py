"""The gateway's GraphQL over its alignment read model, fed by real goals and metrics events.

The goals and metrics services run in-process and their REST APIs write the events; the
gateway's projection follows both logs into PostgreSQL and the GraphQL reads wait for it with
`Tandem-Wait-For` (never a sleep).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.common.database import create_pool
from services.gateway.api import create_app as create_gateway
from services.gateway.application import Alignment
from services.gateway.settings import GatewaySettings
from services.goals.api import create_app as create_goals
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

Headers = Callable[..., dict[str, str]]

TREE = """
query Tree($cycle: ID) {
  organization {
    name kind parent { id }
    objectives(cycle: $cycle) { edges { node {
      title score rolledUpScore band
      keyResults { title kind current confidence score band }
      children { title score rolledUpScore children { title score rolledUpScore } }
    } } }
    children {
      name kind
      objectives { edges { node { title parentId score rolledUpScore } } }
      children { name kind objectives { edges { node {
        title score rolledUpScore keyResults { title current score } } } } }
    }
  }
}"""


class Org:
    """What the goals API wrote, and the log position to wait for."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]):
        self.client, self.headers, self.position, self.ids = client, headers, 0, {}

    async def post(self, name: str, path: str, body: dict[str, Any]) -> uuid.UUID:
        r = await self.client.post(path, json=body, headers=self.headers)
        assert r.status_code in (200, 201), r.text
        self.position = max(self.position, r.json()["position"])
        self.ids[name] = uuid.UUID(r.json()["id"])
        return self.ids[name]

    async def unit(self, name: str, kind: str, parent: str | None = None) -> uuid.UUID:
        return await self.post(name, "/v1/units", {"name": name, "kind": kind,
                                                   "parentId": str(self.ids[parent]) if parent else None})

    async def objective(self, title: str, unit: str, parent: str | None = None) -> uuid.UUID:
        return await self.post(title, "/v1/objectives", {
            "title": title, "owner": {"kind": "unit", "id": str(self.ids[unit])},
            "unitId": str(self.ids[unit]), "cycleId": str(self.ids["Q1"]),
            "parentId": str(self.ids[parent]) if parent else None})

    async def key_result(self, title: str, objective: str, **body: Any) -> uuid.UUID:
        return await self.post(title, f"/v1/objectives/{self.ids[objective]}/key-results",
                               {"title": title, **body})

    async def check_in(self, kr: str, value: float, *, days_ago: int = 0, confidence: int | None = None) -> None:
        await self.post(f"{kr} check-in", f"/v1/key-results/{self.ids[kr]}/check-ins", {
            "value": value, "confidence": confidence,
            "validOn": (date.today() - timedelta(days=days_ago)).isoformat()})


@pytest.fixture(scope="module")
async def goals(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_goals(GoalsSettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def metrics(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_metrics(MetricsSettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def gateway(own_database: str, goals: httpx.AsyncClient,
                  metrics: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_gateway(GatewaySettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def org(goals: httpx.AsyncClient, auth: Headers) -> Org:
    """Acme > Engineering > Platform, and Acme > Sales, with objectives aligned across them.

    A (Acme): a1 decrease_to 8 -> 3 at 5.5 = 0.5 (weight 1); a2 increase_to, no check-in (weight 3).
    B (Engineering, aligned to A): b1 stay_above 99.9 at 99.95 = 1.0; b2 milestones 1,1,2 with 2 reached = 0.5.
    C (Platform, aligned to B): c1 done = 1.0 (weight 2); c2 increase_to 0 -> 10 at 4 = 0.4, where a
      later check-in for an earlier day (9) does not move it.
    D (Sales, aligned to A): no key results, no score.
    """
    o = Org(goals, auth("admin"))
    await o.unit("Acme", "company")
    await o.unit("Engineering", "department", "Acme")
    await o.unit("Sales", "department", "Acme")
    await o.unit("Platform", "team", "Engineering")
    await o.post("Q1", "/v1/cycles", {"name": "2026-Q1", "startsOn": "2026-01-01", "endsOn": "2026-03-31",
                                      "status": "active"})
    await o.objective("A", "Acme")
    await o.objective("B", "Engineering", parent="A")
    await o.objective("C", "Platform", parent="B")
    await o.objective("D", "Sales", parent="A")
    await o.key_result("a1", "A", kind="decrease_to", start=8, target=3, unit="h")
    await o.key_result("a2", "A", kind="increase_to", start=0, target=100, weight=3)
    await o.key_result("b1", "B", kind="stay_above", target=99.9, unit="%")
    await o.key_result("b2", "B", kind="milestones",
                       milestones=[{"title": "m1"}, {"title": "m2"}, {"title": "m3", "weight": 2}])
    await o.key_result("c1", "C", kind="done", weight=2)
    await o.key_result("c2", "C", kind="increase_to", start=0, target=10)
    await o.check_in("a1", 5.5, confidence=7)
    await o.check_in("b1", 99.95)
    await o.check_in("b2", 2)
    await o.check_in("c1", 1)
    await o.check_in("c2", 4, days_ago=1)
    await o.check_in("c2", 9, days_ago=2)
    return o


def nodes(connection: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["node"] for e in connection["edges"]]


async def graphql(client: httpx.AsyncClient, headers: dict[str, str], query: str,
                  wait: str | None = None, **variables: Any) -> dict[str, Any]:
    if wait:
        headers = {**headers, "Tandem-Wait-For": wait}
    r = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


async def test_the_tree_scores_and_rolls_up(gateway: httpx.AsyncClient, org: Org, auth: Headers) -> None:
    data = await graphql(gateway, auth("member"), TREE, wait=f"goals={org.position}")
    acme = data["organization"]
    assert (acme["name"], acme["kind"], acme["parent"]) == ("Acme", "company", None)
    [a] = nodes(acme["objectives"])
    assert a["title"] == "A"
    assert a["score"] == pytest.approx(0.5)
    assert a["band"] == "yellow"
    assert a["rolledUpScore"] == pytest.approx((0.5 + (1.0 + 0.5 + 0.8) / 3) / 2)  # 0.6333
    assert [(k["title"], k["current"], k["confidence"], k["score"]) for k in a["keyResults"]] == [
        ("a1", 5.5, 7, pytest.approx(0.5)), ("a2", None, None, None)]
    b, d = a["children"]
    assert (b["title"], b["score"], b["rolledUpScore"]) == ("B", pytest.approx(0.75),
                                                           pytest.approx((1.0 + 0.5 + 0.8) / 3))
    assert (d["title"], d["score"], d["rolledUpScore"]) == ("D", None, None)
    assert [(c["title"], c["score"], c["rolledUpScore"]) for c in b["children"]] == [
        ("C", pytest.approx(0.8), pytest.approx(0.8))]

    engineering, sales = acme["children"]
    assert (engineering["name"], engineering["kind"], sales["name"]) == ("Engineering", "department", "Sales")
    assert [o["parentId"] for o in nodes(engineering["objectives"])] == [str(org.ids["A"])]
    [platform] = engineering["children"]
    assert (platform["name"], platform["kind"]) == ("Platform", "team")
    [c] = nodes(platform["objectives"])
    assert [(k["title"], k["current"], k["score"]) for k in c["keyResults"]] == [
        ("c1", 1.0, 1.0), ("c2", 4.0, pytest.approx(0.4))]  # the check-in for an earlier day is history


async def test_a_unit_knows_its_parents_and_filters_by_cycle(
        gateway: httpx.AsyncClient, org: Org, auth: Headers) -> None:
    query = """query($id: ID!, $cycle: ID) { unit(id: $id) {
        name parent { name kpis { id } parent { name parent { name } children { name } } }
        objectives(cycle: $cycle) { edges { node { title } } } } }"""
    data = await graphql(gateway, auth("auditor"), query, wait=f"goals={org.position}",
                         id=str(org.ids["Platform"]))
    unit = data["unit"]
    assert unit["parent"]["name"] == "Engineering"
    assert unit["parent"]["parent"] == {"name": "Acme", "parent": None, "children": [{"name": "Engineering"},
                                                                                   {"name": "Sales"}]}
    assert [o["title"] for o in nodes(unit["objectives"])] == ["C"]
    other = await graphql(gateway, auth(), query, id=str(org.ids["Platform"]), cycle=str(uuid.uuid4()))
    assert other["unit"]["objectives"]["edges"] == []
    assert (await graphql(gateway, auth(), query, id=str(uuid.uuid4())))["unit"] is None


async def test_bad_ids_and_over_deep_queries_are_refused(
        gateway: httpx.AsyncClient, org: Org, auth: Headers) -> None:
    r = await gateway.post("/graphql", json={"query": '{ unit(id: "nope") { name } }'}, headers=auth())
    assert r.json()["errors"][0]["message"] == "id is not an id this API gave out"
    deep = "{ organization { " + "children { " * 25 + "name" + " }" * 25 + " } }"
    r = await gateway.post("/graphql", json={"query": deep}, headers=auth())
    assert "exceeds maximum operation depth" in r.json()["errors"][0]["message"]


async def test_a_subtree_loads_in_a_fixed_number_of_round_trips(
        gateway: httpx.AsyncClient, org: Org, auth: Headers, own_database: str) -> None:
    pool = await create_pool(own_database, "gateway")
    try:
        await graphql(gateway, auth(), "{ organization { name } }", wait=f"goals={org.position}")
        small = Alignment(pool)
        await small.organization()
        for i in range(6):
            await org.unit(f"Squad {i}", "team", "Platform")
            await org.objective(f"S{i}", f"Squad {i}", parent="C")
        await graphql(gateway, auth(), "{ organization { name } }", wait=f"goals={org.position}")
        large = Alignment(pool)
        await large.organization()
        assert (len(small.units), len(large.units)) == (4, 10)
        assert small.queries == large.queries == 6  # the root, then units, objectives, KRs, KPIs, people
        assert len(large.aligned[org.ids["C"]]) == 6
    finally:
        await pool.close()


async def test_reads_need_a_bearer_token(gateway: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        r = await gateway.post("/graphql", json={"query": "{ organization { name } }"}, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 401
    page = await gateway.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


async def test_waiting_for_an_unknown_log_is_a_bad_request(gateway: httpx.AsyncClient, auth: Headers) -> None:
    r = await gateway.post("/graphql", json={"query": "{ organization { name } }"},
                           headers={**auth(), "Tandem-Wait-For": "billing=3"})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_kpis_follow_the_metrics_log(
        gateway: httpx.AsyncClient, metrics: httpx.AsyncClient, org: Org, auth: Headers) -> None:
    """A KPI of the Platform team through define, measure (also late), breach and recovery; its
    state and its rule's state through GraphQL after each step."""
    r = await metrics.post("/v1/kpis", headers=auth(), json={
        "name": "Availability", "unit": "%", "unitId": str(org.ids["Platform"]),
        "direction": "higher_is_better", "cadence": "daily", "target": 99.9,
        "rules": [{"kind": "below", "threshold": 99.5, "severity": "critical", "pendingCount": 2,
                   "recovery": 99.7}]})
    assert r.status_code == 201, r.text
    kpi_id, position = r.json()["id"], r.json()["position"]
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
    query = """query($id: ID!) { unit(id: $id) { kpis {
        id name unit direction target state latestValue latestMeasuredAt
        rules { id kind threshold severity pendingCount recovery state } } } }"""

    async def measure(value: float, hours: int) -> None:
        nonlocal position
        r = await metrics.post(f"/v1/kpis/{kpi_id}/measurements", headers=auth(), json={
            "value": value, "measuredAt": (t0 + timedelta(hours=hours)).isoformat()})
        assert r.status_code == 201, r.text
        position = r.json()["position"]

    async def kpi() -> dict[str, Any]:
        data = await graphql(gateway, auth(), query, wait=f"goals={org.position}, metrics={position}",
                             id=str(org.ids["Platform"]))
        [k] = data["unit"]["kpis"]
        return k

    k = await kpi()
    assert (k["id"], k["name"], k["direction"], k["target"]) == (kpi_id, "Availability", "higher_is_better", 99.9)
    assert (k["state"], k["latestValue"], k["latestMeasuredAt"]) == ("no_data", None, None)
    assert k["rules"] == [{"id": "rule-1", "kind": "below", "threshold": 99.5, "severity": "critical",
                           "pendingCount": 2, "recovery": 99.7, "state": "ok"}]

    await measure(99.0, 1)  # one violation of two: pending
    k = await kpi()
    assert (k["state"], k["rules"][0]["state"], k["latestValue"]) == ("pending", "pending", 99.0)

    await measure(99.9, 0)  # older than the latest: history, changes nothing
    k = await kpi()
    assert (k["state"], k["latestValue"]) == ("pending", 99.0)
    assert datetime.fromisoformat(k["latestMeasuredAt"]) == t0 + timedelta(hours=1)

    await measure(98.0, 2)  # the second violation fires the rule
    assert (await kpi())["state"] == "breached"
    await measure(99.6, 3)  # off the threshold but short of the recovery bound: still breached
    assert (await kpi())["state"] == "breached"
    await measure(99.8, 4)
    k = await kpi()
    assert (k["state"], k["rules"][0]["state"], k["latestValue"]) == ("ok", "ok", 99.8)
