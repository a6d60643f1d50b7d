"""The metrics service in process against real PostgreSQL: REST write -> events in the log ->
projection -> REST read, waiting on the projection's tracking position, never sleeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from eventsourcing.projection import ProjectionRunner

from services.common.database import ensure_schema, eventsourcing_env
from services.common.projections import ProjectionSpec, followed_log
from services.metrics.api import create_app
from services.metrics.application import Metrics
from services.metrics.domain import KPIState
from services.metrics.projections import MetricsProjection, MetricsReadModel
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
MISSING = "00000000-0000-0000-0000-000000000000"
FLOOR = {"kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}


def day(n: int) -> str:
    return (T0 + timedelta(days=n)).isoformat()


@pytest.fixture(scope="module")
async def metrics(auth: Callable[..., dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_app()):
        client.headers.update(auth("admin", "ada"))
        yield client


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = await client.post(path, json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.headers["Tandem-Position"] == f"metrics={r.json()['position']}"
    assert r.headers["ETag"] == f'"{r.json()["version"]}"'
    return r.json()


async def define(client: httpx.AsyncClient, *rules: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return await post(client, "/v1/kpis", {"name": "CSAT", "unit": "%", "direction": "higher_is_better",
                                           "cadence": "daily", "target": 95, "rules": list(rules), **fields})


async def read(client: httpx.AsyncClient, kpi_id: str, written: dict[str, Any]) -> dict[str, Any]:
    r = await client.get(f"/v1/kpis/{kpi_id}", headers={"Tandem-Wait-For": f"metrics={written['position']}"})
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == f'"{r.json()["version"]}"'
    return r.json()


def contract_events(database_url: str, kpi_id: str) -> list[Any]:
    """The KPI's events as a follower in another service decodes them: no metrics classes."""
    log = followed_log("Metrics")(env=eventsourcing_env(database_url, "metrics", create_table=False))
    try:
        stored = log.recorder.select_notifications(start=1, limit=10_000)
        return [e for e in map(log.mapper.to_domain_event, stored) if str(e.originator_id) == kpi_id]
    finally:
        log.close()


async def test_floor_rule_breaches_and_recovers(metrics: httpx.AsyncClient, database_url: str) -> None:
    unit_id = "11111111-1111-1111-1111-111111111111"
    kpi = await define(metrics, FLOOR, unitId=unit_id)
    fresh = await read(metrics, kpi["id"], kpi)
    assert fresh["state"] == "no_data" and fresh["latestValue"] is None and fresh["unitId"] == unit_id
    assert (fresh["direction"], fresh["cadence"], fresh["target"]) == ("higher_is_better", "daily", 95)
    assert fresh["rules"] == [{"id": "rule-1", "kind": "below", "threshold": 90.0, "low": None, "high": None,
                               "severity": "critical", "pendingCount": 1, "recovery": 92.0, "state": "ok"}]

    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 93, "measuredAt": day(1)})
    assert (await read(metrics, kpi["id"], m))["state"] == "ok"

    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements",
                   {"value": 85, "measuredAt": day(2), "source": "survey"}, **{"X-Correlation-ID": "corr-7"})
    assert m["version"] == 4  # KPIMeasured and KPIThresholdBreached in one save
    breached = await read(metrics, kpi["id"], m)
    assert (breached["state"], breached["latestValue"], breached["rules"][0]["state"]) == ("breached", 85, "breached")

    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 91, "measuredAt": day(3)})
    assert (await read(metrics, kpi["id"], m))["state"] == "breached"  # past the threshold, not the recovery
    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 96, "measuredAt": day(4)})
    recovered = await read(metrics, kpi["id"], m)
    assert (recovered["state"], recovered["version"]) == ("ok", 7)

    events = contract_events(database_url, kpi["id"])
    assert [e.type for e in events] == ["KPIDefined", "KPIMeasured", "KPIMeasured", "KPIThresholdBreached",
                                        "KPIMeasured", "KPIMeasured", "KPIRecovered"]
    fired = events[3]
    assert fired.data["rule_id"] == "rule-1" and fired.data["severity"] == "critical"
    assert fired.data["value"] == 85 and fired.data["measurement_id"] == events[2].data["measurement_id"]
    assert fired.data["measured_at"] == T0 + timedelta(days=2)
    assert fired.meta["actor"] == "ada" and fired.meta["correlation_id"] == "corr-7"
    assert events[2].meta == fired.meta and events[2].data["source"] == "survey"
    assert events[6].data["value"] == 96 and events[6].meta["correlation_id"] != "corr-7"
    assert events[0].data["direction"] == "higher_is_better" and events[0].data["rules"][0]["recovery"] == 92

    # A write side with an empty cache replays the log to the same state.
    replayed = Metrics(env=eventsourcing_env(database_url, "metrics"))
    try:
        again = replayed.get_kpi(UUID(kpi["id"]))
        assert (again.state, again.version, again.latest_value) == (KPIState.ok, 7, 96)
    finally:
        replayed.close()

    with psycopg.connect(database_url) as conn:
        topic, state = conn.execute(
            "SELECT topic, state FROM metrics.metrics_events WHERE originator_id = %s AND originator_version = 4",
            (kpi["id"],)).fetchone()
    stored = json.loads(bytes(state))
    assert topic == "services.metrics.domain:KPI.ThresholdBreached"
    assert stored["meta"]["actor"] == "ada" and stored["meta"]["correlation_id"] == "corr-7"
    assert "timestamp" in stored

    history = (await metrics.get(f"/v1/kpis/{kpi['id']}/measurements")).json()
    assert [(h["value"], h["actor"]) for h in history] == [(96, "ada"), (91, "ada"), (85, "ada"), (93, "ada")]
    assert history[2]["source"] == "survey" and history[0]["source"] == "api"


async def test_pending_count_shows_pending_before_firing(metrics: httpx.AsyncClient) -> None:
    kpi = await define(metrics, {**FLOOR, "pendingCount": 2})
    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 80, "measuredAt": day(1)})
    pending = await read(metrics, kpi["id"], m)
    assert (pending["state"], pending["rules"][0]["state"], m["version"]) == ("pending", "pending", 2)
    m = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 80, "measuredAt": day(2)})
    assert m["version"] == 4
    assert (await read(metrics, kpi["id"], m))["state"] == "breached"


async def test_out_of_order_measurement_does_not_flip_state(metrics: httpx.AsyncClient) -> None:
    kpi = await define(metrics, FLOOR)
    await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 95, "measuredAt": day(5)})
    late = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 10, "measuredAt": day(1)})
    assert late["version"] == 3  # recorded, and nothing fired
    body = await read(metrics, kpi["id"], late)
    assert (body["state"], body["latestValue"]) == ("ok", 95)
    assert body["latestMeasuredAt"] == (T0 + timedelta(days=5)).isoformat().replace("+00:00", "Z")
    history = (await metrics.get(f"/v1/kpis/{kpi['id']}/measurements")).json()
    assert [h["value"] for h in history] == [95, 10]  # newest valid time first


async def test_list_filters_and_pages(metrics: httpx.AsyncClient) -> None:
    unit_id = "22222222-2222-2222-2222-222222222222"
    kpis = [await define(metrics, FLOOR, unitId=unit_id, name=f"KPI {i}") for i in range(3)]
    m = await post(metrics, f"/v1/kpis/{kpis[1]['id']}/measurements", {"value": 1})
    wait = {"Tandem-Wait-For": f"metrics={m['position']}"}
    first = (await metrics.get(f"/v1/kpis?unit={unit_id}&limit=2", headers=wait)).json()
    assert [k["name"] for k in first["items"]] == ["KPI 0", "KPI 1"] and first["nextCursor"]
    rest = (await metrics.get(f"/v1/kpis?unit={unit_id}&limit=2&after={first['nextCursor']}")).json()
    assert [k["name"] for k in rest["items"]] == ["KPI 2"] and rest["nextCursor"] is None
    breached = (await metrics.get(f"/v1/kpis?unit={unit_id}&state=breached")).json()
    assert [k["id"] for k in breached["items"]] == [kpis[1]["id"]]


async def test_stale_if_match_gets_412_and_appends_nothing(metrics: httpx.AsyncClient) -> None:
    kpi = await define(metrics, FLOOR)
    path = f"/v1/kpis/{kpi['id']}/measurements"
    ok = await post(metrics, path, {"value": 95}, **{"If-Match": '"1"'})
    stale = await metrics.post(path, json={"value": 50}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    assert stale.json()["currentVersion"] == 2
    body = await read(metrics, kpi["id"], ok)
    assert (body["version"], body["latestValue"]) == (2, 95)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "up", "cadence": "daily", "rules": []}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily"}, 422),
    ("post", "/v1/kpis", {"name": "", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": []}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [], "surprise": 1}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "below", "severity": "critical"}]}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "outside", "low": 5, "high": 1, "severity": "warning"}]}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "below", "threshold": 9, "severity": "critical",
                                     "pendingCount": 0}]}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "below", "threshold": 9, "recovery": 5, "severity": "critical"}]}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements", {"value": 1}, 404),
    ("get", f"/v1/kpis/{MISSING}", None, 404),
    ("get", f"/v1/kpis/{MISSING}/measurements", None, 404),
    ("get", "/v1/kpis/not-a-uuid", None, 422),
    ("get", "/v1/kpis?state=melting", None, 422),
    ("get", "/v1/kpis?after=garbage", None, 422),
])
async def test_bad_input_gets_problem_details(metrics: httpx.AsyncClient, method: str, path: str,
                                              body: dict[str, Any] | None, status: int) -> None:
    r = await metrics.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status and r.json()["title"]


@pytest.mark.parametrize("body", [
    {"value": "NaN"}, {"value": 1e300}, {"value": "high"}, {},
    {"value": 1, "measuredAt": "2026-11-01T09:00:00"},  # no time zone
    {"value": 1, "measuredAt": "2999-01-01T00:00:00Z"},
    {"value": 1, "source": ""},
])
async def test_bad_measurements_get_422_and_append_nothing(metrics: httpx.AsyncClient, body: dict[str, Any]) -> None:
    kpi = await define(metrics, FLOOR)
    r = await metrics.post(f"/v1/kpis/{kpi['id']}/measurements", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["errors"]
    assert (await read(metrics, kpi["id"], kpi))["version"] == 1


async def test_tokens(metrics: httpx.AsyncClient, token: Callable[..., str]) -> None:
    bare = httpx.AsyncClient(transport=metrics._transport, base_url=str(metrics.base_url))
    async with bare:
        assert (await bare.get("/v1/kpis")).status_code == 401
        r = await bare.post("/v1/kpis", json={})
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
        auditor = {"Authorization": f"Bearer {token('auditor')}"}
        assert (await bare.get("/v1/kpis", headers=auditor)).status_code == 200
        r = await bare.post(f"/v1/kpis/{MISSING}/measurements", json={"value": 1}, headers=auditor)
        assert r.status_code == 403


async def test_read_model_rebuilds_to_the_same_rows(metrics: httpx.AsyncClient, database_url: str) -> None:
    """Replaying the whole log into an empty schema gives the rows the live projection wrote."""
    kpi = await define(metrics, {**FLOOR, "pendingCount": 2}, {"kind": "outside", "low": 0, "high": 100,
                                                               "severity": "warning"})
    for n, value in [(3, 80), (1, 120), (4, 70), (5, 95)]:
        last = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": value, "measuredAt": day(n)})
    await read(metrics, kpi["id"], last)

    def rebuild() -> None:
        ensure_schema(database_url, "metrics_rebuild")
        spec = ProjectionSpec(Metrics, MetricsProjection, MetricsReadModel, "metrics", "metrics_rebuild")
        with ProjectionRunner(application_class=Metrics, projection_class=MetricsProjection,
                              view_class=MetricsReadModel, env=spec.env(database_url)) as runner:
            runner.wait(last["position"], timeout=30)

    await asyncio.to_thread(rebuild)
    with psycopg.connect(database_url) as conn:
        for table, order in [("kpis", "id"), ("measurements", "kpi_id, version")]:
            live, rebuilt = (conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {order}").fetchall()
                             for schema in ("metrics", "metrics_rebuild"))
            assert live == rebuilt and live
