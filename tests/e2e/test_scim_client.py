"""End to end: a real SCIM client library (scim2-client) provisions people and units in the
running goals process over HTTP, as an HR system would: discovery, create, filter, patch,
bulk and delete; the goals REST API then shows what it did, with the history kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date
from typing import Any, cast

import httpx
import pytest
from scim2_client import BaseSyncSCIMClient
from scim2_models import (
    BulkOperation,
    BulkRequest,
    Error,
    ListResponse,
    PatchOp,
    PatchOperation,
    SCIMException,
    SearchRequest,
)

from services.stack import Stack

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
UNIT = "urn:tandem:params:scim:schemas:extension:unit:2.0:Group"
TODAY = date.today().isoformat()


class HttpxSCIMClient(BaseSyncSCIMClient):
    """scim2-client's synchronous client on an httpx.Client (its own engine takes httpx2, which
    is httpx's API under another name)."""

    def __init__(self, client: httpx.Client, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, url, **kwargs)


class Positions:
    """The last log position a SCIM write reported, to read its effect over REST."""

    def __init__(self) -> None:
        self.last = "goals=0"

    def __call__(self, response: httpx.Response) -> None:
        if "Tandem-Position" in response.headers:
            self.last = response.headers["Tandem-Position"]


@pytest.fixture(scope="module")
def positions() -> Positions:
    return Positions()


@pytest.fixture(scope="module")
def scim(stack: Stack, auth: Callable[..., dict[str, str]], positions: Positions) -> Iterator[HttpxSCIMClient]:
    with httpx.Client(base_url=f"{stack.url('goals')}/scim/v2", headers=auth("hr_sync", "workday"), timeout=30,
                      event_hooks={"response": [positions]}) as http:
        client = HttpxSCIMClient(http)
        client.discover()
        yield client


@pytest.fixture(scope="module")
def rest(stack: Stack, auth: Callable[..., dict[str, str]], positions: Positions) -> Callable[[str], dict[str, Any]]:
    def read(path: str) -> dict[str, Any]:
        r = httpx.get(f"{stack.url('goals')}{path}", timeout=30,
                      headers={**auth("auditor", "e2e"), "Tandem-Wait-For": positions.last})
        assert r.status_code == 200, r.text
        return cast(dict[str, Any], r.json())

    return read


def test_a_scim_client_provisions_people_and_units(scim: HttpxSCIMClient,
                                                   rest: Callable[[str], dict[str, Any]]) -> None:
    # What discovery told the client: Users with the enterprise extension, Groups with Tandem's.
    UserModel = scim.get_resource_model("User")  # noqa: N806 - models built from the server's schemas
    GroupModel = scim.get_resource_model("Group")  # noqa: N806
    assert UserModel is not None and GroupModel is not None
    assert {str(t.name) for t in scim.provider.resource_types} == {"User", "Group"}
    assert scim.provider.config is not None and scim.provider.config.bulk.supported
    enterprise = UserModel.get_extension_model(ENTERPRISE)
    unit = GroupModel.get_extension_model(UNIT)
    assert enterprise is not None and unit is not None

    def group(name: str, parent: str | None = None, kind: str | None = None) -> Any:
        g = GroupModel(display_name=name)
        g[unit] = unit(kind=kind, parent={"value": parent} if parent else None)
        return g

    acme = scim.create(group("Acme"))
    sales = scim.create(group("Sales", acme.id, "department"))
    support = scim.create(group("Support", acme.id, "department"))
    assert acme[unit].kind == "company" and sales[unit].parent.value == acme.id
    assert sales.meta.version == 'W/"1"'

    ada = UserModel(user_name="ada@acme.example", display_name="Ada Lovelace",
                    name={"givenName": "Ada", "familyName": "Lovelace"},
                    emails=[{"value": "ada@acme.example", "type": "work", "primary": True}])
    ada[enterprise] = enterprise(department="Sales")
    ada = scim.create(ada)
    assert ada.meta.location.endswith(f"/Users/{ada.id}") and ada[enterprise].department == "Sales"
    grace = UserModel(user_name="grace@acme.example", emails=[{"value": "grace@acme.example", "type": "work"}])
    grace[enterprise] = enterprise(department="Sales", manager={"value": ada.id})
    grace = scim.create(grace)
    assert grace[enterprise].manager.value == ada.id

    # the same user name again: a SCIM error, which the client raises
    with pytest.raises(SCIMException) as refused:
        scim.create(UserModel(user_name="ADA@acme.example"))
    assert refused.value.to_error().scim_type == "uniqueness"

    # filters
    found = scim.query(UserModel, SearchRequest(
        filter=f'{ENTERPRISE}:department eq "sales" and emails[type eq "work" and value sw "grace"]'))
    assert isinstance(found, ListResponse)
    assert found.total_results == 1 and found.resources[0].id == grace.id
    both = scim.query(UserModel, SearchRequest(filter='userName ew "@acme.example"', sort_by="userName",
                                               sort_order="descending", attributes=["userName"]))
    assert [u.user_name for u in both.resources] == ["grace@acme.example", "ada@acme.example"]
    assert both.resources[0].emails is None  # only what was asked for

    # a patch with a filtered path and a move by department; the client sends the ETag it read
    patched = scim.modify(ada, PatchOp[UserModel](operations=[
        PatchOperation[UserModel](op="replace", path='emails[type eq "work"].value', value="ada.l@acme.example"),
        PatchOperation[UserModel](op="replace", path=f"{ENTERPRISE}:department", value="Support"),
    ]))
    assert patched is not None and patched.emails[0].value == "ada.l@acme.example"
    assert patched[enterprise].department == "Support" and patched.meta.version == 'W/"3"'
    person = rest(f"/v1/people/{ada.id}")
    assert (person["email"], person["unitId"]) == ("ada.l@acme.example", support.id)
    # moved the day she joined: only the last unit of the day took effect
    assert [(h["unitId"], h["fromOn"]) for h in person["unitHistory"]] == [(support.id, TODAY)]

    # bulk: a team under Support with Grace and a new hire in it, the hire created after the
    # team in the request and named by its bulkId; then Ada renamed with the ETag she has
    team = group("Tier 1", support.id)
    team.members = [{"value": grace.id}, {"value": "bulkId:alan"}]
    hire = UserModel(user_name="alan@acme.example", emails=[{"value": "alan@acme.example"}])
    hire[enterprise] = enterprise(department="Support", manager={"value": ada.id})
    answer = scim.bulk(BulkRequest[UserModel | GroupModel](fail_on_errors=1, operations=[
        BulkOperation[GroupModel](method="POST", bulk_id="tier1", path="/Groups", data=team),
        BulkOperation[UserModel](method="POST", bulk_id="alan", path="/Users", data=hire),
        BulkOperation[UserModel](method="PATCH", path=f"/Users/{ada.id}", version=patched.meta.version,
                                 data=PatchOp[UserModel](operations=[PatchOperation[UserModel](
                                     op="replace", path="displayName", value="Countess Lovelace")])),
    ]))
    assert not isinstance(answer, Error)
    assert [(o.method, o.bulk_id, o.status) for o in answer.operations] == [
        ("POST", "tier1", 201), ("POST", "alan", 201), ("PATCH", None, 200)]
    tier1_id, alan_id = (o.location.rsplit("/", 1)[1] for o in answer.operations[:2])
    tier1 = scim.query(GroupModel, tier1_id)
    assert sorted(m.value for m in tier1.members) == sorted([grace.id, alan_id])
    assert tier1[unit].kind == "team" and tier1[unit].parent.value == support.id
    alan = scim.query(UserModel, alan_id)
    assert alan[enterprise].department == "Tier 1" and alan[enterprise].manager.value == ada.id

    # delete: Grace leaves. The copy the client holds is stale (the team moved her): 412
    with pytest.raises(SCIMException) as stale:
        scim.delete(grace)
    assert stale.value.to_error().status == 412
    scim.delete(scim.query(UserModel, grace.id))
    with pytest.raises(SCIMException) as gone:
        scim.query(UserModel, grace.id)
    assert gone.value.to_error().status == 404
    person = rest(f"/v1/people/{grace.id}")
    assert person["leftOn"] == TODAY and person["managerId"] == ada.id
    assert [h["unitId"] for h in person["unitHistory"]] == [tier1.id]  # Sales, then Tier 1 the same day
    assert rest(f"/v1/people/{ada.id}")["name"] == "Countess Lovelace"


def test_every_failure_is_a_scim_error(scim: HttpxSCIMClient, stack: Stack,
                                       auth: Callable[..., dict[str, str]]) -> None:
    raw = scim.request("GET", "/Users", params={"filter": "userName eq"})
    assert raw.status_code == 400 and raw.json()["scimType"] == "invalidFilter"
    assert raw.headers["content-type"] == "application/scim+json"
    not_allowed = scim.request("DELETE", "/Schemas")
    assert not_allowed.status_code == 405 and not_allowed.json()["schemas"] == [str(Error.__schema__)]
    for headers in ({}, auth("admin", "e2e")):
        r = httpx.get(f"{stack.url('goals')}/scim/v2/Users", headers=headers, timeout=30)
        assert r.status_code in (401, 403) and r.json()["schemas"] == [str(Error.__schema__)]
