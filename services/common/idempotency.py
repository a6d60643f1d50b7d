"""Idempotency-Key on every POST: a retried request appends nothing new.

The key is recorded in the same transaction as the events of the write it names, by the
application's recorder (`IdempotentRecorder`, the library's PostgreSQL recorder with one more
statement before the events are inserted). So a key is stored exactly when its events are, and
a retry either finds the key (and gets the first answer again) or runs first. Two copies of a
request racing each other: the second blocks on the first's uncommitted key, then finds it
taken, rolls back its own events and answers as the first did.

A key belongs to one caller (the token's subject) and one request: the same key with another
body is refused (422), as the IETF Idempotency-Key draft recommends.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eventsourcing.persistence import StoredEvent
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from services.common.recorder import BatchSave, Refused, UnpipelinedInsert

TABLE = "idempotency_keys"


@dataclass
class IdempotencyClaim:
    """A request's claim on a key, carried to the recorder through the command's context."""

    subject: str
    key: str
    request_hash: str
    used: bool = False


@dataclass(frozen=True)
class StoredAnswer:
    """What the first request with a key wrote (its answer is rebuilt from this)."""

    request_hash: str
    aggregate_id: uuid.UUID
    version: int
    position: int


class KeyTaken(Exception):
    """Another request with the same key committed first; this one's events were rolled back."""


class KeyReused(Exception):
    """The key was used before for a different request."""


_claim: contextvars.ContextVar[IdempotencyClaim | None] = contextvars.ContextVar("tandem_idempotency", default=None)


def current_claim() -> IdempotencyClaim | None:
    return _claim.get()


def set_claim(claim: IdempotencyClaim | None) -> contextvars.Token[IdempotencyClaim | None]:
    return _claim.set(claim)


def reset_claim(token: contextvars.Token[IdempotencyClaim | None]) -> None:
    _claim.reset(token)


def request_hash(method: str, path: str, body: bytes) -> str:
    """The request's fingerprint: method, path and the body's JSON, whitespace and key order aside."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")) if body else ""
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


class IdempotentRecorder(UnpipelinedInsert):
    """The library's application recorder, plus the idempotency key table of the schema."""

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.keys_table = SQL("{}.{}").format(Identifier(self.datastore.schema), Identifier(TABLE))
        self.sql_create_statements.append(SQL(
            "CREATE TABLE IF NOT EXISTS {} (subject text NOT NULL, key text NOT NULL, "
            "request_hash text NOT NULL, aggregate_id uuid NOT NULL, aggregate_version bigint NOT NULL, "
            "recorded_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (subject, key))").format(self.keys_table))
        # The write's last log position: a write of several aggregates (carry-over, a cycle
        # closing) ends after its first aggregate's events.
        self.sql_create_statements.append(SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS position bigint").format(self.keys_table))

    def _insert_events(self, curs: Cursor[DictRow], stored_events: list[StoredEvent], **kwargs: Any) -> None:
        record = kwargs.get("idempotency")
        if record is not None:
            claim, aggregate_id, version = record
            curs.execute(SQL(
                "INSERT INTO {} (subject, key, request_hash, aggregate_id, aggregate_version) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1").format(self.keys_table),
                (claim.subject, claim.key, claim.request_hash, aggregate_id, version))
            if curs.fetchone() is None:
                raise KeyTaken(claim.key)
        super()._insert_events(curs, stored_events, **kwargs)

    def _fetch_ids_after_insert_events(self, curs: Cursor[DictRow], stored_events: Any, **kwargs: Any) -> Any:
        ids = super()._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        record = kwargs.get("idempotency")
        if record is not None and ids:
            claim = record[0]
            curs.execute(SQL("UPDATE {} SET position = %s WHERE subject = %s AND key = %s").format(self.keys_table),
                         (max(ids), claim.subject, claim.key))
        return ids

    # The fast way of a batch (`UnpipelinedInsert._batch_statements`): its keys in one INSERT,
    # their positions in one UPDATE.

    def _claim_batch(self, curs: Cursor[DictRow], saves: Sequence[BatchSave]) -> None:
        """Insert every key of the batch at once (a key twice in it, once); note the keys found
        taken by another transaction. A key stays only if a save admitted holds it (see
        `_after_insert_batch`)."""
        super()._claim_batch(curs, saves)
        self._batch_taken: set[tuple[str, str]] = set()
        self._batch_inserted: set[tuple[str, str]] = set()
        rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        for save in saves:
            record = save.kwargs.get("idempotency")
            if record is not None:
                claim, aggregate_id, version = record
                rows.setdefault((claim.subject, claim.key), (claim.request_hash, aggregate_id, version))
        if not rows:
            return
        keys = list(rows)
        curs.execute(SQL(
            "INSERT INTO {} (subject, key, request_hash, aggregate_id, aggregate_version) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::uuid[], %s::bigint[]) "
            "ON CONFLICT DO NOTHING RETURNING subject, key").format(self.keys_table),
            ([k[0] for k in keys], [k[1] for k in keys], [rows[k][0] for k in keys], [rows[k][1] for k in keys],
             [rows[k][2] for k in keys]))
        self._batch_inserted = {(row["subject"], row["key"]) for row in curs.fetchall()}
        self._batch_taken = set(keys) - self._batch_inserted

    def _admit(self, save: BatchSave, admitted: Sequence[BatchSave]) -> None:
        """KeyTaken, as save by save, if another transaction holds the key or a save admitted
        before this one in the batch does."""
        super()._admit(save, admitted)
        record = save.kwargs.get("idempotency")
        if record is None:
            return
        claim = record[0]
        key = (claim.subject, claim.key)
        if key in self._batch_taken or any(
                (a := other.kwargs.get("idempotency")) is not None and (a[0].subject, a[0].key) == key
                for other in admitted):
            raise Refused(KeyTaken(claim.key))

    def _insert_events_batch(self, curs: Cursor[DictRow], admitted: Sequence[BatchSave]) -> None:
        # The keys are in (`_claim_batch`); the other hooks, save by save.
        for save in admitted:
            super()._insert_events(curs, save.stored_events, **save.kwargs)

    def _after_insert_batch(self, curs: Cursor[DictRow], admitted: Sequence[BatchSave]) -> None:
        """Each admitted key gets its save's answer and last position (one UPDATE); a key
        inserted for a save that was not admitted goes again, as its savepoint would have."""
        super()._after_insert_batch(curs, admitted)
        answers: dict[tuple[str, str], tuple[Any, ...]] = {}
        for save in admitted:
            record = save.kwargs.get("idempotency")
            if record is not None:
                claim, aggregate_id, version = record
                answers[(claim.subject, claim.key)] = (claim.request_hash, aggregate_id, version,
                                                       max(save.result) if save.result else None)
        if answers:
            keys = list(answers)
            curs.execute(SQL(
                "UPDATE {} k SET request_hash = n.request_hash, aggregate_id = n.aggregate_id, "
                "aggregate_version = n.version, position = n.position "
                "FROM unnest(%s::text[], %s::text[], %s::text[], %s::uuid[], %s::bigint[], %s::bigint[]) "
                "AS n(subject, key, request_hash, aggregate_id, version, position) "
                "WHERE k.subject = n.subject AND k.key = n.key").format(self.keys_table),
                ([k[0] for k in keys], [k[1] for k in keys], *([answers[k][i] for k in keys] for i in range(4))))
        unheld = self._batch_inserted - set(answers)
        if unheld:
            curs.execute(SQL("DELETE FROM {} k USING unnest(%s::text[], %s::text[]) AS n(subject, key) "
                             "WHERE k.subject = n.subject AND k.key = n.key").format(self.keys_table),
                         ([k[0] for k in unheld], [k[1] for k in unheld]))

    def stored_answer(self, subject: str, key: str) -> StoredAnswer | None:
        """The answer recorded for a key, with the log position of the write it names."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(SQL(
                "SELECT k.*, e.notification_id FROM {} k LEFT JOIN {}.{} e "
                "ON e.originator_id = k.aggregate_id AND e.originator_version = k.aggregate_version "
                "WHERE k.subject = %s AND k.key = %s").format(
                    self.keys_table, Identifier(self.datastore.schema), Identifier(self.events_table_name)),
                (subject, key))
            row = curs.fetchone()
        if row is None:
            return None
        return StoredAnswer(row["request_hash"], row["aggregate_id"], row["aggregate_version"],
                            int(row["position"] or row["notification_id"] or 0))
