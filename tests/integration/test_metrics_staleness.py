"""Staleness against real PostgreSQL: the watch finds overdue KPIs in the read model and each
KPI's aggregate decides, once per gap; a timely measurement freshens a KPI; the check at start-up
catches up on what went stale while the service was down. The check is driven directly with an
injected `now`, never by waiting for the schedule."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from services.common.database import eventsourcing_env
from services.common.projections import followed_log
from services.metrics.api import StalenessWatch, create_app
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

GRACE = timedelta(hours=1)
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Service:
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def watch(self) -> StalenessWatch:
        return self.app.state.staleness_watch


@pytest.fixture(scope="module")
async def service(auth: Callable[..., dict[str, str]]) -> AsyncIterator[Service]:
    app = create_app(MetricsSettings(run_staleness_watch=False, staleness_grace_seconds=GRACE.total_seconds()))
    async for client in serve_in_process(app):
        client.headers.update(auth("admin", "ada"))
        yield Service(client, app)


async def define(client: httpx.AsyncClient, cadence: str, *measured: datetime) -> tuple[str, int]:
    r = await client.post("/v1/kpis", json={"name": f"{cadence} KPI", "unit": "n", "direction": "higher_is_better",
                                            "cadence": cadence, "rules": []})
    assert r.status_code == 201, r.text
    kpi_id, position = r.json()["id"], r.json()["position"]
    for at in measured:
        m = await client.post(f"/v1/kpis/{kpi_id}/measurements", json={"value": 1, "measuredAt": at.isoformat()})
        assert m.status_code == 201, m.text
        position = m.json()["position"]
    return kpi_id, position


async def get(client: httpx.AsyncClient, kpi_id: str, position: int) -> dict[str, Any]:
    r = await client.get(f"/v1/kpis/{kpi_id}", headers={"Tandem-Wait-For": f"metrics={position}"})
    assert r.status_code == 200, r.text
    return r.json()


def events(database_url: str, kpi_id: str) -> list[Any]:
    log = followed_log("Metrics")(env=eventsourcing_env(database_url, "metrics", create_table=False))
    try:
        stored = log.recorder.select_notifications(start=1, limit=100_000)
        return [e for e in map(log.mapper.to_domain_event, stored) if str(e.originator_id) == kpi_id]
    finally:
        log.close()


async def types(database_url: str, kpi_id: str) -> list[str]:
    return [e.type for e in await asyncio.to_thread(events, database_url, kpi_id)]


async def test_stale_once_per_gap_and_freshened_by_a_measurement(service: Service, database_url: str) -> None:
    client = service.client
    daily, _ = await define(client, "daily", NOW - timedelta(days=3))
    weekly, _ = await define(client, "weekly", NOW - timedelta(days=3))
    never, position = await define(client, "daily")
    ids = [UUID(daily), UUID(weekly), UUID(never)]
    await get(client, never, position)  # the read model has all three

    written = await service.watch.check(NOW, kpi_ids=ids)
    assert [w.id for w in written] == [UUID(daily)]
    kpi = await get(client, daily, written[0].position)
    due = NOW - timedelta(days=2) + GRACE
    assert (kpi["state"], kpi["stale"], datetime.fromisoformat(kpi["staleSince"])) == ("stale", True, due)
    listed = (await client.get("/v1/kpis?state=stale")).json()["items"]
    assert daily in [k["id"] for k in listed] and weekly not in [k["id"] for k in listed]

    assert await service.watch.check(NOW, kpi_ids=ids) == []  # the same gap: nothing again
    later = await service.watch.check(NOW + timedelta(days=2), kpi_ids=ids)
    assert [w.id for w in later] == [UUID(never)]  # defined now, due in a day and an hour; weekly not yet
    never_kpi = await get(client, never, later[0].position)
    assert (never_kpi["state"], never_kpi["latestValue"]) == ("stale", None)

    m = await client.post(f"/v1/kpis/{daily}/measurements", json={"value": 2})  # now: on time again
    assert m.status_code == 201, m.text
    kpi = await get(client, daily, m.json()["position"])
    assert (kpi["state"], kpi["stale"], kpi["staleSince"]) == ("ok", False, None)
    again = await service.watch.check(NOW + timedelta(days=3), kpi_ids=[UUID(daily)])  # a new gap
    assert len(again) == 1
    assert await types(database_url, daily) == [
        "KPIDefined", "KPIMeasured", "KPIStale", "KPIMeasured", "KPIFreshened", "KPIStale"]
    stale = (await asyncio.to_thread(events, database_url, daily))[2]
    assert stale.data["expected_by"] == due and stale.data["last_measured_at"] == NOW - timedelta(days=3)
    assert stale.meta["actor"] == "metrics:staleness-watch"


async def test_concurrent_checks_make_a_kpi_stale_once(service: Service, database_url: str) -> None:
    kpi_id, position = await define(service.client, "daily", NOW - timedelta(days=5))
    await get(service.client, kpi_id, position)
    results = await asyncio.gather(*(service.watch.check(NOW, kpi_ids=[UUID(kpi_id)]) for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert (await types(database_url, kpi_id)).count("KPIStale") == 1


async def test_the_check_at_start_up_catches_up_after_downtime(service: Service, database_url: str) -> None:
    """KPIs that went overdue while no watch ran are made stale by the next process's first check,
    each once, with the time it was due; those already stale are left alone."""
    overdue, _ = await define(service.client, "weekly", NOW - timedelta(days=30))
    already, position = await define(service.client, "daily", NOW - timedelta(days=30))
    await get(service.client, already, position)
    first = await service.watch.check(NOW, kpi_ids=[UUID(already)])
    fresh, position = await define(service.client, "daily", NOW - timedelta(hours=1))
    await get(service.client, fresh, max(position, first[0].position))  # the read model has it all

    restarted = create_app(MetricsSettings(run_staleness_watch=True, run_projections=False,
                                           staleness_check_interval_seconds=3600,
                                           staleness_grace_seconds=GRACE.total_seconds()))
    async with LifespanManager(restarted, startup_timeout=60, shutdown_timeout=60):
        await asyncio.wait_for(restarted.state.staleness_watch.checked.wait(), timeout=60)

    [stale] = [e for e in await asyncio.to_thread(events, database_url, overdue) if e.type == "KPIStale"]
    assert stale.data["expected_by"] == NOW - timedelta(days=23) + GRACE
    assert (await types(database_url, already)).count("KPIStale") == 1
    assert "KPIStale" not in await types(database_url, fresh)


async def test_an_operator_can_run_the_check_now(service: Service, auth: Callable[..., dict[str, str]]) -> None:
    kpi, position = await define(service.client, "daily", NOW - timedelta(days=3))
    fresh, _ = await define(service.client, "weekly", NOW - timedelta(days=1))
    r = await service.client.post("/v1/staleness-checks", headers={"Tandem-Wait-For": f"metrics={position}"})
    assert r.status_code == 200, r.text
    assert kpi in r.json()["stale"] and fresh not in r.json()["stale"]
    assert r.headers["Tandem-Position"] == f"metrics={r.json()['position']}"
    read = await service.client.get(f"/v1/kpis/{kpi}", headers={"Tandem-Wait-For": r.headers["Tandem-Position"]})
    assert read.json()["state"] == "stale"
    again = await service.client.post("/v1/staleness-checks")
    assert kpi not in again.json()["stale"]  # once per gap
    member = await service.client.post("/v1/staleness-checks", headers=auth("member", "bob"))
    assert member.status_code == 403


async def test_a_check_retried_with_its_idempotency_key_gets_the_first_answer(service: Service,
                                                                             database_url: str) -> None:
    kpi, position = await define(service.client, "daily", NOW - timedelta(days=3))
    keyed = {"Idempotency-Key": f"check-{kpi}", "Tandem-Wait-For": f"metrics={position}"}
    first = await service.client.post("/v1/staleness-checks", headers=keyed)
    assert first.status_code == 200 and kpi in first.json()["stale"], first.text
    retry = await service.client.post("/v1/staleness-checks", headers=keyed)
    assert (retry.status_code, retry.json()) == (200, first.json())
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Tandem-Position"] == first.headers["Tandem-Position"]
    assert (await types(database_url, kpi)).count("KPIStale") == 1
    other = await service.client.post("/v1/staleness-checks", headers=keyed, json={"another": "request"})
    assert other.status_code == 422 and other.json()["title"] == "Idempotency-Key reused"
