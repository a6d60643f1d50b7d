"""The gateway's mutation forwarding, seen from the wire: what it sends, and what it answers when
the service is down, too slow, or answers with something that is not problem details.

The gateway runs in process on real PostgreSQL; its `goals_url` points at a small HTTP
listener in this test that records each request and answers as told (tests/e2e has the real
services). Nothing here waits on a timer except the forward timeout under test.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

import httpx
import pytest

from services.gateway.api import create_app as create_gateway
from services.gateway.settings import GatewaySettings
from tests.conftest import free_port, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

Headers = Callable[..., dict[str, str]]
KR_ID = "0b0c3a52-7f6e-4d8e-9a43-0f1d2c3b4a59"
CHECK_IN = """mutation($kr: ID!, $input: CheckInInput!, $v: Int, $key: String) {
  checkIn(keyResultId: $kr, input: $input, expectedVersion: $v, idempotencyKey: $key) {
    id version position replayed } }"""


class Recorder:
    """An HTTP/1.1 listener that records each request and answers with `answer`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer: tuple[int, dict[str, str], bytes] = (500, {}, b"")
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append({"method": method, "path": target, "headers": headers,
                              "json": json.loads(body) if body else None})
        status, answer_headers, payload = self.answer
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Length: {len(payload)}", "Connection: close",
                 *(f"{k}: {v}" for k, v in answer_headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture(scope="module")
async def recorder() -> AsyncIterator[Recorder]:
    r = Recorder()
    await r.start()
    yield r
    await r.stop()


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    with silent_listener() as port:
        yield port


async def _gateway(database_url: str, goals_url: str, metrics_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(DATABASE_URL=database_url, run_projections=False, goals_url=goals_url,
                               metrics_url=metrics_url, forward_timeout_seconds=0.5)
    async for client in serve_in_process(create_gateway(settings)):
        yield client


@pytest.fixture(scope="module")
async def gateway(database_url: str, recorder: Recorder, unused_port: int) -> AsyncIterator[httpx.AsyncClient]:
    """goals is the recorder; metrics is a port nobody listens on."""
    async for client in _gateway(database_url, f"http://127.0.0.1:{recorder.port}/",
                                 f"http://127.0.0.1:{unused_port}"):
        yield client


@pytest.fixture(scope="module")
async def slow_gateway(database_url: str, silent_port: int) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _gateway(database_url, f"http://127.0.0.1:{silent_port}", f"http://127.0.0.1:{silent_port}"):
        yield client


async def post(client: httpx.AsyncClient, headers: dict[str, str], query: str, **variables: Any) -> dict[str, Any]:
    r = await client.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def only_error(answer: dict[str, Any], field: str) -> dict[str, Any]:
    assert answer["data"] == {field: None}, answer
    [error] = answer["errors"]
    return error


async def test_a_mutation_is_sent_as_the_rest_call_with_the_callers_headers(
        gateway: httpx.AsyncClient, recorder: Recorder, token: Callable[..., str]) -> None:
    recorder.requests.clear()
    recorder.answer = (201, {"Content-Type": "application/json", "Tandem-Position": "goals=42",
                             "Idempotent-Replayed": "true"},
                       json.dumps({"id": KR_ID, "version": 4, "position": 42}).encode())
    authorization = f"bearer {token('member', 'mia')}"  # forwarded as it came, scheme's case included
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = await post(gateway, {"Authorization": authorization, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                                  "X-Correlation-ID": "corr-1"},
                        CHECK_IN, kr=KR_ID.upper(), v=3, key="retry-1",
                        input={"value": 4, "note": "", "confidence": None, "validOn": "2026-03-01"})
    assert answer == {"data": {"checkIn": {"id": KR_ID, "version": 4, "position": "goals=42", "replayed": True}}}

    [sent] = recorder.requests
    assert (sent["method"], sent["path"]) == ("POST", f"/v1/key-results/{KR_ID}/check-ins")
    # Left out stays out (the service's default applies); an explicit null is sent as null.
    assert sent["json"] == {"value": 4.0, "confidence": None, "note": "", "validOn": "2026-03-01"}
    headers = sent["headers"]
    assert headers["authorization"] == authorization
    assert headers["if-match"] == '"3"' and headers["idempotency-key"] == "retry-1"
    assert headers["x-correlation-id"] == "corr-1"
    version, sent_trace, parent, _ = headers["traceparent"].split("-")
    assert (version, sent_trace) == ("00", trace_id)
    assert parent != "00f067aa0ba902b7"  # the gateway's own client span, a child in the caller's trace


async def test_a_body_that_is_not_problem_details_still_gives_a_problem(
        gateway: httpx.AsyncClient, recorder: Recorder, auth: Headers) -> None:
    recorder.answer = (502, {"Content-Type": "text/html"}, b"<html>upstream at 10.0.0.7 is down</html>")
    error = only_error(await post(gateway, auth("admin"), CHECK_IN, kr=KR_ID, input={"value": 1}), "checkIn")
    assert error["extensions"] == {"code": "BAD_GATEWAY", "status": 502, "service": "goals",
                                   "problem": {"type": "about:blank", "title": "Bad Gateway", "status": 502}}
    assert "10.0.0.7" not in json.dumps(error)


async def test_an_unreachable_service_is_service_unavailable_and_leaks_nothing(
        gateway: httpx.AsyncClient, auth: Headers, unused_port: int) -> None:
    r = await gateway.post("/graphql", headers=auth("admin"), json={
        "query": "mutation($k: ID!) { recordMeasurement(kpiId: $k, input: {value: 1}) { id } }", "variables": {"k": KR_ID}})
    error = only_error(r.json(), "recordMeasurement")
    assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE", "status": 503, "service": "metrics"}
    assert "nothing was written" in error["message"]
    assert str(unused_port) not in r.text and "127.0.0.1" not in r.text and "Traceback" not in r.text


async def test_a_service_that_does_not_answer_in_time_is_a_gateway_timeout(
        slow_gateway: httpx.AsyncClient, auth: Headers, silent_port: int) -> None:
    r = await slow_gateway.post("/graphql", headers=auth("admin"), json={
        "query": CHECK_IN, "variables": {"kr": KR_ID, "key": "k", "input": {"value": 1}}})
    error = only_error(r.json(), "checkIn")
    assert error["extensions"] == {"code": "GATEWAY_TIMEOUT", "status": 504, "service": "goals"}
    assert "same idempotencyKey" in error["message"]
    assert str(silent_port) not in r.text


async def test_arguments_that_cannot_be_sent_are_refused_before_sending(
        gateway: httpx.AsyncClient, recorder: Recorder, auth: Headers) -> None:
    recorder.requests.clear()
    error = only_error(await post(gateway, auth("admin"), CHECK_IN, kr="../../units", input={"value": 1}), "checkIn")
    assert error["extensions"] == {"code": "BAD_USER_INPUT"}
    assert error["message"] == "keyResultId is not an id this API gave out."
    error = only_error(await post(gateway, auth("admin"), CHECK_IN, kr=KR_ID, key="two words\n",
                                  input={"value": 1}), "checkIn")
    assert error["extensions"] == {"code": "BAD_USER_INPUT"}
    assert recorder.requests == []


async def test_mutations_need_a_bearer_token(gateway: httpx.AsyncClient, recorder: Recorder) -> None:
    recorder.requests.clear()
    r = await gateway.post("/graphql", json={"query": CHECK_IN, "variables": {"kr": KR_ID, "input": {"value": 1}}})
    assert r.status_code == 401
    assert recorder.requests == []
