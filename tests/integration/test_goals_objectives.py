"""Objectives over REST against real PostgreSQL: edits, status changes, contributions, the
rolled-up score through alignment and contribution weights, and coaching warnings."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import refused
from tests.integration import test_goals_api
from tests.integration.test_goals_api import MISSING, post, read, seed, write

pytestmark = pytest.mark.asyncio(loop_scope="session")
goals = test_goals_api.goals  # the fixture: each module serves its own app


async def objective(client: httpx.AsyncClient, ids: dict[str, str], title: str, **fields: Any) -> str:
    return (await post(client, "/v1/objectives", {
        "title": title, "owner": {"kind": "unit", "id": ids["support"]}, "unitId": ids["support"],
        "cycleId": ids["cycle"], **fields}))["id"]


async def scored_kr(client: httpx.AsyncClient, objective_id: str, score: float, weight: float = 1) -> dict[str, Any]:
    """A key result on 0..100 checked in at `score` * 100."""
    kr = await post(client, f"/v1/objectives/{objective_id}/key-results",
                    {"title": "Raise coverage from 0 to 100", "kind": "increase_to", "start": 0, "target": 100,
                     "weight": weight})
    return await post(client, f"/v1/key-results/{kr['id']}/check-ins", {"value": score * 100})


async def test_edit_and_status_changes(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    person = await post(goals, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": ids["support"]})
    draft = await objective(goals, ids, "Draft", status="draft")

    edited = await write(goals, "PATCH", f"/v1/objectives/{draft}", {
        "title": "Delight customers", "owner": {"kind": "person", "id": person["id"]}}, **{"If-Match": '"1"'})
    o = await read(goals, f"/v1/objectives/{draft}", edited)
    assert (o["title"], o["description"], o["owner"], o["status"], o["version"]) == (
        "Delight customers", "", {"kind": "person", "id": person["id"]}, "draft", 2)
    await refused(goals, "PATCH", f"/v1/objectives/{draft}", {"description": "x"}, 412, **{"If-Match": '"1"'})
    await refused(goals, "PATCH", f"/v1/objectives/{draft}", {"title": None}, 422)
    await refused(goals, "PATCH", f"/v1/objectives/{draft}", {"title": "   "}, 422)
    await refused(goals, "PATCH", f"/v1/objectives/{draft}", {"owner": {"kind": "person", "id": MISSING}}, 422)
    await refused(goals, "PATCH", f"/v1/objectives/{MISSING}", {"title": "x"}, 404)
    unchanged = await write(goals, "PATCH", f"/v1/objectives/{draft}", {})
    assert unchanged["version"] == 2

    for action, status in [("activate", "active"), ("close", "closed"), ("reopen", "active"), ("archive", "archived")]:
        done = await write(goals, "POST", f"/v1/objectives/{draft}/{action}")
        assert (await read(goals, f"/v1/objectives/{draft}", done))["status"] == status
    await refused(goals, "POST", f"/v1/objectives/{draft}/activate", None, 422)
    await refused(goals, "POST", f"/v1/objectives/{draft}/archive", None, 422)
    await refused(goals, "PATCH", f"/v1/objectives/{draft}", {"title": "Again"}, 422)
    await refused(goals, "POST", f"/v1/objectives/{MISSING}/close", None, 404)
    await refused(goals, "POST", f"/v1/objectives/{draft}/reopen", None, 412, **{"If-Match": '"3"'})

    listed = await read(goals, f"/v1/objectives?cycle={ids['cycle']}&status=archived", done)
    assert [x["id"] for x in listed["items"]] == [draft]
    mine = await read(goals, f"/v1/objectives?owner={person['id']}", done)
    assert [x["id"] for x in mine["items"]] == [draft]


async def test_contributions(goals: httpx.AsyncClient) -> None:
    ids = await seed(goals)
    a = await objective(goals, ids, "A")
    b = await objective(goals, ids, "B", parentId=a)
    c = await objective(goals, ids, "C")

    added = await write(goals, "PUT", f"/v1/objectives/{c}/contributions/{b}", {"weight": 2}, **{"If-Match": '"1"'})
    assert added["version"] == 2
    reweighted = await write(goals, "PUT", f"/v1/objectives/{c}/contributions/{a}", {"weight": 0.5})
    o = await read(goals, f"/v1/objectives/{c}", reweighted)
    assert sorted((x["toObjectiveId"], x["weight"]) for x in o["contributions"]) == sorted([(b, 2.0), (a, 0.5)])

    # a contribution or an alignment that closes a loop is refused, whichever edge closes it
    problem = await refused(goals, "PUT", f"/v1/objectives/{a}/contributions/{c}", {"weight": 1}, 422)
    assert "cycle" in problem["detail"]
    await refused(goals, "PUT", f"/v1/objectives/{a}/alignment", {"parentId": c}, 422)
    await refused(goals, "PUT", f"/v1/objectives/{c}/contributions/{c}", {"weight": 1}, 422)
    await refused(goals, "PUT", f"/v1/objectives/{b}/contributions/{a}", {"weight": 1}, 422)  # its parent already
    await refused(goals, "PUT", f"/v1/objectives/{c}/contributions/{b}", {"weight": 0}, 422)
    await refused(goals, "PUT", f"/v1/objectives/{c}/contributions/{MISSING}", {"weight": 1}, 404)
    await refused(goals, "PUT", f"/v1/objectives/{MISSING}/contributions/{a}", {"weight": 1}, 404)
    await refused(goals, "PUT", f"/v1/objectives/{c}/contributions/{a}", {"weight": 3}, 412, **{"If-Match": '"1"'})

    removed = await write(goals, "DELETE", f"/v1/objectives/{c}/contributions/{a}", **{"If-Match": '"3"'})
    o = await read(goals, f"/v1/objectives/{c}", removed)
    assert [(x["toObjectiveId"], x["weight"]) for x in o["contributions"]] == [(b, 2.0)]
    assert o["version"] == 4
    await refused(goals, "DELETE", f"/v1/objectives/{c}/contributions/{a}", None, 404)


async def test_rolled_up_score_follows_alignment_and_contribution_weights(goals: httpx.AsyncClient) -> None:
    """C has a key result (weight 2, 0.5); D aligns to C (1.0); E contributes to C with weight
    3 and has a key result at 0.2 and F aligned to it at 0.8; G (no score) and an archived H
    (0.0) align to C and are left out."""
    ids = await seed(goals)
    c = await objective(goals, ids, "C")
    d = await objective(goals, ids, "D", parentId=c)
    e = await objective(goals, ids, "E")
    f = await objective(goals, ids, "F", parentId=e)
    await objective(goals, ids, "G", parentId=c)
    h = await objective(goals, ids, "H", parentId=c)
    await scored_kr(goals, c, 0.5, weight=2)
    await scored_kr(goals, d, 1.0)
    await scored_kr(goals, e, 0.2)
    await scored_kr(goals, f, 0.8)
    await scored_kr(goals, h, 0.0)
    await write(goals, "POST", f"/v1/objectives/{h}/archive")
    last = await write(goals, "PUT", f"/v1/objectives/{e}/contributions/{c}", {"weight": 3})

    top = await read(goals, f"/v1/objectives/{c}", last)
    # E: (0.2 + 0.8) / 2 = 0.5; C: (0.5 * 2 + 1.0 * 1 + 0.5 * 3) / (2 + 1 + 3) = 3.5 / 6
    assert top["score"] == pytest.approx(0.5)
    assert top["rolledUpScore"] == pytest.approx(3.5 / 6)
    assert top["band"] == "yellow"
    page = await read(goals, f"/v1/objectives?cycle={ids['cycle']}&limit=3", last)
    assert [(x["id"], x["rolledUpScore"]) for x in page["items"]] == [
        (ids["objective"], None), (c, pytest.approx(3.5 / 6)), (d, pytest.approx(1.0))]
    rest = await read(goals, f"/v1/objectives?cycle={ids['cycle']}&after={page['nextCursor']}", last)
    assert [(x["id"], x["rolledUpScore"]) for x in rest["items"]][:2] == [
        (e, pytest.approx(0.5)), (f, pytest.approx(0.8))]


async def test_coaching_warnings_for_the_seed_examples(goals: httpx.AsyncClient) -> None:
    """"Maintain NPS above 50" is a KPI, not an objective; "Launch new website" is a task; and
    six objectives for one owner in one cycle are too many."""
    ids = await seed(goals)
    ada = await post(goals, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": ids["support"]})
    owner = {"kind": "person", "id": ada["id"]}
    nps = await objective(goals, ids, "Maintain NPS above 50", owner=owner)
    website = await post(goals, f"/v1/objectives/{nps}/key-results", {"title": "Launch new website", "kind": "done"})
    others = [await objective(goals, ids, f"Objective {n}", owner=owner, unitId=ids["company"]) for n in range(5)]
    last = await write(goals, "POST", f"/v1/people/{ada['id']}/leave", {})

    o = await read(goals, f"/v1/objectives/{nps}", last)
    assert sorted((w["code"], w["subjectKind"], w["subjectId"]) for w in o["warnings"]) == sorted([
        ("objective_is_a_kpi", "objective", nps), ("too_few_key_results", "objective", nps),
        ("objective_without_owner", "objective", nps),  # owned by someone who left
        ("key_result_is_a_task", "key_result", website["id"]), ("done_only_key_result", "key_result", website["id"])])

    # filtered to the support unit, the owner's objectives in the company unit still count
    report = await read(goals, f"/v1/coaching?cycle={ids['cycle']}&unit={ids['support']}", last)
    codes = {(w["code"], w["subjectId"]) for w in report["warnings"]}
    assert ("too_many_objectives", ada["id"]) in codes
    assert {("objective_is_a_kpi", nps), ("key_result_is_a_task", website["id"])} <= codes
    assert not any(subject in others for _, subject in codes)
    everything = await read(goals, f"/v1/coaching?owner={ada['id']}", last)
    assert {("too_few_key_results", o) for o in others} <= {(w["code"], w["subjectId"]) for w in everything["warnings"]}
    assert (await read(goals, f"/v1/coaching?owner={MISSING}", last))["warnings"] == []
