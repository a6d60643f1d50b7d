"""A bulk load of 10,000 measurements in one request against real PostgreSQL: one save of the KPI,
so one transaction (every event row carries the same inserting transaction id, `xmin`, and their
notification ids are contiguous); retries append nothing, with or without an Idempotency-Key.

It runs on a database of its own, so that followers of the metrics log in other tests of the
session (the gateway's, goals') never have 10,000 events to work through first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from services.metrics.api import create_app
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

N = 10_000


@pytest.fixture(scope="module")
async def metrics(auth: Callable[..., dict[str, str]], own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    # The read model takes a while to work through 10,000 events: let reads wait for it.
    settings = MetricsSettings(DATABASE_URL=own_database, run_staleness_watch=False, read_wait_timeout_seconds=120)
    async for client in serve_in_process(create_app(settings)):
        client.headers.update(auth("admin", "loader"))
        client.timeout = httpx.Timeout(120)
        yield client


def stored(database_url: str, kpi_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id, originator_version, topic, xmin::text AS xid FROM metrics.metrics_events "
            "WHERE originator_id = %s ORDER BY originator_version", (kpi_id,)).fetchall()
    return [dict(zip(("notification_id", "version", "topic", "xid"), r, strict=True)) for r in rows]


@pytest.mark.timeout(300)
async def test_ten_thousand_measurements_in_one_transaction(metrics: httpx.AsyncClient, own_database: str) -> None:
    r = await metrics.post("/v1/kpis", json={
        "name": "Checkout latency", "unit": "ms", "direction": "lower_is_better", "cadence": "daily",
        "rules": [{"kind": "above", "threshold": 900, "recovery": 700, "severity": "critical", "pendingCount": 3}]})
    assert r.status_code == 201, r.text
    kpi_id = r.json()["id"]
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=N)
    # A slow wave: 500 ms, rising past 900 for a while every 2,000 minutes, then back down.
    values = [500 + 450 * ((i % 2000) >= 1500) + (i % 7) for i in range(N)]
    body = {"measurements": [{"value": v, "measuredAt": (start + timedelta(minutes=i)).isoformat(),
                              "source": "loader"} for i, v in enumerate(values)]}
    # The order in a request does not matter: valid time does.
    body["measurements"].reverse()
    key = {"Idempotency-Key": f"bulk-{kpi_id}"}

    r = await metrics.post(f"/v1/kpis/{kpi_id}/measurements/bulk", json=body, headers=key)
    assert r.status_code == 201, r.text
    written = r.json()
    assert r.headers["Tandem-Position"] == f"metrics={written['position']}"

    events = await asyncio.to_thread(stored, own_database, kpi_id)
    bulk = events[1:]  # after KPIDefined
    measured = [e for e in bulk if e["topic"].endswith("KPI.Measured")]
    breaches = [e for e in bulk if e["topic"].endswith("KPI.ThresholdBreached")]
    recoveries = [e for e in bulk if e["topic"].endswith("KPI.Recovered")]
    assert len(measured) == N
    assert len(breaches) == 5 and len(recoveries) == 4  # five episodes; the last one still breached
    assert written["version"] == events[-1]["version"] == 1 + N + 9
    # One transaction: one inserting transaction id, and nothing else in the log between its events.
    assert {e["xid"] for e in bulk} == {bulk[0]["xid"]} != {events[0]["xid"]}
    ids = [e["notification_id"] for e in bulk]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert written["position"] == ids[-1]

    # A retry with the key gets the first answer and appends nothing.
    again = await metrics.post(f"/v1/kpis/{kpi_id}/measurements/bulk", json=body, headers=key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == written
    # Without the key, the same measurements are the same (time, source) pairs: nothing new either.
    repeat = await metrics.post(f"/v1/kpis/{kpi_id}/measurements/bulk", json=body)
    assert repeat.status_code == 201 and repeat.json()["version"] == written["version"]
    assert len(await asyncio.to_thread(stored, own_database, kpi_id)) == len(events)

    # The read model catches up (read-your-writes, no sleeping) with every measurement.
    kpi = await metrics.get(f"/v1/kpis/{kpi_id}", headers={"Tandem-Wait-For": f"metrics={written['position']}"})
    assert kpi.status_code == 200, kpi.text
    body_out = kpi.json()
    assert (body_out["measurementCount"], body_out["state"], body_out["latestValue"]) == (N, "breached", values[-1])
    page = (await metrics.get(f"/v1/kpis/{kpi_id}/measurements?limit=1000")).json()
    assert len(page["items"]) == 1000 and page["nextCursor"]
    trend = (await metrics.get(f"/v1/kpis/{kpi_id}/trend?period=day")).json()["items"]
    assert sum(t["count"] for t in trend) == N
