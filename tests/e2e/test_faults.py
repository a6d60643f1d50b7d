"""Faults (issue 10): the real processes over HTTP on real PostgreSQL, under concurrency, retries,
killed runners, a database restart and two replicas writing at once. Nothing here sleeps to
wait for a projection: waits are on tracking positions (`Tandem-Wait-For`, or the tracking
table's NOTIFY), on `/readyz`, or on the database's own state (a lock released).

The module's processes, on one database of their own:
- goals (`goals`, API and projection runners) and a second goals replica (`goals-b`, the same
  code on another port: its runners stand by for the first's);
- metrics with `TANDEM_RUN_PROJECTIONS=false`: its read model is kept by a `--projections-only`
  runner process, the one killed with SIGKILL;
- the gateway, whose read model follows both logs.

The runner processes are forked from a parent that has already imported the service (a
"zygote"): each child runs exactly `python -m services.metrics.main --projections-only`'s entry
point, but starts in a fraction of a second instead of the ~2.5 s of a fresh interpreter's
imports, which keeps twenty kills within CI's time.

The PostgreSQL restart runs on an embedded server of its own (`services.common.devdb`, a
temporary data directory and a free port), with goals and metrics of their own on it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.audit import read_model_sources
from services.common import devdb
from services.common.database import create_pool, wait_for_position
from services.common.replay import ReadModelSource, checksum, drop_schema, live_checksum, replay
from services.common.settings import DATA_DIR, REPO_ROOT
from services.metrics.projections import METRICS_PROJECTIONS
from services.stack import ServiceProcess, Stack, _terminate_with_parent
from tests.conftest import free_port, fresh_database

pytestmark = pytest.mark.e2e

CHECK_IN = "services.goals.domain:KeyResult.Progressed"
MEASURED = "services.metrics.domain:KPI.Measured"
METRICS_SPEC = METRICS_PROJECTIONS[0]
METRICS_LOCK_KEY = f"{METRICS_SPEC.view_schema}.{METRICS_SPEC.projection_class.name}/Metrics"
TIMEOUT = httpx.Timeout(60)


@dataclass
class FaultStack(Stack):
    """`Stack` with environment per service and extra services (a second goals replica)."""

    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    def env(self, service: ServiceProcess) -> dict[str, str]:
        env = super().env(service)
        env.update(self.service_env.get(service.name, {}))
        return env


ZYGOTE = r"""
import os, signal, sys
from services.common.runner import serve
from services.metrics.api import create_app
from services.metrics.projections import METRICS_PROJECTIONS
from services.metrics.settings import MetricsSettings
from services.stack import _terminate_with_parent

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
print("ready", flush=True)
while line := sys.stdin.readline():
    port, name, log_path = line.split()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _terminate_with_parent()
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.update(TANDEM_PORT=port, PGAPPNAME=name)
        try:
            serve(MetricsSettings, create_app, lambda settings: METRICS_PROJECTIONS, ["--projections-only"])
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


class RunnerZygote:
    """Forks metrics projection runners (`--projections-only`) on demand."""

    def __init__(self, database_url: str, log_dir: Path):
        self.log_path = log_dir / "metrics-runners.log"
        env = dict(os.environ, DATABASE_URL=database_url, PYTHONUNBUFFERED="1",
                   TANDEM_PROJECTION_BATCH_SIZE="10")  # small batches: kills land inside a catch-up
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True, preexec_fn=_terminate_with_parent)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"
        self.children: list[int] = []
        self.port = free_port()

    def spawn(self, name: str) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{self.port} {name} {self.log_path}\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        self.children.append(pid)
        return pid

    @staticmethod
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        if self.alive(pid):
            os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while self.alive(pid):
            assert time.monotonic() < deadline, f"runner {pid} did not exit"
            time.sleep(0.01)

    def close(self) -> None:
        for pid in self.children:
            if self.alive(pid):
                self.kill(pid, signal.SIGTERM)
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class World:
    url: str
    stack: FaultStack
    runners: RunnerZygote
    headers: dict[str, str]
    cycle: str = ""
    unit: str = ""

    def goals(self, replica: str = "goals") -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.stack.url(replica), headers=self.headers, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=100))

    def metrics(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.stack.url("metrics"), headers=self.headers, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_connections=100))


@pytest.fixture(scope="module")
def world(service_environment: None, auth: Callable[..., dict[str, str]]) -> Iterator[World]:
    with fresh_database() as url:
        stack = FaultStack(url, gateway_port=free_port(), goals_port=free_port(), metrics_port=free_port(),
                           service_env={"metrics": {"TANDEM_RUN_PROJECTIONS": "false"}})
        stack.services.insert(1, ServiceProcess("goals-b", "services.goals.main", free_port()))
        stack.log_dir = DATA_DIR / "logs" / f"faults-{stack.gateway_port}"
        runners = None
        try:
            stack.start()
            runners = RunnerZygote(url, stack.log_dir)
            runners.spawn("metrics-runner-0")  # the metrics read model's runner until test 3 kills it
            w = World(url, stack, runners, auth("admin", "faults"))
            with httpx.Client(headers=w.headers, timeout=TIMEOUT) as client:
                today = date.today()
                w.cycle = _created(client.post(f"{stack.url('goals')}/v1/cycles", json={
                    "name": str(today.year), "kind": "year", "startsOn": date(today.year, 1, 1).isoformat(),
                    "endsOn": date(today.year, 12, 31).isoformat(), "status": "active"}))["id"]
                w.unit = _created(client.post(f"{stack.url('goals')}/v1/units",
                                              json={"name": "Faults Inc", "kind": "company"}))["id"]
            yield w
        finally:
            if runners is not None:
                runners.close()
            stack.stop()


def _created(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    return r.json()


async def new_key_results(client: httpx.AsyncClient, world: World, n: int) -> list[str]:
    objective = _created(await client.post("/v1/objectives", json={
        "title": f"Survive faults {uuid.uuid4().hex[:6]}", "owner": {"kind": "unit", "id": world.unit},
        "unitId": world.unit, "cycleId": world.cycle}))["id"]
    return [_created(await client.post(f"/v1/objectives/{objective}/key-results", json={
        "title": f"Key result {i}", "kind": "increase_to", "start": 0, "target": 1000, "unit": "x"}))["id"]
        for i in range(n)]


async def new_kpis(client: httpx.AsyncClient, n: int, rules: list[dict[str, Any]] | None = None) -> list[str]:
    return [_created(await client.post("/v1/kpis", json={
        "name": f"Fault KPI {uuid.uuid4().hex[:6]}", "unit": "%", "direction": "higher_is_better",
        "cadence": "daily", "rules": rules or []}))["id"] for _ in range(n)]


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def events_of(url: str, table: str, ids: list[str]) -> list[tuple[str, int, str, int]]:
    """(originator id, version, topic, notification id) of these aggregates' events."""
    return [(str(i), v, t, n) for i, v, t, n in query(
        url, f"SELECT originator_id, originator_version, topic, notification_id FROM {table} "
             "WHERE originator_id = ANY(%s::uuid[]) ORDER BY originator_id, originator_version", (ids,))]


def assert_contiguous_versions(url: str, table: str) -> None:
    broken = query(url, f"SELECT originator_id, min(originator_version), max(originator_version), count(*) "
                        f"FROM {table} GROUP BY 1 HAVING min(originator_version) <> 1 "
                        "OR max(originator_version) <> count(*) OR count(DISTINCT originator_version) <> count(*)")
    assert not broken, f"aggregates with missing or doubled versions in {table}: {broken[:5]}"


def log_head(url: str, table: str) -> int:
    return int(query(url, f"SELECT coalesce(max(notification_id), 0) FROM {table}")[0][0])


async def reach(url: str, schema: str, tracking_table: str, application_name: str, position: int,
                timeout: float = 60) -> None:
    pool = await create_pool(url, schema, 2)
    try:
        assert await wait_for_position(pool, tracking_table, application_name, position, timeout=timeout), \
            f"{tracking_table} never reached {application_name}={position}"
    finally:
        await pool.close()


def equals_fresh_replay(url: str, source: ReadModelSource, scratch: str) -> dict[str, int]:
    """The live read model (one consistent snapshot) against a replay of its logs into `scratch`
    up to the positions the live one has reached: the same rows, table by table."""
    live = live_checksum(url, source)
    drop_schema(url, scratch)
    try:
        replay(source, url, scratch, stops=live.positions)
        with psycopg.connect(url) as conn:
            fresh = checksum(conn, source, scratch)
        assert fresh.positions == live.positions
        assert fresh.tables == live.tables, f"{source.label} differs from its replay"
    finally:
        drop_schema(url, scratch)
    return live.positions


# 1. Concurrent check-ins on one key result.

async def test_64_concurrent_check_ins_on_one_key_result(world: World) -> None:
    async with world.goals() as client:
        [kr] = await new_key_results(client, world, 1)
        answers = await asyncio.gather(*(
            client.post(f"/v1/key-results/{kr}/check-ins", json={"value": i, "confidence": 5})
            for i in range(64)))
    statuses = sorted({r.status_code for r in answers})
    assert statuses == [201], [r.text for r in answers if r.status_code != 201][:3]
    versions = sorted(r.json()["version"] for r in answers)
    assert versions == list(range(versions[0], versions[0] + 64))  # each got a version of its own
    events = events_of(world.url, "goals.goals_events", [kr])
    assert [v for _, v, _, _ in events] == list(range(1, len(events) + 1))
    assert sum(t == CHECK_IN for _, _, t, _ in events) == 64
    assert versions[-1] == events[-1][1]
    positions = {r.json()["position"] for r in answers}
    assert positions == {n for _, _, t, n in events if t == CHECK_IN}


# 2. Every POST retried with its Idempotency-Key.

async def test_1000_posts_each_retried_with_its_idempotency_key(world: World) -> None:
    async with world.goals() as goals, world.metrics() as metrics:
        krs = await new_key_results(goals, world, 20)
        kpis = await new_kpis(metrics, 5)
        base = datetime.now(UTC) - timedelta(minutes=10)
        gate = asyncio.Semaphore(24)

        async def twice(i: int) -> tuple[httpx.Response, httpx.Response]:
            key = f"faults-{uuid.uuid4().hex}"
            if i % 2:
                client, path, body = goals, f"/v1/key-results/{krs[i % 20]}/check-ins", {"value": i, "note": f"#{i}"}
            else:
                client, path = metrics, f"/v1/kpis/{kpis[i % 5]}/measurements"
                body = {"value": i, "measuredAt": (base + timedelta(milliseconds=100 * i)).isoformat()}

            def send() -> Any:
                return client.post(path, json=body, headers={"Idempotency-Key": key})

            async with gate:
                if i % 3 == 0:  # the retry races the first attempt
                    first, retry = await asyncio.gather(send(), send())
                else:
                    first = await send()
                    retry = await send()
            return first, retry

        pairs = await asyncio.gather(*(twice(i) for i in range(1000)))
    for first, retry in pairs:
        assert first.status_code == retry.status_code == 201, (first.text, retry.text)
        assert first.json() == retry.json()
        assert first.headers["ETag"] == retry.headers["ETag"]
        replayed = sorted(r.headers.get("Idempotent-Replayed") == "true" for r in (first, retry))
        assert replayed == [False, True]  # one ran, the other was answered from the key
    check_ins = [e for e in events_of(world.url, "goals.goals_events", krs) if e[2] == CHECK_IN]
    measured = [e for e in events_of(world.url, "metrics.metrics_events", kpis) if e[1] > 1]
    assert len(check_ins) == 500
    assert len(measured) == 500 and {t for _, _, t, _ in measured} == {MEASURED}
    answered = {(r.json()["id"], r.json()["version"]) for r, _ in pairs}
    assert answered == {(i, v) for i, v, _, _ in check_ins + measured}


# 3. The metrics projection runner killed with SIGKILL, twenty times, while events flow.

async def test_projection_runner_killed_20_times_while_events_flow(world: World) -> None:
    url, zygote = world.url, world.runners
    source = next(s for s in read_model_sources() if s.label == "metrics.metrics_view")
    rng = random.Random(10)
    stop = asyncio.Event()
    written: list[tuple[str, int]] = []

    async def writer(client: httpx.AsyncClient, kpi: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            value = 40 if n % 7 == 0 else 60 + n % 5  # now and then below the rule: breaches, recoveries
            r = await client.post(f"/v1/kpis/{kpi}/measurements", json={"value": value, "source": "faults"})
            assert r.status_code == 201, r.text
            written.append((kpi, r.json()["position"]))

    pool = await create_pool(url, "metrics", 2)
    async with world.metrics() as client:
        kpis = await new_kpis(client, 3, [{"kind": "below", "threshold": 50, "severity": "warning",
                                           "recovery": 55}])
        writers = [asyncio.create_task(writer(client, k)) for k in kpis]
        try:
            for kill in range(20):
                if kill:  # the first kill is of the runner the module started with
                    zygote.spawn(f"metrics-runner-{kill}")
                pid = zygote.children[-1]
                before = await _tracking(pool)
                # Killed once it has processed something (a batch committed after its start) and
                # then a random moment later: in a batch, between batches, or idle.
                assert await wait_for_position(pool, METRICS_SPEC.tracking_table, "Metrics", before + 1, timeout=60), \
                    f"runner {kill} made no progress"
                await asyncio.sleep(rng.uniform(0, 0.15))
                await asyncio.to_thread(zygote.kill, pid)
                await _lock_released(url)
            stop.set()
            await asyncio.gather(*writers)
        finally:
            stop.set()
            for w in writers:
                w.cancel()
    zygote.spawn("metrics-runner-final")  # stays for the rest of the module
    head = log_head(url, "metrics.metrics_events")
    assert await wait_for_position(pool, METRICS_SPEC.tracking_table, "Metrics", head, timeout=60)
    await pool.close()
    assert len(written) > 100, "too few events flowed during the kills"

    # The read model equals a fresh replay, and has every event once.
    positions = equals_fresh_replay(url, source, "faults_metrics_replay")
    assert positions["Metrics"] >= head
    [(measured_events, distinct)] = query(url, "SELECT count(*), count(DISTINCT (originator_id, originator_version)) "
                                              "FROM metrics.metrics_events WHERE topic = %s AND notification_id <= %s",
                                          (MEASURED, positions["Metrics"]))
    [(rows, distinct_rows)] = query(url, "SELECT count(*), count(DISTINCT (kpi_id, version)) FROM metrics.measurements")
    assert rows == distinct_rows == measured_events == distinct  # no duplicates, no gaps
    counts = dict(query(url, "SELECT id::text, measurement_count FROM metrics.kpis WHERE id = ANY(%s::uuid[])",
                        (kpis,)))
    for kpi in kpis:
        assert counts[kpi] == sum(1 for k, _ in written if k == kpi)
    missing = query(url, "SELECT e.originator_id, e.originator_version FROM metrics.metrics_events e "
                         "LEFT JOIN metrics.measurements m ON m.kpi_id = e.originator_id "
                         "AND m.version = e.originator_version WHERE e.topic = %s AND m.kpi_id IS NULL", (MEASURED,))
    assert not missing


async def _tracking(pool: Any) -> int:
    return int(await pool.fetchval(f"SELECT coalesce(max(notification_id), 0) FROM {METRICS_SPEC.tracking_table} "
                                   "WHERE application_name = 'Metrics'"))


async def _lock_released(url: str, timeout: float = 20) -> None:
    """Until no session holds the metrics projection's advisory lock (the killed runner's
    backend has gone), so the next runner takes it at once rather than standing by."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = hashtext('tandem.projection-runner')::oid AND objid = hashtext(%s)::oid",
                (METRICS_LOCK_KEY,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the killed runner's lock was never released"
            await asyncio.sleep(0.01)


# 4. PostgreSQL restarted while clients write.

@dataclass
class Outcomes:
    statuses: list[int] = field(default_factory=list)
    unavailable: list[httpx.Response] = field(default_factory=list)
    acknowledged: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    """(service, Idempotency-Key, body of the 2xx answer)"""


@pytest.fixture
def own_postgres(service_environment: None) -> Iterator[tuple[Path, int, str]]:
    with tempfile.TemporaryDirectory(prefix="tandem-faults-pg-") as tmp:
        data_dir, port = Path(tmp) / "postgres", free_port()
        url, _ = devdb.start(data_dir, port)
        try:
            yield data_dir, port, url
        finally:
            devdb.stop(data_dir)


async def test_postgres_restarted_while_clients_write(own_postgres: tuple[Path, int, str],
                                                      auth: Callable[..., dict[str, str]]) -> None:
    data_dir, port, url = own_postgres
    stack = FaultStack(url, gateway_port=free_port(), goals_port=free_port(), metrics_port=free_port())
    stack.services = [s for s in stack.services if s.name != "gateway"]
    stack.log_dir = DATA_DIR / "logs" / f"faults-restart-{port}"
    headers = auth("admin", "faults-restart")
    out = Outcomes()
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(stack.start)
        async with (httpx.AsyncClient(base_url=stack.url("goals"), headers=headers, timeout=TIMEOUT) as goals,
                    httpx.AsyncClient(base_url=stack.url("metrics"), headers=headers, timeout=TIMEOUT) as metrics):
            today = date.today()
            cycle = _created(await goals.post("/v1/cycles", json={
                "name": "Year", "kind": "year", "startsOn": date(today.year, 1, 1).isoformat(),
                "endsOn": date(today.year, 12, 31).isoformat(), "status": "active"}))["id"]
            unit = _created(await goals.post("/v1/units", json={"name": "Restart Inc", "kind": "company"}))["id"]
            objective = _created(await goals.post("/v1/objectives", json={
                "title": "Keep every write", "owner": {"kind": "unit", "id": unit}, "unitId": unit,
                "cycleId": cycle}))["id"]
            krs = [_created(await goals.post(f"/v1/objectives/{objective}/key-results", json={
                "title": f"KR {i}", "kind": "increase_to", "start": 0, "target": 100}))["id"] for i in range(3)]
            kpis = await new_kpis(metrics, 3)

            async def client_loop(service: str, client: httpx.AsyncClient, path: str) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    key = f"restart-{uuid.uuid4().hex}"
                    body: dict[str, Any] = {"value": n}
                    if service == "metrics":
                        body["measuredAt"] = datetime.now(UTC).isoformat()
                    while True:  # this write until it is acknowledged, as a client with a key would
                        try:
                            r = await client.post(path, json=body, headers={"Idempotency-Key": key})
                        except httpx.TransportError as e:  # the service itself never goes away
                            raise AssertionError(f"{service} dropped the connection: {e!r}") from e
                        out.statuses.append(r.status_code)
                        if r.status_code == 201:
                            out.acknowledged.append((service, key, r.json()))
                            break
                        assert r.status_code == 503, f"{service} answered {r.status_code}: {r.text}"
                        out.unavailable.append(r)
                        await asyncio.sleep(min(float(r.headers["Retry-After"]), 0.2))

            clients = [asyncio.create_task(client_loop("goals", goals, f"/v1/key-results/{kr}/check-ins"))
                       for kr in krs]
            clients += [asyncio.create_task(client_loop("metrics", metrics, f"/v1/kpis/{k}/measurements"))
                        for k in kpis]
            try:
                await _until(lambda: len(out.acknowledged) >= 30, "writes before the outage", clients)
                await asyncio.to_thread(devdb.stop, data_dir)
                down_at = len(out.statuses)
                await _until(lambda: len(out.unavailable) >= 6 and len(out.statuses) - down_at >= 6,
                             "503s during the outage", clients)
                acknowledged_before = len(out.acknowledged)
                await asyncio.to_thread(devdb.start, data_dir, port)
                await _until(lambda: len(out.acknowledged) >= acknowledged_before + 30, "writes after the restart",
                             clients)
                stop.set()
                await asyncio.wait_for(asyncio.gather(*clients), 60)
            finally:
                stop.set()
                for c in clients:
                    c.cancel()

            assert 500 not in out.statuses
            assert set(out.statuses) <= {201, 503}, sorted(set(out.statuses))
            assert out.unavailable, "no request met the outage"
            for r in out.unavailable:
                assert r.headers["Retry-After"].isdigit()
                assert r.headers["content-type"] == "application/problem+json"

            # Recovered without a restart of their own: ready again, and a new write succeeds.
            for service in stack.services:
                await _ready(service.url)
            late = _created(await goals.post(f"/v1/key-results/{krs[0]}/check-ins", json={"value": 1}))
            out.acknowledged.append(("goals", "late", late))

            # Every acknowledged write is in its log, once, at the version and position it was told.
            for service, table, ids, topic in (("goals", "goals.goals_events", krs, CHECK_IN),
                                               ("metrics", "metrics.metrics_events", kpis, MEASURED)):
                events = {(i, v): (t, n) for i, v, t, n in events_of(url, table, ids)}
                acked = [body for s, _, body in out.acknowledged if s == service]
                for body in acked:
                    assert events.get((body["id"], body["version"])) == (topic, body["position"]), body
                assert sum(t == topic for t, _ in events.values()) == len(acked)
                assert_contiguous_versions(url, table)
                # ... and in the service's read model, read once it has reached the last position.
                last = max(body["position"] for body in acked)
                r = await (goals if service == "goals" else metrics).get(
                    f"/v1/{'key-results' if service == 'goals' else 'kpis'}/{ids[0]}",
                    headers={"Tandem-Wait-For": f"{service}={last}"})
                assert r.status_code == 200, r.text
            shown = {(str(k), v) for k, v in query(url, "SELECT key_result_id, version FROM goals.check_ins")}
            shown |= {(str(k), v) for k, v in query(url, "SELECT kpi_id, version FROM metrics.measurements")}
            assert {(b["id"], b["version"]) for _, _, b in out.acknowledged} <= shown
    finally:
        stop.set()
        await asyncio.to_thread(stack.stop)


async def _until(condition: Callable[[], bool], what: str, tasks: list[asyncio.Task[None]],
                 timeout: float = 60) -> None:
    """Until `condition` holds, checking on the client tasks (a failed one fails the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for t in tasks:
            if t.done():
                t.result()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _ready(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            r = await client.get(f"{base_url}/readyz")
            if r.status_code == 200:
                return
            assert time.monotonic() < deadline, f"{base_url} not ready again: {r.text}"
            await asyncio.sleep(0.1)


# 5. Two replicas of goals writing at once.

async def test_two_replicas_writing_at_once_keep_the_log_whole(world: World) -> None:
    url = world.url
    async with world.goals("goals") as a, world.goals("goals-b") as b:
        shared = await new_key_results(a, world, 3)
        outcomes: dict[str, list[tuple[int, dict[str, Any]]]] = {"plain": [], "if-match": []}

        async def plain(client: httpx.AsyncClient, n: int) -> None:
            for i in range(n):
                r = await client.post(f"/v1/key-results/{shared[i % 3]}/check-ins", json={"value": i})
                outcomes["plain"].append((r.status_code, r.json()))

        async def conditional(client: httpx.AsyncClient, n: int) -> None:
            version = 1
            for i in range(n):  # If-Match on the version last seen: other writers keep making it stale
                r = await client.post(f"/v1/key-results/{shared[0]}/check-ins", json={"value": -i},
                                      headers={"If-Match": f'"{version}"'})
                outcomes["if-match"].append((r.status_code, r.json()))
                version = r.json()["version"] if r.status_code == 201 else r.json()["currentVersion"]

        async def units(client: httpx.AsyncClient, n: int) -> None:
            for _ in range(n):
                r = await client.post("/v1/units", json={"name": f"Team {uuid.uuid4().hex[:6]}", "kind": "team",
                                                          "parentId": world.unit})
                outcomes["plain"].append((r.status_code, r.json()))

        await asyncio.gather(*(job(client, n) for client in (a, b)
                               for job, n in ((plain, 40), (plain, 40), (plain, 40), (conditional, 30), (units, 20))))

    assert {s for s, _ in outcomes["plain"]} == {201}, [o for o in outcomes["plain"] if o[0] != 201][:3]
    assert {s for s, _ in outcomes["if-match"]} <= {201, 412}
    answered = [(o["id"], o["version"]) for s, o in outcomes["plain"] + outcomes["if-match"] if s == 201]
    assert len(answered) == len(set(answered))  # no version given twice, across the replicas

    # The log: no gaps, versions contiguous per aggregate.
    [(head, count)] = query(url, "SELECT coalesce(max(notification_id), 0), count(*) FROM goals.goals_events")
    assert head == count, f"the goals log has gaps: head {head}, {count} events"
    assert_contiguous_versions(url, "goals.goals_events")
    [(m_head, m_count)] = query(url, "SELECT coalesce(max(notification_id), 0), count(*) FROM metrics.metrics_events")
    assert m_head == m_count, f"the metrics log has gaps: head {m_head}, {m_count} events"

    # Every follower of both logs reaches the heads, and holds what a fresh replay of them holds.
    heads = {"Goals": head, "Metrics": m_head}
    for source in read_model_sources():
        for spec in source.specs:
            name = spec.application_class.name
            await reach(url, spec.view_schema, spec.tracking_table, name, heads[name])
        positions = equals_fresh_replay(url, source, f"faults_replay_{source.name.lower()}")
        assert all(positions[name] >= heads[name] for name in positions), (source.label, positions)
