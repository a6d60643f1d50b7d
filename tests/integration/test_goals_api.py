"""The goals service in process against real PostgreSQL: REST write -> events in the log ->
projection -> REST read, waiting on the projection's tracking position, never sleeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psycopg
import pytest

from services.goals.api import create_app
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def goals(auth: Callable[..., dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_app()):
        client.headers.update(auth("admin", "ada"))
        yield client


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    r = await client.post(path, json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.headers["Tandem-Position"] == f"goals={r.json()['position']}"
    return r.json()


MISSING = "00000000-0000-0000-0000-000000000000"


async def write(client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None = None,
                status: int = 200, **headers: str) -> dict[str, Any]:
    """A write that must succeed with `status`, answering as every write does."""
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["ETag"] == f'"{r.json()["version"]}"'
    assert r.headers["Tandem-Position"] == f"goals={r.json()['position']}"
    return r.json()


async def read(client: httpx.AsyncClient, path: str, written: dict[str, Any]) -> dict[str, Any]:
    """Read once the read model has caught up with `written` (and everything before it); the
    ETag of a single resource is its version."""
    r = await client.get(path, headers={"Tandem-Wait-For": f"goals={written['position']}"})
    assert r.status_code == 200, r.text
    if "version" in r.json():
        assert r.headers["ETag"] == f'"{r.json()["version"]}"'
    return r.json()


async def seed(client: httpx.AsyncClient) -> dict[str, str]:
    company = await post(client, "/v1/units", {"name": "Acme", "kind": "company"})
    support = await post(client, "/v1/units", {"name": "Support", "kind": "department", "parentId": company["id"]})
    cycle = await post(client, "/v1/cycles", {"name": "Q4", "startsOn": "2026-10-01", "endsOn": "2026-12-31",
                                              "status": "active"})
    objective = await post(client, "/v1/objectives", {
        "title": "Deliver exceptional customer support", "owner": {"kind": "unit", "id": support["id"]},
        "unitId": support["id"], "cycleId": cycle["id"]})
    return {"company": company["id"], "support": support["id"], "cycle": cycle["id"], "objective": objective["id"]}


async def test_check_in_flows_from_write_to_read(goals: httpx.AsyncClient, database_url: str) -> None:
    ids = await seed(goals)
    response_time = await post(goals, f"/v1/objectives/{ids['objective']}/key-results", {
        "title": "Reduce average response time from 8 hours to under 3 hours", "kind": "decrease_to",
        "start": 8, "target": 3, "unit": "h", "weight": 1})
    training = await post(goals, f"/v1/objectives/{ids['objective']}/key-results", {
        "title": "Train the team", "kind": "increase_to", "start": 0, "target": 100, "unit": "%", "weight": 3})
    await post(goals, f"/v1/key-results/{response_time['id']}/check-ins",
               {"value": 5.5, "confidence": 7, "note": "halfway", "validOn": "2026-11-02"},
               **{"X-Correlation-ID": "corr-42"})
    last = await post(goals, f"/v1/key-results/{training['id']}/check-ins", {"value": 60, "confidence": 8})

    r = await goals.get(f"/v1/objectives/{ids['objective']}", headers={"Tandem-Wait-For": f"goals={last['position']}"})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = {kr["title"][:5]: kr["score"] for kr in body["keyResults"]}
    assert scores == {"Reduc": pytest.approx(0.5), "Train": pytest.approx(0.6)}
    # weighted mean: (0.5 * 1 + 0.6 * 3) / 4 = 0.575
    assert body["score"] == pytest.approx(0.575)
    assert body["band"] == "yellow"
    assert r.headers["ETag"] == '"3"'  # created, then each key result attached

    # The check-in is stored by the eventsourcing library with its metadata.
    with psycopg.connect(database_url) as conn:
        topic, state = conn.execute(
            "SELECT topic, state FROM goals.goals_events WHERE originator_id = %s AND originator_version = 2",
            (response_time["id"],)).fetchone()
    stored = json.loads(bytes(state))
    assert topic == "services.goals.domain:KeyResult.Progressed"
    assert stored["meta"]["actor"] == "ada"
    assert stored["meta"]["correlation_id"] == "corr-42"
    assert len(stored["meta"]["trace_id"]) == 32  # the request's trace, kept with the event
    assert stored["valid_on"] == {"_type_": "date_iso", "_data_": "2026-11-02"}
    assert "timestamp" in stored

    history = (await goals.get(f"/v1/key-results/{response_time['id']}/check-ins")).json()["items"]
    assert [(c["value"], c["actor"]) for c in history] == [(5.5, "ada")]


async def test_concurrent_check_ins_all_land_with_contiguous_versions(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    kr = await post(goals, f"/v1/objectives/{ids['objective']}/key-results",
                    {"title": "Count", "kind": "increase_to", "start": 0, "target": 100})
    results = await asyncio.gather(*[
        goals.post(f"/v1/key-results/{kr['id']}/check-ins", json={"value": i}) for i in range(16)])
    assert [r.status_code for r in results] == [201] * 16
    versions = sorted(r.json()["version"] for r in results)
    assert versions == list(range(2, 18))
    top = max(r.json()["position"] for r in results)
    read = (await goals.get(f"/v1/key-results/{kr['id']}", headers={"Tandem-Wait-For": f"goals={top}"})).json()
    assert read["checkInCount"] == 16 and read["version"] == 17


async def test_stale_if_match_gets_412_and_appends_nothing(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    kr = await post(goals, f"/v1/objectives/{ids['objective']}/key-results",
                    {"title": "Done", "kind": "done"})
    ok = await goals.post(f"/v1/key-results/{kr['id']}/check-ins", json={"value": 0}, headers={"If-Match": '"1"'})
    assert ok.status_code == 201 and ok.headers["ETag"] == '"2"'
    stale = await goals.post(f"/v1/key-results/{kr['id']}/check-ins", json={"value": 1}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    assert stale.json()["currentVersion"] == 2
    read = (await goals.get(f"/v1/key-results/{kr['id']}", headers={"Tandem-Wait-For": f"goals={ok.json()['position']}"})).json()
    assert read["version"] == 2 and read["current"] == 0


async def test_alignment_cannot_form_a_cycle(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    child = await post(goals, "/v1/objectives", {
        "title": "Child", "owner": {"kind": "unit", "id": ids["support"]}, "unitId": ids["support"],
        "cycleId": ids["cycle"], "parentId": ids["objective"]})
    r = await goals.put(f"/v1/objectives/{ids['objective']}/alignment", json={"parentId": child["id"]})
    assert r.status_code == 422
    assert "cycle" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/units", {"name": "", "kind": "team"}, 422),
        ("post", "/v1/units", {"name": "X", "kind": "galaxy"}, 422),
        ("post", "/v1/units", {"name": "X", "kind": "team", "surprise": 1}, 422),
        ("post", "/v1/units", {"name": "Orphan team", "kind": "team"}, 422),
        ("post", "/v1/units", {"name": "X", "kind": "team", "parentId": "00000000-0000-0000-0000-000000000000"}, 422),
        ("post", "/v1/cycles", {"name": "Q", "startsOn": "2026-12-31", "endsOn": "2026-10-01"}, 422),
        ("post", "/v1/objectives/00000000-0000-0000-0000-000000000000/key-results",
         {"title": "t", "kind": "done"}, 404),
        ("post", "/v1/key-results/00000000-0000-0000-0000-000000000000/check-ins", {"value": 1}, 404),
        ("get", "/v1/objectives/not-a-uuid", None, 422),
        ("get", "/v1/objectives?after=garbage", None, 422),
        ("get", "/v1/objectives?after=not%20a%20cursor", None, 422),
        ("get", "/v1/units", None, 422),  # with a malformed Tandem-Wait-For, below
    ],
)
async def test_bad_input_gets_problem_details(goals: httpx.AsyncClient, method: str, path: str,
                                              body: dict[str, Any] | None, status: int) -> None:
    headers = {"Tandem-Wait-For": "goals=soon"} if path == "/v1/units" and method == "get" else {}
    r = await goals.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and problem["title"]


async def test_malformed_json_is_a_400(goals: httpx.AsyncClient) -> None:
    r = await goals.post("/v1/units", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"] == "The request body is not valid JSON."


async def test_tokens(goals: httpx.AsyncClient, token: Callable[..., str]) -> None:
    bare = httpx.AsyncClient(transport=goals._transport, base_url=str(goals.base_url))
    async with bare:
        assert (await bare.get("/v1/units")).status_code == 401
        assert (await bare.get("/v1/units", headers={"Authorization": "Bearer nonsense"})).status_code == 401
        auditor = {"Authorization": f"Bearer {token('auditor')}"}
        assert (await bare.get("/v1/units", headers=auditor)).status_code == 200
        r = await bare.post("/v1/units", json={"name": "Acme", "kind": "company"}, headers=auditor)
        assert r.status_code == 403


async def _events_of(database_url: str, aggregate_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM goals.goals_events WHERE originator_id = %s",
                            (aggregate_id,)).fetchone()[0]


async def test_a_retry_with_the_same_idempotency_key_appends_nothing(goals: httpx.AsyncClient, database_url: str) -> None:
    ids = await seed(goals)
    kr = await post(goals, f"/v1/objectives/{ids['objective']}/key-results",
                    {"title": "Count", "kind": "increase_to", "start": 0, "target": 10})
    body = {"value": 3, "confidence": 5, "note": "first"}
    first = await goals.post(f"/v1/key-results/{kr['id']}/check-ins", json=body, headers={"Idempotency-Key": "ci-1"})
    again = await goals.post(f"/v1/key-results/{kr['id']}/check-ins", content=json.dumps(body, indent=2),
                             headers={"Idempotency-Key": "ci-1", "content-type": "application/json"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.headers["ETag"] == first.headers["ETag"] and again.headers["Tandem-Position"] == first.headers["Tandem-Position"]
    assert await _events_of(database_url, kr["id"]) == 2  # created + one check-in

    other = await goals.post(f"/v1/key-results/{kr['id']}/check-ins", json={"value": 4}, headers={"Idempotency-Key": "ci-1"})
    assert other.status_code == 422 and other.json()["type"].endswith("/idempotency-key-reused")
    assert await _events_of(database_url, kr["id"]) == 2


async def test_racing_twins_with_one_key_write_once(goals: httpx.AsyncClient, database_url: str) -> None:
    ids = await seed(goals)
    body = {"title": "Twin", "kind": "done"}
    answers = await asyncio.gather(*[
        goals.post(f"/v1/objectives/{ids['objective']}/key-results", json=body, headers={"Idempotency-Key": "twin-7"})
        for _ in range(8)])
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 7
    assert await _events_of(database_url, answers[0].json()["id"]) == 1


async def test_keys_belong_to_their_caller(goals: httpx.AsyncClient, auth: Callable[..., dict[str, str]]) -> None:
    body = {"name": "Acme", "kind": "company"}
    mine = await goals.post("/v1/units", json=body, headers={"Idempotency-Key": "u-1"})
    theirs = await goals.post("/v1/units", json=body, headers={**auth("admin", "grace"), "Idempotency-Key": "u-1"})
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]
    bad = await goals.post("/v1/units", json=body, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 422
