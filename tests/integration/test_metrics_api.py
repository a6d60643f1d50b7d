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
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
MISSING = "00000000-0000-0000-0000-000000000000"
FLOOR = {"kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}


def day(n: int) -> str:
    return (T0 + timedelta(days=n)).isoformat()


@pytest.fixture(scope="module")
async def metrics(auth: Callable[..., dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_app(MetricsSettings(run_staleness_watch=False))):
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
                               "severity": "critical", "pendingCount": 1, "pendingFor": 0, "recovery": 92.0,
                               "state": "ok"}]
    assert (fresh["stale"], fresh["staleSince"], fresh["measurementCount"]) == (False, None, 0)
    assert [(t["target"], t["effectiveFrom"], t["reason"], t["actor"]) for t in fresh["targetHistory"]] == [
        (95, None, "defined", "ada")]

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

    history = (await metrics.get(f"/v1/kpis/{kpi['id']}/measurements")).json()["items"]
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
    history = (await metrics.get(f"/v1/kpis/{kpi['id']}/measurements")).json()["items"]
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
    ("get", "/v1/kpis?stale=maybe", None, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "below", "threshold": 9, "severity": "critical",
                                     "pendingFor": -5}]}, 422),
    ("post", "/v1/kpis", {"name": "X", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                          "rules": [{"kind": "below", "threshold": 9, "severity": "critical",
                                     "pendingFor": "1h"}]}, 422),
    ("put", f"/v1/kpis/{MISSING}/rules", {"rules": []}, 404),
    ("put", f"/v1/kpis/{MISSING}/rules", {"rules": [{"kind": "below", "severity": "critical"}]}, 404),
    ("put", f"/v1/kpis/{MISSING}/rules", {"rules": [{"kind": "below", "threshold": 1, "severity": "critical",
                                                      "id": "no spaces"}]}, 422),
    ("post", f"/v1/kpis/{MISSING}/targets", {"target": 1}, 404),
    ("post", f"/v1/kpis/{MISSING}/targets", {"target": "high"}, 422),
    ("post", f"/v1/kpis/{MISSING}/targets", {"target": 1, "effectiveFrom": "0"}, 422),
    ("post", f"/v1/kpis/{MISSING}/targets", {"target": 1, "effectiveFrom": "0001-01-01"}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements/bulk", {"measurements": [{"value": 1,
                                                                          "measuredAt": "2026-11-01T00:00:00Z"}]}, 404),
    ("post", f"/v1/kpis/{MISSING}/measurements/bulk", {"measurements": []}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements/bulk", {"measurements": [{"value": 1}]}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements/bulk",
     {"measurements": [{"value": 1, "measuredAt": "2026-11-01T00:00:00Z"}] * 10_001}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements/{MISSING}/corrections", {"value": 1, "reason": "x"}, 404),
    ("post", f"/v1/kpis/{MISSING}/measurements/{MISSING}/corrections", {"value": 1}, 422),
    ("post", f"/v1/kpis/{MISSING}/measurements/{MISSING}/corrections", {"value": 1, "reason": " "}, 422),
    ("get", f"/v1/kpis/{MISSING}/measurements?after=garbage", None, 404),
    ("get", f"/v1/kpis/{MISSING}/trend", None, 404),
    ("get", f"/v1/kpis/{MISSING}/trend?period=year", None, 422),
    ("get", f"/v1/kpis/{MISSING}/trend?from=0", None, 422),
    ("get", f"/v1/kpis/{MISSING}/trend?from=0001-01-01", None, 422),
    ("get", f"/v1/kpis/{MISSING}/trend?from=2026-02-01&to=2026-01-01", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast", None, 404),
    ("get", f"/v1/kpis/{MISSING}/forecast?horizon_days=0", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?horizon_days=100000", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?horizon_days=5&until=2030-01-01", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?until=2000-01-01", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?until=9999-12-31", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?as_of=0", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?as_of=2026-01-01T00:00:00", None, 422),
    ("get", f"/v1/kpis/{MISSING}/forecast?as_of=0001-01-01T00:00:00%2B05:00", None, 422),
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
    {"value": 1, "measuredAt": "0001-01-01T00:00:00+05:00"},
    {"value": 1, "measuredAt": "0"},
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
    last = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements", {"value": 75, "measuredAt": day(5)})
    await post(metrics, f"/v1/kpis/{kpi['id']}/targets", {"target": 97, "effectiveFrom": "2026-01-01", "reason": "up"})
    r = await metrics.put(f"/v1/kpis/{kpi['id']}/rules", json={"rules": [FLOOR], "reason": "simpler"})
    assert r.status_code == 200, r.text
    last = r.json()
    await read(metrics, kpi["id"], last)

    def rebuild() -> None:
        ensure_schema(database_url, "metrics_rebuild")
        spec = ProjectionSpec(Metrics, MetricsProjection, MetricsReadModel, "metrics", "metrics_rebuild")
        with ProjectionRunner(application_class=Metrics, projection_class=MetricsProjection,
                              view_class=MetricsReadModel, env=spec.env(database_url)) as runner:
            runner.wait(last["position"], timeout=30)

    await asyncio.to_thread(rebuild)
    with psycopg.connect(database_url) as conn:
        for table, order in [("kpis", "id"), ("measurements", "kpi_id, version"),
                             ("measurement_corrections", "kpi_id, version"), ("kpi_targets", "kpi_id, version")]:
            live, rebuilt = (conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {order}").fetchall()
                             for schema in ("metrics", "metrics_rebuild"))
            assert live == rebuilt and live


async def events_of(database_url: str, kpi_id: str) -> list[Any]:
    return await asyncio.to_thread(contract_events, database_url, kpi_id)


async def test_a_late_measurement_is_judged_in_valid_time(metrics: httpx.AsyncClient, database_url: str) -> None:
    kpi = await define(metrics, {**FLOOR, "pendingCount": 3})
    path = f"/v1/kpis/{kpi['id']}/measurements"
    await post(metrics, path, {"value": 85, "measuredAt": day(1)})
    newest = await post(metrics, path, {"value": 84, "measuredAt": day(3)})
    assert (await read(metrics, kpi["id"], newest))["state"] == "pending"
    late = await post(metrics, path, {"value": 80, "measuredAt": day(2)})
    body = await read(metrics, kpi["id"], late)
    assert (body["state"], body["latestValue"], late["version"]) == ("breached", 84, 5)
    events = await events_of(database_url, kpi["id"])
    assert [e.type for e in events][-2:] == ["KPIMeasured", "KPIThresholdBreached"]
    # Days 1, 2, 3 in valid time: the run of three ends at day 3's measurement, which came before.
    assert events[-1].data["measurement_id"] == events[2].data["measurement_id"]
    assert events[-1].data["measured_at"] == T0 + timedelta(days=3)


async def test_a_repeat_is_no_new_measurement_and_another_value_corrects(
        metrics: httpx.AsyncClient, database_url: str) -> None:
    kpi = await define(metrics, FLOOR)
    path = f"/v1/kpis/{kpi['id']}/measurements"
    first = await post(metrics, path, {"value": 93, "measuredAt": day(1), "source": "pos"})
    again = await post(metrics, path, {"value": 93, "measuredAt": day(1), "source": "pos"})
    assert again["version"] == first["version"] == 2 and again["position"] >= first["position"]
    corrected = await post(metrics, path, {"value": 85, "measuredAt": day(1), "source": "pos"})
    assert corrected["version"] == 4  # KPIMeasurementCorrected and KPIThresholdBreached
    body = await read(metrics, kpi["id"], corrected)
    assert (body["state"], body["latestValue"], body["measurementCount"]) == ("breached", 85, 1)
    [m] = (await metrics.get(path)).json()["items"]
    assert (m["value"], m["source"]) == (85, "pos")
    assert [(c["previousValue"], c["value"], c["actor"], c["version"]) for c in m["corrections"]] == [
        (93, 85, "ada", 3)]
    assert [e.type for e in await events_of(database_url, kpi["id"])] == [
        "KPIDefined", "KPIMeasured", "KPIMeasurementCorrected", "KPIThresholdBreached"]


async def test_corrections_keep_the_history_and_re_decide(metrics: httpx.AsyncClient, database_url: str) -> None:
    kpi = await define(metrics, FLOOR)
    path = f"/v1/kpis/{kpi['id']}/measurements"
    await post(metrics, path, {"value": 93, "measuredAt": day(1)})
    m = await post(metrics, path, {"value": 85, "measuredAt": day(2)})
    assert (await read(metrics, kpi["id"], m))["state"] == "breached"
    [latest, _] = (await metrics.get(path)).json()["items"]
    fix = await post(metrics, f"{path}/{latest['id']}/corrections", {"value": 95, "reason": "typo in the import"},
                     **{"If-Match": '"4"'})
    body = await read(metrics, kpi["id"], fix)
    assert (body["state"], body["latestValue"], body["version"]) == ("ok", 95, 6)
    again = await post(metrics, f"{path}/{latest['id']}/corrections", {"value": 96, "reason": "second look"})
    await read(metrics, kpi["id"], again)
    [m, _] = (await metrics.get(path)).json()["items"]
    assert m["value"] == 96
    assert [(c["previousValue"], c["value"], c["reason"]) for c in m["corrections"]] == [
        (85, 95, "typo in the import"), (95, 96, "second look")]
    stale = await metrics.post(f"{path}/{latest['id']}/corrections", json={"value": 1, "reason": "x"},
                               headers={"If-Match": '"3"'})
    assert stale.status_code == 412
    unknown = await metrics.post(f"{path}/{MISSING}/corrections", json={"value": 1, "reason": "x"})
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert [e.type for e in await events_of(database_url, kpi["id"])][-3:] == [
        "KPIMeasurementCorrected", "KPIRecovered", "KPIMeasurementCorrected"]


async def test_target_changes_keep_their_history(metrics: httpx.AsyncClient, database_url: str) -> None:
    kpi = await define(metrics, FLOOR)
    path = f"/v1/kpis/{kpi['id']}/targets"
    today = datetime.now(UTC).date()
    await post(metrics, path, {"target": 97, "effectiveFrom": (today - timedelta(days=10)).isoformat(),
                               "reason": "raised"})
    future = await post(metrics, path, {"target": 99, "effectiveFrom": (today + timedelta(days=30)).isoformat(),
                                        "reason": "next quarter"}, **{"If-Match": '"2"'})
    body = await read(metrics, kpi["id"], future)
    assert body["target"] == 97  # the future one is not in force yet
    assert [(t["target"], t["effectiveFrom"], t["reason"]) for t in body["targetHistory"]] == [
        (95, None, "defined"), (97, (today - timedelta(days=10)).isoformat(), "raised"),
        (99, (today + timedelta(days=30)).isoformat(), "next quarter")]
    todays = await post(metrics, path, {"target": 96})  # effective today when left out
    assert (await read(metrics, kpi["id"], todays))["target"] == 96
    [changed] = [e for e in await events_of(database_url, kpi["id"]) if e.type == "KPITargetChanged"][:1]
    assert changed.data["target"] == 97 and changed.data["effective_from"] == today - timedelta(days=10)
    stale = await metrics.post(path, json={"target": 1}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412


async def test_revising_rules_re_decides_over_the_measurements(metrics: httpx.AsyncClient,
                                                              database_url: str) -> None:
    kpi = await define(metrics, {**FLOOR, "id": "floor"})
    path = f"/v1/kpis/{kpi['id']}/measurements"
    await post(metrics, path, {"value": 92.2, "measuredAt": day(1)})
    m = await post(metrics, path, {"value": 92, "measuredAt": day(2)})
    assert (await read(metrics, kpi["id"], m))["state"] == "ok"
    rules = {"rules": [{**FLOOR, "id": "floor", "threshold": 92.5, "recovery": None, "pendingCount": 2,
                        "pendingFor": 3600}],
             "reason": "tighter"}
    stale = await metrics.put(f"/v1/kpis/{kpi['id']}/rules", json=rules, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    r = await metrics.put(f"/v1/kpis/{kpi['id']}/rules", json=rules, headers={"If-Match": '"3"'})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 5 and r.headers["ETag"] == '"5"'
    body = await read(metrics, kpi["id"], r.json())
    assert body["state"] == "breached"
    assert [(x["id"], x["threshold"], x["pendingCount"], x["pendingFor"], x["state"]) for x in body["rules"]] == [
        ("floor", 92.5, 2, 3600, "breached")]
    same = await metrics.put(f"/v1/kpis/{kpi['id']}/rules", json=rules)
    assert same.status_code == 200 and same.json()["version"] == 5  # the same rules: nothing appended
    withdrawn = await metrics.put(f"/v1/kpis/{kpi['id']}/rules", json={"rules": []})
    body = await read(metrics, kpi["id"], withdrawn.json())
    assert (body["state"], body["rules"]) == ("ok", [])
    assert [e.type for e in await events_of(database_url, kpi["id"])][-4:] == [
        "KPIRulesRevised", "KPIThresholdBreached", "KPIRecovered", "KPIRulesRevised"]


async def test_idempotency_keys_on_the_new_posts(metrics: httpx.AsyncClient, database_url: str) -> None:
    kpi = await define(metrics, FLOOR)
    base = f"/v1/kpis/{kpi['id']}"
    m = await post(metrics, f"{base}/measurements", {"value": 93, "measuredAt": day(1)})
    [measurement] = (await metrics.get(f"{base}/measurements",
                                       headers={"Tandem-Wait-For": f"metrics={m['position']}"})).json()["items"]
    writes = [
        (f"{base}/targets", {"target": 97, "reason": "once"}),
        (f"{base}/measurements/bulk", {"measurements": [{"value": 94, "measuredAt": day(2)},
                                                        {"value": 95, "measuredAt": day(3)}]}),
        (f"{base}/measurements/{measurement['id']}/corrections", {"value": 92, "reason": "once"}),
        (f"{base}/measurements", {"value": 96}),  # now: a retry without the key would be a second value
    ]
    for n, (path, body) in enumerate(writes):
        key = {"Idempotency-Key": f"{kpi['id']}-{n}"}
        first = await metrics.post(path, json=body, headers=key)
        assert first.status_code == 201, first.text
        retry = await metrics.post(path, json=body, headers=key)
        assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json() == first.json()
        other = await metrics.post(path, json={**body, "extra": 1} if "target" in body else {"value": -1},
                                   headers=key)
        assert other.status_code == 422
    types = [e.type for e in await events_of(database_url, kpi["id"])]
    assert types == ["KPIDefined", "KPIMeasured", "KPITargetChanged", "KPIMeasured", "KPIMeasured",
                     "KPIMeasurementCorrected", "KPIMeasured"]


async def test_measurements_page_with_a_cursor(metrics: httpx.AsyncClient) -> None:
    kpi = await define(metrics, FLOOR)
    bulk = await post(metrics, f"/v1/kpis/{kpi['id']}/measurements/bulk", {"measurements": [
        {"value": 90 + n, "measuredAt": day(n), "source": "a"} for n in range(5)] + [
        {"value": 80, "measuredAt": day(2), "source": "b"}]})
    wait = {"Tandem-Wait-For": f"metrics={bulk['position']}"}
    seen, after = [], None
    while True:
        r = await metrics.get(f"/v1/kpis/{kpi['id']}/measurements", headers=wait,
                              params={"limit": 2, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        seen += [(m["value"], m["source"]) for m in r.json()["items"]]
        after = r.json()["nextCursor"]
        if after is None:
            break
    # Newest valid time first; on the same time, the later arrival first.
    assert seen == [(94, "a"), (93, "a"), (80, "b"), (92, "a"), (91, "a"), (90, "a")]


async def test_owner_and_state_filters(metrics: httpx.AsyncClient) -> None:
    owner = "33333333-3333-3333-3333-333333333333"
    mine = await define(metrics, {**FLOOR, "pendingCount": 2}, ownerId=owner)
    await define(metrics, FLOOR)
    m = await post(metrics, f"/v1/kpis/{mine['id']}/measurements", {"value": 1})
    wait = {"Tandem-Wait-For": f"metrics={m['position']}"}
    owned = (await metrics.get(f"/v1/kpis?owner={owner}", headers=wait)).json()["items"]
    assert [(k["id"], k["state"]) for k in owned] == [(mine["id"], "pending")]
    pending = (await metrics.get(f"/v1/kpis?owner={owner}&state=pending&stale=false")).json()["items"]
    assert [k["id"] for k in pending] == [mine["id"]]
    assert (await metrics.get(f"/v1/kpis?owner={owner}&stale=true")).json()["items"] == []
