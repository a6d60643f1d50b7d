"""Snapshots on real PostgreSQL: a key result with hundreds of check-ins loads from its latest
snapshot plus fewer than an interval's events, into the same state a full replay gives; a bulk
save takes one snapshot, not one per interval it crosses. A KPI with a bulk of measurements
loads from its snapshot into the state a replay gives, value for value and type for type, and
goes on from there exactly as the replayed KPI does."""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest

from services.common.database import ensure_schema, eventsourcing_env
from services.common.eventstore import SNAPSHOT_EVERY, standard_transcoder
from services.goals.application import Goals
from services.goals.domain import KeyResult, KeyResultKind, Objective, ObjectiveStatus, OwnerKind, UnitKind
from services.metrics.application import Metrics
from services.metrics.domain import KPI, MeasurementIn
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


def counting_reads(app: Any) -> list[dict[str, Any]]:
    """From now on, each read of the app's events recorded: after which version (`gt`), how many."""
    read: list[dict[str, Any]] = []
    select_events = app.recorder.select_events

    def counting(originator_id: Any, **kwargs: Any) -> Any:
        events = select_events(originator_id, **kwargs)
        read.append({"gt": kwargs.get("gt"), "events": len(events)})
        return events

    app.recorder.select_events = counting
    return read


def state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


_LEAVES = (str, int, float, bytes, enum.Enum, UUID, date, time, timedelta, Decimal, type(None))


def assert_same(expected: Any, actual: Any, *, but: tuple[str, ...] = (), path: str = "state") -> None:
    """Equal, and of the same type, all the way down: into dicts (keys too, in any order), lists,
    tuples (named ones too), sets, dataclasses and any other object's attributes (`__dict__` and
    `__slots__`), so that an equal value of another type (a str for a StrEnum, a list for a
    tuple, an int for a float) fails, naming where. `but`: top-level names not compared."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} instead of {type(expected)}"
    if isinstance(expected, _LEAVES):
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        keys = {k: k for k in actual}
        for key, value in expected.items():
            if key in but:
                continue
            assert type(keys[key]) is type(key), f"{path}: key {key!r} is a {type(keys[key])}, not a {type(key)}"
            assert_same(value, actual[key], path=f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{path}: {len(actual)} items instead of {len(expected)}"
        for n, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, path=f"{path}[{n}]")
    elif isinstance(expected, set | frozenset):
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        matches = {a: a for a in actual}
        for e in expected:
            assert_same(e, matches[e], path=f"{path}{{{e!r}}}")
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_same(getattr(expected, f.name), getattr(actual, f.name), path=f"{path}.{f.name}")
    elif hasattr(expected, "__dict__") or hasattr(type(expected), "__slots__"):
        slots = [n for c in type(expected).__mro__ for n in getattr(c, "__slots__", ())]
        names = [*getattr(expected, "__dict__", {}), *slots]
        assert names, f"{path}: a {type(expected)} without attributes to compare"
        for name in names:
            assert_same(getattr(expected, name), getattr(actual, name), path=f"{path}.{name}")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def key_result_in_a_year(app: Goals, name: str, title: str) -> UUID:
    """A company of its own with the year 2026 open, an objective, and an increase-to key result
    (0 -> 1000) in it: a key result ready for check-ins."""
    unit = app.create_unit(name=name, kind=UnitKind.company, parent_id=None).id
    cycle = app.create_cycle(name="2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 12, 31), activate=True).id
    objective = app.create_objective(title="Grow", description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                     unit_id=unit, cycle_id=cycle, parent_id=None).id
    return app.add_key_result(objective_id=objective, title=title, kind=KeyResultKind.increase_to, start=0,
                              target=1000, low=None, high=None, milestones=[], unit="", weight=1, owner_id=None).id


def test_a_long_key_result_loads_from_its_latest_snapshot(url: str) -> None:
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        kr = key_result_in_a_year(app, "Acme", "Revenue")
        for n in range(int(2.5 * SNAPSHOT_EVERY)):
            app.check_in(kr, value=n, confidence=5, note="", valid_on=date(2026, 1, 1) + timedelta(days=n % 300),
                         expected_version=None)
        written = app.repository.get(kr)
    finally:
        app.close()
    assert written.version == 1 + int(2.5 * SNAPSHOT_EVERY)
    # Only the latest is kept: loading starts from it, and older ones would store the history again.
    assert snapshot_versions(url, "goals.goals_snapshots", kr) == [2 * SNAPSHOT_EVERY]

    fresh = Goals(env={**eventsourcing_env(url, "goals"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(kr))
    read = counting_reads(fresh)
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
        kr_id = key_result_in_a_year(app, "Bulk", "Orders")
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
        restored = through_snapshot(app, objective)
    finally:
        app.close()
    assert_same(state(objective), state(restored))


def through_snapshot(app: Any, aggregate: Any, mapper: Any = None) -> Any:
    """The aggregate's snapshot, stored and read back by the snapshot store's mapper (or `mapper`)."""
    mapper = mapper or app.snapshots.mapper
    return mapper.to_domain_event(mapper.to_stored_event(type(aggregate).Snapshot.take(aggregate))).mutate(None)


def events_of(aggregate: Any) -> list[tuple[str, dict[str, Any]]]:
    """The aggregate's new events, but for the time each was recorded."""
    return [(type(e).__qualname__, {k: v for k, v in vars(e).items() if k != "timestamp"})
            for e in aggregate.collect_events()]


def test_a_key_result_with_a_long_history_comes_back_from_its_snapshot_type_for_type(url: str) -> None:
    """Check-ins (whole numbers and fractions, with and without a confidence), corrections of
    them, KPI measurements and a correction of one, a rebinding to another KPI, a revision and
    a move: the key result loads from its latest snapshot, and its snapshot round-trips, into the
    state a replay gives, type for type; and goes on from there as the replayed one does."""
    kpi, other_kpi = UUID(int=0xA1), UUID(int=0xA2)
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        unit = app.create_unit(name="History", kind=UnitKind.company, parent_id=None).id
        person = app.join_person(name="Ada", email="ada@example.com", unit_id=unit, joined_on=date(2025, 1, 1)).id
        cycle = app.create_cycle(name="2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 12, 31),
                                 activate=True).id
        first, second = (app.create_objective(title=t, description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                              unit_id=unit, cycle_id=cycle, parent_id=None).id for t in "ab")
        kr_id = app.add_key_result(objective_id=first, title="Revenue", kind=KeyResultKind.increase_to, start=0,
                                   target=1000, low=None, high=None, milestones=[], unit="kEUR", weight=2.0,
                                   owner_id=person).id
        app.bind_key_result_to_kpi(kr_id, kpi)
        check_ins: list[int] = []
        for n in range(80):
            day = date(2026, 1, 1) + timedelta(days=(n * 5) % 300)
            check_ins.append(app.check_in(kr_id, value=n * 10 if n % 2 else n * 10.5, confidence=n % 11 or None,
                                          note=f"week {n}", valid_on=day, expected_version=None).version)
            if n % 7 == 6:  # a correction of an earlier check-in: another value, and sometimes another day
                app.correct_check_in(kr_id, corrects_version=check_ins[n - 3], value=n * 9.0,
                                     note=f"fixed {n}", **({"valid_on": day} if n % 2 else {}))
            if n % 5 == 4:  # a measurement of the bound KPI, as the KPI policy records it
                kr = app.get_key_result(kr_id)
                assert kr.record_measurement(kpi_id=kr.kpi_id, measurement_id=UUID(int=n), value=n * 11.0,
                                             valid_on=day)
                app.save(kr)
            if n % 10 == 9:  # and a correction of an earlier one
                kr = app.get_key_result(kr_id)
                assert kr.correct_measurement(measurement_id=UUID(int=n - 5), value=n * 12.5, note="probe fixed")
                app.save(kr)
            if n == 40:
                app.bind_key_result_to_kpi(kr_id, other_kpi)
        app.revise_key_result(kr_id, title="Recurring revenue", target=2000.0, owner_id=None)
        app.move_key_result(kr_id, second)
        written = app.get_key_result(kr_id)  # as saved
    finally:
        app.close()
    snapshots = snapshot_versions(url, "goals.goals_snapshots", kr_id)
    assert written.version > SNAPSHOT_EVERY + 10 and snapshots == [SNAPSHOT_EVERY]
    assert written.kpi_id == other_kpi and written.correction_count > 10 and len(written.measurements) == 16

    fresh = Goals(env={**eventsourcing_env(url, "goals"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    try:
        replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(kr_id))
        read = counting_reads(fresh)
        loaded = fresh.get_key_result(kr_id)
        restored = through_snapshot(fresh, written)
        # What the application's own (the events') transcoder would give: the kind as a string.
        plain = through_snapshot(fresh, written, fresh.mapper)
    finally:
        fresh.close()
    assert [r["gt"] for r in read] == [snapshots[-1]]  # from the latest snapshot
    assert type(loaded.kind) is KeyResultKind
    for other in (loaded, restored, written):
        assert_same(state(replayed), state(other))
    with pytest.raises(AssertionError, match="KeyResultKind"):
        assert_same(state(written), state(plain))

    # From here on the key result loaded from its snapshot decides as the replayed one does.
    commands: list[Callable[[KeyResult], Any]] = [
        lambda k: k.check_in(value=1500, confidence=8, note="after", valid_on=date(2026, 12, 1)),
        lambda k: k.correct_check_in(corrects_version=k.version, value=1450.5, note="typo"),
        lambda k: k.correct_check_in(corrects_version=check_ins[3], value=5.0, confidence=None,
                                     valid_on=date(2026, 12, 2)),
        lambda k: k.record_measurement(kpi_id=other_kpi, measurement_id=UUID(int=999), value=1600.0,
                                       valid_on=date(2026, 12, 3)),
        lambda k: k.correct_measurement(measurement_id=UUID(int=999), value=1650.0, note="probe fixed"),
        lambda k: k.revise(start=10.0),
    ]
    for command in commands:
        outcomes = []
        for kr in (loaded, replayed):
            command(kr)
            outcomes.append(events_of(kr))
        assert outcomes[0] == outcomes[1] and outcomes[0]
    assert_same(state(replayed), state(loaded), but=("_modified_on",))


def test_an_objective_with_a_full_life_comes_back_from_its_snapshot_type_for_type(url: str) -> None:
    """A draft that is activated, handed to a person, aligned, contributes (a weight changed, a
    contribution removed), gets key results and guardrails (one removed), is closed and
    reopened, graded with its cycle, regraded and carried over; and its carried-over copy (a
    draft, carried from it, with copies of its key results, one following a KPI, one of
    milestones): each comes back from its snapshot, and from the store, type for type."""
    kpi, guard, other_guard = UUID(int=0xB1), UUID(int=0xB2), UUID(int=0xB3)
    app = Goals(env=eventsourcing_env(url, "goals"))
    try:
        unit = app.create_unit(name="Life", kind=UnitKind.company, parent_id=None).id
        person = app.join_person(name="Grace", email="grace@example.com", unit_id=unit, joined_on=date(2025, 1, 1)).id
        q1 = app.create_cycle(name="Q1", starts_on=date(2026, 1, 1), ends_on=date(2026, 3, 31), activate=True).id
        q2 = app.create_cycle(name="Q2", starts_on=date(2026, 4, 1), ends_on=date(2026, 6, 30), activate=False).id
        parent, first, second = (
            app.create_objective(title=t, description="", owner_kind=OwnerKind.unit, owner_id=unit, unit_id=unit,
                                 cycle_id=q1, parent_id=None).id for t in ("parent", "first", "second"))
        objective_id = app.create_objective(title="Ship", description="the thing", owner_kind=OwnerKind.unit,
                                            owner_id=unit, unit_id=unit, cycle_id=q1, parent_id=None,
                                            status=ObjectiveStatus.draft).id
        app.activate_objective(objective_id)
        app.update_objective(objective_id, title="Ship it", owner_kind=OwnerKind.person, owner_id=person)
        app.align_objective(objective_id, parent, expected_version=None)
        app.add_contribution(objective_id, first, weight=1)
        app.add_contribution(objective_id, second, weight=0.5)
        app.add_contribution(objective_id, first, weight=0.75)
        app.remove_contribution(objective_id, second)
        numeric = app.add_key_result(objective_id=objective_id, title="Users", kind=KeyResultKind.increase_to,
                                     start=100, target=500.0, low=None, high=None, milestones=[], unit="",
                                     weight=1, owner_id=person).id
        stages = app.add_key_result(objective_id=objective_id, title="Stages", kind=KeyResultKind.milestones,
                                    start=None, target=None, low=None, high=None,
                                    milestones=[{"title": "alpha", "weight": 1.0}, {"title": "beta", "weight": 2.0}],
                                    unit="", weight=0.5, owner_id=None).id
        app.bind_key_result_to_kpi(numeric, kpi)
        app.check_in(numeric, value=300, confidence=6, note="", valid_on=date(2026, 2, 1), expected_version=None)
        app.check_in(stages, value=1, confidence=None, note="alpha", valid_on=date(2026, 2, 2), expected_version=None)
        for kpi_id in (guard, other_guard):
            app.add_guardrail(objective_id, kpi_id)
        app.remove_guardrail(objective_id, guard)
        app.close_objective(objective_id)
        app.reopen_objective(objective_id)
        app.close_cycle(q1, [parent, first, second, objective_id])
        app.regrade_objective(objective_id, final_score=0.8, reason="the beta shipped a day late")
        carried = app.carry_over(objective_id, q2, status=ObjectiveStatus.draft)[0].id
        written = [app.get_objective(i) for i in (objective_id, carried)]
        key_results = [app.get_key_result(i) for o in written for i in o.key_result_ids]
    finally:
        app.close()
    original, copy_ = written
    assert original.graded and original.status is ObjectiveStatus.closed and original.carried_to_cycles == [q2]
    assert copy_.carried_from == objective_id and copy_.status is ObjectiveStatus.draft
    assert len(key_results) == 4 and key_results[2].kpi_id == kpi

    fresh = Goals(env={**eventsourcing_env(url, "goals"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    try:
        for aggregate in (*written, *key_results):
            replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(aggregate.id))
            assert_same(state(replayed), state(aggregate))
            assert_same(state(replayed), state(through_snapshot(fresh, aggregate)))
            fresh.snapshots.put([type(aggregate).Snapshot.take(aggregate)])
            assert_same(state(replayed), state(fresh.repository.get(aggregate.id)))  # from that snapshot
        # The carried-over copy, loaded from its snapshot, goes on as the replayed one does.
        loaded = fresh.get_objective(carried)
        replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(carried))
    finally:
        fresh.close()
    commands: list[Callable[[Objective], Any]] = [
        lambda o: o.activate(),
        lambda o: o.update(owner_kind=OwnerKind.unit, owner_id=unit),
        lambda o: o.add_guardrail(guard),
        lambda o: o.add_contribution(first, 0.25),
        lambda o: o.close(),
    ]
    for command in commands:
        outcomes = []
        for objective in (loaded, replayed):
            command(objective)
            outcomes.append(events_of(objective))
        assert outcomes[0] == outcomes[1] and outcomes[0]
    assert_same(state(replayed), state(loaded), but=("_modified_on",))


# KPIs ---------------------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)
RULES = [
    {"id": "low", "kind": "below", "severity": "warning", "threshold": 20, "pending_count": 3},
    {"id": "high", "kind": "above", "severity": "critical", "threshold": 90, "recovery": 80},
    {"id": "band", "kind": "outside", "severity": "warning", "low": 5, "high": 95},
]
REVISED = [
    {"id": "low", "kind": "below", "severity": "warning", "threshold": 25, "pending_count": 3, "pending_for": 600},
    {"id": "high", "kind": "above", "severity": "critical", "threshold": 90, "recovery": 80},
]
BULK = 1000


def bulk_value(i: int) -> float:
    """50, with a run of 10s every 100 minutes (the low rule fires 10 minutes in and clears at the
    next 50) and a spike (95, 85, then 50: the high rule fires and clears past its recovery)."""
    return {60: 95.0, 61: 85.0}.get(i % 100, 10.0 if 20 <= i % 100 < 35 else 50.0)


def assert_same_state(expected: Any, actual: Any, *, but: tuple[str, ...] = ()) -> None:
    """Attribute by attribute, type by type. The rules' walks are a cache that a snapshot does not
    store (nor a replay after a revision of the rules): both are walked up to date first."""
    expected, actual = copy.deepcopy(expected), copy.deepcopy(actual)
    expected.walks(), actual.walks()
    assert_same(state(expected), state(actual), but=but)


def test_a_kpi_with_a_bulk_of_measurements_loads_from_its_snapshot(url: str) -> None:
    app = Metrics(env=eventsourcing_env(url, "metrics"))
    try:
        kpi_id = app.define_kpi(name="Latency", unit="ms", direction="lower_is_better", cadence="daily",
                                rules=RULES, target=30.0).id
        first = [app.record_measurement(kpi_id, value=v, measured_at=T0 + timedelta(minutes=n), source="probe",
                                        now=T0) for n, v in enumerate([50.0, 3.0, 2.0, 1.0])]
        assert app.get_kpi(kpi_id).breached == {"low", "band"}
        corrected = app.get_kpi(kpi_id).series.items[1].measurement_id
        app.correct_measurement(kpi_id, corrected, value=60.0, reason="probe misread")  # low: run cut, recovers
        app.change_target(kpi_id, target=25.0, effective_from=date(2026, 3, 15), reason="tighter")
        app.revise_rules(kpi_id, rules=REVISED, reason="band withdrawn")  # band recovers first
        before_bulk = app.get_kpi(kpi_id).version
        assert before_bulk == first[-1].version + 5 < SNAPSHOT_EVERY
        bulk = [MeasurementIn(bulk_value(i), T0 + timedelta(hours=1, minutes=i), "probe") for i in range(BULK)]
        bulk.append(MeasurementIn(70.0, T0 + timedelta(seconds=30), "probe"))  # late: before the second
        bulk.append(MeasurementIn(40.0, T0 + timedelta(minutes=2), "probe"))  # a repeat, another value
        app.record_measurements(kpi_id, bulk, now=T0 + timedelta(hours=20))
        written = app.get_kpi(kpi_id)
    finally:
        app.close()
    assert not written.collect_events()  # the saved KPI, as the cache holds it
    assert len(written.series) == 4 + BULK + 1
    assert written.version > before_bulk + BULK + 2 * (BULK // 100)  # breaches and recoveries too
    assert [t.target for t in written.targets] == [30.0, 25.0]
    assert [r.id for r in written.rules] == ["low", "high"] and not written.breached
    # One save across ten intervals: one snapshot, at the version the save left.
    assert snapshot_versions(url, "metrics.metrics_snapshots", kpi_id) == [written.version]

    fresh = Metrics(env={**eventsourcing_env(url, "metrics"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    try:
        replayed = _replay(fresh.mapper.to_domain_event(e) for e in fresh.recorder.select_events(kpi_id))
        read = counting_reads(fresh)
        loaded = fresh.get_kpi(kpi_id)
        # Events keep the contract's encoding: the KPI's transcodings are the snapshot store's only.
        assert set(fresh.mapper.transcoder.types) == set(standard_transcoder().types)  # type: ignore[attr-defined]
    finally:
        fresh.close()
    # The load: the snapshot, and no event after it.
    assert read == [{"gt": written.version, "events": 0}]
    assert loaded.version == replayed.version == written.version
    assert_same_state(replayed, loaded)
    assert_same_state(written, loaded)

    # From here on the KPI loaded from its snapshot decides as the replayed one (and the one as
    # saved) does: the same events, command after command.
    end = T0 + timedelta(hours=1, minutes=BULK)
    late = UUID(int=1)
    commands: list[Callable[[KPI], Any]] = [
        # A new run of 10s: low fires ten minutes in.
        lambda k: k.record([MeasurementIn(10.0, end + timedelta(minutes=n), "probe") for n in range(12)],
                           now=end, ids=[UUID(int=100 + n) for n in range(12)]),
        # A late 50 inside it: the run is cut, too short since; low recovers at the late one.
        lambda k: k.record([MeasurementIn(50.0, end + timedelta(minutes=5, seconds=30), "probe")], now=end,
                           ids=[late]),
        # Corrected to a 10: the run is whole again, and low fires again.
        lambda k: k.correct(measurement_id=late, value=10.0, reason="late probe misread"),
        # A spike: high fires, and low (past its recovery bound) clears.
        lambda k: k.record([MeasurementIn(96.0, end + timedelta(minutes=20), "probe")], now=end, ids=[UUID(int=2)]),
        # New rules, walked over the whole series: under them high never fired.
        lambda k: k.revise_rules(rules=[{**REVISED[0], "pending_count": 20}, {**REVISED[1], "threshold": 97}],
                                 reason="quieter"),
        lambda k: k.record([MeasurementIn(98.0, end + timedelta(minutes=21), "probe")], now=end, ids=[UUID(int=3)]),
    ]
    appended: list[list[tuple[str, dict[str, Any]]]] = []
    for command in commands:
        outcomes = []
        for kpi in (loaded, replayed, written):
            command(kpi)
            outcomes.append([(type(e).__name__, {k: v for k, v in vars(e).items() if k != "timestamp"})
                             for e in kpi.collect_events()])
        assert outcomes[0] == outcomes[1] == outcomes[2]
        appended.append([name for name, _ in outcomes[0]])
    assert appended == [
        ["Measured"] * 11 + ["ThresholdBreached", "Measured"],
        ["Measured", "Recovered"],
        ["MeasurementCorrected", "ThresholdBreached"],
        ["Measured", "Recovered", "ThresholdBreached"],
        ["RulesRevised", "Recovered"],
        ["Measured", "ThresholdBreached"],
    ]
    assert_same_state(replayed, loaded, but=("_modified_on",))  # the new events' times
