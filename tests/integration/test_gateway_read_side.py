"""The gateway's GraphQL read side: units up and down the tree, people, objective connections,
objectives with their parents, contributions, guardrails, warnings and cycles, key results with
their KPI and check-in history, KPI series and forecasts, the alignment cascade and the health
of a subtree; bad arguments; SQL statements that do not grow with the org; a rebuild that
gives the same tables.

Goals, metrics and the gateway run in process on a database of this module's own; REST writes
the events and every read waits for the gateway with `Tandem-Wait-For` (never a sleep).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from asyncpg import introspection
from fastapi import FastAPI

from services.common.database import create_pool, ensure_schema, wait_for_position
from services.common.projections import ProjectionThread
from services.common.schemas import encode_cursor
from services.gateway.api import create_app as create_gateway
from services.gateway.application import Alignment, Loaded
from services.gateway.projections import AlignmentReadModel, alignment_projections
from services.gateway.settings import GatewaySettings
from services.goals.api import create_app as create_goals
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

Headers = Callable[..., dict[str, str]]

NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
T0 = NOW - timedelta(days=4)
"""The latency KPI's first measurement; one a day after it."""
POOL_SIZE = 4


class World:
    """What the REST APIs wrote: ids by name, versions, and the positions to wait for."""

    def __init__(self, goals: httpx.AsyncClient, metrics: httpx.AsyncClient, headers: dict[str, str]):
        self.clients = {"goals": goals, "metrics": metrics}
        self.headers = headers
        self.positions = {"goals": 0, "metrics": 0}
        self.ids: dict[str, uuid.UUID] = {}
        self.versions: dict[str, int] = {}

    @property
    def wait(self) -> str:
        return ", ".join(f"{log}={n}" for log, n in self.positions.items())

    def id(self, name: str) -> str:
        return str(self.ids[name])

    async def write(self, log: str, method: str, path: str, body: dict[str, Any] | None = None,
                    name: str | None = None) -> dict[str, Any]:
        r = await self.clients[log].request(method, path, json=body, headers=self.headers)
        assert r.status_code in (200, 201), r.text
        out = r.json()
        self.positions[log] = max(self.positions[log], out["position"])
        if name:
            self.ids.setdefault(name, uuid.UUID(out["id"]))
            self.versions[name] = out["version"]
        return out

    async def unit(self, name: str, kind: str, parent: str | None = None) -> None:
        await self.write("goals", "POST", "/v1/units", {"name": name, "kind": kind,
                                                        "parentId": self.id(parent) if parent else None}, name)

    async def person(self, name: str, unit: str, manager: str | None = None) -> None:
        await self.write("goals", "POST", "/v1/people", {
            "name": name, "email": f"{name.lower().replace(' ', '.')}@acme.test", "unitId": self.id(unit),
            "managerId": self.id(manager) if manager else None}, name)

    async def cycle(self, name: str, starts_on: date, ends_on: date, kind: str, status: str = "active") -> None:
        await self.write("goals", "POST", "/v1/cycles", {"name": name, "kind": kind, "startsOn": starts_on.isoformat(),
                                                         "endsOn": ends_on.isoformat(), "status": status}, name)

    async def objective(self, title: str, unit: str, owner: str | None = None, parent: str | None = None,
                        cycle: str = "Now", status: str = "active") -> None:
        owner_ref = {"kind": "person", "id": self.id(owner)} if owner else {"kind": "unit", "id": self.id(unit)}
        await self.write("goals", "POST", "/v1/objectives", {
            "title": title, "owner": owner_ref, "unitId": self.id(unit), "cycleId": self.id(cycle),
            "parentId": self.id(parent) if parent else None, "status": status}, title)

    async def key_result(self, name: str, objective: str, **body: Any) -> None:
        await self.write("goals", "POST", f"/v1/objectives/{self.id(objective)}/key-results",
                         {"title": body.pop("title", name), **body}, name)

    async def check_in(self, kr: str, value: float, days_ago: int = 0, confidence: int | None = None) -> int:
        out = await self.write("goals", "POST", f"/v1/key-results/{self.id(kr)}/check-ins", {
            "value": value, "confidence": confidence, "validOn": (TODAY - timedelta(days=days_ago)).isoformat()})
        return out["version"]

    async def kpi(self, name: str, unit: str, rules: list[dict[str, Any]], direction: str = "higher_is_better") -> None:
        await self.write("metrics", "POST", "/v1/kpis", {
            "name": name, "unit": "", "unitId": self.id(unit), "direction": direction, "cadence": "daily",
            "rules": rules}, name)

    async def measure(self, kpi: str, value: float, at: datetime, name: str | None = None) -> None:
        """A measurement; with a name, its id (from the metrics API's list) is kept under it."""
        await self.write("metrics", "POST", f"/v1/kpis/{self.id(kpi)}/measurements",
                         {"value": value, "measuredAt": at.isoformat()})
        if name:
            r = await self.clients["metrics"].get(f"/v1/kpis/{self.id(kpi)}/measurements", headers={
                **self.headers, "Tandem-Wait-For": f"metrics={self.positions['metrics']}"})
            assert r.status_code == 200, r.text
            [item] = [m for m in r.json()["items"] if datetime.fromisoformat(m["measuredAt"]) == at]
            self.ids[name] = uuid.UUID(item["id"])

    async def follow_goals_policy(self) -> None:
        """Wait on goals for the metrics position, so that the gateway waits for what the goals
        KPI policy wrote too: goals reports it as its read position."""
        r = await self.clients["goals"].get("/v1/units", headers={**self.headers,
                                                                 "Tandem-Wait-For": f"metrics={self.positions['metrics']}"})
        assert r.status_code == 200, r.text
        reflected = dict(p.strip().split("=") for p in r.headers["Tandem-Read-Position"].split(","))
        self.positions["goals"] = max(self.positions["goals"], int(reflected["goals"]))


@pytest.fixture(scope="module")
async def goals(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_goals(GoalsSettings(DATABASE_URL=own_database))):
        yield client


@pytest.fixture(scope="module")
async def metrics(own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_metrics(MetricsSettings(DATABASE_URL=own_database,
                                                                        run_staleness_watch=False))):
        yield client


@pytest.fixture(scope="module")
def gateway_app(own_database: str) -> FastAPI:
    return create_gateway(GatewaySettings(DATABASE_URL=own_database, database_pool_size=POOL_SIZE))


@pytest.fixture(scope="module")
async def gateway(gateway_app: FastAPI, goals: httpx.AsyncClient,
                  metrics: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(gateway_app):
        yield client


@pytest.fixture(scope="module")
async def world(goals: httpx.AsyncClient, metrics: httpx.AsyncClient, auth: Headers) -> World:
    """Acme > Engineering > Platform, Acme > Sales > Pager, in the cycle "Now" (active, around
    today; "Wide", a year around it, is active too; "Past" ended in 2020).

    A (Acme):        a1 increase_to 0 -> 10 at 5 (conf 8) = 0.5.
    B (Engineering, Bob, aligned to A): b1 decrease_to 10 -> 0 at 2 ten days ago (no confidence) = 0.8;
                     b2 stay_above 50 at 60 three days ago (conf 5) = 1.0.
    C (Platform, Cy, aligned to B): c1 increase_to 0 -> 100: 20 five days ago, 40 yesterday corrected to
                     30 = 0.3; c2 "Launch new website" done, never checked in. Guardrail: Latency (ok).
    O (Platform, Cy, no parent) "Maintain NPS above 50": no key results. Guardrail: Uptime (breached).
    P (Platform, Cy) in Past.
    S (Sales, Dee who left, aligned to A, contributes 0.5 to B): s1 stay_below 5 at 4 (conf 9) = 1.0;
                     s2 increase_to 80 -> 90 bound to the CSAT KPI, moved to 85 by a measurement = 0.5.
    P1-P5 (Pager) in Now, P2 and P4 drafts; P6 (Pager) in Past.
    """
    w = World(goals, metrics, auth("admin"))
    await w.cycle("Now", TODAY - timedelta(days=30), TODAY + timedelta(days=60), "quarter")
    await w.cycle("Wide", TODAY - timedelta(days=200), TODAY + timedelta(days=165), "year")
    await w.cycle("Past", date(2020, 1, 1), date(2020, 3, 31), "quarter", status="planning")
    await w.unit("Acme", "company")
    await w.unit("Engineering", "department", "Acme")
    await w.unit("Sales", "department", "Acme")
    await w.unit("Platform", "team", "Engineering")
    await w.unit("Pager", "team", "Sales")
    await w.person("Ada", "Acme")
    await w.person("Bob", "Engineering", "Ada")
    await w.person("Cy", "Platform", "Bob")
    await w.person("Eve", "Platform", "Bob")
    await w.person("Dee", "Sales", "Ada")

    await w.objective("A", "Acme")
    await w.objective("B", "Engineering", owner="Bob", parent="A")
    await w.objective("C", "Platform", owner="Cy", parent="B")
    await w.objective("Maintain NPS above 50", "Platform", owner="Cy")
    await w.objective("P", "Platform", owner="Cy", cycle="Past")
    await w.objective("S", "Sales", owner="Dee", parent="A")
    await w.write("goals", "PUT", f"/v1/objectives/{w.id('S')}/contributions/{w.id('B')}", {"weight": 0.5})
    for i in range(1, 6):
        await w.objective(f"P{i}", "Pager", status="draft" if i in (2, 4) else "active")
    await w.objective("P6", "Pager", cycle="Past")

    await w.key_result("a1", "A", kind="increase_to", start=0, target=10)
    await w.key_result("b1", "B", kind="decrease_to", start=10, target=0)
    await w.key_result("b2", "B", kind="stay_above", target=50)
    await w.key_result("c1", "C", title="Increase adoption", kind="increase_to", start=0, target=100)
    await w.key_result("c2", "C", title="Launch new website", kind="done")
    await w.key_result("s1", "S", kind="stay_below", target=5)
    await w.key_result("s2", "S", kind="increase_to", start=80, target=90)
    await w.check_in("a1", 5, confidence=8)
    await w.check_in("b1", 2, days_ago=10)
    await w.check_in("b2", 60, days_ago=3, confidence=5)
    w.versions["c1 first"] = await w.check_in("c1", 20, days_ago=5, confidence=6)
    w.versions["c1 second"] = await w.check_in("c1", 40, days_ago=1, confidence=7)
    correction = await w.write("goals", "POST",
                               f"/v1/key-results/{w.id('c1')}/check-ins/{w.versions['c1 second']}/corrections",
                               {"value": 30})
    w.versions["c1 correction"] = correction["version"]
    await w.check_in("s1", 4, confidence=9)

    await w.kpi("Uptime", "Platform", [{"kind": "below", "threshold": 99, "severity": "critical"}])
    await w.measure("Uptime", 98, NOW - timedelta(hours=1))  # fires at once: breached
    await w.kpi("Latency", "Platform", [{"id": "slow", "kind": "above", "threshold": 200, "severity": "warning"}],
                direction="lower_is_better")
    for day, value in enumerate([100, 110, 120, 150]):
        await w.measure("Latency", value, T0 + timedelta(days=day), name=f"latency {day}")
    await w.write("metrics", "POST", f"/v1/kpis/{w.id('Latency')}/measurements/{w.id('latency 3')}/corrections",
                  {"value": 130, "reason": "double-counted requests"})
    await w.kpi("CSAT", "Sales", [])
    await w.write("goals", "PUT", f"/v1/objectives/{w.id('Maintain NPS above 50')}/guardrails/{w.id('Uptime')}")
    await w.write("goals", "PUT", f"/v1/objectives/{w.id('C')}/guardrails/{w.id('Latency')}")
    await w.write("goals", "PUT", f"/v1/key-results/{w.id('s2')}/kpi", {"kpiId": w.id("CSAT")})
    await w.measure("CSAT", 85, NOW - timedelta(hours=1), name="csat measurement")
    await w.write("goals", "POST", f"/v1/people/{w.id('Dee')}/leave", {"leftOn": TODAY.isoformat()})
    await w.follow_goals_policy()
    return w


async def post(client: httpx.AsyncClient, headers: dict[str, str], query: str, wait: str | None = None,
               **variables: Any) -> dict[str, Any]:
    if wait:
        headers = {**headers, "Tandem-Wait-For": wait}
    r = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def graphql(client: httpx.AsyncClient, headers: dict[str, str], query: str, wait: str | None = None,
                  **variables: Any) -> dict[str, Any]:
    body = await post(client, headers, query, wait, **variables)
    assert "errors" not in body, body["errors"]
    return body["data"]


async def error(client: httpx.AsyncClient, headers: dict[str, str], query: str, **variables: Any) -> str:
    """The one error message a query gets (its data being null where it failed)."""
    body = await post(client, headers, query, **variables)
    [e] = body["errors"]
    return e["message"]


def names(items: list[dict[str, Any]], key: str = "name") -> list[Any]:
    return [i[key] for i in items]


def nodes(connection: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["node"] for e in connection["edges"]]


# Units and people ---------------------------------------------------------------------------

async def test_units_know_their_ancestors_descendants_and_people(
        gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    data = await graphql(gateway, auth("member"), """query($platform: ID!, $sales: ID!) {
        organization { name descendants { name } firstLevel: descendants(depth: 1) { name }
                       none: descendants(depth: 0) { name } ancestors { name } }
        platform: unit(id: $platform) { parentId ancestors { name kind } descendants { name }
                  people { name email leftOn joinedOn unit { name } manager { name manager { name } } } }
        sales: unit(id: $sales) { people { name } everyone: people(includeLeft: true) { name leftOn } } }""",
                         wait=world.wait, platform=world.id("Platform"), sales=world.id("Sales"))
    org = data["organization"]
    assert org["name"] == "Acme" and org["ancestors"] == [] and org["none"] == []
    assert names(org["descendants"]) == ["Engineering", "Sales", "Pager", "Platform"]  # level by level
    assert names(org["firstLevel"]) == ["Engineering", "Sales"]
    platform = data["platform"]
    assert platform["parentId"] == world.id("Engineering")
    assert platform["ancestors"] == [{"name": "Acme", "kind": "company"}, {"name": "Engineering", "kind": "department"}]
    assert platform["descendants"] == []
    assert platform["people"] == [
        {"name": name, "email": f"{name.lower()}@acme.test", "leftOn": None, "joinedOn": TODAY.isoformat(),
         "unit": {"name": "Platform"}, "manager": {"name": "Bob", "manager": {"name": "Ada"}}}
        for name in ("Cy", "Eve")]
    assert data["sales"]["people"] == []  # Dee has left
    assert data["sales"]["everyone"] == [{"name": "Dee", "leftOn": TODAY.isoformat()}]


async def test_a_person_with_their_objectives(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    query = """query($id: ID!, $cycle: ID) { person(id: $id) {
        id name unit { name } manager { name } leftOn
        objectives(cycle: $cycle) { title unitId } } }"""
    cy = (await graphql(gateway, auth(), query, wait=world.wait, id=world.id("Cy")))["person"]
    assert (cy["id"], cy["name"], cy["unit"], cy["manager"]) == (world.id("Cy"), "Cy", {"name": "Platform"},
                                                                  {"name": "Bob"})
    assert names(cy["objectives"], "title") == ["C", "Maintain NPS above 50", "P"]
    now = (await graphql(gateway, auth(), query, id=world.id("Cy"), cycle=world.id("Now")))["person"]
    assert names(now["objectives"], "title") == ["C", "Maintain NPS above 50"]
    dee = (await graphql(gateway, auth(), query, id=world.id("Dee")))["person"]
    assert (dee["leftOn"], names(dee["objectives"], "title")) == (TODAY.isoformat(), ["S"])
    assert (await graphql(gateway, auth(), query, id=str(uuid.uuid4())))["person"] is None


# Objective connections ----------------------------------------------------------------------

PAGE = """query($unit: ID!, $first: Int!, $after: String, $cycle: ID, $status: String) { unit(id: $unit) {
    objectives(first: $first, after: $after, cycle: $cycle, status: $status) {
        totalCount pageInfo { hasNextPage endCursor } edges { cursor node { title status } } } } }"""


async def test_objectives_come_a_page_at_a_time(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    async def page(first: int, after: str | None = None, **filters: Any) -> dict[str, Any]:
        data = await graphql(gateway, auth(), PAGE, wait=world.wait, unit=world.id("Pager"), first=first,
                             after=after, **filters)
        return data["unit"]["objectives"]

    everything = await page(100)
    assert names(nodes(everything), "title") == ["P1", "P2", "P3", "P4", "P5", "P6"]  # in the order created
    assert everything["totalCount"] == 6 and everything["pageInfo"]["hasNextPage"] is False

    seen, after, pages = [], None, 0
    while True:
        p = await page(2, after, cycle=world.id("Now"))
        pages += 1
        assert p["totalCount"] == 5  # all pages, whichever this one is
        assert p["pageInfo"]["endCursor"] == p["edges"][-1]["cursor"]
        seen += names(nodes(p), "title")
        if not p["pageInfo"]["hasNextPage"]:
            break
        after = p["pageInfo"]["endCursor"]
    assert (seen, pages) == (["P1", "P2", "P3", "P4", "P5"], 3)  # 2 + 2 + 1

    past_the_end = await page(2, after=p["pageInfo"]["endCursor"], cycle=world.id("Now"))
    assert past_the_end == {"totalCount": 5, "edges": [], "pageInfo": {"hasNextPage": False, "endCursor": None}}
    drafts = await page(1, status="draft")
    assert (names(nodes(drafts), "title"), drafts["totalCount"], drafts["pageInfo"]["hasNextPage"]) == (
        ["P2"], 2, True)
    second_draft = await page(1, after=drafts["pageInfo"]["endCursor"], status="draft")
    assert nodes(second_draft) == [{"title": "P4", "status": "draft"}]
    assert names(nodes(await page(5, cycle=world.id("Past"))), "title") == ["P6"]


async def test_bad_page_arguments_are_refused_with_a_reason(
        gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    async def refused(**variables: Any) -> str:
        return await error(gateway, auth(), PAGE, unit=world.id("Pager"), **variables)

    first_page = await graphql(gateway, auth(), PAGE, wait=world.wait, unit=world.id("Pager"), first=1)
    cursor = first_page["unit"]["objectives"]["pageInfo"]["endCursor"]
    assert await refused(first=0) == "first must be from 1 to 100"
    assert await refused(first=101) == "first must be from 1 to 100"
    assert await refused(first=-5) == "first must be from 1 to 100"
    naive = encode_cursor("objective", "2026-01-01T00:00:00", uuid.uuid4())  # well-formed, but no time zone
    for bad in ("nope", cursor[:-2], "", "eyJhIjogMX0", cursor + "x", naive,
                encode_cursor("objective", "yesterday", uuid.uuid4())):
        assert await refused(first=2, after=bad) == "after is not a cursor this API gave out", bad
    assert await refused(first=2, status="done") == "status must be one of draft, active, closed, archived"
    assert await refused(first=2, cycle="Q1") == "cycle is not an id this API gave out"
    check_ins = await graphql(gateway, auth(), """query($kr: ID!) { keyResult(id: $kr) {
        checkIns(first: 1) { pageInfo { endCursor } } } }""", kr=world.id("c1"))
    other_kind = check_ins["keyResult"]["checkIns"]["pageInfo"]["endCursor"]
    assert await refused(first=2, after=other_kind) == "after is not a cursor this API gave out"


# Objectives ----------------------------------------------------------------------------------

OBJECTIVE = """query($id: ID!) { objective(id: $id) {
    title status score rolledUpScore band ownerKind
    parent { title rolledUpScore parent { title parent { title } } }
    children { title }
    contributesTo { objective { title } weight }
    guardrails { kpiId kpi { name state } breached }
    warnings { code subjectKind subjectId }
    cycle { name kind status startsOn endsOn }
    unit { name }
    owner { name }
    keyResults { title kpi { name } } } }"""


async def test_an_objective_with_its_surroundings(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    c = (await graphql(gateway, auth(), OBJECTIVE, wait=world.wait, id=world.id("C")))["objective"]
    assert (c["title"], c["status"], c["score"], c["rolledUpScore"], c["band"]) == (
        "C", "active", pytest.approx(0.3), pytest.approx(0.3), "red")  # c1 at 30 of 100; c2 never checked in
    # Loaded from C alone, the parents' roll-ups are still whole: B = (b1 0.8 + b2 1.0 + C 0.3 + S 0.75 * 0.5) / 3.5
    assert c["parent"] == {"title": "B", "rolledUpScore": pytest.approx(2.475 / 3.5),
                           "parent": {"title": "A", "parent": None}}
    assert c["children"] == [] and c["contributesTo"] == []
    assert c["guardrails"] == [{"kpiId": world.id("Latency"), "kpi": {"name": "Latency", "state": "ok"},
                                "breached": False}]
    assert [(w["code"], w["subjectKind"]) for w in c["warnings"]] == [
        ("too_few_key_results", "objective"), ("key_result_is_a_task", "key_result"),
        ("done_only_key_result", "key_result")]
    assert {w["subjectId"] for w in c["warnings"]} == {world.id("C"), world.id("c2")}
    assert c["cycle"] == {"name": "Now", "kind": "quarter", "status": "active",
                          "startsOn": (TODAY - timedelta(days=30)).isoformat(),
                          "endsOn": (TODAY + timedelta(days=60)).isoformat()}
    assert (c["unit"], c["owner"], c["ownerKind"]) == ({"name": "Platform"}, {"name": "Cy"}, "person")
    assert c["keyResults"] == [{"title": "Increase adoption", "kpi": None}, {"title": "Launch new website", "kpi": None}]

    o = (await graphql(gateway, auth(), OBJECTIVE, id=world.id("Maintain NPS above 50")))["objective"]
    assert (o["score"], o["rolledUpScore"], o["band"], o["parent"]) == (None, None, None, None)
    assert o["guardrails"] == [{"kpiId": world.id("Uptime"), "kpi": {"name": "Uptime", "state": "breached"},
                                "breached": True}]
    assert [w["code"] for w in o["warnings"]] == ["objective_is_a_kpi", "too_few_key_results", "guardrail_breached"]

    s = (await graphql(gateway, auth(), OBJECTIVE, id=world.id("S")))["objective"]
    assert s["contributesTo"] == [{"objective": {"title": "B"}, "weight": 0.5}]
    assert [w["code"] for w in s["warnings"]] == ["objective_without_owner", "too_few_key_results"]  # Dee left
    assert s["score"] == pytest.approx(0.75)  # s1 1.0 and s2 at 85 of 80 -> 90 = 0.5
    assert s["keyResults"] == [{"title": "s1", "kpi": None}, {"title": "s2", "kpi": {"name": "CSAT"}}]

    a = (await graphql(gateway, auth(), OBJECTIVE, id=world.id("A")))["objective"]
    assert names(a["children"], "title") == ["B", "S"]
    assert (a["owner"], a["ownerKind"]) == (None, "unit")
    assert (await graphql(gateway, auth(), OBJECTIVE, id=str(uuid.uuid4())))["objective"] is None
    assert await error(gateway, auth(), OBJECTIVE, id="42") == "id is not an id this API gave out"


async def test_cycles(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    data = await graphql(gateway, auth(), "{ cycles { id name kind status parentId } }", wait=world.wait)
    assert [(c["name"], c["kind"], c["status"]) for c in data["cycles"]] == [
        ("Past", "quarter", "planning"), ("Wide", "year", "active"), ("Now", "quarter", "active")]  # by start
    assert data["cycles"][0]["id"] == world.id("Past")


# Key results -----------------------------------------------------------------------------------

CHECK_INS = """query($id: ID!, $first: Int!, $after: String) { keyResult(id: $id) {
    title current validOn confidence score objective { title } kpi { name latestValue }
    checkIns(first: $first, after: $after) {
        totalCount pageInfo { hasNextPage endCursor }
        edges { cursor node { version value confidence validOn actor measurementId correctsVersion correctedBy
                              corrects { version value confidence validOn } } } } } }"""


async def test_check_ins_newest_first_with_what_corrections_correct(
        gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    first, second, correction = (world.versions[f"c1 {n}"] for n in ("first", "second", "correction"))
    kr = (await graphql(gateway, auth(), CHECK_INS, wait=world.wait, id=world.id("c1"), first=2))["keyResult"]
    yesterday = (TODAY - timedelta(days=1)).isoformat()
    assert (kr["title"], kr["current"], kr["validOn"], kr["confidence"], kr["score"], kr["objective"], kr["kpi"]) == (
        "Increase adoption", 30, yesterday, 7, pytest.approx(0.3), {"title": "C"}, None)
    page = kr["checkIns"]
    assert (page["totalCount"], page["pageInfo"]["hasNextPage"]) == (3, True)
    assert nodes(page) == [
        {"version": correction, "value": 30, "confidence": 7, "validOn": yesterday, "actor": "tester",
         "measurementId": None, "correctsVersion": second, "correctedBy": None,
         "corrects": {"version": second, "value": 40, "confidence": 7, "validOn": yesterday}},
        {"version": second, "value": 40, "confidence": 7, "validOn": yesterday, "actor": "tester",
         "measurementId": None, "correctsVersion": None, "correctedBy": correction, "corrects": None}]
    rest = (await graphql(gateway, auth(), CHECK_INS, id=world.id("c1"), first=2,
                          after=page["pageInfo"]["endCursor"]))["keyResult"]["checkIns"]
    assert [(n["version"], n["value"], n["correctedBy"]) for n in nodes(rest)] == [(first, 20, None)]
    assert (rest["totalCount"], rest["pageInfo"]["hasNextPage"]) == (3, False)

    never = (await graphql(gateway, auth(), CHECK_INS, id=world.id("c2"), first=5))["keyResult"]
    assert (never["current"], never["score"], never["checkIns"]) == (None, None, {
        "totalCount": 0, "pageInfo": {"hasNextPage": False, "endCursor": None}, "edges": []})

    driven = (await graphql(gateway, auth(), CHECK_INS, id=world.id("s2"), first=5))["keyResult"]
    assert driven["kpi"] == {"name": "CSAT", "latestValue": 85}
    [from_kpi] = nodes(driven["checkIns"])
    assert (from_kpi["value"], from_kpi["measurementId"], from_kpi["confidence"]) == (
        85, world.id("csat measurement"), None)

    assert await error(gateway, auth(), CHECK_INS, id=world.id("s2"), first=2,
                       after=page["pageInfo"]["endCursor"]) == "after is not a cursor of this key result's check-ins"
    assert await error(gateway, auth(), CHECK_INS, id=world.id("c1"), first=0) == "first must be from 1 to 100"
    too_far = encode_cursor("check-in", world.id("c1"), 10**20)  # past any version (and bigint)
    assert await error(gateway, auth(), CHECK_INS, id=world.id("c1"), first=2,
                       after=too_far) == "after is not a cursor of this key result's check-ins"
    assert (await graphql(gateway, auth(), CHECK_INS, id=str(uuid.uuid4()), first=1))["keyResult"] is None


# KPIs --------------------------------------------------------------------------------------------

KPI = """query($id: ID!, $period: Period!) { kpi(id: $id) {
    name state latestValue unitId
    series(period: $period) { start count mean min max last }
    forecast { asOf horizonAt count slopePerDay intercept projectedValue predictedBreach { ruleId } }
    inMonth: forecast(days: 30) { asOf horizonAt slopePerDay projectedValue
        predictedBreach { ruleId kind severity threshold at on inDays } }
    inFiveDays: forecast(days: 5) { predictedBreach { ruleId } } } }"""


def days_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 86400


async def test_kpi_series_and_forecast(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    # Latency: 100, 110, 120 and 150 corrected to 130, a day apart from T0: the line is
    # 100 + 10 * (days since T0); it crosses the rule (above 200) at T0 + 10 days.
    kpi = (await graphql(gateway, auth(), KPI, wait=world.wait, id=world.id("Latency"), period="DAY"))["kpi"]
    assert (kpi["name"], kpi["state"], kpi["latestValue"], kpi["unitId"]) == (
        "Latency", "ok", 130, world.id("Platform"))
    assert kpi["series"] == [{"start": (T0 + timedelta(days=d)).date().isoformat(), "count": 1, "mean": v,
                              "min": v, "max": v, "last": v} for d, v in enumerate([100, 110, 120, 130])]

    month = kpi["inMonth"]
    as_of = datetime.fromisoformat(month["asOf"])
    assert datetime.fromisoformat(month["horizonAt"]) == as_of + timedelta(days=30)
    assert month["slopePerDay"] == pytest.approx(10)
    assert month["projectedValue"] == pytest.approx(100 + 10 * days_between(T0, as_of + timedelta(days=30)))
    breach = month["predictedBreach"]
    assert (breach["ruleId"], breach["kind"], breach["severity"], breach["threshold"]) == (
        "slow", "above", "warning", 200)
    crossing = T0 + timedelta(days=10)
    assert abs(datetime.fromisoformat(breach["at"]) - crossing) < timedelta(seconds=1)
    assert breach["on"] == crossing.date().isoformat()
    assert breach["inDays"] == pytest.approx(days_between(as_of, crossing))
    assert kpi["inFiveDays"]["predictedBreach"] is None  # the crossing is about six days away

    # No days, no cycle: to the end of the current cycle, the shortest active one around today ("Now")
    current = kpi["forecast"]
    end_of_now = datetime.combine(TODAY + timedelta(days=61), time(), tzinfo=UTC)
    assert (datetime.fromisoformat(current["horizonAt"]), current["count"]) == (end_of_now, 4)
    assert current["intercept"] == pytest.approx(100 + 10 * days_between(T0, datetime.fromisoformat(current["asOf"])))
    assert current["predictedBreach"] == {"ruleId": "slow"}

    weeks = (await graphql(gateway, auth(), KPI, id=world.id("Latency"), period="WEEK"))["kpi"]["series"]
    mondays = Counter((T0 + timedelta(days=d)).date() - timedelta(days=(T0 + timedelta(days=d)).weekday())
                      for d in range(4))
    assert [(w["start"], w["count"]) for w in weeks] == [(m.isoformat(), n) for m, n in sorted(mondays.items())]
    assert [w["last"] for w in weeks][-1] == 130 and sum(w["count"] for w in weeks) == 4
    month_series = (await graphql(gateway, auth(), KPI, id=world.id("Latency"), period="MONTH"))["kpi"]["series"]
    assert sum(m["count"] for m in month_series) == 4 and month_series[-1]["max"] == 130

    uptime = (await graphql(gateway, auth(), KPI, id=world.id("Uptime"), period="DAY"))["kpi"]
    assert (uptime["state"], uptime["forecast"]["count"], uptime["forecast"]["slopePerDay"]) == ("breached", 1, None)
    assert (await graphql(gateway, auth(), KPI, id=str(uuid.uuid4()), period="DAY"))["kpi"] is None


async def test_bad_forecast_arguments(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    query = """query($id: ID!, $days: Int, $cycle: ID) { kpi(id: $id) { forecast(days: $days, cycle: $cycle) {
        horizonAt } } }"""

    async def refused(**variables: Any) -> str:
        return await error(gateway, auth(), query, id=world.id("Latency"), **variables)

    ok = await graphql(gateway, auth(), query, wait=world.wait, id=world.id("Latency"), cycle=world.id("Wide"))
    assert ok["kpi"]["forecast"]["horizonAt"] == datetime.combine(
        TODAY + timedelta(days=166), time(), tzinfo=UTC).isoformat()
    assert await refused(days=0) == "days must be from 1 to 3650"
    assert await refused(days=3651) == "days must be from 1 to 3650"
    assert await refused(days=5, cycle=world.id("Now")) == "give days or cycle, not both"
    assert await refused(cycle=world.id("Past")) == "the cycle has ended: forecast to a cycle that has not"
    assert await refused(cycle=str(uuid.uuid4())) == "cycle is not a cycle this API knows"
    period = await post(gateway, auth(), """query($id: ID!) { kpi(id: $id) { series(period: YEAR) { count } } }""",
                        id=world.id("Latency"))
    assert "YEAR" in period["errors"][0]["message"]


# The alignment cascade and the health of a subtree ----------------------------------------------

CASCADE = """query($unit: ID, $cycle: ID, $depth: Int!) { alignment(unit: $unit, cycle: $cycle, depth: $depth) {
    ...N children { ...N children { ...N children { ...N } } } } }
fragment N on AlignmentNode { unit { name } depth score band objectives { title rolledUpScore } }"""


async def test_the_alignment_cascade_rolls_scores_up_the_units(
        gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    data = await graphql(gateway, auth(), CASCADE, wait=world.wait, cycle=world.id("Now"), depth=10)
    acme = data["alignment"]
    # C = 0.3; S = (1.0 + 0.5) / 2 = 0.75; B = (0.8 + 1.0 + C 0.3 + S 0.75 * 0.5) / 3.5 = 2.475 / 3.5;
    # A = (0.5 + B + S) / 3
    b = 2.475 / 3.5
    a = (0.5 + b + 0.75) / 3
    assert (acme["unit"], acme["depth"], acme["score"], acme["band"]) == ({"name": "Acme"}, 0, pytest.approx(a),
                                                                           "yellow")
    assert acme["objectives"] == [{"title": "A", "rolledUpScore": pytest.approx(a)}]
    engineering, sales = acme["children"]
    assert (engineering["unit"]["name"], engineering["depth"], engineering["score"], engineering["band"]) == (
        "Engineering", 1, pytest.approx(b), "green")
    [platform] = engineering["children"]
    # Platform's own objectives in Now: C (0.3) and "Maintain NPS above 50" (no score): the mean of what is there
    assert (platform["depth"], platform["score"], platform["band"]) == (2, pytest.approx(0.3), "red")
    assert names(platform["objectives"], "title") == ["C", "Maintain NPS above 50"]  # P is in Past
    assert platform["children"] == []
    assert (sales["score"], names(sales["children"], "unit")) == (pytest.approx(0.75), [{"name": "Pager"}])
    [pager] = sales["children"]
    assert (pager["score"], pager["band"], len(pager["objectives"])) == (None, None, 5)  # no key results

    shallow = (await graphql(gateway, auth(), CASCADE, cycle=world.id("Now"), depth=1))["alignment"]
    assert [c["children"] for c in shallow["children"]] == [[], []]
    assert (await graphql(gateway, auth(), CASCADE, cycle=world.id("Now"), depth=0))["alignment"]["children"] == []

    from_engineering = (await graphql(gateway, auth(), CASCADE, unit=world.id("Engineering"), depth=10))["alignment"]
    assert (from_engineering["unit"]["name"], from_engineering["depth"]) == ("Engineering", 0)
    # every cycle: Platform has P (Past, no score) too, which changes nothing
    assert names(from_engineering["children"][0]["objectives"], "title") == ["C", "Maintain NPS above 50", "P"]
    assert from_engineering["children"][0]["score"] == pytest.approx(0.3)
    past = (await graphql(gateway, auth(), CASCADE, cycle=world.id("Past"), depth=10))["alignment"]
    assert (past["score"], past["objectives"]) == (None, [])

    assert (await graphql(gateway, auth(), CASCADE, unit=str(uuid.uuid4()), depth=3))["alignment"] is None
    assert await error(gateway, auth(), CASCADE, depth=-1) == "depth must be from 0 to 100"
    assert await error(gateway, auth(), CASCADE, depth=101) == "depth must be from 0 to 100"
    assert await error(gateway, auth(), CASCADE, unit="acme", depth=1) == "unit is not an id this API gave out"


def test_an_archived_objective_counts_in_no_other_roll_up() -> None:
    """As the goals service rolls up (no REST route archives an objective yet, so the rows are
    given here): an archived objective keeps its own scores and counts in no other's."""
    a, archived_child, contributor, archived_contributor = (uuid.uuid4() for _ in range(4))

    def objective(oid: uuid.UUID, parent: uuid.UUID | None = None, status: str = "active",
                  contributes: list[tuple[uuid.UUID, float]] | None = None) -> dict[str, Any]:
        return {"id": oid, "parent_id": parent, "status": status, "unit_id": uuid.uuid4(), "owner_kind": "unit",
                "owner_id": uuid.uuid4(), "contributes": contributes or [], "guardrail_kpis": []}

    def key_result(objective_id: uuid.UUID, current: float) -> dict[str, Any]:
        return {"id": uuid.uuid4(), "objective_id": objective_id, "kind": "increase_to", "start": 0, "target": 1,
                "low": None, "high": None, "milestone_weights": [], "current": current, "weight": 1.0}

    alignment = Alignment(pool=None)  # type: ignore[arg-type] - nothing is loaded from a database here
    alignment._merge(Loaded(units=[], people=[], kpis=[], objectives=[
        objective(a), objective(archived_child, a, "archived"), objective(contributor, contributes=[(a, 2.0)]),
        objective(archived_contributor, status="archived", contributes=[(a, 1.0)])], key_results=[
        key_result(a, 0.5), key_result(archived_child, 1.0), key_result(contributor, 0.2),
        key_result(archived_contributor, 1.0)]))
    assert alignment.rolled_up[a] == pytest.approx((0.5 + 0.2 * 2) / 3)  # 0.3: neither archived one counts
    assert (alignment.scores[archived_child], alignment.rolled_up[archived_child]) == (1.0, 1.0)
    assert alignment.aligned[a] == [archived_child]  # still shown as aligned


HEALTH = """query($unit: ID!, $cycle: ID) { health(unit: $unit, cycle: $cycle) {
    unit { name } cycleId objectiveCount keyResultCount checkedInRecently medianDaysSinceCheckIn neverCheckedIn
    alignedShare orphanObjectives { title } keyResultsWithoutConfidence breachedGuardrails coachingWarnings } }"""


async def test_the_health_of_a_subtree(gateway: httpx.AsyncClient, world: World, auth: Headers) -> None:
    health = (await graphql(gateway, auth(), HEALTH, wait=world.wait, unit=world.id("Engineering"),
                            cycle=world.id("Now")))["health"]
    # Engineering and Platform in Now: B, C and "Maintain NPS above 50"; key results b1 (10 days
    # since, no confidence), b2 (3 days), c1 (1 day: the latest day, as corrected), c2 (never).
    assert health == {
        "unit": {"name": "Engineering"}, "cycleId": world.id("Now"), "objectiveCount": 3, "keyResultCount": 4,
        "checkedInRecently": pytest.approx(2 / 4),  # b2 and c1 within 7 days
        "medianDaysSinceCheckIn": 3,  # of 1, 3 and 10
        "neverCheckedIn": 1,  # c2
        "alignedShare": pytest.approx(2 / 3),  # B and C have a parent
        "orphanObjectives": [{"title": "Maintain NPS above 50"}],
        "keyResultsWithoutConfidence": 1,  # b1
        "breachedGuardrails": 1,  # Uptime on "Maintain NPS above 50"
        # B: too few KRs (1); C: too few, c2 a task and done-only (3); NPS: a KPI, too few, guardrail (3)
        "coachingWarnings": 7,
    }
    acme = (await graphql(gateway, auth(), HEALTH, unit=world.id("Acme"), cycle=world.id("Now")))["health"]
    # A in the company has no parent and is no orphan; Pager's five are, and NPS
    assert names(acme["orphanObjectives"], "title") == ["Maintain NPS above 50", "P1", "P2", "P3", "P4", "P5"]
    assert (acme["objectiveCount"], acme["keyResultCount"], acme["alignedShare"]) == (10, 7, pytest.approx(3 / 10))
    every_cycle = (await graphql(gateway, auth(), HEALTH, unit=world.id("Platform")))["health"]
    assert (every_cycle["cycleId"], every_cycle["objectiveCount"], every_cycle["alignedShare"]) == (
        None, 3, pytest.approx(1 / 3))  # C, NPS and P
    empty = (await graphql(gateway, auth(), HEALTH, unit=world.id("Pager"), cycle=world.id("Wide")))["health"]
    assert (empty["objectiveCount"], empty["checkedInRecently"], empty["medianDaysSinceCheckIn"],
            empty["alignedShare"]) == (0, None, None, None)
    assert (await graphql(gateway, auth(), HEALTH, unit=str(uuid.uuid4())))["health"] is None
    assert await error(gateway, auth(), HEALTH, unit="x") == "unit is not an id this API gave out"


# Round trips ------------------------------------------------------------------------------------

SUBTREE = """query($unit: ID!, $cycle: ID) {
  alignment(unit: $unit, cycle: $cycle) { ...N children { ...N } }
  health(unit: $unit, cycle: $cycle) { objectiveCount coachingWarnings orphanObjectives { title } } }
fragment N on AlignmentNode {
  score
  unit { name ancestors { name } people { name manager { name } objectives { title } }
         kpis { name state series(period: DAY) { count } forecast(days: 10) { slopePerDay } }
         objectives(first: 3) { totalCount edges { node { title } } } }
  objectives { title rolledUpScore parent { title } contributesTo { weight } guardrails { breached kpi { name } }
               warnings { code } cycle { name } owner { name }
               keyResults { score kpi { name } checkIns(first: 2) { totalCount edges { node { value } } } } } }"""


DRIVER_STATEMENTS = {introspection.INTRO_LOOKUP_TYPES, introspection.INTRO_LOOKUP_TYPES_13}


def from_the_driver(query: str) -> bool:
    """asyncpg's own: looking up a type (uuid[], record[], ...) the first time a connection
    meets it, with jit off around it. Once per type and connection, whatever the query."""
    return query in DRIVER_STATEMENTS or "set_config('jit'" in query


@asynccontextmanager
async def statements_sent(pool: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """Every statement the pool's connections send meanwhile, but the pool's reset of a
    connection it takes back and the driver's type lookups. Holding every connection at once
    reaches them all."""
    sent: list[str] = []
    held = [await pool.acquire() for _ in range(POOL_SIZE)]
    resets = {c.get_reset_query() for c in held}

    def log(query: Any) -> None:
        if query.query not in resets and not from_the_driver(query.query):
            sent.append(query.query)

    for c in held:
        c.add_query_logger(log)
        await pool.release(c)
    try:
        yield sent
    finally:
        held = [await pool.acquire() for _ in range(POOL_SIZE)]
        for c in held:
            c.remove_query_logger(log)
            await pool.release(c)


async def add_team(w: World, n: int) -> None:
    """A team of Scaleco with a lead, an objective aligned to the company's, three key results
    (two checked in), a guardrail KPI with two measurements, and a contribution."""
    team, lead = f"Team {n}", f"Lead {n}"
    await w.unit(team, "team", "Scaleco")
    await w.person(lead, team, "Boss")
    await w.objective(f"Objective {n}", team, owner=lead, parent="Scale")
    for k in range(3):
        await w.key_result(f"kr {n}.{k}", f"Objective {n}", kind="increase_to", start=0, target=10)
    await w.check_in(f"kr {n}.0", 5, confidence=5)
    await w.check_in(f"kr {n}.1", 7, days_ago=2)
    await w.kpi(f"KPI {n}", team, [{"kind": "below", "threshold": 1, "severity": "warning"}])
    await w.measure(f"KPI {n}", 2, NOW - timedelta(days=2))
    await w.measure(f"KPI {n}", 3, NOW - timedelta(days=1))
    await w.write("goals", "PUT", f"/v1/objectives/{w.id(f'Objective {n}')}/guardrails/{w.id(f'KPI {n}')}")
    await w.write("goals", "PUT", f"/v1/key-results/{w.id(f'kr {n}.2')}/kpi", {"kpiId": w.id(f"KPI {n}")})
    if n > 0:
        await w.write("goals", "PUT", f"/v1/objectives/{w.id(f'Objective {n}')}/contributions/"
                                      f"{w.id('Objective 0')}", {"weight": 0.5})


async def test_a_subtree_costs_the_same_statements_however_big(
        gateway: httpx.AsyncClient, gateway_app: FastAPI, world: World, auth: Headers) -> None:
    """The whole subtree, its objectives, key results, KPIs, people and check-ins come back in
    as many SQL statements for twelve teams as for three: the count follows the query's depth,
    never the number of nodes."""
    w = World(world.clients["goals"], world.clients["metrics"], world.headers)
    w.ids["Now"] = world.ids["Now"]
    await w.unit("Scaleco", "company")
    await w.person("Boss", "Scaleco")
    await w.objective("Scale", "Scaleco", owner="Boss")
    for n in range(3):
        await add_team(w, n)

    async def count() -> tuple[int, dict[str, Any]]:
        await graphql(gateway, auth(), "{ cycles { id } }", wait=w.wait)  # caught up; the counted read waits for nothing
        async with statements_sent(gateway_app.state.pool) as sent:
            data = await graphql(gateway, auth(), SUBTREE, unit=w.id("Scaleco"), cycle=w.id("Now"))
        return len(sent), data

    small, small_data = await count()
    for n in range(3, 12):
        await add_team(w, n)
    large, large_data = await count()

    assert len(small_data["alignment"]["children"]) == 3 and len(large_data["alignment"]["children"]) == 12
    team = large_data["alignment"]["children"][11]  # names sort: Team 0, 1, 10, 11, 2, ... 9
    assert team["unit"]["people"] == [{"name": "Lead 9", "manager": {"name": "Boss"}, "objectives": [
        {"title": "Objective 9"}]}]
    [objective] = team["objectives"]
    assert [kr["checkIns"]["totalCount"] for kr in objective["keyResults"]] == [1, 1, 0]
    assert objective["guardrails"] == [{"breached": False, "kpi": {"name": "KPI 9"}}]
    assert team["unit"]["kpis"][0]["series"] == [{"count": 1}, {"count": 1}]
    assert large_data["health"]["objectiveCount"] == 13
    # The subtree (units, objectives, key results, KPIs, people: 5); per level of nodes, their
    # units' ancestors and their people's objectives (1 + 4 each); cycles, measurements and
    # check-in pages once each: 18, for 3 teams as for 12.
    assert small == large
    assert small <= 20


# Rebuilding ------------------------------------------------------------------------------------

TABLES = [m.group(1) for ddl in AlignmentReadModel.tables
          if (m := re.match(r"CREATE TABLE IF NOT EXISTS \{schema\}\.(\w+)", ddl))]


def tables(url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT * FROM {schema}.{t} AS r ORDER BY r::text").fetchall() for t in TABLES}


async def test_the_read_model_rebuilt_from_the_logs_is_the_same(
        gateway: httpx.AsyncClient, world: World, auth: Headers, own_database: str) -> None:
    """Replayed into a schema of its own from both logs, the alignment read model has the same
    rows as the one the gateway kept up to date."""
    await graphql(gateway, auth(), "{ cycles { id } }", wait=world.wait)
    heads = {}
    with psycopg.connect(own_database) as conn:
        for log in ("goals", "metrics"):
            heads[log] = conn.execute(f"SELECT max(notification_id) FROM {log}.{log}_events").fetchone()[0]
    await graphql(gateway, auth(), "{ cycles { id } }", wait=f"goals={heads['goals']}, metrics={heads['metrics']}")

    ensure_schema(own_database, "gateway_rebuilt")
    specs = alignment_projections("gateway_rebuilt")
    for spec in specs:
        spec.create_tables(own_database)
    threads = [ProjectionThread(spec, own_database) for spec in specs]
    for t in threads:
        t.start()
    pool = await create_pool(own_database, "gateway_rebuilt", 2)
    try:
        for spec, log in zip(specs, ("goals", "metrics"), strict=True):
            assert await wait_for_position(pool, spec.tracking_table, spec.application_class.name, heads[log],
                                           timeout=60)
    finally:
        await pool.close()
        for t in threads:
            t.stop()
        for t in threads:
            await asyncio.to_thread(t.join, 10)
    kept, rebuilt = tables(own_database, "gateway"), tables(own_database, "gateway_rebuilt")
    assert {t: len(rows) for t, rows in kept.items()}["measurements"] > 5
    assert rebuilt == kept
