"""The KPI aggregate on its own: no database, no application; events are read off the aggregate.

The alerting state machine edge by edge (ok -> pending -> breached -> ok), with pending windows by
count and by duration, recovery bounds, flapping values, out-of-order and corrected measurements,
bulk loads, staleness, targets and rule revisions."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from services.common.eventstore import event_types
from services.metrics.domain import (
    KPI,
    DomainError,
    KPIState,
    MeasurementIn,
    RuleState,
    UnknownMeasurement,
    kpi_state,
)

T0 = datetime(2026, 11, 1, 9, tzinfo=UTC)
FLOOR = {"kind": "below", "threshold": 90, "severity": "critical"}
GRACE = timedelta(hours=6)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def csat(*rules: dict[str, Any], cadence: str = "daily") -> KPI:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence=cadence, target=95,
                     rules=rules or [FLOOR])
    kpi.collect_events()
    return kpi


def names(kpi: KPI) -> list[str]:
    return [type(e).__name__ for e in kpi.collect_events()]


def measure(kpi: KPI, value: float, n: float, source: str = "test") -> list[str]:
    """Measure on day n (as of that moment); the names of the events that one measurement appended."""
    kpi.measure(value=value, measured_at=day(n), source=source, now=day(n), grace=GRACE)
    return names(kpi)


def replayed(kpi: KPI, events: list[Any]) -> KPI:
    copy_ = None
    for e in events:
        copy_ = e.mutate(copy_)
    assert copy_ is not None
    return copy_


def test_event_contract_names() -> None:
    assert set(event_types([KPI])) == {
        "KPIDefined", "KPIMeasured", "KPIThresholdBreached", "KPIRecovered", "KPIMeasurementCorrected",
        "KPIStale", "KPIFreshened", "KPITargetChanged", "KPIRulesRevised"}


def test_defined_event_carries_plain_rules_with_ids() -> None:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="weekly",
                     rules=[{"kind": "below", "threshold": 90, "severity": "critical"},
                            {"kind": "outside", "low": 1, "high": 5, "severity": "warning", "pending_count": 3,
                             "pending_for": 3600}])
    (defined,) = kpi.collect_events()
    assert type(defined).__name__ == "Defined"
    assert defined.direction == "higher_is_better" and defined.cadence == "weekly"
    assert defined.rules == [
        {"id": "rule-1", "kind": "below", "severity": "critical", "threshold": 90, "low": None,
         "high": None, "pending_count": 1, "recovery": None, "pending_for": 0},
        {"id": "rule-2", "kind": "outside", "severity": "warning", "threshold": None, "low": 1,
         "high": 5, "pending_count": 3, "recovery": None, "pending_for": 3600},
    ]
    assert kpi.state is KPIState.no_data


def test_rules_recorded_before_pending_for_existed_still_decode() -> None:
    kpi = KPI(name="Old", description="", unit="%", owner_id=None, unit_id=None, direction="higher_is_better",
              cadence="daily", target=None, rules=[{"id": "rule-1", "kind": "below", "severity": "critical",
                                                    "threshold": 90, "low": None, "high": None,
                                                    "pending_count": None, "recovery": None}])
    assert (kpi.rules[0].pending_count, kpi.rules[0].pending_for) == (1, 0)


# ok -> breached -> ok ----------------------------------------------------------------------

def test_floor_rule_breaches_at_once_and_recovers() -> None:
    kpi = csat()
    assert measure(kpi, 93, 1) == ["Measured"]
    assert kpi.state is KPIState.ok
    kpi.measure(value=85, measured_at=day(2), source="survey", now=day(2))
    measured, breached = kpi.collect_events()
    assert breached.rule_id == "rule-1" and breached.severity == "critical" and breached.value == 85
    assert breached.measurement_id == measured.measurement_id and breached.measured_at == day(2)
    assert kpi.state is KPIState.breached
    assert measure(kpi, 80, 3) == ["Measured"]  # still breached: fires once, not on every value
    assert measure(kpi, 91, 4) == ["Measured", "Recovered"]
    assert kpi.state is KPIState.ok and kpi.latest_value == 91


def test_recovery_bound_keeps_the_rule_breached_until_crossed() -> None:
    kpi = csat({**FLOOR, "recovery": 92})
    assert measure(kpi, 89, 1) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 91, 2) == ["Measured"]  # no longer violating, not yet recovered
    assert kpi.rule_state("rule-1") is RuleState.breached
    assert measure(kpi, 89.5, 3) == ["Measured"]  # back under: still the same breach, not a new one
    assert measure(kpi, 92, 4) == ["Measured", "Recovered"]  # the bound itself clears


def test_above_rule_with_recovery() -> None:
    kpi = csat({"kind": "above", "threshold": 500, "recovery": 400, "severity": "warning"})
    assert measure(kpi, 500, 1) == ["Measured"]  # at the threshold is not past it
    assert measure(kpi, 501, 2) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 450, 3) == ["Measured"]
    assert measure(kpi, 400, 4) == ["Measured", "Recovered"]


def test_outside_rule_clears_back_inside_the_range() -> None:
    kpi = csat({"kind": "outside", "low": 10, "high": 20, "severity": "warning"})
    assert measure(kpi, 10, 1) == ["Measured"]
    assert measure(kpi, 21, 2) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 5, 3) == ["Measured"]  # out on the other side: the same breach
    assert measure(kpi, 20, 4) == ["Measured", "Recovered"]


def test_each_rule_fires_on_its_own() -> None:
    kpi = csat({"kind": "below", "threshold": 90, "severity": "warning"},
               {"kind": "below", "threshold": 80, "severity": "critical"})
    kpi.measure(value=85, measured_at=day(1), source="test", now=day(1))
    assert [(type(e).__name__, getattr(e, "rule_id", None)) for e in kpi.collect_events()] == [
        ("Measured", None), ("ThresholdBreached", "rule-1")]
    kpi.measure(value=70, measured_at=day(2), source="test", now=day(2))
    assert [getattr(e, "rule_id", None) for e in kpi.collect_events()] == [None, "rule-2"]
    kpi.measure(value=85, measured_at=day(3), source="test", now=day(3))
    assert [(type(e).__name__, getattr(e, "rule_id", None)) for e in kpi.collect_events()] == [
        ("Measured", None), ("Recovered", "rule-2")]
    assert kpi.state is KPIState.breached


# Pending: by count ------------------------------------------------------------------------

def test_pending_count_waits_for_consecutive_violations() -> None:
    kpi = csat({**FLOOR, "pending_count": 2})
    assert measure(kpi, 85, 1) == ["Measured"]
    assert kpi.rule_state("rule-1") is RuleState.pending and kpi.state is KPIState.pending
    assert measure(kpi, 95, 2) == ["Measured"]  # a good value resets the count
    assert kpi.state is KPIState.ok
    assert measure(kpi, 85, 3) == ["Measured"]
    assert measure(kpi, 84, 4) == ["Measured", "ThresholdBreached"]
    assert kpi.state is KPIState.breached


def test_after_recovery_the_pending_window_applies_again() -> None:
    kpi = csat({**FLOOR, "pending_count": 2})
    measure(kpi, 85, 1)
    assert measure(kpi, 85, 2) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 95, 3) == ["Measured", "Recovered"]
    assert measure(kpi, 85, 4) == ["Measured"]  # a fresh run: one of two
    assert kpi.state is KPIState.pending
    assert measure(kpi, 85, 5) == ["Measured", "ThresholdBreached"]


def test_flapping_values_never_fire_a_rule_with_a_window() -> None:
    kpi = csat({**FLOOR, "pending_count": 2})
    for n in range(20):
        assert measure(kpi, 85 if n % 2 else 95, n) == ["Measured"]
    assert kpi.state is KPIState.pending  # the last value violates: a run of one


def test_hovering_at_the_threshold_after_a_breach_does_not_flap() -> None:
    kpi = csat({**FLOOR, "recovery": 93})
    assert measure(kpi, 89, 0) == ["Measured", "ThresholdBreached"]
    for n, value in enumerate([90.5, 89.9, 91, 89, 92.9], start=1):
        assert measure(kpi, value, n) == ["Measured"]  # one breach, held through the noise
    assert measure(kpi, 93, 6) == ["Measured", "Recovered"]


# Pending: by duration (Prometheus' `for:`) ------------------------------------------------

def test_pending_for_fires_once_the_violations_span_the_duration() -> None:
    kpi = csat({**FLOOR, "pending_for": 2 * 86400})
    assert measure(kpi, 85, 1) == ["Measured"]  # the run begins: pending
    assert kpi.state is KPIState.pending
    assert measure(kpi, 85, 2) == ["Measured"]  # one day of violation
    assert measure(kpi, 85, 2.99) == ["Measured"]  # not quite two
    assert measure(kpi, 85, 3) == ["Measured", "ThresholdBreached"]  # day 1 to day 3: two days


def test_pending_for_restarts_after_a_good_value() -> None:
    kpi = csat({**FLOOR, "pending_for": 86400})
    measure(kpi, 85, 0)
    assert measure(kpi, 95, 0.5) == ["Measured"]
    assert measure(kpi, 85, 0.75) == ["Measured"]  # a new run from 0.75
    assert measure(kpi, 85, 1.5) == ["Measured"]  # 0.75 days, though day 0 was 1.5 days ago
    assert measure(kpi, 85, 1.75) == ["Measured", "ThresholdBreached"]


def test_a_single_violation_never_fires_a_rule_with_a_duration() -> None:
    kpi = csat({**FLOOR, "pending_for": 3600})
    assert measure(kpi, 1, 0) == ["Measured"]
    assert measure(kpi, 95, 10) == ["Measured"]
    assert kpi.state is KPIState.ok


def test_count_and_duration_must_both_hold() -> None:
    kpi = csat({**FLOOR, "pending_count": 3, "pending_for": 86400})
    assert measure(kpi, 85, 0) == ["Measured"]
    assert measure(kpi, 85, 1.5) == ["Measured"]  # duration met, count not
    assert measure(kpi, 85, 1.6) == ["Measured", "ThresholdBreached"]
    kpi = csat({**FLOOR, "pending_count": 2, "pending_for": 86400})
    assert measure(kpi, 85, 0) == ["Measured"]
    assert measure(kpi, 85, 0.1) == ["Measured"]  # count met, duration not
    assert measure(kpi, 85, 1) == ["Measured", "ThresholdBreached"]


# Out of order: valid time decides ---------------------------------------------------------

def test_a_late_measurement_older_than_all_changes_nothing_it_cannot() -> None:
    kpi = csat()
    measure(kpi, 95, 5)
    assert measure(kpi, 50, 1) == ["Measured"]  # fired and cleared before day 5: nothing now
    assert kpi.state is KPIState.ok and kpi.latest_value == 95 and kpi.latest_measured_at == day(5)
    assert kpi.measurement_count == 2
    measure(kpi, 50, 6)
    assert measure(kpi, 99, 2) == ["Measured"]  # an old good value does not clear today's breach
    assert kpi.state is KPIState.breached


def test_a_late_violation_that_completes_a_run_fires_at_the_runs_newest_measurement() -> None:
    kpi = csat({**FLOOR, "pending_count": 3})
    measure(kpi, 85, 1)
    measure(kpi, 95, 2)
    measure(kpi, 85, 3)
    measure(kpi, 84, 5)
    assert kpi.state is KPIState.pending  # days 3 and 5: a run of two
    newest = kpi.latest
    late_id = kpi.measure(value=80, measured_at=day(4), source="test", now=day(6))
    measured, breached = kpi.collect_events()
    assert measured.measurement_id == late_id
    # Days 3, 4, 5 in valid time: the run reaches three at day 5's measurement.
    assert (breached.rule_id, breached.measurement_id, breached.value, breached.measured_at) == (
        "rule-1", newest.measurement_id, 84, day(5))
    assert kpi.state is KPIState.breached


def test_a_late_good_value_that_cuts_a_run_clears_the_breach_it_fired() -> None:
    kpi = csat({**FLOOR, "pending_count": 2})
    measure(kpi, 85, 1)
    assert measure(kpi, 85, 3) == ["Measured", "ThresholdBreached"]
    late_id = kpi.measure(value=95, measured_at=day(2), source="test", now=day(4))
    measured, recovered = kpi.collect_events()
    # In valid time the rule never fired: the recovery names the measurement that showed it.
    assert type(recovered).__name__ == "Recovered" and recovered.measurement_id == late_id
    assert kpi.state is KPIState.pending  # day 3 alone still violates: a run of one


def test_the_same_values_in_any_order_give_the_same_state() -> None:
    values = [(1, 85), (2, 84), (3, 95), (4, 80), (5, 79), (6, 91), (7, 70)]
    rule = {**FLOOR, "pending_count": 2, "recovery": 92}
    in_order, shuffled = csat(rule), csat(rule)
    for n, v in values:
        measure(in_order, v, n)
    for n, v in [values[i] for i in (6, 2, 0, 5, 3, 1, 4)]:
        shuffled.measure(value=v, measured_at=day(n), source="test", now=day(8))
    shuffled.collect_events()
    # 1,2 fire; 3 (95) clears; 4,5 fire; 6 (91) holds; 7 violates: breached either way.
    assert in_order.state is shuffled.state is KPIState.breached
    [a], [b] = in_order.walks().values(), shuffled.walks().values()
    assert (a.breached, a.run, a.run_start, a.turned_by.measured_at) == (
        b.breached, b.run, b.run_start, b.turned_by.measured_at) == (True, 1, day(7), day(5))


# Idempotency and corrections ----------------------------------------------------------------

def test_the_same_time_and_source_again_is_no_new_measurement() -> None:
    kpi = csat()
    first = kpi.measure(value=93, measured_at=day(1), source="pos", now=day(1))
    kpi.collect_events()
    assert kpi.measure(value=93, measured_at=day(1), source="pos", now=day(1)) == first
    assert kpi.collect_events() == []
    assert kpi.measure(value=93, measured_at=day(1), source="crm", now=day(1)) != first  # another source
    assert names(kpi) == ["Measured"]
    assert kpi.measurement_count == 2


def test_the_same_time_and_source_with_another_value_corrects_it() -> None:
    kpi = csat()
    first = kpi.measure(value=93, measured_at=day(1), source="pos", now=day(1))
    kpi.collect_events()
    assert kpi.measure(value=85, measured_at=day(1), source="pos", now=day(1)) == first
    corrected, breached = kpi.collect_events()
    assert type(corrected).__name__ == "MeasurementCorrected"
    assert (corrected.measurement_id, corrected.value, corrected.previous_value, corrected.measured_at,
            corrected.source) == (first, 85, 93, day(1), "pos")
    assert "another value" in corrected.reason
    assert breached.measurement_id == first and breached.value == 85
    assert kpi.measurement_count == 1 and kpi.latest_value == 85


def test_a_correction_keeps_the_earlier_value_and_re_decides_the_rules() -> None:
    kpi = csat()
    measure(kpi, 93, 1)
    bad = kpi.measure(value=85, measured_at=day(2), source="test", now=day(2))
    kpi.collect_events()
    measure(kpi, 86, 3)
    assert kpi.correct(measurement_id=bad, value=95, reason="typo") is True
    corrected, = kpi.collect_events()  # day 3 still violates: breached all the same
    assert (corrected.value, corrected.previous_value, corrected.reason) == (95, 85, "typo")
    last = kpi.latest.measurement_id
    assert kpi.correct(measurement_id=last, value=96, reason="mis-keyed") is True
    corrected, recovered = kpi.collect_events()
    assert type(recovered).__name__ == "Recovered" and recovered.measurement_id == last
    assert kpi.state is KPIState.ok
    assert kpi.correct(measurement_id=last, value=96, reason="again") is False  # nothing to change
    assert kpi.collect_events() == []
    with pytest.raises(UnknownMeasurement):
        kpi.correct(measurement_id=uuid4(), value=1, reason="who?")
    with pytest.raises(DomainError, match="reason"):
        kpi.correct(measurement_id=last, value=1, reason=" ")
    with pytest.raises(DomainError, match="finite"):
        kpi.correct(measurement_id=last, value=float("nan"), reason="x")


# Bulk ---------------------------------------------------------------------------------------

def test_a_bulk_load_decides_as_the_measurements_would_one_by_one() -> None:
    values = [95, 85, 84, 83, 96, 97, 85, 85]
    rule = {**FLOOR, "pending_count": 2}
    one_by_one, bulk = csat(rule), csat(rule)
    expected = []
    for n, v in enumerate(values):
        expected += measure(one_by_one, v, n)
    shuffled = [MeasurementIn(v, day(n), "bulk") for n, v in reversed(list(enumerate(values)))]
    recorded = bulk.record(shuffled, now=day(len(values)))
    assert (recorded.new, recorded.corrected, recorded.unchanged) == (8, 0, 0)
    assert len(recorded.ids) == 8 and recorded.ids[0] == bulk.latest.measurement_id  # in the order given
    assert names(bulk) == expected == ["Measured"] * 2 + ["Measured", "ThresholdBreached"] + ["Measured"] + [
        "Measured", "Recovered"] + ["Measured"] * 2 + ["Measured", "ThresholdBreached"]
    again = bulk.record(shuffled[:3] + [MeasurementIn(1, day(0), "bulk")], now=day(9))
    assert (again.new, again.corrected, again.unchanged) == (0, 1, 3)
    assert names(bulk) == ["MeasurementCorrected"]  # day 0 was a good 95; its 1 now ends no run


def test_a_bulk_backfill_is_walked_once_and_announces_the_net_change() -> None:
    kpi = csat({**FLOOR, "pending_count": 3})
    measure(kpi, 85, 10)
    day_10 = kpi.latest
    backfill = [MeasurementIn(v, day(n), "backfill") for n, v in [(8, 85), (9, 85), (3, 95)]]
    kpi.record(backfill, now=day(11))
    events = kpi.collect_events()
    assert [type(e).__name__ for e in events] == ["Measured"] * 3 + ["ThresholdBreached"]
    # Days 8, 9, 10 make the run of three: it fires at day 10's measurement, which came first.
    assert (events[-1].measured_at, events[-1].measurement_id) == (day(10), day_10.measurement_id)


def test_a_bad_measurement_refuses_the_whole_bulk() -> None:
    kpi = csat()
    with pytest.raises(DomainError):
        kpi.record([MeasurementIn(1, day(1), "x"), MeasurementIn(float("inf"), day(2), "x")], now=day(3))
    assert kpi.collect_events() == [] and kpi.measurement_count == 0


# Staleness ------------------------------------------------------------------------------------

def test_stale_once_per_gap_and_freshened_by_a_timely_measurement() -> None:
    kpi = csat()
    measure(kpi, 95, 1)
    due = day(2) + GRACE
    assert kpi.check_staleness(now=due - timedelta(seconds=1), grace=GRACE) is False
    assert kpi.check_staleness(now=due, grace=GRACE) is True
    (stale,) = kpi.collect_events()
    assert (type(stale).__name__, stale.expected_by, stale.last_measured_at) == ("Stale", due, day(1))
    assert kpi.state is KPIState.stale and kpi.stale_expected_by == due
    for later in (due, day(5), day(50)):  # the same gap: never again
        assert kpi.check_staleness(now=later, grace=GRACE) is False
    assert kpi.collect_events() == []
    # A backfill that is itself overdue does not freshen it.
    kpi.measure(value=96, measured_at=day(2), source="test", now=day(10), grace=GRACE)
    assert names(kpi) == ["Measured"] and kpi.stale
    assert kpi.check_staleness(now=day(11), grace=GRACE) is False
    # A measurement that makes the next one due in the future does.
    kpi.measure(value=97, measured_at=day(10), source="test", now=day(10.5), grace=GRACE)
    measured, freshened = kpi.collect_events()
    assert type(freshened).__name__ == "Freshened" and freshened.measurement_id == measured.measurement_id
    assert kpi.state is KPIState.ok and not kpi.stale
    assert kpi.check_staleness(now=day(11) + GRACE, grace=GRACE) is True  # a new gap, a new event
    (stale,) = kpi.collect_events()
    assert stale.last_measured_at == day(10)


def test_catching_up_after_downtime_is_one_event_with_the_time_it_was_due() -> None:
    kpi = csat(cadence="weekly")
    measure(kpi, 95, 1)
    assert kpi.check_staleness(now=day(60), grace=GRACE) is True  # the service was down for weeks
    (stale,) = kpi.collect_events()
    assert stale.expected_by == day(8) + GRACE


def test_a_kpi_never_measured_goes_stale_from_its_definition() -> None:
    kpi = csat(cadence="monthly")
    assert kpi.check_staleness(now=kpi.created_on + timedelta(days=31), grace=GRACE) is False
    assert kpi.check_staleness(now=kpi.created_on + timedelta(days=31) + GRACE, grace=GRACE) is True
    (stale,) = kpi.collect_events()
    assert stale.last_measured_at is None and kpi.state is KPIState.stale


def test_breached_outranks_stale_and_stale_outranks_pending() -> None:
    assert kpi_state(["breached"], True, True) is KPIState.breached
    assert kpi_state(["pending"], True, True) is KPIState.stale
    assert kpi_state([], False, True) is KPIState.stale
    assert kpi_state(["pending", "ok"], True, False) is KPIState.pending
    assert kpi_state([], False, False) is KPIState.no_data


# Targets and rules ----------------------------------------------------------------------------

def test_target_changes_keep_their_history() -> None:
    kpi = csat()
    kpi.change_target(target=97, effective_from=date(2026, 12, 1), reason="raised for Q1")
    kpi.change_target(target=93, effective_from=date(2026, 6, 1), reason="backdated")
    changed = kpi.collect_events()
    assert [(e.target, e.effective_from, e.reason) for e in changed] == [
        (97, date(2026, 12, 1), "raised for Q1"), (93, date(2026, 6, 1), "backdated")]
    assert [t.target for t in kpi.targets] == [95, 97, 93]
    assert kpi.target_on(date(2026, 1, 1)) == 95  # the defined target holds from the start
    assert kpi.target_on(date(2026, 6, 1)) == 93
    assert kpi.target_on(date(2026, 12, 1)) == 97
    kpi.change_target(target=98, effective_from=date(2026, 12, 1), reason="same day, recorded later")
    assert kpi.target_on(date(2027, 1, 1)) == 98
    with pytest.raises(DomainError, match="finite"):
        kpi.change_target(target=float("inf"), effective_from=date(2026, 1, 1), reason="")


def test_revised_rules_are_walked_over_the_measurements_so_far() -> None:
    kpi = csat({**FLOOR, "id": "floor"})
    measure(kpi, 92.2, 1)
    measure(kpi, 92, 2)
    assert kpi.revise_rules(rules=[{**FLOOR, "id": "floor", "threshold": 92.5, "pending_count": 2}],
                            reason="tighter") is True
    revised, breached = kpi.collect_events()
    assert type(revised).__name__ == "RulesRevised" and revised.reason == "tighter"
    assert revised.rules[0]["threshold"] == 92.5
    assert (breached.rule_id, breached.value, breached.measured_at) == ("floor", 92, day(2))
    assert kpi.revise_rules(rules=[{**FLOOR, "id": "floor", "threshold": 92.5, "pending_count": 2}],
                            reason="again") is False
    assert kpi.collect_events() == []


def test_withdrawing_a_breached_rule_recovers_it_first() -> None:
    kpi = csat({**FLOOR, "id": "floor"})
    measure(kpi, 80, 1)
    kpi.revise_rules(rules=[{"kind": "above", "threshold": 99, "severity": "warning", "id": "ceiling"}], reason="")
    recovered, revised = kpi.collect_events()
    assert (type(recovered).__name__, recovered.rule_id) == ("Recovered", "floor")
    assert type(revised).__name__ == "RulesRevised"
    assert kpi.breached == set() and kpi.state is KPIState.ok


@pytest.mark.parametrize("rule, message", [
    ({"kind": "below", "severity": "critical"}, "needs a threshold"),
    ({"kind": "above", "threshold": 1, "low": 0, "severity": "critical"}, "not low/high"),
    ({"kind": "outside", "low": 5, "high": 1, "severity": "warning"}, "low <= high"),
    ({"kind": "outside", "low": 1, "severity": "warning"}, "low <= high"),
    ({"kind": "outside", "low": 1, "high": 5, "recovery": 3, "severity": "warning"}, "low and high only"),
    ({"kind": "below", "threshold": 90, "pending_count": 0, "severity": "critical"}, "pending_count"),
    ({"kind": "below", "threshold": 90, "pending_for": -1, "severity": "critical"}, "pending_for"),
    ({"kind": "below", "threshold": 90, "pending_for": 1.5, "severity": "critical"}, "pending_for"),
    ({"kind": "below", "threshold": 90, "recovery": 85, "severity": "critical"}, "recovery must be >="),
    ({"kind": "above", "threshold": 90, "recovery": 95, "severity": "critical"}, "recovery must be <="),
    ({"kind": "below", "threshold": float("nan"), "severity": "critical"}, "finite"),
    ({"kind": "sideways", "threshold": 1, "severity": "critical"}, "RuleKind"),
    ({"kind": "below", "threshold": 1, "severity": "loud"}, "Severity"),
])
def test_invalid_rules_are_refused_at_definition_and_revision(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(DomainError, match=message):
        KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily", rules=[rule])
    kpi = csat()
    with pytest.raises(DomainError, match=message):
        kpi.revise_rules(rules=[rule], reason="")
    assert kpi.collect_events() == []


def test_invalid_kpis_and_measurements_are_refused() -> None:
    with pytest.raises(DomainError):
        KPI.define(name=" ", unit="%", direction="higher_is_better", cadence="daily")
    with pytest.raises(DomainError):
        KPI.define(name="CSAT", unit="%", direction="up", cadence="daily")
    with pytest.raises(DomainError, match="unique"):
        KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily",
                   rules=[{"id": "a", "kind": "below", "threshold": 1, "severity": "warning"}] * 2)
    kpi = csat()
    with pytest.raises(DomainError, match="finite"):
        kpi.measure(value=float("inf"), measured_at=day(1), source="test")
    with pytest.raises(DomainError, match="time zone"):
        kpi.measure(value=1, measured_at=datetime(2026, 11, 1), source="test")
    with pytest.raises(DomainError, match="1900"):
        kpi.measure(value=1, measured_at=datetime(1, 1, 1, tzinfo=UTC), source="test")
    with pytest.raises(DomainError, match="source"):
        kpi.measure(value=1, measured_at=day(1), source="")
    assert kpi.collect_events() == []


# Replay -------------------------------------------------------------------------------------

def test_replaying_the_events_gives_the_same_state() -> None:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily",
                     rules=[{**FLOOR, "pending_count": 2}])
    for n, v in enumerate([85, 80, 70, 95, 85]):
        kpi.measure(value=v, measured_at=day(n), source="test", now=day(n))
    kpi.measure(value=60, measured_at=day(3.5), source="late", now=day(5))
    kpi.correct(measurement_id=kpi.series.items[0].measurement_id, value=99, reason="fix")
    kpi.check_staleness(now=day(20), grace=GRACE)
    kpi.change_target(target=97, effective_from=date(2026, 12, 1), reason="up")
    kpi.revise_rules(rules=[{**FLOOR, "pending_count": 1}], reason="faster")
    copy_ = replayed(kpi, kpi.collect_events())
    assert (copy_.state, copy_.breached, copy_.version, copy_.stale, copy_.targets) == (
        kpi.state, kpi.breached, kpi.version, kpi.stale, kpi.targets)
    assert copy_.series == kpi.series and copy_.walks() == kpi.walks()
    assert copy_.state is KPIState.breached


def test_a_copy_from_the_cache_is_independent() -> None:
    kpi = csat()
    measure(kpi, 95, 1)
    twin = copy.deepcopy(kpi)
    measure(twin, 50, 2)
    assert (kpi.measurement_count, twin.measurement_count) == (1, 2)
    assert kpi.state is KPIState.ok and twin.state is KPIState.breached


def test_a_late_measurement_is_walked_again_only_from_where_it_lands() -> None:
    kpi = csat({**FLOOR, "pending_count": 2})
    kpi.record([MeasurementIn(95 - (n % 3) * 5, day(n / 24), "a") for n in range(2000)], now=day(100))
    kpi.collect_events()
    assert kpi._walks.valid == 2000  # stepped along as they came
    kpi.measure(value=50, measured_at=day(1990.5 / 24), source="b", now=day(100))
    assert kpi._walks.valid == 2000 + 1  # walked again from index 1991 only, and settled
    states = kpi._walks.states["rule-1"]
    fresh = csat({**FLOOR, "pending_count": 2})
    fresh.series = copy.deepcopy(kpi.series)
    assert fresh.walks() == kpi.walks() and len(states) == kpi.measurement_count
    # A source an hour behind another, for a long while: each late value costs an hour's walk.
    kpi.record([MeasurementIn(90, day((2000 + n) / 24), "a") for n in range(1)], now=day(100))
    for n in range(1, 500):
        kpi.measure(value=95, measured_at=day((2000 + n) / 24), source="a", now=day(100))
        kpi.measure(value=80, measured_at=day((2000 + n - 1.5) / 24), source="b", now=day(100))
    kpi.collect_events()
    assert kpi._walks.valid == kpi.measurement_count == 2001 + 499 + 499 + 1
