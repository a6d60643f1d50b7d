"""Key results over REST against real PostgreSQL: revising, moving, correcting check-ins (both
kept, the current value follows the correction), the check-in history and the forecast."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import refused
from tests.integration import test_goals_api
from tests.integration.test_goals_api import MISSING, post, read, seed, write

pytestmark = pytest.mark.asyncio(loop_scope="session")
goals = test_goals_api.goals  # the fixture: each module serves its own app


async def key_result(client: httpx.AsyncClient, objective_id: str, **fields: Any) -> dict[str, Any]:
    return await post(client, f"/v1/objectives/{objective_id}/key-results", {
        "title": "Raise test coverage from 40% to 90%", "kind": "increase_to", "start": 40, "target": 90,
        "unit": "%", **fields})


async def test_adding_a_key_result_moves_the_objective_version(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    kr = await key_result(goals, ids["objective"])
    r = await goals.get(f"/v1/objectives/{ids['objective']}", headers={"Tandem-Wait-For": f"goals={kr['position']}"})
    assert (r.headers["ETag"], r.json()["version"]) == ('"2"', 2)
    stale = await goals.post(f"/v1/objectives/{ids['objective']}/close", headers={"If-Match": '"1"'})
    assert stale.status_code == 412


async def test_revise(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    ada = await post(goals, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": ids["support"]})
    kr = await key_result(goals, ids["objective"], ownerId=ada["id"])
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 65})

    revised = await write(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"target": 140, "ownerId": None, "weight": 2},
                          **{"If-Match": '"2"'})
    k = await read(goals, f"/v1/key-results/{kr['id']}", revised)
    assert (k["start"], k["target"], k["ownerId"], k["weight"], k["title"], k["version"]) == (
        40, 140, None, 2, "Raise test coverage from 40% to 90%", 3)
    assert k["score"] == pytest.approx(0.25)  # (65 - 40) / (140 - 40)
    await refused(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"target": 100}, 412, **{"If-Match": '"2"'})
    await refused(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"title": None}, 422)
    await refused(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"target": 40}, 422)  # start == target
    await refused(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"start": None}, 422)  # increase_to needs one
    await refused(goals, "PATCH", f"/v1/key-results/{kr['id']}", {"kind": "done"}, 422)  # the kind stays
    await refused(goals, "PATCH", f"/v1/key-results/{MISSING}", {"target": 100}, 404)

    milestones = await key_result(goals, ids["objective"], title="Ship the app", kind="milestones", start=None,
                                  target=None, milestones=[{"title": "Beta"}, {"title": "GA", "weight": 3}])
    reached = await post(goals, f"/v1/key-results/{milestones['id']}/check-ins", {"value": 2})
    await refused(goals, "PATCH", f"/v1/key-results/{milestones['id']}", {"milestones": [{"title": "Beta"}]}, 422)
    k = await read(goals, f"/v1/key-results/{milestones['id']}", reached)
    assert k["score"] == 1.0


async def test_move_to_another_objective(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    other = await post(goals, "/v1/objectives", {"title": "Other", "owner": {"kind": "unit", "id": ids["support"]},
                                                 "unitId": ids["support"], "cycleId": ids["cycle"]})
    kr = await key_result(goals, ids["objective"])
    moved = await write(goals, "PUT", f"/v1/key-results/{kr['id']}/objective", {"objectiveId": other["id"]},
                        **{"If-Match": '"1"'})
    assert (await read(goals, f"/v1/key-results/{kr['id']}", moved))["objectiveId"] == other["id"]
    source = await read(goals, f"/v1/objectives/{ids['objective']}", moved)
    target = await read(goals, f"/v1/objectives/{other['id']}", moved)
    assert (source["keyResults"], source["version"]) == ([], 3)  # created, attached, detached
    assert ([k["id"] for k in target["keyResults"]], target["version"]) == ([kr["id"]], 2)

    elsewhere = await seed(goals)  # another cycle
    await refused(goals, "PUT", f"/v1/key-results/{kr['id']}/objective", {"objectiveId": elsewhere["objective"]}, 422)
    await refused(goals, "PUT", f"/v1/key-results/{kr['id']}/objective", {"objectiveId": other["id"]}, 422)  # there
    await refused(goals, "PUT", f"/v1/key-results/{kr['id']}/objective", {"objectiveId": MISSING}, 422)
    await refused(goals, "PUT", f"/v1/key-results/{MISSING}/objective", {"objectiveId": other["id"]}, 404)
    await refused(goals, "PUT", f"/v1/key-results/{kr['id']}/objective", {"objectiveId": ids["objective"]}, 412,
                  **{"If-Match": '"1"'})


async def test_a_correction_keeps_both_and_moves_the_current_value(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    kr = await key_result(goals, ids["objective"])
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 50, "confidence": 6, "validOn": "2026-11-01"})
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 65, "confidence": 7, "note": "typo",
                                                                 "validOn": "2026-11-08"})
    corrected = await post(goals, f"/v1/key-results/{kr['id']}/check-ins/3/corrections", {"value": 56},
                           **{"If-Match": '"3"'})
    assert corrected["version"] == 4
    k = await read(goals, f"/v1/key-results/{kr['id']}", corrected)
    # the correction keeps the check-in's day and confidence: 56 on 2026-11-08 is current
    assert (k["current"], k["currentValidOn"], k["confidence"], k["checkInCount"], k["correctionCount"]) == (
        56, "2026-11-08", 7, 2, 1)
    assert k["score"] == pytest.approx((56 - 40) / 50)

    history = await read(goals, f"/v1/key-results/{kr['id']}/check-ins", corrected)
    assert [(c["version"], c["value"], c["validOn"], c["note"], c["correctsVersion"], c["correctedBy"])
            for c in history["items"]] == [
        (4, 56, "2026-11-08", "typo", 3, None), (3, 65, "2026-11-08", "typo", None, 4),
        (2, 50, "2026-11-01", "", None, None)]

    # moving the first check-in's day past the second makes it the current one
    again = await post(goals, f"/v1/key-results/{kr['id']}/check-ins/2/corrections",
                       {"value": 45, "confidence": None, "validOn": "2026-11-10", "note": "counted twice"})
    k = await read(goals, f"/v1/key-results/{kr['id']}", again)
    assert (k["current"], k["currentValidOn"], k["confidence"]) == (45, "2026-11-10", None)

    first_page = await read(goals, f"/v1/key-results/{kr['id']}/check-ins?limit=2", again)
    second_page = await read(goals, f"/v1/key-results/{kr['id']}/check-ins?limit=2&after={first_page['nextCursor']}",
                             again)
    assert [c["version"] for c in first_page["items"] + second_page["items"]] == [5, 4, 3, 2]
    assert second_page["nextCursor"] is None

    await refused(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/4/corrections", {"value": 1}, 404)  # a correction
    await refused(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/99/corrections", {"value": 1}, 404)
    await refused(goals, "POST", f"/v1/key-results/{MISSING}/check-ins/2/corrections", {"value": 1}, 404)
    await refused(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/2/corrections", {"value": 1}, 412,
                  **{"If-Match": '"4"'})
    await refused(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/2/corrections", {"value": 1, "note": None}, 422)
    await refused(goals, "POST", f"/v1/key-results/{kr['id']}/check-ins/2/corrections",
                  {"value": 1, "validOn": "2999-01-01"}, 422)
    await refused(goals, "GET", f"/v1/key-results/{MISSING}/check-ins", None, 404)


async def test_forecast_follows_the_check_in_trend(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)  # Q4 2026: ends 2026-12-31
    kr = await key_result(goals, ids["objective"], start=0, target=100)
    await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 10, "validOn": "2026-11-01"})
    last = await post(goals, f"/v1/key-results/{kr['id']}/check-ins", {"value": 20, "validOn": "2026-11-11"})
    k = await read(goals, f"/v1/key-results/{kr['id']}", last)
    # one a day: 20 + 50 days to 2026-12-31
    assert k["forecast"] == {"value": pytest.approx(70), "score": pytest.approx(0.7)}
    o = await read(goals, f"/v1/objectives/{ids['objective']}", last)
    assert o["keyResults"][0]["forecast"] == k["forecast"] and o["keyResults"][0]["band"] == "red"
    assert o["forecastScore"] == pytest.approx(0.7)
    # A second key result weighing 3, one check-in (no trend: its latest value, 5 of 10), and one
    # without check-ins (no forecast, left out): the objective's forecast weighs them as its score.
    other = await key_result(goals, ids["objective"], start=0, target=10, weight=3)
    await key_result(goals, ids["objective"], start=0, target=10)
    last = await post(goals, f"/v1/key-results/{other['id']}/check-ins", {"value": 5, "validOn": "2026-11-11"})
    o = await read(goals, f"/v1/objectives/{ids['objective']}", last)
    assert o["forecastScore"] == pytest.approx((0.7 + 0.5 * 3) / 4)
