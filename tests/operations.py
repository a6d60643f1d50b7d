"""Every REST operation of the committed contracts, for the tests that must try them all (the
role matrix, the refusals that come before a request is looked at). Taken from
`contracts/openapi/<service>.json`, so a new endpoint cannot be missed, with who may call each
as the contract documents it (`x-tandem-roles`, `x-tandem-member-scope`: services.contracts)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from services.common.auth import Role
from services.goals.api import create_app as create_goals
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

CONTRACTS = Path(__file__).resolve().parents[1] / "contracts" / "openapi"
SERVICES = ("goals", "metrics")
WRITES = ("post", "put", "patch", "delete")
ROLES = tuple(r.value for r in Role)


@dataclass(frozen=True)
class Operation:
    service: str
    method: str
    path: str
    roles: frozenset[str]
    """The roles the contract says may call it."""
    member_scope: str | None
    """What a member is limited to, if the contract says."""
    public: bool

    @property
    def write(self) -> bool:
        return self.method in WRITES

    def __str__(self) -> str:
        return f"{self.service} {self.method.upper()} {self.path}"


def operations(service: str) -> list[Operation]:
    """Every operation in the service's committed contract."""
    spec = json.loads((CONTRACTS / f"{service}.json").read_text())
    return [Operation(service, method, path, frozenset(op.get("x-tandem-roles", ())),
                      op.get("x-tandem-member-scope"), bool(op.get("x-tandem-public")))
            for path, item in spec["paths"].items() for method, op in item.items() if method in ("get", *WRITES)]


def all_operations() -> list[Operation]:
    return [op for service in SERVICES for op in operations(service)]


def fill(path: str, ids: dict[str, str]) -> str:
    """The path with its parameters taken from `ids` (each must be there)."""
    names = re.findall(r"{(\w+)}", path)
    missing = [n for n in names if n not in ids]
    assert not missing, f"{path}: give the test an id for {missing}"
    return path.format(**{n: ids[n] for n in names})


async def serve_goals() -> AsyncIterator[httpx.AsyncClient]:
    # No webhook worker: a delivery that failed would pause a subscription (an event).
    async for client in serve_in_process(create_goals(GoalsSettings(run_webhook_worker=False))):
        yield client


async def serve_metrics() -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_metrics(MetricsSettings(run_staleness_watch=False))):
        yield client


async def created(client: httpx.AsyncClient, path: str, body: dict[str, Any] | None = None,
                  status: int = 201) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status_code == status, (path, r.text)
    return r.json()


def events_by(database_url: str, actor: str) -> int:
    """Events in either log whose metadata names the actor."""
    with psycopg.connect(database_url) as conn:
        return sum(conn.execute(
            f"SELECT count(*) FROM {log}.{log}_events "
            "WHERE convert_from(state, 'UTF8')::jsonb -> 'meta' ->> 'actor' = %s", (actor,)).fetchone()[0]
            for log in SERVICES)


def log_heads(database_url: str) -> tuple[int, ...]:
    with psycopg.connect(database_url) as conn:
        return tuple(conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {log}.{log}_events").fetchone()[0]
                     for log in SERVICES)
