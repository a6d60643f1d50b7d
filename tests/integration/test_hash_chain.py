"""Tamper evidence: each service's log carries a hash chain, and altering, deleting, reordering
or slipping in rows by hand in PostgreSQL is named at the right position, by the verifier, the
`/v1/audit/chain` endpoint and `python -m services.audit verify`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from eventsourcing.persistence import InfrastructureFactory, StoredEvent, Tracking
from eventsourcing.utils import Environment, get_topic

from services.common.database import ensure_schema, eventsourcing_env
from services.common.hashchain import HashChain, chain_table_name, verify_chain
from services.common.projections import AnnouncingProcessRecorder
from services.common.settings import REPO_ROOT
from services.goals.api import create_app as create_goals
from services.goals.application import Goals
from services.goals.domain import UnitKind
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.application import Metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import fresh_database, ok, refused, serve_in_process

EVENTS = "goals.goals_events"
CHAIN = "goals.goals_event_chain"


@pytest.fixture
def database() -> Iterator[str]:
    """A database of the test's own: every test here tampers with its log."""
    with fresh_database() as url:
        ensure_schema(url, "goals")
        ensure_schema(url, "metrics")
        yield url


def goals_app(url: str) -> Goals:
    return Goals(env=eventsourcing_env(url, "goals"))


def write_units(url: str, count: int) -> int:
    """A company and `count - 1` teams through the real application: `count` events."""
    app = goals_app(url)
    try:
        company = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
        for i in range(count - 1):
            app.create_unit(name=f"Team {i}", kind=UnitKind.team, parent_id=company.id)
        return app.position()
    finally:
        app.close()


def sql(url: str, *statements: str) -> None:
    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def check(url: str) -> dict:
    return verify_chain(url, "goals", "goals_events").as_dict()


def problem(url: str) -> tuple[str, int]:
    report = check(url)
    assert report["ok"] is False, report
    return report["problem"]["kind"], report["problem"]["position"]


def test_an_untouched_log_verifies_with_every_record_counted(database: str) -> None:
    head = write_units(database, 7)
    report = check(database)
    assert report["ok"] and report["problem"] is None
    assert report["records"] == 7 and report["head_position"] == head == 7
    with psycopg.connect(database) as conn:
        stored = conn.execute(f"SELECT chain_hash FROM {CHAIN} WHERE notification_id = %s", (head,)).fetchone()[0]
        links = conn.execute(f"SELECT notification_id, previous_id FROM {CHAIN} ORDER BY 1").fetchall()
    assert report["head_hash"] == bytes(stored).hex()
    assert links == [(1, None)] + [(i, i - 1) for i in range(2, 8)]


def test_a_save_of_many_events_is_chained_in_log_order(database: str) -> None:
    metrics = Metrics(env=eventsourcing_env(database, "metrics"))
    try:
        kpi = metrics.define_kpi(name="CSAT", unit="%", direction="higher_is_better", cadence="daily",
                                 rules=[{"kind": "below", "threshold": 90, "recovery": 92, "severity": "critical"}])
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=300)
        # Breaches and recoveries among them: one save of events of several kinds.
        values = [95.0 if i % 7 else 80.0 for i in range(250)]
        metrics.record_measurements(kpi.id, [(v, start + timedelta(days=i), "test") for i, v in enumerate(values)])
        head = metrics.position()
    finally:
        metrics.close()
    report = verify_chain(database, "metrics", "metrics_events")
    assert report.ok and report.records == head > 250
    assert report.line().startswith(f"metrics: ok, {head} records, head {head} ")


def test_an_altered_state_is_named(database: str) -> None:
    write_units(database, 6)
    sql(database, f"UPDATE {EVENTS} SET state = convert_to(replace(convert_from(state, 'UTF8'), "
                  "'Team 1', 'Team X'), 'UTF8') WHERE notification_id = 3")
    assert problem(database) == ("altered", 3)
    report = check(database)
    assert report["records"] == 2 and report["head_position"] == 2
    assert "event 3 (OrgUnit.Created of" in report["problem"]["detail"]


def test_an_altered_topic_is_named(database: str) -> None:
    write_units(database, 4)
    sql(database, f"UPDATE {EVENTS} SET topic = topic || 'X' WHERE notification_id = 4")
    assert problem(database) == ("altered", 4)


def test_a_deleted_event_is_named(database: str) -> None:
    write_units(database, 6)
    sql(database, f"DELETE FROM {EVENTS} WHERE notification_id = 4")
    assert problem(database) == ("deleted", 4)


def test_an_event_deleted_with_its_chain_row_is_named(database: str) -> None:
    write_units(database, 6)

    def delete(position: int) -> None:
        sql(database, f"DELETE FROM {EVENTS} WHERE notification_id = {position}",
            f"DELETE FROM {CHAIN} WHERE notification_id = {position}")

    delete(4)
    assert problem(database) == ("deleted", 4)
    delete(3)  # a run of them: the chain names the one its next record follows
    assert problem(database) == ("deleted", 4)
    assert "any event between 2 and 4" in check(database)["problem"]["detail"]
    delete(1)  # the first record too: its successor still names it
    assert problem(database) == ("deleted", 1)


def test_swapped_positions_are_reported_as_reordered(database: str) -> None:
    write_units(database, 6)
    sql(database,
        f"UPDATE {EVENTS} SET notification_id = -1 WHERE notification_id = 2",
        f"UPDATE {EVENTS} SET notification_id = 2 WHERE notification_id = 5",
        f"UPDATE {EVENTS} SET notification_id = 5 WHERE notification_id = -1")
    assert problem(database) == ("reordered", 2)
    assert "chained at position 5" in check(database)["problem"]["detail"]


def test_swapped_states_and_topics_are_named_at_the_first_row(database: str) -> None:
    write_units(database, 6)
    swap = (f"UPDATE {EVENTS} e SET {{col}} = o.{{col}} FROM {EVENTS} o "
            "WHERE (e.notification_id, o.notification_id) IN ((3, 5), (5, 3))")
    sql(database, swap.format(col="state"))
    assert problem(database) == ("altered", 3)
    # The whole content swapped (originator, version, topic, state): the rows changed places.
    sql(database, swap.format(col="state"),  # back as it was, then the whole row's content
        f"UPDATE {EVENTS} SET notification_id = -notification_id WHERE notification_id IN (3, 5)",
        f"UPDATE {EVENTS} SET notification_id = 8 + notification_id WHERE notification_id IN (-3, -5)")
    assert problem(database) == ("reordered", 3)


def test_a_row_inserted_by_hand_is_unchained(database: str) -> None:
    write_units(database, 5)
    sql(database, f"INSERT INTO {EVENTS} (originator_id, originator_version, topic, state) "
                  f"SELECT '{uuid.uuid4()}', 1, topic, state FROM {EVENTS} WHERE notification_id = 2")
    kind, position = problem(database)
    assert kind == "unchained" and position > 5
    assert check(database)["records"] == 5


def test_a_forged_chain_hash_breaks_the_chain(database: str) -> None:
    write_units(database, 5)
    sql(database, f"UPDATE {CHAIN} SET chain_hash = sha256(chain_hash) WHERE notification_id = 3")
    assert problem(database) == ("broken", 3)


def test_concurrent_saves_make_one_valid_chain(database: str) -> None:
    apps = [goals_app(database), goals_app(database)]  # two pools, as two processes would have
    company = apps[0].create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                apps[n % 2].create_unit(name=f"Team {n}-{i}", kind=UnitKind.team, parent_id=company.id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        report = check(database)
        assert report["ok"], report
        assert report["records"] == 1 + 8 * 15
    finally:
        for app in apps:
            app.close()


def test_the_policys_process_recorder_extends_the_same_chain(database: str) -> None:
    """goals' KPI policy appends to the goals log through its process recorder."""
    write_units(database, 3)
    env = Environment("Goals", {**eventsourcing_env(database, "goals", pool_size=1, max_overflow=0),
                                "PROCESS_RECORDER_TOPIC": get_topic(AnnouncingProcessRecorder)})
    factory = InfrastructureFactory.construct(env)
    try:
        recorder = factory.process_recorder()
        aggregate = uuid.uuid4()
        recorder.insert_events([StoredEvent(aggregate, v, "tests:Policy.Moved", b'{"v": %d}' % v) for v in (1, 2)],
                               tracking=Tracking("Metrics", 1))
    finally:
        factory.close()
    write_units(database, 2)
    report = check(database)
    assert report["ok"] and report["records"] == 7, report


def test_a_log_older_than_its_chain_is_chained_once(database: str) -> None:
    write_units(database, 6)
    before = check(database)
    sql(database, f"DROP TABLE {CHAIN}")
    report = check(database)
    assert report["problem"]["kind"] == "unchained" and report["problem"]["position"] == 1
    app = goals_app(database)  # a recorder created over the old log chains it
    try:
        app.create_unit(name="After", kind=UnitKind.company, parent_id=None)
    finally:
        app.close()
    after = check(database)
    assert after["ok"] and after["records"] == 7, after
    # The chain depends on the log only: chained now, it is what it was up to 6.
    with psycopg.connect(database) as conn:
        row = conn.execute(f"SELECT chain_hash FROM {CHAIN} WHERE notification_id = 6").fetchone()
    assert bytes(row[0]).hex() == before["head_hash"]


def test_an_emptied_chain_is_not_refilled(database: str) -> None:
    """Only a chain table that did not exist is filled at start-up: rows missing from an existing
    chain stay missing, for the verifier to name."""
    write_units(database, 4)
    sql(database, f"DELETE FROM {CHAIN}")
    goals_app(database).close()
    assert problem(database) == ("unchained", 1)


def test_a_log_that_does_not_exist_yet_is_ok(database: str) -> None:
    report = verify_chain(database, "metrics", "metrics_events")
    assert report.ok and report.records == 0 and report.head_position is None
    assert chain_table_name("metrics_events") == "metrics_event_chain"


async def test_auditors_and_admins_check_the_chain_over_rest(database: str, auth: Callable[..., dict[str, str]]
                                                            ) -> None:
    write_units(database, 3)
    async for goals in serve_in_process(create_goals(GoalsSettings(DATABASE_URL=database))):
        body = await ok(goals, "GET", "/v1/audit/chain", **auth("auditor"))
        assert body["ok"] is True and body["log"] == "goals" and body["records"] == 3
        assert body["headPosition"] == 3 and len(body["headHash"]) == 64 and body["problem"] is None
        assert (await ok(goals, "GET", "/v1/audit/chain", **auth("admin")))["records"] == 3
        for role in ("member", "hr_sync", "service"):
            assert (await refused(goals, "GET", "/v1/audit/chain", None, 403, **auth(role)))["status"] == 403
        await refused(goals, "GET", "/v1/audit/chain", None, 401)
        sql(database, f"DELETE FROM {EVENTS} WHERE notification_id = 2")
        body = await ok(goals, "GET", "/v1/audit/chain", **auth("auditor"))
        assert body["ok"] is False and body["records"] == 1
        assert body["problem"]["kind"] == "deleted" and body["problem"]["position"] == 2
    app = create_metrics(MetricsSettings(DATABASE_URL=database, run_staleness_watch=False))
    async for metrics in serve_in_process(app):
        body = await ok(metrics, "GET", "/v1/audit/chain", **auth("auditor"))
        assert body == {"log": "metrics", "ok": True, "records": 0, "headPosition": None, "headHash": None,
                        "problem": None}
        await refused(metrics, "GET", "/v1/audit/chain", None, 403, **auth("member"))


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.audit", "verify", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, "DATABASE_URL": url})


def test_the_cli_passes_an_untouched_database_and_fails_a_tampered_one(database: str) -> None:
    write_units(database, 4)
    clean = run_cli(database)
    assert clean.returncode == 0, clean.stderr
    lines = clean.stdout.splitlines()
    assert lines[0].startswith("goals: ok, 4 records, head 4 ") and lines[1] == "metrics: ok, 0 records (empty log)"
    sql(database, f"UPDATE {EVENTS} SET state = state || ' '::bytea WHERE notification_id = 3")
    tampered = run_cli(database)
    assert tampered.returncode == 1, tampered.stdout
    assert "goals: ALTERED at position 3:" in tampered.stdout


def test_a_log_rewritten_and_chained_again_fails_against_the_head_kept_outside(database: str) -> None:
    """Whoever can write the tables can recompute the whole chain; the head an auditor kept from
    an earlier run is what catches that, and a log cut short."""
    write_units(database, 4)
    head = run_cli(database).stdout.splitlines()[0].split()[-1]
    kept = f"goals=4:{head}"
    assert run_cli(database, "--expect", kept).returncode == 0

    sql(database, f"UPDATE {EVENTS} SET state = state || ' '::bytea WHERE notification_id = 2")
    sql(database, "DROP TABLE goals.goals_event_chain")
    with psycopg.connect(database) as conn, conn.cursor() as curs:
        HashChain("goals", "goals_events").create(curs)  # the forger chains the altered log again
    assert run_cli(database).returncode == 0  # consistent in itself ...
    rewritten = run_cli(database, "--expect", kept)
    assert rewritten.returncode == 1  # ... but not the log that was kept
    assert "goals: BROKEN at position 4: the chain no longer passes through the kept head" in rewritten.stdout

    sql(database, f"DELETE FROM {EVENTS} WHERE notification_id = 4")
    sql(database, "DELETE FROM goals.goals_event_chain WHERE notification_id = 4")
    assert "no longer in the log" in run_cli(database, "--expect", kept).stdout
    bad = run_cli(database, "--expect", "goals=4:nothex")
    assert bad.returncode == 2 and "LOG=POSITION:HASH" in bad.stderr
