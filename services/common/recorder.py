"""How a service's log is appended to: saves committed in groups, without pipeline mode.

Every save goes to the log's writer (`services.common.groupcommit`), which commits the saves
that arrive together in one transaction, each in a savepoint of its own, and answers each when
it is durable.

The library's PostgreSQL recorders send a save's statements (the hooks' statements, the table
lock, NOTIFY, the INSERT of every event) through psycopg's pipeline mode. A save of 10,000
events is one INSERT with a parameter of several megabytes, and in pipeline mode that send
hung for good now and then (the thread waiting in `pipeline.sync()`, the server waiting for
the rest of the message), the shape of psycopg issue #685. Sent the ordinary way, each
statement is written in full before its answer is read, so there is nothing to deadlock. The
statements and their order are the library's own; only the pipelining is gone, at the cost of
a few local round trips per save.

A batch of several saves is first tried the fast way (`_batch_statements`): the lock once, one
query for every save's taken versions, the hooks' statements for the whole batch
(`_claim_batch`, `_admit`, `_insert_events_batch`, `_after_insert_batch`: a recorder says
what its saves add, and may batch it), one NOTIFY, one INSERT of all the admitted saves'
events, one chain append. A few statements for the batch, each sent in full, still no pipeline
mode. Anything failing there unexpectedly sends the batch save by save (`_save_statements`).

It also keeps the log's hash chain (`services.common.hashchain`): after the INSERT, still under
the library's table lock and in the same transaction, one more statement chains the save's events
onto the head of `<schema>.<app>_event_chain`. The chain table is created with the log (and a
log older than its chain is chained once, then).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import Cursor, InterfaceError, OperationalError
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from services.common.groupcommit import GroupCommitter
from services.common.hashchain import HashChain
from services.common.telemetry import traced_append

log = logging.getLogger(__name__)


def binary_insert(recorder: Any) -> None:
    """Send a recorder's events as a binary parameter (`%b`, the composite's binary dumper)
    instead of text: the text dump escapes every state's bytes with a regular expression, four
    times as long for a save of 10,000 events or a snapshot of a KPI's series (bench/README.md,
    ingest). The same statement and the same rows. Other recorders (in-memory) are left alone."""
    if isinstance(recorder, PostgresAggregateRecorder):
        recorder.insert_events_statement = SQL(recorder.insert_events_statement.as_string().replace("%s", "%b"))


class BatchSave(Protocol):
    """One save of a batch, as the group commit hands it over (`groupcommit._Save`)."""

    stored_events: Sequence[StoredEvent]
    kwargs: dict[str, Any]
    result: Sequence[int] | None
    error: BaseException | None


class Refused(Exception):
    """Raised by `_admit`: the save fails alone with `error`, before any of its statements."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class UnpipelinedInsert(PostgresApplicationRecorder):
    """The application recorder with `insert_events` sent statement by statement; put it first
    among the bases of a recorder (`class R(UnpipelinedInsert, PostgresProcessRecorder)`).
    Every save also extends the log's hash chain, in its transaction."""

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        binary_insert(self)
        self.hash_chain = HashChain(self.datastore.schema, self.events_table_name,
                                    uuid_ids=self.datastore.originator_id_type == "uuid")
        self.check_identifier_length(self.hash_chain.table)

    def _create_table(self, curs: Cursor[DictRow]) -> None:
        self.hash_chain.serialise_creation(curs)
        super()._create_table(curs)
        chained = self.hash_chain.create(curs)
        if chained:
            log.warning("chained %d events of %s.%s that were recorded before its hash chain existed",
                        chained, self.datastore.schema, self.events_table_name)

    @traced_append  # an `append <log>` span, and the events counted per type once committed
    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Hand the save to the log's writer, which commits it together with the saves that
        arrive beside it (`services.common.groupcommit`); returns once it is durable."""
        return self.group_commit.submit(stored_events, kwargs)

    @cached_property
    def group_commit(self) -> GroupCommitter:
        return GroupCommitter(f"{self.datastore.schema}.{self.events_table_name}", self.datastore.get_connection,
                              self._save_statements, batch_statements=self._batch_statements,
                              begin=self._begin_batch, repair=self._give_back_ids,
                              max_batch=int(os.environ.get("TANDEM_GROUP_COMMIT_MAX_BATCH", "64")),
                              max_wait=float(os.environ.get("TANDEM_GROUP_COMMIT_MAX_WAIT_MS", "2")) / 1000)

    def _begin_batch(self, curs: Cursor[DictRow], saves: Sequence[BatchSave]) -> bool:
        """The log's lock, first in a batch that appends anything: held to its commit."""
        if not any(s.stored_events for s in saves):
            return False
        self._lock_table(curs)
        return True

    def _give_back_ids(self, curs: Cursor[DictRow]) -> None:
        """After a rolled-back INSERT, under the lock: the sequence back to the log's last id, so
        that the ids the INSERT drew (a sequence is not transactional) are handed out again and
        the log has no gap. Safe only under the lock: nobody else draws ids meanwhile."""
        curs.execute(SQL("SELECT setval(pg_get_serial_sequence(%s, 'notification_id'), "
                         "coalesce((SELECT max(notification_id) FROM {}.{}), 0) + 1, false)").format(
                             Identifier(self.datastore.schema), Identifier(self.events_table_name)),
                     (f'"{self.datastore.schema}"."{self.events_table_name}"',))

    def _refuse_taken_versions(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> None:
        """IntegrityError, as the INSERT would raise, if another save has taken one of these
        aggregate versions."""
        ids = [e.originator_id for e in stored_events]
        curs.execute(SQL("SELECT e.originator_id, e.originator_version FROM {}.{} e "
                         "JOIN unnest(%s::{}[], %s::bigint[]) AS n(id, version) "
                         "ON e.originator_id = n.id AND e.originator_version = n.version LIMIT 1").format(
                             Identifier(self.datastore.schema), Identifier(self.events_table_name),
                             SQL("uuid" if self.datastore.originator_id_type == "uuid" else "text")),
                     (ids, [e.originator_version for e in stored_events]))
        taken = curs.fetchone()
        if taken is not None:
            raise IntegrityError(f"version {taken['originator_version']} of {taken['originator_id']} "
                                 "is recorded already")

    def _save_statements(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                         kwargs: dict[str, Any]) -> Sequence[int] | None:
        """One save's statements, inside the batch's transaction."""
        # The hooks first (an idempotency key, a tracking position), as the library orders them
        # (after the log's lock, taken at the batch's start: a twin's key is only ever held by a
        # transaction that holds the lock, so waiting for it cannot deadlock).
        self._insert_events(curs, stored_events, **kwargs)
        if not stored_events:
            return None
        # The log is locked (from the batch's start, `_begin_batch`); a lost race is refused
        # before the INSERT, so that it takes no notification id: the log has no gaps.
        self._refuse_taken_versions(curs, stored_events)
        # NOTIFY, INSERT ... RETURNING notification_id: the last result on `curs`.
        self._insert_stored_events(curs, stored_events, **kwargs)
        ids = self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        # Still under the lock: the chain's order is the log's.
        self.hash_chain.append(curs, stored_events, ids or ())
        return ids

    # The fast way: a batch's statements, a few for all its saves.

    def _batch_statements(self, curs: Cursor[DictRow], saves: Sequence[BatchSave]) -> None:
        """The batch's statements, inside its transaction: sets each save's `result`, or its
        `error` when it fails alone (a lost race, a key taken); raises if anything else fails."""
        # Under the log's lock (`_begin_batch`): what the checks below see stays true to the commit.
        taken = self._taken_versions(curs, [e for s in saves for e in s.stored_events])
        self._claim_batch(curs, saves)
        # Each save in turn, as save by save: its hooks' refusals first, then a version taken,
        # in the log or by a save admitted before it in this batch.
        admitted: list[BatchSave] = []
        for save in saves:
            try:
                self._admit(save, admitted)
            except Refused as refused:
                save.error = refused.error
                continue
            versions = {(str(e.originator_id), e.originator_version) for e in save.stored_events}
            lost = versions & taken
            if lost:
                originator_id, version = min(lost)
                save.error = IntegrityError(f"version {version} of {originator_id} is recorded already")
                continue
            taken |= versions
            admitted.append(save)
        self._insert_events_batch(curs, admitted)
        events = [e for s in admitted for e in s.stored_events]
        ids: list[int] = []
        if events:
            self._notify_channel(curs)
            self._insert_stored_events_only(curs, events)
            # One INSERT ... SELECT FROM unnest: the ids are handed out in the order of its rows.
            ids = sorted(self._fetch_ids_after_insert(curs, events))
            self.hash_chain.append(curs, events, ids)
        start = 0
        for save in admitted:
            count = len(save.stored_events)
            save.result = ids[start:start + count] if count else None
            start += count
        self._after_insert_batch(curs, admitted)

    def _taken_versions(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> set[tuple[str, int]]:
        """Which of these (originator id, version) pairs the log has already."""
        if not stored_events:
            return set()
        curs.execute(SQL("SELECT e.originator_id, e.originator_version FROM {}.{} e "
                         "JOIN unnest(%s::{}[], %s::bigint[]) AS n(id, version) "
                         "ON e.originator_id = n.id AND e.originator_version = n.version").format(
                             Identifier(self.datastore.schema), Identifier(self.events_table_name),
                             SQL("uuid" if self.datastore.originator_id_type == "uuid" else "text")),
                     ([e.originator_id for e in stored_events], [e.originator_version for e in stored_events]))
        return {(str(row["originator_id"]), row["originator_version"]) for row in curs.fetchall()}

    def _insert_stored_events_only(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> None:
        # The library's INSERT (the application recorder's own adds the lock and NOTIFY, sent once here).
        PostgresAggregateRecorder._insert_stored_events(self, curs, stored_events)

    def _fetch_ids_after_insert(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> list[int]:
        ids = list(PostgresApplicationRecorder._fetch_ids_after_insert_events(self, curs, stored_events) or ())
        if len(ids) != len(stored_events):
            raise RuntimeError(f"{len(stored_events)} events inserted, {len(ids)} ids returned")
        return ids

    # The hooks of the fast way. By default a save adds what `_insert_events` adds, one save at
    # a time; a recorder overrides them to batch its own.

    def _claim_batch(self, curs: Cursor[DictRow], saves: Sequence[BatchSave]) -> None:
        """Statements for the whole batch before any save is admitted (under the lock)."""

    def _admit(self, save: BatchSave, admitted: Sequence[BatchSave]) -> None:
        """Raise `Refused` if this save fails alone (checked before its versions are)."""

    def _insert_events_batch(self, curs: Cursor[DictRow], admitted: Sequence[BatchSave]) -> None:
        """The admitted saves' hook statements, before their events."""
        for save in admitted:
            self._insert_events(curs, save.stored_events, **save.kwargs)

    def _after_insert_batch(self, curs: Cursor[DictRow], admitted: Sequence[BatchSave]) -> None:
        """After the events and their chain links; each admitted save has its `result`."""
