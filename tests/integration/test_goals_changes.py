"""What HR systems pull from goals, with the goals and metrics services in process on a database
of this module's own: the changes feed (both logs merged in recorded-time order, paged by a
cursor that gives the same items after a restart) and a person's goals for a review."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
from asgi_lifespan import LifespanManager

from services.contracts import CONTRACTS
from services.goals.api import create_app as create_goals
from services.goals.feeds import FEED_EVENT_TYPES, INTERNAL_TOPICS, METRICS_EVENT_TYPES, FeedPosition, merge
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import ok, serve_in_process

Headers = Callable[..., dict[str, str]]
TODAY = date.today()
RANK = {"goals": 0, "metrics": 1}


@asynccontextmanager
async def serve_goals(database_url: str, headers: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_goals(GoalsSettings(DATABASE_URL=database_url, run_webhook_worker=False))
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver",
                                     headers=headers) as client:
            yield client


@pytest.fixture(scope="module")
async def goals(own_database: str, auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_goals(own_database, auth("admin", "ada")) as client:
        yield client


@pytest.fixture(scope="module")
async def metrics(own_database: str, auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    app = create_metrics(MetricsSettings(DATABASE_URL=own_database, run_staleness_watch=False))
    async for client in serve_in_process(app):
        client.headers.update(auth("admin", "ada"))
        yield client


async def problem(client: httpx.AsyncClient, path: str, status: int, **headers: str) -> dict[str, Any]:
    r = await client.get(path, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return r.json()


def logged(database_url: str) -> list[dict[str, Any]]:
    """Every event of both logs straight from their tables, in the order the feed promises:
    recorded time, then goals before metrics, then position (webhook configuration left out)."""
    out = []
    with psycopg.connect(database_url) as conn:
        for log in RANK:
            for position, topic, state in conn.execute(
                    f"SELECT notification_id, topic, state FROM {log}.{log}_events ORDER BY notification_id"):
                if topic in INTERNAL_TOPICS:
                    continue
                decoded = json.loads(bytes(state))
                out.append({"id": f"{log}:{position}", "log": log, "position": position,
                            "type": "".join(topic.split(":")[1].split(".")), "state": decoded,
                            "at": datetime.fromisoformat(decoded["timestamp"]["_data_"])})
    return sorted(out, key=lambda e: (e["at"], RANK[e["log"]], e["position"]))


async def pages(client: httpx.AsyncClient, limit: int, after: str | None = None,
                **params: str) -> list[tuple[str | None, dict[str, Any]]]:
    """Every page from `after` to the end: (the cursor asked with, the page)."""
    out = []
    while True:
        query = {"limit": str(limit), **params, **({"after": after} if after else {})}
        page = await ok(client, "GET", "/v1/changes?" + "&".join(f"{k}={v}" for k, v in query.items()))
        out.append((after, page))
        after = page["nextCursor"]
        if not page["hasMore"]:
            return out


def ids(page_list: list[tuple[str | None, dict[str, Any]]]) -> list[str]:
    return [item["id"] for _, page in page_list for item in page["items"]]


def decoded(cursor: str) -> str:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()


async def seed_both_logs(goals: httpx.AsyncClient, metrics: httpx.AsyncClient) -> dict[str, Any]:
    """Writes that alternate between the two services, so the logs interleave in time."""
    unit = await ok(goals, "POST", "/v1/units", {"name": "Acme", "kind": "company"}, 201)
    kpi = await ok(metrics, "POST", "/v1/kpis", {
        "name": "CSAT", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
        "rules": [{"id": "floor", "kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}]}, 201)
    cycle = await ok(goals, "POST", "/v1/cycles", {
        "name": "Now", "startsOn": (TODAY - timedelta(days=30)).isoformat(),
        "endsOn": (TODAY + timedelta(days=60)).isoformat(), "status": "active"}, 201)
    at = datetime.now(UTC) - timedelta(hours=2)
    await ok(metrics, "POST", f"/v1/kpis/{kpi['id']}/measurements",
             {"value": 80, "measuredAt": at.isoformat(), "source": "test"}, 201)
    objective = await ok(goals, "POST", "/v1/objectives", {
        "title": "Delight customers", "owner": {"kind": "unit", "id": unit["id"]}, "unitId": unit["id"],
        "cycleId": cycle["id"]}, 201)
    await ok(metrics, "POST", f"/v1/kpis/{kpi['id']}/measurements",
             {"value": 95, "measuredAt": (at + timedelta(hours=1)).isoformat(), "source": "test"}, 201)
    kr = await ok(goals, "POST", f"/v1/objectives/{objective['id']}/key-results",
                  {"title": "Increase CSAT to 100", "kind": "increase_to", "start": 0, "target": 100}, 201)
    check_in = await ok(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins",
                        {"value": 42, "confidence": 7, "note": "halfway"}, 201, **{"X-Correlation-ID": "check-in-42"})
    return {"unit": unit, "kpi": kpi, "cycle": cycle, "objective": objective, "kr": kr, "check_in": check_in}


# The changes feed ---------------------------------------------------------------------------------

async def test_the_feed_merges_both_logs_in_recorded_time_order_and_pages_stably(
        goals: httpx.AsyncClient, metrics: httpx.AsyncClient, own_database: str, auth: Headers) -> None:
    seeded = await seed_both_logs(goals, metrics)
    truth = logged(own_database)
    assert {e["log"] for e in truth} == {"goals", "metrics"}
    switches = sum(1 for a, b in zip(truth, truth[1:], strict=False) if a["log"] != b["log"])
    assert switches >= 6, "the writes alternate between the services, so the merged feed must too"

    whole = await pages(goals, 1000)
    small = await pages(goals, 3)
    assert ids(whole) == ids(small) == [e["id"] for e in truth]
    assert all(page["hasMore"] for _, page in small[:-1]) and not small[-1][1]["hasMore"]
    for log in RANK:  # each log in its own order, nothing skipped
        positions = [int(i.split(":")[1]) for i in ids(small) if i.startswith(log)]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)

    # What an item says: the event as its contract describes it, with who, when and why.
    items = {item["id"]: item for _, page in whole for item in page["items"]}
    check_in = items[f"goals:{seeded['check_in']['position']}"]
    assert (check_in["type"], check_in["log"], check_in["aggregateId"], check_in["version"]) == (
        "KeyResultProgressed", "goals", seeded["kr"]["id"], seeded["check_in"]["version"])
    assert check_in["data"]["value"] == 42 and check_in["data"]["valid_on"] == {"_type_": "date_iso",
                                                                               "_data_": TODAY.isoformat()}
    assert (check_in["meta"]["actor"], check_in["meta"]["correlation_id"]) == ("ada", "check-in-42")
    assert check_in["contract"].endswith("/events/goals/KeyResultProgressed.v2.json")
    for event in truth:
        item = items[event["id"]]
        assert {**item["data"], "meta": item["meta"]} == event["state"]
        assert datetime.fromisoformat(item["recordedAt"]) == event["at"]
        name = item["contract"].rsplit("/events/", 1)[1]
        jsonschema.validate({**item["data"], "meta": item["meta"]}, json.loads((CONTRACTS / "events" / name).read_text()))

    # The same cursor gives the same page after a restart (the cursor is log positions, not
    # anything the process or a read model holds).
    hr = auth("hr_sync", "workday")
    async with serve_goals(own_database, hr) as restarted:
        for cursor, page in small:
            query = "/v1/changes?limit=3" + (f"&after={cursor}" if cursor else "")
            assert await ok(restarted, "GET", query) == page

        # At the end: nothing, and the same cursor back; a new event comes exactly once.
        end = small[-1][1]["nextCursor"]
        assert await ok(restarted, "GET", f"/v1/changes?after={end}") == {"items": [], "nextCursor": end,
                                                                          "hasMore": False}
        more = await ok(goals, "POST", f"/v1/key-results/{seeded['kr']['id']}/check-ins", {"value": 50}, 201)
        after_end = await ok(restarted, "GET", f"/v1/changes?after={end}")
        assert [i["id"] for i in after_end["items"]] == [f"goals:{more['position']}"]
        assert (await ok(restarted, "GET", f"/v1/changes?after={after_end['nextCursor']}"))["items"] == []


async def test_a_type_filter_keeps_order_and_moves_the_cursor_past_the_rest(
        goals: httpx.AsyncClient, metrics: httpx.AsyncClient, own_database: str) -> None:
    seeded = await seed_both_logs(goals, metrics)
    wanted = {"KPIMeasured", "KeyResultProgressed", "KPIThresholdBreached", "KPIRecovered"}
    filtered = await pages(goals, 2, types=",".join(sorted(wanted)))
    assert ids(filtered) == [e["id"] for e in logged(own_database) if e["type"] in wanted]
    assert {"KPIThresholdBreached", "KPIRecovered"} <= {i["type"] for _, p in filtered for i in p["items"]}

    # Past the last match, events of other types move the cursor on without showing.
    end = filtered[-1][1]["nextCursor"]
    renamed = await ok(goals, "PATCH", f"/v1/objectives/{seeded['objective']['id']}", {"title": "Delight users"})
    page = await ok(goals, "GET", f"/v1/changes?after={end}&types=KeyResultProgressed")
    assert page["items"] == [] and not page["hasMore"]
    assert decoded(page["nextCursor"]).startswith(f"goals={renamed['position']},")


async def test_bad_feed_requests_are_refused_with_problem_details(goals: httpx.AsyncClient, auth: Headers) -> None:
    await problem(goals, "/v1/changes?after=not-a-cursor", 422)
    await problem(goals, "/v1/changes?after=" + FeedPosition(10**12, 0).encode(), 422)
    await problem(goals, "/v1/changes?after=" + base64.urlsafe_b64encode(b"goals=1").decode().rstrip("="), 422)
    unknown = await problem(goals, "/v1/changes?types=KeyResultProgressed,KeyResultProgresed", 422)
    assert "KeyResultProgresed" in unknown["detail"]
    await problem(goals, "/v1/changes?types=Key-Result", 422)
    await problem(goals, "/v1/changes?limit=0", 422)
    await problem(goals, "/v1/changes?limit=1001", 422)
    r = await goals.get("/v1/changes", headers={"Authorization": ""})
    assert r.status_code == 401
    for role in ("hr_sync", "auditor", "member"):
        assert (await goals.get("/v1/changes?limit=1", headers=auth(role))).status_code == 200


def test_the_metrics_event_types_are_those_of_the_metrics_contract() -> None:
    """Goals knows the metrics log's types from the contract, not from the metrics classes."""
    committed = {p.name.split(".")[0] for p in (CONTRACTS / "events" / "metrics").glob("*.json")}
    assert METRICS_EVENT_TYPES == committed
    assert {"KeyResultProgressed", "ObjectiveClosed", "KPIThresholdBreached", "KPIRecovered"} <= FEED_EVENT_TYPES
    assert not any(t.startswith("Webhook") for t in FEED_EVENT_TYPES)


def test_the_merge_takes_each_log_from_its_front_only() -> None:
    """A log whose own events are out of recorded-time order (two writers racing to commit)
    still comes in position order: the merge compares fronts, never reorders a log."""
    from services.goals.feeds import ChangeOut

    def item(log: str, position: int, second: int) -> ChangeOut:
        return ChangeOut(id=f"{log}:{position}", log=log, position=position, type="T",
                         aggregate_id="00000000-0000-0000-0000-000000000000", version=1,
                         recorded_at=datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC), contract="c", data={}, meta={})

    goals_log = [item("goals", 1, 5), item("goals", 2, 3), item("goals", 3, 9)]
    metrics_log = [item("metrics", 1, 4), item("metrics", 2, 5), item("metrics", 3, 8)]
    merged = [i.id for i in merge({"goals": goals_log, "metrics": metrics_log}, 10)]
    assert merged == ["metrics:1", "goals:1", "goals:2", "metrics:2", "metrics:3", "goals:3"]
    assert [i.id for i in merge({"goals": goals_log, "metrics": metrics_log}, 2)] == merged[:2]
    assert FeedPosition.decode(FeedPosition(42, 7).encode()) == FeedPosition(42, 7)
    assert decoded(FeedPosition(42, 7).encode()) == "goals=42,metrics=7"


# A person's goals ---------------------------------------------------------------------------------

async def test_a_persons_goals_for_a_review(goals: httpx.AsyncClient, auth: Headers) -> None:
    unit = await ok(goals, "POST", "/v1/units", {"name": "People Co", "kind": "company"}, 201)
    grace = await ok(goals, "POST", "/v1/people", {"name": "Grace", "email": "grace@example.com",
                                                   "unitId": unit["id"]}, 201)
    alan = await ok(goals, "POST", "/v1/people", {"name": "Alan", "email": "alan@example.com",
                                                  "unitId": unit["id"]}, 201)
    span = {"startsOn": (TODAY - timedelta(days=30)).isoformat(), "endsOn": (TODAY + timedelta(days=60)).isoformat(),
            "status": "active"}
    this = await ok(goals, "POST", "/v1/cycles", {"name": "This quarter", **span}, 201)
    other = await ok(goals, "POST", "/v1/cycles", {"name": "Other quarter", **span}, 201)

    async def objective(title: str, owner: dict[str, str], cycle: dict[str, Any]) -> dict[str, Any]:
        return await ok(goals, "POST", "/v1/objectives", {"title": title, "owner": owner, "unitId": unit["id"],
                                                          "cycleId": cycle["id"]}, 201)

    mine = {"kind": "person", "id": grace["id"]}
    first = await objective("Ship the compiler", mine, this)
    second = await objective("Grow the team", mine, this)
    later = await objective("Write the manual", mine, other)
    await objective("Alan's own", {"kind": "person", "id": alan["id"]}, this)
    await objective("The unit's", {"kind": "unit", "id": unit["id"]}, this)
    kr = await ok(goals, "POST", f"/v1/objectives/{first['id']}/key-results",
                  {"title": "Pass 100 tests", "kind": "increase_to", "start": 0, "target": 100}, 201)
    await ok(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins", {"value": 30, "confidence": 6}, 201)
    checked = await ok(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins", {"value": 60, "note": "typo"}, 201)
    fixed = await ok(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/{checked['version']}/corrections",
                     {"value": 50}, 201)
    wait = {"Tandem-Wait-For": f"goals={fixed['position']}"}

    review = await ok(goals, "GET", f"/v1/people/{grace['id']}/goals?cycle={this['id']}", **wait)
    assert review["person"]["id"] == grace["id"] and review["cycle"]["id"] == this["id"]
    assert [o["id"] for o in review["objectives"]] == [first["id"], second["id"]]
    [shown] = review["objectives"][0]["keyResults"]
    assert (shown["current"], shown["score"], shown["band"]) == (50, pytest.approx(0.5), "yellow")
    assert review["objectives"][0]["score"] == pytest.approx(0.5)
    assert [(c["value"], c["correctsVersion"], c["correctedBy"]) for c in shown["checkIns"]] == [
        (30, None, None), (60, None, fixed["version"]), (50, checked["version"], None)]
    assert review["objectives"][1]["keyResults"] == [] and review["nextCursor"] is None

    # Every cycle, a page at a time; HR's own role may read it.
    everything = await ok(goals, "GET", f"/v1/people/{grace['id']}/goals?limit=2", **wait, **auth("hr_sync"))
    assert [o["id"] for o in everything["objectives"]] == [first["id"], second["id"]] and everything["cycle"] is None
    rest = await ok(goals, "GET", f"/v1/people/{grace['id']}/goals?limit=2&after={everything['nextCursor']}", **wait)
    assert [o["id"] for o in rest["objectives"]] == [later["id"]] and rest["nextCursor"] is None

    await problem(goals, "/v1/people/00000000-0000-4000-8000-000000000000/goals", 404, **wait)
    bad_cycle = await problem(goals, f"/v1/people/{grace['id']}/goals?cycle=00000000-0000-4000-8000-000000000000",
                              422, **wait)
    assert bad_cycle["errors"][0]["field"] == "cycle"
    await problem(goals, f"/v1/people/{grace['id']}/goals?cycle=not-a-uuid", 422)
    await problem(goals, f"/v1/people/{grace['id']}/goals?after=***", 422)
