"""The gateway's scoring, roll-up and KPI states, against numbers computed by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from uuid import uuid4

import pytest

from services.gateway.domain import (
    Measure,
    ObjectiveNode,
    Rule,
    TargetChange,
    band,
    kpi_state,
    revise_rules,
    rolled_up_scores,
    rule_state,
    supersedes,
    target_in_force,
    violates,
    weighted_mean,
)


@pytest.mark.parametrize(("measure", "current", "expected"), [
    (Measure("decrease_to", start=8, target=3), 5.5, 0.5),         # DESIGN.md's example
    (Measure("decrease_to", start=8, target=3), 9, 0.0),           # worse than the start: clamped
    (Measure("decrease_to", start=8, target=3), 2, 1.0),           # past the target: clamped
    (Measure("increase_to", start=10, target=50), 20, 0.25),
    (Measure("increase_to", start=10, target=50), None, None),     # no check-in: no score, not 0
    (Measure("increase_to", start=10, target=10), 10, None),       # a measure goals would refuse
    (Measure("stay_above", target=99.9), 99.9, 1.0),
    (Measure("stay_above", target=99.9), 99.8, 0.0),
    (Measure("stay_below", target=200), 200, 1.0),
    (Measure("stay_below", target=200), 201, 0.0),
    (Measure("stay_within", low=1, high=2), 1.5, 1.0),
    (Measure("stay_within", low=1, high=2), 2.5, 0.0),
    (Measure("done"), 1, 1.0),
    (Measure("done"), 0, 0.0),
    (Measure("milestones", milestone_weights=(1, 1, 2)), 2, 0.5),
    (Measure("milestones", milestone_weights=(1, 1, 2)), 3, 1.0),
    (Measure("milestones", milestone_weights=(1, 1, 2)), 0, 0.0),
])
def test_key_result_scores(measure: Measure, current: float | None, expected: float | None) -> None:
    assert measure.score(current) == (pytest.approx(expected) if expected is not None else None)


def test_bands_have_inclusive_lower_edges() -> None:
    assert [band(s) for s in (None, 0.0, 0.399, 0.4, 0.699, 0.7, 1.0)] == [
        None, "red", "red", "yellow", "yellow", "green", "green"]


def test_weighted_mean_leaves_out_missing_scores() -> None:
    assert weighted_mean([(0.5, 1), (None, 3), (1.0, 3)]) == pytest.approx((0.5 + 3.0) / 4)
    assert weighted_mean([(None, 1)]) is None
    assert weighted_mean([]) is None


def test_roll_up_counts_aligned_objectives_with_weight_one() -> None:
    a, b, c, d = (uuid4() for _ in range(4))
    tree = {
        a: ObjectiveNode(None, [(0.5, 1.0), (None, 3.0)]),    # score 0.5
        b: ObjectiveNode(a, [(1.0, 1.0), (0.5, 1.0)]),       # score 0.75
        c: ObjectiveNode(b, [(1.0, 2.0), (0.4, 1.0)]),       # score 0.8
        d: ObjectiveNode(a, []),                             # no score: left out
    }
    rolled = rolled_up_scores(tree)
    assert tree[b].score == pytest.approx(0.75)
    assert rolled[c] == pytest.approx(0.8)
    assert rolled[b] == pytest.approx((1.0 + 0.5 + 0.8) / 3)           # 0.7667
    assert rolled[a] == pytest.approx((0.5 + (1.0 + 0.5 + 0.8) / 3) / 2)  # 0.6333
    assert rolled[d] is None


def test_roll_up_of_an_objective_without_key_results_is_its_children_mean() -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    rolled = rolled_up_scores({a: ObjectiveNode(None), b: ObjectiveNode(a, [(0.2, 5.0)]),
                               c: ObjectiveNode(a, [(1.0, 1.0)])})
    assert rolled[a] == pytest.approx(0.6)  # 0.2 and 1.0 at weight 1 each, not the KR weights


def test_roll_up_treats_a_missing_parent_as_a_root_and_survives_a_loop() -> None:
    a, b, outside = uuid4(), uuid4(), uuid4()
    assert rolled_up_scores({a: ObjectiveNode(outside, [(0.3, 1.0)])}) == {a: pytest.approx(0.3)}
    rolled = rolled_up_scores({a: ObjectiveNode(b, [(1.0, 1.0)]), b: ObjectiveNode(a, [(0.0, 1.0)])})
    assert set(rolled) == {a, b}


@pytest.mark.parametrize(("kind", "value", "threshold", "low", "high", "expected"), [
    ("below", 99.0, 99.5, None, None, True),
    ("below", 99.5, 99.5, None, None, False),
    ("above", 201, 200, None, None, True),
    ("above", 200, 200, None, None, False),
    ("outside", 0.5, None, 1, 2, True),
    ("outside", 2.5, None, 1, 2, True),
    ("outside", 2.0, None, 1, 2, False),
])
def test_threshold_rules(kind: str, value: float, threshold: float | None, low: float | None,
                         high: float | None, expected: bool) -> None:
    assert violates(kind, value, threshold, low, high) is expected


def test_rule_states() -> None:
    assert rule_state(breached=False, latest_violates=False) == "ok"
    assert rule_state(breached=False, latest_violates=True) == "pending"
    assert rule_state(breached=True, latest_violates=False) == "breached"  # short of its recovery bound
    assert rule_state(breached=True, latest_violates=True) == "breached"


def test_kpi_states_breached_over_stale_over_pending_over_ok() -> None:
    assert kpi_state(False, []) == "no_data"
    assert kpi_state(False, ["ok"], stale=True) == "stale"  # never measured, and overdue
    assert kpi_state(True, []) == "ok"
    assert kpi_state(True, ["ok", "pending"]) == "pending"
    assert kpi_state(True, ["pending", "breached", "ok"]) == "breached"
    assert kpi_state(True, ["ok"], stale=True) == "stale"
    assert kpi_state(True, ["pending"], stale=True) == "stale"
    assert kpi_state(True, ["pending", "breached"], stale=True) == "breached"


def test_the_latest_measurement_is_the_latest_by_valid_time() -> None:
    t = datetime(2026, 11, 20, 12, tzinfo=UTC)
    assert supersedes(None, t)  # the first
    assert supersedes(t, t + timedelta(seconds=1))
    assert supersedes(t, t)  # the same time (another source): the later to arrive
    assert not supersedes(t, t - timedelta(hours=1))  # late: history


def test_a_rule_from_the_contract_gets_the_metrics_services_defaults() -> None:
    old = Rule.from_contract({"id": "r", "kind": "below", "threshold": 99.5, "severity": "critical"})
    assert (old.pending_count, old.pending_for, old.recovery, old.breached) == (1, 0, None, False)
    assert Rule.from_contract({"kind": "above", "threshold": 1, "severity": "warning"}, 3).id == "rule-3"
    rule = Rule.from_contract({"id": "r", "kind": "below", "threshold": 99.5, "severity": "critical",
                               "pending_count": 3, "pending_for": 3600, "recovery": 99.7})
    assert (rule.pending_count, rule.pending_for, rule.recovery) == (3, 3600, 99.7)


def test_a_rule_is_pending_while_the_latest_value_violates_it() -> None:
    rule = Rule("r", "below", "critical", threshold=99.5, pending_count=3, pending_for=600, recovery=99.7)
    assert rule.state(None) == "ok"
    assert rule.state(99.0) == "pending"  # however many violations came before: the window is the metrics'
    assert rule.state(99.5) == "ok"
    breached = replace(rule, breached=True)
    assert [breached.state(v) for v in (99.0, 99.6, 99.8)] == ["breached"] * 3  # only KPIRecovered clears it
    outside = Rule("o", "outside", "warning", low=1, high=2)
    assert [outside.state(v) for v in (0.5, 1, 2, 2.5)] == ["pending", "ok", "ok", "pending"]


def test_revised_rules_keep_their_breach_by_id() -> None:
    current = [Rule("avail", "below", "critical", threshold=99.5, breached=True),
               Rule("latency", "above", "warning", threshold=200, breached=True),
               Rule("errors", "above", "warning", threshold=1)]
    revised = revise_rules(current, [
        {"id": "errors", "kind": "above", "threshold": 2, "severity": "critical"},
        {"id": "avail", "kind": "below", "threshold": 99.0, "severity": "critical", "pending_for": 600},
        {"id": "spike", "kind": "above", "threshold": 1000, "severity": "warning", "pending_count": 2},
    ])
    assert [(r.id, r.threshold, r.breached) for r in revised] == [
        ("errors", 2, False), ("avail", 99.0, True), ("spike", 1000, False)]  # latency withdrawn
    assert (revised[1].pending_for, revised[2].pending_count) == (600, 2)
    assert revise_rules(current, []) == []


def test_the_target_in_force_is_the_latest_effective_change_on_or_before_today() -> None:
    today = date(2026, 11, 20)
    assert target_in_force(None, [], today) is None
    assert target_in_force(99.9, [], today) == 99.9
    changes = [
        TargetChange(99.95, date(2026, 11, 1), version=5),
        TargetChange(99.99, date(2026, 12, 1), version=6),  # not yet
        TargetChange(99.0, date(2026, 10, 1), version=7),   # recorded later, effective earlier
    ]
    assert target_in_force(99.9, changes, today) == 99.95
    assert target_in_force(99.9, changes, date(2026, 12, 1)) == 99.99  # on its day
    assert target_in_force(99.9, changes, date(2026, 10, 15)) == 99.0
    assert target_in_force(99.9, changes, date(2026, 9, 30)) == 99.9  # before any: the defined one
    assert target_in_force(None, changes, date(2026, 9, 30)) is None
    tie = [*changes, TargetChange(99.97, date(2026, 11, 1), version=8)]
    assert target_in_force(99.9, tie, today) == 99.97  # the same day: the later recorded
    assert target_in_force(99.9, list(reversed(tie)), today) == 99.97  # whatever order they come in


def test_contributions_roll_up_with_their_weights() -> None:
    from uuid import uuid4

    from services.gateway.domain import ObjectiveNode, rolled_up_scores

    company, aligned, contributor = uuid4(), uuid4(), uuid4()
    nodes = {
        company: ObjectiveNode(None, [(0.8, 1.0)]),
        aligned: ObjectiveNode(company, [(0.5, 1.0)]),
        contributor: ObjectiveNode(None, [(0.2, 1.0)], {company: 2.0}),
    }
    # (0.8 * 1 + 0.5 * 1 + 0.2 * 2) / 4 = 0.425
    assert rolled_up_scores(nodes)[company] == pytest.approx(0.425)
    assert rolled_up_scores(nodes)[contributor] == pytest.approx(0.2)


def test_the_current_check_in_is_the_latest_day_as_last_corrected() -> None:
    from datetime import date

    from services.gateway.domain import CheckIn, current_check_in

    assert current_check_in([]) is None
    history = [
        CheckIn(2, date(2026, 11, 10), 6, 7),
        CheckIn(3, date(2026, 11, 1), 2, 3),  # an earlier day: history
        CheckIn(4, date(2026, 11, 10), 5, 6, corrects=2),  # fixes version 2 in place
        CheckIn(5, date(2026, 11, 10), 5.5, 6, corrects=2),  # and fixes it again
    ]
    current = current_check_in(history)
    assert current is not None and (current.version, current.value, current.confidence) == (2, 5.5, 6)
    # a correction that moves a check-in to an earlier day lets the other one be current
    moved = current_check_in([*history, CheckIn(6, date(2026, 10, 1), 5.5, 6, corrects=2)])
    assert moved is not None and (moved.version, moved.value) == (3, 2)
