"""What makes a replay fast must not change what it builds (services.common.replay, batching).

- Held rows kept from one batch to the next (`ReadModel.keeps_rows`) are dropped when a batch
  fails: the rolled back transaction's rows must not be taken for stored ones.
- `FastDecoding` (orjson, then the transcoder's own transcodings) decodes to what the wrapped
  transcoder decodes, and hands what orjson refuses (NaN) to the transcoder.
- Held rows are written as JSON by orjson, except a row with a float JSON cannot carry.
- The collector's threshold is raised only while a replay runs.
"""

from __future__ import annotations

import gc
import math
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
import pytest
from eventsourcing.persistence import Tracking

from services.common.eventstore import standard_transcoder
from services.common.projections import FastDecoding
from services.common.replay import fewer_collections, open_view, read_model_sources
from services.metrics.projections import METRICS_PROJECTIONS


@pytest.fixture
def view(database_url: str):  # noqa: ANN201
    source = read_model_sources(METRICS_PROJECTIONS)[0]
    schema = f"speedups_{uuid.uuid4().hex[:8]}"
    view, factory = open_view(source, database_url, schema)
    view.keeps_rows = 1000
    yield view
    factory.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _kpi(kpi_id: uuid.UUID, **columns: object) -> dict[str, object]:
    now = datetime(2025, 7, 1, tzinfo=UTC)
    return {"id": kpi_id, "name": "NPS", "description": "", "unit": "", "owner_id": None, "unit_id": None,
            "direction": "higher", "cadence": "daily", "target": 50.0, "state": "no_data", "latest_value": None,
            "latest_measured_at": None, "rules": [], "measurement_count": 0, "version": 1, "created_at": now,
            "updated_at": now, "stale": False, "stale_expected_by": None, "created_by": "test", **columns}


def test_rows_kept_across_batches_are_dropped_when_a_batch_fails(view) -> None:  # noqa: ANN001
    kept, lost = uuid.uuid4(), uuid.uuid4()
    with view.batch():
        view.rows("kpis").insert(**_kpi(kept))
        view.apply(Tracking("Metrics", 1))
    assert view.kept_rows["kpis"].get(kept) is not None  # kept for the next batch
    with pytest.raises(RuntimeError), view.batch():
        view.rows("kpis").insert(**_kpi(lost))
        view.apply(Tracking("Metrics", 2))
        raise RuntimeError("the batch fails")
    with view.batch():
        assert view.rows("kpis").get(lost) is None  # rolled back: not stored, so not held either
        assert view.rows("kpis").get(kept) is not None
        view.apply(Tracking("Metrics", 2))


def test_held_rows_with_a_float_json_cannot_carry_are_written_one_by_one(view) -> None:  # noqa: ANN001
    finite, infinite = uuid.uuid4(), uuid.uuid4()
    when = datetime(2025, 7, 1, 12, 30, 15, 123456, tzinfo=UTC)
    with view.batch():  # as JSON, one statement
        view.rows("kpis").insert(**_kpi(finite, latest_value=0.1, latest_measured_at=when,
                                        rules=[{"id": "r1", "threshold": 1.5, "name": "\u00e9t\u00e9"}]))
        view.apply(Tracking("Metrics", 1))
    with view.batch():  # a statement per row
        view.rows("kpis").insert(**_kpi(infinite, latest_value=math.inf))
        view.apply(Tracking("Metrics", 2))
    with view.batch():
        rows = {r["id"]: r for r in view.query(
            "SELECT id, latest_value, latest_measured_at, rules FROM {schema}.kpis", ())}
        view.apply(Tracking("Metrics", 3))
    assert rows[finite]["latest_value"] == 0.1
    assert rows[finite]["latest_measured_at"] == when
    assert rows[finite]["rules"] == [{"id": "r1", "threshold": 1.5, "name": "\u00e9t\u00e9"}]
    assert rows[infinite]["latest_value"] == math.inf


@pytest.mark.parametrize("data", [
    b'{"a":{"_type_":"uuid_hex","_data_":"95ee20f95ca2470a8a0e6647ae56b3e4"},'
    b'"t":{"_type_":"datetime_iso","_data_":"2025-06-16T09:00:00.123456+00:00"},'
    b'"d":{"_type_":"date_iso","_data_":"2023-05-22"},"m":{"_type_":"decimal_str","_data_":"1.10"},'
    b'"l":[1,2.5,{"_type_":"date_iso","_data_":"2024-01-01"},[{"x":null}]],"s":"\xc3\xa9t\xc3\xa9","n":-0.0,'
    b'"two":{"_type_":"x"},"big":1e300}',
    b'{"v":NaN,"w":Infinity}',
    b'{"huge":123456789012345678901234567890}',
    b'[]',
    b'"text"',
])
def test_fast_decoding_decodes_what_the_transcoder_decodes(data: bytes) -> None:
    transcoder = standard_transcoder()
    expected = transcoder.decode(data)
    decoded = FastDecoding(transcoder).decode(data)
    assert repr(decoded) == repr(expected)
    if isinstance(expected, dict) and "a" in expected:
        assert type(decoded["a"]) is uuid.UUID and type(decoded["t"]) is datetime
        assert type(decoded["d"]) is date and type(decoded["m"]) is Decimal


def test_fast_decoding_refuses_an_unknown_tag_as_the_transcoder_does() -> None:
    data = b'{"a":{"_type_":"unheard_of","_data_":"1"}}'
    with pytest.raises(Exception) as slow:
        standard_transcoder().decode(data)
    with pytest.raises(type(slow.value)):
        FastDecoding(standard_transcoder()).decode(data)


def test_the_collector_threshold_is_raised_only_while_replays_run() -> None:
    before = gc.get_threshold()
    with fewer_collections():
        raised = gc.get_threshold()
        with fewer_collections():
            pass
        assert gc.get_threshold() == raised  # an inner (concurrent) replay ending leaves it raised
    assert raised[0] > before[0]
    assert gc.get_threshold() == before
