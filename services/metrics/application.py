"""Commands and queries of the metrics service over the `eventsourcing` application.

Commands are synchronous (the library's PostgreSQL persistence is psycopg 3); the API runs them
in a thread pool. Each returns what the client needs to read its own write: the KPI's id, its
new version (the ETag) and the log position of the last event stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from services.common.eventstore import TandemApplication, Written, retry_on_conflict
from services.metrics.domain import KPI, Cadence, Direction, ThresholdRule


class Metrics(TandemApplication):
    """The metrics service's write side. Its log is the table `metrics.metrics_events`."""

    name = "Metrics"

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

    @retry_on_conflict
    def record_measurement(
        self,
        kpi_id: UUID,
        *,
        value: float,
        measured_at: datetime,
        source: str,
        expected_version: int | None = None,
    ) -> Written:
        """Append `KPIMeasured` and whatever breaches or recoveries it decides, in one save, so
        that no reader ever sees a measurement without the alert it raised."""
        kpi = self.get_kpi(kpi_id)
        self.check_version(kpi, expected_version)
        kpi.measure(value=value, measured_at=measured_at, source=source)
        return self.save_written(kpi)
