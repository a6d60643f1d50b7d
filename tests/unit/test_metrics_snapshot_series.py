"""A KPI's series in its snapshot: stored as columns (`kpi_series_columns`) since the bulk path
was made faster; snapshots stored before as a list per reading (`kpi_series`) still load, and
both come back equal to the series, type for type."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import UUID

from services.metrics.application import Metrics
from services.metrics.domain import Reading, Series
from services.metrics.snapshots import SeriesAsReadings


def _series() -> Series:
    series = Series()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(50):
        series.add(Reading(t0 + timedelta(minutes=n, microseconds=n), n, UUID(int=n + 1), 80.0 + n / 7,
                           "sensor ✓" if n % 2 else "api"))
    series.add(Reading(t0 + timedelta(seconds=30), 50, UUID(int=999), 1e-7, "late"))  # out of order
    return series


def _same(a: Series, b: Series) -> None:
    assert a.items == b.items and a.by_key == b.by_key and a.by_id == b.by_id
    for x, y in zip(a.items, b.items, strict=True):
        assert [type(v) for v in x] == [type(v) for v in y]
        assert x.measured_at.tzinfo is y.measured_at.tzinfo is UTC


def test_a_series_is_stored_as_columns_and_comes_back_the_same() -> None:
    transcoder = Metrics(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).snapshots.mapper.transcoder
    series = _series()
    stored = transcoder.encode({"series": series})
    assert json.loads(stored)["series"]["_type_"] == "kpi_series_columns"
    _same(transcoder.decode(stored)["series"], series)


def test_a_snapshot_stored_a_reading_at_a_time_still_loads() -> None:
    transcoder = Metrics(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).snapshots.mapper.transcoder
    series = _series()
    old = json.dumps({"series": {"_type_": "kpi_series", "_data_": SeriesAsReadings().encode(series)}}).encode()
    _same(transcoder.decode(old)["series"], series)
