"""The gateway's scoring, roll-up and KPI states, against numbers computed by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest

from services.gateway.domain import (
    PERIODS,
    CheckInRecency,
    CoachingWarning,
    GuardrailFacts,
    KeyResultFacts,
    LinearFit,
    Measure,
    ObjectiveFacts,
    ObjectiveNode,
    PeriodStats,
    Point,
    Rule,
    TargetChange,
    band,
    days_between,
    first_violation,
    fit_points,
    kpi_state,
    linear_fit,
    lint_guardrails,
    lint_key_result,
    lint_objective,
    mean_or_none,
    objective_warnings,
    only_maintains_a_number,
    owner_warnings,
    period_start,
    predicted_breach,
    reads_as_activity,
    revise_rules,
    rolled_up_scores,
    rule_state,
    series,
    share,
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


# Coaching lints: the gateway's copy of the goals service's, on the seeds' examples -----------

def kr_facts(title: str, kind: str = "increase_to", objective_id: UUID | None = None) -> KeyResultFacts:
    return KeyResultFacts(uuid4(), objective_id or uuid4(), title, kind)


def objective_facts(title: str = "Improve employee engagement", owner_id: UUID | None = None,
                    cycle_id: UUID | None = None, status: str = "active") -> ObjectiveFacts:
    return ObjectiveFacts(uuid4(), title, owner_id or uuid4(), cycle_id or uuid4(), status)


def codes(warnings: list[CoachingWarning]) -> list[str]:
    return [w.code for w in warnings]


KEY_RESULT_CASES = [
    # the seeds' bad examples
    ("Launch new website", "done", ["key_result_is_a_task", "done_only_key_result"]),
    ("Post 5 times a week on LinkedIn", "increase_to", ["key_result_is_a_task"]),
    ("Publish 15 guest posts on popular startup blogs", "increase_to", ["key_result_is_a_task"]),
    ("Complete 5 user-testing rounds before launch", "increase_to", ["key_result_is_a_task"]),
    ("Launch two new employee well-being initiatives by Q2", "increase_to", ["key_result_is_a_task"]),
    ("Hold a weekly all-hands", "milestones", ["key_result_is_a_task"]),
    ("Earn B Corp Certification by Q4", "done", ["done_only_key_result"]),
    # the seeds' good examples: outcomes
    ("Increase eNPS from 45 to 65", "increase_to", []),
    ("Increase LinkedIn engagement by 40%", "increase_to", []),
    ("Increase conversion rate by 15% after launching new website", "increase_to", []),
    ("Reduce average response time from 8 hours to under 3 hours", "decrease_to", []),
    ("Achieve 90% participation rate in the annual engagement survey", "increase_to", []),
    ("Reach 50,000 monthly listeners", "increase_to", []),
    ("Launch Spotify in 15 new markets in the next quarter", "increase_to", []),
    ("Maintain 4.5+ star rating in app stores", "stay_above", []),
]

OBJECTIVE_TITLES = [
    ("Maintain NPS above 50", True),
    ("Keep uptime at 99.9%", True),
    ("Stay below 2% monthly churn", True),
    ("Sustain 95% employee retention", True),
    ("Remain under 48 hours for critical bugs", True),
    ("Improve employee engagement", False),
    ("Boost customer satisfaction", False),
    ("Maintain a culture of learning while we grow", False),  # no number to hold
    ("Increase NPS to 70 by end of year", False),
]


@pytest.mark.parametrize(("title", "kind", "expected"), KEY_RESULT_CASES)
def test_key_result_lints_on_the_seeds_examples(title: str, kind: str, expected: list[str]) -> None:
    assert codes(lint_key_result(kr_facts(title, kind))) == expected
    assert reads_as_activity(title, kind) == ("key_result_is_a_task" in expected)


@pytest.mark.parametrize(("title", "is_kpi"), OBJECTIVE_TITLES)
def test_an_objective_that_only_maintains_a_number_is_a_kpi(title: str, is_kpi: bool) -> None:
    assert only_maintains_a_number(title) == is_kpi
    o = objective_facts(title)
    warnings = lint_objective(o, [kr_facts("Increase x", objective_id=o.id) for _ in range(3)])
    assert codes(warnings) == (["objective_is_a_kpi"] if is_kpi else [])
    if is_kpi:
        assert "KPI" in warnings[0].message and warnings[0].subject_id == o.id


def test_the_gateways_lints_say_what_the_goals_services_say() -> None:
    """Two copies of one rule set (services share the contract, not code): the same codes and
    messages on every seeds' example."""
    from services.goals import domain as goals

    for title, kind, _ in KEY_RESULT_CASES:
        kr = kr_facts(title, kind)
        assert [(w.code, w.message) for w in lint_key_result(kr)] == [
            (w.code, w.message) for w in goals.lint_key_result(kr)]
    for title, _ in OBJECTIVE_TITLES:
        o = objective_facts(title)
        for n in (0, 2, 3, 6):
            krs = [kr_facts(f"Increase metric {i}", objective_id=o.id) for i in range(n)]
            for left in ((), {o.owner_id}):
                assert [(w.code, w.message) for w in lint_objective(o, krs, left)] == [
                    (w.code, w.message) for w in goals.lint_objective(o, krs, left)]
        guardrails = [GuardrailFacts(uuid4(), "CSAT", True), GuardrailFacts(uuid4(), None, True)]
        for status in ("draft", "active", "closed"):
            o = replace(o, status=status)
            assert [(w.code, w.message) for w in lint_guardrails(o, guardrails)] == [
                (w.code, w.message) for w in goals.lint_guardrails(o, guardrails)]


def test_three_to_five_key_results_per_objective() -> None:
    o = objective_facts()

    def with_krs(n: int) -> list[str]:
        return codes(lint_objective(o, [kr_facts(f"Increase metric {i}") for i in range(n)]))

    assert with_krs(0) == ["too_few_key_results"]
    assert with_krs(2) == ["too_few_key_results"]
    assert with_krs(3) == [] and with_krs(5) == []
    assert with_krs(6) == ["too_many_key_results"]


def test_an_objective_needs_an_owner_who_is_still_here() -> None:
    krs = [kr_facts("Increase x") for _ in range(3)]
    ownerless = replace(objective_facts("Improve onboarding"), owner_id=None)
    assert codes(lint_objective(ownerless, krs)) == ["objective_without_owner"]
    orphaned = objective_facts("Improve onboarding")
    warnings = lint_objective(orphaned, krs, people_who_left={orphaned.owner_id})
    assert codes(warnings) == ["objective_without_owner"] and "left" in warnings[0].message
    assert codes(lint_objective(orphaned, krs)) == []


def test_a_breached_guardrail_warns_while_the_objective_is_pursued() -> None:
    healthy, breached = GuardrailFacts(uuid4(), "NPS", False), GuardrailFacts(uuid4(), "CSAT", True)
    o = objective_facts("Improve sales performance")
    assert lint_guardrails(o, [healthy]) == []
    [w] = lint_guardrails(o, [healthy, breached])
    assert (w.code, w.subject_id) == ("guardrail_breached", o.id) and "'CSAT' is breached" in w.message
    assert lint_guardrails(replace(o, status="closed"), [breached]) == []


def test_an_objective_shows_its_own_its_guardrails_and_its_key_results_warnings() -> None:
    o = objective_facts("Maintain NPS above 50")
    task = kr_facts("Launch new website", "done", o.id)
    warnings = objective_warnings(o, [task], [GuardrailFacts(uuid4(), "CSAT", True)])
    assert [(w.code, w.subject_kind) for w in warnings] == [
        ("objective_is_a_kpi", "objective"), ("too_few_key_results", "objective"),
        ("guardrail_breached", "objective"), ("key_result_is_a_task", "key_result"),
        ("done_only_key_result", "key_result")]
    assert objective_warnings(replace(o, status="archived"), [task]) == []  # put away


def test_at_most_five_objectives_per_owner_per_cycle() -> None:
    owner, q4, q1 = uuid4(), uuid4(), uuid4()

    def objectives(n: int, cycle: UUID, status: str = "active") -> list[ObjectiveFacts]:
        return [objective_facts(f"Improve thing {i}", owner, cycle, status) for i in range(n)]

    assert owner_warnings(objectives(5, q4)) == []
    [six] = owner_warnings(objectives(6, q4))
    assert (six.code, six.subject_id, six.subject_kind) == ("too_many_objectives", owner, "owner")
    assert owner_warnings(objectives(3, q4) + objectives(3, q1)) == []  # per cycle
    assert owner_warnings(objectives(5, q4) + objectives(2, q4, "archived")) == []


# KPI series and forecasts: the gateway's copy of the metrics service's maths -----------------

def at(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 11, day, hour, tzinfo=UTC)


def test_periods_start_on_the_first_day_monday_or_the_1st() -> None:
    wednesday = date(2026, 11, 18)
    assert [period_start(wednesday, p) for p in PERIODS] == [wednesday, date(2026, 11, 16), date(2026, 11, 1)]
    with pytest.raises(ValueError, match="period"):
        period_start(wednesday, "year")


def test_series_per_period() -> None:
    points = [Point(at(16, 9), 10, 1), Point(at(18), 20, 2), Point(at(18), 30, 3),  # same time: the later last
              Point(at(23), 5, 4), Point(at(17, 23), 12, 5)]  # recorded late, for Tuesday
    # Week of the 16th: 10, 12, 20, 30 -> mean 18, last by valid time is the 18th's later one (30).
    # Week of the 23rd: 5.
    assert series(points, "week") == [PeriodStats(date(2026, 11, 16), 4, 18, 10, 30, 30),
                                      PeriodStats(date(2026, 11, 23), 1, 5, 5, 5, 5)]
    days = series(points, "day")
    assert [(s.start.day, s.count, s.last) for s in days] == [(16, 1, 10), (17, 1, 12), (18, 2, 30), (23, 1, 5)]
    assert series(points, "month") == [PeriodStats(date(2026, 11, 1), 5, 15.4, 5, 30, 5)]  # 77 / 5
    assert series([], "day") == []


def test_series_are_in_utc() -> None:
    late_evening_west = datetime(2026, 11, 30, 20, tzinfo=timezone(timedelta(hours=-5)))  # 1 Dec 01:00 UTC
    assert [s.start for s in series([Point(late_evening_west, 1)], "month")] == [date(2026, 12, 1)]


def test_least_squares_line_as_the_metrics_service_draws_it() -> None:
    from services.metrics import domain as metrics

    for points in ([(0, 2), (1, 3), (2, 7), (3, 8)], [(-3, 10), (-2, 8), (-1, 6)], [(1e9 + x, 3 * x + 1)
                                                                                  for x in range(5)]):
        ours, theirs = linear_fit(points), metrics.linear_fit(points)
        assert ours is not None and theirs is not None
        assert (ours.slope, ours.intercept, ours.count) == (theirs.slope, theirs.intercept, theirs.count)
    # Means 1.5 and 5; Sxx = 5; Sxy = 11: slope 2.2, intercept 5 - 2.2 * 1.5 = 1.7
    fit = linear_fit([(0, 2), (1, 3), (2, 7), (3, 8)])
    assert fit is not None and (fit.slope, fit.intercept) == (pytest.approx(2.2), pytest.approx(1.7))
    assert linear_fit([]) is None and linear_fit([(1, 5)]) is None and linear_fit([(1, 5), (1, 7)]) is None


def test_the_fit_is_in_days_from_as_of_over_what_applies_by_then() -> None:
    as_of = at(20, 0)
    # 3, 2 and 1 days before as_of with 10, 8, 6: 2 lower per day, 4 at as_of; the 21st's is after it
    points = [Point(at(17, 0), 10), Point(at(18, 0), 8), Point(at(19, 0), 6), Point(at(21, 0), 100)]
    fit = fit_points(points, as_of)
    assert fit is not None and (fit.slope, fit.intercept, fit.count) == (pytest.approx(-2), pytest.approx(4), 3)
    assert days_between(at(1, 0), at(2, 12)) == 1.5


def test_where_the_trend_line_crosses_a_rule_as_the_metrics_service_says() -> None:
    from services.metrics import domain as metrics

    falling = LinearFit(slope=-2, intercept=20, count=10)  # 20 now, 2 lower per day
    rising = LinearFit(slope=0.5, intercept=20, count=10)
    flat = LinearFit(slope=0, intercept=20, count=10)
    rules = [Rule("b10", "below", "critical", threshold=10), Rule("b25", "below", "critical", threshold=25),
             Rule("a25", "above", "warning", threshold=25), Rule("a15", "above", "warning", threshold=15),
             Rule("o", "outside", "warning", low=12, high=30)]
    expected = {  # days until the line violates each rule
        "falling": [5, 0, None, 0, 4],  # (10 - 20) / -2; already; never; already; (12 - 20) / -2
        "rising": [None, 0, 10, 0, 20],  # never; already; (25 - 20) / 0.5; already; (30 - 20) / 0.5
        "flat": [None, 0, None, 0, None],
    }
    for name, fit in (("falling", falling), ("rising", rising), ("flat", flat)):
        ours = [first_violation(r, fit) for r in rules]
        assert ours == [None if d is None else pytest.approx(d) for d in expected[name]]
        theirs = [metrics.first_violation(metrics.ThresholdRule.from_dict(
            {"id": r.id, "kind": r.kind, "severity": r.severity, "threshold": r.threshold, "low": r.low,
             "high": r.high}), metrics.LinearFit(fit.slope, fit.intercept, fit.count)) for r in rules]
        assert ours == theirs
    breach = predicted_breach([rules[0], rules[4]], falling, horizon_days=30)
    assert breach is not None and breach.rule.id == "o" and breach.days == pytest.approx(4)
    assert predicted_breach([rules[0], rules[4]], falling, horizon_days=3.9) is None
    assert first_violation(Rule("x", "below", "critical"), falling) is None  # no bound, no crossing


# Health of a subtree ---------------------------------------------------------------------------

def test_check_in_recency() -> None:
    today = date(2026, 11, 20)
    days = [today, today - timedelta(days=7), today - timedelta(days=8), today - timedelta(days=30), None]
    recency = CheckInRecency.of(days, today)
    # 2 of 5 within 7 days (0 and 7 days ago); median of 0, 7, 8, 30 is 7.5; one never checked in
    assert (recency.recent_share, recency.median_days_since, recency.never) == (pytest.approx(0.4), 7.5, 1)
    assert CheckInRecency.of([], today) == CheckInRecency(None, None, 0)
    assert CheckInRecency.of([None, None], today) == CheckInRecency(0.0, None, 2)


def test_shares_and_plain_means() -> None:
    assert share(1, 4) == 0.25 and share(0, 0) is None
    assert mean_or_none([0.5, None, 1.0]) == pytest.approx(0.75)
    assert mean_or_none([None]) is None
