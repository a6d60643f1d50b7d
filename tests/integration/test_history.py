"""Aggregate histories over REST (`GET .../{id}/history` on goals and metrics), in process against
real PostgreSQL: who recorded each event, when (recorded and valid time), why, within which
request and trace, and what it changed; pages, unknown ids and who may read them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from services.goals.api import create_app as create_goals
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import refused, serve_in_process
from tests.integration.test_goals_api import MISSING, post, seed, write

pytestmark = pytest.mark.asyncio(loop_scope="session")

Headers = Callable[..., dict[str, str]]


@pytest.fixture(scope="module")
async def goals(auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_goals()):
        client.headers.update(auth("admin", "ada"))
        yield client


@pytest.fixture(scope="module")
async def metrics(auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_metrics(MetricsSettings(run_staleness_watch=False))):
        client.headers.update(auth("admin", "ada"))
        yield client


async def history(client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    r = await client.get(f"{path}/history", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def everything(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    return (await history(client, path, headers, limit=200))["items"]


def traced(trace_id: str, correlation_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", "X-Correlation-ID": correlation_id}


async def test_an_objective_shows_who_changed_what_within_which_request(goals: httpx.AsyncClient,
                                                                       auth: Headers) -> None:
    ids = await seed(goals)
    objective = f"/v1/objectives/{ids['objective']}"
    trace_id = uuid.uuid4().hex
    await write(goals, "PATCH", objective, {"title": "Answer every customer within a day", "description": "Fast"},
                **auth("admin", "grace"), **traced(trace_id, "corr-history-1"))  # a member must be a person

    created, updated = await everything(goals, objective, auth("auditor", "ida"))
    assert (created["type"], created["version"], created["actor"]) == ("ObjectiveCreated", 1, "ada")
    assert created["validAt"] is None and created["reason"] is None and created["causationId"] is None
    assert created["data"]["title"] == "Deliver exceptional customer support"
    assert created["data"]["unit_id"] == ids["support"]  # UUIDs as text, fields by the contract's names
    assert {"field": "title", "from": None, "to": "Deliver exceptional customer support"} in created["changes"]
    assert {"field": "status", "from": None, "to": "active"} in created["changes"]

    assert (updated["type"], updated["version"], updated["actor"]) == ("ObjectiveUpdated", 2, "grace")
    assert (updated["correlationId"], updated["traceId"]) == ("corr-history-1", trace_id)
    assert updated["changes"] == [
        {"field": "title", "from": "Deliver exceptional customer support", "to": "Answer every customer within a day"},
        {"field": "description", "from": "", "to": "Fast"},
    ]
    assert datetime.fromisoformat(created["recordedAt"]) <= datetime.fromisoformat(updated["recordedAt"])
    # A request without a correlation id gets one of its own.
    assert created["correlationId"] and created["correlationId"] != "corr-history-1"


async def test_a_regrade_says_why(goals: httpx.AsyncClient, auth: Headers) -> None:
    ids = await seed(goals)
    cycle = await post(goals, "/v1/cycles", {"name": "Q3", "startsOn": "2026-07-01", "endsOn": "2026-09-30",
                                             "status": "active"})
    graded = await post(goals, "/v1/objectives", {
        "title": "Halve the backlog", "owner": {"kind": "unit", "id": ids["support"]}, "unitId": ids["support"],
        "cycleId": cycle["id"]})
    await write(goals, "POST", f"/v1/cycles/{cycle['id']}/close")
    await write(goals, "POST", f"/v1/objectives/{graded['id']}/regrade",
                {"finalScore": 0.7, "reason": "The last week's tickets were counted late"})

    *_, grade, regrade = await everything(goals, f"/v1/objectives/{graded['id']}", auth("auditor"))
    assert (grade["type"], grade["reason"]) == ("ObjectiveGraded", "graded when the cycle closed")
    assert {"field": "graded", "from": False, "to": True} in grade["changes"]
    assert regrade["type"] == "ObjectiveRegraded"
    assert regrade["reason"] == "The last week's tickets were counted late"
    assert regrade["data"] == {"final_score": 0.7, "reason": "The last week's tickets were counted late"}
    assert regrade["changes"] == [
        {"field": "final_score", "from": None, "to": 0.7},
        {"field": "grade_reason", "from": "graded when the cycle closed",
         "to": "The last week's tickets were counted late"},
    ]


async def test_a_check_in_carries_its_valid_time(goals: httpx.AsyncClient, auth: Headers) -> None:
    ids = await seed(goals)
    kr = await post(goals, f"/v1/objectives/{ids['objective']}/key-results", {
        "title": "Reduce response time from 8 h to 3 h", "kind": "decrease_to", "start": 8, "target": 3, "unit": "h"})
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins",
               {"value": 5.5, "confidence": 7, "note": "halfway", "validOn": "2026-01-15"},
               **{"X-Correlation-ID": "corr-check-in"})
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 6, "validOn": "2026-01-10"})

    created, first, late = await everything(goals, f"/v1/key-results/{kr['id']}", auth("service", "robot"))
    assert (created["type"], created["validAt"]) == ("KeyResultCreated", None)
    assert (first["type"], first["validAt"], first["correlationId"]) == (
        "KeyResultProgressed", "2026-01-15", "corr-check-in")
    assert first["data"] == {"value": 5.5, "confidence": 7, "note": "halfway", "valid_on": "2026-01-15",
                             "measurement_id": None}
    assert {"field": "current", "from": None, "to": 5.5} in first["changes"]
    assert {"field": "current_valid_on", "from": None, "to": "2026-01-15"} in first["changes"]
    # A check-in for an earlier day is recorded, but the current value stays the later day's.
    assert late["validAt"] == "2026-01-10"
    assert [c["field"] for c in late["changes"]] == ["check_in_count"]
    assert datetime.fromisoformat(late["recordedAt"]) >= datetime.fromisoformat(first["recordedAt"])


async def test_people_and_units_have_histories(goals: httpx.AsyncClient, auth: Headers) -> None:
    ids = await seed(goals)
    person = await post(goals, "/v1/people", {"name": "Lin", "email": "lin@example.com", "unitId": ids["company"],
                                              "joinedOn": "2026-01-05"})
    await write(goals, "PUT", f"/v1/people/{person['id']}/unit",
                {"unitId": ids["support"], "effectiveOn": "2026-03-01"})
    await write(goals, "PUT", f"/v1/units/{ids['support']}/name", {"name": "Customer Care"})

    joined, moved = await everything(goals, f"/v1/people/{person['id']}", auth("auditor"))
    assert (joined["type"], joined["validAt"]) == ("PersonJoined", "2026-01-05")
    assert (moved["type"], moved["validAt"]) == ("PersonMovedUnit", "2026-03-01")
    assert {"field": "unit_id", "from": ids["company"], "to": ids["support"]} in moved["changes"]
    assert {"field": "units[1]", "from": None,
            "to": {"unit_id": ids["support"], "effective_on": "2026-03-01"}} in moved["changes"]

    created, renamed = await everything(goals, f"/v1/units/{ids['support']}", auth("member"))
    assert (created["type"], renamed["type"]) == ("OrgUnitCreated", "OrgUnitRenamed")
    assert renamed["changes"] == [{"field": "name", "from": "Support", "to": "Customer Care"}]


async def test_pages_run_by_version(goals: httpx.AsyncClient, auth: Headers) -> None:
    ids = await seed(goals)
    objective = f"/v1/objectives/{ids['objective']}"
    for n in range(4):
        await post(goals, f"{objective}/key-results", {"title": f"Result {n}", "kind": "done"})
    await write(goals, "PATCH", objective, {"title": "Renamed"})
    whole = await everything(goals, objective, auth("auditor"))
    assert [e["version"] for e in whole] == [1, 2, 3, 4, 5, 6]

    pages, after = [], None
    while True:
        page = await history(goals, objective, auth("auditor"), limit=4, **({"after": after} if after else {}))
        pages.append(page["items"])
        after = page["nextCursor"]
        if after is None:
            break
    assert [len(p) for p in pages] == [4, 2]
    assert [e for p in pages for e in p] == whole  # a later page's changes are those of the whole replay
    assert pages[1][1]["changes"] == [{"field": "title", "from": "Deliver exceptional customer support",
                                       "to": "Renamed"}]
    exact = await history(goals, objective, auth("auditor"), limit=6)
    assert exact["nextCursor"] is None and len(exact["items"]) == 6
    attached = whole[1]
    assert attached["type"] == "ObjectiveKeyResultAttached"
    assert [c["field"] for c in attached["changes"]] == ["key_result_ids[0]"]

    await refused(goals, "GET", f"{objective}/history?after=bm90LWEtY3Vyc29y", None, 422)
    await refused(goals, "GET", f"{objective}/history?limit=0", None, 422)


async def test_unknown_ids_and_ids_of_another_kind_are_404(goals: httpx.AsyncClient, metrics: httpx.AsyncClient,
                                                          auth: Headers) -> None:
    ids = await seed(goals)
    auditor = auth("auditor")
    for path in [f"/v1/objectives/{MISSING}", f"/v1/key-results/{ids['objective']}", f"/v1/people/{ids['company']}",
                 f"/v1/units/{ids['objective']}", f"/v1/objectives/{ids['cycle']}"]:
        problem = await refused(goals, "GET", f"{path}/history", None, 404, **auditor)
        assert problem["title"] == "Not Found"
    await refused(goals, "GET", "/v1/objectives/not-a-uuid/history", None, 422, **auditor)
    await refused(metrics, "GET", f"/v1/kpis/{MISSING}/history", None, 404, **auditor)


async def test_who_may_read_histories(goals: httpx.AsyncClient, metrics: httpx.AsyncClient, auth: Headers) -> None:
    ids = await seed(goals)
    kpi = await post_kpi(metrics)
    paths = [(goals, f"/v1/objectives/{ids['objective']}/history"), (metrics, f"/v1/kpis/{kpi['id']}/history")]
    for client, path in paths:
        for role in ("admin", "member", "auditor", "service"):
            assert (await client.get(path, headers=auth(role))).status_code == 200, role
        problem = await refused(client, "GET", path, None, 403, **auth("hr_sync"))
        assert problem["title"] == "Forbidden"
        r = await client.get(path, headers={"Authorization": ""})
        assert r.status_code == 401


async def post_kpi(metrics: httpx.AsyncClient, **headers: str) -> dict[str, Any]:
    r = await metrics.post("/v1/kpis", headers=headers, json={
        "name": "CSAT", "unit": "%", "direction": "higher_is_better", "cadence": "daily", "target": 90,
        "rules": [{"id": "floor", "kind": "below", "threshold": 80, "severity": "critical"}]})
    assert r.status_code == 201, r.text
    return r.json()


async def test_a_kpis_history(metrics: httpx.AsyncClient, auth: Headers) -> None:
    trace_id = uuid.uuid4().hex
    kpi = await post_kpi(metrics, **traced(trace_id, "corr-kpi"))
    path = f"/v1/kpis/{kpi['id']}"
    r = await metrics.post(f"{path}/targets", json={"target": 95, "effectiveFrom": "2026-04-01",
                                                    "reason": "The board raised the bar"},
                           headers={"X-Correlation-ID": "corr-target"})
    assert r.status_code == 201, r.text
    r = await metrics.post(f"{path}/measurements", json={"value": 70, "measuredAt": "2026-02-03T10:00:00Z"},
                           headers=auth("service", "ingest"))
    assert r.status_code == 201, r.text

    defined, target, measured, breached = await everything(metrics, path, auth("auditor"))
    assert (defined["type"], defined["actor"], defined["correlationId"], defined["traceId"]) == (
        "KPIDefined", "ada", "corr-kpi", trace_id)
    assert {"field": "target", "from": None, "to": 90} in defined["changes"]

    assert (target["type"], target["reason"], target["validAt"]) == (
        "KPITargetChanged", "The board raised the bar", "2026-04-01")
    assert target["correlationId"] == "corr-target"
    assert target["changes"] == [{"field": "targets[1]", "from": None, "to": {
        "target": 95, "effective_from": "2026-04-01", "reason": "The board raised the bar"}}]

    assert (measured["type"], measured["actor"]) == ("KPIMeasured", "ingest")
    assert datetime.fromisoformat(measured["validAt"]) == datetime.fromisoformat("2026-02-03T10:00:00+00:00")
    assert measured["data"]["value"] == 70
    assert "series.items[0]" in [c["field"] for c in measured["changes"]]

    assert breached["type"] == "KPIThresholdBreached"
    assert breached["changes"] == [{"field": "breached", "from": [], "to": ["floor"]}]
    assert breached["correlationId"] == measured["correlationId"]  # written by the same request
