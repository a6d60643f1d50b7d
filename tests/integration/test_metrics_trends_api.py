"""Trends and forecasts over the read model's measurements, through the REST API against real
PostgreSQL, with numbers worked by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import httpx
import pytest

from services.metrics.api import create_app
from services.metrics.settings import MetricsSettings
from tests.conftest import serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

TODAY = datetime.now(UTC).date()
MONDAY = TODAY - timedelta(days=TODAY.weekday() + 35)  # a Monday five weeks back


def at(day: date, hour: int = 12) -> str:
    return datetime.combine(day, time(hour), tzinfo=UTC).isoformat()


@pytest.fixture(scope="module")
async def metrics(auth: Callable[..., dict[str, str]]) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve_in_process(create_app(MetricsSettings(run_staleness_watch=False))):
        client.headers.update(auth("admin", "ada"))
        yield client


async def kpi_with(client: httpx.AsyncClient, measurements: list[tuple[str, float]],
                   rules: list[dict[str, Any]] | None = None) -> tuple[str, int]:
    r = await client.post("/v1/kpis", json={"name": "Trend", "unit": "n", "direction": "higher_is_better",
                                            "cadence": "daily", "rules": rules or []})
    assert r.status_code == 201, r.text
    kpi_id = r.json()["id"]
    r = await client.post(f"/v1/kpis/{kpi_id}/measurements/bulk", json={"measurements": [
        {"value": v, "measuredAt": t} for t, v in measurements]})
    assert r.status_code == 201, r.text
    return kpi_id, r.json()["position"]


async def get(client: httpx.AsyncClient, path: str, position: int, **params: Any) -> dict[str, Any]:
    r = await client.get(path, params=params, headers={"Tandem-Wait-For": f"metrics={position}"})
    assert r.status_code == 200, r.text
    return r.json()


def day(n: int) -> date:
    return MONDAY + timedelta(days=n)


async def test_weekly_and_daily_trends_with_period_over_period_change(metrics: httpx.AsyncClient) -> None:
    kpi_id, position = await kpi_with(metrics, [
        (at(day(0)), 10), (at(day(1)), 20), (at(day(2), 9), 30), (at(day(2), 8), 5),  # week 0
        (at(day(7)), 25), (at(day(9)), 35),  # week 1
        (at(day(21)), 12),  # week 3 (week 2 has none)
    ])
    # A correction counts with its current value: day 9's 35 becomes 45.
    page = await get(metrics, f"/v1/kpis/{kpi_id}/measurements", position)
    day_9 = next(m for m in page["items"] if m["measuredAt"].startswith(day(9).isoformat()))
    r = await metrics.post(f"/v1/kpis/{kpi_id}/measurements/{day_9['id']}/corrections",
                           json={"value": 45, "reason": "late invoice"})
    assert r.status_code == 201, r.text
    position = r.json()["position"]

    weekly = await get(metrics, f"/v1/kpis/{kpi_id}/trend", position, period="week")
    assert weekly["period"] == "week" and weekly["kpiId"] == kpi_id
    rows = [(i["periodStart"], i["count"], i["min"], i["max"], i["avg"], i["last"], i["change"], i["changePercent"])
            for i in weekly["items"]]
    assert rows == [
        # 10, 20, 30 (9:00) and 5 (8:00 the same day): last is the latest in valid time, 30.
        (day(0).isoformat(), 4, 5, 30, 16.25, 30, None, None),
        (day(7).isoformat(), 2, 25, 45, 35, 45, 18.75, pytest.approx(115.3846, rel=1e-5)),  # 18.75 / 16.25
        (day(21).isoformat(), 1, 12, 12, 12, 12, None, None),  # the week before had nothing
    ]

    # From the middle of week 1 to week 3: whole weeks, and week 1 still compares with week 0.
    window = await get(metrics, f"/v1/kpis/{kpi_id}/trend", position, period="week",
                       **{"from": day(8).isoformat(), "to": day(21).isoformat()})
    assert [(i["periodStart"], i["change"]) for i in window["items"]] == [
        (day(7).isoformat(), 18.75), (day(21).isoformat(), None)]

    daily = await get(metrics, f"/v1/kpis/{kpi_id}/trend", position, period="day",
                      **{"from": day(0).isoformat(), "to": day(1).isoformat()})
    assert [(i["periodStart"], i["avg"], i["change"], i["changePercent"]) for i in daily["items"]] == [
        (day(0).isoformat(), 10, None, None), (day(1).isoformat(), 20, 10, 100)]

    monthly = await get(metrics, f"/v1/kpis/{kpi_id}/trend", position, period="month")
    assert sum(i["count"] for i in monthly["items"]) == 7
    assert all(date.fromisoformat(i["periodStart"]).day == 1 for i in monthly["items"])

    empty = await get(metrics, f"/v1/kpis/{kpi_id}/trend", position, **{"from": "2020-01-01", "to": "2020-02-01"})
    assert empty["items"] == []


async def test_a_linear_forecast_and_the_breach_it_predicts(metrics: httpx.AsyncClient) -> None:
    as_of = datetime.combine(TODAY - timedelta(days=5), time(), tzinfo=UTC)
    # 10, 8, 6 on the three days before as_of: 2 lower a day, so 4 at as_of; a value after as_of
    # (valid time) is not part of the forecast made as of then.
    kpi_id, position = await kpi_with(metrics, [
        ((as_of - timedelta(days=3)).isoformat(), 10), ((as_of - timedelta(days=2)).isoformat(), 8),
        ((as_of - timedelta(days=1)).isoformat(), 6), ((as_of + timedelta(hours=1)).isoformat(), 100)],
        rules=[{"kind": "below", "threshold": -10, "severity": "warning", "id": "floor"},
               {"kind": "outside", "low": 0, "high": 50, "severity": "critical", "id": "band"}])
    path = f"/v1/kpis/{kpi_id}/forecast"

    f = await get(metrics, path, position, as_of=as_of.isoformat(), horizon_days=30)
    assert datetime.fromisoformat(f["asOf"]) == as_of
    assert datetime.fromisoformat(f["horizonAt"]) == as_of + timedelta(days=30)
    assert f["count"] == 3
    assert (f["slopePerDay"], f["intercept"], f["projectedValue"]) == (
        pytest.approx(-2), pytest.approx(4), pytest.approx(4 - 60))
    breach = f["predictedBreach"]  # the band's low (0) at day 2, before the floor (-10) at day 7
    assert (breach["ruleId"], breach["kind"], breach["severity"], breach["low"], breach["high"]) == (
        "band", "outside", "critical", 0, 50)
    assert breach["inDays"] == pytest.approx(2)
    assert abs(datetime.fromisoformat(breach["at"]) - (as_of + timedelta(days=2))) < timedelta(seconds=1)
    assert breach["date"] == (as_of + timedelta(days=2)).date().isoformat()

    short = await get(metrics, path, position, as_of=as_of.isoformat(),
                      until=(as_of + timedelta(days=1)).date().isoformat())
    assert short["projectedValue"] == pytest.approx(2) and short["predictedBreach"] is None

    windowed = await get(metrics, path, position, as_of=as_of.isoformat(),
                         **{"from": (as_of - timedelta(days=2)).date().isoformat()})
    assert windowed["count"] == 2 and windowed["slopePerDay"] == pytest.approx(-2)

    now = await get(metrics, path, position)  # as of now: all four, and 30 days by default
    assert now["count"] == 4 and now["slopePerDay"] > 0
    assert datetime.fromisoformat(now["horizonAt"]) - datetime.fromisoformat(now["asOf"]) == timedelta(days=30)


async def test_a_forecast_needs_two_measurement_times(metrics: httpx.AsyncClient) -> None:
    kpi_id, position = await kpi_with(metrics, [(at(day(1)), 5)])
    f = await get(metrics, f"/v1/kpis/{kpi_id}/forecast", position)
    assert (f["count"], f["slopePerDay"], f["intercept"], f["projectedValue"], f["predictedBreach"]) == (
        1, None, None, None, None)
