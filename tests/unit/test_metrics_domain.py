"""The KPI aggregate on its own: no database, no application; events are read off the aggregate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.eventstore import event_types
from services.metrics.domain import KPI, DomainError, KPIState, RuleState

T0 = datetime(2026, 11, 1, 9, tzinfo=UTC)


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def csat(*rules: dict[str, Any]) -> KPI:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily", target=95,
                     rules=rules or [{"kind": "below", "threshold": 90, "severity": "critical"}])
    kpi.collect_events()
    return kpi


def measure(kpi: KPI, value: float, n: int) -> list[str]:
    """Measure on day n; the names of the events that one measurement appended."""
    kpi.measure(value=value, measured_at=day(n), source="test")
    return [type(e).__name__ for e in kpi.collect_events()]


def test_event_contract_names() -> None:
    names = {"KPIDefined", "KPIMeasured", "KPIThresholdBreached", "KPIRecovered"}
    assert set(event_types([KPI])) == names


def test_defined_event_carries_plain_rules_with_ids() -> None:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="weekly",
                     rules=[{"kind": "below", "threshold": 90, "severity": "critical"},
                            {"kind": "outside", "low": 1, "high": 5, "severity": "warning", "pending_count": 3}])
    (defined,) = kpi.collect_events()
    assert type(defined).__name__ == "Defined"
    assert defined.direction == "higher_is_better" and defined.cadence == "weekly"
    assert defined.rules == [
        {"id": "rule-1", "kind": "below", "severity": "critical", "threshold": 90, "low": None,
         "high": None, "pending_count": 1, "recovery": None},
        {"id": "rule-2", "kind": "outside", "severity": "warning", "threshold": None, "low": 1,
         "high": 5, "pending_count": 3, "recovery": None},
    ]
    assert kpi.state is KPIState.no_data


def test_floor_rule_breaches_at_once_and_recovers() -> None:
    kpi = csat()
    assert measure(kpi, 93, 1) == ["Measured"]
    assert kpi.state is KPIState.ok
    kpi.measure(value=85, measured_at=day(2), source="survey")
    measured, breached = kpi.collect_events()
    assert breached.rule_id == "rule-1" and breached.severity == "critical" and breached.value == 85
    assert breached.measurement_id == measured.measurement_id and breached.measured_at == day(2)
    assert kpi.state is KPIState.breached
    assert measure(kpi, 80, 3) == ["Measured"]  # still breached: fires once, not on every value
    assert measure(kpi, 91, 4) == ["Measured", "Recovered"]
    assert kpi.state is KPIState.ok and kpi.latest_value == 91


def test_recovery_bound_keeps_the_rule_breached_until_crossed() -> None:
    kpi = csat({"kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"})
    assert measure(kpi, 89, 1) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 91, 2) == ["Measured"]  # no longer violating, not yet recovered
    assert kpi.rule_state("rule-1") is RuleState.breached
    assert measure(kpi, 92, 3) == ["Measured", "Recovered"]


def test_above_rule_with_recovery() -> None:
    kpi = csat({"kind": "above", "threshold": 500, "recovery": 400, "severity": "warning"})
    assert measure(kpi, 500, 1) == ["Measured"]
    assert measure(kpi, 501, 2) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 450, 3) == ["Measured"]
    assert measure(kpi, 400, 4) == ["Measured", "Recovered"]


def test_outside_rule_clears_back_inside_the_range() -> None:
    kpi = csat({"kind": "outside", "low": 10, "high": 20, "severity": "warning"})
    assert measure(kpi, 10, 1) == ["Measured"]
    assert measure(kpi, 21, 2) == ["Measured", "ThresholdBreached"]
    assert measure(kpi, 5, 3) == ["Measured"]
    assert measure(kpi, 20, 4) == ["Measured", "Recovered"]


def test_pending_count_waits_for_consecutive_violations() -> None:
    kpi = csat({"kind": "below", "threshold": 90, "severity": "critical", "pending_count": 2})
    assert measure(kpi, 85, 1) == ["Measured"]
    assert kpi.rule_state("rule-1") is RuleState.pending and kpi.state is KPIState.pending
    assert measure(kpi, 95, 2) == ["Measured"]  # a good value resets the count
    assert kpi.state is KPIState.ok
    assert measure(kpi, 85, 3) == ["Measured"]
    assert measure(kpi, 84, 4) == ["Measured", "ThresholdBreached"]
    assert kpi.state is KPIState.breached


def test_each_rule_fires_on_its_own() -> None:
    kpi = csat({"kind": "below", "threshold": 90, "severity": "warning"},
               {"kind": "below", "threshold": 80, "severity": "critical"})
    kpi.measure(value=85, measured_at=day(1), source="test")
    assert [(type(e).__name__, getattr(e, "rule_id", None)) for e in kpi.collect_events()] == [
        ("Measured", None), ("ThresholdBreached", "rule-1")]
    kpi.measure(value=70, measured_at=day(2), source="test")
    assert [getattr(e, "rule_id", None) for e in kpi.collect_events()] == [None, "rule-2"]


def test_older_measurement_is_recorded_but_changes_no_state() -> None:
    kpi = csat()
    measure(kpi, 95, 5)
    assert measure(kpi, 50, 1) == ["Measured"]
    assert kpi.state is KPIState.ok and kpi.latest_value == 95 and kpi.latest_measured_at == day(5)
    assert kpi.measurement_count == 2
    measure(kpi, 50, 6)
    assert measure(kpi, 99, 2) == ["Measured"]  # an old good value does not clear a breach
    assert kpi.state is KPIState.breached


def test_replaying_the_events_gives_the_same_state() -> None:
    kpi = KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily",
                     rules=[{"kind": "below", "threshold": 90, "severity": "critical", "pending_count": 2}])
    for n, v in enumerate([85, 80, 70, 95, 85]):
        kpi.measure(value=v, measured_at=day(n), source="test")
    copy = None
    for e in kpi.collect_events():
        copy = e.mutate(copy)
    assert copy is not None
    assert (copy.state, copy.consecutive, copy.breached, copy.version) == (
        kpi.state, kpi.consecutive, kpi.breached, kpi.version)
    assert copy.state is KPIState.pending


@pytest.mark.parametrize("rule, message", [
    ({"kind": "below", "severity": "critical"}, "needs a threshold"),
    ({"kind": "above", "threshold": 1, "low": 0, "severity": "critical"}, "not low/high"),
    ({"kind": "outside", "low": 5, "high": 1, "severity": "warning"}, "low <= high"),
    ({"kind": "outside", "low": 1, "severity": "warning"}, "low <= high"),
    ({"kind": "outside", "low": 1, "high": 5, "recovery": 3, "severity": "warning"}, "low and high only"),
    ({"kind": "below", "threshold": 90, "pending_count": 0, "severity": "critical"}, "pending_count"),
    ({"kind": "below", "threshold": 90, "recovery": 85, "severity": "critical"}, "recovery must be >="),
    ({"kind": "above", "threshold": 90, "recovery": 95, "severity": "critical"}, "recovery must be <="),
    ({"kind": "below", "threshold": float("nan"), "severity": "critical"}, "finite"),
    ({"kind": "sideways", "threshold": 1, "severity": "critical"}, "RuleKind"),
    ({"kind": "below", "threshold": 1, "severity": "loud"}, "Severity"),
])
def test_invalid_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(DomainError, match=message):
        KPI.define(name="CSAT", unit="%", direction="higher_is_better", cadence="daily", rules=[rule])


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
    assert kpi.collect_events() == []
