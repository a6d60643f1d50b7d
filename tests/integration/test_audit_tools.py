"""`make rebuild`, `make export` and `make import` against real PostgreSQL: a rebuilt read model
has the live one's checksum (and a damaged live one is named and repaired); an export imported
into an empty installation reproduces every read model's checksum and every log's chain; an
import into a used installation, or of an altered file, is refused and writes nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from services.audit import read_model_sources
from services.audit.rebuild import rebuild_all
from services.audit.transfer import ImportRefused, build_read_models, export, import_file
from services.common.database import ensure_schema, eventsourcing_env
from services.common.hashchain import verify_chain
from services.common.replay import live_checksum, replay
from services.goals.application import Goals
from services.goals.domain import KeyResultKind, OwnerKind, UnitKind
from services.metrics.application import Metrics
from tests.conftest import fresh_database


def populate(url: str) -> None:
    """A small organisation with some history in both logs, and its read models caught up."""
    for schema in ("goals", "metrics"):
        ensure_schema(url, schema)
    goals = Goals(env=eventsourcing_env(url, "goals"))
    metrics = Metrics(env=eventsourcing_env(url, "metrics"))
    try:
        company = goals.create_unit(name="Acme", kind=UnitKind.company, parent_id=None).id
        support = goals.create_unit(name="Support", kind=UnitKind.department, parent_id=company).id
        person = goals.join_person(name="Ada", email="ada@example.com", unit_id=support, manager_id=None,
                                   joined_on=date(2026, 1, 5)).id
        cycle = goals.create_cycle(name="Q4", starts_on=date(2026, 10, 1), ends_on=date(2026, 12, 31),
                                   activate=True).id
        top = goals.create_objective(title="Customers love us", description="", owner_kind=OwnerKind.unit,
                                     owner_id=company, unit_id=company, cycle_id=cycle, parent_id=None).id
        mine = goals.create_objective(title="Deliver exceptional support — «fast»", description="",
                                      owner_kind=OwnerKind.person, owner_id=person, unit_id=support,
                                      cycle_id=cycle, parent_id=top).id
        kr = goals.add_key_result(objective_id=mine, title="Response time 8 h -> 3 h",
                                  kind=KeyResultKind.decrease_to, start=8, target=3, low=None, high=None,
                                  milestones=[], unit="h", weight=1, owner_id=person).id
        for day, value in ((1, 7.5), (8, 6.0), (15, 5.5)):
            goals.check_in(kr, value=value, confidence=6, note=f"week {day}", valid_on=date(2026, 11, day),
                           expected_version=None)
        kpi = metrics.define_kpi(name="CSAT", unit="%", direction="higher_is_better", cadence="weekly",
                                 rules=[{"id": "floor", "kind": "below", "threshold": 90, "severity": "critical"}],
                                 unit_id=support).id
        start = datetime(2026, 11, 1, tzinfo=UTC)
        for n, value in enumerate((95, 88, 86, 93)):
            metrics.record_measurement(kpi, value=value, measured_at=start + timedelta(days=n), source="survey")
    finally:
        goals.close()
        metrics.close()
    for source in read_model_sources():
        replay(source, url, source.schema)


@pytest.fixture(scope="module")
def installation() -> Iterator[str]:
    with fresh_database() as url:
        populate(url)
        yield url


def checksums(url: str) -> dict[str, tuple[str, dict[str, int]]]:
    return {s.label: (c.digest, c.positions) for s in read_model_sources() if (c := live_checksum(url, s))}


def test_a_rebuild_matches_the_live_read_models_and_repairs_a_damaged_one(installation: str) -> None:
    before = checksums(installation)
    out = io.StringIO()
    assert rebuild_all(installation, out=out), out.getvalue()
    assert out.getvalue().count("match") == len(before) and "events/s" in out.getvalue()
    assert checksums(installation) == before

    with psycopg.connect(installation) as conn:
        conn.execute("UPDATE goals.key_results SET title = 'tampered'")
    out = io.StringIO()
    assert not rebuild_all(installation, check_only=True, out=out)
    assert "goals.goals_view" in out.getvalue() and "MISMATCH" in out.getvalue()
    assert "key_results" in out.getvalue()

    out = io.StringIO()
    rebuild_all(installation, out=out)  # reports the mismatch, then puts the rebuilt tables in
    assert "replaced" in out.getvalue()
    assert checksums(installation) == before
    with psycopg.connect(installation) as conn:
        assert conn.execute("SELECT title FROM goals.key_results").fetchone()[0] == "Response time 8 h -> 3 h"


def test_read_models_rebuilt_side_by_side_in_processes_match_and_repair(installation: str) -> None:
    before = checksums(installation)
    with psycopg.connect(installation) as conn:
        conn.execute("UPDATE goals.key_results SET title = 'tampered'")
    out = io.StringIO()
    assert not rebuild_all(installation, out=out, processes=2)  # the mismatch reported, then repaired
    assert "MISMATCH" in out.getvalue() and "replaced" in out.getvalue()
    assert out.getvalue().count("events/s") == len(before)
    assert checksums(installation) == before
    out = io.StringIO()
    assert rebuild_all(installation, check_only=True, out=out, processes=2), out.getvalue()
    with psycopg.connect(installation) as conn:  # no scratch schema left behind
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE '%%_rebuild%%'").fetchone()[0] == 0


def test_an_export_imported_into_an_empty_installation_reproduces_it(installation: str) -> None:
    exported = io.StringIO()
    header = export(installation, exported)
    lines = exported.getvalue().splitlines()
    assert header["logs"]["goals"]["events"] + header["logs"]["metrics"]["events"] == len(lines) - 1
    first = json.loads(lines[1])
    assert {"log", "position", "originatorId", "originatorVersion", "topic", "schemaVersion"} <= first.keys()
    assert "state" in first and "meta" in first["state"]

    with fresh_database() as empty:
        counts = import_file(empty, io.StringIO(exported.getvalue()))
        assert counts == {name: log["events"] for name, log in header["logs"].items()}
        build_read_models(empty, io.StringIO())
        assert checksums(empty) == checksums(installation)
        for name, schema, table in (("goals", "goals", "goals_events"), ("metrics", "metrics", "metrics_events")):
            report = verify_chain(empty, schema, table, log=name)
            assert report.ok and report.head_hash == header["logs"][name]["chainHead"]

        # Into an installation that has events already: refused, nothing written.
        with pytest.raises(ImportRefused, match="not empty"):
            import_file(empty, io.StringIO(exported.getvalue()))


def test_an_altered_export_is_refused_and_writes_nothing(installation: str) -> None:
    exported = io.StringIO()
    export(installation, exported)
    lines = exported.getvalue().splitlines()
    record = json.loads(lines[-1])
    record["state"]["value"] = 99.0  # a measurement, quietly improved
    lines[-1] = json.dumps(record)
    with fresh_database() as empty:
        with pytest.raises(ImportRefused, match="altered"):
            import_file(empty, io.StringIO("\n".join(lines) + "\n"))
        with psycopg.connect(empty) as conn:
            assert conn.execute("SELECT count(*) FROM metrics.metrics_events").fetchone()[0] == 0
        with pytest.raises(ImportRefused, match="format"):
            import_file(empty, io.StringIO('{"format": "something else"}\n'))


def test_the_commands_run_as_make_runs_them(installation: str, tmp_path) -> None:  # noqa: ANN001
    env = {**os.environ, "DATABASE_URL": installation}
    run = subprocess.run([sys.executable, "-m", "services.audit", "rebuild", "--check-only"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "events/s" in run.stdout
    target = tmp_path / "export.jsonl"
    run = subprocess.run([sys.executable, "-m", "services.audit", "export", "--out", str(target)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert target.read_text().count("\n") > 10
    run = subprocess.run([sys.executable, "-m", "services.audit", "import", str(target)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "not empty" in run.stderr
