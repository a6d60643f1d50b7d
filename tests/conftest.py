"""Fixtures every test shares: a fresh PostgreSQL database per test session, tokens, and
in-process service apps. Unit tests (tests/unit) use none of the database fixtures; the
integration and end-to-end folders switch `service_environment` on for all their tests.

The server is the one `DATABASE_URL` names (CI's PostgreSQL) or, when it is unset, the embedded
one that `services.stack test` started and named in `DATABASE_URL` before running pytest. Each
session creates its own database on that server and drops it afterwards, so runs never see each
other's events.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from services.common.auth import mint_token

TEST_SECRET = "tandem-test-secret-0123456789abcdef0123"


def _server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        pytest.exit("DATABASE_URL is not set: run the suite with `make test`", returncode=2)
    return url


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards."""
    server = _server_url()
    name = f"tandem_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A new, empty database for this test session."""
    with fresh_database() as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def service_environment(database_url: str) -> Iterator[None]:
    """What every in-process service and subprocess in the tests reads from the environment."""
    saved = dict(os.environ)
    os.environ.update({
        "DATABASE_URL": database_url,
        "TANDEM_JWT_SECRET": TEST_SECRET,
        "TANDEM_TELEMETRY_EXPORTER": "none",
    })
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def token() -> Callable[..., str]:
    def make(role: str = "admin", subject: str = "tester") -> str:
        return mint_token(secret=TEST_SECRET, role=role, subject=subject)

    return make


@pytest.fixture(scope="session")
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(role: str = "admin", subject: str = "tester") -> dict[str, str]:
        return {"Authorization": f"Bearer {token(role, subject)}"}

    return headers


async def serve_in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app's lifespan (pool, write side, projection threads) and talk ASGI to it."""
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def ok(client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None = None,
             status: int = 200, **headers: str) -> dict[str, Any]:
    """A request that must answer `status` (200 unless said); its JSON body."""
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    return r.json()


async def refused(client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None,
                  status: int, **headers: str) -> dict[str, Any]:
    """A request that must fail with `status` and problem details."""
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return r.json()
