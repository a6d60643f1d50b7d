"""Group commit on real PostgreSQL: concurrent saves share transactions, a bad save in a batch
fails alone while the rest of its batch commits, and the log and its hash chain stay whole. A
batch goes the fast way (a few statements for all its saves) unless something unexpected fails
in it; then it runs again save by save."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from services.common.database import ensure_schema, eventsourcing_env
from services.common.hashchain import verify_chain
from services.common.idempotency import IdempotencyClaim, KeyTaken
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


def hold_batch(committer: Any, size: int) -> None:
    """Hold the writer's next batch open until `size` saves are in it."""
    committer.max_batch, committer.max_wait, committer._concurrent = size, 30.0, True


class StatementCounter:
    """Counts the statements the log's writer thread sends (`Cursor.execute`, `Cursor.copy`,
    and the transaction's BEGIN/COMMIT/ROLLBACK and savepoints, which psycopg sends itself)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        self.sql: list[str] = []
        for cls, name in ((psycopg.Cursor, "execute"), (psycopg.Cursor, "copy"),
                          (psycopg.Connection, "_exec_command")):
            monkeypatch.setattr(cls, name, self._counting(getattr(cls, name)))

    def _counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(obj: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name.startswith("group-commit-"):
                self.count += 1
                self.sql.append(repr(query)[:60])
            return method(obj, query, *args, **kwargs)
        return counted


def test_a_batch_goes_the_fast_way_in_a_few_statements(goals: tuple[Goals, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """30 saves, among them a lost race, a key taken before, a twin of a key in the batch and two
    saves of one aggregate version: those fail alone, refused before the INSERT; the others
    commit, at contiguous positions, in fewer than 15 statements for the whole batch."""
    app, url = goals
    taken = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
    [existing] = app.recorder.select_events(taken.id)
    subject = "tester"
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO goals.idempotency_keys (subject, key, request_hash, aggregate_id, "
                     "aggregate_version, position) VALUES (%s, 'used', 'h', %s, 1, 1)", (subject, taken.id))
    committer = app.recorder.group_commit  # type: ignore[attr-defined]
    hold_batch(committer, 30)
    fast, fallbacks = committer.fast_batches, committer.fallbacks
    shared = uuid.uuid4()  # saves 5 and 6 both write its version 1

    def fresh(originator_id: uuid.UUID | None = None) -> StoredEvent:
        return StoredEvent(originator_id=originator_id or uuid.uuid4(), originator_version=1,
                           topic=existing.topic, state=existing.state)

    def keyed(event: StoredEvent, key: str) -> dict[str, Any]:
        return {"idempotency": (IdempotencyClaim(subject, key, f"hash {key}"), event.originator_id, 1)}

    events = [fresh(shared) if i in (5, 6) else existing if i == 1 else fresh() for i in range(30)]
    kwargs: list[dict[str, Any]] = [{} for _ in range(30)]
    kwargs[2] = keyed(events[2], "used")  # taken by an earlier request
    kwargs[3] = keyed(events[3], "twin")
    kwargs[4] = keyed(events[4], "twin")  # the same key again, later in the batch
    for i in range(7, 30, 2):
        kwargs[i] = keyed(events[i], f"key {i}")
    counter = StatementCounter(monkeypatch)
    results = in_threads(30, lambda i: app.recorder.insert_events([events[i]], **kwargs[i]))
    monkeypatch.undo()

    assert (committer.fast_batches, committer.fallbacks) == (fast + 1, fallbacks)
    assert isinstance(results[1], IntegrityError)  # a lost race
    assert isinstance(results[2], KeyTaken)
    # The twins and the two saves of one version (the batch is in arrival order): one of each pair.
    twin, other_twin = (3, 4) if isinstance(results[4], KeyTaken) else (4, 3)
    assert isinstance(results[other_twin], KeyTaken) and isinstance(results[twin], list)
    loser = 6 if isinstance(results[6], IntegrityError) else 5
    assert isinstance(results[loser], IntegrityError) and isinstance(results[11 - loser], list)
    good = [i for i in range(30) if i not in (1, 2, other_twin, loser)]
    assert all(isinstance(results[i], list) and len(results[i]) == 1 for i in good), results
    assert sorted(results[i][0] for i in good) == list(range(2, 2 + len(good)))  # contiguous
    print(f"{counter.count} statements for a batch of 30 saves:", *counter.sql, sep="\n  ")
    assert counter.count < 15, counter.sql
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*), max(notification_id) FROM goals.goals_events").fetchone() == \
            (1 + len(good), 1 + len(good))
        keys = dict(conn.execute("SELECT key, position FROM goals.idempotency_keys").fetchall())
        twin_row = conn.execute("SELECT aggregate_id FROM goals.idempotency_keys WHERE key = 'twin'").fetchone()
    assert keys == {"used": 1, "twin": results[twin][0], **{f"key {i}": results[i][0] for i in range(7, 30, 2)}}
    assert twin_row == (events[twin].originator_id,)  # the key holds the answer of the save that had it
    assert verify_chain(url, "goals", "goals_events", log="goals").ok
    answer = app.recorder.stored_answer(subject, "key 9")  # type: ignore[attr-defined]
    assert answer is not None and answer.position == results[9][0] and answer.request_hash == "hash key 9"


def test_a_bad_event_sends_its_batch_save_by_save_and_fails_alone(goals: tuple[Goals, str]) -> None:
    """A batch with a bad event (its state breaks a constraint), a lost race, a key taken and
    good saves: the fast way fails, the batch runs again save by save, only the bad ones fail,
    and the good ones commit at contiguous positions with their chain links."""
    app, url = goals
    taken = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None)
    [existing] = app.recorder.select_events(taken.id)
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE goals.goals_events ADD CONSTRAINT no_poison CHECK (state <> 'poison'::bytea)")
        conn.execute("INSERT INTO goals.idempotency_keys (subject, key, request_hash, aggregate_id, "
                     "aggregate_version, position) VALUES ('tester', 'used', 'h', %s, 1, 1)", (taken.id,))
    committer = app.recorder.group_commit  # type: ignore[attr-defined]
    hold_batch(committer, 8)
    fast, fallbacks = committer.fast_batches, committer.fallbacks

    def save(i: int) -> Any:
        if i == 1:
            return app.recorder.insert_events([existing])  # a lost race
        event = StoredEvent(originator_id=uuid.uuid4(), originator_version=1, topic=existing.topic,
                            state=b"poison" if i == 3 else existing.state)
        kwargs = {"idempotency": (IdempotencyClaim("tester", "used" if i == 5 else f"k{i}", "h"),
                                  event.originator_id, 1)} if i % 2 else {}
        return app.recorder.insert_events([event], **kwargs)

    results = in_threads(8, save)
    assert (committer.fast_batches, committer.fallbacks) == (fast, fallbacks + 1)
    assert isinstance(results[1], IntegrityError)
    assert isinstance(results[3], IntegrityError)  # the constraint: it fails alone
    assert isinstance(results[5], KeyTaken)
    good = [0, 2, 4, 6, 7]
    assert sorted(results[i][0] for i in good) == [2, 3, 4, 5, 6], results
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*), max(notification_id) FROM goals.goals_events").fetchone() == (6, 6)
        keys = dict(conn.execute("SELECT key, position FROM goals.idempotency_keys").fetchall())
    assert keys == {"used": 1, "k7": results[7][0]}
    assert verify_chain(url, "goals", "goals_events", log="goals").ok
