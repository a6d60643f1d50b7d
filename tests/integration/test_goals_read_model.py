"""The goals read model: every event is projected, and dropping it and replaying the log into an
empty schema gives the same rows; a read model of an older shape is rebuilt at start-up."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from eventsourcing.projection import ProjectionRunner

from services.common.auth import mint_token
from services.common.database import ensure_schema
from services.common.eventstore import event_types
from services.common.projections import ProjectionSpec
from services.goals.application import Goals
from services.goals.domain import Cycle, KeyResult, KPIBinding, Objective, OrgUnit, Person
from services.goals.projections import TABLES, GoalsProjection, GoalsReadModel, handled_event_types
from tests.conftest import TEST_SECRET
from tests.integration import test_goals_api
from tests.integration.test_goals_api import post, read, write

SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")
goals = test_goals_api.goals  # the fixture: each module serves its own app

EVENT_TYPES = event_types([OrgUnit, Person, Cycle, Objective, KeyResult, KPIBinding])
KEYS = {"person_units": "person_id, version", "person_managers": "person_id, version",
        "contributions": "objective_id, to_objective_id", "check_ins": "key_result_id, version",
        "objective_guardrails": "objective_id, kpi_id"}


def test_every_goals_event_has_a_handler() -> None:
    missing = [name for name, cls in EVENT_TYPES.items() if cls not in handled_event_types()]
    assert not missing


async def every_kind_of_event(g: httpx.AsyncClient) -> dict[str, Any]:
    """A history with at least one event of every type; returns the last write."""
    acme = await post(g, "/v1/units", {"name": "Acme", "kind": "company"})
    sales = await post(g, "/v1/units", {"name": "Sales", "kind": "department", "parentId": acme["id"]})
    support = await post(g, "/v1/units", {"name": "Support", "kind": "department", "parentId": acme["id"]})
    await write(g, "PUT", f"/v1/units/{sales['id']}/name", {"name": "Revenue"})
    await write(g, "PUT", f"/v1/units/{support['id']}/parent", {"parentId": sales["id"]})
    ada = await post(g, "/v1/people", {"name": "Ada", "email": "ada@example.com", "unitId": sales["id"],
                                       "joinedOn": "2026-01-05"})
    bob = await post(g, "/v1/people", {"name": "Bob", "email": "bob@example.com", "unitId": sales["id"],
                                       "managerId": ada["id"], "joinedOn": "2026-01-05"})
    await write(g, "PUT", f"/v1/people/{bob['id']}/unit", {"unitId": support["id"], "effectiveOn": "2026-03-01"})
    await write(g, "PUT", f"/v1/people/{bob['id']}/manager", {"managerId": None, "effectiveOn": "2026-04-01"})
    await write(g, "POST", f"/v1/people/{bob['id']}/leave", {"leftOn": "2026-06-30"})
    await scim_events(g)

    q3 = await post(g, "/v1/cycles", {"name": "Q3", "startsOn": "2026-07-01", "endsOn": "2026-09-30"})
    await write(g, "POST", f"/v1/cycles/{q3['id']}/activate")
    q4 = await post(g, "/v1/cycles", {"name": "Q4", "startsOn": "2026-10-01", "endsOn": "2026-12-31"})
    owner = {"kind": "unit", "id": sales["id"]}

    async def objective(title: str, **fields: Any) -> str:
        return (await post(g, "/v1/objectives", {"title": title, "owner": owner, "unitId": sales["id"],
                                                 "cycleId": q3["id"], **fields}))["id"]

    a = await objective("A", status="draft")
    await write(g, "POST", f"/v1/objectives/{a}/activate")
    b = await objective("B", parentId=a)
    c = await objective("C")
    await write(g, "PUT", f"/v1/objectives/{c}/contributions/{a}", {"weight": 2})
    await write(g, "PUT", f"/v1/objectives/{c}/contributions/{b}", {"weight": 1})
    await write(g, "DELETE", f"/v1/objectives/{c}/contributions/{b}")
    await write(g, "PATCH", f"/v1/objectives/{c}", {"title": "C, said better", "description": "why"})
    d = await objective("D")
    for action in ("close", "reopen", "archive"):
        await write(g, "POST", f"/v1/objectives/{d}/{action}")

    k1 = await post(g, f"/v1/objectives/{b}/key-results", {"title": "Cut churn from 8% to 5%", "kind": "decrease_to",
                                                            "start": 8, "target": 5, "weight": 2})
    k2 = await post(g, f"/v1/objectives/{b}/key-results", {"title": "Keep uptime within range", "kind": "stay_within",
                                                            "low": 99, "high": 100})
    await post(g, f"/v1/key-results/{k1['id']}/check-ins", {"value": 7, "confidence": 5, "validOn": "2026-08-01"})
    await post(g, f"/v1/key-results/{k1['id']}/check-ins", {"value": 6.5, "validOn": "2026-08-15"})
    await post(g, f"/v1/key-results/{k1['id']}/check-ins/2/corrections", {"value": 7.5})
    await write(g, "PATCH", f"/v1/key-results/{k1['id']}", {"target": 4})
    await post(g, f"/v1/key-results/{k2['id']}/check-ins", {"value": 99.5, "validOn": "2026-08-20"})
    await write(g, "PUT", f"/v1/key-results/{k2['id']}/objective", {"objectiveId": a})

    kpi_a, kpi_b = str(uuid4()), str(uuid4())
    await write(g, "PUT", f"/v1/key-results/{k1['id']}/kpi", {"kpiId": kpi_a})
    await write(g, "PUT", f"/v1/key-results/{k1['id']}/kpi", {"kpiId": kpi_b})  # unbinds from kpi_a
    await write(g, "PUT", f"/v1/key-results/{k2['id']}/kpi", {"kpiId": kpi_a})
    await write(g, "DELETE", f"/v1/key-results/{k2['id']}/kpi")
    await write(g, "PUT", f"/v1/objectives/{b}/guardrails/{kpi_a}")
    await write(g, "PUT", f"/v1/objectives/{b}/guardrails/{kpi_b}")
    await write(g, "DELETE", f"/v1/objectives/{b}/guardrails/{kpi_a}")
    await write(g, "POST", f"/v1/cycles/{q3['id']}/close")
    await write(g, "POST", f"/v1/objectives/{b}/regrade", {"finalScore": 0.6, "reason": "churn data came late"})
    return await post(g, f"/v1/objectives/{b}/carry-over", {"toCycleId": q4["id"]})


async def scim_events(g: httpx.AsyncClient) -> None:
    """What only SCIM records: profiles, (de)activation, external ids and dissolved units."""
    hr = {"Authorization": f"Bearer {mint_token(secret=TEST_SECRET, role='hr_sync', subject='okta')}"}
    name = f"Ops {uuid4().hex[:8]}"

    async def scim(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = await g.request(method, f"/scim/v2{path}", json=body, headers=hr)
        assert r.status_code < 300, r.text
        return r.json() if r.content else {}

    ops = await scim("POST", "/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                         "displayName": name, "externalId": "ops"})
    cy = await scim("POST", "/Users", {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "userName": f"cy.{ops['id']}@example.com",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": name}})
    for op in ({"op": "replace", "path": "active", "value": False}, {"op": "replace", "path": "active", "value": True},
               {"op": "replace", "path": "displayName", "value": "Cy"}):
        await scim("PATCH", f"/Users/{cy['id']}", {"Operations": [op]})
    team = await scim("POST", "/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                          "displayName": f"{name} team", "externalId": "t",
                                          "urn:tandem:params:scim:schemas:extension:unit:2.0:Group": {
                                              "parent": {"value": ops["id"]}}})
    await scim("PATCH", f"/Groups/{team['id']}", {"Operations": [{"op": "replace", "path": "externalId", "value": "u"}]})
    await scim("DELETE", f"/Groups/{team['id']}")


def rows(database_url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(database_url) as conn:
        return {table: conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY {KEYS.get(table, 'id')}").fetchall()
                for table in TABLES}


@SESSION_LOOP
async def test_read_model_rebuilds_to_the_same_rows(goals: httpx.AsyncClient, database_url: str) -> None:
    last = await every_kind_of_event(goals)
    await read(goals, f"/v1/objectives/{last['id']}", last)
    with psycopg.connect(database_url) as conn:
        head = conn.execute("SELECT max(notification_id) FROM goals.goals_events").fetchone()[0]
        stored = {topic.split(":")[1].replace(".", "") for (topic,) in
                  conn.execute("SELECT DISTINCT topic FROM goals.goals_events").fetchall()}
    assert set(EVENT_TYPES) <= stored, "the history should hold every kind of event"

    def rebuild() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS goals_rebuild CASCADE")
        ensure_schema(database_url, "goals_rebuild")
        spec = ProjectionSpec(Goals, GoalsProjection, GoalsReadModel, "goals", "goals_rebuild")
        with ProjectionRunner(application_class=Goals, projection_class=GoalsProjection,
                              view_class=GoalsReadModel, env=spec.env(database_url)) as runner:
            runner.wait(head, timeout=60)

    await asyncio.to_thread(rebuild)
    live, rebuilt = rows(database_url, "goals"), rows(database_url, "goals_rebuild")
    assert all(live.values())
    for table in TABLES:
        assert rebuilt[table] == live[table], table


def test_a_read_model_of_an_older_shape_is_rebuilt(database_url: str) -> None:
    """Start-up drops tables of another shape and the tracking row, so the runner replays."""
    schema = "goals_old_shape"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.units (id uuid PRIMARY KEY, name text NOT NULL)")
        conn.execute(f"CREATE TABLE {schema}.goals_view_tracking (application_name text PRIMARY KEY, "
                     "notification_id bigint)")
        conn.execute(f"INSERT INTO {schema}.goals_view_tracking VALUES ('__migration__', 1), ('Goals', 42)")
    spec = ProjectionSpec(Goals, GoalsProjection, GoalsReadModel, "goals", schema)
    spec.create_tables(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute(f"SELECT * FROM {schema}.goals_view_tracking").fetchall() == [("__migration__", 1)]
        assert conn.execute(f"SELECT fingerprint FROM {schema}.read_model_fingerprints").fetchall() == [
            (GoalsReadModel.fingerprint(),)]
        conn.execute(f"INSERT INTO {schema}.units VALUES (gen_random_uuid(), 'Acme', 'company', NULL, 1, now(), now())")
        conn.execute(f"INSERT INTO {schema}.goals_view_tracking VALUES ('Goals', 7)")
    spec.create_tables(database_url)  # the same shape again: kept
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute(f"SELECT count(*) FROM {schema}.units").fetchone()[0] == 1
        assert conn.execute(f"SELECT notification_id FROM {schema}.goals_view_tracking "
                            "WHERE application_name = 'Goals'").fetchone()[0] == 7
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
