"""One active runner per projection, across processes: two replicas of the metrics projection's
runner (`python -m services.metrics.main --projections-only`, as the Kubernetes runner
Deployment runs them) on one real PostgreSQL database.

While both run, one holds the projection's advisory lock and processes every event; the other
stands by and writes nothing. A trigger on the tracking table records, for each position written,
the writing session's `application_name` (each process's `PGAPPNAME`), so the database itself says
who processed what. Then the holder is killed with SIGKILL: its session ends, the lock is
released, and the standby takes over from the tracking position and processes what comes next.
Each time the read model equals a fresh replay of the log. Waits are on the tracking position
(and on `/readyz` for the processes' states), never on a timer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.common.database import create_pool, ensure_schema, eventsourcing_env, wait_for_position
from services.common.replay import checksum, drop_schema, read_model_sources, replay
from services.common.settings import DATA_DIR, REPO_ROOT
from services.metrics.application import Metrics
from services.metrics.projections import METRICS_PROJECTIONS
from tests.conftest import free_port, fresh_database

pytestmark = pytest.mark.e2e

SPEC = METRICS_PROJECTIONS[0]
SOURCE = read_model_sources(METRICS_PROJECTIONS)[0]
LOCK_KEY = f"{SPEC.view_schema}.{SPEC.projection_class.name}/{SPEC.application_class.name}"
CHECK = f"projection:{LOCK_KEY}"
START = datetime(2026, 11, 1, tzinfo=UTC)


class Runner:
    """One runner process, its port, log and the name its sessions carry."""

    def __init__(self, url: str, name: str, log_dir: Path):
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        env = dict(os.environ, DATABASE_URL=url, TANDEM_PORT=str(self.port), PGAPPNAME=name,
                   TANDEM_TELEMETRY_EXPORTER="none", PYTHONUNBUFFERED="1")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.metrics.main", "--projections-only"], cwd=REPO_ROOT,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def readyz(self) -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
        except httpx.TransportError:
            return None

    def wait_for_state(self, state: str, timeout: float = 60) -> dict[str, Any]:
        """Poll /readyz until this runner reports `state` for the projection (start-up and the
        lock's changes of hands are what it waits for, not projection progress)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_path.read_text()}"
            r = self.readyz()
            if r is not None and r.json()["checks"].get(CHECK) == state:
                return r.json()
            assert time.monotonic() < deadline, f"{self.name} never reported {state!r}: " \
                f"{r.json() if r is not None else 'no answer'}\n{self.log_path.read_text()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def install_writer_trigger(url: str) -> None:
    """Record who writes each of the projection's tracking positions for the metrics log."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.tracking_writes (notification_id bigint NOT NULL, "
                     "writer text NOT NULL, backend int NOT NULL)")
        conn.execute("""CREATE FUNCTION public.record_tracking_write() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN
                          INSERT INTO public.tracking_writes
                          VALUES (NEW.notification_id, current_setting('application_name'), pg_backend_pid());
                          RETURN NEW;
                        END $$""")
        conn.execute(f"CREATE TRIGGER record_tracking_write AFTER INSERT OR UPDATE ON {SPEC.tracking_table} "
                     "FOR EACH ROW WHEN (NEW.application_name = 'Metrics') "
                     "EXECUTE FUNCTION public.record_tracking_write()")


def writes(url: str, after: int = 0) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT notification_id, writer FROM public.tracking_writes "
                            "WHERE notification_id > %s ORDER BY notification_id", (after,)).fetchall()


def lock_holders(url: str) -> list[str]:
    """The sessions holding the projection's advisory lock, by application_name."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid = hashtext('tandem.projection-runner')::oid AND l.objid = hashtext(%s)::oid""",
            (LOCK_KEY,)).fetchall()
    return [r[0] for r in rows]


def append(metrics: Metrics, kpi_id: Any, hours: range) -> int:
    """Measurements one hour apart, dipping below the rule's threshold now and then (so breaches
    and recoveries are appended too); the log's head after them."""
    position = 0
    for h in hours:
        at = START + timedelta(hours=h)
        written = metrics.record_measurement(kpi_id, value=80 if h % 5 == 0 else 95, measured_at=at,
                                             source="probe", now=at)
        position = written.position
    return position


async def reached(url: str, position: int) -> bool:
    pool = await create_pool(url, SPEC.view_schema, 2)
    try:
        return await wait_for_position(pool, SPEC.tracking_table, SPEC.application_class.name, position,
                                       timeout=60)
    finally:
        await pool.close()


def equals_fresh_replay(url: str, scratch: str) -> None:
    drop_schema(url, scratch)
    try:
        replay(SOURCE, url, scratch)
        with psycopg.connect(url) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            live, fresh = checksum(conn, SOURCE, SOURCE.schema), checksum(conn, SOURCE, scratch)
        assert live.rows > 0
        assert live.tables == fresh.tables
        assert live.positions == fresh.positions
    finally:
        drop_schema(url, scratch)


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


async def test_one_runner_processes_and_the_standby_takes_over_when_it_is_killed(database: str) -> None:
    url = database
    log_dir = DATA_DIR / "logs" / f"failover-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    ensure_schema(url, "metrics")
    metrics = Metrics(env=eventsourcing_env(url, "metrics"))
    runners: list[Runner] = []
    try:
        kpi = metrics.define_kpi(name="Uptime", unit="%", direction="higher_is_better", cadence="daily",
                                 rules=[{"id": "floor", "kind": "below", "threshold": 90, "severity": "critical"}]).id
        head = append(metrics, kpi, range(0, 10))  # a backlog before any runner starts
        SPEC.create_tables(url)
        install_writer_trigger(url)

        first = Runner(url, "runner-a", log_dir)
        runners.append(first)
        first.wait_for_state("running")
        second = Runner(url, "runner-b", log_dir)
        runners.append(second)
        ready = second.wait_for_state("standing by")
        assert first.readyz().status_code == 200  # type: ignore[union-attr]
        assert second.readyz().status_code == 200, ready  # type: ignore[union-attr]  # a standby is ready
        assert lock_holders(url) == ["runner-a"]

        # Events appended while both run: processed once, all by the holder.
        head = await asyncio.to_thread(append, metrics, kpi, range(10, 40))
        assert await reached(url, head)
        before_kill = writes(url)
        assert before_kill, "the holder recorded no tracking position"
        assert {writer for _, writer in before_kill} == {"runner-a"}
        assert [n for n, _ in before_kill] == sorted({n for n, _ in before_kill})  # each position once
        assert before_kill[-1][0] == head
        assert second.wait_for_state("standing by")["checks"][f"position:{LOCK_KEY}"] == head
        equals_fresh_replay(url, "metrics_failover_replay_1")

        # SIGKILL the holder: no clean-up of any kind, its session just ends.
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        second.wait_for_state("running")
        assert lock_holders(url) == ["runner-b"]

        # The standby carries on from the tracking position, with what came after the kill.
        new_head = await asyncio.to_thread(append, metrics, kpi, range(40, 70))
        assert new_head > head
        assert await reached(url, new_head)
        after_kill = writes(url, after=head)
        assert after_kill and {writer for _, writer in after_kill} == {"runner-b"}
        assert after_kill[-1][0] == new_head
        every = [n for n, _ in writes(url)]
        assert every == sorted(set(every))
        equals_fresh_replay(url, "metrics_failover_replay_2")
        # The survivor is still the only one: a restarted replica would stand by again.
        third = Runner(url, "runner-c", log_dir)
        runners.append(third)
        third.wait_for_state("standing by")
        assert lock_holders(url) == ["runner-b"]
    finally:
        metrics.close()
        for runner in runners:
            runner.stop()
