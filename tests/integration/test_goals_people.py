"""Org units and people over REST against real PostgreSQL: the unit tree, and who was in which
unit (and under whom) when, from the effective-dated history."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import refused
from tests.integration import test_goals_api
from tests.integration.test_goals_api import MISSING, post, read, write

pytestmark = pytest.mark.asyncio(loop_scope="session")
goals = test_goals_api.goals  # the fixture: each module serves its own app


async def org(client: httpx.AsyncClient) -> dict[str, str]:
    acme = await post(client, "/v1/units", {"name": f"Acme {uuid.uuid4().hex[:6]}", "kind": "company"})
    ids = {"acme": acme["id"]}
    for name in ("sales", "support", "marketing"):
        ids[name] = (await post(client, "/v1/units", {"name": name.title(), "kind": "department",
                                                      "parentId": acme["id"]}))["id"]
    return ids


async def test_units_rename_move_and_filter(goals: httpx.AsyncClient) -> None:
    u = await org(goals)
    team = await post(goals, "/v1/units", {"name": "Tier 1", "kind": "team", "parentId": u["support"]})

    renamed = await write(goals, "PUT", f"/v1/units/{u['sales']}/name", {"name": "Revenue"}, **{"If-Match": '"1"'})
    assert renamed["version"] == 2
    await refused(goals, "PUT", f"/v1/units/{u['sales']}/name", {"name": "Sales"}, 412, **{"If-Match": '"1"'})
    moved = await write(goals, "PUT", f"/v1/units/{team['id']}/parent", {"parentId": u["sales"]})
    sales = await read(goals, f"/v1/units/{u['sales']}", moved)
    assert (sales["name"], sales["version"]) == ("Revenue", 2)
    assert (await read(goals, f"/v1/units/{team['id']}", moved))["parentId"] == u["sales"]

    # never under itself or below itself; a company stays the root, others keep a parent
    problem = await refused(goals, "PUT", f"/v1/units/{u['sales']}/parent", {"parentId": team["id"]}, 422)
    assert "cycle" in problem["detail"]
    await refused(goals, "PUT", f"/v1/units/{u['acme']}/parent", {"parentId": u["sales"]}, 422)
    await refused(goals, "PUT", f"/v1/units/{u['sales']}/parent", {"parentId": None}, 422)
    await refused(goals, "PUT", f"/v1/units/{MISSING}/name", {"name": "X"}, 404)
    await refused(goals, "GET", f"/v1/units/{MISSING}", None, 404)
    await refused(goals, "PUT", f"/v1/units/{u['sales']}/parent", {"parentId": MISSING}, 422)

    departments = await read(goals, f"/v1/units?parent={u['acme']}&kind=department&limit=2", moved)
    assert len(departments["items"]) == 2 and departments["nextCursor"]
    rest = await read(goals, f"/v1/units?parent={u['acme']}&kind=department&after={departments['nextCursor']}",
                      moved)
    assert [d["name"] for d in departments["items"] + rest["items"]] == ["Revenue", "Support", "Marketing"]
    assert rest["nextCursor"] is None


async def test_who_was_in_which_unit_when(goals: httpx.AsyncClient) -> None:
    u = await org(goals)
    ada = await post(goals, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": u["sales"],
                                           "joinedOn": "2026-01-05"})
    bob = await post(goals, "/v1/people", {"name": "Bob", "email": "bob@example.com", "unitId": u["support"],
                                           "managerId": ada["id"], "joinedOn": "2026-02-01"})
    assert ada["version"] == 1
    await write(goals, "PUT", f"/v1/people/{ada['id']}/unit", {"unitId": u["support"], "effectiveOn": "2026-03-01"})
    # recorded later, effective earlier: it slots into the history without changing the current unit
    await write(goals, "PUT", f"/v1/people/{ada['id']}/unit", {"unitId": u["marketing"], "effectiveOn": "2026-02-01"},
                **{"If-Match": '"2"'})
    # a move replaced on its own first day never took effect
    await write(goals, "PUT", f"/v1/people/{bob['id']}/unit", {"unitId": u["sales"], "effectiveOn": "2026-04-01"})
    await write(goals, "PUT", f"/v1/people/{bob['id']}/unit", {"unitId": u["marketing"], "effectiveOn": "2026-04-01"})
    await write(goals, "PUT", f"/v1/people/{bob['id']}/manager", {"managerId": None, "effectiveOn": "2026-05-01"})
    last = await write(goals, "POST", f"/v1/people/{bob['id']}/leave", {"leftOn": "2026-06-30"})

    a = await read(goals, f"/v1/people/{ada['id']}", last)
    assert (a["unitId"], a["managerId"], a["leftOn"], a["version"]) == (u["support"], None, None, 3)
    assert [(h["unitId"], h["fromOn"], h["toOn"]) for h in a["unitHistory"]] == [
        (u["sales"], "2026-01-05", "2026-01-31"), (u["marketing"], "2026-02-01", "2026-02-28"),
        (u["support"], "2026-03-01", None)]
    b = await read(goals, f"/v1/people/{bob['id']}", last)
    assert (b["unitId"], b["managerId"], b["leftOn"], b["version"]) == (u["marketing"], None, "2026-06-30", 5)
    assert [(h["unitId"], h["fromOn"], h["toOn"]) for h in b["unitHistory"]] == [
        (u["support"], "2026-02-01", "2026-03-31"), (u["marketing"], "2026-04-01", "2026-06-30")]
    assert [(h["managerId"], h["fromOn"], h["toOn"]) for h in b["managerHistory"]] == [
        (ada["id"], "2026-02-01", "2026-04-30"), (None, "2026-05-01", "2026-06-30")]

    async def members(unit: str, on: str) -> list[str]:
        page = await read(goals, f"/v1/units/{u[unit]}/members?on={on}", last)
        return sorted(m["name"] for m in page["items"])

    assert await members("sales", "2026-01-20") == ["Ada"]
    assert await members("marketing", "2026-02-15") == ["Ada"]
    assert await members("support", "2026-03-15") == ["Ada", "Bob"]
    assert await members("sales", "2026-04-01") == []  # Bob's move there was replaced the same day
    assert await members("marketing", "2026-06-30") == ["Bob"]
    assert await members("marketing", "2026-07-01") == []  # Bob's last day was the day before
    assert await members("sales", "2025-12-31") == []
    await refused(goals, "GET", f"/v1/units/{MISSING}/members", None, 404)

    async def names(query: str) -> list[str]:
        return sorted(p["name"] for p in (await read(goals, f"/v1/people?{query}", last))["items"])

    assert await names(f"unit={u['support']}") == ["Ada"]
    assert await names(f"unit={u['marketing']}&active=false") == ["Bob"]
    assert await names(f"unit={u['marketing']}&active=true") == []


async def test_people_rules(goals: httpx.AsyncClient) -> None:
    u = await org(goals)
    ada = await post(goals, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": u["sales"],
                                           "joinedOn": "2026-01-05"})
    bob = await post(goals, "/v1/people", {"name": "Bob", "email": "bob@example.com", "unitId": u["sales"],
                                           "managerId": ada["id"], "joinedOn": "2026-01-05"})
    # nobody manages themselves, directly or up the chain
    problem = await refused(goals, "PUT", f"/v1/people/{ada['id']}/manager",
                            {"managerId": bob["id"], "effectiveOn": "2026-02-01"}, 422)
    assert "cycle" in problem["detail"]
    await refused(goals, "PUT", f"/v1/people/{ada['id']}/unit", {"unitId": u["support"], "effectiveOn": "2025-12-31"},
                  422)  # before joining
    await refused(goals, "PUT", f"/v1/people/{ada['id']}/unit", {"unitId": MISSING}, 422)
    await refused(goals, "PUT", f"/v1/people/{MISSING}/unit", {"unitId": u["support"]}, 404)
    await refused(goals, "PUT", f"/v1/people/{ada['id']}/unit", {"unitId": u["support"]}, 412, **{"If-Match": '"7"'})
    await refused(goals, "POST", "/v1/people", {"name": "Eve", "email": "no-at-sign", "unitId": u["sales"]}, 422)
    await refused(goals, "POST", "/v1/people", {"name": "Eve", "email": "eve@example.com", "unitId": MISSING}, 422)
    await write(goals, "POST", f"/v1/people/{ada['id']}/leave", {"leftOn": "2026-03-31"})
    await refused(goals, "POST", f"/v1/people/{ada['id']}/leave", {"leftOn": "2026-04-30"}, 422)
    await refused(goals, "POST", "/v1/people", {"name": "Eve", "email": "eve@example.com", "unitId": u["sales"],
                                                "managerId": ada["id"]}, 422)  # a manager who left
    await refused(goals, "GET", f"/v1/people/{MISSING}", None, 404)
    await refused(goals, "POST", f"/v1/people/{MISSING}/leave", {}, 404)


async def test_text_with_nul_is_refused(goals: httpx.AsyncClient) -> None:
    """PostgreSQL text cannot hold NUL: refused at the door, it never reaches the projection."""
    problem = await refused(goals, "POST", "/v1/units", {"name": "Ac\u0000me", "kind": "company"}, 422)
    assert problem["errors"][0]["field"] == "name"
