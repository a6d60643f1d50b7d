"""Commands and queries of the metrics service over the `eventsourcing` application.

Commands are synchronous (the library's PostgreSQL persistence is psycopg 3); the API runs them
in a thread pool. Each returns what the client needs to read its own write: the KPI's id, its
new version (the ETag) and the log position of the last event stored. Every command is one save
of one KPI, so all it appends (a bulk load of 10,000 measurements included) is one transaction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder

from services.common.eventstore import SNAPSHOT_EVERY, TandemApplication, Written, retry_on_conflict
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
