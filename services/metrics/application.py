"""Commands and queries of the metrics service over the `eventsourcing` application.

Commands are synchronous (the library's PostgreSQL persistence is psycopg 3); the API runs them
in a thread pool. Each returns what the client needs to read its own write: the KPI's id, its
new version (the ETag) and the log position of the last event stored. Every command is one save
of one KPI, so all it appends (a bulk load of 10,000 measurements included) is one transaction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from json.encoder import encode_basestring
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent
from eventsourcing.utils import get_topic

from services.common.eventstore import (
    SNAPSHOT_EVERY,
    MetadataMapper,
    TandemApplication,
    Written,
    retry_on_conflict,
)
from services.metrics.domain import (
    DEFAULT_STALENESS_GRACE,
    KPI,
    Cadence,
    Direction,
    MeasurementIn,
    ThresholdRule,
)
from services.metrics.snapshots import register_kpi_state

GRACE_ENV = "TANDEM_STALENESS_GRACE_SECONDS"


_MEASURED_TOPIC = get_topic(KPI.Measured)
_MEASURED_KEYS = ("originator_id", "originator_version", "timestamp", "measurement_id", "value", "measured_at",
                  "source", "meta")
_MEASURED_STATE = ('{"timestamp":{"_type_":"datetime_iso","_data_":"%s"},'
                   '"measurement_id":{"_type_":"uuid_hex","_data_":"%s"},"value":%s,'
                   '"measured_at":{"_type_":"datetime_iso","_data_":"%s"},"source":%s,"meta":%s}')


class MetricsMapper(MetadataMapper):
    """The events' mapper, with a short way for `KPIMeasured`, of which a bulk load stores
    10,000: its state written straight into the JSON the library's transcoder would write (the
    same bytes, key for key: `tests/unit/test_metrics_mapper.py` compares them), not through the
    encoder's callback for each id and time. Anything unusual (a value that is not a finite
    float, a time or id of a subclass, a compressor or a cipher, an event with other fields)
    takes the library's way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encode_json = self.transcoder.encoder.encode  # type: ignore[attr-defined]
        self._last: tuple[dict[str, Any], str] | None = None
        """The latest context's `meta` and that as JSON: a bulk load's events share one."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if type(domain_event) is KPI.Measured and self.compressor is None and self.cipher is None:
            shared = self.stamp(domain_event)
            encoded = self._measured_state(vars(domain_event), None if shared is None else self._meta_json(shared))
            if encoded is not None:
                return StoredEvent(originator_id=domain_event.originator_id,
                                   originator_version=domain_event.originator_version,
                                   topic=_MEASURED_TOPIC, state=encoded)
        return super().to_stored_event(domain_event)

    def _meta_json(self, meta: dict[str, Any]) -> str:
        """A context's `meta` as JSON, encoded once for the events that share it."""
        last = self._last
        if last is None or last[0] is not meta:
            last = self._last = (meta, self._encode_json(meta))
        return last[1]

    def _measured_state(self, state: dict[str, Any], meta_json: str | None) -> bytes | None:
        if tuple(state) != _MEASURED_KEYS:  # the order the library's JSON would have
            return None
        timestamp, measurement_id, value = state["timestamp"], state["measurement_id"], state["value"]
        measured_at, source, meta = state["measured_at"], state["source"], state["meta"]
        if not (type(timestamp) is datetime and type(measured_at) is datetime and type(measurement_id) is UUID
                and type(value) is float and math.isfinite(value) and type(source) is str):
            return None
        if meta_json is None:
            if type(meta) is not dict or not all(type(v) in (str, type(None)) for v in meta.values()):
                return None
            meta_json = self._encode_json(meta)
        return (_MEASURED_STATE % (timestamp.isoformat(), measurement_id.hex, float.__repr__(value),
                                   measured_at.isoformat(), encode_basestring(source), meta_json)).encode("utf8")


class Metrics(TandemApplication):
    """The metrics service's write side. Its log is the table `metrics.metrics_events`."""

    name = "Metrics"
    # Bulk loads make KPIs the long histories: loaded from a snapshot at most 100 events back.
    snapshotting_intervals: ClassVar[dict[type[Aggregate], int]] = {KPI: SNAPSHOT_EVERY}

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        grace = (env or {}).get(GRACE_ENV) or os.environ.get(GRACE_ENV)
        self.staleness_grace = timedelta(seconds=float(grace)) if grace else DEFAULT_STALENESS_GRACE
        """How long past its cadence a KPI may go unmeasured before it is stale (the API sets
        it from `MetricsSettings.staleness_grace_seconds`)."""

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(transcoder=self.construct_transcoder(), mapper_class=MetricsMapper)

    def register_snapshot_transcodings(self, transcoder: JSONTranscoder) -> None:
        """The snapshot store's transcodings (`services.common.snapshots`), and one for each type
        in a KPI's state they lack (`services.metrics.snapshots`); events keep the application's."""
        super().register_snapshot_transcodings(transcoder)
        register_kpi_state(transcoder)

    def define_kpi(
        self,
        *,
        name: str,
        unit: str,
        direction: Direction | str,
        cadence: Cadence | str,
        rules: Iterable[ThresholdRule | Mapping[str, Any]] = (),
        description: str = "",
        owner_id: UUID | None = None,
        unit_id: UUID | None = None,
        target: float | None = None,
    ) -> Written:
        kpi = KPI.define(name=name, unit=unit, direction=direction, cadence=cadence, rules=rules,
                         description=description, owner_id=owner_id, unit_id=unit_id, target=target)
        return self.save_written(kpi)

    def get_kpi(self, kpi_id: UUID) -> KPI:
        """The KPI a path names; AggregateNotFoundError (404) if there is none."""
        kpi = self.repository.get(kpi_id)
        if not isinstance(kpi, KPI):
            raise AggregateNotFoundError(kpi_id)
        return kpi

    def _load(self, kpi_id: UUID, expected_version: int | None) -> KPI:
        kpi = self.get_kpi(kpi_id)
        self.check_version(kpi, expected_version)
        return kpi

    def _save(self, kpi: KPI) -> Written:
        """Save (even with nothing to append, so that an Idempotency-Key is still recorded); a
        command that appended nothing answers with the head of the log, which is past anything
        it could have to wait for.

        The saved KPI then replaces the cached one: the library fast-forwards its cached copy
        with the events alone, and this one also has its rules' walks worked out (a cached KPI
        that is older than the log is fast-forwarded on the next load as usual)."""
        written = self.save_written(kpi)
        if self.repository.cache is not None:
            self.repository.cache.put(kpi.id, kpi)
        return written if written.position else Written(kpi.id, kpi.version, self.position())

    @retry_on_conflict
    def record_measurement(
        self,
        kpi_id: UUID,
        *,
        value: float,
        measured_at: datetime,
        source: str,
        expected_version: int | None = None,
        now: datetime | None = None,
    ) -> Written:
        """Append `KPIMeasured` (or, for a repeat of the same time and source with another
        value, `KPIMeasurementCorrected`; for the same value nothing) and whatever breaches,
        recoveries or freshening it decides, in one save, so that no reader ever sees a
        measurement without the alert it raised."""
        kpi = self._load(kpi_id, expected_version)
        kpi.measure(value=value, measured_at=measured_at, source=source, now=now or datetime.now(UTC),
                    grace=self.staleness_grace)
        return self._save(kpi)

    @retry_on_conflict
    def record_measurements(
        self,
        kpi_id: UUID,
        measurements: Sequence[MeasurementIn | tuple[float, datetime, str]],
        *,
        expected_version: int | None = None,
        now: datetime | None = None,
    ) -> Written:
        """A bulk load: every measurement and what it decides in one save (one transaction)."""
        kpi = self._load(kpi_id, expected_version)
        kpi.record([m if isinstance(m, MeasurementIn) else MeasurementIn(*m) for m in measurements],
                   now=now or datetime.now(UTC), grace=self.staleness_grace)
        return self._save(kpi)

    @retry_on_conflict
    def correct_measurement(
        self, kpi_id: UUID, measurement_id: UUID, *, value: float, reason: str,
        expected_version: int | None = None,
    ) -> Written:
        """Append `KPIMeasurementCorrected` (the earlier value stays in the log) and the breach
        or recovery the corrected series implies."""
        kpi = self._load(kpi_id, expected_version)
        kpi.correct(measurement_id=measurement_id, value=value, reason=reason)
        return self._save(kpi)

    @retry_on_conflict
    def change_target(
        self, kpi_id: UUID, *, target: float, effective_from: date, reason: str,
        expected_version: int | None = None,
    ) -> Written:
        kpi = self._load(kpi_id, expected_version)
        kpi.change_target(target=target, effective_from=effective_from, reason=reason)
        return self._save(kpi)

    @retry_on_conflict
    def revise_rules(
        self, kpi_id: UUID, *, rules: Iterable[ThresholdRule | Mapping[str, Any]], reason: str,
        expected_version: int | None = None,
    ) -> Written:
        kpi = self._load(kpi_id, expected_version)
        kpi.revise_rules(rules=rules, reason=reason)
        return self._save(kpi)

    @retry_on_conflict
    def check_staleness(self, kpi_id: UUID, *, now: datetime, grace: timedelta | None = None) -> Written | None:
        """Append `KPIStale` if the KPI's next measurement was due before `now` and it is not
        already stale for this gap; None when nothing was appended. The aggregate decides, so a
        KPI checked twice (two instances, a restart, a read model that lags) is stale once."""
        kpi = self.get_kpi(kpi_id)
        if not kpi.check_staleness(now=now, grace=self.staleness_grace if grace is None else grace):
            return None
        return self._save(kpi)
