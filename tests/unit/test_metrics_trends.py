"""Trends and forecasts: the pure maths of the metrics domain, against numbers worked by hand."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from services.metrics.domain import (
    LinearFit,
    PeriodStats,
    ThresholdRule,
    days_between,
    first_violation,
    linear_fit,
    next_period_start,
    period_start,
    predicted_breach,
    previous_period_start,
    trend,
)


def rule(kind: str, **bounds: float) -> ThresholdRule:
    return ThresholdRule(id=f"{kind}-rule", kind=kind, severity="warning", **bounds)


@pytest.mark.parametrize(("day", "period", "start", "after", "before"), [
    (date(2026, 11, 4), "day", date(2026, 11, 4), date(2026, 11, 5), date(2026, 11, 3)),
    (date(2026, 11, 4), "week", date(2026, 11, 2), date(2026, 11, 9), date(2026, 10, 26)),  # a Wednesday
    (date(2026, 11, 2), "week", date(2026, 11, 2), date(2026, 11, 9), date(2026, 10, 26)),  # a Monday
    (date(2026, 11, 30), "month", date(2026, 11, 1), date(2026, 12, 1), date(2026, 10, 1)),
    (date(2026, 12, 31), "month", date(2026, 12, 1), date(2027, 1, 1), date(2026, 11, 1)),
    (date(2027, 1, 15), "month", date(2027, 1, 1), date(2027, 2, 1), date(2026, 12, 1)),
])
def test_period_boundaries(day: date, period: str, start: date, after: date, before: date) -> None:
    assert period_start(day, period) == start
    assert next_period_start(start, period) == after
    assert previous_period_start(start, period) == before


def stats(start: date, avg: float) -> PeriodStats:
    return PeriodStats(start, 2, avg - 1, avg + 1, avg, avg)


def test_period_over_period_change_of_the_mean() -> None:
    points = trend([stats(date(2026, 11, 2), 12), stats(date(2026, 11, 1), 10), stats(date(2026, 11, 4), 9),
                    stats(date(2026, 11, 5), 0), stats(date(2026, 11, 6), 3)], "day")
    assert [p.stats.start.day for p in points] == [1, 2, 4, 5, 6]  # in order, whatever came in
    assert [(p.change, p.change_percent) for p in points] == [
        (None, None),  # nothing before
        (2, 20.0),  # 10 -> 12
        (None, None),  # the 3rd had no measurements: no change to give
        (-9, -100.0),  # 9 -> 0
        (3, None),  # from 0: no percentage
    ]


def test_the_percentage_is_of_the_earlier_means_magnitude() -> None:
    points = trend([stats(date(2026, 12, 1), -4), stats(date(2027, 1, 1), -2), stats(date(2027, 2, 1), -3)], "month")
    assert [(p.change, p.change_percent) for p in points] == [(None, None), (2, 50.0), (-1, -50.0)]


def test_weeks_compare_with_the_week_before() -> None:
    points = trend([stats(date(2026, 10, 26), 8), stats(date(2026, 11, 2), 10), stats(date(2026, 11, 16), 11)], "week")
    assert [p.change for p in points] == [None, 2, None]
    assert points[1].change_percent == pytest.approx(25.0)


def test_least_squares_line() -> None:
    # x: 0 1 2 3, y: 2 3 7 8. Means 1.5 and 5; Sxx = 2.25+0.25+0.25+2.25 = 5;
    # Sxy = (-1.5)(-3) + (-0.5)(-2) + (0.5)(2) + (1.5)(3) = 11; slope 11/5 = 2.2; intercept 5 - 2.2 * 1.5 = 1.7.
    fit = linear_fit([(0, 2), (1, 3), (2, 7), (3, 8)])
    assert fit is not None
    assert (fit.slope, fit.intercept, fit.count) == (pytest.approx(2.2), pytest.approx(1.7), 4)
    assert fit.at(10) == pytest.approx(23.7)


def test_a_line_through_points_in_the_past_has_its_intercept_at_the_origin() -> None:
    # Days before now: -3, -2, -1 with 10, 8, 6: exactly 2 lower per day, so 4 now.
    fit = linear_fit([(-3, 10), (-2, 8), (-1, 6)])
    assert fit is not None and (fit.slope, fit.intercept) == (pytest.approx(-2), pytest.approx(4))


def test_no_line_without_two_distinct_times() -> None:
    assert linear_fit([]) is None
    assert linear_fit([(1, 5)]) is None
    assert linear_fit([(1, 5), (1, 7)]) is None


def test_large_times_lose_no_precision() -> None:
    fit = linear_fit([(1e9 + x, 3 * x + 1) for x in range(5)])
    assert fit is not None and fit.slope == pytest.approx(3, rel=1e-9)


def test_where_the_trend_line_crosses_a_threshold() -> None:
    falling = LinearFit(slope=-2, intercept=20, count=10)  # 20 now, 2 lower per day
    assert first_violation(rule("below", threshold=10), falling) == pytest.approx(5)  # 20 - 2 * 5 = 10
    assert first_violation(rule("below", threshold=25), falling) == 0  # already below
    assert first_violation(rule("above", threshold=25), falling) is None  # falling never rises past it
    assert first_violation(rule("above", threshold=15), falling) == 0
    assert first_violation(rule("outside", low=12, high=30), falling) == pytest.approx(4)  # (12 - 20) / -2
    rising = LinearFit(slope=0.5, intercept=20, count=10)
    assert first_violation(rule("outside", low=12, high=30), rising) == pytest.approx(20)  # (30 - 20) / 0.5
    assert first_violation(rule("below", threshold=10), rising) is None
    flat = LinearFit(slope=0, intercept=20, count=10)
    assert first_violation(rule("below", threshold=10), flat) is None
    assert first_violation(rule("above", threshold=10), flat) == 0


def test_the_predicted_breach_is_the_earliest_within_the_horizon() -> None:
    falling = LinearFit(slope=-2, intercept=20, count=10)
    rules = [rule("below", threshold=10), rule("outside", low=12, high=30)]
    breach = predicted_breach(rules, falling, horizon_days=30)
    assert breach is not None and breach.rule.kind == "outside" and breach.days == pytest.approx(4)
    assert predicted_breach(rules, falling, horizon_days=3.9) is None
    assert predicted_breach(rules[:1], falling, horizon_days=5).days == pytest.approx(5)  # the horizon counts


def test_days_between() -> None:
    assert days_between(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, 12, tzinfo=UTC)) == 1.5
