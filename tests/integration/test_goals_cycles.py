"""Cycles over REST against real PostgreSQL: nesting, activation, closing (grading and frozen
check-ins), regrading and carrying an objective over into the next cycle."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import refused
from tests.integration import test_goals_api
from tests.integration.test_goals_api import MISSING, post, read, write

pytestmark = pytest.mark.asyncio(loop_scope="session")
goals = test_goals_api.goals  # the fixture: each module serves its own app


async def cycle(client: httpx.AsyncClient, name: str, starts_on: str, ends_on: str, **fields: Any) -> dict[str, Any]:
    return await post(client, "/v1/cycles", {"name": f"{name} {uuid.uuid4().hex[:6]}", "startsOn": starts_on,
                                             "endsOn": ends_on, **fields})


async def test_years_hold_their_quarters(goals: httpx.AsyncClient) -> None:
    year = await cycle(goals, "2027", "2027-01-01", "2027-12-31")
    q1 = await cycle(goals, "Q1", "2027-01-01", "2027-03-31", parentId=year["id"])
    q2 = await cycle(goals, "Q2", "2027-04-01", "2027-06-30", parentId=year["id"], kind="quarter", status="active")
    y = await read(goals, f"/v1/cycles/{year['id']}", q2)
    assert (y["kind"], y["parentId"], y["status"]) == ("year", None, "planning")
    quarters = await read(goals, f"/v1/cycles?parent={year['id']}", q2)
    assert [(c["id"], c["kind"], c["status"]) for c in quarters["items"]] == [
        (q1["id"], "quarter", "planning"), (q2["id"], "quarter", "active")]
    active = await read(goals, f"/v1/cycles?parent={year['id']}&status=active&kind=quarter", q2)
    assert [c["id"] for c in active["items"]] == [q2["id"]]

    await refused(goals, "POST", "/v1/cycles", {"name": "Q5", "startsOn": "2028-01-01", "endsOn": "2028-03-31",
                                                "parentId": year["id"]}, 422)  # outside its year
    await refused(goals, "POST", "/v1/cycles", {"name": "Q", "startsOn": "2027-01-01", "endsOn": "2027-03-31",
                                                "parentId": q1["id"]}, 422)  # the parent is not a year
    await refused(goals, "POST", "/v1/cycles", {"name": "Q", "startsOn": "2027-01-01", "endsOn": "2027-03-31",
                                                "kind": "fortnight"}, 422)

    await refused(goals, "POST", f"/v1/cycles/{q1['id']}/activate", None, 412, **{"If-Match": '"2"'})
    activated = await write(goals, "POST", f"/v1/cycles/{q1['id']}/activate", None, **{"If-Match": '"1"'})
    assert activated["version"] == 2
    await refused(goals, "POST", f"/v1/cycles/{q1['id']}/activate", None, 422)  # already active
    await refused(goals, "POST", f"/v1/cycles/{MISSING}/activate", None, 404)
    await refused(goals, "POST", f"/v1/cycles/{MISSING}/close", None, 404)
    await refused(goals, "GET", f"/v1/cycles/{MISSING}", None, 404)


async def quarter_with_objective(client: httpx.AsyncClient) -> dict[str, Any]:
    """A company in an active quarter with one objective of two key results scored 0.5 and 1.0,
    and an archived objective besides."""
    unit = await post(client, "/v1/units", {"name": "Acme", "kind": "company"})
    q = await cycle(client, "Q3", "2026-07-01", "2026-09-30", status="active")
    owner = {"kind": "unit", "id": unit["id"]}
    objective = await post(client, "/v1/objectives", {"title": "Grow", "description": "Grow the business",
                                                      "owner": owner, "unitId": unit["id"], "cycleId": q["id"]})
    archived = await post(client, "/v1/objectives", {"title": "Shelved", "owner": owner, "unitId": unit["id"],
                                                     "cycleId": q["id"]})
    await write(client, "POST", f"/v1/objectives/{archived['id']}/archive")
    revenue = await post(client, f"/v1/objectives/{objective['id']}/key-results", {
        "title": "Increase revenue from 4M to 5M", "kind": "increase_to", "start": 4e6, "target": 5e6,
        "unit": "USD", "weight": 2})
    launch = await post(client, f"/v1/objectives/{objective['id']}/key-results", {
        "title": "Open the Berlin office", "kind": "milestones",
        "milestones": [{"title": "Lease", "weight": 1}, {"title": "Hire", "weight": 3}]})
    await post(client, f"/v1/key-results/{revenue['id']}/check-ins", {"value": 4.5e6, "validOn": "2026-08-15"})
    await post(client, f"/v1/key-results/{launch['id']}/check-ins", {"value": 2, "validOn": "2026-08-20"})
    return {"unit": unit["id"], "cycle": q["id"], "objective": objective["id"], "archived": archived["id"],
            "revenue": revenue["id"], "launch": launch["id"]}


async def test_closing_grades_and_freezes(goals: httpx.AsyncClient) -> None:
    ids = await quarter_with_objective(goals)
    closed = await write(goals, "POST", f"/v1/cycles/{ids['cycle']}/close", None, **{"Idempotency-Key": "close-q3"})
    assert (await read(goals, f"/v1/cycles/{ids['cycle']}", closed))["status"] == "closed"

    o = await read(goals, f"/v1/objectives/{ids['objective']}", closed)
    # (0.5 * 2 + 1.0 * 1) / 3
    assert (o["status"], o["graded"], o["finalScore"]) == ("closed", True, pytest.approx(2 / 3))
    assert o["gradeReason"] == "graded when the cycle closed"
    shelved = await read(goals, f"/v1/objectives/{ids['archived']}", closed)
    assert (shelved["status"], shelved["graded"], shelved["finalScore"]) == ("archived", False, None)

    problem = await refused(goals, "POST", f"/v1/key-results/{ids['revenue']}/check-ins", {"value": 5e6}, 422)
    assert "frozen" in problem["detail"]
    await refused(goals, "POST", f"/v1/cycles/{ids['cycle']}/close", None, 422)  # already closed
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/reopen", None, 422)

    regraded = await write(goals, "POST", f"/v1/objectives/{ids['objective']}/regrade",
                           {"finalScore": 0.8, "reason": "Berlin opened a week after the close"})
    o = await read(goals, f"/v1/objectives/{ids['objective']}", regraded)
    assert (o["finalScore"], o["gradeReason"]) == (0.8, "Berlin opened a week after the close")
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/regrade", {"finalScore": 0.8, "reason": ""}, 422)
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/regrade", {"finalScore": 1.5, "reason": "x"}, 422)
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/regrade", {"finalScore": 0.5, "reason": "x"}, 412,
                  **{"If-Match": '"1"'})


def _events(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM goals.goals_events").fetchone()[0]


async def test_carry_over_copies_key_results_once(goals: httpx.AsyncClient, database_url: str) -> None:
    ids = await quarter_with_objective(goals)
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/carry-over", {"toCycleId": ids["cycle"]},
                  422)  # not graded yet
    await write(goals, "POST", f"/v1/cycles/{ids['cycle']}/close")
    q4 = await cycle(goals, "Q4", "2026-10-01", "2026-12-31", status="active")
    earlier = await cycle(goals, "Q2", "2026-04-01", "2026-06-30")

    first = await goals.post(f"/v1/objectives/{ids['objective']}/carry-over", json={"toCycleId": q4["id"]},
                             headers={"Idempotency-Key": "carry-grow"})
    assert first.status_code == 201, first.text
    carried = first.json()
    assert first.headers["Location"] == f"/v1/objectives/{carried['id']}"
    assert carried["version"] == 3  # created, and each key result attached
    events = _events(database_url)
    again = await goals.post(f"/v1/objectives/{ids['objective']}/carry-over", json={"toCycleId": q4["id"]},
                             headers={"Idempotency-Key": "carry-grow"})
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (201, "true")
    assert (again.json()["id"], again.json()["version"]) == (carried["id"], carried["version"])
    assert again.headers["Location"] == first.headers["Location"]
    assert _events(database_url) == events

    new = await read(goals, f"/v1/objectives/{carried['id']}", carried)
    assert (new["title"], new["description"], new["cycleId"], new["carriedFrom"], new["status"]) == (
        "Grow", "Grow the business", q4["id"], ids["objective"], "active")
    assert [(k["title"], k["kind"], k["start"], k["target"], k["weight"], k["unit"], k["current"], k["checkInCount"])
            for k in new["keyResults"]] == [
        ("Increase revenue from 4M to 5M", "increase_to", 4e6, 5e6, 2.0, "USD", None, 0),
        ("Open the Berlin office", "milestones", None, None, 1.0, "", None, 0)]
    assert new["keyResults"][1]["milestones"] == [{"title": "Lease", "weight": 1.0}, {"title": "Hire", "weight": 3.0}]
    assert new["score"] is None
    original = await read(goals, f"/v1/objectives/{ids['objective']}", carried)
    assert original["carriedTo"] == [carried["id"]]

    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/carry-over", {"toCycleId": q4["id"]}, 422)
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/carry-over", {"toCycleId": earlier["id"]}, 422)
    await refused(goals, "POST", f"/v1/objectives/{ids['objective']}/carry-over", {"toCycleId": MISSING}, 422)
    await refused(goals, "POST", f"/v1/objectives/{MISSING}/carry-over", {"toCycleId": q4["id"]}, 404)


async def test_a_replayed_multi_aggregate_write_answers_the_same_position(goals: httpx.AsyncClient) -> None:
    unit = await post(goals, "/v1/units", {"name": "Acme", "kind": "company"})
    q = await cycle(goals, "Q", "2026-10-01", "2026-12-31", status="active")
    objective = await post(goals, "/v1/objectives", {"title": "Grow", "owner": {"kind": "unit", "id": unit["id"]},
                                                     "unitId": unit["id"], "cycleId": q["id"]})
    body = {"title": "Ship", "kind": "done"}
    key = {"Idempotency-Key": f"kr-{uuid.uuid4().hex}"}
    first = await post(goals, f"/v1/objectives/{objective['id']}/key-results", body, **key)
    again = await post(goals, f"/v1/objectives/{objective['id']}/key-results", body, **key)
    assert again == first
