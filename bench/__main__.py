"""`make bench`: every figure beside a raw baseline measured in the same run, with the ratio.
Benchmarks, never tests: nothing here asserts a bound.

- writes: check-ins over REST at 1, 8 and 32 concurrent clients against a bare endpoint of the
  same server stack doing one raw asyncpg INSERT, with the group commit's batch sizes and a PNG of
  the curve (`bench.writes`);
- ingest: KPI measurements through the bulk endpoint against a raw COPY of the same rows
  (`bench.ingest`);
- catchup: the live projection runners of a started stack following generated logs, against a
  raw sequential read of the same events (`bench.catchup`);
- alignment: a large organisation built through the REST APIs of a real stack, then the
  whole-organisation alignment query against a hand-written SQL baseline, and each service's
  peak RSS (`bench.alignment`, `bench.org`);
- rebuild: every read model rebuilt from generated logs of 100k and 1M events, against a raw read
  of the same stored events (`bench.rebuild`).

    python -m bench [--only writes|ingest|catchup|alignment|rebuild ...] [--quick] [--keep]
                    [--write-clients 1,8,32] [--write-seconds 10] [--write-warmup 2]
                    [--ingest-kpis 8] [--ingest-requests 2] [--ingest-batch 10000] [--ingest-clients 4]
                    [--catchup-sizes 100000] [--scale 1] [--concurrency 24] [--repetitions 20]
                    [--warmup 2] [--rebuild-sizes 100000,1000000] [--profile]

`--quick` is a small run of whatever is chosen (options given explicitly still win). Every
benchmark works in databases of its own, created on DATABASE_URL's server when it is set, else
on the embedded PostgreSQL that `make run` uses (started, and stopped afterwards, if it was not
running), dropped at the end unless `--keep`. Services run on free ports, with their logs in
`.data/logs-bench/`, so a `make run` beside it is not disturbed. Each benchmark's figures are added
to `bench/results/<date>.json` (one file a day, runs appended, with the command, the machine and
its load averages before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from bench.alignment import Timing, gateway_statements, time_baseline, time_gateway
from bench.load import peak_rss_mb
from bench.org import Builder, Org, Shape
from bench.rebuild import format_table, measure_size, write_results
from bench.rebuild import report as rebuild_report
from bench.results import append_run, results_path
from services.common import devdb
from services.common.auth import dev_secret, mint_token
from services.common.settings import DATA_DIR
from services.stack import DEFAULT_PG_PORT, Stack, resolve_database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def bench_database(server_url: str, keep: bool) -> Iterator[str]:
    """A new database on the server, dropped afterwards unless kept."""
    name = f"tandem_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    finally:
        if keep:
            print(f"Kept the database {name}.")
        else:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def wait_for_gateway(gateway_url: str, token: str, org: Org) -> float:
    """Ask the gateway to read at the last write's positions; it answers 504 while its read
    model is behind, and each 504 is a wait of the read timeout, not a busy loop."""
    wait_for = ", ".join(f"{log}={position}" for log, position in org.positions.items() if position)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=gateway_url, timeout=120) as client:
        while True:
            r = await client.post("/graphql", json={"query": "{ __typename }"},
                                  headers={"Authorization": f"Bearer {token}", "Tandem-Wait-For": wait_for})
            if r.status_code == 200:
                return time.perf_counter() - started
            if r.status_code != 504:
                raise RuntimeError(f"the gateway answered {r.status_code}: {r.text[:500]}")
            print(f"  gateway read model still catching up to {wait_for} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


def report(shape: Shape, org: Org, catch_up: float, gateway: Timing, baseline: Timing) -> None:
    writes_per_second = org.writes / org.seconds if org.seconds else 0.0
    events = sum(org.positions.values())  # a fresh database: the logs' last positions are their lengths
    print(f"""
Organisation  departments {len(org.departments)}, teams {len(org.teams)}, people {shape.people:,}, objectives \
{shape.objectives:,}, key results {shape.key_results:,},
              check-ins {shape.check_ins:,}, KPIs {shape.kpis:,}, measurements {org.measurements:,}
Writes        {org.writes:,} requests in {org.seconds:.1f} s ({writes_per_second:,.0f}/s): {events:,} events \
({events / org.seconds if org.seconds else 0.0:,.0f}/s)
Catch-up      the gateway's read model reached the last write {catch_up:.1f} s after it
""")
    rows = [("", "gateway (HTTP)", "SQL baseline"),
            ("median", f"{gateway.median * 1000:,.1f} ms", f"{baseline.median * 1000:,.1f} ms"),
            ("p95", f"{gateway.p95 * 1000:,.1f} ms", f"{baseline.p95 * 1000:,.1f} ms"),
            ("runs", str(len(gateway.samples)), str(len(baseline.samples))),
            ("SQL statements", str(gateway.statements), str(baseline.statements)),
            ("units / objectives / KRs", f"{gateway.units} / {gateway.objectives:,} / {gateway.key_results:,}",
             f"{baseline.units} / {baseline.objectives:,} / {baseline.key_results:,}"),
            ("answer size", f"{gateway.nbytes / 1e6:,.2f} MB", f"{baseline.nbytes / 1e6:,.2f} MB")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"gateway / baseline (median): {gateway.median / baseline.median:,.1f}x")
    print("SQL statements: what the gateway's resolvers send for one query (counted in process); the "
          "baseline is one statement and computes no scores.")


async def bench(args: argparse.Namespace, stack: Stack, database_url: str, token: str) -> dict[str, Any]:
    shape = Shape.at(args.scale)
    print(f"Building the organisation at scale {args.scale} through the REST APIs "
          f"({args.concurrency} requests at a time) ...", flush=True)
    # The org units go in over SCIM /Bulk, the HR system's channel (bench.org).
    scim_token = mint_token(secret=os.environ.get("TANDEM_JWT_SECRET") or dev_secret(), role="hr_sync",
                            subject="bench-hr")
    builder = Builder(stack.url("goals"), stack.url("metrics"), token, concurrency=args.concurrency,
                      scim_token=scim_token)
    try:
        org = await builder.build(shape)
    finally:
        await builder.close()
    print(f"Waiting for the gateway's read model ({org.positions}) ...", flush=True)
    catch_up = await wait_for_gateway(stack.url("gateway"), token, org)
    assert org.company is not None and org.cycle is not None
    print("Counting the gateway's SQL statements for one alignment query ...", flush=True)
    statements = await gateway_statements(database_url, org.cycle)
    print(f"Timing the alignment query: {args.warmup} warm-up runs, then {args.repetitions} ...", flush=True)
    gateway = await time_gateway(stack.url("gateway"), token, org.cycle, statements, args.warmup, args.repetitions)
    baseline = await time_baseline(database_url, org.company, org.cycle, args.warmup, args.repetitions)
    report(shape, org, catch_up, gateway, baseline)
    return {"scale": args.scale, "shape": asdict(shape), "writes": org.writes, "measurements": org.measurements,
            "buildSeconds": org.seconds, "events": dict(org.positions), "gatewayCatchUpSeconds": catch_up,
            "gateway": _timing(gateway), "baseline": _timing(baseline),
            "ratio": gateway.median / baseline.median}


def _timing(t: Timing) -> dict[str, Any]:
    return {"medianMs": t.median * 1000, "p95Ms": t.p95 * 1000, "runs": len(t.samples), "statements": t.statements,
            "units": t.units, "objectives": t.objectives, "keyResults": t.key_results, "bytes": t.nbytes}


SECTIONS = ("writes", "ingest", "catchup", "alignment", "rebuild")
RESULTS_DIR = Path(__file__).parent / "results"
QUICK = {"write_seconds": 2.0, "write_warmup": 0.5, "ingest_kpis": 2, "ingest_requests": 1, "ingest_batch": 2000,
         "ingest_clients": 2, "catchup_sizes": [5000], "scale": 0.02, "repetitions": 5, "warmup": 1,
         "rebuild_sizes": [5000, 20000]}
FULL = {"write_seconds": 10.0, "write_warmup": 2.0, "ingest_kpis": 8, "ingest_requests": 2, "ingest_batch": 10_000,
        "ingest_clients": 4, "catchup_sizes": [100_000],
        "scale": float(os.environ.get("TANDEM_BENCH_SCALE", "1")), "repetitions": 20, "warmup": 2,
        "rebuild_sizes": [100_000, 1_000_000]}


class Recorder:
    """Each benchmark's figures into today's results file, with the command and the load
    averages around it; the Markdown tables printed again at the end, for bench/README.md."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.directory = Path(args.results_dir)
        self.command = ("python -m bench " + shlex.join(argv)).strip()
        self.tables: list[tuple[str, str]] = []

    @contextmanager
    def run(self, key: str) -> Iterator[dict[str, Any]]:
        figures: dict[str, Any] = {}
        before = list(os.getloadavg())
        yield figures
        load = {"before": before, "after": list(os.getloadavg())}
        print(f"  load average (1 min) before {before[0]:.1f}, after {load['after'][0]:.1f} "
              f"({len(os.sched_getaffinity(0))} CPUs)", flush=True)
        if figures:
            tables = figures.pop("_tables", [])
            path = append_run(self.directory, key, self.command, figures, load)
            print(f"Results added to {path}.", flush=True)
            for title, rows in tables:
                self.tables.append((f"{title} (load average {before[0]:.1f} before, {load['after'][0]:.1f} after)",
                                    format_table(rows, markdown=True)))

    def print_tables(self) -> None:
        if self.tables:
            print(f"\nMarkdown, for bench/README.md ({self.command}):")
        for title, table in self.tables:
            print(f"\n{title}:\n\n{table}")


def run_writes(args: argparse.Namespace, server_url: str, recorder: Recorder) -> None:
    from bench.plot import write_throughput_plot
    from bench.writes import measure_writes

    with recorder.run("writes") as figures, bench_database(server_url, args.keep) as database_url:
        result = measure_writes(database_url, args.write_clients, args.write_seconds, args.write_warmup,
                                telemetry=args.telemetry, out=sys.stdout)
        rows = result.rows_table()
        print("\nCheck-in writes over REST vs a raw asyncpg INSERT in the same server stack "
              f"({args.write_seconds:g} s a run after {args.write_warmup:g} s of warm-up):\n", flush=True)
        print(format_table(rows))
        plot = results_path(Path(args.results_dir)).with_name(
            "throughput-" + results_path(Path(args.results_dir)).stem + ".png")
        write_throughput_plot(plot, [r.clients for r in result.rest], [r.per_second for r in result.rest],
                              [r.per_second for r in result.raw],
                              rest_apart=[r.per_second for r in result.apart.rest] if result.apart else None)
        print(f"Plot written to {plot}.")
        if args.profile:
            from bench.writes import profile_check_ins

            print(profile_check_ins(database_url, max(args.write_clients), args.write_seconds, out=sys.stdout))
        figures.update({"seconds": args.write_seconds, "warmup": args.write_warmup, "telemetry": args.telemetry,
                        **result.to_json(), "plot": plot.name, "table": format_table(rows, markdown=True),
                        "_tables": [("Check-in writes", rows)]})


def run_ingest(args: argparse.Namespace, server_url: str, recorder: Recorder) -> None:
    from bench.ingest import measure_ingest

    with recorder.run("ingest") as figures, bench_database(server_url, args.keep) as database_url:
        result = measure_ingest(database_url, args.ingest_kpis, args.ingest_requests, args.ingest_batch,
                                args.ingest_clients, telemetry=args.telemetry, out=sys.stdout)
        rows = result.rows_table()
        print("\nKPI measurements through the bulk endpoint vs a raw COPY of the same rows:\n")
        print(format_table(rows), flush=True)
        figures.update({"telemetry": args.telemetry, **result.to_json(), "table": format_table(rows, markdown=True),
                        "_tables": [("KPI measurement ingest", rows)]})


def run_catchup(args: argparse.Namespace, server_url: str, recorder: Recorder) -> None:
    from bench.catchup import measure_catchup

    for size in args.catchup_sizes:
        with recorder.run("catchup") as figures, bench_database(server_url, args.keep) as database_url:
            result = measure_catchup(database_url, size, raw_runs=args.raw_runs, out=sys.stdout)
            rows = result.rows_table()
            print(f"\nProjection catch-up of a stack started on logs written with projections off (the services "
                  f"took {result.start_seconds:.1f} s to be ready, included), vs a raw read of the same events:\n")
            print(format_table(rows), flush=True)
            figures.update({**result.to_json(), "table": format_table(rows, markdown=True),
                            "_tables": [(f"Projection catch-up, {result.total:,} events", rows)]})


def run_alignment(args: argparse.Namespace, server_url: str, recorder: Recorder) -> None:
    with recorder.run("alignment") as figures, bench_database(server_url, args.keep) as database_url:
        stack = Stack(database_url, gateway_port=free_port(), goals_port=free_port(),
                      metrics_port=free_port(), log_dir=DATA_DIR / "logs-bench",
                      extra_env={"TANDEM_TELEMETRY_EXPORTER": "none"})
        print("Starting goals, metrics and gateway (telemetry export off) ...", flush=True)
        stack.start()
        try:
            token = mint_token(secret=os.environ.get("TANDEM_JWT_SECRET") or dev_secret(),
                               role="admin", subject="bench")
            figures.update(asyncio.run(bench(args, stack, database_url, token)))
            # After the load and the queries: each service's peak resident set (VmHWM).
            rss = {s.name: peak_rss_mb(s.process.pid) for s in stack.services if s.process is not None}
        finally:
            stack.stop()
        print("Peak RSS (VmHWM) after loading and querying: "
              + ", ".join(f"{name} {mb:,.0f} MB" for name, mb in rss.items() if mb is not None), flush=True)
        g, b = figures["gateway"], figures["baseline"]
        rows = [["", "gateway (HTTP)", "SQL baseline", "ratio"],
                ["median", f"{g['medianMs']:,.1f} ms", f"{b['medianMs']:,.1f} ms", f"{figures['ratio']:,.1f}x"],
                ["p95", f"{g['p95Ms']:,.1f} ms", f"{b['p95Ms']:,.1f} ms", ""],
                ["SQL statements", str(g["statements"]), str(b["statements"]), ""],
                ["units / objectives / KRs", f"{g['units']} / {g['objectives']:,} / {g['keyResults']:,}",
                 f"{b['units']} / {b['objectives']:,} / {b['keyResults']:,}", ""]]
        rss_rows = [["service", "peak RSS (VmHWM)"], *([name, f"{mb:,.0f} MB" if mb is not None else "gone"]
                                                        for name, mb in rss.items())]
        figures.update({"peakRssMb": rss, "table": format_table(rows, markdown=True),
                        "_tables": [("Alignment query", rows), ("Peak RSS after loading the organisation", rss_rows)]})


def run_rebuild(args: argparse.Namespace, server_url: str, argv: list[str]) -> None:
    results = []
    for n, size in enumerate(args.rebuild_sizes):
        with bench_database(server_url, args.keep) as database_url:
            result = measure_size(database_url, size, raw_runs=args.raw_runs, batch_size=args.rebuild_batch_size,
                                  profile=args.profile and n == 0, out=sys.stdout)
        results.append(result)
        if result.profile:
            print(f"\ncProfile of the rebuilds at {result.events:,} events:\n{result.profile}", flush=True)
    rebuild_report(results)
    command = "python -m bench " + shlex.join(argv)
    path = write_results(results, command.strip(), Path(args.results_dir))
    print(f"Results added to {path}.")


def _sizes(text: str) -> list[int]:
    sizes = [int(float(s)) for s in text.replace("_", "").split(",") if s.strip()]
    if not sizes or min(sizes) < 100:
        raise argparse.ArgumentTypeError("sizes are event counts of at least 100, separated by commas")
    return sorted(sizes)


def _counts(text: str) -> list[int]:
    counts = [int(s) for s in text.split(",") if s.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("numbers of clients, at least 1, separated by commas")
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this benchmark (again for more); default: all of them")
    parser.add_argument("--quick", action="store_true", help="a small run (options given explicitly still win)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmarks' databases")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("TANDEM_PG_PORT", DEFAULT_PG_PORT)))
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the dated JSON results go")
    parser.add_argument("--telemetry", choices=("none", "console"), default="none",
                        help="writes, ingest: the services' span exporter (instrumented either way)")
    parser.add_argument("--write-clients", type=_counts, default=_counts("1,8,32"),
                        help="writes: the concurrencies (default 1,8,32)")
    parser.add_argument("--write-seconds", type=float, help="writes: timed seconds of each run (10; quick 2)")
    parser.add_argument("--write-warmup", type=float, help="writes: untimed seconds before each run (2; quick 0.5)")
    parser.add_argument("--ingest-kpis", type=int, help="ingest: KPIs (8; quick 2)")
    parser.add_argument("--ingest-requests", type=int, help="ingest: bulk requests per KPI (2; quick 1)")
    parser.add_argument("--ingest-batch", type=int, help="ingest: measurements per request (10000; quick 2000)")
    parser.add_argument("--ingest-clients", type=int, help="ingest: requests in flight (4; quick 2)")
    parser.add_argument("--catchup-sizes", type=_sizes, help="catchup: events in each generated log (100000; quick 5000)")
    parser.add_argument("--scale", type=float, help="alignment: the organisation's size, 1 for the full one "
                                                    "(TANDEM_BENCH_SCALE; quick 0.02)")
    parser.add_argument("--concurrency", type=int, default=24, help="alignment: requests in flight while building")
    parser.add_argument("--repetitions", type=int, help="alignment: timed runs of each query (20; quick 5)")
    parser.add_argument("--warmup", type=int, help="alignment: untimed runs of each query first (2; quick 1)")
    parser.add_argument("--rebuild-sizes", type=_sizes,
                        help="rebuild: events in each generated log (100000,1000000; quick 5000,20000)")
    parser.add_argument("--rebuild-batch-size", type=int, default=1000, help="rebuild: events per replay transaction")
    parser.add_argument("--raw-runs", type=int, default=3,
                        help="rebuild, catchup: timed raw reads of each log (the median counts)")
    parser.add_argument("--profile", action="store_true", help="rebuild: cProfile the rebuilds of the smallest size; writes: one more check-in "
                             "run (the most clients) with the goals service under cProfile, untimed")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scale <= 0 or args.concurrency < 1 or args.repetitions < 1 or args.warmup < 0:
        parser.error("scale must be positive, concurrency and repetitions at least 1, warmup at least 0")
    if args.rebuild_batch_size < 1 or args.raw_runs < 1:
        parser.error("rebuild batch size and raw runs must be at least 1")
    if args.write_seconds <= 0 or args.write_warmup < 0:
        parser.error("write seconds must be positive, write warm-up at least 0")
    if min(args.ingest_kpis, args.ingest_requests, args.ingest_clients) < 1 or not 1 <= args.ingest_batch <= 10_000:
        parser.error("ingest KPIs, requests and clients at least 1; the batch 1 to 10,000 (the endpoint's limit)")
    sections = args.only or list(SECTIONS)

    recorder = Recorder(args, argv)
    pg_dir = DATA_DIR / "postgres"
    server_url, started_db = resolve_database(pg_dir, args.pg_port)
    try:
        for section in SECTIONS:
            if section not in sections:
                continue
            print(f"\n=== {section} ===", flush=True)
            if section == "rebuild":
                run_rebuild(args, server_url, argv)
            else:
                {"writes": run_writes, "ingest": run_ingest, "catchup": run_catchup,
                 "alignment": run_alignment}[section](args, server_url, recorder)
    finally:
        recorder.print_tables()
        if started_db:
            devdb.stop(pg_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
