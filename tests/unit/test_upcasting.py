"""Schema evolution: events stored by older code still read, by their producer and by followers.

`tests/fixtures/events/<service>/<Type>.v<N>.json` holds one stored event (topic, originator id
and version, and the state as the transcoder wrote it) exactly as the code that last stored
version N stored it: each was written by running that commit's own event classes (loaded from
git history) through the mapper (`tests/fixtures/events/make_fixtures.py`). Every fixture must:

- decode through its producing application's mapper into the current event class, every field
  present with the value the old event meant;
- decode through `ContractMapper` (a follower's reading, without the producer's classes) into
  the current contract's shape, valid against the current JSON Schema, while the stored state is
  valid against its own version's schema (kept in `contracts/events/`).

And every event class at `class_version` N must have fixtures for versions 1 to N-1, upcasters
for each step, and contract upcasts for each step, so the next change cannot forget one.
The same events stored in PostgreSQL beside new ones: `tests/integration/test_upcasting_store.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import jsonschema
import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic, resolve_topic

from services.common.contract_upcasts import CONTRACT_UPCASTS
from services.common.eventstore import standard_transcoder, topic_event_type
from services.common.projections import ContractEvent, ContractMapper
from services.contracts import CONTRACTS, EVENT_DOMAINS, event_versions
from services.goals.application import Goals
from services.goals.domain import Cycle, CycleKind, KeyResult, Objective, ObjectiveStatus, OrgUnit, Person
from services.metrics.application import Metrics
from services.metrics.domain import KPI

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"
_NAME = re.compile(r"^(?P<type>[A-Za-z0-9]+)\.v(?P<version>[0-9]+)\.json$")
POPO = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
APPS = {"goals": Goals, "metrics": Metrics}


@dataclasses.dataclass(frozen=True)
class Fixture:
    service: str
    type: str
    version: int
    path: Path

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def stored_event(self) -> StoredEvent:
        doc = self.doc
        return StoredEvent(originator_id=UUID(doc["originator_id"]), originator_version=doc["originator_version"],
                           topic=doc["topic"], state=json.dumps(doc["state"], separators=(",", ":")).encode())

    def __str__(self) -> str:
        return f"{self.service}/{self.type}.v{self.version}"


def fixtures() -> list[Fixture]:
    found = []
    for path in sorted(FIXTURES.glob("*/*.json")):
        m = _NAME.match(path.name)
        assert m, f"a fixture is named <Type>.v<N>.json: {path}"
        found.append(Fixture(path.parent.name, m["type"], int(m["version"]), path))
    return found


ALL = fixtures()


def schema(service: str, event_type: str, version: int) -> dict[str, Any]:
    return json.loads((CONTRACTS / "events" / service / f"{event_type}.v{version}.json").read_text())


def as_json(state: dict[str, Any]) -> dict[str, Any]:
    """A decoded state as stored JSON again (tagged UUIDs, dates and datetimes)."""
    return json.loads(standard_transcoder().encode(state))


@pytest.fixture(scope="module")
def mappers() -> dict[str, Any]:
    apps = {service: cls(env=POPO) for service, cls in APPS.items()}
    yield {service: app.mapper for service, app in apps.items()}
    for app in apps.values():
        app.close()


# What each older event meant, in today's fields (beside those it always had).
D = date
TEAM_A, TEAM_B = UUID("0a1f6e0c-7b1e-4c5e-9d1a-00000000000a"), UUID("0a1f6e0c-7b1e-4c5e-9d1a-00000000000b")
EXPECTED: dict[str, dict[str, Any]] = {
    "goals/CycleCreated.v1": {"name": "2026 Q3", "starts_on": D(2026, 7, 1), "ends_on": D(2026, 9, 30),
                              "kind": "quarter", "parent_id": None},
    "goals/ObjectiveCreated.v1": {"title": "Deliver exceptional customer support", "status": "active",
                                  "carried_from": None, "owner_kind": "unit", "owner_id": TEAM_A},
    "goals/KeyResultProgressed.v1": {"value": 5.5, "confidence": 7, "note": "new triage rota",
                                     "valid_on": D(2026, 7, 31), "measurement_id": None},
    "goals/OrgUnitCreated.v1": {"name": "Tier 2", "kind": "team", "parent_id": TEAM_A, "external_id": None},
    "goals/OrgUnitMoved.v1": {"parent_id": TEAM_B, "effective_on": None},
    "goals/PersonJoined.v1": {"name": "Dana Ortiz", "email": "dana@acme.example", "joined_on": D(2026, 5, 11),
                              "user_name": None, "external_id": None, "given_name": None, "family_name": None,
                              "formatted_name": None, "emails": None, "active": True},
    "metrics/KPIDefined.v1": {"name": "CSAT", "target": 4.5, "rules": [
        {"id": "rule-1", "kind": "below", "severity": "warning", "threshold": 4.0, "low": None, "high": None,
         "pending_count": 2, "recovery": 4.2, "pending_for": 0},
        {"id": "floor", "kind": "below", "severity": "critical", "threshold": 3.0, "low": None, "high": None,
         "pending_count": 1, "recovery": None, "pending_for": 0}]},
}


def test_there_are_fixtures_and_each_has_its_expectations() -> None:
    assert ALL
    assert {str(f) for f in ALL} == set(EXPECTED)


@pytest.mark.parametrize("fixture", ALL, ids=str)
def test_a_fixture_is_an_older_version_than_its_class(fixture: Fixture) -> None:
    cls = resolve_topic(fixture.doc["topic"])
    assert topic_event_type(get_topic(cls)) == fixture.type
    assert fixture.version < getattr(cls, "class_version", 1), "a fixture of the current version tests nothing"
    assert fixture.doc["state"].get("class_version", 1) == fixture.version, "the state says its own version"


@pytest.mark.parametrize("fixture", ALL, ids=str)
def test_the_producer_reads_an_older_version_as_the_current_class(fixture: Fixture, mappers: dict[str, Any]) -> None:
    event = mappers[fixture.service].to_domain_event(fixture.stored_event())
    cls = resolve_topic(fixture.doc["topic"])
    assert type(event) is cls
    state = vars(event)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in state]
    assert not missing, f"the upcasters leave out {missing}"
    assert "class_version" not in state
    for name, value in EXPECTED[str(fixture)].items():
        assert getattr(event, name) == value, name
    assert event.originator_id == UUID(fixture.doc["originator_id"])
    assert event.originator_version == fixture.doc["originator_version"]
    assert event.meta == fixture.doc["state"]["meta"]

    # Stored again, it is a current event: the current version, valid against the current schema.
    again = mappers[fixture.service].to_stored_event(event)
    stored = json.loads(again.state)
    assert stored["class_version"] == cls.class_version
    jsonschema.validate(stored, schema(fixture.service, fixture.type, cls.class_version))


@pytest.mark.parametrize("fixture", ALL, ids=str)
def test_a_follower_reads_an_older_version_in_the_current_contract_shape(fixture: Fixture) -> None:
    current = event_versions(fixture.service)[fixture.type]
    # The stored state is what its own version's schema (kept in contracts/events) describes.
    jsonschema.validate(fixture.doc["state"], schema(fixture.service, fixture.type, fixture.version))

    event = ContractMapper(transcoder=standard_transcoder()).to_domain_event(fixture.stored_event())
    assert isinstance(event, ContractEvent)
    assert (event.type, event.version, event.stored_class_version) == (
        fixture.type, fixture.doc["originator_version"], fixture.version)
    assert event.originator_id == UUID(fixture.doc["originator_id"])
    assert event.meta == fixture.doc["state"]["meta"]
    assert event.data["class_version"] == current
    for name, value in EXPECTED[str(fixture)].items():
        assert event.data[name] == value, name
    jsonschema.validate({**as_json(event.data), "meta": event.meta}, schema(fixture.service, fixture.type, current))


@pytest.mark.parametrize("fixture", ALL, ids=str)
def test_the_producer_and_a_follower_read_an_older_version_alike(fixture: Fixture, mappers: dict[str, Any]) -> None:
    event = mappers[fixture.service].to_domain_event(fixture.stored_event())
    contract = ContractMapper(transcoder=standard_transcoder()).to_domain_event(fixture.stored_event())
    stored = json.loads(mappers[fixture.service].to_stored_event(event).state)
    assert {**as_json(contract.data), "meta": contract.meta} == stored


def _versioned() -> list[tuple[str, str, int]]:
    return [(service, name, version) for service in EVENT_DOMAINS
            for name, version in event_versions(service).items() if version > 1]


def test_every_older_version_has_a_fixture_an_upcaster_a_contract_upcast_and_a_schema() -> None:
    """Bumping `class_version` to N asks for all of these, for each version below N."""
    have = {(f.service, f.type, f.version) for f in ALL}
    classes = {topic_event_type(get_topic(c)): c for c in _event_classes()}
    assert _versioned(), "no event has evolved yet?"
    problems = []
    for service, name, version in _versioned():
        for v in range(1, version):
            if (service, name, v) not in have:
                problems.append(f"no fixture tests/fixtures/events/{service}/{name}.v{v}.json")
            if not callable(getattr(classes[name], f"upcast_v{v}_v{v + 1}", None)):
                problems.append(f"{name} has no upcast_v{v}_v{v + 1}")
            if (name, v) not in CONTRACT_UPCASTS:
                problems.append(f"services.common.contract_upcasts has no upcast for ({name!r}, {v})")
            if not (CONTRACTS / "events" / service / f"{name}.v{v}.json").exists():
                problems.append(f"no schema contracts/events/{service}/{name}.v{v}.json")
    assert not problems, "\n".join(problems)


def test_contract_upcasts_name_only_older_versions_of_current_types() -> None:
    versions = {name: v for service in EVENT_DOMAINS for name, v in event_versions(service).items()}
    stray = [key for key in CONTRACT_UPCASTS if key[0] not in versions or key[1] >= versions[key[0]]]
    assert not stray, f"contract upcasts past the current version or for unknown types: {stray}"


def test_event_classes_that_never_changed_stay_at_version_one() -> None:
    evolved = {name for _, name, _ in _versioned()}
    assert evolved == {"CycleCreated", "ObjectiveCreated", "KeyResultProgressed", "OrgUnitCreated", "OrgUnitMoved",
                       "PersonJoined", "KPIDefined"}


def _aggregates() -> list[type]:
    import importlib
    import inspect

    out = []
    for module_name in EVENT_DOMAINS.values():
        module = importlib.import_module(module_name)
        out += [v for v in vars(module).values()
                if inspect.isclass(v) and issubclass(v, Aggregate) and v.__module__ == module.__name__]
    return out


def _event_classes() -> list[type]:
    from services.common.eventstore import event_classes

    return [c for a in _aggregates() for c in event_classes(a)]


# The aggregates that old events build ---------------------------------------------------------

def _events(mappers: dict[str, Any], *names: str) -> list[Any]:
    by_name = {str(f): f for f in ALL}
    return [mappers[by_name[n].service].to_domain_event(by_name[n].stored_event()) for n in names]


def _build(events: list[Any]) -> Any:
    aggregate = None
    for e in events:
        aggregate = e.mutate(aggregate)
    return aggregate


def test_old_events_build_aggregates_that_take_new_commands(mappers: dict[str, Any]) -> None:
    cycle: Cycle = _build(_events(mappers, "goals/CycleCreated.v1"))
    assert (cycle.kind, cycle.parent_id) == (CycleKind.quarter, None)

    objective: Objective = _build(_events(mappers, "goals/ObjectiveCreated.v1"))
    assert (objective.status, objective.carried_from) == (ObjectiveStatus.active, None)
    objective.close()
    assert objective.status == ObjectiveStatus.closed

    unit: OrgUnit = _build(_events(mappers, "goals/OrgUnitCreated.v1", "goals/OrgUnitMoved.v1"))
    assert (unit.version, unit.parent_id, unit.external_id, unit.is_dissolved) == (2, TEAM_B, None, False)
    unit.move(TEAM_A, effective_on=D(2026, 10, 1))
    assert unit.parent_id == TEAM_A

    person: Person = _build(_events(mappers, "goals/PersonJoined.v1"))
    assert (person.active, person.user_name) == (True, None)
    assert person.emails == [{"value": "dana@acme.example", "type": "work", "primary": True}]

    kpi: KPI = _build(_events(mappers, "metrics/KPIDefined.v1"))
    assert [(r.id, r.pending_count, r.pending_for) for r in kpi.rules] == [("rule-1", 2, 0), ("floor", 1, 0)]


def test_an_old_check_in_counts_beside_new_ones(mappers: dict[str, Any]) -> None:
    (progressed,) = _events(mappers, "goals/KeyResultProgressed.v1")
    created = KeyResult.define(objective_id=UUID("9b2d4e6f-8a1c-4b3d-9e5f-00000000000b"), title="First response time",
                               kind="decrease_to", start=8, target=3, unit="h")  # type: ignore[arg-type]
    (created_event,) = created.collect_events()
    object.__setattr__(created_event, "originator_id", progressed.originator_id)
    kr: KeyResult = _build([created_event, progressed])
    assert (kr.version, kr.current, kr.score) == (2, 5.5, 0.5)
    assert kr.measurement_of(2) is None
    kr.check_in(value=4, confidence=8, note="", valid_on=D(2026, 8, 31))
    assert kr.current == 4
