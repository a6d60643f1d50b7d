"""Group commit: concurrent saves to one log gathered into one transaction.

The library's recorder locks the log's table for each save (so notification ids are handed out
in commit order), which serialises saves: one commit, one fsync, one lock hand-over per save,
about 500 saves a second whatever the concurrency (DESIGN.md, "Write throughput"). Here every
save of a recorder goes through one writer thread. The writer takes the saves that queued
while the previous transaction committed (up to `max_batch`; when saves are arriving
concurrently it also waits up to `max_wait` seconds for more) and runs them in ONE transaction:
a batch of several saves goes the fast way when its recorder has one (`batch_statements`:
the lock once, one version check for all its saves, their hooks, one INSERT of all their
events, one chain append: a few statements for the batch, not five or six per save), in which
a save that loses a race or finds its idempotency key taken fails alone, refused before the
INSERT. Anything else going wrong there (a bad event, say) rolls it back to a savepoint (the
lock stays held; the notification ids its INSERT drew are given back, `repair`) and the batch
runs again the careful way: each save's statements (its hooks: an
idempotency key, a tracking position; its events; its links of the hash chain) inside a
savepoint of its own, so that a save that fails (a version conflict, an idempotency key taken,
a bad event) rolls back to its savepoint and fails alone; the others commit. Each caller is
answered when the transaction that holds its save has committed, so nothing is acknowledged
before it is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from eventsourcing import persistence
from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger(__name__)

SaveStatements = Callable[[Any, Sequence[Any], dict[str, Any]], Sequence[int] | None]
"""Runs one save's statements on a cursor inside the batch's transaction; returns its ids."""

BatchStatements = Callable[[Any, Sequence[Any]], None]
"""Runs a whole batch's statements on a cursor inside its transaction, setting each save's
`result`, or its `error` when it fails alone (a lost race, a key taken: refused before any of
its statements went wrong); raises when anything else fails, and the batch runs save by save."""

# A connection lost or a commit whose outcome is unknown: not the fast path's to retry save by
# save (the callers' own retry decides); every save of the batch fails with it.
_NOT_RETRIED = (psycopg.OperationalError, psycopg.InterfaceError,
                persistence.OperationalError, persistence.InterfaceError)


# How the library's datastore turns psycopg's errors into its own (its `get_connection`), which a
# save's error inside the batch's transaction never leaves: the callers catch the library's.
_LIBRARY_ERRORS: tuple[tuple[type[Exception], type[Exception]], ...] = (
    (psycopg.InterfaceError, persistence.InterfaceError),
    (psycopg.OperationalError, persistence.OperationalError),
    (psycopg.DataError, persistence.DataError),
    (psycopg.IntegrityError, persistence.IntegrityError),
    (psycopg.InternalError, persistence.InternalError),
    (psycopg.ProgrammingError, persistence.ProgrammingError),
    (psycopg.NotSupportedError, persistence.NotSupportedError),
    (psycopg.DatabaseError, persistence.DatabaseError),
    (psycopg.Error, persistence.PersistenceError),
)


def library_error(error: Exception) -> Exception:
    for theirs, ours in _LIBRARY_ERRORS:
        if isinstance(error, theirs):
            translated = ours(str(error))
            translated.__cause__ = error
            return translated
    return error


@dataclass
class _Save:
    stored_events: Sequence[Any]
    kwargs: dict[str, Any]
    context: otel_context.Context = field(default_factory=otel_context.get_current)
    done: threading.Event = field(default_factory=threading.Event)
    result: Sequence[int] | None = None
    error: BaseException | None = None


class GroupCommitter:
    """The writer of one log: `submit` blocks until the save is committed (or has failed)."""

    def __init__(self, name: str, get_connection: Callable[[], Any], statements: SaveStatements, *,
                 batch_statements: BatchStatements | None = None,
                 begin: Callable[[Any, Sequence[_Save]], bool] | None = None,
                 repair: Callable[[Any], None] | None = None,
                 max_batch: int = 64, max_wait: float = 0.002):
        self.name = name
        self.get_connection = get_connection
        self.statements = statements
        self.batch_statements = batch_statements
        self.begin = begin
        """Run first in a batch's transaction (the log's lock); True if it locked the log."""
        self.repair = repair
        """Run, under the lock, after a savepoint was rolled back (the fast way's or a save's)."""
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue[_Save | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._concurrent = False
        self.batches = 0
        self.saves = 0
        self.fast_batches = 0
        """Batches committed the fast way (`batch_statements`)."""
        self.fallbacks = 0
        """Batches whose fast way failed and that ran again save by save."""

    def submit(self, stored_events: Sequence[Any], kwargs: dict[str, Any]) -> Sequence[int] | None:
        if self._closed:
            raise RuntimeError(f"the writer of {self.name} is closed")
        self._start()
        save = _Save(stored_events, kwargs)
        self._queue.put(save)
        save.done.wait()
        if save.error is not None:
            raise save.error
        return save.result

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(10)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"group-commit-{self.name}", daemon=True)
                    self._thread.start()

    def _gather(self, first: _Save) -> tuple[list[_Save], bool]:
        """The first save and whatever queued behind it; True as second item when closing."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait if self._concurrent else 0.0
        while len(batch) < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                break
            batch, closing = self._gather(first)
            self._concurrent = len(batch) > 1 or not self._queue.empty()
            self._commit(batch)
        # Answer anything still queued behind the close.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.error = RuntimeError(f"the writer of {self.name} closed")
                item.done.set()

    def _commit(self, batch: list[_Save]) -> None:
        # One save: its statements are children of its caller's span. Several: one span for
        # the batch, linked to each caller's.
        parent = batch[0].context if len(batch) == 1 else otel_context.Context()
        links = [] if len(batch) == 1 else [
            trace.Link(c) for s in batch if (c := trace.get_current_span(s.context).get_span_context()).is_valid]
        token = otel_context.attach(parent)
        try:
            with trace.get_tracer(__name__).start_as_current_span(
                    f"commit {self.name}", links=links,
                    attributes={"tandem.saves": len(batch), "db.system": "postgresql"}):
                self._run_batch(batch)
        except BaseException as e:  # noqa: BLE001 - the commit failed: every save in it failed
            for save in batch:
                if save.error is None:
                    save.error = e
        finally:
            otel_context.detach(token)
            self.batches += 1
            self.saves += len(batch)
            for save in batch:
                save.done.set()

    def _run_batch(self, batch: list[_Save]) -> None:
        with self.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            # The log's lock, for the whole transaction (`begin`): what fails below is rolled
            # back under it, and `repair` undoes what a failed statement left outside the
            # transaction (the notification ids its INSERT drew), so the log keeps no gap.
            locked = self.begin(curs, batch) if self.begin is not None else False
            if self.batch_statements is not None and len(batch) > 1:
                try:
                    with conn.transaction():  # a savepoint: the fast way, undone if it goes wrong
                        self.batch_statements(curs, batch)
                except _NOT_RETRIED:
                    raise
                except Exception as e:  # noqa: BLE001 - a bad save, say: save by save, it fails alone
                    log.info("the fast commit of %d saves to %s failed (%s: %s); committing them one by one",
                             len(batch), self.name, type(e).__name__, e)
                    for save in batch:
                        save.result, save.error = None, None
                    self.fallbacks += 1
                    self._repair(curs, locked)
                else:
                    self.fast_batches += 1
                    return
            for save in batch:
                try:
                    with conn.transaction():  # a savepoint: this save fails alone
                        save.result = self.statements(curs, save.stored_events, save.kwargs)
                except Exception as e:  # noqa: BLE001 - answered to its own caller
                    save.error = library_error(e)
                    self._repair(curs, locked)
        # Committed: the results stand (the `finally` in _commit answers the callers).

    def _repair(self, curs: Any, locked: bool) -> None:
        if locked and self.repair is not None:
            self.repair(curs)
