"""Logs that mix old and new event versions, in PostgreSQL: events exactly as older code stored
them (`tests/fixtures/events`, inserted with psycopg into a fresh database's events tables, as
an installation made then holds them) load with today's applications, take today's commands
beside them, and read as one shape per type through a follower's `ContractMapper`."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from services.common.database import ensure_schema, eventsourcing_env
from services.common.projections import followed_log
from services.contracts import event_versions
from services.goals.application import Goals
from services.goals.domain import CycleKind, CycleStatus, KeyResultKind, ObjectiveStatus, UnitKind
from services.metrics.application import Metrics
from tests.conftest import fresh_database

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"
TEAM = UUID("0a1f6e0c-7b1e-4c5e-9d1a-0000000000c1")
CYCLE = UUID("5c7e3f2a-1d4b-4e8f-a6b2-0000000000c9")
OBJECTIVE = UUID("9b2d4e6f-8a1c-4b3d-9e5f-00000000000b")
PERSON = UUID("7d6c5b4a-3f2e-4d1c-8b0a-0000000000e1")
KPI_ID = UUID("c4b3a291-8f7e-4d6c-9b5a-00000000c5a7")


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def insert(url: str, service: str, name: str, *, originator_id: UUID | None = None,
           originator_version: int | None = None) -> None:
    """Store a fixture as the older code's recorder did: its topic and its state's bytes."""
    doc = fixture(f"{service}/{name}")
    with psycopg.connect(url) as conn:
        conn.execute(
            f"INSERT INTO {service}.{service}_events (originator_id, originator_version, topic, state) "
            "VALUES (%s, %s, %s, %s)",
            (originator_id or UUID(doc["originator_id"]), originator_version or doc["originator_version"],
             doc["topic"], json.dumps(doc["state"], separators=(",", ":")).encode()))


def stored_versions(url: str, service: str, originator_id: UUID) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT topic, state FROM {service}.{service}_events WHERE originator_id = %s "
                            "ORDER BY originator_version", (originator_id,)).fetchall()
    return [(topic.split(":")[1], json.loads(bytes(state)).get("class_version", 1)) for topic, state in rows]


def read_as_follower(url: str, service: str) -> list[Any]:
    log = followed_log(service.capitalize())(env=eventsourcing_env(url, service, create_table=False, pool_size=1,
                                                                   max_overflow=0))
    try:
        return [log.mapper.to_domain_event(n) for n in log.recorder.select_notifications(start=1, limit=10_000)]
    finally:
        log.close()


def test_goals_loads_and_extends_logs_that_mix_old_and_new_versions() -> None:
    with fresh_database() as url:
        ensure_schema(url, "goals")
        Goals(env=eventsourcing_env(url, "goals")).close()  # the tables, as an older install had them
        for name in ("OrgUnitCreated.v1", "OrgUnitMoved.v1", "PersonJoined.v1", "CycleCreated.v1",
                     "ObjectiveCreated.v1"):
            insert(url, "goals", name)

        app = Goals(env=eventsourcing_env(url, "goals"))
        try:
            team = app.get_unit(TEAM)
            assert (team.version, team.name, team.kind, team.external_id, team.is_dissolved) == (
                2, "Tier 2", UnitKind.team, None, False)
            company = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
            support = app.create_unit(name="Support", kind=UnitKind.department, parent_id=company.id)
            app.rename_unit(TEAM, "Tier 2 support")
            app.move_unit(TEAM, support.id, effective_on=date(2026, 10, 1))

            person = app.get_person(PERSON)
            assert (person.active, person.user_name, person.unit_id) == (True, None, TEAM)
            assert person.emails == [{"value": "dana@acme.example", "type": "work", "primary": True}]
            app.move_person(PERSON, unit_id=support.id, effective_on=date(2026, 10, 1))

            cycle = app.get_cycle(CYCLE)
            assert (cycle.kind, cycle.parent_id, cycle.status) == (CycleKind.quarter, None, CycleStatus.planning)
            app.activate_cycle(CYCLE)

            objective = app.get_objective(OBJECTIVE)
            assert (objective.status, objective.carried_from) == (ObjectiveStatus.active, None)
            kr = app.add_key_result(objective_id=OBJECTIVE, title="First response time",
                                    kind=KeyResultKind.decrease_to, start=8, target=3, low=None, high=None,
                                    milestones=[], unit="h", weight=1, owner_id=None)
        finally:
            app.close()

        # A check-in the older code stored, as the key result's second event.
        insert(url, "goals", "KeyResultProgressed.v1", originator_id=kr.id, originator_version=2)
        app = Goals(env=eventsourcing_env(url, "goals"))
        try:
            app.check_in(kr.id, value=4, confidence=8, note="", valid_on=date(2026, 8, 31), expected_version=2)
        finally:
            app.close()

        assert stored_versions(url, "goals", TEAM) == [
            ("OrgUnit.Created", 1), ("OrgUnit.Moved", 1), ("OrgUnit.Renamed", 1), ("OrgUnit.Moved", 2)]
        assert stored_versions(url, "goals", kr.id) == [
            ("KeyResult.Created", 1), ("KeyResult.Progressed", 1), ("KeyResult.Progressed", 2)]

        app = Goals(env=eventsourcing_env(url, "goals"))  # a new process: nothing cached
        try:
            team = app.get_unit(TEAM)
            assert (team.version, team.name, team.parent_id) == (4, "Tier 2 support", support.id)
            assert app.get_person(PERSON).unit_id == support.id
            assert app.get_cycle(CYCLE).status == CycleStatus.active
            loaded = app.get_key_result(kr.id)
            assert loaded.version == 3
            assert [(c.version, c.value) for c in loaded.effective_check_ins] == [(2, 5.5), (3, 4)]
            assert (loaded.current, loaded.score) == (4, 0.8)
            assert app.get_objective(OBJECTIVE).key_result_ids == [kr.id]
        finally:
            app.close()

        # A follower reads one shape per type, whatever version each event was stored as.
        events = read_as_follower(url, "goals")
        current = event_versions("goals")
        shapes: dict[str, set[frozenset[str]]] = defaultdict(set)
        stored_as: dict[str, set[int]] = defaultdict(set)
        for e in events:
            shapes[e.type].add(frozenset(e.data))
            stored_as[e.type].add(e.stored_class_version)
            assert e.data.get("class_version", 1) == current[e.type], e
        assert all(len(s) == 1 for s in shapes.values()), shapes
        assert stored_as["OrgUnitMoved"] == {1, 2} and stored_as["KeyResultProgressed"] == {1, 2}
        moves = [e.data for e in events if e.type == "OrgUnitMoved"]
        assert [(m["parent_id"], m["effective_on"]) for m in moves] == [
            (UUID("0a1f6e0c-7b1e-4c5e-9d1a-00000000000b"), None), (support.id, date(2026, 10, 1))]


def test_metrics_loads_and_extends_a_kpi_defined_by_older_code() -> None:
    with fresh_database() as url:
        ensure_schema(url, "metrics")
        Metrics(env=eventsourcing_env(url, "metrics")).close()
        insert(url, "metrics", "KPIDefined.v1")

        app = Metrics(env=eventsourcing_env(url, "metrics"))
        try:
            kpi = app.get_kpi(KPI_ID)
            assert [(r.id, r.pending_count, r.pending_for) for r in kpi.rules] == [("rule-1", 2, 0), ("floor", 1, 0)]
            for day in (1, 2):
                app.record_measurement(KPI_ID, value=3.5, measured_at=datetime(2026, 6, day, 9, tzinfo=UTC),
                                       source="survey", now=datetime(2026, 6, 2, 10, tzinfo=UTC))
        finally:
            app.close()

        app = Metrics(env=eventsourcing_env(url, "metrics"))
        try:
            kpi = app.get_kpi(KPI_ID)
            assert (kpi.version, kpi.breached, kpi.measurement_count) == (4, {"rule-1"}, 2)
        finally:
            app.close()

        events = read_as_follower(url, "metrics")
        assert [(e.type, e.stored_class_version) for e in events] == [
            ("KPIDefined", 1), ("KPIMeasured", 1), ("KPIMeasured", 1), ("KPIThresholdBreached", 1)]
        assert events[0].data["class_version"] == 2
        assert [r["pending_for"] for r in events[0].data["rules"]] == [0, 0]
