"""End to end: GraphQL subscriptions on the real gateway over graphql-transport-ws.

Writes go through the goals and metrics REST APIs; the gateway's projection announces each
change in the transaction that applies it, and a subscriber on the unit or any unit above it
hears of it. Each test builds an organisation of its own. A subscription is known to be live
when its snapshot (`snapshot: true`) has arrived, so no write can slip in before it listens;
every wait for a message is bounded by a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import count
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.stack import Stack
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.e2e

DEADLINE = 30.0
"""Seconds a message may take to arrive: a bound on a wait, not a pause."""

KPI_CHANGES = """subscription($unit: ID!) { kpiStateChanged(unit: $unit, snapshot: true) {
    kpiId name unitId previousState state stale latestValue latestMeasuredAt target cause at
    rules { id kind threshold recovery state } } }"""

CHECK_INS = """subscription($unit: ID!) { keyResultProgressed(unit: $unit, snapshot: true) {
    keyResultId objectiveId unitId version corrects value confidence note validOn current score band at } }"""


class Socket:
    """A graphql-transport-ws client on one websocket."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.ids = count(1)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        """The next message that is not a ping (answered with a pong)."""
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), DEADLINE))
            if message["type"] != "ping":
                return message
            await self.send({"type": "pong"})

    async def init(self, payload: dict[str, Any] | None) -> dict[str, Any]:
        await self.send({"type": "connection_init", **({} if payload is None else {"payload": payload})})
        return await self.receive()

    async def subscribe(self, query: str, operation_name: str | None = None, **variables: Any) -> str:
        op = str(next(self.ids))
        await self.send({"type": "subscribe", "id": op, "payload": {
            "query": query, "variables": variables, "operationName": operation_name}})
        return op

    async def next(self, op: str) -> dict[str, Any]:
        """The data of the operation's next result (any other message fails the test)."""
        message = await self.receive()
        assert message["type"] == "next" and message["id"] == op, message
        assert "errors" not in message["payload"], message
        [data] = message["payload"]["data"].values()
        return data

    async def close_code(self) -> int:
        """Wait for the server to close the socket; its close code."""
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(self.ws.recv(), DEADLINE)
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code


@dataclass
class Client:
    stack: Stack
    token: str
    goals: httpx.AsyncClient
    metrics: httpx.AsyncClient
    positions: dict[str, int] = field(default_factory=dict)
    sockets: list[ClientConnection] = field(default_factory=list)

    async def write(self, service: str, method: str, path: str, body: dict[str, Any], status: int = 201) -> str:
        client = self.goals if service == "goals" else self.metrics
        r = await client.request(method, path, json=body)
        assert r.status_code == status, r.text
        self.positions[service] = max(self.positions.get(service, 0), r.json()["position"])
        return r.json()["id"]

    async def unit(self, name: str, kind: str, parent: str | None = None) -> str:
        return await self.write("goals", "POST", "/v1/units", {"name": name, "kind": kind, "parentId": parent})

    async def kpi(self, name: str, unit: str) -> str:
        return await self.write("metrics", "POST", "/v1/kpis", {
            "name": name, "unit": "tickets", "unitId": unit, "direction": "lower_is_better", "cadence": "daily",
            "rules": [{"id": "backlog", "kind": "above", "threshold": 20, "severity": "critical", "recovery": 15}]})

    async def measure(self, kpi: str, value: float, hours_ago: float) -> None:
        at = datetime.now(UTC) - timedelta(hours=hours_ago)
        await self.write("metrics", "POST", f"/v1/kpis/{kpi}/measurements",
                         {"value": value, "measuredAt": at.isoformat()})

    async def key_result(self, unit: str, cycle: str) -> str:
        objective = await self.write("goals", "POST", "/v1/objectives", {
            "title": f"Objective of {unit}", "owner": {"kind": "unit", "id": unit}, "unitId": unit, "cycleId": cycle})
        return await self.write("goals", "POST", f"/v1/objectives/{objective}/key-results", {
            "title": "Raise the first-contact resolution rate from 0% to 100%", "kind": "increase_to", "start": 0,
            "target": 100, "unit": "%"})

    async def check_in(self, key_result: str, value: float) -> int:
        r = await self.goals.post(f"/v1/key-results/{key_result}/check-ins",
                                  json={"value": value, "confidence": 7, "note": f"at {value}"})
        assert r.status_code == 201, r.text
        self.positions["goals"] = r.json()["position"]
        return r.json()["version"]

    async def cycle(self) -> str:
        today = date.today()
        return await self.write("goals", "POST", "/v1/cycles", {
            "name": f"Cycle {uuid.uuid4().hex[:6]}", "kind": "quarter", "startsOn": (today - timedelta(days=30)).isoformat(),
            "endsOn": (today + timedelta(days=60)).isoformat(), "status": "active"})

    async def gateway_has_caught_up(self) -> None:
        """Hold until the gateway's read model reflects every write so far (Tandem-Wait-For)."""
        wait = ", ".join(f"{k}={v}" for k, v in self.positions.items())
        r = await self.goals.post(f"{self.stack.url('gateway')}/graphql", json={"query": "{ organization { id } }"},
                                  headers={"Tandem-Wait-For": wait})
        assert r.status_code == 200 and "errors" not in r.json(), r.text

    async def socket(self, payload: dict[str, Any] | None = None) -> Socket:
        url = self.stack.url("gateway").replace("http://", "ws://") + "/graphql"
        ws = await connect(url, subprotocols=["graphql-transport-ws"])  # type: ignore[list-item]
        self.sockets.append(ws)
        return Socket(ws)

    async def subscribed(self, query: str, unit: str, snapshot_size: int) -> tuple[Socket, str, list[dict[str, Any]]]:
        """A live subscription: authenticated, subscribed, its snapshot received."""
        socket = await self.socket()
        assert (await socket.init({"Authorization": f"Bearer {self.token}"}))["type"] == "connection_ack"
        op = await socket.subscribe(query, unit=unit)
        snapshot = [await socket.next(op) for _ in range(snapshot_size)]
        return socket, op, snapshot


@pytest.fixture
async def client(stack: Stack, token: Callable[..., str]) -> AsyncIterator[Client]:
    bearer = token("admin", "e2e-subscriber")
    headers = {"Authorization": f"Bearer {bearer}"}
    async with (httpx.AsyncClient(base_url=stack.url("goals"), headers=headers, timeout=30) as goals,
                httpx.AsyncClient(base_url=stack.url("metrics"), headers=headers, timeout=30) as metrics):
        c = Client(stack, bearer, goals, metrics)
        try:
            yield c
        finally:
            for ws in c.sockets:
                await ws.close()


async def test_a_breach_reaches_a_subscriber_on_an_ancestor_unit(client: Client) -> None:
    company = await client.unit("Breach Co", "company")
    support = await client.unit("Support", "department", company)
    team = await client.unit("Tier 1", "team", support)
    kpi = await client.kpi("Escalation backlog", team)
    await client.gateway_has_caught_up()

    socket, op, [start] = await client.subscribed(KPI_CHANGES, company, 1)
    assert start["kpiId"] == kpi and start["unitId"] == team and start["name"] == "Escalation backlog"
    assert (start["previousState"], start["state"], start["cause"]) == (None, "no_data", None)

    await client.measure(kpi, 12, hours_ago=3)
    ok = await socket.next(op)
    assert (ok["previousState"], ok["state"], ok["latestValue"], ok["cause"]) == ("no_data", "ok", 12, "KPIMeasured")

    # 25 > 20: the measurement and the breach it fires are two events; the read model may be
    # seen between them (pending) or only after both (breached). Either way the changes chain.
    await client.measure(kpi, 25, hours_ago=2)
    changes = [await socket.next(op)]
    while changes[-1]["state"] != "breached":
        changes.append(await socket.next(op))
    assert [c["previousState"] for c in changes] == ["ok", *(c["state"] for c in changes[:-1])]
    assert [c["state"] for c in changes] in (["breached"], ["pending", "breached"])
    breach = changes[-1]
    assert breach["latestValue"] == 25 and breach["cause"] in ("KPIMeasured", "KPIThresholdBreached")
    assert breach["rules"] == [{"id": "backlog", "kind": "above", "threshold": 20, "recovery": 15,
                                "state": "breached"}]
    assert breach["stale"] is False and breach["target"] is None
    assert datetime.fromisoformat(breach["latestMeasuredAt"]) < datetime.fromisoformat(breach["at"])
    assert datetime.fromisoformat(breach["at"]) > datetime.fromisoformat(ok["at"])

    # 10 is past the recovery bound (15): it clears.
    await client.measure(kpi, 10, hours_ago=1)
    recovered = await socket.next(op)
    assert (recovered["previousState"], recovered["state"], recovered["latestValue"]) == ("breached", "ok", 10)
    assert [r["state"] for r in recovered["rules"]] == ["ok"]

    # A measurement that leaves the state as it was is not a change: the next message is the
    # one after it that is.
    await client.measure(kpi, 11, hours_ago=0.5)
    await client.measure(kpi, 30, hours_ago=0.25)
    again = await socket.next(op)
    assert again["previousState"] == "ok" and again["state"] in ("pending", "breached") and again["latestValue"] == 30


async def test_a_check_in_reaches_its_unit_and_those_above_only(client: Client) -> None:
    company = await client.unit("Check-in Co", "company")
    support = await client.unit("Support", "department", company)
    tier1 = await client.unit("Tier 1", "team", support)
    tier2 = await client.unit("Tier 2", "team", support)
    cycle = await client.cycle()
    kr1, kr2 = await client.key_result(tier1, cycle), await client.key_result(tier2, cycle)
    first1, first2 = await client.check_in(kr1, 10), await client.check_in(kr2, 20)
    await client.gateway_has_caught_up()

    sibling, sibling_op, [last2] = await client.subscribed(CHECK_INS, tier2, 1)
    team, team_op, [last1] = await client.subscribed(CHECK_INS, tier1, 1)
    top, top_op, snapshot = await client.subscribed(CHECK_INS, company, 2)
    assert (last1["keyResultId"], last1["version"], last1["value"]) == (kr1, first1, 10)
    assert (last2["keyResultId"], last2["version"], last2["value"]) == (kr2, first2, 20)
    assert sorted((s["keyResultId"], s["version"]) for s in snapshot) == sorted([(kr1, first1), (kr2, first2)])

    # Tier 1's check-in: its team and the company hear it; the sibling team does not.
    version = await client.check_in(kr1, 40)
    heard = await team.next(team_op)
    assert heard["keyResultId"] == kr1 and heard["unitId"] == tier1 and heard["version"] == version
    assert (heard["value"], heard["confidence"], heard["note"], heard["corrects"]) == (40, 7, "at 40", None)
    assert (heard["current"], heard["score"], heard["band"]) == (40, pytest.approx(0.4), "yellow")
    assert heard["validOn"] == date.today().isoformat()
    assert (await top.next(top_op))["version"] == version

    # Then a check-in in the sibling team: the first thing the sibling hears is that one, so
    # Tier 1's did not come to it before (one listener delivers in commit order).
    sibling_version = await client.check_in(kr2, 75)
    news = await sibling.next(sibling_op)
    assert (news["keyResultId"], news["version"], news["value"]) == (kr2, sibling_version, 75)
    assert (await top.next(top_op))["version"] == sibling_version

    # A correction is reported as one, and the score follows it.
    r = await client.goals.post(f"/v1/key-results/{kr1}/check-ins/{version}/corrections", json={"value": 70})
    assert r.status_code == 201, r.text
    corrected = await team.next(team_op)
    assert (corrected["corrects"], corrected["value"], corrected["current"]) == (version, 70, 70)
    assert corrected["score"] == pytest.approx(0.7) and corrected["band"] == "green"


async def test_a_unit_moved_into_the_subtree_counts_from_then_on(client: Client) -> None:
    company = await client.unit("Moving Co", "company")
    sales = await client.unit("Sales", "department", company)
    sales_kpi = await client.kpi("Open deals", sales)
    elsewhere = await client.unit("Elsewhere Co", "company")
    team = await client.unit("Inside sales", "team", elsewhere)
    team_kpi = await client.kpi("Unanswered leads", team)
    await client.gateway_has_caught_up()

    socket, op, [start] = await client.subscribed(KPI_CHANGES, sales, 1)
    assert start["kpiId"] == sales_kpi

    await client.write("goals", "PUT", f"/v1/units/{team}/parent", {"parentId": sales}, status=200)
    await client.gateway_has_caught_up()
    await client.measure(team_kpi, 30, hours_ago=1)
    moved_in = await socket.next(op)
    assert moved_in["kpiId"] == team_kpi and moved_in["unitId"] == team
    assert moved_in["previousState"] is None  # a KPI this subscription had not seen
    assert moved_in["state"] in ("pending", "breached")


async def test_a_connection_without_a_valid_token_is_refused(client: Client, token: Callable[..., str]) -> None:
    for payload in (None, {}, {"Authorization": "Bearer not-a-token"}, {"authToken": ""},
                    {"Authorization": token("admin", "x")}):  # no "Bearer"
        socket = await client.socket()
        await socket.send({"type": "connection_init", **({} if payload is None else {"payload": payload})})
        assert await socket.close_code() == 4403, payload

    # A valid signature on a token with no role is refused too.
    roleless = jwt.encode({"sub": "nobody", "roles": [], "iss": "tandem-dev", "aud": "tandem",
                           "exp": int(datetime.now(UTC).timestamp()) + 600}, TEST_SECRET, algorithm="HS256")
    socket = await client.socket()
    await socket.send({"type": "connection_init", "payload": {"authToken": roleless}})
    assert await socket.close_code() == 4403

    # Subscribing without connection_init is refused by the protocol itself.
    socket = await client.socket()
    await socket.subscribe(KPI_CHANGES, unit=str(uuid.uuid4()))
    assert await socket.close_code() == 4401

    # The other way to send the token is accepted.
    socket = await client.socket()
    assert (await socket.init({"authToken": token("auditor", "reader")}))["type"] == "connection_ack"


async def test_a_bad_or_unknown_unit_is_an_error(client: Client) -> None:
    socket = await client.socket()
    assert (await socket.init({"authToken": client.token}))["type"] == "connection_ack"
    for unit, message in (("not-an-id", "unit is not an id this API gave out"),
                          (str(uuid.uuid4()), "There is no unit with this id.")):
        for query in (KPI_CHANGES, CHECK_INS):
            op = await socket.subscribe(query, unit=unit)
            answer = await socket.receive()
            assert answer["id"] == op and answer["type"] == "next", answer
            assert [e["message"] for e in answer["payload"]["errors"]] == [message]
            assert await socket.receive() == {"id": op, "type": "complete"}


async def test_query_limits_apply_to_subscriptions(client: Client) -> None:
    socket = await client.socket()
    assert (await socket.init({"authToken": client.token}))["type"] == "connection_ack"
    aliases = " ".join(f"a{i}: kpiId" for i in range(40))
    op = await socket.subscribe(f"subscription($unit: ID!) {{ kpiStateChanged(unit: $unit) {{ {aliases} }} }}",
                                unit=str(uuid.uuid4()))
    answer = await socket.receive()
    assert answer["id"] == op and answer["type"] == "error", answer
    assert "aliases" in json.dumps(answer["payload"]).lower()


async def test_queries_and_mutations_are_refused_on_the_websocket(client: Client) -> None:
    """Its context lives as long as the socket, so a query there could read an earlier one's
    cache: queries and mutations go by POST."""
    socket = await client.socket()
    assert (await socket.init({"authToken": client.token}))["type"] == "connection_ack"
    for kind, document, name in (
            ("query", "{ organization { id } }", None),
            ("mutation", 'mutation M { x: __typename } subscription S { kpiStateChanged(unit: "x") { state } }', "M")):
        op = await socket.subscribe(document, name)
        answer = await socket.receive()
        assert answer == {"id": op, "type": "error", "payload": [
            {"message": f"Only subscriptions go over the websocket; send a {kind} by POST."}]}, answer
