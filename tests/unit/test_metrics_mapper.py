"""`MetricsMapper` writes a `KPIMeasured` event's state straight into JSON (a bulk load stores
10,000 of them): the bytes must be exactly those the library's mapper and transcoder write,
since the stored state is the contract and what the hash chain covers."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from services.common.eventstore import CommandContext, MetadataMapper, in_context
from services.metrics.application import Metrics, MetricsMapper
from services.metrics.domain import KPI, MeasurementIn

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SOURCES = ["api", "sensor \"7\"", "naïve – ünïcödé ✓", "line\nbreak\ttab", "back\\slash", "\x01control", "😀", " x "]
VALUES = [0.0, -0.0, 1.0, 0.1, 1e-7, 123456789.123, -1e12, 1e12, 2.5e-300, 99.99999999999999, 1 / 3]


def _kpi() -> KPI:
    kpi = KPI.define(name="k", unit="%", direction="higher_is_better", cadence="daily",
                     rules=[{"kind": "below", "threshold": 50, "severity": "warning"}])
    kpi.collect_events()
    return kpi


def _library_state(mapper: MetricsMapper, event: object) -> StoredEvent:
    """What the library's way (MetadataMapper over the same transcoder) stores."""
    return MetadataMapper.to_stored_event(mapper, event)


@pytest.fixture
def mapper() -> MetricsMapper:
    app = Metrics(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    assert isinstance(app.mapper, MetricsMapper)
    return app.mapper


def test_measured_events_are_stored_byte_for_byte_as_the_library_stores_them(mapper: MetricsMapper) -> None:
    kpi = _kpi()
    kpi.record([MeasurementIn(v, T0 + timedelta(minutes=n, microseconds=n * 7), s)
                for n, (v, s) in enumerate((v, s) for v in VALUES for s in SOURCES)])
    kpi.record([MeasurementIn(40.0, datetime(2026, 3, 2, 9, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                              "offset")])
    events = kpi.collect_events()
    assert sum(type(e) is KPI.Measured for e in events) == len(VALUES) * len(SOURCES) + 1
    for context in (CommandContext("alice", "corr-1"),
                    CommandContext("bø \"b\"", "c", causation_id="KPIMeasured:1", trace_id="ab" * 16)):
        with in_context(context):
            for event in events:
                fast = mapper.to_stored_event(event)
                slow = _library_state(mapper, event)
                assert fast == slow, (fast.state, slow.state)
                if type(event) is KPI.Measured:  # and it was the short way
                    assert mapper._measured_state(vars(event), None) == fast.state


def test_unusual_measured_events_take_the_library_way_with_the_same_result(mapper: MetricsMapper) -> None:
    kpi = _kpi()
    kpi.record([MeasurementIn(1.0, T0, "api")])
    [event] = kpi.collect_events()[:1]
    odd = [
        KPI.Measured(originator_id=kpi.id, originator_version=9, timestamp=T0, measurement_id=UUID(int=1),
                     value=5, measured_at=T0, source="int value"),  # an int, as an old event may hold
        KPI.Measured(originator_id=kpi.id, originator_version=9, timestamp=T0, measurement_id=UUID(int=2),
                     value=math.inf, measured_at=T0, source="inf"),
        event,
    ]
    object.__setattr__(odd[1], "meta", {"actor": "x", "correlation_id": "y", "causation_id": None, "trace_id": None})
    for e in odd:
        assert mapper.to_stored_event(e) == _library_state(mapper, e)
    # Decoded again, the event is the same.
    back = mapper.to_domain_event(mapper.to_stored_event(event))
    assert vars(back) == vars(event)
