"""Replaying event logs into read models: rebuilds, as-of views and imports.

A read model is a function of the logs it follows, so it can be built again at any time into any
schema by the same projection code the live runners use: from the start of each followed log, in
batches (one transaction per batch, the tracking position included), optionally only up to given
positions and only with the events a filter keeps (`services.common.asof`). Two builds of the
same logs give the same rows, which `checksum` turns into one comparable digest per read model.
"""

from __future__ import annotations

import gc
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, Tracking
from eventsourcing.utils import Environment
from psycopg.sql import SQL, Identifier

from services.common.database import check_identifier, ensure_schema, eventsourcing_env
from services.common.projections import ProjectionSpec, ReadModel, fast_decoding

EventFilter = Callable[[Any], bool]

KEPT_ROWS = 2_000_000
"""Up to how many held rows (key results, check-ins, KPIs) a replay keeps in memory from one batch
to the next (`ReadModel.keeps_rows`), instead of loading again what each batch touches: a key
result's check-ins are then read once per replay, not once per batch that checks it in."""


@dataclass(frozen=True)
class ReadModelSource:
    """One read model (tables and a tracking table in a schema) and every log that feeds it."""

    specs: tuple[ProjectionSpec, ...]

    @property
    def view_class(self) -> type[ReadModel]:
        assert self.specs[0].view_class is not None
        return self.specs[0].view_class

    @property
    def schema(self) -> str:
        return self.specs[0].view_schema

    @property
    def name(self) -> str:
        """The projection's name, which also names its tracking table."""
        return str(self.specs[0].projection_class.name)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def tables(self) -> list[str]:
        return [*self.view_class.created_tables(), f"{self.name.lower()}_tracking"]


def read_model_sources(specs: Iterable[ProjectionSpec]) -> list[ReadModelSource]:
    """The read models among a service's projections, each with all the logs that feed it (the
    gateway's one read model follows two). Policies, which write events rather than tables, are
    not read models and are left out."""
    grouped: dict[tuple[type[Any], str], list[ProjectionSpec]] = {}
    for spec in specs:
        if spec.view_class is not None:
            grouped.setdefault((spec.view_class, spec.view_schema), []).append(spec)
    return [ReadModelSource(tuple(group)) for group in grouped.values()]


@dataclass
class ReplayReport:
    """What a replay read and applied, and how fast."""

    events: int = 0
    kept: int = 0
    seconds: float = 0.0
    positions: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def open_view(source: ReadModelSource, database_url: str, schema: str) -> tuple[ReadModel, InfrastructureFactory[Any]]:
    """The read model's recorder over `schema`, its tables created."""
    return _open_view(source.view_class, source.name, database_url, schema)


def _open_view(view_class: type[ReadModel], name: str, database_url: str,
               schema: str) -> tuple[ReadModel, InfrastructureFactory[Any]]:
    ensure_schema(database_url, schema)
    env = Environment(name, eventsourcing_env(database_url, schema, pool_size=1, max_overflow=0))
    factory = InfrastructureFactory.construct(env)
    return factory.tracking_recorder(view_class), factory


def open_log(spec: ProjectionSpec, database_url: str) -> Application[Any]:
    """The followed application, read-only: its recorder and mapper (upcasting included)."""
    env = eventsourcing_env(database_url, spec.application_schema, create_table=False, pool_size=1, max_overflow=0)
    return fast_decoding(spec.application_class(env=env))


def read_batch(app: Application[Any], position: int, batch_size: int) -> list[tuple[Any, Tracking]]:
    """The next notifications of the log after `position`, decoded, each with its tracking
    position (a live runner's read; a replay reads ahead, `_Reader`)."""
    notifications = app.recorder.select_notifications(position, batch_size, inclusive_of_start=False)
    to_domain_event, name = app.mapper.to_domain_event, app.name
    return [(to_domain_event(n), Tracking(name, n.id)) for n in notifications]


def apply_events(projection: Any, view: ReadModel, events: list[tuple[Any, Tracking]], *,
                 keep: EventFilter | None = None) -> int:
    """Decoded events applied in one transaction with the last one's tracking position: the
    events kept. The projection's `prefetch(events)`, if it has one, loads what they touch
    before the first is applied (services.common.batching)."""
    kept = [keep is None or keep(event) for event, _ in events]
    with view.batch():
        prefetch = getattr(projection, "prefetch", None)
        if prefetch is not None and any(kept):
            prefetch([event for (event, _), k in zip(events, kept, strict=True) if k])
        for (event, tracking), k in zip(events, kept, strict=True):
            if k:
                projection.process_event(event, tracking)
            else:
                view.apply(tracking)  # events `keep` turns down still move the position
    return sum(kept)


class _Stored:
    """A stored event as the mappers read it (`StoredEvent`'s attributes), made without the
    frozen dataclass's cost."""

    __slots__ = ("originator_id", "originator_version", "topic", "state")

    def __init__(self, originator_id: Any, originator_version: int, topic: str, state: bytes) -> None:
        self.originator_id, self.originator_version, self.topic, self.state = (
            originator_id, originator_version, topic, state)


class _Reader(threading.Thread):
    """Reads and decodes a log's next batches ahead of the batch being applied, on a connection
    of its own: while the applying thread waits for the server to run a batch's statements (psycopg
    waits without the interpreter lock), this one reads and decodes the next. The log is read
    in notification order through one server-side cursor (the rows as tuples), not a query per
    batch. Batches, then None at the end (or the error that stopped it), through a short queue."""

    def __init__(self, app: Application[Any], database_url: str, position: int, batch_size: int,
                 stop: int | None) -> None:
        super().__init__(name=f"replay-reader-{app.name}", daemon=True)
        self.app, self.database_url = app, database_url
        self.position, self.batch_size, self.stop = position, batch_size, stop
        self.batches: queue.Queue[list[tuple[Any, Tracking]] | BaseException | None] = queue.Queue(maxsize=2)
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            recorder: Any = self.app.recorder
            table = SQL("{}.{}").format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
            query = SQL("SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
                        "WHERE notification_id > %s").format(table)
            params: list[int] = [self.position]
            if self.stop is not None:
                query += SQL(" AND notification_id <= %s")
                params.append(self.stop)
            query += SQL(" ORDER BY notification_id")
            to_domain_event, name = self.app.mapper.to_domain_event, self.app.name
            with psycopg.connect(self.database_url) as conn, conn.cursor(name="replay_reader") as cursor:
                cursor.itersize = self.batch_size
                cursor.execute(query, params)
                while not self.halt.is_set() and (rows := cursor.fetchmany(self.batch_size)):
                    self._put([(to_domain_event(_Stored(*row[1:])), Tracking(name, row[0])) for row in rows])
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the applying thread, which raises it
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self.halt.is_set():
            try:
                self.batches.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[list[tuple[Any, Tracking]]]:
        while (item := self.batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join()


GC_YOUNG_THRESHOLD = 50_000
"""The collector's first threshold while a replay runs (Python's default is 700). A replay
allocates millions of short-lived objects (decoded events, rows) beside the rows it keeps, and
with the default the young collections and the full ones they set off cost a fifth of its CPU."""

_gc_lock = threading.Lock()
_gc_replays = 0
_gc_saved: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """The cyclic collector's young threshold raised to `GC_YOUNG_THRESHOLD` while any replay of
    this process runs (as-of replays run in threads of a service's process), then put back."""
    global _gc_replays, _gc_saved
    with _gc_lock:
        if _gc_replays == 0:
            _gc_saved = gc.get_threshold()
            gc.set_threshold(max(GC_YOUNG_THRESHOLD, _gc_saved[0]), *_gc_saved[1:])
        _gc_replays += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_replays -= 1
            if _gc_replays == 0:
                gc.set_threshold(*_gc_saved)


def replay(source: ReadModelSource, database_url: str, schema: str, *, stops: dict[str, int] | None = None,
           keep: EventFilter | None = None, batch_size: int = 1000) -> ReplayReport:
    """Bring the read model in `schema` up to date with its logs: from its tracking position (the
    start, for a fresh schema) to each log's head, or to `stops[log name]`. Events `keep` turns
    down still move the position, so a later call carries on where this one stopped."""
    with fewer_collections():
        return _replay(source, database_url, schema, stops=stops, keep=keep, batch_size=batch_size)


def _replay(source: ReadModelSource, database_url: str, schema: str, *, stops: dict[str, int] | None,
            keep: EventFilter | None, batch_size: int) -> ReplayReport:
    report = ReplayReport()
    started = time.perf_counter()
    view, factory = open_view(source, database_url, schema)
    view.announces = False
    view.keeps_rows = KEPT_ROWS  # nothing else writes the schema while it replays
    view.sends_each_event = False
    try:
        for spec in source.specs:
            app = open_log(spec, database_url)
            try:
                projection = spec.projection_class(view=view)  # type: ignore[call-arg]
                position = view.max_tracking_id(app.name) or 0
                reader = _Reader(app, database_url, position, batch_size, (stops or {}).get(app.name))
                reader.start()
                try:
                    for events in reader:
                        report.kept += apply_events(projection, view, events, keep=keep)
                        report.events += len(events)
                        position = events[-1][1].notification_id
                finally:
                    reader.close()
                report.positions[app.name] = position
            finally:
                app.close()
    finally:
        factory.close()
    report.seconds = time.perf_counter() - started
    return report


class BatchingRunner:
    """A live read model's runner: the log's new events applied a batch at a time, one
    transaction per batch with its tracking position (as `replay` does), instead of one per
    event. Between batches it waits for the log's NOTIFY (a save announces itself on the log's
    channel), or `timeout`, whichever comes first. Used like the library's `ProjectionRunner`
    (`ProjectionThread` calls `run_forever`, `stop` and reads `is_interrupted`)."""

    def __init__(self, spec: ProjectionSpec, projection_class: type[Any], database_url: str, *,
                 batch_size: int = 500):
        assert spec.view_class is not None
        self.spec = spec
        self.batch_size = batch_size
        self.is_interrupted = threading.Event()
        self._stopping = threading.Event()
        self.view, self._factory = _open_view(spec.view_class, str(spec.projection_class.name), database_url,
                                              spec.view_schema)
        self.app = open_log(spec, database_url)
        self.projection = projection_class(view=self.view)
        self.position = self.view.max_tracking_id(self.app.name) or 0
        self._listener = psycopg.connect(database_url, autocommit=True)
        self._listener.execute(SQL("LISTEN {}").format(Identifier(self.app.recorder.channel_name)))  # type: ignore[attr-defined]

    def __enter__(self) -> BatchingRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()
        self.app.close()
        self._factory.close()

    def stop(self) -> None:
        self._stopping.set()

    def run_forever(self, timeout: float | None = None) -> None:
        """Apply batches while there are events; then wait up to `timeout` for more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set():
            events = read_batch(self.app, self.position, self.batch_size)
            if events:
                apply_events(self.projection, self.view, events)
                self.position = events[-1][1].notification_id  # the batch's tracking position
                continue
            remaining = 0.5 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in self._listener.notifies(timeout=min(remaining, 0.5), stop_after=1):
                pass
            if deadline is not None and time.monotonic() >= deadline:
                return
        self.is_interrupted.set()


@dataclass(frozen=True)
class Checksum:
    """A read model's content: rows and an order-independent digest per table, and one digest of
    them all. Tracking positions are reported beside it, not in it."""

    tables: dict[str, tuple[int, str]]
    positions: dict[str, int]

    @property
    def digest(self) -> str:
        lines = "\n".join(f"{t}:{n}:{d}" for t, (n, d) in sorted(self.tables.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def rows(self) -> int:
        return sum(n for n, _ in self.tables.values())


def checksum(conn: psycopg.Connection[Any], source: ReadModelSource, schema: str) -> Checksum:
    """Each table's rows hashed as text and the hashes combined in sorted order, so the physical
    order of the rows does not matter; on a missing table, (0, '')."""
    tables: dict[str, tuple[int, str]] = {}
    for table in source.view_class.created_tables():
        qualified = SQL("{}.{}").format(Identifier(schema), Identifier(table))
        if conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{table}"',)).fetchone()[0] is None:
            tables[table] = (0, "")
            continue
        rows, digest = conn.execute(SQL(
            "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
            "FROM (SELECT md5(t::text) AS h FROM {} t) s").format(qualified)).fetchone()
        tables[table] = (int(rows), str(digest))
    return Checksum(tables, tracking_positions(conn, source, schema))


def tracking_positions(conn: psycopg.Connection[Any], source: ReadModelSource, schema: str) -> dict[str, int]:
    tracking = f"{source.name.lower()}_tracking"
    if conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{tracking}"',)).fetchone()[0] is None:
        return {}
    rows = conn.execute(SQL("SELECT application_name, max(notification_id) FROM {}.{} "
                            "WHERE application_name <> '__migration__' GROUP BY 1")
                        .format(Identifier(schema), Identifier(tracking))).fetchall()
    return {name: int(position) for name, position in rows}


def live_checksum(database_url: str, source: ReadModelSource) -> Checksum:
    """The live read model's checksum and positions as one consistent snapshot."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return checksum(conn, source, source.schema)


def drop_schema(database_url: str, schema: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(check_identifier(schema))))


def replace_live(database_url: str, source: ReadModelSource, rebuilt_schema: str,
                 expected: dict[str, int]) -> bool:
    """Swap the rebuilt tables and tracking positions in for the live ones, in one transaction,
    if the live read model is still at the `expected` positions. The live tables are locked
    first, then the tracking table, the order a runner writes them in, so a runner's transaction
    in flight finishes before the check. False, and nothing changed, if it has moved on."""
    tracking = f"{source.name.lower()}_tracking"
    live, rebuilt = Identifier(source.schema), Identifier(rebuilt_schema)
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute(SQL("CREATE TABLE IF NOT EXISTS {}.{} (LIKE {}.{})").format(
            live, Identifier(tracking), rebuilt, Identifier(tracking)))
        for table in [*source.view_class.created_tables(), tracking]:
            if conn.execute("SELECT to_regclass(%s)", (f'"{source.schema}"."{table}"',)).fetchone()[0] is not None:
                conn.execute(SQL("LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE").format(live, Identifier(table)))
        if tracking_positions(conn, source, source.schema) != expected:
            return False
        for table in source.view_class.created_tables():
            conn.execute(SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(live, Identifier(table)))
            conn.execute(SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(rebuilt, Identifier(table), live))
        conn.execute(SQL("DELETE FROM {}.{} WHERE application_name <> '__migration__'").format(
            live, Identifier(tracking)))
        conn.execute(SQL("INSERT INTO {}.{} SELECT * FROM {}.{} WHERE application_name <> '__migration__'").format(
            live, Identifier(tracking), rebuilt, Identifier(tracking)))
    return True
