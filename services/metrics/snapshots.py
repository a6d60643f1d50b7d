"""How a KPI's snapshot is stored: a transcoding for every type in its state that the
snapshot store's transcoder (`services.common.snapshots`) lacks.

Its `direction` and `cadence` (enums) are stored by value, its rules as the events spell them,
its targets as dicts. Only what cannot be derived is stored: a series as its readings, in
columns (its two indexes are rebuilt), the rules' walks as the rule ids alone. The walks are a cache of the rules
over the series, worked out again when next asked for (`Walks.upto`), as after a replay that
revised the rules.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import JSONTranscoder, Transcoding

from services.common.snapshots import enum_by_value
from services.metrics.domain import Cadence, Direction, Reading, Series, TargetEntry, ThresholdRule, Walks


class ThresholdRuleAsDict(Transcoding):
    """As the events spell a rule (`ThresholdRule.as_dict`); its enums come back from it."""

    type = ThresholdRule
    name = "kpi_threshold_rule"

    def encode(self, obj: ThresholdRule) -> dict[str, Any]:
        return obj.as_dict()

    def decode(self, data: dict[str, Any]) -> ThresholdRule:
        return ThresholdRule.from_dict(data)


class TargetEntryAsDict(Transcoding):
    type = TargetEntry
    name = "kpi_target_entry"

    def encode(self, obj: TargetEntry) -> dict[str, Any]:
        return {"target": obj.target, "effective_from": obj.effective_from, "reason": obj.reason}

    def decode(self, data: dict[str, Any]) -> TargetEntry:
        return TargetEntry(data["target"], data["effective_from"], data["reason"])


class SeriesAsReadings(Transcoding):
    """The readings in valid-time order, each `[measured_at, seq, measurement id, value, source]`
    in plain JSON (a tag per datetime and id would double the size); the indexes are rebuilt."""

    type = Series
    name = "kpi_series"

    def encode(self, obj: Series) -> list[list[Any]]:
        return [[r.measured_at.isoformat(), r.seq, r.measurement_id.hex, r.value, r.source] for r in obj.items]

    def decode(self, data: list[list[Any]]) -> Series:
        series = Series()
        series.items = [Reading(datetime.fromisoformat(at), seq, UUID(hex=mid), value, source)
                        for at, seq, mid, value, source in data]
        for reading in series.items:
            series.by_key[(reading.measured_at, reading.source)] = reading
            series.by_id[reading.measurement_id] = reading
        return series


class SeriesAsColumns(Transcoding):
    """The readings in valid-time order as columns: `measured_at` (ISO strings), `seq`, `value`
    and `source` (lists) and `ids` (the measurement ids' 16 bytes each, one hex string). Half the
    time of `SeriesAsReadings` to encode and a third to decode, for a KPI's whole series is in
    every snapshot of it (a list per reading was walked value by value by the snapshot
    transcoder). Snapshots since then are stored so; older ones (`kpi_series`) still load."""

    type = Series
    name = "kpi_series_columns"

    def encode(self, obj: Series) -> dict[str, Any]:
        items = obj.items
        return {"measured_at": [r.measured_at.isoformat() for r in items], "seq": [r.seq for r in items],
                "ids": b"".join([r.measurement_id.bytes for r in items]).hex(),
                "value": [r.value for r in items], "source": [r.source for r in items]}

    def decode(self, data: dict[str, Any]) -> Series:
        ids = bytes.fromhex(data["ids"])
        at = datetime.fromisoformat
        series = Series()
        series.items = [Reading(at(measured_at), seq, UUID(bytes=ids[16 * n:16 * n + 16]), value, source)
                        for n, (measured_at, seq, value, source)
                        in enumerate(zip(data["measured_at"], data["seq"], data["value"], data["source"], strict=True))]
        series.by_key = {(r.measured_at, r.source): r for r in series.items}
        series.by_id = {r.measurement_id: r for r in series.items}
        return series


class WalksAsRuleIds(Transcoding):
    """The rule ids only: the walks themselves are worked out again from the rules and the series
    when next asked for (storing them would take a state per rule and measurement)."""

    type = Walks
    name = "kpi_walks"

    def encode(self, obj: Walks) -> list[str]:
        return list(obj.states)

    def decode(self, data: list[str]) -> Walks:
        return Walks(data)


def register_kpi_state(transcoder: JSONTranscoder) -> None:
    """Register a transcoding for every type in a KPI's state that the snapshot store's own lack.
    The names are stored in snapshots: they stay as they are."""
    for transcoding in (
        enum_by_value(Direction, "kpi_direction"), enum_by_value(Cadence, "kpi_cadence"), ThresholdRuleAsDict(),
        TargetEntryAsDict(), SeriesAsReadings(), SeriesAsColumns(), WalksAsRuleIds(),
    ):
        # A later transcoding of the same type encodes it from then on (SeriesAsColumns); each
        # name still decodes what was stored under it.
        transcoder.register(transcoding)
