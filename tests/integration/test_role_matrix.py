"""The role matrix: every REST operation of the contracts (tests.operations, so a new endpoint
cannot be missed), for every role and for no token at all, gets the answer the contract
documents (`x-tandem-roles`, generated from the routes' role checks):

- a role the operation lets through: 2xx, on real resources made fresh for each try (a write
  that uses its resource up, such as closing or deleting, gets its own); the few honest
  exceptions are in `NOT_2XX`;
- a member, where the contract limits them (`x-tandem-member-scope`): 2xx on an objective or key
  result of their own unit, 403 on another unit's;
- any other role: 403 (problem details, title "Forbidden"), whatever the body and headers, and
  nothing appended;
- no token: 401.

The contract is checked against the policy of DESIGN.md as written out here (`POLICY`), so the
matrix cannot pass by a role check loosened in the code and the contract alike. Bad tokens
(expired, wrongly signed, `alg: none`) are tests/integration/test_auth_tokens.py's; GraphQL
mutations for every role are tests/e2e/test_auditor_graphql.py's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.operations import (
    ROLES,
    SERVICES,
    Operation,
    all_operations,
    created,
    events_by,
    fill,
    operations,
    serve_goals,
    serve_metrics,
)

in_session_loop = pytest.mark.asyncio(loop_scope="session")

Headers = Callable[..., dict[str, str]]
SUBJECTS = {"admin": "matrix-admin", "service": "matrix-service", "auditor": "matrix-auditor",
            "hr_sync": "matrix-hris"}  # a member's subject is the person's id (World.mia)

DATA_READERS = {"admin", "member", "auditor", "service"}
OPERATORS = {"admin", "service"}
GOAL_WRITERS = {"admin", "member", "service"}


def policy(op: Operation) -> set[str]:
    """Who may call the operation, as DESIGN.md and issue 9 say, written out by hand."""
    if op.path == "/v1/audit/chain":
        return {"admin", "auditor"}
    if op.path.startswith("/v1/webhooks"):  # configuration of the changes feed's pushes
        return {"admin"} if op.write else {"admin", "auditor", "hr_sync"}
    if not op.write:
        # hr_sync reads SCIM (not in the contract) and the feeds only.
        return set(ROLES) if op.path in ("/v1/changes", "/v1/people/{person_id}/goals") else DATA_READERS
    if op.service == "goals" and op.path.startswith(("/v1/objectives", "/v1/key-results")) \
            and not op.path.endswith("/regrade"):
        return GOAL_WRITERS  # a member: their own and their unit's only
    return OPERATORS  # the organisation, cycles, grades, KPIs and measurements


def test_the_contract_documents_the_policy_for_every_operation() -> None:
    ops = all_operations()
    assert len(ops) >= 69
    wrong = {str(op): (sorted(op.roles), sorted(policy(op))) for op in ops if op.roles != policy(op)}
    assert not wrong, wrong
    assert not [str(op) for op in ops if op.public]  # /healthz and /readyz are not in the contracts
    scoped = {str(op) for op in ops if op.member_scope}
    assert scoped == {str(op) for op in ops if op.write and "member" in op.roles}


# The world the operations run in -----------------------------------------------------------

@dataclass
class World:
    """A company with two departments: A (the member Mia's) and B (Bob's), a year cycle, an
    objective and a key result with a check-in in each, a KPI with a measurement, a webhook
    subscription; made over REST by an admin. `fresh_*` make more for a write to use up."""

    goals: httpx.AsyncClient
    metrics: httpx.AsyncClient
    ids: dict[str, str] = field(default_factory=dict)
    goals_position: int = 0

    async def post(self, path: str, body: dict[str, Any] | None = None, service: str = "goals",
                   status: int = 201) -> dict[str, Any]:
        client = self.goals if service == "goals" else self.metrics
        answer = await created(client, path, body, status)
        if service == "goals":
            self.goals_position = max(self.goals_position, answer["position"])
        return answer

    async def build(self) -> None:
        t = uuid.uuid4().hex[:8]
        company = (await self.post("/v1/units", {"name": f"Matrix {t}", "kind": "company"}))["id"]
        a = (await self.post("/v1/units", {"name": f"Matrix Sales {t}", "kind": "department", "parentId": company}))["id"]
        b = (await self.post("/v1/units", {"name": f"Matrix Ops {t}", "kind": "department", "parentId": company}))["id"]
        self.ids.update(unit_id=a, own_unit=a, foreign_unit=b, company=company, tag=t)
        self.ids["mia"] = (await self.post("/v1/people", {"name": "Mia", "email": f"mia.{t}@example.com",
                                                          "unitId": a}))["id"]
        self.ids["bob"] = (await self.post("/v1/people", {"name": "Bob", "email": f"bob.{t}@example.com",
                                                          "unitId": b}))["id"]
        self.ids["person_id"] = self.ids["mia"]
        self.ids["cycle_id"] = (await self.post("/v1/cycles", {"name": f"2026 {t}", "startsOn": "2026-01-01",
                                                               "endsOn": "2026-12-31", "status": "active"}))["id"]
        kpi = (await self.post("/v1/kpis", {"name": f"Churn {t}", "unit": "%", "direction": "lower_is_better",
                                            "cadence": "weekly", "target": 2, "rules": []}, "metrics"))
        self.ids["kpi_id"] = kpi["id"]
        measured = await self.post(f"/v1/kpis/{kpi['id']}/measurements", {"value": 5}, "metrics")
        r = await self.metrics.get(f"/v1/kpis/{kpi['id']}/measurements",
                                   headers={"Tandem-Wait-For": f"metrics={measured['position']}"})
        [measurement] = r.json()["items"]
        self.ids["measurement_id"] = measurement["id"]
        for side in ("own", "foreign"):
            objective = await self.fresh_objective(side)
            self.ids[f"{side}_objective"] = objective
            kr = await self.fresh_key_result(side, objective)
            self.ids[f"{side}_kr"] = kr
            check_in = await self.post(f"/v1/key-results/{kr}/check-ins", {"value": 6})
            self.ids[f"{side}_version"] = str(check_in["version"])
        self.ids.update(objective_id=self.ids["own_objective"], to_objective_id=self.ids["foreign_objective"],
                        key_result_id=self.ids["own_kr"], version=self.ids["own_version"])
        self.ids["subscription_id"] = (await self.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook",
                                                                        "eventTypes": ["ObjectiveCreated"]}))["id"]
        await self.caught_up()

    async def caught_up(self) -> None:
        """Wait for the goals read model (a member is found there) to have every write so far."""
        r = await self.goals.get(f"/v1/people/{self.ids['mia']}",
                                 headers={"Tandem-Wait-For": f"goals={self.goals_position}"})
        assert r.status_code == 200, r.text

    def unit(self, side: str) -> str:
        return self.ids[f"{side}_unit"]

    def objective_body(self, side: str, cycle: str | None = None, **more: Any) -> dict[str, Any]:
        return {"title": f"Matrix objective {uuid.uuid4().hex[:6]}", "owner": {"kind": "unit", "id": self.unit(side)},
                "unitId": self.unit(side), "cycleId": cycle or self.ids["cycle_id"], **more}

    async def fresh_objective(self, side: str, **more: Any) -> str:
        return (await self.post("/v1/objectives", self.objective_body(side, **more)))["id"]

    async def fresh_key_result(self, side: str, objective: str | None = None) -> str:
        objective = objective or self.ids[f"{side}_objective"]
        return (await self.post(f"/v1/objectives/{objective}/key-results",
                                {"title": "Cut churn from 6 to 2", "kind": "decrease_to", "start": 6,
                                 "target": 2}))["id"]

    async def graded_objective(self, side: str) -> str:
        """An objective of a closed (so graded) cycle of 2025."""
        cycle = (await self.post("/v1/cycles", {"name": "Q1 2025", "startsOn": "2025-01-01",
                                                "endsOn": "2025-03-31", "status": "active"}))["id"]
        objective = await self.fresh_objective(side, cycle=cycle)
        await self.post(f"/v1/cycles/{cycle}/close", status=200)
        return objective

    async def fresh_cycle(self, status: str) -> str:
        return (await self.post("/v1/cycles", {"name": "Q3 2027", "startsOn": "2027-07-01", "endsOn": "2027-09-30",
                                               "status": status}))["id"]

    async def fresh_person(self) -> str:
        return (await self.post("/v1/people", {"name": "Pat", "email": f"pat.{uuid.uuid4().hex[:8]}@example.com",
                                               "unitId": self.unit("own")}))["id"]

    async def fresh_team(self) -> str:
        return (await self.post("/v1/units", {"name": f"Team {uuid.uuid4().hex[:8]}", "kind": "team",
                                              "parentId": self.unit("own")}))["id"]


@dataclass
class Call:
    ids: dict[str, str] = field(default_factory=dict)
    body: Any = None


Recipe = Callable[[World, str], Awaitable[Call]]
"""What a write needs, made fresh: path ids (besides the world's) and a body; `side` is the
unit of the objective or key result it touches: "own" (the member's) or "foreign"."""


def _body(body: Any, w: World) -> Any:
    """A body, or what a function of the world makes of it."""
    return body(w) if callable(body) else body


def _objective_write(body: Any = None, make: Callable[[World, str], Awaitable[str]] | None = None) -> Recipe:
    async def recipe(w: World, side: str) -> Call:
        objective = await make(w, side) if make else await w.fresh_objective(side)
        return Call({"objective_id": objective}, _body(body, w))
    return recipe


def _kr_write(body: Any = None, make: Callable[[World, str], Awaitable[str]] | None = None) -> Recipe:
    async def recipe(w: World, side: str) -> Call:
        kr = await make(w, side) if make else w.ids[f"{side}_kr"]
        return Call({"key_result_id": kr, "version": w.ids[f"{side}_version"]}, _body(body, w))
    return recipe


async def _draft(w: World, side: str) -> str:
    return await w.fresh_objective(side, status="draft")


async def _closed(w: World, side: str) -> str:
    objective = await w.fresh_objective(side)
    await w.post(f"/v1/objectives/{objective}/close", status=200)
    return objective


async def _contributing(w: World, side: str) -> str:
    objective = await w.fresh_objective(side)
    r = await w.goals.put(f"/v1/objectives/{objective}/contributions/{w.ids['to_objective_id']}",
                          json={"weight": 0.5})
    assert r.status_code == 200, r.text
    return objective


async def _guarded(w: World, side: str) -> str:
    objective = await w.fresh_objective(side)
    r = await w.goals.put(f"/v1/objectives/{objective}/guardrails/{w.ids['kpi_id']}")
    assert r.status_code == 200, r.text
    return objective


async def _bound(w: World, side: str) -> str:
    kr = await w.fresh_key_result(side)
    r = await w.goals.put(f"/v1/key-results/{kr}/kpi", json={"kpiId": w.ids["kpi_id"]})
    assert r.status_code == 200, r.text
    return kr


async def _fresh_kr(w: World, side: str) -> str:
    return await w.fresh_key_result(side)


async def _graded(w: World, side: str) -> str:
    return await w.graded_objective(side)


def _plain(body: Any = None, **ids: Callable[[World], Awaitable[str]]) -> Recipe:
    async def recipe(w: World, side: str) -> Call:
        return Call({name: await make(w) for name, make in ids.items()}, body)
    return recipe


async def _move_target(w: World, side: str) -> Call:
    kr = await w.fresh_key_result(side)
    return Call({"key_result_id": kr}, {"objectiveId": await w.fresh_objective("own")})


async def _new_objective(w: World, side: str) -> Call:
    return Call({}, w.objective_body(side))


async def _new_person(w: World, side: str) -> Call:
    return Call({}, {"name": "Sam", "email": f"sam.{uuid.uuid4().hex[:8]}@example.com", "unitId": w.unit("own")})


async def _new_unit(w: World, side: str) -> Call:
    return Call({}, {"name": f"Unit {uuid.uuid4().hex[:8]}", "kind": "team", "parentId": w.unit("own")})


async def _other_unit(w: World, side: str) -> Call:
    return Call({"person_id": await w.fresh_person()}, {"unitId": w.unit("foreign")})


async def _other_manager(w: World, side: str) -> Call:
    return Call({"person_id": await w.fresh_person()}, {"managerId": w.ids["bob"]})


async def _new_parent(w: World, side: str) -> Call:
    return Call({"unit_id": await w.fresh_team()}, {"parentId": w.unit("foreign")})


async def _fresh_subscription(w: World) -> str:
    return (await w.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "eventTypes": ["ObjectiveCreated"]}))["id"]


async def _planning_cycle(w: World) -> str:
    return await w.fresh_cycle("planning")


async def _active_cycle(w: World) -> str:
    return await w.fresh_cycle("active")


async def _person(w: World) -> str:
    return await w.fresh_person()


async def _team(w: World) -> str:
    return await w.fresh_team()


KPI = {"name": "Matrix KPI", "unit": "", "direction": "higher_is_better", "cadence": "monthly", "rules": []}
RECIPES: dict[tuple[str, str], Recipe] = {
    # goals: objectives
    ("post", "/v1/objectives"): _new_objective,
    ("patch", "/v1/objectives/{objective_id}"): _objective_write({"title": "Renamed by the matrix"}),
    ("post", "/v1/objectives/{objective_id}/activate"): _objective_write(None, _draft),
    ("post", "/v1/objectives/{objective_id}/close"): _objective_write(),
    ("post", "/v1/objectives/{objective_id}/reopen"): _objective_write(None, _closed),
    ("post", "/v1/objectives/{objective_id}/archive"): _objective_write(),
    ("put", "/v1/objectives/{objective_id}/alignment"): _objective_write(lambda w: {"parentId": w.ids["own_objective"]}),
    ("put", "/v1/objectives/{objective_id}/contributions/{to_objective_id}"): _objective_write({"weight": 0.5}),
    ("delete", "/v1/objectives/{objective_id}/contributions/{to_objective_id}"): _objective_write(None, _contributing),
    ("put", "/v1/objectives/{objective_id}/guardrails/{kpi_id}"): _objective_write(),
    ("delete", "/v1/objectives/{objective_id}/guardrails/{kpi_id}"): _objective_write(None, _guarded),
    ("post", "/v1/objectives/{objective_id}/key-results"): _objective_write({"title": "Ship it", "kind": "done"}),
    ("post", "/v1/objectives/{objective_id}/carry-over"): _objective_write(lambda w: {"toCycleId": w.ids["cycle_id"]},
                                                                           _graded),
    ("post", "/v1/objectives/{objective_id}/regrade"): _objective_write({"finalScore": 0.5, "reason": "late data"},
                                                                        _graded),
    # goals: key results
    ("patch", "/v1/key-results/{key_result_id}"): _kr_write({"title": "Cut churn to 2, revised"}),
    ("put", "/v1/key-results/{key_result_id}/objective"): _move_target,
    ("put", "/v1/key-results/{key_result_id}/kpi"): _kr_write(lambda w: {"kpiId": w.ids["kpi_id"]}, _fresh_kr),
    ("delete", "/v1/key-results/{key_result_id}/kpi"): _kr_write(None, _bound),
    ("post", "/v1/key-results/{key_result_id}/check-ins"): _kr_write({"value": 5, "note": "matrix"}),
    ("post", "/v1/key-results/{key_result_id}/check-ins/{version}/corrections"): _kr_write({"value": 5.5}),
    # goals: the organisation and cycles
    ("post", "/v1/units"): _new_unit,
    ("put", "/v1/units/{unit_id}/name"): _plain({"name": "Renamed team"}, unit_id=_team),
    ("put", "/v1/units/{unit_id}/parent"): _new_parent,
    ("post", "/v1/people"): _new_person,
    ("put", "/v1/people/{person_id}/unit"): _other_unit,
    ("put", "/v1/people/{person_id}/manager"): _other_manager,
    ("post", "/v1/people/{person_id}/leave"): _plain({}, person_id=_person),
    ("post", "/v1/cycles"): _plain({"name": "Q4 2027", "startsOn": "2027-10-01", "endsOn": "2027-12-31"}),
    ("post", "/v1/cycles/{cycle_id}/activate"): _plain(None, cycle_id=_planning_cycle),
    ("post", "/v1/cycles/{cycle_id}/close"): _plain(None, cycle_id=_active_cycle),
    # goals: webhooks
    ("post", "/v1/webhooks"): _plain({"url": "http://127.0.0.1:9/other", "eventTypes": ["KeyResultProgressed"]}),
    ("delete", "/v1/webhooks/{subscription_id}"): _plain(None, subscription_id=_fresh_subscription),
    ("post", "/v1/webhooks/{subscription_id}/resume"): _plain(),
    # metrics
    ("post", "/v1/kpis"): _plain(KPI),
    ("put", "/v1/kpis/{kpi_id}/rules"): _plain({"rules": [], "reason": "matrix"}),
    ("post", "/v1/kpis/{kpi_id}/targets"): _plain({"target": 3, "reason": "matrix"}),
    ("post", "/v1/kpis/{kpi_id}/measurements"): _plain({"value": 4}),
    ("post", "/v1/kpis/{kpi_id}/measurements/bulk"): _plain({"measurements": [
        {"value": 4, "measuredAt": "2026-11-01T12:00:00Z"}]}),
    ("post", "/v1/kpis/{kpi_id}/measurements/{measurement_id}/corrections"): _plain({"value": 4.5,
                                                                                      "reason": "typo"}),
    ("post", "/v1/staleness-checks"): _plain(),
}

# Allowed, and still not 2xx on the world the matrix builds, and why.
NOT_2XX = {
    ("post", "/v1/webhooks/{subscription_id}/resume"): (422, "only a paused subscription resumes; pausing one "
                                                             "takes a subscriber failing for hours"),
}


@pytest.fixture(scope="module")
async def goals(auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_goals():
        client.headers.update(auth("admin", SUBJECTS["admin"]))
        yield client


@pytest.fixture(scope="module")
async def metrics(auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_metrics():
        client.headers.update(auth("admin", SUBJECTS["admin"]))
        yield client


@pytest.fixture(scope="module")
async def world(goals: httpx.AsyncClient, metrics: httpx.AsyncClient) -> World:
    w = World(goals, metrics)
    await w.build()
    return w


def as_role(auth: Headers, world: World, role: str | None) -> dict[str, str]:
    """The Authorization header of the role (none: no header at all, which the client's admin
    default must not fill in)."""
    if role is None:
        return {"Authorization": ""}
    return auth(role, world.ids["mia"] if role == "member" else SUBJECTS[role])


async def call(world: World, op: Operation, headers: dict[str, str], the_call: Call | None = None) -> httpx.Response:
    client = world.goals if op.service == "goals" else world.metrics
    ids = {**world.ids, **(the_call.ids if the_call else {})}
    if op.method == "get":
        headers = {**headers, "Tandem-Wait-For": f"goals={world.goals_position}"} if op.service == "goals" else headers
        return await client.get(fill(op.path, ids), headers=headers)
    body = the_call.body if the_call else None
    return await client.request(op.method.upper(), fill(op.path, ids), json=body, headers=headers)


def written_by(database_url: str, world: World) -> dict[str, int]:
    """Events in either log by each role's subject (not a log's head: the KPI policy of goals
    appends on its own when it handles a measurement)."""
    return {s: events_by(database_url, s) for s in (*SUBJECTS.values(), world.ids["mia"])}


def forbidden(r: httpx.Response, what: Any) -> None:
    assert r.status_code == 403, (what, r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Forbidden"


def test_every_write_has_a_recipe() -> None:
    writes = {(op.method, op.path) for op in all_operations() if op.write}
    assert writes == set(RECIPES), (writes - set(RECIPES), set(RECIPES) - writes)


@in_session_loop
@pytest.mark.parametrize("service", SERVICES)
async def test_every_read_for_every_role(service: str, world: World, auth: Headers) -> None:
    checked = 0
    for op in operations(service):
        if op.write:
            continue
        for role in (*ROLES, None):
            r = await call(world, op, as_role(auth, world, role))
            if role is None:
                assert r.status_code == 401, (str(op), r.text)
            elif role in op.roles:
                assert r.status_code == 200, (str(op), role, r.status_code, r.text)
            else:
                forbidden(r, (str(op), role))
            checked += 1
    assert checked >= (22 if service == "goals" else 7) * 6


@in_session_loop
@pytest.mark.parametrize("service", SERVICES)
async def test_every_write_for_every_role(service: str, world: World, auth: Headers, database_url: str) -> None:
    """Each role on a request that is right in every other way (fresh resources, a valid body):
    the role alone decides; a member's limits are tried on their unit's resource and another's."""
    checked = 0
    for op in operations(service):
        if not op.write:
            continue
        recipe = RECIPES[(op.method, op.path)]
        expected_ok = NOT_2XX.get((op.method, op.path), (None, ""))[0]
        refused = await recipe(world, "own")  # one request for every role that is refused
        await world.caught_up()
        before = written_by(database_url, world)
        for role in (None, *ROLES):
            if role is None:
                r = await call(world, op, as_role(auth, world, role), refused)
                assert r.status_code == 401, (str(op), r.text)
            elif role not in op.roles:
                forbidden(await call(world, op, as_role(auth, world, role), refused), (str(op), role))
            else:
                continue
            checked += 1
        assert written_by(database_url, world) == before, str(op)
        for role in sorted(op.roles):
            sides = ("own", "foreign") if role == "member" and op.member_scope else ("own",)
            for side in sides:
                the_call = await recipe(world, side)
                await world.caught_up()
                r = await call(world, op, as_role(auth, world, role), the_call)
                if side == "foreign":
                    forbidden(r, (str(op), role, side))
                elif expected_ok is not None:
                    assert r.status_code == expected_ok, (str(op), role, r.status_code, r.text)
                else:
                    assert r.status_code < 300, (str(op), role, r.status_code, r.text)
                checked += 1
    assert checked >= (33 if service == "goals" else 7) * 6
    assert events_by(database_url, SUBJECTS["auditor"]) == events_by(database_url, SUBJECTS["hr_sync"]) == 0


# What a refused role is refused for: the role, before its body or headers are looked at. The
# ids are random (nothing is read before the role check), the bodies and headers are wrong.
ATTEMPTS: list[tuple[Any, dict[str, str]]] = [
    (None, {}),
    ({}, {}),
    ({"unexpected": [1, 2, 3]}, {"If-Match": "not an etag", "Idempotency-Key": "has spaces in it"}),
    ({"name": "x" * 1000, "value": "5"}, {"Tandem-Wait-For": "nowhere=1"}),
]


@in_session_loop
@pytest.mark.parametrize("service", SERVICES)
async def test_a_refused_role_is_refused_whatever_the_request(service: str, world: World, auth: Headers,
                                                              database_url: str) -> None:
    random_ids = {name: str(uuid.uuid4()) for name in world.ids} | {"version": "1"}
    before = written_by(database_url, world)
    tried = 0
    for op in operations(service):
        client = world.goals if service == "goals" else world.metrics
        for role in set(ROLES) - op.roles:
            for body, headers in ATTEMPTS if op.write else [(None, {"Tandem-Wait-For": "nowhere=1"})]:
                r = await client.request(op.method.upper(), fill(op.path, random_ids), json=body,
                                         headers={**as_role(auth, world, role), **headers})
                forbidden(r, (str(op), role, body, headers))
                tried += 1
    assert tried > 0
    assert written_by(database_url, world) == before


# A member, in detail ---------------------------------------------------------------------

@in_session_loop
async def test_a_member_is_the_person_their_token_names(world: World, auth: Headers) -> None:
    """By id, or case aside by user name or email; a subject that names no current person may
    write nothing (and still reads)."""
    t = world.ids["tag"]
    target = f"/v1/key-results/{world.ids['own_kr']}/check-ins"
    for subject in (world.ids["mia"].upper(), f"MIA.{t}@Example.com"):
        r = await world.goals.post(target, json={"value": 5}, headers=auth("member", subject))
        assert r.status_code == 201, (subject, r.text)
    hr = auth("hr_sync", SUBJECTS["hr_sync"])
    scim_user = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                             "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
                 "userName": f"Zoe.{t}", "emails": [{"value": f"zoe.{t}@example.com", "primary": True}],
                 "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": f"Matrix Sales {t}"}}
    r = await world.goals.post("/scim/v2/Users", json=scim_user, headers=hr)
    assert r.status_code == 201, r.text
    zoe = r.json()["id"]
    leaving = await world.fresh_person()
    await world.post(f"/v1/people/{leaving}/leave", {}, status=200)
    r = await world.goals.get(f"/v1/people/{zoe}", headers={"Tandem-Wait-For": f"goals={world.goals_position}"})
    assert r.status_code == 200, r.text
    r = await world.goals.post(target, json={"value": 5}, headers=auth("member", f"zoe.{t}"))
    assert r.status_code == 201, r.text

    for subject in ("nobody", str(uuid.uuid4()), leaving):
        r = await world.goals.post(target, json={"value": 5}, headers=auth("member", subject))
        forbidden(r, subject)
        assert "no current person" in r.json()["detail"]
        r = await world.goals.get(f"/v1/key-results/{world.ids['own_kr']}", headers=auth("member", subject))
        assert r.status_code == 200


@in_session_loop
async def test_what_makes_a_goal_the_members(world: World, auth: Headers) -> None:
    mia = auth("member", world.ids["mia"])
    bob = world.ids["bob"]
    # Owned by Mia in Bob's unit: hers (she owns it), and so are its key results.
    owned = await world.post("/v1/objectives", {**world.objective_body("foreign"), "owner": {"kind": "person",
                                                                                            "id": world.ids["mia"]}})
    r = await world.goals.post(f"/v1/objectives/{owned['id']}/key-results", json={"title": "One", "kind": "done"},
                               headers=mia)
    assert r.status_code == 201, r.text
    # She may create one she owns in another unit, not one Bob owns there.
    body = world.objective_body("foreign")
    r = await world.goals.post("/v1/objectives", json={**body, "owner": {"kind": "person", "id": world.ids["mia"]}},
                               headers=mia)
    assert r.status_code == 201, r.text
    r = await world.goals.post("/v1/objectives", json={**body, "owner": {"kind": "person", "id": bob}}, headers=mia)
    forbidden(r, "Bob's objective")
    # A key result she owns on Bob's unit's objective is hers: she checks it in...
    kr = (await world.post(f"/v1/objectives/{world.ids['foreign_objective']}/key-results",
                           {"title": "Mine", "kind": "done", "ownerId": world.ids["mia"]}))["id"]
    r = await world.goals.post(f"/v1/key-results/{kr}/check-ins", json={"value": 1}, headers=mia)
    assert r.status_code == 201, r.text
    # ... but the objective stays Bob's unit's, and a move needs a target of hers too.
    r = await world.goals.patch(f"/v1/objectives/{world.ids['foreign_objective']}", json={"title": "x"}, headers=mia)
    forbidden(r, "Bob's unit's objective")
    r = await world.goals.put(f"/v1/key-results/{world.ids['own_kr']}/objective",
                              json={"objectiveId": world.ids["foreign_objective"]}, headers=mia)
    forbidden(r, "a move into Bob's unit")
    assert "target objective" in r.json()["detail"]
    # Aligning her objective under Bob's unit's is a write on hers only.
    child = await world.fresh_objective("own")
    r = await world.goals.put(f"/v1/objectives/{child}/alignment", json={"parentId": world.ids["foreign_objective"]},
                              headers=mia)
    assert r.status_code == 200, r.text


@in_session_loop
async def test_a_member_gets_404_for_what_does_not_exist(world: World, auth: Headers) -> None:
    """404 before 403: the check lets a missing resource through to the write, which answers 404."""
    mia = auth("member", world.ids["mia"])
    missing = uuid.uuid4()
    r = await world.goals.patch(f"/v1/objectives/{missing}", json={"title": "x"}, headers=mia)
    assert r.status_code == 404, r.text
    r = await world.goals.post(f"/v1/key-results/{missing}/check-ins", json={"value": 1}, headers=mia)
    assert r.status_code == 404, r.text
