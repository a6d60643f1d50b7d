"""End to end: the roles on the gateway. Every GraphQL mutation (the schema's own list, so a new
one cannot be missed) for every role: the owning service decides (the gateway forwards the
caller's token), so admin and service write, a member writes on their unit's goals and is
refused (FORBIDDEN) on another unit's, an auditor is refused and writes nothing; hr_sync may not
use the gateway at all (403 before anything runs: SCIM and the feeds only), nor may a caller
without a token (401). `history` on objectives, key results, KPIs, people and units comes from
the services over HTTP with the caller's token.

The three real processes run as `make run` starts them; the organisation is written over REST
by an admin, and queries wait for its positions with `Tandem-Wait-For` (never a sleep).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from services.gateway.api import schema
from services.stack import Stack
from tests.e2e.test_gateway_mutations import gql, ok, refused
from tests.operations import events_by

Headers = Callable[..., dict[str, str]]

HISTORY = """history(first: $first, after: $after) {
  edges { cursor node { type version recordedAt validAt actor reason correlationId causationId traceId data
                        changes { field from to } } }
  pageInfo { hasNextPage endCursor } }"""


class Org:
    """A company with a person, an active cycle, two objectives, a key result checked in and a
    KPI whose target changed, written over REST by an admin; and for the mutations, two
    departments (the member Mia's and another) with an objective and a key result each."""

    def __init__(self, stack: Stack, headers: dict[str, str]):
        self.goals = httpx.Client(base_url=stack.url("goals"), headers=headers, timeout=30)
        metrics = httpx.Client(base_url=stack.url("metrics"), headers=headers, timeout=30)
        post = self.post
        self.unit = post("/v1/units", {"name": "Audit Co", "kind": "company"})["id"]
        self.person = post("/v1/people", {"name": "Kim", "email": "kim@example.com", "unitId": self.unit,
                                          "joinedOn": "2026-01-05"})["id"]
        self.cycle = post("/v1/cycles", {"name": "2026", "startsOn": "2026-01-01", "endsOn": "2026-12-31",
                                         "status": "active"})["id"]
        self.objective = post("/v1/objectives", self.objective_input("Close the books on time"))["id"]
        self.other = post("/v1/objectives", self.objective_input("Keep the ledger clean"))["id"]
        self.kr = post(f"/v1/objectives/{self.objective}/key-results",
                       {"title": "Close in 5 days, not 9", "kind": "decrease_to", "start": 9, "target": 5})["id"]
        check_in = post(f"/v1/key-results/{self.kr}/check-ins", {"value": 7, "validOn": "2026-02-02"},
                        **{"X-Correlation-ID": "corr-e2e-check-in"})
        self.kpi = self._post(metrics, "/v1/kpis", {"name": "Days to close", "unit": "d",
                                                    "direction": "lower_is_better", "cadence": "monthly",
                                                    "target": 7, "rules": []})["id"]
        target = self._post(metrics, f"/v1/kpis/{self.kpi}/targets",
                            {"target": 5, "effectiveFrom": "2026-03-01", "reason": "Auditors asked for it"})
        self.wait = f"goals={check_in['position']}, metrics={target['position']}"
        # The mutations' own KPI, so that the one above keeps its history.
        self.measured_kpi = self._post(metrics, "/v1/kpis", {"name": "Invoices sent", "unit": "",
                                                             "direction": "higher_is_better", "cadence": "daily",
                                                             "rules": []})["id"]
        metrics.close()
        # The mutations' organisation: departments "own" (Mia's) and "foreign".
        self.units = {side: post("/v1/units", {"name": f"{side.title()} department", "kind": "department",
                                              "parentId": self.unit})["id"] for side in ("own", "foreign")}
        self.mia = post("/v1/people", {"name": "Mia", "email": "mia@example.com", "unitId": self.units["own"]})["id"]
        self.objectives = {side: self.fresh_objective(side) for side in self.units}
        self.krs = {side: post(f"/v1/objectives/{self.objectives[side]}/key-results",
                               {"title": "Close in 5 days", "kind": "decrease_to", "start": 9, "target": 5})["id"]
                    for side in self.units}
        # A member is found in the goals read model: wait for it to have Mia.
        r = self.goals.get(f"/v1/people/{self.mia}", headers={"Tandem-Wait-For": f"goals={self.position}"})
        assert r.status_code == 200, r.text

    def _post(self, client: httpx.Client, path: str, body: dict[str, Any], **more: str) -> dict[str, Any]:
        r = client.post(path, json=body, headers=more)
        assert r.status_code == 201, r.text
        return r.json()

    def post(self, path: str, body: dict[str, Any], **more: str) -> dict[str, Any]:
        answer = self._post(self.goals, path, body, **more)
        self.position = answer["position"]
        return answer

    def objective_input(self, title: str, side: str | None = None) -> dict[str, Any]:
        unit = self.units[side] if side else self.unit
        return {"title": title, "owner": {"kind": "unit", "id": unit}, "unitId": unit, "cycleId": self.cycle}

    def fresh_objective(self, side: str) -> str:
        return self.post("/v1/objectives", self.objective_input(f"Objective {uuid.uuid4().hex[:6]}", side))["id"]

    def contributing(self, side: str) -> str:
        objective = self.fresh_objective(side)
        r = self.goals.put(f"/v1/objectives/{objective}/contributions/{self.objectives['own']}", json={"weight": 1})
        assert r.status_code == 200, r.text
        return objective


@pytest.fixture(scope="module")
def org(stack: Stack, auth: Headers) -> Iterator[Org]:
    org = Org(stack, auth("admin", "auditor-e2e-admin"))
    yield org
    org.goals.close()


Case = Callable[[Org, str], tuple[str, dict[str, Any]]]
"""A mutation's document and variables, on the `side`'s (own or foreign) unit's goals; anything
it uses up is made fresh."""

MUTATIONS: dict[str, Case] = {
    "createObjective": lambda o, side: ("mutation($i: ObjectiveInput!) { createObjective(input: $i) { id } }",
                                        {"i": o.objective_input("New in the matrix", side)}),
    "updateObjective": lambda o, side: ("mutation($id: ID!) { updateObjective(id: $id, input: {title: \"x\"}) "
                                        "{ id } }", {"id": o.objectives[side]}),
    "alignObjective": lambda o, side: ("mutation($id: ID!, $p: ID) { alignObjective(id: $id, parentId: $p) { id } }",
                                       {"id": o.fresh_objective(side), "p": o.objectives["own"]}),
    "addContribution": lambda o, side: ("mutation($id: ID!, $to: ID!) { addContribution(id: $id, toObjectiveId: $to) "
                                        "{ id } }", {"id": o.fresh_objective(side), "to": o.objectives["own"]}),
    "removeContribution": lambda o, side: ("mutation($id: ID!, $to: ID!) { removeContribution(id: $id, "
                                           "toObjectiveId: $to) { id } }",
                                           {"id": o.contributing(side), "to": o.objectives["own"]}),
    "createKeyResult": lambda o, side: ("mutation($o: ID!) { createKeyResult(objectiveId: $o, input: {title: \"Done\", "
                                        "kind: \"done\"}) { id } }", {"o": o.objectives[side]}),
    "reviseKeyResult": lambda o, side: ("mutation($id: ID!) { reviseKeyResult(id: $id, input: {title: \"y\"}) { id } }",
                                        {"id": o.krs[side]}),
    "checkIn": lambda o, side: ("mutation($kr: ID!, $k: String) { checkIn(keyResultId: $kr, input: {value: 6}, "
                                "idempotencyKey: $k) { id } }", {"kr": o.krs[side], "k": f"k-{uuid.uuid4()}"}),
    "recordMeasurement": lambda o, side: ("mutation($k: ID!) { recordMeasurement(kpiId: $k, input: {value: 6}) "
                                          "{ id } }", {"k": o.measured_kpi}),
}
# Who may, as the REST contracts say for the endpoints behind (tests/integration/test_role_matrix.py).
WRITERS = {name: {"admin", "service"} | ({"member"} if name != "recordMeasurement" else set()) for name in MUTATIONS}
SUBJECTS = {"admin": "matrix-e2e-admin", "service": "matrix-e2e-service", "auditor": "auditor-e2e",
            "hr_sync": "hris-e2e"}


def _mutation_names() -> set[str]:
    """The mutations the schema has (so a new one cannot be missed)."""
    graphql_schema = schema._schema  # graphql-core's schema
    return set(graphql_schema.mutation_type.fields)


def test_every_mutation_for_every_role(stack: Stack, auth: Headers, org: Org) -> None:
    assert set(MUTATIONS) == _mutation_names()
    checked = 0
    for name, case in MUTATIONS.items():
        for role in ("admin", "service", "member", "auditor", "hr_sync", None):
            for side in ("own", "foreign") if role == "member" else ("own",):
                document, variables = case(org, side)
                if role is None:  # the gateway refuses the request before any field runs
                    r = httpx.post(f"{stack.url('gateway')}/graphql", json={"query": document, "variables": variables},
                                   timeout=30)
                    assert r.status_code == 401, (name, r.text)
                    checked += 1
                    continue
                subject = org.mia if role == "member" else SUBJECTS[role]
                headers = auth(role, subject)
                before = events_by(stack.database_url, subject)
                if role == "hr_sync":  # SCIM and the feeds only: not the gateway
                    r = httpx.post(f"{stack.url('gateway')}/graphql", json={"query": document, "variables": variables},
                                   headers=headers, timeout=30)
                    assert r.status_code == 403, (name, r.text)
                    assert r.headers["content-type"].startswith("application/problem+json")
                elif role in WRITERS[name] and side == "own":
                    assert ok(gql(stack, headers, document, variables))[name]["id"], (name, role)
                else:
                    error = refused(gql(stack, headers, document, variables), name)
                    assert (error["extensions"]["code"], error["extensions"]["status"]) == ("FORBIDDEN", 403), \
                        (name, role, side, error)
                    assert error["extensions"]["problem"]["title"] == "Forbidden"
                if role not in WRITERS[name] or side != "own":
                    assert events_by(stack.database_url, subject) == before, (name, role, side)
                checked += 1
    assert checked == len(MUTATIONS) * 7
    assert events_by(stack.database_url, SUBJECTS["auditor"]) == 0


def history_of(stack: Stack, headers: dict[str, str], field: str, node_id: str, wait: str, first: int = 20,
               after: str | None = None) -> dict[str, Any]:
    query = f"query($id: ID!, $first: Int!, $after: String) {{ {field}(id: $id) {{ id {HISTORY} }} }}"
    answer = ok(gql(stack, headers, query, {"id": node_id, "first": first, "after": after}, wait))
    return answer[field]["history"]


def nodes(connection: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["node"] for e in connection["edges"]]


def test_history_of_each_kind_of_node(stack: Stack, auth: Headers, org: Org) -> None:
    auditor = auth("auditor", "auditor-e2e")
    objective = nodes(history_of(stack, auditor, "objective", org.objective, org.wait))
    assert [e["type"] for e in objective] == ["ObjectiveCreated", "ObjectiveKeyResultAttached"]
    assert objective[0]["actor"] == "auditor-e2e-admin"
    assert {"field": "title", "from": None, "to": "Close the books on time"} in objective[0]["changes"]
    assert objective[1]["data"] == {"key_result_id": org.kr}

    kr = nodes(history_of(stack, auditor, "keyResult", org.kr, org.wait))
    assert [(e["type"], e["validAt"]) for e in kr] == [("KeyResultCreated", None),
                                                      ("KeyResultProgressed", "2026-02-02")]
    assert kr[1]["correlationId"] == "corr-e2e-check-in"
    assert {"field": "current", "from": None, "to": 7} in kr[1]["changes"]

    kpi = nodes(history_of(stack, auditor, "kpi", org.kpi, org.wait))
    assert [(e["type"], e["reason"], e["validAt"]) for e in kpi] == [
        ("KPIDefined", None, None), ("KPITargetChanged", "Auditors asked for it", "2026-03-01")]

    person = nodes(history_of(stack, auditor, "person", org.person, org.wait))
    assert [(e["type"], e["validAt"]) for e in person] == [("PersonJoined", "2026-01-05")]
    unit = nodes(history_of(stack, auditor, "unit", org.unit, org.wait))
    assert [e["type"] for e in unit] == ["OrgUnitCreated"]


def test_history_pages_and_carries_the_writers_trace(stack: Stack, auth: Headers, org: Org) -> None:
    trace_id = uuid.uuid4().hex
    writer = {**auth("admin", "auditor-e2e-admin"), "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
              "X-Correlation-ID": "corr-e2e-rename"}
    renamed = ok(gql(stack, writer, 'mutation($id: ID!) { updateObjective(id: $id, input: {title: "Close fast"}) '
                                   "{ version position } }", {"id": org.other}))["updateObjective"]
    auditor = auth("auditor", "auditor-e2e")
    first = history_of(stack, auditor, "objective", org.other, renamed["position"], first=1)
    assert first["pageInfo"]["hasNextPage"] is True
    assert [e["type"] for e in nodes(first)] == ["ObjectiveCreated"]
    rest = history_of(stack, auditor, "objective", org.other, renamed["position"], after=first["pageInfo"]["endCursor"])
    assert rest["pageInfo"]["hasNextPage"] is False
    [update] = nodes(rest)
    assert (update["type"], update["version"]) == ("ObjectiveUpdated", renamed["version"])
    assert (update["traceId"], update["correlationId"]) == (trace_id, "corr-e2e-rename")
    assert update["changes"] == [{"field": "title", "from": "Keep the ledger clean", "to": "Close fast"}]

    query = f"query($id: ID!, $first: Int!, $after: String) {{ objective(id: $id) {{ id {HISTORY} }} }}"
    bad = gql(stack, auditor, query, {"id": org.other, "first": 1, "after": "bm9wZQ"})
    assert bad["data"]["objective"]["history"] is None
    assert bad["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


def test_hr_sync_may_not_query_the_gateway(stack: Stack, auth: Headers, org: Org) -> None:
    """hr_sync reads SCIM and the feeds of the goals service, not the goal data the gateway
    serves: refused before any field runs, histories and all."""
    query = f"query($id: ID!, $first: Int!, $after: String) {{ objective(id: $id) {{ id title {HISTORY} }} }}"
    variables = {"id": org.objective, "first": 5, "after": None}
    r = httpx.post(f"{stack.url('gateway')}/graphql", json={"query": query, "variables": variables},
                   headers={**auth("hr_sync", "hris"), "Tandem-Wait-For": org.wait}, timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["title"] == "Forbidden"
    answer = ok(gql(stack, auth("auditor", "auditor-e2e"), query, variables, org.wait))
    assert answer["objective"]["title"] == "Close the books on time"
    assert [e["node"]["type"] for e in answer["objective"]["history"]["edges"]] == [
        "ObjectiveCreated", "ObjectiveKeyResultAttached"]
