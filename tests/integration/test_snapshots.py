"""Snapshots on real PostgreSQL: a key result with hundreds of check-ins loads from its latest
snapshot plus fewer than an interval's events, into the same state a full replay gives; a bulk
save takes one snapshot, not one per interval it crosses."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest

from services.common.database import ensure_schema, eventsourcing_env
from services.common.eventstore import SNAPSHOT_EVERY
from services.goals.application import Goals
from services.goals.domain import KeyResultKind, OwnerKind, UnitKind
from tests.conftest import fresh_database


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with fresh_database() as url:
        for schema in ("goals", "metrics"):
            ensure_schema(url, schema)
        yield url


def snapshot_versions(url: str, table: str, aggregate_id: Any) -> list[int]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute(f"SELECT originator_version FROM {table} WHERE originator_id = %s "
                                           "ORDER BY originator_version", (aggregate_id,))]


def state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def test_a_long_key_result_loads_from_its_latest_snapshot(url: str) -> None:
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        unit = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None).id
        cycle = app.create_cycle(name="2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 12, 31),
                                 activate=True).id
        objective = app.create_objective(title="Grow", description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                         unit_id=unit, cycle_id=cycle, parent_id=None).id
        kr = app.add_key_result(objective_id=objective, title="Revenue", kind=KeyResultKind.increase_to, start=0,
                                target=1000, low=None, high=None, milestones=[], unit="", weight=1, owner_id=None).id
        for n in range(int(2.5 * SNAPSHOT_EVERY)):
            app.check_in(kr, value=n, confidence=5, note="", valid_on=date(2026, 1, 1) + timedelta(days=n % 300),
                         expected_version=None)
        written = app.repository.get(kr)
    finally:
        app.close()
    assert written.version == 1 + int(2.5 * SNAPSHOT_EVERY)
    assert snapshot_versions(url, "goals.goals_snapshots", kr) == [SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY]

    fresh = Goals(env={**eventsourcing_env(url, "goals"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(kr))
    read: list[dict[str, Any]] = []
    select_events = fresh.recorder.select_events

    def counting(originator_id: Any, **kwargs: Any) -> Any:
        events = select_events(originator_id, **kwargs)
        read.append({"gt": kwargs.get("gt"), "events": len(events)})
        return events

    fresh.recorder.select_events = counting  # type: ignore[method-assign]
    try:
        loaded = fresh.repository.get(kr)
    finally:
        fresh.close()
    assert state(loaded) == state(written)
    assert state(replayed) == state(written)
    # The load: the latest snapshot, then only the events after it.
    assert read[0] == {"gt": 2 * SNAPSHOT_EVERY, "events": SNAPSHOT_EVERY // 2 + 1}


def _replay(events: Any) -> Any:
    aggregate = None
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def test_a_save_of_many_events_takes_one_snapshot(url: str) -> None:
    """Crossing three intervals in one save: one snapshot, of the aggregate as saved."""
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        unit = app.create_unit(name="Bulk", kind=UnitKind.company, parent_id=None).id
        cycle = app.create_cycle(name="2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 12, 31),
                                 activate=True).id
        objective = app.create_objective(title="Grow", description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                         unit_id=unit, cycle_id=cycle, parent_id=None).id
        kr_id = app.add_key_result(objective_id=objective, title="Orders", kind=KeyResultKind.increase_to, start=0,
                                   target=1000, low=None, high=None, milestones=[], unit="", weight=1,
                                   owner_id=None).id
        kr = app.get_key_result(kr_id)
        for n in range(3 * SNAPSHOT_EVERY + 5):
            kr.check_in(value=n, confidence=None, note="", valid_on=date(2026, 2, 1))
        app.save(kr)
    finally:
        app.close()
    assert snapshot_versions(url, "goals.goals_snapshots", kr_id) == [kr.version] == [3 * SNAPSHOT_EVERY + 6]


def test_an_objective_with_links_comes_back_from_its_snapshot_unchanged(url: str) -> None:
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        unit = app.create_unit(name="Links", kind=UnitKind.company, parent_id=None).id
        cycle = app.create_cycle(name="Q1", starts_on=date(2026, 1, 1), ends_on=date(2026, 3, 31),
                                 activate=True).id
        parent, other = (app.create_objective(title=t, description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                              unit_id=unit, cycle_id=cycle, parent_id=None).id for t in "ab")
        child = app.create_objective(title="c", description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                     unit_id=unit, cycle_id=cycle, parent_id=parent).id
        app.add_contribution(child, to_objective_id=other, weight=0.5)
        objective = app.repository.get(child)
        stored = app.mapper.to_stored_event(type(objective).Snapshot.take(objective))
        restored = app.mapper.to_domain_event(stored).mutate(None)
    finally:
        app.close()
    assert state(restored) == state(objective)
