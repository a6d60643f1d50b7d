"""Projection catch-up: the live runners of a running stack following logs that were written
with projections off, against a raw sequential read of the same stored events.

    python -m bench --only catchup [--catchup-sizes 100000]

For each size, a database of its own gets generated goals and metrics logs
(`bench.rebuild.generate`: COPYed, chained; no read model exists yet). The KPI policy (the
write-side process that turns measurements into check-ins, not a read model) is marked as having
handled the whole metrics log, as it had when those check-ins were generated, so that it appends
nothing. Then, in this order:

- raw read: each log read in notification order through a server-side cursor, every column,
  nothing decoded (`bench.rebuild.raw_read`; the median of `raw_runs` after a warm-up);
- catch-up: goals, metrics and the gateway started as `make run` starts them (`services.stack`:
  each a process with its projection runners as threads, `BatchingRunner`s taking their
  projection's lock), their readiness not held back by the lag; each read model is timed from the
  start of the processes until its tracking position has reached the head of every log it
  follows (polled every 0.2 s). The read models catch up at once, three processes on the same
  machine, so each one's time is what it took beside the others; "all read models" is every
  event they processed over the time until the last one was done.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.load import LOG_DIR, free_port, peak_rss_mb
from bench.rebuild import LOGS, generate, raw_read


@dataclass
class CaughtUp:
    label: str
    logs: list[str]
    events: int
    seconds: float
    raw_seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class CatchupResult:
    requested: int
    events: dict[str, int]
    generate_seconds: float
    raw: dict[str, float]
    start_seconds: float
    read_models: list[CaughtUp] = field(default_factory=list)
    peak_rss_mb: dict[str, float | None] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.events.values())

    def all_row(self) -> tuple[int, float, float]:
        events = sum(r.events for r in self.read_models)
        return events, max(r.seconds for r in self.read_models), sum(r.raw_seconds for r in self.read_models)

    def rows_table(self) -> list[list[str]]:
        out = [["size", "read model", "events", "raw read", "catch-up", "catch-up/raw"]]
        for r in self.read_models:
            out.append([f"{self.total:,}", r.label, f"{r.events:,}",
                        f"{r.raw_seconds:.2f} s ({r.events / r.raw_seconds:,.0f}/s)",
                        f"{r.seconds:.2f} s ({r.events_per_second:,.0f}/s)", f"{r.seconds / r.raw_seconds:,.0f}x"])
        events, seconds, raw = self.all_row()
        out.append([f"{self.total:,}", "all read models", f"{events:,}", f"{raw:.2f} s ({events / raw:,.0f}/s)",
                    f"{seconds:.2f} s ({events / seconds:,.0f}/s)", f"{seconds / raw:,.0f}x"])
        return out

    def to_json(self) -> dict[str, Any]:
        events, seconds, raw = self.all_row()
        return {"requested": self.requested, "events": self.events, "generateSeconds": self.generate_seconds,
                "rawReadSeconds": self.raw, "startSeconds": self.start_seconds, "peakRssMb": self.peak_rss_mb,
                "readModels": [{"label": r.label, "logs": r.logs, "events": r.events, "seconds": r.seconds,
                                "eventsPerSecond": r.events_per_second, "rawReadSeconds": r.raw_seconds,
                                "catchUpOverRaw": r.seconds / r.raw_seconds} for r in self.read_models],
                "all": {"events": events, "seconds": seconds, "eventsPerSecond": events / seconds,
                        "rawReadSeconds": raw, "catchUpOverRaw": seconds / raw}}


def mark_policy_done(database_url: str) -> None:
    """The KPI policy's tracking row at the metrics log's head."""
    from services.goals.projections import POLICY_SPEC

    POLICY_SPEC.create_tables(database_url)
    with psycopg.connect(database_url) as conn:
        head = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {POLICY_SPEC.events_table}").fetchone()[0]
        conn.execute(f"INSERT INTO {POLICY_SPEC.tracking_table} (application_name, notification_id) VALUES (%s, %s)",
                     (POLICY_SPEC.application_class.name, head))


def measure_catchup(database_url: str, requested: int, *, raw_runs: int = 3, timeout: float = 7200,
                    out: Any = None) -> CatchupResult:
    from services.audit import read_model_sources
    from services.stack import Stack

    print(f"Generating about {requested:,} events (projections off) ...", file=out, flush=True)
    generated = generate(database_url, requested, out=out)
    mark_policy_done(database_url)
    for _, schema, table in LOGS:
        raw_read(database_url, schema, table)  # warm-up
    raw = {schema: statistics.median(raw_read(database_url, schema, table)[1] for _ in range(raw_runs))
           for _, schema, table in LOGS}
    print(f"  {generated.total:,} events; raw read: " + ", ".join(
        f"{log} {raw[log]:.2f} s ({generated.events[log] / raw[log]:,.0f}/s)" for log in raw), file=out, flush=True)

    sources = read_model_sources()
    heads = dict(generated.events)
    # (read model, its spec) -> done when the spec's tracking table reaches its log's head.
    pending = {(source.label, spec.tracking_table, spec.application_class.name, spec.application_schema)
               for source in sources for spec in source.specs}
    done_at: dict[str, float] = {}
    stack = Stack(database_url, gateway_port=free_port(), goals_port=free_port(), metrics_port=free_port(),
                  log_dir=LOG_DIR, extra_env={"TANDEM_TELEMETRY_EXPORTER": "none",
                                              "TANDEM_READY_MAX_LAG_EVENTS": str(10**12)})
    print("  starting goals, metrics and the gateway with their projection runners ...", file=out, flush=True)
    started = time.perf_counter()
    try:
        stack.start()
        start_seconds = time.perf_counter() - started
        last_print = time.perf_counter()
        with psycopg.connect(database_url, autocommit=True) as conn:
            while pending:
                for item in sorted(pending):
                    label, tracking, app_name, log = item
                    exists = conn.execute("SELECT to_regclass(%s)", (tracking,)).fetchone()[0]
                    position = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {tracking} "
                                            "WHERE application_name = %s", (app_name,)).fetchone()[0] if exists else 0
                    if position >= heads[log]:
                        pending.discard(item)
                        if not any(p[0] == label for p in pending):
                            done_at[label] = time.perf_counter() - started
                            print(f"  {label} caught up after {done_at[label]:.1f} s", file=out, flush=True)
                elapsed = time.perf_counter() - started
                if elapsed > timeout:
                    raise RuntimeError(f"not caught up after {timeout:.0f} s: {sorted(pending)}")
                if pending and time.perf_counter() - last_print > 30:
                    print(f"  ... {elapsed:.0f} s, waiting for {sorted({p[0] for p in pending})}", file=out, flush=True)
                    last_print = time.perf_counter()
                time.sleep(0.2)
        rss = {s.name: peak_rss_mb(s.process.pid) for s in stack.services if s.process is not None}
    finally:
        stack.stop()
    result = CatchupResult(requested, dict(generated.events), generated.seconds, raw, start_seconds, peak_rss_mb=rss)
    for source in sources:
        logs = [spec.application_schema for spec in source.specs]
        result.read_models.append(CaughtUp(source.label, logs, sum(heads[log] for log in logs), done_at[source.label],
                                           sum(raw[log] for log in logs)))
    return result
