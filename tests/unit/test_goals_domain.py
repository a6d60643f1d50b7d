"""The OKR domain without a database: scoring kind by kind with hand-computed numbers, and the
rules a key result, a cycle and an objective enforce."""

from __future__ import annotations

from datetime import date
from uuid import uuid4

import pytest

from services.goals.domain import (
    Cycle,
    DomainError,
    KeyResult,
    KeyResultKind,
    Measure,
    Objective,
    OwnerKind,
    band,
    weighted_mean,
)


def kr(kind: KeyResultKind, **measure: object) -> KeyResult:
    return KeyResult.define(objective_id=uuid4(), title="t", kind=kind, **measure)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "measure", "value", "expected"),
    [
        # decrease_to, from DESIGN.md: 8 h -> 3 h, at 5.5 h the score is 0.5
        (KeyResultKind.decrease_to, {"start": 8, "target": 3}, 5.5, 0.5),
        (KeyResultKind.decrease_to, {"start": 8, "target": 3}, 2.0, 1.0),  # past the target: clamped
        (KeyResultKind.decrease_to, {"start": 8, "target": 3}, 9.0, 0.0),  # worse than start: clamped
        (KeyResultKind.increase_to, {"start": 45, "target": 65}, 52, 0.35),
        (KeyResultKind.increase_to, {"start": 0, "target": 100}, 60, 0.6),
        (KeyResultKind.stay_above, {"target": 90}, 90, 1.0),
        (KeyResultKind.stay_above, {"target": 90}, 89.9, 0.0),
        (KeyResultKind.stay_below, {"target": 5}, 5, 1.0),
        (KeyResultKind.stay_below, {"target": 5}, 5.1, 0.0),
        (KeyResultKind.stay_within, {"low": 2, "high": 4}, 3, 1.0),
        (KeyResultKind.stay_within, {"low": 2, "high": 4}, 4.5, 0.0),
        (KeyResultKind.done, {}, 1, 1.0),
        (KeyResultKind.done, {}, 0, 0.0),
        # milestones weighted 1, 2, 3: reaching the first two is (1 + 2) / 6
        (KeyResultKind.milestones, {"milestones": [{"title": "a", "weight": 1}, {"title": "b", "weight": 2},
                                                    {"title": "c", "weight": 3}]}, 2, 0.5),
    ],
)
def test_score_by_kind(kind: KeyResultKind, measure: dict[str, object], value: float, expected: float) -> None:
    result = kr(kind, **measure)
    result.check_in(value=value, confidence=5, note="", valid_on=date(2026, 11, 1))
    assert result.score == pytest.approx(expected)


def test_no_check_in_means_no_score_not_zero() -> None:
    assert kr(KeyResultKind.increase_to, start=0, target=10).score is None


def test_bands_at_their_edges() -> None:
    assert [band(s) for s in (None, 0.0, 0.39, 0.4, 0.69, 0.7, 1.0)] == [
        None, "red", "red", "yellow", "yellow", "green", "green"]


def test_weighted_mean_leaves_out_unscored() -> None:
    # (0.5 * 1 + 1.0 * 3) / 4 = 0.875; the unscored key result does not count as zero
    assert weighted_mean([(0.5, 1), (None, 5), (1.0, 3)]) == pytest.approx(0.875)
    assert weighted_mean([(None, 1)]) is None


@pytest.mark.parametrize(
    ("kind", "measure"),
    [
        (KeyResultKind.increase_to, {"start": 10, "target": 5}),
        (KeyResultKind.decrease_to, {"start": 3, "target": 8}),
        (KeyResultKind.increase_to, {"start": 1, "target": 1}),
        (KeyResultKind.increase_to, {"target": 1}),
        (KeyResultKind.stay_above, {}),
        (KeyResultKind.stay_within, {"low": 5, "high": 1}),
        (KeyResultKind.milestones, {}),
        (KeyResultKind.milestones, {"milestones": [{"title": "a", "weight": 0}]}),
    ],
)
def test_invalid_measures_are_refused_before_any_event(kind: KeyResultKind, measure: dict[str, object]) -> None:
    with pytest.raises(DomainError):
        kr(kind, **measure)


def test_check_in_rules() -> None:
    done = kr(KeyResultKind.done)
    with pytest.raises(DomainError):
        done.check_in(value=0.5, confidence=5, note="", valid_on=date(2026, 11, 1))
    ms = kr(KeyResultKind.milestones, milestones=[{"title": "a", "weight": 1}])
    with pytest.raises(DomainError):
        ms.check_in(value=2, confidence=5, note="", valid_on=date(2026, 11, 1))
    inc = kr(KeyResultKind.increase_to, start=0, target=10)
    with pytest.raises(DomainError):
        inc.check_in(value=1, confidence=11, note="", valid_on=date(2026, 11, 1))
    assert inc.version == 1  # nothing was appended by the refused check-ins


def test_a_check_in_for_an_earlier_date_is_history_not_the_current_value() -> None:
    result = kr(KeyResultKind.increase_to, start=0, target=10)
    result.check_in(value=6, confidence=7, note="", valid_on=date(2026, 11, 10))
    result.check_in(value=2, confidence=3, note="late entry", valid_on=date(2026, 11, 1))
    assert result.current == 6 and result.confidence == 7
    assert result.check_in_count == 2
    events = result.collect_events()
    assert [type(e).__qualname__ for e in events] == [
        "KeyResult.Created", "KeyResult.Progressed", "KeyResult.Progressed"]
    assert events[2].valid_on == date(2026, 11, 1)  # type: ignore[attr-defined]


def test_cycle_lifecycle() -> None:
    cycle = Cycle(name="Q4", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31))
    cycle.activate()
    with pytest.raises(DomainError):
        cycle.activate()
    cycle.close()
    with pytest.raises(DomainError):
        cycle.close()
    with pytest.raises(DomainError):
        Cycle(name="bad", starts_on=date(2026, 10, 1), ends_on=date(2026, 9, 1))


def test_objective_cannot_align_to_itself() -> None:
    o = Objective(title="o", description="", owner_kind=OwnerKind.unit, owner_id=uuid4(),
                  unit_id=uuid4(), cycle_id=uuid4())
    with pytest.raises(DomainError):
        o.align_to(o.id)
    parent = uuid4()
    o.align_to(parent)
    o.align_to(parent)  # aligning again to the same parent records nothing new
    assert [type(e).__qualname__ for e in o.collect_events()] == ["Objective.Created", "Objective.Aligned"]


def test_measure_accepts_stored_kind_names() -> None:
    """The read model rebuilds a Measure from stored strings."""
    assert Measure("decrease_to", 8, 3).score(5.5) == pytest.approx(0.5)  # type: ignore[arg-type]
