"""How a service's log is appended to: one plain transaction per save, without pipeline mode.

The library's PostgreSQL recorders send a save's statements (the hooks' statements, the table
lock, NOTIFY, the INSERT of every event) through psycopg's pipeline mode. A save of 10,000
events is one INSERT with a parameter of several megabytes, and in pipeline mode that send
hung for good now and then (the thread waiting in `pipeline.sync()`, the server waiting for
the rest of the message), the shape of psycopg issue #685. Sent the ordinary way, each
statement is written in full before its answer is read, so there is nothing to deadlock. The
statements, their order and the one transaction are the library's own; only the pipelining
is gone, at the cost of a few local round trips per save.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import InterfaceError, OperationalError


class UnpipelinedInsert(PostgresApplicationRecorder):
    """The application recorder with `insert_events` sent statement by statement; put it first
    among the bases of a recorder (`class R(UnpipelinedInsert, PostgresProcessRecorder)`)."""

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            # The hooks first (an idempotency key, a tracking position), as the library orders them.
            self._insert_events(curs, stored_events, **kwargs)
            if not stored_events:
                return None
            # Lock the log, NOTIFY, INSERT ... RETURNING notification_id: the last result on `curs`.
            self._insert_stored_events(curs, stored_events, **kwargs)
            return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
