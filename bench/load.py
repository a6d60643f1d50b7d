"""What the write benchmarks share: a service served in a subprocess of the benchmark
(`bench.serve`), a closed-loop load of N concurrent clients, and a few readings of a process
(CPU time, peak RSS) from /proc."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common.settings import DATA_DIR, REPO_ROOT

LOG_DIR = DATA_DIR / "logs-bench"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    pid: int
    secret: str
    log_path: Path


@contextmanager
def served(service: str, database_url: str, *, telemetry: str = "none", extra_env: dict[str, str] | None = None,
           timeout: float = 90, runners_only: bool = False) -> Iterator[Served]:
    """`python -m bench.serve <service>` on a free port of its own, with a JWT secret of its own;
    stopped (SIGTERM, then SIGKILL) on leaving. `runners_only`: the service's projection runners
    in a process of their own instead, as production runs them apart (`python -m
    services.<service>.main --projections-only`, `/readyz` on its port)."""
    from services.stack import _terminate_with_parent

    port = free_port()
    secret = secrets.token_hex(24)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{service}-{'runners' if runners_only else 'bench'}.log"
    module = [f"services.{service}.main", "--projections-only"] if runners_only else ["bench.serve", service]
    env = dict(os.environ, DATABASE_URL=database_url, TANDEM_PORT=str(port), TANDEM_JWT_SECRET=secret,
               TANDEM_TELEMETRY_EXPORTER=telemetry, PYTHONUNBUFFERED="1",
               TANDEM_TELEMETRY_CONSOLE_PATH=str(LOG_DIR / f"{service}-bench-spans.jsonl"), **(extra_env or {}))
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", *module], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_terminate_with_parent)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{service} exited during start-up; see {log_path}")
                try:
                    if client.get(url + "/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service} not ready after {timeout:.0f} s; see {log_path}")
                time.sleep(0.2)
        yield Served(url, process.pid, secret, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the resident set's high-water mark) of a process, in MB; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def percentile(samples: list[float], p: float) -> float:
    """The nearest-rank percentile (0 for no samples)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, -(-int(p * len(ordered)) // 100) - 1)]


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else 0.0

    @property
    def p95_ms(self) -> float:
        return percentile(self.latencies, 95) * 1000

    def summary(self) -> dict[str, float | int]:
        return {"clients": self.clients, "requests": self.requests, "errors": self.errors, "seconds": self.seconds,
                "requestsPerSecond": self.per_second, "p50Ms": self.p50_ms, "p95Ms": self.p95_ms,
                "serverCpuMsPerRequest": 1000 * self.server_cpu / self.requests if self.requests else 0.0,
                "clientCpuMsPerRequest": 1000 * self.client_cpu / self.requests if self.requests else 0.0}


Send = Callable[[httpx.AsyncClient, int, int], Awaitable[httpx.Response]]
"""One request: (client, worker number, request number of that worker) -> its answer."""


async def closed_loop(client: httpx.AsyncClient | Sequence[httpx.AsyncClient], send: Send, clients: int,
                      seconds: float, *, warmup: float = 0.0, server_pid: int | None = None) -> LoadResult:
    """`clients` workers, each sending its next request when the last one is answered: first
    `warmup` seconds untimed, then `seconds` timed. Worker w sends through `client[w % len]`
    when given several (one each: httpx's pool spends CPU per request on every connection it
    holds: at 32 clients one pool of 32 connections cost this process 3.6 ms of CPU a request,
    32 pools of one 1.0 ms, and the raw baseline was held down by the client). Only 2xx answers count as requests; any other is an error (and the
    first is raised after the run, so a broken setup is not timed)."""
    pool = [client] if isinstance(client, httpx.AsyncClient) else list(client)
    counters = [0] * clients
    first_error: list[str] = []

    async def run(duration: float, result: LoadResult | None) -> None:
        deadline = time.perf_counter() + duration

        async def worker(w: int) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                r = await send(pool[w % len(pool)], w, counters[w])
                counters[w] += 1
                if result is None:
                    continue
                result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
                if r.is_success:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors += 1
                    if not first_error:
                        first_error.append(f"{r.status_code} {r.request.url.path}: {r.text[:300]}")

        await asyncio.gather(*(worker(w) for w in range(clients)))

    if warmup > 0:
        await run(warmup, None)
    result = LoadResult(clients, seconds)
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    client0 = time.process_time()
    started = time.perf_counter()
    await run(seconds, result)
    result.seconds = time.perf_counter() - started  # the last requests end after the deadline
    result.client_cpu = time.process_time() - client0
    result.server_cpu = cpu_seconds(server_pid) - cpu0 if server_pid else 0.0
    if first_error and result.errors > result.requests // 100:
        raise RuntimeError(f"{result.errors} of {result.errors + result.requests} requests failed; "
                           f"first: {first_error[0]}")
    return result


def create_logs(database_url: str) -> None:
    """Both services' schemas and logs, as the services create them on start-up: a service
    served alone follows the other's log, which must then exist."""
    from services.common.database import ensure_schema, eventsourcing_env
    from services.goals.application import Goals
    from services.metrics.application import Metrics

    for app_class, schema in ((Goals, "goals"), (Metrics, "metrics")):
        ensure_schema(database_url, schema)
        app_class(env=eventsourcing_env(database_url, schema)).close()
