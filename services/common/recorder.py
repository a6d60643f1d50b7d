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
from typing import Any

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import Cursor, InterfaceError, OperationalError
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from services.common.groupcommit import GroupCommitter
from services.common.hashchain import HashChain
from services.common.telemetry import traced_append

log = logging.getLogger(__name__)


class UnpipelinedInsert(PostgresApplicationRecorder):
    """The application recorder with `insert_events` sent statement by statement; put it first
    among the bases of a recorder (`class R(UnpipelinedInsert, PostgresProcessRecorder)`).
    Every save also extends the log's hash chain, in its transaction."""

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
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
                              self._save_statements,
                              max_batch=int(os.environ.get("TANDEM_GROUP_COMMIT_MAX_BATCH", "64")),
                              max_wait=float(os.environ.get("TANDEM_GROUP_COMMIT_MAX_WAIT_MS", "2")) / 1000)

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
        # The hooks first (an idempotency key, a tracking position), as the library orders them.
        self._insert_events(curs, stored_events, **kwargs)
        if not stored_events:
            return None
        # Lock the log (held from the batch's first save on); a lost race is refused before the
        # INSERT, so that it takes no notification id: the log has no gaps.
        self._lock_table(curs)
        self._refuse_taken_versions(curs, stored_events)
        # NOTIFY, INSERT ... RETURNING notification_id: the last result on `curs`.
        self._insert_stored_events(curs, stored_events, **kwargs)
        ids = self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        # Still under the lock: the chain's order is the log's.
        self.hash_chain.append(curs, stored_events, ids or ())
        return ids
