"""SCIM 2.0 at /scim/v2 on the goals service, in process against real PostgreSQL: discovery,
Users and Groups as Tandem people and org units (every change an event, history kept), filters
translated to SQL, paging, sorting, attribute selection, PATCH paths, /Bulk with bulkId
references, ETags, and SCIM error messages for every failure."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from eventsourcing.projection import ProjectionRunner
from scim2_models import Context, ScimFilter
from scim2_models import Path as ScimPath

from services.common.database import ensure_schema
from services.common.projections import ProjectionSpec
from services.goals.api import create_app
from services.goals.application import Goals
from services.goals.projections import GoalsProjection, GoalsReadModel
from services.goals.scim_query import GROUPS, USERS
from services.goals.scim_resources import ScimUser
from services.goals.settings import GoalsSettings
from tests.conftest import fresh_database, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
UNIT = "urn:tandem:params:scim:schemas:extension:unit:2.0:Group"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
TODAY = date.today().isoformat()


@pytest.fixture(scope="module")
async def database(auth: Callable[..., dict[str, str]]) -> AsyncIterator[str]:
    """A database of this module's own: the rule "a new user without a department joins the
    company" depends on how many companies there are."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def goals_app(database: str) -> Any:
    return create_app(GoalsSettings(DATABASE_URL=database))


@pytest.fixture(scope="module")
async def app_client(goals_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(goals_app):
        yield client


@pytest.fixture(scope="module")
def hr(app_client: httpx.AsyncClient, auth: Callable[..., dict[str, str]]) -> httpx.AsyncClient:
    """The HR system's client (role hr_sync); other roles pass their own headers."""
    app_client.headers.update(auth("hr_sync", "okta"))
    return app_client


async def scim(client: httpx.AsyncClient, method: str, path: str, body: Any = None, status: int = 200,
               **headers: str) -> dict[str, Any]:
    """A SCIM request that must answer `status`; every error must be a SCIM error message."""
    r = await client.request(method, f"/scim/v2{path}", json=body, headers=headers)
    assert r.status_code == status, r.text
    if status in (204, 304):
        assert not r.content
        return {}
    assert r.headers["content-type"] == "application/scim+json", r.headers
    body = r.json()
    if status >= 400:
        assert body["schemas"] == [ERROR] and body["status"] == str(status), body
    return body


async def refused(client: httpx.AsyncClient, method: str, path: str, body: Any, status: int,
                  scim_type: str | None = None, **headers: str) -> dict[str, Any]:
    error = await scim(client, method, path, body, status, **headers)
    assert error.get("scimType") == scim_type, error
    return error


async def written(client: httpx.AsyncClient, method: str, path: str, body: Any = None,
                  status: int = 200, **headers: str) -> tuple[dict[str, Any], str]:
    """A SCIM write and the log position it reports (for Tandem-Wait-For on REST reads)."""
    r = await client.request(method, f"/scim/v2{path}", json=body, headers=headers)
    assert r.status_code == status, r.text
    position = r.headers["Tandem-Position"]
    assert position.startswith("goals=")
    if status == 204:
        return {}, position
    resource = r.json()
    assert r.headers["ETag"] == resource["meta"]["version"]
    return resource, position


async def rest(client: httpx.AsyncClient, path: str, position: str, role: str = "admin",
               auth: Callable[..., dict[str, str]] | None = None) -> dict[str, Any]:
    assert auth is not None
    r = await client.get(path, headers={**auth(role, "reader"), "Tandem-Wait-For": position})
    assert r.status_code == 200, r.text
    return r.json()


def tag() -> str:
    return uuid.uuid4().hex[:8]


def user(user_name: str, department: str | None = None, **attributes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"schemas": [USER_SCHEMA], "userName": user_name, **attributes}
    if department is not None:
        body["schemas"].append(ENTERPRISE)
        body[ENTERPRISE] = {"department": department}
    return body


def group(name: str, parent: str | None = None, kind: str | None = None, **attributes: Any) -> dict[str, Any]:
    extension = {k: v for k, v in {"parent": {"value": parent} if parent else None, "kind": kind}.items() if v}
    return {"schemas": [GROUP_SCHEMA, UNIT], "displayName": name, UNIT: extension, **attributes}


def patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


async def org(hr: httpx.AsyncClient) -> dict[str, str]:
    """A company with two departments and a team, named uniquely for this test."""
    t = tag()
    ids = {"tag": t}
    ids["acme"] = (await scim(hr, "POST", "/Groups", group(f"Acme {t}"), 201))["id"]
    for name in ("sales", "support"):
        ids[name] = (await scim(hr, "POST", "/Groups", group(f"{name.title()} {t}", ids["acme"], "department"),
                                201))["id"]
    ids["tier1"] = (await scim(hr, "POST", "/Groups", group(f"Tier 1 {t}", ids["support"]), 201))["id"]
    return ids


# The company rule needs a database without companies: this test runs first in the module.

async def test_a_new_user_without_a_department_joins_the_one_company(hr: httpx.AsyncClient) -> None:
    error = await refused(hr, "POST", "/Users", user("first@acme.io"), 400, "invalidValue")
    assert "company" in error["detail"]
    acme = await scim(hr, "POST", "/Groups", group("Only Acme"), 201)
    assert acme[UNIT] == {"kind": "company"}  # no parent: a company
    first = await scim(hr, "POST", "/Users", user("first@acme.io"), 201)
    assert first[ENTERPRISE]["department"] == "Only Acme"
    assert first["groups"][0]["value"] == acme["id"]
    await scim(hr, "POST", "/Groups", group("Other Corp"), 201)
    error = await refused(hr, "POST", "/Users", user("second@acme.io"), 400, "invalidValue")
    assert "more than one" in error["detail"]
    # with a department it does not matter how many companies there are
    await scim(hr, "POST", "/Users", user("second@acme.io", "Other Corp"), 201)


# Discovery --------------------------------------------------------------------------------

async def test_discovery(hr: httpx.AsyncClient) -> None:
    config = await scim(hr, "GET", "/ServiceProviderConfig")
    assert config["schemas"] == ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"]
    assert {k: config[k]["supported"] for k in ("patch", "bulk", "filter", "sort", "etag", "changePassword")} == {
        "patch": True, "bulk": True, "filter": True, "sort": True, "etag": True, "changePassword": False}
    assert config["bulk"]["maxOperations"] == 1000 and config["filter"]["maxResults"] == 200
    assert config["authenticationSchemes"][0]["type"] == "oauthbearertoken"

    types = await scim(hr, "GET", "/ResourceTypes")
    assert types["schemas"] == [LIST] and types["totalResults"] == 2
    by_name = {t["name"]: t for t in types["Resources"]}
    assert by_name["User"]["endpoint"] == "/Users"
    assert by_name["User"]["schemaExtensions"] == [{"schema": ENTERPRISE, "required": False}]
    assert by_name["Group"]["schemaExtensions"] == [{"schema": UNIT, "required": False}]
    assert (await scim(hr, "GET", "/ResourceTypes/Group"))["schema"] == GROUP_SCHEMA
    await refused(hr, "GET", "/ResourceTypes/Pet", None, 404)

    schemas = {s["id"]: s for s in (await scim(hr, "GET", "/Schemas"))["Resources"]}
    assert set(schemas) == {USER_SCHEMA, ENTERPRISE, GROUP_SCHEMA, UNIT}
    unit = await scim(hr, "GET", f"/Schemas/{UNIT}")
    attributes = {a["name"]: a for a in unit["attributes"]}
    assert attributes["kind"]["canonicalValues"] == ["company", "department", "team"]
    assert attributes["kind"]["mutability"] == "immutable"
    assert [s["name"] for s in attributes["parent"]["subAttributes"]] == ["value", "$ref", "display"]
    assert unit["meta"]["resourceType"] == "Schema"
    await refused(hr, "GET", "/Schemas/urn:nothing", None, 404)


# Access and errors ------------------------------------------------------------------------

async def test_only_hr_sync_may_call_and_every_failure_is_a_scim_error(
        app_client: httpx.AsyncClient, hr: httpx.AsyncClient, auth: Callable[..., dict[str, str]]) -> None:
    anonymous = {"Authorization": ""}
    error = await refused(app_client, "GET", "/Users", None, 401, **anonymous)
    assert "bearer" in error["detail"].lower()
    r = await app_client.get("/scim/v2/Users", headers=anonymous)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    await refused(app_client, "GET", "/Users", None, 401, Authorization="Bearer not-a-jwt")
    for role in ("admin", "member", "auditor", "service"):
        error = await refused(app_client, "GET", "/Users", None, 403, **auth(role, "someone"))
        assert "hr_sync" in error["detail"]
        await refused(app_client, "POST", "/Users", user("x@acme.io"), 403, **auth(role, "someone"))
    # the REST API keeps problem details
    r = await app_client.get(f"/v1/units/{uuid.uuid4()}", headers=auth("admin"))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"

    await refused(hr, "GET", "/Pets", None, 404)
    await refused(hr, "GET", f"/Users/{uuid.uuid4()}", None, 404)
    await refused(hr, "GET", "/Users/not-a-uuid", None, 404)
    await refused(hr, "GET", "/Nothing/here/at/all", None, 404)
    r = await hr.request("TRACE", "/scim/v2/Users")
    assert r.status_code == 405 and r.json()["schemas"] == [ERROR] and "GET" in r.headers["Allow"]
    # bad input: 400 with the keyword that says what is wrong, never a 500
    r = await hr.post("/scim/v2/Users", content=b"{not json", headers={"Content-Type": "application/scim+json"})
    assert r.status_code == 400 and r.json()["scimType"] == "invalidSyntax"
    r = await hr.post("/scim/v2/Users", content=b"<User/>", headers={"Content-Type": "application/xml"})
    assert r.status_code == 415 and r.json()["schemas"] == [ERROR]
    await refused(hr, "POST", "/Users", [1, 2], 400, "invalidSyntax")
    await refused(hr, "POST", "/Users", {"schemas": [USER_SCHEMA]}, 400, "invalidValue")  # no userName
    await refused(hr, "POST", "/Users", {**user("y@acme.io"), "shoeSize": 44}, 400, "invalidSyntax")
    await refused(hr, "POST", "/Users", {**user("y@acme.io"), "schemas": ["urn:other"]}, 400, "invalidSyntax")
    await refused(hr, "POST", "/Users", user("nul\u0000@acme.io"), 400, "invalidValue")
    r = await hr.post("/scim/v2/Users", content=b'{"schemas": ["%s"], "userName": "\\ud800@acme.io"}' % USER_SCHEMA.encode(),
                      headers={"Content-Type": "application/scim+json"})
    assert r.status_code == 400 and r.json()["scimType"] == "invalidValue"  # a lone surrogate
    await refused(hr, "POST", "/Users", {**user("y@acme.io"), "active": "yes"}, 400, "invalidValue")
    await refused(hr, "POST", "/Users", {**user("y@acme.io"), "emails": [{"value": "no-at"}]}, 400, "invalidValue")
    await refused(hr, "GET", "/Users?count=many", None, 400, "invalidValue")
    await refused(hr, "GET", "/Users?sortBy=shoeSize", None, 400, "invalidPath")
    await refused(hr, "GET", "/Users?filter=" + quote("(" * 3000 + 'userName eq "x"' + ")" * 3000), None, 400,
                  "invalidFilter")
    deep = await scim(hr, "GET", "/Users?filter=" + quote("(" * 300 + 'userName eq "x"' + ")" * 300))
    assert deep["totalResults"] == 0  # deep, but a filter all the same
    # FastAPI's own request validation (a malformed Tandem-Wait-For) is a SCIM error here too
    await refused(hr, "GET", "/Users", None, 400, "invalidValue", **{"Tandem-Wait-For": "goals=lots"})


# Users ------------------------------------------------------------------------------------

async def test_a_user_is_a_person(hr: httpx.AsyncClient, auth: Callable[..., dict[str, str]]) -> None:
    u = await org(hr)
    t = u["tag"]
    body = {**user(f"Ada.{t}@acme.io", f"sales {t}"), "externalId": f"okta-{t}",
            "name": {"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada King, Countess of Lovelace"},
            "displayName": "Ada Lovelace", "password": "never kept",
            "emails": [{"value": f"ada.home.{t}@example.com", "type": "home"},
                       {"value": f"ada.{t}@acme.io", "type": "work", "primary": True}]}
    r = await hr.post("/scim/v2/Users", json=body)
    assert r.status_code == 201, r.text
    ada = r.json()
    assert r.headers["Location"] == ada["meta"]["location"] == f"http://testserver/scim/v2/Users/{ada['id']}"
    assert r.headers["ETag"] == ada["meta"]["version"] == 'W/"1"'
    assert ada["meta"]["resourceType"] == "User" and ada["meta"]["created"] == ada["meta"]["lastModified"]
    assert "password" not in ada
    assert (ada["userName"], ada["externalId"], ada["displayName"], ada["active"]) == (
        f"Ada.{t}@acme.io", f"okta-{t}", "Ada Lovelace", True)
    assert ada["name"] == {"givenName": "Ada", "familyName": "Lovelace",
                           "formatted": "Ada King, Countess of Lovelace"}
    assert ada[ENTERPRISE] == {"department": f"Sales {t}"}  # the unit's name, as it is spelled
    assert ada["groups"] == [{"value": u["sales"], "$ref": f"http://testserver/scim/v2/Groups/{u['sales']}",
                              "display": f"Sales {t}", "type": "direct"}]
    position = r.headers["Tandem-Position"]
    person = await rest(hr, f"/v1/people/{ada['id']}", position, auth=auth)
    assert (person["name"], person["email"], person["unitId"]) == ("Ada Lovelace", f"ada.{t}@acme.io", u["sales"])
    assert (await scim(hr, "GET", f"/Users/{ada['id']}")) == ada

    # user names are unique, case aside, also against a person created over REST (by email)
    await refused(hr, "POST", "/Users", user(f"ADA.{t}@ACME.IO", f"Sales {t}"), 409, "uniqueness")
    rest_person = await hr.post("/v1/people", json={"name": "Rex", "email": f"rex.{t}@acme.test",
                                                    "unitId": u["sales"]}, headers=auth("admin"))
    assert rest_person.status_code == 201
    await refused(hr, "POST", "/Users", user(f"rex.{t}@acme.test", f"Sales {t}"), 409, "uniqueness",
                  **{"Tandem-Wait-For": f"goals={rest_person.json()['position']}"})
    # a person created over REST is a User whose email stands for the user name
    rex = await scim(hr, "GET", f"/Users/{rest_person.json()['id']}")
    assert rex["userName"] == f"rex.{t}@acme.test"  # a domain SCIM's email type refuses: shown all the same
    assert rex["emails"] == [{"value": f"rex.{t}@acme.test", "type": "work", "primary": True}]

    # a person needs a unit and an email address
    error = await refused(hr, "POST", "/Users", user(f"bob.{t}", f"Nowhere {t}"), 400, "invalidValue")
    assert "needs a unit" in error["detail"]
    error = await refused(hr, "POST", "/Users", user(f"bob.{t}", f"Sales {t}"), 400, "invalidValue")
    assert "email" in error["detail"]
    # a manager must be someone present
    bad_manager = user(f"bob.{t}@acme.io", f"Sales {t}")
    bad_manager[ENTERPRISE]["manager"] = {"value": str(uuid.uuid4())}
    await refused(hr, "POST", "/Users", bad_manager, 400, "invalidValue")
    bad_manager[ENTERPRISE]["manager"] = {"value": "bulkId:ada"}
    await refused(hr, "POST", "/Users", bad_manager, 400, "invalidValue")


async def test_patch_paths_and_history(hr: httpx.AsyncClient, auth: Callable[..., dict[str, str]],
                                       database: str) -> None:
    u = await org(hr)
    t = u["tag"]
    boss = await scim(hr, "POST", "/Users", user(f"boss.{t}@acme.io", f"Sales {t}"), 201)
    ada = await scim(hr, "POST", "/Users", {**user(f"ada.{t}", f"Sales {t}"), "emails": [
        {"value": f"ada.{t}@acme.io", "type": "work", "primary": True}]}, 201)
    path = f"/Users/{ada['id']}"

    ada, _ = await written(hr, "PATCH", path, patch(
        {"op": "replace", "path": 'emails[type eq "work"].value', "value": f"lovelace.{t}@acme.io"},
        {"op": "add", "path": "emails", "value": [{"value": f"ada.{t}@home.io", "type": "home"}]},
        {"op": "replace", "path": "name.givenName", "value": "Augusta"},
        {"op": "add", "value": {"displayName": "Augusta Ada", "externalId": f"ext-{t}"}},
        {"op": "add", "path": f"{ENTERPRISE}:manager", "value": {"value": boss["id"]}}))
    assert [e["value"] for e in ada["emails"]] == [f"lovelace.{t}@acme.io", f"ada.{t}@home.io"]
    assert (ada["name"]["givenName"], ada["displayName"], ada["externalId"]) == ("Augusta", "Augusta Ada", f"ext-{t}")
    assert ada[ENTERPRISE]["manager"] == {"value": boss["id"], "$ref": f"http://testserver/scim/v2/Users/{boss['id']}",
                                          "displayName": f"boss.{t}@acme.io"}
    assert ada["meta"]["version"] == 'W/"3"'  # one profile change, one manager change

    ada, _ = await written(hr, "PATCH", path, patch(
        {"op": "remove", "path": 'emails[type eq "home"]'},
        {"op": "replace", "path": f"{ENTERPRISE}:department", "value": f"support {t}"},
        {"op": "replace", "path": "active", "value": False}))
    assert [e["type"] for e in ada["emails"]] == ["work"] and ada["active"] is False
    assert ada["groups"][0]["value"] == u["support"]

    ada, position = await written(hr, "PATCH", path, patch(
        {"op": "remove", "path": f"{ENTERPRISE}:manager"},
        {"op": "replace", "path": "active", "value": True},
        {"op": "replace", "path": "userName", "value": f"augusta.{t}"}))
    assert ENTERPRISE not in ada or "manager" not in ada[ENTERPRISE]
    assert ada["userName"] == f"augusta.{t}" and ada["active"] is True

    person = await rest(hr, f"/v1/people/{ada['id']}", position, auth=auth)
    assert person["email"] == f"lovelace.{t}@acme.io" and person["name"] == "Augusta Ada"
    # moved today: the move to support replaced sales on its own first day, so only support took effect
    assert [(h["unitId"], h["fromOn"]) for h in person["unitHistory"]] == [(u["support"], TODAY)]
    # the history is in the log, event by event, each recorded by the HR system
    with psycopg.connect(database) as conn:
        events = conn.execute(
            "SELECT topic, state FROM goals.goals_events WHERE originator_id = %s ORDER BY originator_version",
            (uuid.UUID(ada["id"]),)).fetchall()
    assert [topic.split(":")[1] for topic, _ in events] == [
        "Person.Joined", "Person.Updated", "Person.ManagerChanged", "Person.Updated", "Person.MovedUnit",
        "Person.Deactivated", "Person.Updated", "Person.ManagerChanged", "Person.Reactivated"]
    states = [json.loads(bytes(state)) for _, state in events]
    assert {s["meta"]["actor"] for s in states} == {"okta"}
    assert states[4]["effective_on"] == {"_type_": "date_iso", "_data_": TODAY}
    # the old user name is free again; the new one taken
    await scim(hr, "POST", "/Users", {**user(f"ada.{t}", f"Sales {t}"), "emails": [{"value": f"x.{t}@acme.io"}]},
               201)
    await refused(hr, "PATCH", f"/Users/{boss['id']}",
                  patch({"op": "replace", "path": "userName", "value": f"Augusta.{t}"}), 409, "uniqueness")

    # what a PATCH may not do
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": 'emails[type eq "other"].value',
                                            "value": "z@acme.io"}), 400, "noTarget")
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": "shoeSize", "value": 44}), 400, "invalidPath")
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": 'emails[type eq', "value": 1}), 400,
                  "invalidPath")
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": "id", "value": "mine"}), 400, "mutability")
    await refused(hr, "PATCH", path, patch({"op": "remove", "path": "userName"}), 400, "mutability")
    await refused(hr, "PATCH", path, patch({"op": "explode", "path": "userName"}), 400, "invalidValue")
    await refused(hr, "PATCH", path, {"schemas": [PATCH_OP]}, 400, "invalidValue")
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": f"{ENTERPRISE}:manager.value",
                                            "value": ada["id"]}), 400, "invalidValue")  # their own manager
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": f"{ENTERPRISE}:department",
                                            "value": "Atlantis"}), 400, "invalidValue")
    await refused(hr, "PATCH", f"/Users/{uuid.uuid4()}", patch({"op": "replace", "path": "active", "value": True}),
                  404)
    assert (await scim(hr, "GET", path))["meta"]["version"] == ada["meta"]["version"]  # none of it changed anything


async def test_put_replaces_and_etags_guard_writes(hr: httpx.AsyncClient) -> None:
    u = await org(hr)
    t = u["tag"]
    ada = await scim(hr, "POST", "/Users", {**user(f"ada.{t}@acme.io", f"Sales {t}"), "nickName": "Countess",
                                            "name": {"givenName": "Ada"}, "externalId": "e1"}, 201)
    path = f"/Users/{ada['id']}"
    r = await hr.get(f"/scim/v2{path}", headers={"If-None-Match": ada["meta"]["version"]})
    assert r.status_code == 304 and r.headers["ETag"] == 'W/"1"'
    assert (await hr.get(f"/scim/v2{path}", headers={"If-None-Match": 'W/"9"'})).status_code == 200

    replaced = {**user(f"ada.{t}@acme.io"), "displayName": "Ada L", "id": "ignored-read-only"}
    await refused(hr, "PUT", path, replaced, 412, **{"If-Match": 'W/"7"'})
    await refused(hr, "PUT", path, replaced, 412, **{"If-Match": "garbage"})
    ada2, _ = await written(hr, "PUT", path, replaced, **{"If-Match": 'W/"1"'})
    assert ada2["id"] == ada["id"] and ada2["displayName"] == "Ada L"
    assert "externalId" not in ada2 and "givenName" not in ada2.get("name", {})  # a PUT replaces
    assert ada2[ENTERPRISE]["department"] == f"Sales {t}"  # no department given: the unit stays
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": "active", "value": False}), 412,
                  **{"If-Match": 'W/"1"'})
    await refused(hr, "DELETE", path, None, 412, **{"If-Match": 'W/"1"'})
    assert (await scim(hr, "GET", path))["meta"]["version"] == ada2["meta"]["version"]
    await written(hr, "PATCH", path, patch({"op": "replace", "path": "active", "value": False}),
                  **{"If-Match": ada2["meta"]["version"]})
    # a PUT echoing the resource back changes nothing
    current = await scim(hr, "GET", path)
    echoed = {k: v for k, v in current.items() if k not in ("meta", "groups")}
    again, _ = await written(hr, "PUT", path, echoed)
    assert again["meta"]["version"] == current["meta"]["version"]
    await refused(hr, "PUT", path, {"schemas": [USER_SCHEMA]}, 400, "invalidValue")


async def test_deleting_a_user_records_that_they_left(hr: httpx.AsyncClient,
                                                      auth: Callable[..., dict[str, str]]) -> None:
    u = await org(hr)
    t = u["tag"]
    ada = await scim(hr, "POST", "/Users", user(f"ada.{t}@acme.io", f"Sales {t}"), 201)
    admin = auth("admin", "lead")
    cycle = (await hr.post("/v1/cycles", json={"name": f"Q {t}", "startsOn": "2026-10-01", "endsOn": "2026-12-31",
                                               "status": "active"}, headers=admin)).json()

    async def objective(title: str) -> str:
        r = await hr.post("/v1/objectives", headers=admin, json={
            "title": title, "owner": {"kind": "person", "id": ada["id"]}, "unitId": u["sales"],
            "cycleId": cycle["id"]})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    open_one, closed_one = await objective("Delight customers"), await objective("Ship the thing")
    assert (await hr.post(f"/v1/objectives/{closed_one}/close", headers=admin)).status_code == 200

    _, position = await written(hr, "DELETE", f"/Users/{ada['id']}", status=204)
    await refused(hr, "GET", f"/Users/{ada['id']}", None, 404)
    await refused(hr, "DELETE", f"/Users/{ada['id']}", None, 404)
    listed = await scim(hr, "GET", "/Users?filter=" + quote(f'userName eq "ada.{t}@acme.io"'))
    assert listed["totalResults"] == 0 and not listed.get("Resources")
    person = await rest(hr, f"/v1/people/{ada['id']}", position, auth=auth)
    assert person["leftOn"] == TODAY and person["unitHistory"][0]["unitId"] == u["sales"]
    flags = {o: (await rest(hr, f"/v1/objectives/{o}", position, auth=auth))["needsReassignment"]
             for o in (open_one, closed_one)}
    assert flags == {open_one: True, closed_one: False}
    # the open objective gets a new owner: no longer flagged
    boss = await scim(hr, "POST", "/Users", user(f"boss.{t}@acme.io", f"Sales {t}"), 201)
    r = await hr.patch(f"/v1/objectives/{open_one}", headers=admin,
                       json={"owner": {"kind": "person", "id": boss["id"]}})
    assert r.status_code == 200, r.text
    assert not (await rest(hr, f"/v1/objectives/{open_one}", f"goals={r.json()['position']}", auth=auth)
                )["needsReassignment"]
    # the user name is free again: a rehire is a new person
    rehired = await scim(hr, "POST", "/Users", user(f"ada.{t}@acme.io", f"Sales {t}"), 201)
    assert rehired["id"] != ada["id"]


# Groups -----------------------------------------------------------------------------------

async def test_groups_are_units_and_members_their_people(hr: httpx.AsyncClient, auth: Callable[..., dict[str, str]],
                                                         database: str) -> None:
    u = await org(hr)
    t = u["tag"]
    ada = await scim(hr, "POST", "/Users", user(f"ada.{t}@acme.io", f"Sales {t}"), 201)
    bob = await scim(hr, "POST", "/Users", user(f"bob.{t}@acme.io", f"Sales {t}"), 201)
    r = await hr.post("/scim/v2/Groups", json=group(f"Tier 2 {t}", u["support"], externalId=f"g-{t}",
                                                    members=[{"value": ada["id"]}]))
    assert r.status_code == 201, r.text
    tier2 = r.json()
    assert r.headers["Location"] == f"http://testserver/scim/v2/Groups/{tier2['id']}"
    assert tier2[UNIT] == {"kind": "team", "parent": {
        "value": u["support"], "$ref": f"http://testserver/scim/v2/Groups/{u['support']}", "display": f"Support {t}"}}
    assert [m["value"] for m in tier2["members"]] == [ada["id"]] and tier2["externalId"] == f"g-{t}"
    assert (await scim(hr, "GET", f"/Users/{ada['id']}"))[ENTERPRISE]["department"] == f"Tier 2 {t}"

    path = f"/Groups/{tier2['id']}"
    tier2, _ = await written(hr, "PATCH", path, patch(
        {"op": "add", "path": "members", "value": [{"value": bob["id"]}]},
        {"op": "replace", "path": "displayName", "value": f"Second line {t}"}))
    assert sorted(m["value"] for m in tier2["members"]) == sorted([ada["id"], bob["id"]])
    # removing someone moves them up to the parent unit
    tier2, position = await written(hr, "PATCH", path, patch(
        {"op": "remove", "path": f'members[value eq "{ada["id"]}"]'}))
    assert [m["value"] for m in tier2["members"]] == [bob["id"]]
    person = await rest(hr, f"/v1/people/{ada['id']}", position, auth=auth)
    assert person["unitId"] == u["support"]
    # nobody is removed from the company (the root)
    await scim(hr, "PATCH", f"/Groups/{u['acme']}", patch({"op": "add", "path": "members",
                                                            "value": [{"value": ada["id"]}]}))
    error = await refused(hr, "PATCH", f"/Groups/{u['acme']}", patch(
        {"op": "remove", "path": f'members[value eq "{ada["id"]}"]'}), 400, "invalidValue")
    assert "root" in error["detail"]
    await refused(hr, "PATCH", path, patch({"op": "add", "path": "members", "value": [{"value": u["sales"],
                                                                                      "type": "Group"}]}),
                  400, "invalidValue")
    await refused(hr, "PATCH", path, patch({"op": "add", "path": "members", "value": [{"value": str(uuid.uuid4())}]}),
                  400, "invalidValue")
    await refused(hr, "PATCH", path, patch({"op": "replace", "path": f"{UNIT}:kind", "value": "department"}),
                  400, "mutability")
    # the tree never forms a loop; a team moves under another unit with its history
    await refused(hr, "PATCH", f"/Groups/{u['support']}", patch(
        {"op": "replace", "path": f"{UNIT}:parent.value", "value": tier2["id"]}), 400, "invalidValue")
    await refused(hr, "PATCH", path, patch({"op": "remove", "path": f"{UNIT}:parent"}), 400, "invalidValue")
    tier2, _ = await written(hr, "PATCH", path, patch(
        {"op": "replace", "path": f"{UNIT}:parent", "value": {"value": u["sales"]}}))
    assert tier2[UNIT]["parent"]["value"] == u["sales"]
    with psycopg.connect(database) as conn:
        (state,) = conn.execute("SELECT state FROM goals.goals_events WHERE originator_id = %s AND topic LIKE "
                                "'%%OrgUnit.Moved'", (uuid.UUID(tier2["id"]),)).fetchone()
    assert json.loads(bytes(state))["effective_on"] == {"_type_": "date_iso", "_data_": TODAY}

    # PUT: members and parent left out are kept; a kind that differs is refused
    kept, _ = await written(hr, "PUT", path, {"schemas": [GROUP_SCHEMA], "displayName": f"Tier 2 {t}"})
    assert [m["value"] for m in kept["members"]] == [bob["id"]] and kept[UNIT]["parent"]["value"] == u["sales"]
    assert "externalId" not in kept
    await refused(hr, "PUT", path, group(f"Tier 2 {t}", u["sales"], "department"), 400, "mutability")
    emptied, _ = await written(hr, "PUT", path, {**group(f"Tier 2 {t}", u["sales"]), "members": []},
                               **{"If-Match": kept["meta"]["version"]})
    assert "members" not in emptied
    assert (await scim(hr, "GET", f"/Users/{bob['id']}"))["groups"][0]["value"] == u["sales"]  # moved up

    # a unit with people or units below it is not dissolved; an empty one is, and is gone
    await refused(hr, "DELETE", f"/Groups/{u['support']}", None, 409)
    await refused(hr, "DELETE", f"/Groups/{u['sales']}", None, 409)
    await refused(hr, "DELETE", path, None, 412, **{"If-Match": 'W/"1"'})
    _, position = await written(hr, "DELETE", path, status=204)
    await refused(hr, "GET", path, None, 404)
    await refused(hr, "PATCH", f"/Users/{bob['id']}", patch(
        {"op": "replace", "path": f"{ENTERPRISE}:department", "value": f"Tier 2 {t}"}), 400, "invalidValue")
    unit = await rest(hr, f"/v1/units/{tier2['id']}", position, auth=auth)  # REST still knows the unit
    assert unit["name"] == f"Tier 2 {t}"
    # a group without a parent is a company; a department needs a parent
    await refused(hr, "POST", "/Groups", group(f"Lost {t}", kind="department"), 400, "invalidValue")
    await refused(hr, "POST", "/Groups", group(f"Lost {t}", str(uuid.uuid4())), 400, "invalidValue")
    await refused(hr, "POST", "/Groups", {"schemas": [GROUP_SCHEMA]}, 400, "invalidValue")


# Queries ----------------------------------------------------------------------------------

async def people_for_queries(hr: httpx.AsyncClient) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    u = await org(hr)
    t = u["tag"]
    people: dict[str, dict[str, Any]] = {}
    specs = [
        ("ada", "Ada", "Lovelace", f"Sales {t}", True, [("work", "ada@acme.io"), ("home", "ada@home.io")]),
        ("bob", "Bob", "Babbage", f"Sales {t}", True, [("work", "bob@acme.io")]),
        ("cyd", "Cyd", None, f"Support {t}", False, [("home", "cyd@mail.io")]),
        ("dee", "Dee", "Dunn", f"Support {t}", True, [("work", "dee@acme.io")]),
        ("eve", "Eve", "Lovell", f"Tier 1 {t}", True, [("other", "eve@other.io")]),
    ]
    for key, given, family, department, active, emails in specs:
        body = {**user(f"{key}.{t}", department), "active": active, "externalId": f"{key.upper()}-{t}",
                "name": {k: v for k, v in {"givenName": given, "familyName": family}.items() if v},
                "emails": [{"type": kind, "value": f"{t}.{address}"} for kind, address in emails]}
        if key == "bob":
            body[ENTERPRISE]["manager"] = {"value": people["ada"]["id"]}
        people[key] = await scim(hr, "POST", "/Users", body, 201)
    return u, people


async def names(hr: httpx.AsyncClient, query: str, t: str) -> list[str]:
    page = await scim(hr, "GET", f"/Users?{query}")
    return [r["userName"].removesuffix(f".{t}") for r in page.get("Resources", [])]


async def test_filters_of_every_operator(hr: httpx.AsyncClient) -> None:
    u, people = await people_for_queries(hr)
    t = u["tag"]
    mine = f'(userName ew ".{t}")'
    everyone = (await scim(hr, "GET", "/Users?count=200&filter=" + quote(mine)))["Resources"]
    assert len(everyone) == 5
    cases = {
        f'userName eq "ADA.{t}"': ["ada"],                      # case aside
        'externalId eq "ada-' + t + '"': [],                    # externalId is caseExact
        f'externalId eq "ADA-{t}"': ["ada"],
        'name.familyName ne "Lovelace"': ["bob", "cyd", "dee", "eve"],  # no family name: ne holds
        'name.familyName co "ove"': ["ada", "eve"],
        'displayName sw "d"': ["dee"],
        'emails ew "acme.io"': ["ada", "bob", "dee"],         # any of the values
        'emails.value ne "' + t + '.ada@home.io"': ["bob", "cyd", "dee", "eve"],  # none of them equals
        "name.familyName pr": ["ada", "bob", "dee", "eve"],
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager pr": ["bob"],
        'name.givenName gt "Cyd"': ["dee", "eve"],
        'name.givenName ge "Cyd"': ["cyd", "dee", "eve"],
        'name.givenName lt "Bob"': ["ada"],
        'name.givenName le "bob"': ["ada", "bob"],
        "active eq false": ["cyd"],
        'emails[type eq "work" and value sw "' + t + '.b"]': ["bob"],
        'emails[type eq "home"] and active eq true': ["ada"],
        'not (emails[type eq "work"])': ["cyd", "eve"],
        'name.givenName eq "Ada" or name.givenName eq "Eve" and active eq false': ["ada"],
        '(name.givenName eq "Ada" or name.givenName eq "Eve") and active eq true': ["ada", "eve"],
        f'{ENTERPRISE}:department eq "support {t}"': ["cyd", "dee"],
        f'{ENTERPRISE}:manager.value eq "{people["ada"]["id"]}"': ["bob"],
        f'groups.value eq "{u["tier1"]}"': ["eve"],
        f'meta.created ge "{people["cyd"]["meta"]["created"]}"': ["cyd", "dee", "eve"],
        f'meta.lastModified lt "{people["bob"]["meta"]["lastModified"]}"': ["ada"],
        'meta.version eq "W/\\"1\\""': ["ada", "bob", "cyd", "dee", "eve"],
        'nickName pr or title eq "x"': [],                      # declared but never kept: absent
        'nickName ne "x"': ["ada", "bob", "cyd", "dee", "eve"],
    }
    for scim_filter, expected in cases.items():
        got = await names(hr, "sortBy=userName&filter=" + quote(f"{mine} and ({scim_filter})"), t)
        assert got == expected, scim_filter
        # and the SQL reads the filter as scim2-models' own evaluator does
        matcher = ScimFilter[ScimUser](scim_filter)
        by_model = [r["userName"].removesuffix(f".{t}") for r in everyone
                    if matcher.match(ScimUser.model_validate(r, scim_ctx=Context.RESOURCE_QUERY_RESPONSE))]
        assert sorted(by_model) == expected, scim_filter

    for bad in ['userName eq', 'shoeSize eq "44"', "active gt true", 'emails[type eq "work"', 'userName xx "a"',
                'meta.created gt "yesterday"', "name.givenName eq Ada"]:
        await refused(hr, "GET", "/Users?filter=" + quote(bad), None, 400, "invalidFilter")

    groups = await scim(hr, "GET", "/Groups?filter=" + quote(
        f'displayName ew " {t}" and {UNIT}:kind eq "department" and members.value eq "{people["dee"]["id"]}"'))
    assert [g["displayName"] for g in groups["Resources"]] == [f"Support {t}"]
    groups = await scim(hr, "GET", "/Groups?sortBy=displayName&filter=" + quote(
        f'{UNIT}:parent.value eq "{u["acme"]}" or members[display sw "eve"] and displayName ew "{t}"'))
    assert [g["displayName"] for g in groups["Resources"]] == [f"Sales {t}", f"Support {t}", f"Tier 1 {t}"]


async def test_paging_sorting_and_attributes(hr: httpx.AsyncClient) -> None:
    u, people = await people_for_queries(hr)
    t = u["tag"]
    mine = quote(f'userName ew ".{t}"')
    page = await scim(hr, "GET", f"/Users?filter={mine}&sortBy=userName&startIndex=2&count=2")
    assert (page["totalResults"], page["startIndex"], page["itemsPerPage"]) == (5, 2, 2)
    assert [r["userName"] for r in page["Resources"]] == [f"bob.{t}", f"cyd.{t}"]
    last = await scim(hr, "GET", f"/Users?filter={mine}&sortBy=userName&startIndex=5&count=2")
    assert [r["userName"] for r in last["Resources"]] == [f"eve.{t}"] and last["itemsPerPage"] == 1
    beyond = await scim(hr, "GET", f"/Users?filter={mine}&startIndex=9")
    assert (beyond["totalResults"], beyond["itemsPerPage"], beyond.get("Resources")) == (5, 0, [])
    counted = await scim(hr, "GET", f"/Users?filter={mine}&count=0")
    assert (counted["totalResults"], counted["itemsPerPage"]) == (5, 0)
    below_one = await scim(hr, "GET", f"/Users?filter={mine}&startIndex=-3&count=1&sortBy=userName")
    assert below_one["startIndex"] == 1 and below_one["Resources"][0]["userName"] == f"ada.{t}"

    assert await names(hr, f"filter={mine}&sortBy=userName&sortOrder=descending", t) == [
        "eve", "dee", "cyd", "bob", "ada"]
    # no family name: last ascending, first descending
    assert await names(hr, f"filter={mine}&sortBy=name.familyName", t) == ["bob", "dee", "ada", "eve", "cyd"]
    assert await names(hr, f"filter={mine}&sortBy=name.familyName&sortOrder=descending", t) == [
        "cyd", "eve", "ada", "dee", "bob"]
    assert await names(hr, f"filter={mine}&sortBy=emails", t) == ["ada", "bob", "cyd", "dee", "eve"]
    assert await names(hr, f"filter={mine}&sortBy=meta.created&sortOrder=descending", t) == [
        "eve", "dee", "cyd", "bob", "ada"]
    assert await names(hr, f"filter={mine}&sortBy=active&count=1", t) == ["cyd"]  # false before true

    only = await scim(hr, "GET", f"/Users?filter={mine}&sortBy=userName&count=1&attributes=userName,"
                                 f"{ENTERPRISE}:department")
    assert only["Resources"] == [{"schemas": [USER_SCHEMA, ENTERPRISE], "id": people["ada"]["id"],
                                  "userName": f"ada.{t}", ENTERPRISE: {"department": f"Sales {t}"}}]
    without = await scim(hr, "GET", f"/Users/{people['ada']['id']}?excludedAttributes=emails,name,groups,meta")
    assert set(without) == {"schemas", "id", "userName", "displayName", "active", "externalId", ENTERPRISE}
    group_only = await scim(hr, "GET", f"/Groups/{u['sales']}?attributes=displayName")
    assert group_only == {"schemas": [GROUP_SCHEMA], "id": u["sales"], "displayName": f"Sales {t}"}
    no_members = await scim(hr, "GET", "/Groups?excludedAttributes=members&filter=" + quote(
        f'displayName eq "Sales {t}"'))
    assert "members" not in no_members["Resources"][0]
    await refused(hr, "GET", "/Users?attributes=userName&excludedAttributes=emails", None, 400, "invalidValue")

    # POST .search at a resource endpoint and at the root (Users and Groups together)
    found = await scim(hr, "POST", "/Users/.search", {
        "schemas": [SEARCH], "filter": f'userName ew ".{t}" and active eq true', "sortBy": "userName",
        "sortOrder": "descending", "startIndex": 1, "count": 2, "attributes": ["userName"]})
    assert found["totalResults"] == 4 and [r["userName"] for r in found["Resources"]] == [f"eve.{t}", f"dee.{t}"]
    both = await scim(hr, "POST", "/.search", {
        "schemas": [SEARCH], "sortBy": "meta.created",
        "filter": f'userName eq "ada.{t}" or displayName eq "Sales {t}" or displayName eq "Tier 1 {t}"'})
    assert [(r["meta"]["resourceType"], r.get("userName") or r["displayName"]) for r in both["Resources"]] == [
        ("Group", f"Sales {t}"), ("Group", f"Tier 1 {t}"), ("User", f"ada.{t}")]
    page = await scim(hr, "POST", "/.search", {"filter": f'displayName ew "{t}" or userName ew ".{t}"',
                                               "sortBy": "displayName",
                                               "count": 3, "startIndex": 4})
    assert page["totalResults"] == 9 and len(page["Resources"]) == 3
    await refused(hr, "POST", "/.search", {"filter": 'shoeSize eq "44"'}, 400, "invalidFilter")
    await refused(hr, "POST", "/Groups/.search", {"filter": "userName pr"}, 400, "invalidFilter")
    await refused(hr, "POST", "/.search", {"count": "all"}, 400, "invalidValue")


# Bulk -------------------------------------------------------------------------------------

async def test_bulk_with_bulk_id_references(hr: httpx.AsyncClient, auth: Callable[..., dict[str, str]]) -> None:
    u = await org(hr)
    t = u["tag"]
    # the team refers to people created after it in the request, and to a parent created before
    request = {"schemas": [BULK], "Operations": [
        {"method": "POST", "path": "/Groups", "bulkId": "team", "data": {
            **group(f"Tier 3 {t}", "bulkId:dept"), "members": [{"value": "bulkId:ada"}, {"value": "bulkId:bob"}]}},
        {"method": "POST", "path": "/Users", "bulkId": "bob", "data": {
            **user(f"bob.{t}@acme.io", f"Sales {t}"),
            ENTERPRISE: {"department": f"Sales {t}", "manager": {"value": "bulkId:ada"}}}},
        {"method": "POST", "path": "/Groups", "bulkId": "dept", "data": group(f"Ops {t}", u["acme"], "department")},
        {"method": "POST", "path": "/Users", "bulkId": "ada", "data": user(f"ada.{t}@acme.io", f"Sales {t}")},
        {"method": "PATCH", "path": "/Users/bulkId:ada", "data": patch(
            {"op": "replace", "path": "displayName", "value": "Ada L"})},
        {"method": "DELETE", "path": "/Users/bulkId:bob"},
    ]}
    r = await hr.post("/scim/v2/Bulk", json=request)
    assert r.status_code == 200 and r.headers["content-type"] == "application/scim+json", r.text
    answer = r.json()
    assert answer["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:BulkResponse"]
    results = answer["Operations"]
    assert [(o["method"], o.get("bulkId"), o["status"]) for o in results] == [
        ("POST", "team", "201"), ("POST", "bob", "201"), ("POST", "dept", "201"), ("POST", "ada", "201"),
        ("PATCH", None, "200"), ("DELETE", None, "204")]
    ids = {o["bulkId"]: o["location"].rsplit("/", 1)[1] for o in results if o.get("bulkId")}
    assert results[4]["location"] == f"http://testserver/scim/v2/Users/{ids['ada']}"
    assert results[4]["version"] == 'W/"3"'  # joined, moved into the team (which ran first), renamed
    team = await scim(hr, "GET", f"/Groups/{ids['team']}")
    assert team[UNIT]["parent"]["value"] == ids["dept"]
    assert [m["value"] for m in team["members"]] == [ids["ada"]]  # bob was deleted at the end
    ada = await scim(hr, "GET", f"/Users/{ids['ada']}")
    assert (ada["displayName"], ada["groups"][0]["value"]) == ("Ada L", ids["team"])
    await refused(hr, "GET", f"/Users/{ids['bob']}", None, 404)
    bob = (await hr.get(f"/v1/people/{ids['bob']}", headers=auth("admin"))).json()
    assert bob["managerId"] == ids["ada"] and bob["leftOn"] == TODAY


async def test_bulk_errors_and_fail_on_errors(hr: httpx.AsyncClient) -> None:
    u = await org(hr)
    t = u["tag"]
    taken = await scim(hr, "POST", "/Users", user(f"taken.{t}@acme.io", f"Sales {t}"), 201)
    operations = [
        {"method": "POST", "path": "/Users", "bulkId": "dup", "data": user(f"TAKEN.{t}@acme.io", f"Sales {t}")},
        {"method": "PATCH", "path": "/Users/bulkId:dup", "data": patch(
            {"op": "replace", "path": "active", "value": False})},
        {"method": "POST", "path": "/Users", "bulkId": "x", "data": {
            **user(f"x.{t}@acme.io", f"Sales {t}"), ENTERPRISE: {"manager": {"value": "bulkId:y"}}}},
        {"method": "POST", "path": "/Users", "bulkId": "y", "data": {
            **user(f"y.{t}@acme.io", f"Sales {t}"), ENTERPRISE: {"manager": {"value": "bulkId:x"}}}},
        {"method": "PUT", "path": f"/Users/{taken['id']}", "version": 'W/"9"', "data": user(f"taken.{t}@acme.io")},
        {"method": "PATCH", "path": "/Users/bulkId:nobody", "data": patch(
            {"op": "replace", "path": "active", "value": False})},
        {"method": "POST", "path": "/Users", "data": user(f"z.{t}@acme.io", f"Sales {t}")},  # no bulkId
        {"method": "POST", "path": "/Pets", "bulkId": "pet", "data": user(f"p.{t}@acme.io")},
        {"method": "PATCH", "path": f"/Users/{taken['id']}", "version": 'W/"1"', "data": patch(
            {"op": "replace", "path": "displayName", "value": "Still here"})},
    ]
    answer = await scim(hr, "POST", "/Bulk", {"schemas": [BULK], "Operations": operations})
    outcome = [(o["status"], o.get("response", {}).get("scimType")) for o in answer["Operations"]]
    assert outcome == [("409", "uniqueness"), ("409", None), ("409", None), ("409", None), ("412", None),
                       ("400", "invalidValue"), ("400", "invalidValue"), ("400", "invalidPath"), ("200", None)]
    assert all(o["response"]["schemas"] == [ERROR] for o in answer["Operations"][:-1])
    assert (await scim(hr, "GET", f"/Users/{taken['id']}"))["displayName"] == "Still here"

    # failOnErrors: stop after that many errors, answer what ran
    answer = await scim(hr, "POST", "/Bulk", {"schemas": [BULK], "failOnErrors": 2, "Operations": [
        {"method": "POST", "path": "/Users", "bulkId": "a", "data": user(f"a.{t}@acme.io", f"Sales {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "b", "data": user(f"b.{t}", f"Sales {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "c", "data": user(f"c.{t}", f"Sales {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "d", "data": user(f"d.{t}@acme.io", f"Sales {t}")},
    ]})
    assert [(o["bulkId"], o["status"]) for o in answer["Operations"]] == [("a", "201"), ("b", "400"), ("c", "400")]
    assert await names(hr, "filter=" + quote(f'userName sw "d.{t}"'), t) == []

    await refused(hr, "POST", "/Bulk", {"schemas": [BULK], "Operations": []}, 400, "invalidValue")
    await refused(hr, "POST", "/Bulk", {"schemas": [BULK]}, 400, "invalidValue")
    await refused(hr, "POST", "/Bulk", {"schemas": [BULK], "Operations": [{"method": "DELETE",
                                                                          "path": "/Users/x"}] * 1001}, 413)
    r = await hr.post("/scim/v2/Bulk", content=b" " * 1_048_577, headers={"Content-Type": "application/scim+json"})
    assert r.status_code == 413 and r.json()["schemas"] == [ERROR]


async def test_bulk_commits_independent_operations_together(hr: httpx.AsyncClient, goals_app: Any) -> None:
    """New Users (and new Groups) that cannot see each other's effects run together: their saves
    are committed in a few transactions, not one each, and every operation is answered as it
    would be run alone in its turn: a refused one in the middle fails alone, a repeated user
    name is refused against the one before it, references and failOnErrors hold."""
    u = await org(hr)
    t = u["tag"]
    committer = goals_app.state.application.recorder.group_commit
    people = [{"method": "POST", "path": "/Users", "bulkId": f"p{n}", "data": user(f"p{n}.{t}@acme.io", f"Sales {t}")}
              for n in range(30)]
    people[10] = {"method": "POST", "path": "/Users", "bulkId": "bad",  # in the middle: no such unit
                  "data": user(f"bad.{t}@acme.io", f"Nowhere {t}")}
    people[20] = {"method": "POST", "path": "/Users", "bulkId": "again",  # the same user name as p3
                  "data": user(f"P3.{t}@ACME.io", f"Sales {t}")}
    operations = [
        *people,
        {"method": "POST", "path": "/Groups", "bulkId": "squad", "data": group(f"Squad {t}", u["sales"])},
        {"method": "POST", "path": "/Groups", "bulkId": "pair", "data": {
            **group(f"Pair {t}", "bulkId:squad"), "members": [{"value": "bulkId:p1"}, {"value": "bulkId:p2"}]}},
        {"method": "POST", "path": "/Groups", "bulkId": "trio", "data": {
            **group(f"Trio {t}", "bulkId:squad"), "members": [{"value": "bulkId:p4"}, {"value": "bulkId:p5"}]}},
        {"method": "PATCH", "path": "/Users/bulkId:p6", "data": patch(
            {"op": "replace", "path": "displayName", "value": "Six"})},
    ]
    saves, batches = committer.saves, committer.batches
    answer = await scim(hr, "POST", "/Bulk", {"schemas": [BULK], "Operations": operations})
    results = answer["Operations"]
    statuses = [(o.get("bulkId"), o["status"], o.get("response", {}).get("scimType")) for o in results]
    expected = [(f"p{n}", "201", None) for n in range(30)]
    expected[10], expected[20] = ("bad", "400", "invalidValue"), ("again", "409", "uniqueness")
    assert statuses == [*expected, ("squad", "201", None), ("pair", "201", None), ("trio", "201", None),
                        (None, "200", None)]
    written = len([o for o in results if o["status"] in ("200", "201")])
    assert committer.saves - saves == written == 32
    # The 28 new people went in a few transactions; so did the two sibling groups.
    assert committer.batches - batches <= written - 20, (committer.batches - batches, written)
    ids = {o["bulkId"]: o["location"].rsplit("/", 1)[1] for o in results if o["status"] == "201"}
    assert len(set(ids.values())) == len(ids) == 31
    assert all(o["version"] == 'W/"1"' for o in results[:30] if o["status"] == "201")
    pair = await scim(hr, "GET", f"/Groups/{ids['pair']}")
    assert pair[UNIT]["parent"]["value"] == ids["squad"]
    assert sorted(m["value"] for m in pair["members"]) == sorted([ids["p1"], ids["p2"]])
    six = await scim(hr, "GET", f"/Users/{ids['p6']}")
    assert six["displayName"] == "Six" and results[-1]["version"] == six["meta"]["version"]
    assert len(await names(hr, "filter=" + quote(f'userName ew ".{t}@acme.io"') + "&count=100", t)) == 28

    # failOnErrors in a wave: the job stops where it would have stopped one by one.
    answer = await scim(hr, "POST", "/Bulk", {"schemas": [BULK], "failOnErrors": 2, "Operations": [
        {"method": "POST", "path": "/Users", "bulkId": "a", "data": user(f"fa.{t}@acme.io", f"Sales {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "b", "data": user(f"fb.{t}@acme.io", f"Nowhere {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "c", "data": user(f"fc.{t}@acme.io", f"Sales {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "d", "data": user(f"fd.{t}@acme.io", f"Nowhere {t}")},
        {"method": "POST", "path": "/Users", "bulkId": "e", "data": user(f"fe.{t}@acme.io", f"Sales {t}")},
    ]})
    assert [(o["bulkId"], o["status"]) for o in answer["Operations"]] == [
        ("a", "201"), ("b", "400"), ("c", "201"), ("d", "400")]
    assert await names(hr, "filter=" + quote(f'userName sw "fe.{t}"'), t) == []


# The read model ---------------------------------------------------------------------------

async def test_the_read_model_rebuilds_from_scim_events(hr: httpx.AsyncClient, database: str) -> None:
    """What SCIM wrote (profiles, moves, deactivation, dissolved units, people who left and
    the flags on their objectives) replays into the same rows."""
    u = await org(hr)
    t = u["tag"]
    ada = await scim(hr, "POST", "/Users", {**user(f"ada.{t}@acme.io", f"Sales {t}"), "externalId": "x"}, 201)
    await scim(hr, "PATCH", f"/Users/{ada['id']}", patch({"op": "replace", "path": "active", "value": False}))
    team = await scim(hr, "POST", "/Groups", group(f"Gone {t}", u["sales"], externalId="g"), 201)
    await scim(hr, "PATCH", f"/Groups/{team['id']}", patch({"op": "replace", "path": "externalId", "value": "h"}))
    await scim(hr, "DELETE", f"/Groups/{team['id']}", status=204)
    await scim(hr, "DELETE", f"/Users/{ada['id']}", status=204)
    with psycopg.connect(database) as conn:
        head = conn.execute("SELECT max(notification_id) FROM goals.goals_events").fetchone()[0]

    def rebuild() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS goals_rebuild CASCADE")
        ensure_schema(database, "goals_rebuild")
        spec = ProjectionSpec(Goals, GoalsProjection, GoalsReadModel, "goals", "goals_rebuild")
        with ProjectionRunner(application_class=Goals, projection_class=GoalsProjection,
                              view_class=GoalsReadModel, env=spec.env(database)) as runner:
            runner.wait(head, timeout=60)

    await asyncio.to_thread(rebuild)
    with psycopg.connect(database) as conn:
        for table, key in (("people", "id"), ("units", "id"), ("objectives", "id"),
                           ("person_units", "person_id, version"), ("person_managers", "person_id, version")):
            live = conn.execute(f"SELECT * FROM goals.{table} ORDER BY {key}").fetchall()
            rebuilt = conn.execute(f"SELECT * FROM goals_rebuild.{table} ORDER BY {key}").fetchall()
            assert live == rebuilt, table
        assert conn.execute("SELECT dissolved_on, external_id FROM goals.units WHERE id = %s",
                            (uuid.UUID(team["id"]),)).fetchone() == (date.today(), "h")
        conn.execute("DROP SCHEMA goals_rebuild CASCADE")
        conn.commit()


async def test_every_sql_column_names_an_attribute_of_its_model() -> None:
    """A column keyed by a misspelt URN would never be found, and its attribute would read as
    absent in every filter: each key must be the URN the model resolves its attribute to."""
    for table in (USERS, GROUPS):
        keys = [*table.columns, *table.many,
                *(f"{head}.{sub}" for head, many in table.many.items() for sub in many.subs)]
        for key in keys:
            binding = ScimPath[table.model](key).resolve()
            assert binding is not None and binding.urn.lower() == key, key


async def test_malformed_requests_get_a_4xx_never_a_500(hr: httpx.AsyncClient) -> None:
    u = await org(hr)
    t = u["tag"]
    ada = await scim(hr, "POST", "/Users", user(f"ada.{t}@acme.io", f"Sales {t}"), 201)
    garbage: list[tuple[str, str, Any]] = [
        ("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": 5}),
        ("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "x@acme.io", "emails": "x@acme.io"}),
        ("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "x@acme.io", ENTERPRISE: "Sales"}),
        ("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "   "}),
        ("POST", "/Users", {"schemas": [USER_SCHEMA], "userName": "x" * 20_000}),
        ("POST", "/Groups", {"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{"value": 7}]}),
        ("POST", "/Groups", {"schemas": [GROUP_SCHEMA], "displayName": "G", UNIT: {"kind": "galaxy"}}),
        ("POST", "/Groups", {"schemas": [GROUP_SCHEMA], "displayName": "G", UNIT: {"parent": {"value": "nope"}}}),
        ("PATCH", f"/Users/{ada['id']}", {"schemas": [PATCH_OP], "Operations": "replace"}),
        ("PATCH", f"/Users/{ada['id']}", {"schemas": [PATCH_OP], "Operations": [{"op": "add"}]}),
        ("PATCH", f"/Users/{ada['id']}", {"schemas": [PATCH_OP], "Operations": [{"op": "replace", "value": 3}]}),
        ("PATCH", f"/Users/{ada['id']}", {"schemas": [PATCH_OP], "Operations": [
            {"op": "add", "path": "emails", "value": [{"value": "a@acme.io", "primary": True},
                                                      {"value": "b@acme.io", "primary": True}]}]}),
        ("PATCH", f"/Groups/{u['sales']}", {"schemas": [PATCH_OP], "Operations": [
            {"op": "replace", "path": "members", "value": {"value": "x"}}]}),
        ("PUT", f"/Groups/{u['sales']}", {"schemas": [GROUP_SCHEMA]}),
        ("POST", "/Bulk", {"schemas": [BULK], "Operations": [1, "two", None]}),
        ("POST", "/Bulk", {"schemas": [BULK], "Operations": [{"method": "GET", "path": "/Users"}]}),
        ("POST", "/Bulk", {"schemas": [BULK], "failOnErrors": "many", "Operations": []}),
        ("POST", "/Users/.search", {"filter": 5}),
        ("POST", "/Users/.search", {"sortOrder": "sideways"}),
        ("POST", "/Users/.search", {"attributes": "userName", "startIndex": 99_999_999_999_999_999_999}),
        ("POST", "/.search", []),
        ("GET", "/Users?startIndex=99999999999999999999999", None),
        ("GET", "/Users?filter=" + quote('meta.created gt "2026-01-01T00:00:00"'), None),
        ("GET", "/Users?filter=" + quote('emails[value eq "a@acme.io"].type eq "work"'), None),
        ("GET", f"/Users/{ada['id']}?attributes=" + quote("emails[type eq \"work\"]"), None),
    ]
    for method, path, body in garbage:
        r = await hr.request(method, f"/scim/v2{path}", json=body)
        assert r.status_code < 500, (method, path, r.text)
        if r.status_code >= 400:
            assert r.json()["schemas"] == [ERROR], r.text
        elif method == "POST" and path == "/Bulk":
            assert all(int(o["status"]) >= 400 for o in r.json()["Operations"]), r.text
