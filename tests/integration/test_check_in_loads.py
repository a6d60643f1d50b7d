"""A check-in's loads on real PostgreSQL: the key result, its objective and its cycle, when cached,
are brought up to date with the log in ONE query (`TandemApplication.up_to_date_cached`), not a
round trip each, and what that gives is what three fresh loads give: another replica's check-in
makes an If-Match stale (412) and is built on, its closing of the objective or the cycle refuses
the check-in, and a key result it moved to another objective is judged by that objective."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any
from uuid import UUID

import pytest

from services.common.database import ensure_schema, eventsourcing_env
from services.common.eventstore import VersionMismatch
from services.goals.application import Goals
from services.goals.domain import DomainError, KeyResultKind, OwnerKind, UnitKind
from tests.conftest import fresh_database


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with fresh_database() as url:
        ensure_schema(url, "goals")
        yield url


@pytest.fixture
def replicas(url: str) -> Iterator[tuple[Goals, Goals]]:
    """Two goals applications on one log, each with its own aggregate cache: two replicas."""
    one, two = Goals(env=eventsourcing_env(url, "goals")), Goals(env=eventsourcing_env(url, "goals"))
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def a_key_result(app: Goals, name: str) -> dict[str, UUID]:
    unit = app.create_unit(name=name, kind=UnitKind.company, parent_id=None).id
    cycle = app.create_cycle(name="2026", starts_on=date(2026, 1, 1), ends_on=date(2026, 12, 31), activate=True).id
    objectives = [app.create_objective(title=t, description="", owner_kind=OwnerKind.unit, owner_id=unit,
                                       unit_id=unit, cycle_id=cycle, parent_id=None).id for t in ("Grow", "Keep")]
    kr = app.add_key_result(objective_id=objectives[0], title="Revenue", kind=KeyResultKind.increase_to, start=0,
                            target=1000, low=None, high=None, milestones=[], unit="", weight=1, owner_id=None).id
    return {"unit": unit, "cycle": cycle, "objective": objectives[0], "other": objectives[1], "kr": kr}


def check_in(app: Goals, kr: UUID, value: float, expected_version: int | None = None) -> Any:
    return app.check_in(kr, value=value, confidence=7, note="", valid_on=date(2026, 3, 1),
                        expected_version=expected_version)


class Reads:
    """Counts a recorder's reads of events: the library's one aggregate at a time
    (`select_events`), and the one query for several (`up_to_date_cached`)."""

    def __init__(self, app: Goals, monkeypatch: pytest.MonkeyPatch):
        self.one_by_one = 0
        self.together = 0
        recorder: Any = app.recorder
        select_events = recorder.select_events
        up_to_date_cached = app.up_to_date_cached

        def counted_select(*args: Any, **kwargs: Any) -> Any:
            self.one_by_one += 1
            return select_events(*args, **kwargs)

        def counted_together(*ids: UUID, **kwargs: Any) -> Any:
            self.together += 1
            return up_to_date_cached(*ids, **kwargs)

        monkeypatch.setattr(recorder, "select_events", counted_select)
        monkeypatch.setattr(app, "up_to_date_cached", counted_together)

    def reset(self) -> None:
        self.one_by_one = self.together = 0


def test_a_cached_check_in_reads_the_log_once_and_builds_on_the_other_replicas_writes(
        url: str, replicas: tuple[Goals, Goals], monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = replicas
    ids = a_key_result(one, "Once")
    first = check_in(one, ids["kr"], 10)  # loads the three into `one`'s cache
    reads = Reads(one, monkeypatch)
    second = check_in(one, ids["kr"], 20)
    assert second.version == first.version + 1
    assert (reads.together, reads.one_by_one) == (1, 0)  # one query for the key result, objective, cycle
    to_change = one._key_result_to_move(ids["kr"], None)  # noqa: SLF001
    cached = one.repository.cache.get(ids["kr"])
    assert to_change is not cached and to_change._check_ins is not cached._check_ins  # noqa: SLF001 - a deep copy
    assert to_change.version == cached.version == second.version

    # Another replica checks in: `one`'s cached key result is behind the log.
    by_two = check_in(two, ids["kr"], 30)
    assert by_two.version == second.version + 1
    reads.reset()
    with pytest.raises(VersionMismatch) as stale:
        check_in(one, ids["kr"], 40, expected_version=second.version)
    assert (stale.value.expected, stale.value.actual) == (second.version, by_two.version)
    third = check_in(one, ids["kr"], 40, expected_version=by_two.version)
    assert third.version == by_two.version + 1
    assert reads.one_by_one == 0 and reads.together == 2

    # Each replica's state is what a fresh load of the log gives.
    fresh = Goals(env={**eventsourcing_env(url, "goals"), "AGGREGATE_CACHE_MAXSIZE": "0"})
    try:
        expected = fresh.get_key_result(ids["kr"])
        for app in (one, two):
            got = app.get_key_result(ids["kr"])
            assert got.version == expected.version == third.version
            assert got.current == expected.current == 40
            assert got.check_in_count == expected.check_in_count == 4
            assert got._check_ins == expected._check_ins  # noqa: SLF001 - the whole history, correction-ready
    finally:
        fresh.close()


def test_an_objective_closed_by_another_replica_refuses_the_check_in(replicas: tuple[Goals, Goals]) -> None:
    one, two = replicas
    ids = a_key_result(one, "Objective closed")
    check_in(one, ids["kr"], 10)
    two.close_objective(ids["objective"])
    with pytest.raises(DomainError, match="objective is closed"):
        check_in(one, ids["kr"], 20)
    with pytest.raises(DomainError, match="objective is closed"):
        one.correct_check_in(ids["kr"], corrects_version=one.get_key_result(ids["kr"]).version, value=11)


def test_a_cycle_closed_by_another_replica_refuses_the_check_in(replicas: tuple[Goals, Goals]) -> None:
    one, two = replicas
    ids = a_key_result(one, "Cycle closed")
    check_in(one, ids["kr"], 10)
    two.close_cycle(ids["cycle"])  # the objectives are left open: the cycle alone freezes them
    with pytest.raises(DomainError, match="cycle is closed"):
        check_in(one, ids["kr"], 20)


def test_a_key_result_moved_by_another_replica_is_judged_by_its_new_objective(
        replicas: tuple[Goals, Goals], monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = replicas
    ids = a_key_result(one, "Moved")
    check_in(one, ids["kr"], 10)  # `one` caches the key result under its first objective
    two.move_key_result(ids["kr"], ids["other"])
    two.close_objective(ids["other"])
    reads = Reads(one, monkeypatch)
    with pytest.raises(DomainError, match="objective is closed"):
        check_in(one, ids["kr"], 20)
    assert reads.one_by_one > 0  # the moved key result's new objective: loaded the library's way
