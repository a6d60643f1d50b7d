"""Tamper evidence for a service's event log: a hash chain beside `<schema>.<app>_events`.

Each stored event gets a row in `<schema>.<app>_event_chain`, written by the recorder in the
transaction that inserts the event, while the library's table lock on the log is held (so the
chain's order is the log's notification order):

- `content_hash` = SHA-256 over an unambiguous encoding of the event's originator id, version,
  topic and state (each field tagged and length-prefixed). It does not cover the position, so a
  record moved to another position is recognised there (`reordered`, not just `altered`).
- `chain_hash` = SHA-256(previous record's chain_hash || notification_id || content_hash), with
  32 zero bytes before the first record: each record's hash covers every record before it and
  its own position.
- `previous_id` = the previous record's notification_id (ids have gaps: a rolled-back save uses
  up sequence numbers), so that a record deleted together with its chain row can be named.

`verify_chain` streams the log and the chain in notification order (server-side cursors, so
memory stays bounded) and reports the first problem: `altered`, `deleted`, `reordered`,
`unchained` (an event with no chain row: written behind the recorder's back) or `broken` (the
chain rows themselves do not link).

What it proves, and what not: anyone who can write the tables can recompute the whole chain
after a change. The head hash (`verify_chain(...).head_hash`, printed by `make verify`) is what an
auditor keeps outside the database; a later chain that still passes through that hash at that
position has not changed before it. Cutting off the newest records (with their chain rows) is
only visible against such a kept head.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

GENESIS = bytes(32)
_CONTENT_TAG = b"tandem.event-content.v1\x00"
_CHAIN_TAG = b"tandem.event-chain.v1\x00"
BATCH = 1000
# A save of this many events or more is chained with COPY: for 10,000 rows it takes a tenth of the
# time an INSERT from unnest() of bytea arrays takes, but it is one more round trip for a few.
COPY_FROM = 64

ProblemKind = Literal["altered", "deleted", "reordered", "unchained", "broken"]


def chain_table_name(events_table: str) -> str:
    """`goals_events` -> `goals_event_chain`."""
    base = events_table[: -len("_events")] if events_table.endswith("_events") else events_table
    return f"{base}_event_chain"


def _field(value: bytes | None) -> bytes:
    if value is None:
        return b"\x00"
    return b"\x01" + len(value).to_bytes(8, "big") + value


def content_hash(originator_id: uuid.UUID | str, originator_version: int, topic: str | None,
                 state: bytes | memoryview | None) -> bytes:
    """The hash of one stored event's content (not its position)."""
    h = hashlib.sha256(_CONTENT_TAG)
    h.update(_field(str(originator_id).encode()))
    h.update(_field(int(originator_version).to_bytes(8, "big", signed=True)))
    h.update(_field(None if topic is None else topic.encode()))
    h.update(_field(None if state is None else bytes(state)))
    return h.digest()


def chain_hash(previous: bytes, notification_id: int, content: bytes) -> bytes:
    """The hash of a record's link: the previous link, its position and its content."""
    return hashlib.sha256(_CHAIN_TAG + previous + int(notification_id).to_bytes(8, "big", signed=True)
                          + content).digest()


class HashChain:
    """The chain table of one log, as its recorder writes it."""

    def __init__(self, schema: str, events_table: str, *, uuid_ids: bool = True):
        self.schema = schema
        self.events_table = events_table
        self.table = chain_table_name(events_table)
        self.uuid_ids = uuid_ids
        s, e, c = Identifier(schema), Identifier(events_table), Identifier(self.table)
        self.create_statement = SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} (notification_id bigint PRIMARY KEY, previous_id bigint, "
            "content_hash bytea NOT NULL, chain_hash bytea NOT NULL)").format(s, c)
        self.head_statement = SQL(
            "SELECT notification_id, chain_hash FROM {}.{} ORDER BY notification_id DESC LIMIT 1").format(s, c)
        self.insert_statement = SQL(
            "INSERT INTO {}.{} (notification_id, previous_id, content_hash, chain_hash) "
            "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bytea[], %s::bytea[])").format(s, c)
        # chain_hash() in SQL: sha256(tag || previous || int8send(id) || content), int8send being
        # the 8 bytes big-endian that chain_hash() hashes.
        self.append_one_statement = SQL(
            "INSERT INTO {0}.{1} (notification_id, previous_id, content_hash, chain_hash) "
            "SELECT %(id)s, h.notification_id, %(content)s, "
            "sha256(%(tag)s || coalesce(h.chain_hash, %(genesis)s) || int8send(%(id)s::bigint) || %(content)s) "
            "FROM (SELECT 1) AS one LEFT JOIN (SELECT notification_id, chain_hash FROM {0}.{1} "
            "ORDER BY notification_id DESC LIMIT 1) AS h ON true").format(s, c)
        self.copy_statement = SQL(
            "COPY {}.{} (notification_id, previous_id, content_hash, chain_hash) FROM STDIN (FORMAT BINARY)"
        ).format(s, c)
        self.lock_statement = SQL("LOCK TABLE {}.{} IN EXCLUSIVE MODE").format(s, e)
        self.select_events_statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {}.{} "
            "ORDER BY notification_id").format(s, e)
        self.select_links_statement = SQL(
            "SELECT notification_id, previous_id, content_hash, chain_hash FROM {}.{} "
            "ORDER BY notification_id").format(s, c)
        self.find_content_statement = SQL(
            "SELECT notification_id FROM {}.{} WHERE content_hash = %s AND notification_id <> %s "
            "ORDER BY notification_id LIMIT 1").format(s, c)

    def _originator(self, originator_id: Any) -> Any:
        # The column is uuid: what comes back is the UUID, however the id was spelled going in.
        return uuid.UUID(str(originator_id)) if self.uuid_ids and not isinstance(originator_id, uuid.UUID) \
            else originator_id

    def append(self, curs: psycopg.Cursor[Any], stored_events: Sequence[Any], notification_ids: Sequence[int]) -> None:
        """Chain a save's events; call with the log's table lock held, after their INSERT.

        One statement for a save of one event (linked to the head in SQL: the same formula as
        `chain_hash`), else the head is read and the rows go in with one INSERT, or one COPY for a
        large save. The ids are handed out in the order of the events' INSERT rows (one `unnest`,
        one sequence), so the sorted ids pair with the events in the order they were given."""
        if not stored_events:
            return
        if len(notification_ids) != len(stored_events):
            raise RuntimeError(f"{len(stored_events)} events inserted, {len(notification_ids)} ids returned")
        with curs.connection.cursor(row_factory=tuple_row) as c:
            if len(stored_events) == 1:  # the usual save: one statement, linked to the head in SQL
                e = stored_events[0]
                nid = notification_ids[0]
                content = content_hash(self._originator(e.originator_id), e.originator_version, e.topic, e.state)
                c.execute(self.append_one_statement, {"id": nid, "content": content, "tag": _CHAIN_TAG,
                                                      "genesis": GENESIS}, prepare=True)
                return
            c.execute(self.head_statement, prepare=True)
            head = c.fetchone()
            rows = ((nid, e.originator_id, e.originator_version, e.topic, e.state)
                    for nid, e in zip(sorted(notification_ids), stored_events, strict=True))
            self._insert(c, head, rows)

    def _insert(self, c: psycopg.Cursor[Any], head: tuple[int, bytes] | None, rows: Any) -> tuple[int, bytes] | None:
        previous_id, previous = (head[0], bytes(head[1])) if head else (None, GENESIS)
        ids: list[int] = []
        previous_ids: list[int | None] = []
        contents: list[bytes] = []
        chains: list[bytes] = []
        for nid, originator_id, version, topic, state in rows:
            content = content_hash(self._originator(originator_id), version, topic, state)
            link = chain_hash(previous, nid, content)
            ids.append(nid)
            previous_ids.append(previous_id)
            contents.append(content)
            chains.append(link)
            previous_id, previous = nid, link
        if len(ids) >= COPY_FROM:
            with c.copy(self.copy_statement) as copy:
                copy.set_types(["int8", "int8", "bytea", "bytea"])
                for row in zip(ids, previous_ids, contents, chains, strict=True):
                    copy.write_row(row)
        elif ids:
            c.execute(self.insert_statement, (ids, previous_ids, contents, chains))
        return (previous_id, previous) if previous_id is not None else None

    def serialise_creation(self, curs: psycopg.Cursor[Any]) -> None:
        """Recorders of one log created at the same moment (a service's write side and its
        policy's process recorder) take turns, so only one of them fills a new chain."""
        curs.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"tandem-chain {self.schema}.{self.table}",))

    def create(self, curs: psycopg.Cursor[Any]) -> int:
        """Create the chain table (in the transaction that creates the log). A log that is older
        than its chain (an installation from before tamper evidence) is chained once, now, in
        notification order under the log's lock. Returns how many events that chained.

        Only a chain table that did not exist is filled: events missing from an existing chain
        were written behind the recorder's back, and `verify_chain` is to name them, not hide them."""
        with curs.connection.cursor(row_factory=tuple_row) as c:
            c.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{self.schema}"."{self.table}"',))
            existed = c.fetchone()[0]  # type: ignore[index]
            c.execute(self.create_statement)
            if existed:
                return 0
            c.execute(self.lock_statement)
            count = 0
            head: tuple[int, bytes] | None = None
            with curs.connection.cursor(name=f"chain_backfill_{self.table}", row_factory=tuple_row) as events:
                events.itersize = BATCH
                events.execute(self.select_events_statement)
                while batch := events.fetchmany(BATCH):
                    head = self._insert(c, head, batch)
                    count += len(batch)
            return count


@dataclass(frozen=True)
class ChainProblem:
    kind: ProblemKind
    position: int
    detail: str


@dataclass(frozen=True)
class ChainReport:
    log: str
    ok: bool
    records: int
    """Records checked and found intact (up to the first problem, if there is one)."""
    head_position: int | None
    """The last intact record's position (the log's head when ok)."""
    head_hash: str | None
    """Its chain hash, hex: what an auditor keeps outside the database."""
    problem: ChainProblem | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for people."""
        if self.problem is None:
            if self.head_position is None:
                return f"{self.log}: ok, 0 records (empty log)"
            return f"{self.log}: ok, {self.records} records, head {self.head_position} {self.head_hash}"
        p = self.problem
        return f"{self.log}: {p.kind.upper()} at position {p.position}: {p.detail}"


def verify_chain(database_url: str, schema: str, events_table: str, *, log: str | None = None,
                 batch: int = BATCH) -> ChainReport:
    """Check a log against its hash chain, in notification order, on one snapshot."""
    log = log or schema
    chain = HashChain(schema, events_table)
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        has_events, has_chain = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
            (f'"{schema}"."{events_table}"', f'"{schema}"."{chain.table}"')).fetchone()  # type: ignore[misc]
        if not has_events:
            return ChainReport(log, True, 0, None, None)
        with conn.cursor(name="verify_events", row_factory=tuple_row) as events, \
                conn.cursor(name="verify_chain", row_factory=tuple_row) as links:
            events.itersize = links.itersize = batch
            events.execute(chain.select_events_statement)
            link_rows: Iterator[tuple[Any, ...]] = iter(())
            if has_chain:
                links.execute(chain.select_links_statement)
                link_rows = iter(links)

            def moved_from(content: bytes, position: int) -> int | None:
                # Only on the way to a report: one scan of the chain for where this content was chained.
                row = conn.execute(chain.find_content_statement, (content, position)).fetchone()
                return None if row is None else row[0]

            return _walk(log, iter(events), link_rows, moved_from)


def _walk(log: str, events: Iterator[tuple[Any, ...]], links: Iterator[tuple[Any, ...]],
          moved_from: Any) -> ChainReport:
    records = 0
    last_id: int | None = None
    last_hash = GENESIS

    def report(kind: ProblemKind, position: int, detail: str) -> ChainReport:
        return ChainReport(log, False, records, last_id, last_hash.hex() if last_id is not None else None,
                           ChainProblem(kind, position, detail))

    event = next(events, None)
    link = next(links, None)
    while event is not None or link is not None:
        if link is None or (event is not None and event[0] < link[0]):
            assert event is not None
            return report("unchained", event[0],
                          f"event {event[0]} ({_describe(event)}) has no chain row: it was not written by "
                          "the service's recorder")
        if event is None or link[0] < event[0]:
            return report("deleted", link[0], f"event {link[0]} was deleted (its chain row is still there)")
        position, previous_id, stored_content, stored_link = link[0], link[1], bytes(link[2]), bytes(link[3])
        if previous_id != last_id:
            if previous_id is not None and (last_id is None or previous_id > last_id):
                since = "" if last_id is None else f"; so was any event between {last_id} and {previous_id}"
                return report("deleted", previous_id,
                              f"event {previous_id} was deleted with its chain row (the chain row of event "
                              f"{position} names it as its predecessor){since}")
            return report("broken", position,
                          f"the chain row of event {position} names {previous_id} as its predecessor, "
                          f"but the chain's previous record is {last_id}")
        actual = content_hash(event[1], event[2], event[3], event[4])
        if actual != stored_content:
            origin = moved_from(actual, position)
            if origin is not None:
                return report("reordered", position,
                              f"position {position} holds the event chained at position {origin} "
                              f"({_describe(event)})")
            return report("altered", position, f"event {position} ({_describe(event)}) differs from what "
                                               "was chained")
        if chain_hash(last_hash, position, stored_content) != stored_link:
            return report("broken", position, f"the chain hash of event {position} does not follow from "
                                              "the one before it")
        records += 1
        last_id, last_hash = position, stored_link
        event = next(events, None)
        link = next(links, None)
    return ChainReport(log, True, records, last_id, last_hash.hex() if last_id is not None else None)


def _describe(event: tuple[Any, ...]) -> str:
    topic = str(event[3] or "")
    return f"{topic.partition(':')[2] or topic} of {event[1]} v{event[2]}"


def rechain(conn: psycopg.Connection[Any], schema: str, events_table: str) -> str | None:
    """For a log whose rows were copied in at their positions (an import, a benchmark's load):
    set its notification id sequence past them, drop the (empty) chain and chain the log from
    scratch. Returns the head's chain hash (hex), None for an empty log."""
    conn.execute(SQL("SELECT setval(pg_get_serial_sequence(%s, 'notification_id'), "
                     "greatest((SELECT max(notification_id) FROM {}.{}), 1))").format(
        Identifier(schema), Identifier(events_table)), (f"{schema}.{events_table}",))
    chain = HashChain(schema, events_table)
    conn.execute(SQL("DROP TABLE {}.{}").format(Identifier(schema), Identifier(chain.table)))
    with conn.cursor() as curs:
        chain.create(curs)
        head = curs.execute(chain.head_statement).fetchone()
    return bytes(head[1]).hex() if head else None

