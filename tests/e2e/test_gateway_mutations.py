"""End to end: GraphQL mutations on the gateway reach the owning service over real HTTP.

The three real processes run as `make run` starts them. Each mutation's `position` is sent as
`Tandem-Wait-For` on the next query, which is how the tests read their own writes (never a
sleep). What the services stored is checked in PostgreSQL: nothing written on a refusal, one
write for a replayed idempotency key, the caller's trace id in the event's metadata.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from services.stack import Stack

Headers = Callable[..., dict[str, str]]

CREATE_OBJECTIVE = """
mutation($input: ObjectiveInput!, $key: String) {
  createObjective(input: $input, idempotencyKey: $key) { id version position replayed }
}"""

OBJECTIVE = """
query($id: ID!) { objective(id: $id) {
  id title description parentId
  keyResults { id title target current confidence score }
  children { id }
  contributesTo { objective { id } weight }
} }"""


def gql(stack: Stack, headers: dict[str, str], query: str, variables: dict[str, Any] | None = None,
        wait: str | None = None) -> dict[str, Any]:
    """The whole GraphQL answer (data and errors)."""
    if wait:
        headers = {**headers, "Tandem-Wait-For": wait}
    r = httpx.post(f"{stack.url('gateway')}/graphql", json={"query": query, "variables": variables or {}},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


def refused(answer: dict[str, Any], field: str) -> dict[str, Any]:
    """The one error of a refused mutation; its field is null."""
    assert answer["data"] == {field: None}, answer
    [error] = answer["errors"]
    assert error["path"] == [field]
    return error


def log_head(stack: Stack, service: str) -> int:
    with psycopg.connect(stack.database_url) as conn:
        return conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {service}.{service}_events").fetchone()[0]


def stored_events(stack: Stack, originator_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute("SELECT state FROM goals.goals_events WHERE originator_id = %s ORDER BY originator_version",
                            (originator_id,)).fetchall()
    return [json.loads(bytes(state)) for (state,) in rows]


class Org:
    """A company and an active cycle, written over goals' REST API (no mutations for those)."""

    def __init__(self, stack: Stack, headers: dict[str, str]):
        goals = httpx.Client(base_url=stack.url("goals"), headers=headers, timeout=30)
        self.unit = goals.post("/v1/units", json={"name": "Initech", "kind": "company"}).json()["id"]
        self.cycle = goals.post("/v1/cycles", json={"name": "2026", "startsOn": "2026-01-01", "endsOn": "2026-12-31",
                                                    "status": "active"}).json()["id"]
        goals.close()

    def objective(self, title: str, **more: Any) -> dict[str, Any]:
        return {"title": title, "owner": {"kind": "unit", "id": self.unit}, "unitId": self.unit,
                "cycleId": self.cycle, **more}


@pytest.fixture(scope="module")
def admin(stack: Stack, auth: Headers) -> dict[str, str]:
    return auth("admin", "mutation-admin")


@pytest.fixture(scope="module")
def org(stack: Stack, admin: dict[str, str]) -> Org:
    return Org(stack, admin)


def create_objective(stack: Stack, headers: dict[str, str], org: Org, title: str, **more: Any) -> dict[str, Any]:
    return ok(gql(stack, headers, CREATE_OBJECTIVE, {"input": org.objective(title, **more)}))["createObjective"]


def read_objective(stack: Stack, headers: dict[str, str], objective_id: str, wait: str) -> dict[str, Any]:
    return ok(gql(stack, headers, OBJECTIVE, {"id": objective_id}, wait))["objective"]


def test_a_created_objective_reads_back_at_its_position(stack: Stack, admin: dict[str, str], org: Org) -> None:
    created = create_objective(stack, admin, org, "Ship the TPS report service", description="Every Friday")
    assert re.fullmatch(r"goals=[0-9]+", created["position"])
    assert (created["version"], created["replayed"]) == (1, False)
    read = read_objective(stack, admin, created["id"], created["position"])
    assert (read["title"], read["description"], read["parentId"]) == ("Ship the TPS report service", "Every Friday",
                                                                    None)

    update = """mutation($id: ID!, $input: ObjectiveChanges!, $v: Int) {
        updateObjective(id: $id, input: $input, expectedVersion: $v) { id version position } }"""
    updated = ok(gql(stack, admin, update, {"id": created["id"], "input": {"title": "Ship TPS reports"},
                                            "v": created["version"]}))["updateObjective"]
    assert (updated["id"], updated["version"]) == (created["id"], 2)
    read = read_objective(stack, admin, created["id"], updated["position"])
    assert (read["title"], read["description"]) == ("Ship TPS reports", "Every Friday")  # left out: unchanged

    # A stale expected version is the service's 412, with its problem details.
    head = log_head(stack, "goals")
    error = refused(gql(stack, admin, update, {"id": created["id"], "input": {"title": "Lost update"},
                                               "v": created["version"]}), "updateObjective")
    assert error["extensions"]["code"] == "PRECONDITION_FAILED" and error["extensions"]["status"] == 412
    assert error["extensions"]["problem"]["status"] == 412
    assert error["extensions"]["problem"]["currentVersion"] == 2
    assert error["message"].startswith("Precondition Failed")
    assert log_head(stack, "goals") == head


def test_a_check_in_moves_the_key_results_score(stack: Stack, admin: dict[str, str], org: Org) -> None:
    objective = create_objective(stack, admin, org, "Cut stapler losses")
    kr = ok(gql(stack, admin, """mutation($o: ID!, $input: KeyResultInput!) {
        createKeyResult(objectiveId: $o, input: $input) { id version position } }""",
                {"o": objective["id"], "input": {"title": "Staplers recovered", "kind": "increase_to",
                                                 "start": 0, "target": 10, "unit": "staplers"}}))["createKeyResult"]
    before = read_objective(stack, admin, objective["id"], kr["position"])["keyResults"]
    assert [(k["id"], k["score"], k["current"]) for k in before] == [(kr["id"], None, None)]

    checked = ok(gql(stack, admin, """mutation($kr: ID!, $input: CheckInInput!, $v: Int) {
        checkIn(keyResultId: $kr, input: $input, expectedVersion: $v) { id version position } }""",
                     {"kr": kr["id"], "v": kr["version"],
                      "input": {"value": 4, "confidence": 7, "note": "found four"}}))["checkIn"]
    assert checked["id"] == kr["id"] and checked["version"] == kr["version"] + 1
    [after] = read_objective(stack, admin, objective["id"], checked["position"])["keyResults"]
    assert (after["score"], after["current"], after["confidence"]) == (pytest.approx(0.4), 4, 7)

    revised = ok(gql(stack, admin, """mutation($id: ID!, $input: KeyResultChanges!) {
        reviseKeyResult(id: $id, input: $input) { version position } }""",
                     {"id": kr["id"], "input": {"target": 8}}))["reviseKeyResult"]
    [after] = read_objective(stack, admin, objective["id"], revised["position"])["keyResults"]
    assert (after["target"], after["score"]) == (8, pytest.approx(0.5))


def test_alignment_and_contributions(stack: Stack, admin: dict[str, str], org: Org) -> None:
    parent = create_objective(stack, admin, org, "Be the best-run office park")
    child = create_objective(stack, admin, org, "Fix the printers")
    align = "mutation($id: ID!, $p: ID) { alignObjective(id: $id, parentId: $p) { version position } }"
    aligned = ok(gql(stack, admin, align, {"id": child["id"], "p": parent["id"]}))["alignObjective"]
    assert read_objective(stack, admin, child["id"], aligned["position"])["parentId"] == parent["id"]
    assert read_objective(stack, admin, parent["id"], aligned["position"])["children"] == [{"id": child["id"]}]

    other = create_objective(stack, admin, org, "Keep the basement tidy")
    contribute = """mutation($id: ID!, $to: ID!, $w: Float) {
        addContribution(id: $id, toObjectiveId: $to, weight: $w) { id position } }"""
    added = ok(gql(stack, admin, contribute, {"id": child["id"], "to": other["id"], "w": 0.5}))["addContribution"]
    assert added["id"] == child["id"]
    assert read_objective(stack, admin, child["id"], added["position"])["contributesTo"] == [
        {"objective": {"id": other["id"]}, "weight": 0.5}]

    removed = ok(gql(stack, admin, """mutation($id: ID!, $to: ID!) {
        removeContribution(id: $id, toObjectiveId: $to) { position } }""",
                     {"id": child["id"], "to": other["id"]}))["removeContribution"]
    assert read_objective(stack, admin, child["id"], removed["position"])["contributesTo"] == []

    cleared = ok(gql(stack, admin, align, {"id": child["id"], "p": None}))["alignObjective"]
    assert read_objective(stack, admin, child["id"], cleared["position"])["parentId"] is None
    assert read_objective(stack, admin, parent["id"], cleared["position"])["children"] == []


def test_a_recorded_measurement_is_the_kpis_latest_value(stack: Stack, admin: dict[str, str], org: Org) -> None:
    kpi = httpx.post(f"{stack.url('metrics')}/v1/kpis", headers=admin, timeout=30, json={
        "name": "Printer uptime", "unit": "%", "unitId": org.unit, "direction": "higher_is_better",
        "cadence": "daily", "rules": [{"kind": "below", "threshold": 90, "severity": "warning"}]}).json()
    record = """mutation($k: ID!, $input: MeasurementInput!) {
        recordMeasurement(kpiId: $k, input: $input) { id version position } }"""
    measured = ok(gql(stack, admin, record, {"k": kpi["id"], "input": {
        "value": 97.5, "measuredAt": datetime.now(UTC).isoformat(), "source": "graphql"}}))["recordMeasurement"]
    assert measured["id"] == kpi["id"] and re.fullmatch(r"metrics=[0-9]+", measured["position"])
    read = ok(gql(stack, admin, "query($k: ID!) { kpi(id: $k) { id latestValue } }", {"k": kpi["id"]},
                  measured["position"]))["kpi"]
    assert read == {"id": kpi["id"], "latestValue": 97.5}

    # A moment without its time zone is metrics' 422, not the gateway's guess.
    head = log_head(stack, "metrics")
    error = refused(gql(stack, admin, record, {"k": kpi["id"], "input": {"value": 1, "measuredAt": "2026-01-01T10:00:00"}}),
                    "recordMeasurement")
    assert error["extensions"]["code"] == "UNPROCESSABLE"
    assert [e["field"] for e in error["extensions"]["problem"]["errors"]] == ["measuredAt"]
    assert log_head(stack, "metrics") == head


def test_a_refused_write_is_a_graphql_error_with_the_problem(stack: Stack, admin: dict[str, str], org: Org) -> None:
    objective = create_objective(stack, admin, org, "Improve morale")
    kr = ok(gql(stack, admin, """mutation($o: ID!) { createKeyResult(objectiveId: $o,
        input: {title: "Happy hours held", kind: "increase_to", start: 0, target: 4}) { id } }""",
                {"o": objective["id"]}))["createKeyResult"]
    head = log_head(stack, "goals")

    check_in = "mutation($kr: ID!, $c: Int) { checkIn(keyResultId: $kr, input: {value: 1, confidence: $c}) { id } }"
    error = refused(gql(stack, admin, check_in, {"kr": kr["id"], "c": 11}), "checkIn")
    extensions = error["extensions"]
    assert (extensions["code"], extensions["status"], extensions["service"]) == ("UNPROCESSABLE", 422, "goals")
    problem = extensions["problem"]
    assert problem["status"] == 422 and problem["title"] == "Invalid request"
    assert [e["field"] for e in problem["errors"]] == ["confidence"]
    assert error["message"] == f"{problem['title']}: {problem['detail']}"

    missing = str(uuid.uuid4())
    error = refused(gql(stack, admin, "mutation($id: ID!) { updateObjective(id: $id, input: {title: \"x\"}) { id } }",
                        {"id": missing}), "updateObjective")
    assert (error["extensions"]["code"], error["extensions"]["status"]) == ("NOT_FOUND", 404)
    assert error["extensions"]["problem"]["status"] == 404

    error = refused(gql(stack, admin, CREATE_OBJECTIVE, {"input": org.objective("Orphan", parentId=missing)}),
                    "createObjective")
    assert (error["extensions"]["code"], error["extensions"]["status"]) == ("UNPROCESSABLE", 422)
    assert error["extensions"]["problem"]["title"] == "Rule violated"  # a body naming nothing is a domain rule
    assert log_head(stack, "goals") == head  # nothing written


def test_a_role_that_may_not_write_is_refused_by_the_service(stack: Stack, auth: Headers, org: Org) -> None:
    head = log_head(stack, "goals")
    for role in ("auditor",):  # hr_sync may not use the gateway at all (tests/e2e/test_auditor_graphql.py)
        error = refused(gql(stack, auth(role, f"a-{role}"), CREATE_OBJECTIVE, {"input": org.objective("Not mine")}),
                        "createObjective")
        assert (error["extensions"]["code"], error["extensions"]["status"]) == ("FORBIDDEN", 403)
        assert error["extensions"]["problem"]["title"] == "Forbidden"
    assert log_head(stack, "goals") == head


def test_an_idempotency_key_replayed_writes_once(stack: Stack, admin: dict[str, str], org: Org) -> None:
    variables = {"input": org.objective("Rebuild the parking lot"), "key": f"gql-{uuid.uuid4()}"}
    first = ok(gql(stack, admin, CREATE_OBJECTIVE, variables))["createObjective"]
    head = log_head(stack, "goals")
    again = ok(gql(stack, admin, CREATE_OBJECTIVE, variables))["createObjective"]
    assert again == {**first, "replayed": True}
    assert log_head(stack, "goals") == head
    assert len(stored_events(stack, first["id"])) == 1
    assert read_objective(stack, admin, first["id"], again["position"])["title"] == "Rebuild the parking lot"

    error = refused(gql(stack, admin, CREATE_OBJECTIVE, {**variables, "input": org.objective("Something else")}),
                    "createObjective")
    assert error["extensions"]["code"] == "UNPROCESSABLE"
    assert error["extensions"]["problem"]["type"].endswith("/idempotency-key-reused")
    assert log_head(stack, "goals") == head


def test_the_callers_trace_and_correlation_reach_the_stored_event(stack: Stack, admin: dict[str, str],
                                                                  org: Org) -> None:
    trace_id = uuid.uuid4().hex
    headers = {**admin, "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
               "X-Correlation-ID": "corr-gql-7"}
    created = create_objective(stack, headers, org, "Trace me")
    [event] = stored_events(stack, created["id"])
    assert event["meta"]["trace_id"] == trace_id
    assert event["meta"]["correlation_id"] == "corr-gql-7"
    assert event["meta"]["actor"] == "mutation-admin"  # the caller's token, forwarded unchanged


def test_mutations_of_one_request_share_a_correlation_id(stack: Stack, admin: dict[str, str], org: Org) -> None:
    both = ok(gql(stack, admin, """mutation($a: ObjectiveInput!, $b: ObjectiveInput!) {
        a: createObjective(input: $a) { id } b: createObjective(input: $b) { id } }""",
                  {"a": org.objective("First of two"), "b": org.objective("Second of two")}))
    [a], [b] = stored_events(stack, both["a"]["id"]), stored_events(stack, both["b"]["id"])
    assert a["meta"]["correlation_id"] == b["meta"]["correlation_id"]
    assert a["meta"]["trace_id"] == b["meta"]["trace_id"]
