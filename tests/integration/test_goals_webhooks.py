"""Webhook delivery seen from the subscriber's side: the goals service (with its delivery worker)
and metrics in process on a database of this module's own, and receivers that are small HTTP
servers on localhost started by the tests. Every wait is on what a receiver got (a queue with a
deadline) or on the worker finishing a round, never on a clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from typing import Any

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from services.goals.api import create_app as create_goals
from services.goals.feeds import FeedPosition
from services.goals.settings import GoalsSettings
from services.goals.webhooks import WebhookWorker, backoff, verify_signature
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import fresh_database, ok, refused, serve_in_process

Headers = Callable[..., dict[str, str]]
TODAY = date.today()
DEADLINE = 30.0  # seconds a receiver waits for a delivery before the test fails
FAST = {"run_webhook_worker": True, "webhook_poll_interval_seconds": 0.05, "webhook_retry_base_seconds": 0.05,
        "webhook_retry_max_seconds": 0.2, "webhook_pause_after_attempts": 5, "webhook_timeout_seconds": 5.0}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int
    arrived: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def id(self) -> str:
        return self.headers["tandem-delivery-id"]

    @property
    def attempt(self) -> int:
        return int(self.headers["tandem-delivery-attempt"])


@dataclass
class Receiver:
    """A subscriber: an HTTP/1.1 listener on localhost that answers each POST with the status
    `answer(n)` gives (n counts requests from 1) and queues what it got."""

    answer: Callable[[int], int] = lambda n: 200
    received: list[Delivery] = field(default_factory=list)
    queue: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks/tandem"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        except asyncio.IncompleteReadError:
            writer.close()
            return
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status = self.answer(len(self.received) + 1)
        delivery = Delivery(headers, body, status, time.monotonic())
        self.received.append(delivery)
        writer.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        self.queue.put_nowait(delivery)

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.queue.get(), DEADLINE)

    async def take(self, n: int) -> list[Delivery]:
        return [await self.next() for _ in range(n)]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@asynccontextmanager
async def receiving(answer: Callable[[int], int] = lambda n: 200) -> AsyncIterator[Receiver]:
    receiver = Receiver(answer)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@dataclass
class Goals:
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def worker(self) -> WebhookWorker:
        return self.app.state.webhook_worker


@asynccontextmanager
async def serve_goals(database_url: str, headers: dict[str, str], **settings: Any) -> AsyncIterator[Goals]:
    app = create_goals(GoalsSettings(DATABASE_URL=database_url, **{**FAST, **settings}))
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver",
                                     headers=headers) as client:
            yield Goals(client, app)


@pytest.fixture(scope="module")
async def goals(own_database: str, auth: Headers) -> AsyncIterator[Goals]:
    async with serve_goals(own_database, auth("admin", "ada")) as service:
        yield service


@pytest.fixture(scope="module")
async def metrics(own_database: str, auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    app = create_metrics(MetricsSettings(DATABASE_URL=own_database, run_staleness_watch=False))
    async for client in serve_in_process(app):
        client.headers.update(auth("admin", "ada"))
        yield client


async def rounds(service: Goals, n: int) -> None:
    """Until the worker has finished `n` more rounds: it has looked at every subscriber since."""
    await asyncio.wait_for(service.worker.rounds_pass(n), DEADLINE)


async def feed_end(client: httpx.AsyncClient) -> str:
    """The cursor after everything recorded so far."""
    after = ""
    while True:
        page = await ok(client, "GET", f"/v1/changes?limit=1000{'&after=' + after if after else ''}")
        after = page["nextCursor"]
        if not page["hasMore"]:
            return after


async def feed(client: httpx.AsyncClient, after: str, types: list[str]) -> list[dict[str, Any]]:
    """What /v1/changes has of these types after the cursor: what a subscriber must get."""
    page = await ok(client, "GET", f"/v1/changes?limit=1000&after={after}&types={','.join(types)}")
    assert not page["hasMore"]
    return page["items"]


async def key_result(client: httpx.AsyncClient, title: str = "Delight customers") -> dict[str, Any]:
    unit = await ok(client, "POST", "/v1/units", {"name": "Acme", "kind": "company"}, 201)
    cycle = await ok(client, "POST", "/v1/cycles", {
        "name": "Now", "startsOn": (TODAY - timedelta(days=30)).isoformat(),
        "endsOn": (TODAY + timedelta(days=60)).isoformat(), "status": "active"}, 201)
    objective = await ok(client, "POST", "/v1/objectives", {
        "title": title, "owner": {"kind": "unit", "id": unit["id"]}, "unitId": unit["id"], "cycleId": cycle["id"]}, 201)
    kr = await ok(client, "POST", f"/v1/objectives/{objective['id']}/key-results",
                  {"title": "Increase CSAT to 100", "kind": "increase_to", "start": 0, "target": 100}, 201)
    return {"objective": objective, "kr": kr}


async def check_ins(client: httpx.AsyncClient, kr_id: str, *values: float) -> None:
    for value in values:
        await ok(client, "POST", f"/v1/key-results/{kr_id}/check-ins", {"value": value}, 201)


async def register(client: httpx.AsyncClient, url: str, types: list[str], **extra: Any) -> dict[str, Any]:
    return await ok(client, "POST", "/v1/webhooks", {"url": url, "eventTypes": types, **extra}, 201)


async def webhook(client: httpx.AsyncClient, hook_id: str) -> dict[str, Any]:
    return await ok(client, "GET", f"/v1/webhooks/{hook_id}")


async def attempts(client: httpx.AsyncClient, hook_id: str) -> list[dict[str, Any]]:
    """The delivery log, oldest first."""
    return list(reversed((await ok(client, "GET", f"/v1/webhooks/{hook_id}/deliveries?limit=200"))["items"]))


# Delivery ------------------------------------------------------------------------------------------

async def test_each_item_is_delivered_once_in_order_signed_with_its_stable_id(
        goals: Goals, metrics: httpx.AsyncClient) -> None:
    types = ["KeyResultProgressed", "KPIThresholdBreached", "KPIRecovered", "ObjectiveClosed"]
    async with receiving() as receiver:
        start = await feed_end(goals.client)
        hook = await register(goals.client, receiver.url, types, after=start, description="HR suite")
        assert hook["secret"].startswith("whsec_")

        seeded = await key_result(goals.client)
        kpi = await ok(metrics, "POST", "/v1/kpis", {
            "name": "CSAT", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
            "rules": [{"id": "floor", "kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}]}, 201)
        at = datetime.now(UTC) - timedelta(hours=3)
        await check_ins(goals.client, seeded["kr"]["id"], 10, 20)
        for hours, value in ((0, 80), (1, 95)):
            await ok(metrics, "POST", f"/v1/kpis/{kpi['id']}/measurements",
                     {"value": value, "measuredAt": (at + timedelta(hours=hours)).isoformat(), "source": "t"}, 201)
        await check_ins(goals.client, seeded["kr"]["id"], 30)
        await ok(goals.client, "POST", f"/v1/objectives/{seeded['objective']['id']}/close")

        expected = await feed(goals.client, start, types)
        assert {e["type"] for e in expected} == set(types) and len(expected) == 6
        got = await receiver.take(len(expected))
        await rounds(goals, 2)
        assert receiver.queue.empty(), "nothing more, nothing twice"

        assert [d.id for d in got] == [e["id"] for e in expected]
        for delivery, item in zip(got, expected, strict=True):
            assert delivery.json == {"deliveryId": item["id"], "subscriptionId": hook["id"], "event": item}
            assert verify_signature(hook["secret"], delivery.headers["tandem-signature"], delivery.body)
            assert not verify_signature(hook["secret"], delivery.headers["tandem-signature"], delivery.body + b" ")
            assert (delivery.attempt, delivery.headers["tandem-event-type"], delivery.headers["content-type"]) == (
                1, item["type"], "application/json")

        log = await attempts(goals.client, hook["id"])
        assert [(a["deliveryId"], a["attempt"], a["statusCode"], a["succeeded"]) for a in log] == [
            (e["id"], 1, 200, True) for e in expected]
        shown = await webhook(goals.client, hook["id"])
        assert (shown["status"], shown["delivery"]["failures"], shown["description"]) == ("active", 0, "HR suite")
        await ok(goals.client, "DELETE", f"/v1/webhooks/{hook['id']}")


async def test_a_failing_subscriber_is_retried_with_backoff_and_then_gets_everything_in_order(goals: Goals) -> None:
    async with receiving(lambda n: 500 if n <= 3 else 200) as receiver:
        seeded = await key_result(goals.client)
        start = await feed_end(goals.client)
        hook = await register(goals.client, receiver.url, ["KeyResultProgressed"])  # from now on
        await check_ins(goals.client, seeded["kr"]["id"], 10, 20, 30)
        first, second, third = [e["id"] for e in await feed(goals.client, start, ["KeyResultProgressed"])]

        got = await receiver.take(6)
        assert [(d.id, d.attempt, d.status) for d in got] == [
            (first, 1, 500), (first, 2, 500), (first, 3, 500), (first, 4, 200), (second, 1, 200), (third, 1, 200)]
        # Each retry waited at least its backoff after the failure before it.
        gaps = [b.arrived - a.arrived for a, b in zip(got[:3], got[1:4], strict=True)]
        assert all(gap >= backoff(n, 0.05, 0.2) for n, gap in enumerate(gaps, start=1)), gaps

        await rounds(goals, 2)
        log = await attempts(goals.client, hook["id"])
        assert [(a["deliveryId"], a["statusCode"], a["succeeded"]) for a in log] == [
            (d.id, d.status, d.status == 200) for d in got]
        assert all(a["error"] == "answered HTTP 500" for a in log[:3])
        shown = await webhook(goals.client, hook["id"])
        assert (shown["status"], shown["delivery"]["failures"], shown["delivery"]["lastError"]) == ("active", 0, None)
        await ok(goals.client, "DELETE", f"/v1/webhooks/{hook['id']}")


async def test_a_subscriber_failing_too_many_times_is_paused_until_resumed(goals: Goals) -> None:
    healthy = False
    async with receiving(lambda n: 200 if healthy else 500) as receiver:
        seeded = await key_result(goals.client)
        start = await feed_end(goals.client)
        hook = await register(goals.client, receiver.url, ["KeyResultProgressed"])
        await check_ins(goals.client, seeded["kr"]["id"], 10, 20)
        first, second = [e["id"] for e in await feed(goals.client, start, ["KeyResultProgressed"])]

        got = await receiver.take(5)  # webhook_pause_after_attempts
        assert [(d.id, d.attempt) for d in got] == [(first, n) for n in range(1, 6)]
        await rounds(goals, 2)
        paused = await webhook(goals.client, hook["id"])
        assert (paused["status"], paused["delivery"]["failures"]) == ("paused", 5)
        assert "500" in paused["pausedReason"]

        # Paused: new events are not delivered.
        await check_ins(goals.client, seeded["kr"]["id"], 30)
        await rounds(goals, 2)
        assert receiver.queue.empty()

        healthy = True
        resumed = await ok(goals.client, "POST", f"/v1/webhooks/{hook['id']}/resume",
                           **{"If-Match": f'"{paused["version"]}"'})
        assert resumed["version"] == paused["version"] + 1
        await refused(goals.client, "POST", f"/v1/webhooks/{hook['id']}/resume", None, 422)
        after = await receiver.take(3)  # from where it stopped, in order
        third = (await feed(goals.client, start, ["KeyResultProgressed"]))[2]["id"]
        assert [(d.id, d.attempt, d.status) for d in after] == [(first, 6, 200), (second, 1, 200), (third, 1, 200)]
        await rounds(goals, 2)
        shown = await webhook(goals.client, hook["id"])
        assert (shown["status"], shown["pausedReason"], shown["delivery"]["failures"]) == ("active", None, 0)

        await ok(goals.client, "DELETE", f"/v1/webhooks/{hook['id']}")
        for method, path in (("GET", ""), ("GET", "/deliveries"), ("POST", "/resume"), ("DELETE", "")):
            await refused(goals.client, method, f"/v1/webhooks/{hook['id']}{path}", None, 404)
        listed = await ok(goals.client, "GET", "/v1/webhooks")
        assert hook["id"] not in {w["id"] for w in listed["items"]}


async def test_a_subscriber_failing_for_too_long_is_paused(auth: Headers) -> None:
    """The other bound: few attempts (the backoff grows) but a long time failing."""
    with fresh_database() as database_url:
        async with (receiving(lambda n: 503) as receiver,
                    serve_goals(database_url, auth("admin", "ada"), webhook_pause_after_attempts=1000,
                                webhook_pause_after_seconds=0.5) as service):
            seeded = await key_result(service.client)
            hook = await register(service.client, receiver.url, ["KeyResultProgressed"])
            await check_ins(service.client, seeded["kr"]["id"], 10)
            status = "active"
            while status == "active":
                await receiver.next()
                await rounds(service, 1)
                status = (await webhook(service.client, hook["id"]))["status"]
            assert status == "paused"
            assert 2 <= len(receiver.received) < 1000
            assert receiver.received[-1].arrived - receiver.received[0].arrived >= 0.4


async def test_two_processes_deliver_each_item_once_in_order(goals: Goals, own_database: str, auth: Headers) -> None:
    """Both workers try every subscriber; the lock on its cursor row lets one at a time through."""
    async with receiving() as receiver, serve_goals(own_database, auth("admin", "ada")) as twin:
        seeded = await key_result(goals.client)
        start = await feed_end(goals.client)
        hook = await register(twin.client, receiver.url, ["KeyResultProgressed"])
        await check_ins(goals.client, seeded["kr"]["id"], *range(1, 13))
        expected = [e["id"] for e in await feed(goals.client, start, ["KeyResultProgressed"])]
        got = await receiver.take(len(expected))
        await rounds(goals, 2)
        await rounds(twin, 2)
        assert [d.id for d in got] == expected and receiver.queue.empty()
        assert len(await attempts(goals.client, hook["id"])) == len(expected)
        await ok(goals.client, "DELETE", f"/v1/webhooks/{hook['id']}")


# Registration ---------------------------------------------------------------------------------------

async def test_registration_checks_its_input_and_shows_the_secret_once(
        goals: Goals, own_database: str, auth: Headers) -> None:
    client = goals.client
    async with receiving() as receiver:
        body = {"url": receiver.url, "eventTypes": ["ObjectiveClosed"]}
        for bad in ({**body, "url": "ftp://hr.example.com/hook"}, {**body, "url": "http://"},
                    {**body, "url": "hr.example.com/hook"}, {**body, "url": "http://exa mple.com/"},
                    {**body, "eventTypes": []}, {**body, "eventTypes": ["ObjectiveClosd"]},
                    {**body, "eventTypes": ["WebhookSubscriptionRegistered"]},
                    {**body, "after": "garbage"}, {**body, "after": FeedPosition(10**12, 0).encode()},
                    {**body, "secret": "mine"}):
            await refused(client, "POST", "/v1/webhooks", bad, 422)
        await refused(client, "POST", "/v1/webhooks", body, 403, **auth("member"))
        await refused(client, "POST", "/v1/webhooks", body, 403, **auth("hr_sync"))
        await refused(client, "POST", "/v1/webhooks", body, 401, Authorization="")

        first = await ok(client, "POST", "/v1/webhooks", body, 201, **{"Idempotency-Key": "hook-1"})
        again = await client.post("/v1/webhooks", json=body, headers={"Idempotency-Key": "hook-1"})
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first and again.headers["Location"] == f"/v1/webhooks/{first['id']}"

        # The secret is in that answer only: not in reads, not in the log, not in the feed.
        secret = first["secret"]
        for path in ("/v1/webhooks", f"/v1/webhooks/{first['id']}", f"/v1/webhooks/{first['id']}/deliveries",
                     "/v1/changes?limit=1000"):
            r = await client.get(path, headers=auth("hr_sync"))
            assert r.status_code == 200 and secret not in r.text, path
        with psycopg.connect(own_database) as conn:
            states = [bytes(s) for (s,) in conn.execute("SELECT state FROM goals.goals_events")]
        assert states and not any(secret.encode() in s for s in states)
        changes = (await ok(client, "GET", "/v1/changes?limit=1000"))["items"]
        assert not [c for c in changes if c["type"].startswith("Webhook")]

        listed = await ok(client, "GET", "/v1/webhooks", **auth("auditor"))
        [shown] = [w for w in listed["items"] if w["id"] == first["id"]]
        assert (shown["url"], shown["eventTypes"], shown["status"]) == (receiver.url, ["ObjectiveClosed"], "active")
        await refused(client, "DELETE", f"/v1/webhooks/{first['id']}", None, 412, **{"If-Match": '"7"'})
        await refused(client, "DELETE", f"/v1/webhooks/{first['id']}", None, 403, **auth("auditor"))
        await refused(client, "GET", "/v1/webhooks", None, 403, **auth("member"))
        await refused(client, "GET", "/v1/webhooks/00000000-0000-4000-8000-000000000000", None, 404)
        await refused(client, "GET", f"/v1/webhooks/{first['id']}/deliveries?after=***", None, 422)
        await ok(client, "DELETE", f"/v1/webhooks/{first['id']}", **{"If-Match": f'"{shown["version"]}"'})
