"""Check-in writes over REST at 1, 8 and 32 concurrent clients, against a bare endpoint in the
same server stack doing one raw asyncpg INSERT.

    python -m bench --only writes [--write-clients 1,8,32] [--write-seconds 10]

The goals service runs in a subprocess (`bench.serve goals`): its real app, lifespan (the
projection runners as threads beside the API, as `make run` runs them), authentication, problem
handlers and telemetry (instrumented; export off, as in the alignment benchmark), served by
uvicorn as in production, plus the benchmark's baseline route, which takes the same body and
token and does one `INSERT` through the app's asyncpg pool.

The load comes from this process: httpx, N workers in one event loop, each sending its next
request when the last one is answered, for a fixed time after a warm-up. Each worker checks in
on key results of its own (worker w of N takes, in turn, the key results whose number is w
modulo N out of `KEY_RESULTS`): no two requests in flight touch the same aggregate, so what is
measured is throughput, not contention on one key result (the fault tests do that one). At each
concurrency the baseline runs first, then the check-ins; before each run the goals read model is
let catch up, so a run does not pay for the one before it (a check-in run does pay for its own
projection, which runs beside it, as in production).

Also reported: the log writer's batches and saves during each check-in run (the average batch
size of the group commit), read from the app, and the CPU time the server process and this
client process spent per request.

Two configurations, one after the other in the same run, each in a database of its own:
`in process` (the headline: the goals projection runners as threads of the API's process, as
`make run` runs them) and `apart` (the API with `TANDEM_RUN_PROJECTIONS=false` and the runners
in a process of their own, `python -m services.goals.main --projections-only`, as `deploy/` runs
them). In the second the raw baseline is measured again, against that API process, and the
runners' process's CPU per check-in is reported beside the API's: it still runs on the same
machine, so nothing it costs is hidden, only no longer in the API's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import httpx
import psycopg

from bench.load import LoadResult, closed_loop, cpu_seconds, create_logs, served
from bench.org import Builder, Shape
from bench.serve import RAW_TABLE, RAW_TABLE_DDL
from services.common.auth import mint_token

KEY_RESULTS = 128


IN_PROCESS = "in process"
"""The headline configuration: the goals projection runners as threads of the API's process, as
`make run` runs them."""
APART = "apart"
"""The second: the runners in a process of their own (`--projections-only`), the API process
with `TANDEM_RUN_PROJECTIONS=false`, as `deploy/` runs them."""


@dataclass
class WritesResult:
    clients: list[int]
    key_results: int
    configuration: str = IN_PROCESS
    raw: list[LoadResult] = field(default_factory=list)
    rest: list[LoadResult] = field(default_factory=list)
    group_commit: list[dict[str, float]] = field(default_factory=list)
    catch_up_seconds: list[float] = field(default_factory=list)
    runner_cpu: list[float] = field(default_factory=list)
    """CPU seconds of the runners' own process during each check-in run (runners apart only)."""
    events: int = 0
    rows: int = 0
    apart: WritesResult | None = None
    """The same runs with the projection runners in a process of their own (`APART`)."""

    def rows_table(self) -> list[list[str]]:
        out = [["projections", "clients", "REST check-ins/s", "p50 / p95", "raw INSERT/s", "p50 / p95", "ratio",
                "saves per commit", "API process CPU per request (REST / raw)", "runners' process CPU per check-in"]]
        for result in (self, self.apart):
            if result is None:
                continue
            runner_cpu = result.runner_cpu or [None] * len(result.rest)
            for raw, rest, gc, runners in zip(result.raw, result.rest, result.group_commit, runner_cpu, strict=True):
                out.append([result.configuration, str(rest.clients), f"{rest.per_second:,.0f}",
                            f"{rest.p50_ms:.1f} / {rest.p95_ms:.1f} ms",
                            f"{raw.per_second:,.0f}", f"{raw.p50_ms:.1f} / {raw.p95_ms:.1f} ms",
                            f"{rest.per_second / raw.per_second:.2f}x" if raw.per_second else "",
                            f"{gc['averageBatch']:.1f} ({gc['saves']:,.0f} in {gc['batches']:,.0f})",
                            f"{1000 * rest.server_cpu / max(rest.requests, 1):.2f} / "
                            f"{1000 * raw.server_cpu / max(raw.requests, 1):.2f} ms",
                            "(in the API's)" if runners is None else f"{1000 * runners / max(rest.requests, 1):.2f} ms"])
        return out

    def to_json(self) -> dict[str, Any]:
        runner_cpu = self.runner_cpu or [None] * len(self.rest)
        document: dict[str, Any] = {
            "configuration": self.configuration, "keyResults": self.key_results, "events": self.events,
            "rawRows": self.rows,
            "byClients": [{"clients": rest.clients, "rest": rest.summary(), "raw": raw.summary(),
                           "ratio": rest.per_second / raw.per_second if raw.per_second else None,
                           "groupCommit": gc, "catchUpSecondsAfter": catch_up,
                           **({} if runners is None else
                              {"runnerCpuMsPerCheckIn": 1000 * runners / rest.requests if rest.requests else 0.0})}
                          for raw, rest, gc, catch_up, runners in zip(self.raw, self.rest, self.group_commit,
                                                                      self.catch_up_seconds, runner_cpu, strict=True)]}
        if self.apart is not None:
            document["runnersApart"] = self.apart.to_json()
        return document


async def make_key_results(goals_url: str, token: str, count: int) -> list[UUID]:
    """A cycle, a company, a department and a team, their people and objectives (the alignment
    benchmark's builder at its smallest), then `count` increase-to key results round them."""
    builder = Builder(goals_url, goals_url, token, concurrency=8)
    try:
        shape = Shape.at(0.0001)
        await builder.structure(shape)
        owners = await builder.people(shape)
        objectives = await builder.objectives(shape, owners)
        bodies = [(f"/v1/objectives/{objectives[i % len(objectives)]}/key-results",
                   {"title": f"Bench key result {i:03}", "kind": "increase_to", "start": 0, "target": 100,
                    "unit": "%"}) for i in range(count)]
        return await builder.phase("key results", "goals", bodies)
    finally:
        await builder.close()


def _head_and_position(database_url: str) -> tuple[int, int]:
    from services.goals.projections import VIEW_SPEC

    with psycopg.connect(database_url) as conn:
        head = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {VIEW_SPEC.events_table}").fetchone()
        position = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {VIEW_SPEC.tracking_table} "
                                "WHERE application_name = %s", (VIEW_SPEC.application_class.name,)).fetchone()
    return int(head[0]), int(position[0])


async def wait_caught_up(database_url: str, timeout: float = 600) -> float:
    """Seconds until the goals read model has processed its log's head."""
    started = time.perf_counter()
    while True:
        head, position = await asyncio.to_thread(_head_and_position, database_url)
        if position >= head:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the goals read model is at {position}, its log at {head}, after {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def _run(database_url: str, url: str, pid: int, secret: str, clients: list[int], seconds: float,
               warmup: float, out: Any, *, configuration: str = IN_PROCESS,
               runner_pid: int | None = None) -> WritesResult:
    token = mint_token(secret=secret, role="admin", subject="bench")
    headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": "bench-writes"}
    key_results = await make_key_results(url, token, KEY_RESULTS)
    result = WritesResult(clients, len(key_results), configuration)
    label = "" if configuration == IN_PROCESS else f" [projections {configuration}]"
    today = date.today().isoformat()
    # One client (one connection) per worker: see `closed_loop`.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        pool = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                                                  limits=limits)) for _ in range(max(clients))]
        client = pool[0]
        for n in clients:
            def path_of(w: int, i: int, n: int = n) -> str:
                own = key_results[w::n]  # the key results of worker w of n: none shared
                return str(own[i % len(own)])

            def body(w: int, i: int) -> dict[str, Any]:
                return {"value": float((w * 7 + i) % 100), "confidence": 7, "note": "bench", "validOn": today}

            async def raw(c: httpx.AsyncClient, w: int, i: int) -> httpx.Response:
                return await c.post(f"/bench/key-results/{path_of(w, i)}/raw-insert", json=body(w, i))

            async def check_in(c: httpx.AsyncClient, w: int, i: int) -> httpx.Response:
                return await c.post(f"/v1/key-results/{path_of(w, i)}/check-ins", json=body(w, i))

            await wait_caught_up(database_url)
            await closed_loop(pool, raw, n, warmup)  # untimed
            baseline = await closed_loop(pool, raw, n, seconds, server_pid=pid)
            print(f"  {n:>2} clients  raw INSERT   {baseline.per_second:7,.0f}/s  p50 {baseline.p50_ms:6.1f} ms  "
                  f"p95 {baseline.p95_ms:6.1f} ms{label}", file=out, flush=True)
            await wait_caught_up(database_url)
            await closed_loop(pool, check_in, n, warmup)  # untimed
            before = (await client.get("/bench/group-commit")).json()
            runner0 = cpu_seconds(runner_pid) if runner_pid else 0.0
            rest = await closed_loop(pool, check_in, n, seconds, server_pid=pid)
            if runner_pid:
                result.runner_cpu.append(cpu_seconds(runner_pid) - runner0)
            after = (await client.get("/bench/group-commit")).json()
            caught_up = await wait_caught_up(database_url)
            batches, saves = after["batches"] - before["batches"], after["saves"] - before["saves"]
            gc = {"batches": batches, "saves": saves, "averageBatch": saves / batches if batches else 0.0}
            print(f"  {n:>2} clients  REST check-in {rest.per_second:6,.0f}/s  p50 {rest.p50_ms:6.1f} ms  "
                  f"p95 {rest.p95_ms:6.1f} ms  ratio {rest.per_second / max(baseline.per_second, 1e-9):.2f}x  "
                  f"({saves:,} saves in {batches:,} commits, {gc['averageBatch']:.1f} a commit; "
                  f"read model caught up {caught_up:.1f} s after){label}", file=out, flush=True)
            result.raw.append(baseline)
            result.rest.append(rest)
            result.group_commit.append(gc)
            result.catch_up_seconds.append(caught_up)
    with psycopg.connect(database_url) as conn:
        result.rows = int(conn.execute(f"SELECT count(*) FROM {RAW_TABLE}").fetchone()[0])
        result.events = int(conn.execute("SELECT count(*) FROM goals.goals_events").fetchone()[0])
    return result


def _prepare(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in RAW_TABLE_DDL:
            conn.execute(statement)
    create_logs(database_url)


@contextlib.contextmanager
def _sibling_database(database_url: str, suffix: str) -> Iterator[str]:
    """A new database beside `database_url`'s on the same server, dropped on leaving."""
    parts = urlsplit(database_url)
    name = f"{parts.path.lstrip('/') or 'postgres'}_{suffix}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure_writes(database_url: str, clients: list[int], seconds: float, warmup: float, *,
                   telemetry: str = "none", out: Any = None, runners_apart: bool = True) -> WritesResult:
    """Both configurations, one after the other, each in a database of its own: the projection
    runners in the API's process (the headline), then (`runners_apart`) in a process of their
    own, the raw baseline measured again against that API process."""
    _prepare(database_url)
    print(f"Starting goals with the baseline route (telemetry export {telemetry}) ...", file=out, flush=True)
    with served("goals", database_url, telemetry=telemetry) as server:
        result = asyncio.run(_run(database_url, server.url, server.pid, server.secret, clients, seconds, warmup,
                                  out))
    if runners_apart:
        with _sibling_database(database_url, "apart") as apart_url:
            _prepare(apart_url)
            print("Starting goals without its projection runners, and the runners in a process of their own ...",
                  file=out, flush=True)
            with served("goals", apart_url, telemetry=telemetry, extra_env={"TANDEM_RUN_PROJECTIONS": "false"}) \
                    as server, served("goals", apart_url, telemetry=telemetry, runners_only=True) as runners:
                result.apart = asyncio.run(_run(apart_url, server.url, server.pid, server.secret, clients, seconds,
                                                warmup, out, configuration=APART, runner_pid=runners.pid))
    return result


def profile_check_ins(database_url: str, clients: int, seconds: float, *, out: Any = None) -> str:
    """One more check-in run, untimed, on a goals service whose every thread runs under cProfile
    (`bench.serve.ThreadProfiles`): where a check-in's CPU time goes. The profiler slows it
    down; the figures are shares, not timings."""
    import io
    import pstats
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/goals.prof"
        print(f"Profiling {clients} clients' check-ins for {seconds:g} s (cProfile in every thread) ...",
              file=out, flush=True)
        with served("goals", database_url, extra_env={"TANDEM_BENCH_PROFILE": path}) as server:
            async def run() -> LoadResult:
                token = mint_token(secret=server.secret, role="admin", subject="bench")
                key_results = await make_key_results(server.url, token, KEY_RESULTS)
                today = date.today().isoformat()
                limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
                async with contextlib.AsyncExitStack() as stack:
                    pool = [await stack.enter_async_context(httpx.AsyncClient(
                        base_url=server.url, timeout=60, limits=limits, headers={"Authorization": f"Bearer {token}"}))
                        for _ in range(clients)]

                    async def check_in(c: httpx.AsyncClient, w: int, i: int) -> httpx.Response:
                        own = key_results[w::clients]
                        return await c.post(f"/v1/key-results/{own[i % len(own)]}/check-ins",
                                            json={"value": float(i % 100), "confidence": 7, "note": "bench",
                                                  "validOn": today})

                    return await closed_loop(pool, check_in, clients, seconds, server_pid=server.pid)

            load = asyncio.run(run())
        stream = io.StringIO()
        stats = pstats.Stats(path, stream=stream)
        stream.write(f"{load.requests:,} check-ins in {load.seconds:.1f} s under the profiler "
                     f"({load.server_cpu:.1f} s of server CPU)\n")
        stats.sort_stats("cumulative").print_stats(r"services/|groupcommit|eventsourcing/(application|persistence)", 45)
        stats.sort_stats("tottime").print_stats(15)
        return stream.getvalue()
