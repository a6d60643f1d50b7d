"""`make bench`: build a large organisation through the REST APIs of a real stack, then time
the whole-organisation alignment query against a hand-written SQL baseline; and rebuild every
read model from generated logs of 100k and 1M events, timed against a raw read of the same
stored events (`bench.rebuild`).

    python -m bench [--scale 0.05] [--concurrency 24] [--repetitions 20] [--warmup 2] [--keep]
                    [--only alignment|rebuild] [--rebuild-sizes 100000,1000000] [--profile]

The alignment benchmark's stack runs on a database of its own, created on DATABASE_URL's server when it is set, else
on the embedded PostgreSQL that `make run` uses (started, and stopped afterwards, if it was not
running); the database is dropped at the end unless `--keep`. The services run on free ports,
with their logs in `.data/logs-bench/`, so a `make run` beside it is not disturbed. The rebuild
benchmark needs no services: each size gets a database of its own on the same server (dropped
at the end unless `--keep`), and its figures are added to `bench/results/<date>.json`.
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
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from bench.alignment import Timing, gateway_statements, time_baseline, time_gateway
from bench.org import Builder, Org, Shape
from bench.rebuild import measure_size, write_results
from bench.rebuild import report as rebuild_report
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


async def bench(args: argparse.Namespace, stack: Stack, database_url: str, token: str) -> None:
    shape = Shape.at(args.scale)
    print(f"Building the organisation at scale {args.scale} through the REST APIs "
          f"({args.concurrency} requests at a time) ...", flush=True)
    builder = Builder(stack.url("goals"), stack.url("metrics"), token, concurrency=args.concurrency)
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


SECTIONS = ("alignment", "rebuild")
RESULTS_DIR = Path(__file__).parent / "results"


def run_alignment(args: argparse.Namespace, server_url: str) -> None:
    with bench_database(server_url, args.keep) as database_url:
        stack = Stack(database_url, gateway_port=free_port(), goals_port=free_port(),
                      metrics_port=free_port(), log_dir=DATA_DIR / "logs-bench",
                      extra_env={"TANDEM_TELEMETRY_EXPORTER": "none"})
        print("Starting goals, metrics and gateway (telemetry export off) ...", flush=True)
        stack.start()
        try:
            token = mint_token(secret=os.environ.get("TANDEM_JWT_SECRET") or dev_secret(),
                               role="admin", subject="bench")
            asyncio.run(bench(args, stack, database_url, token))
        finally:
            stack.stop()


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this benchmark (again for more); default: all of them")
    parser.add_argument("--scale", type=float, default=float(os.environ.get("TANDEM_BENCH_SCALE", "1")),
                        help="the organisation's size, 1 for the full one (TANDEM_BENCH_SCALE)")
    parser.add_argument("--concurrency", type=int, default=24, help="requests in flight while building")
    parser.add_argument("--repetitions", type=int, default=20, help="timed runs of each query")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each query first")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's database")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("TANDEM_PG_PORT", DEFAULT_PG_PORT)))
    parser.add_argument("--rebuild-sizes", type=_sizes, default=_sizes("100000,1000000"),
                        help="rebuild benchmark: events in each generated log (default 100000,1000000)")
    parser.add_argument("--rebuild-batch-size", type=int, default=1000, help="events per replay transaction")
    parser.add_argument("--raw-runs", type=int, default=3, help="timed raw reads of each log (the median counts)")
    parser.add_argument("--profile", action="store_true", help="cProfile the rebuilds of the smallest size")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the dated JSON results go")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.concurrency < 1 or args.repetitions < 1 or args.warmup < 0:
        parser.error("scale must be positive, concurrency and repetitions at least 1, warmup at least 0")

    if args.rebuild_batch_size < 1 or args.raw_runs < 1:
        parser.error("rebuild batch size and raw runs must be at least 1")
    sections = args.only or list(SECTIONS)

    pg_dir = DATA_DIR / "postgres"
    server_url, started_db = resolve_database(pg_dir, args.pg_port)
    try:
        if "alignment" in sections:
            run_alignment(args, server_url)
        if "rebuild" in sections:
            run_rebuild(args, server_url, argv)
    finally:
        if started_db:
            devdb.stop(pg_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
