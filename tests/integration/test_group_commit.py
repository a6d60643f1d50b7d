"""Group commit on real PostgreSQL: concurrent saves share transactions, a bad save in a batch
fails alone while the rest of its batch commits, and the log and its hash chain stay whole."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from services.common.database import ensure_schema, eventsourcing_env
from services.common.hashchain import verify_chain
from services.goals.application import Goals
from services.goals.domain import UnitKind
from tests.conftest import fresh_database


@pytest.fixture
def goals() -> Iterator[tuple[Goals, str]]:
    with fresh_database() as url:
        ensure_schema(url, "goals")
        app = Goals(env=eventsourcing_env(url, "goals", pool_size=4, max_overflow=4))
        try:
            yield app, url
        finally:
            app.close()


def in_threads(count: int, work: Any) -> list[Any]:
    """Run `work(i)` in `count` threads released together; their results or errors, in order."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - the test looks at each outcome
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_saves_share_transactions_and_all_land(goals: tuple[Goals, str]) -> None:
    app, url = goals
    committer = app.recorder.group_commit  # type: ignore[attr-defined]
    results = in_threads(32, lambda i: app.create_unit(name=f"Unit {i}", kind=UnitKind.company, parent_id=None))
    assert not [r for r in results if isinstance(r, Exception)]
    positions = sorted(r.position for r in results)
    assert positions == list(range(1, 33))  # every save acknowledged at its own position, no gaps
    assert committer.saves == 32 and committer.batches < committer.saves  # some were committed together
    report = verify_chain(url, "goals", "goals_events", log="goals")
    assert report.ok and report.records == 32


def test_a_conflicting_save_fails_alone_and_the_rest_of_its_batch_commits(goals: tuple[Goals, str]) -> None:
    app, url = goals
    taken = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
    [existing] = app.recorder.select_events(taken.id)
    committer = app.recorder.group_commit  # type: ignore[attr-defined]
    # Hold the batch open until all three saves are in it.
    committer.max_batch, committer.max_wait, committer._concurrent = 3, 30.0, True
    before = committer.batches

    def save(i: int) -> Any:
        if i == 1:  # version 1 of an aggregate that has it already: a lost race
            return app.recorder.insert_events([existing])
        fresh = StoredEvent(originator_id=uuid.uuid4(), originator_version=1, topic=existing.topic,
                            state=existing.state)
        return app.recorder.insert_events([fresh])

    results = in_threads(3, save)
    assert committer.batches == before + 1  # one transaction for the three
    assert isinstance(results[1], IntegrityError)
    assert all(isinstance(results[i], list | tuple) and len(results[i]) == 1 for i in (0, 2)), results
    with psycopg.connect(url) as conn:
        # The lost race took no notification id: the log has no gap.
        assert conn.execute("SELECT count(*), max(notification_id) FROM goals.goals_events").fetchone() == (3, 3)
    assert verify_chain(url, "goals", "goals_events", log="goals").ok


def test_a_single_writer_is_not_held_back(goals: tuple[Goals, str]) -> None:
    """Alone, a save is committed by itself at once: the wait for company is only taken while
    saves are arriving concurrently."""
    app, _ = goals
    committer = app.recorder.group_commit  # type: ignore[attr-defined]
    for i in range(5):
        app.create_unit(name=f"Alone {i}", kind=UnitKind.company, parent_id=None)
    assert (committer.saves, committer.batches) == (5, 5)
    assert committer._concurrent is False
