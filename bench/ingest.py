"""KPI measurement ingest through the bulk endpoint, against a raw `COPY` of the same rows.

    python -m bench --only ingest [--ingest-kpis 8] [--ingest-requests 2] [--ingest-batch 10000]
                                  [--ingest-clients 4]

The metrics service runs in a subprocess (`bench.serve metrics`: the real app with its projection
runners, as in `bench.writes`). Each of `kpis` KPIs (daily, higher is better, two threshold rules)
gets `requests` POSTs to `/v1/kpis/{id}/measurements/bulk` of `batch` measurements each (10,000,
the endpoint's limit), later ones after earlier ones, with values that now and then breach a rule.
`clients` workers send them, each worker the KPIs of its own (w, w + clients, ...), so no two
requests in flight save the same KPI.

The baseline, first, in the same run and database: the same rows (kpi id, value, measured_at,
source), in the same batches, `COPY`ed by `clients` concurrent asyncpg connections into a plain
table, one COPY (one transaction) per batch. Both are rows per second of wall time. The metrics
read model follows the bulk writes as they commit (in the service process, as in production);
how far behind it was when the last request was answered is printed too.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import psycopg

from bench.load import create_logs, served
from services.common.auth import mint_token

RAW_TABLE = "bench.raw_measurements"
RAW_DDL = ("CREATE SCHEMA IF NOT EXISTS bench",
           f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (kpi_id uuid NOT NULL, value double precision NOT NULL, "
           "measured_at timestamptz NOT NULL, source text NOT NULL)")


@dataclass
class IngestResult:
    kpis: int
    requests: int
    batch: int
    clients: int
    rows: int
    rest_seconds: float
    raw_seconds: float
    events: int = 0
    lag_after: int = 0

    @property
    def rest_per_second(self) -> float:
        return self.rows / self.rest_seconds

    @property
    def raw_per_second(self) -> float:
        return self.rows / self.raw_seconds

    def rows_table(self) -> list[list[str]]:
        return [["rows", "requests (KPIs x each)", "clients", "bulk REST", "raw COPY", "ratio"],
                [f"{self.rows:,}", f"{self.kpis * self.requests} ({self.kpis} x {self.requests}) of {self.batch:,}",
                 str(self.clients), f"{self.rest_seconds:.2f} s ({self.rest_per_second:,.0f} rows/s)",
                 f"{self.raw_seconds:.2f} s ({self.raw_per_second:,.0f} rows/s)",
                 f"{self.rest_per_second / self.raw_per_second:.3f}x"]]

    def to_json(self) -> dict[str, Any]:
        return {"kpis": self.kpis, "requestsPerKpi": self.requests, "batch": self.batch, "clients": self.clients,
                "rows": self.rows, "events": self.events, "restSeconds": self.rest_seconds,
                "rawSeconds": self.raw_seconds, "restRowsPerSecond": self.rest_per_second,
                "rawRowsPerSecond": self.raw_per_second, "ratio": self.rest_per_second / self.raw_per_second,
                "readModelLagAfter": self.lag_after}


def batches(kpis: list[UUID], requests: int, batch: int, seed: int = 10) -> dict[UUID, list[list[tuple[float, datetime]]]]:
    """Each KPI's batches of (value, measured_at): a minute apart, ending a minute ago, mostly
    healthy (85-100) with a spell under the rules' thresholds now and then."""
    rng = random.Random(seed)
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    total = requests * batch
    out: dict[UUID, list[list[tuple[float, datetime]]]] = {}
    for kpi in kpis:
        rows, trouble = [], 0
        for i in range(total):
            if trouble:
                trouble -= 1
                value = rng.uniform(62, 82)
            else:
                value = rng.uniform(85, 100)
                if rng.random() < 0.002:
                    trouble = rng.randint(3, 20)
            rows.append((round(value, 1), end - timedelta(minutes=total - i)))
        out[kpi] = [rows[r * batch:(r + 1) * batch] for r in range(requests)]
    return out


async def _in_turn(clients: int, kpis: list[UUID], send: Any) -> float:
    """Seconds for `clients` workers to send every batch, worker w the KPIs w, w + clients, ...
    each KPI's batches in order."""
    started = time.perf_counter()

    async def worker(w: int) -> None:
        for kpi in kpis[w::clients]:
            await send(kpi)

    await asyncio.gather(*(worker(w) for w in range(min(clients, len(kpis)))))
    return time.perf_counter() - started


async def _run(database_url: str, url: str, secret: str, kpi_count: int, requests: int, batch: int,
               clients: int, out: Any) -> IngestResult:
    token = mint_token(secret=secret, role="admin", subject="bench")
    headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": "bench-ingest"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        kpis = []
        for i in range(kpi_count):
            r = await client.post("/v1/kpis", json={
                "name": f"Bench KPI {i:03}", "unit": "%", "direction": "higher_is_better", "cadence": "daily",
                "target": 95, "rules": [{"kind": "below", "threshold": 80, "severity": "warning", "recovery": 85},
                                        {"kind": "below", "threshold": 70, "severity": "critical"}]})
            r.raise_for_status()
            kpis.append(UUID(r.json()["id"]))
        data = batches(kpis, requests, batch)
        rows = kpi_count * requests * batch
        print(f"  {kpi_count} KPIs, {requests} batches of {batch:,} each: {rows:,} rows, {clients} at a time",
              file=out, flush=True)

        pool = await asyncpg.create_pool(database_url, min_size=clients, max_size=clients)
        try:
            async def copy(kpi: UUID) -> None:
                for chunk in data[kpi]:
                    await pool.copy_records_to_table(
                        "raw_measurements", schema_name="bench", columns=["kpi_id", "value", "measured_at", "source"],
                        records=[(kpi, value, at, "bench") for value, at in chunk])

            raw_seconds = await _in_turn(clients, kpis, copy)
        finally:
            await pool.close()
        print(f"  raw COPY   {raw_seconds:7.2f} s  {rows / raw_seconds:9,.0f} rows/s", file=out, flush=True)

        position = 0

        async def post(kpi: UUID) -> None:
            nonlocal position
            for chunk in data[kpi]:
                r = await client.post(f"/v1/kpis/{kpi}/measurements/bulk", json={"measurements": [
                    {"value": value, "measuredAt": at.isoformat(), "source": "bench"} for value, at in chunk]})
                if r.status_code != 201:
                    raise RuntimeError(f"bulk POST answered {r.status_code}: {r.text[:500]}")
                position = max(position, r.json()["position"])

        rest_seconds = await _in_turn(clients, kpis, post)
    result = IngestResult(kpi_count, requests, batch, clients, rows, rest_seconds, raw_seconds)
    from services.metrics.projections import METRICS_PROJECTIONS

    spec = METRICS_PROJECTIONS[0]
    with psycopg.connect(database_url) as conn:
        tracked = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {spec.tracking_table} "
                               "WHERE application_name = %s", (spec.application_class.name,)).fetchone()[0]
        result.events = int(conn.execute("SELECT count(*) FROM metrics.metrics_events").fetchone()[0])
        copied = int(conn.execute(f"SELECT count(*) FROM {RAW_TABLE}").fetchone()[0])
    assert copied == rows, (copied, rows)
    result.lag_after = max(position - int(tracked), 0)
    print(f"  bulk REST  {rest_seconds:7.2f} s  {result.rest_per_second:9,.0f} rows/s  ratio "
          f"{result.rest_per_second / result.raw_per_second:.3f}x  ({result.events:,} events in the log; the "
          f"metrics read model was {result.lag_after:,} events behind when the last answer came)", file=out, flush=True)
    return result


def measure_ingest(database_url: str, kpis: int, requests: int, batch: int, clients: int, *,
                   telemetry: str = "none", out: Any = None) -> IngestResult:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in RAW_DDL:
            conn.execute(statement)
    create_logs(database_url)
    print(f"Starting metrics (telemetry export {telemetry}) ...", file=out, flush=True)
    with served("metrics", database_url, telemetry=telemetry) as server:
        return asyncio.run(_run(database_url, server.url, server.secret, kpis, requests, batch, clients, out))
