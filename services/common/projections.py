"""Read-side plumbing: projections that follow an event log into PostgreSQL tables.

A projection is the `eventsourcing` library's `Projection` over a `ReadModel`, which is the
library's PostgreSQL tracking recorder extended with the service's own tables. Every change a
projection makes is written in the same transaction as its tracking position, so each event
takes effect exactly once across crashes and restarts (DESIGN.md, "Read side").

A service that follows another service's log reads it as the contract says: `followed_log`
builds a stand-in application that decodes stored notifications into `ContractEvent`s (event
type name, aggregate id, version, JSON state) without importing the other service's classes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, JSONTranscoder, Mapper, StoredEvent, Tracking
from eventsourcing.postgres import PostgresProcessRecorder, PostgresTrackingRecorder
from eventsourcing.projection import (
    EventSourcedProjection,
    EventSourcedProjectionRunner,
    Projection,
    ProjectionRunner,
)
from eventsourcing.utils import Environment, get_topic
from psycopg.sql import SQL, Identifier

from services.common.batching import Batch, Held, HeldRows, Statement
from services.common.contract_upcasts import CONTRACT_UPCASTS, ContractUpcast, upcast_contract_state
from services.common.database import eventsourcing_env, projection_channel
from services.common.eventstore import standard_transcoder, topic_event_type
from services.common.recorder import UnpipelinedInsert
from services.common.telemetry import traced_projection

log = logging.getLogger(__name__)

_CREATED_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS \{schema\}\.(\w+)")


def refresh_tracking_state(recorder: Any, curs: Any) -> None:
    """Call holding the lock that serialises a tracking table's creation. The library looked at
    the tracking table before this transaction: another process (a second replica starting
    beside this one) may have created it and recorded its migration row while this one waited
    for the lock. Inserting that row again would fail the start-up, so the recorder decides from
    what is there now."""
    table = f"{recorder.datastore.schema}.{recorder.tracking_table_name}"
    curs.execute("SELECT to_regclass(%s) AS t", (table,))
    if curs.fetchone()["t"] is not None:
        curs.execute(SQL("SELECT max(notification_id) AS m FROM {}.{} WHERE application_name = %s").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.tracking_table_name)),
            (recorder.table_migration_identifier,))
        migrated = curs.fetchone()["m"]
        recorder.tracking_table_exists = True
        recorder.tracking_migration_previous = recorder.tracking_migration_current = migrated


class ReadModel(PostgresTrackingRecorder):
    """A tracking recorder that also owns the projection's tables.

    Subclasses list their DDL in `tables` (with `{schema}` where the schema goes) and write
    through `apply`, which commits the statements together with the tracking position.

    A read model is rebuilt from the log whenever its shape changes: the DDL (and `revision`,
    to bump by hand when only the projection's logic changed) is fingerprinted, and a
    fingerprint other than the stored one drops the tables and the tracking positions, so the
    runner replays from the start. Events are never touched.
    """

    tables: Sequence[str] = ()
    revision: int = 1

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = self.datastore.schema
        for ddl in self.tables:
            self.sql_create_statements.append(SQL(ddl.format(schema=schema)))  # type: ignore[arg-type]
        self.channel = projection_channel(f"{schema}.{self.tracking_table_name}")

    @property
    def schema(self) -> str:
        return self.datastore.schema

    @property
    def table_names(self) -> list[str]:
        return self.created_tables()

    @classmethod
    def created_tables(cls) -> list[str]:
        """The tables the DDL creates (indexes aside)."""
        return [m.group(1) for ddl in cls.tables if (m := _CREATED_TABLE.search(ddl))]

    @classmethod
    def fingerprint(cls) -> str:
        """The read model's shape: its DDL and revision."""
        return hashlib.sha256(("\n".join(cls.tables) + f"\nrevision {cls.revision}").encode()).hexdigest()

    def _create_table(self, curs: Any) -> None:
        """Runners that share a read model (the gateway's follows two logs) and the API's own
        start-up create these tables at the same moment; concurrent CREATE ... IF NOT EXISTS can
        still collide in the catalogue, so they take turns."""
        curs.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}.{self.tracking_table_name}",))
        fingerprints = SQL("{}.read_model_fingerprints").format(Identifier(self.schema))
        curs.execute(SQL("CREATE TABLE IF NOT EXISTS {} (tracking_table text PRIMARY KEY, fingerprint text NOT NULL)")
                     .format(fingerprints))
        curs.execute(SQL("SELECT fingerprint FROM {} WHERE tracking_table = %s").format(fingerprints),
                     (self.tracking_table_name,))
        stored = curs.fetchone()
        # No fingerprint at all: new, or built before fingerprints were kept; either way the
        # drops below find nothing to keep.
        if stored is None or stored["fingerprint"] != self.fingerprint():
            if stored is not None:
                log.warning("read model %s.%s changed shape: rebuilding it from the log",
                            self.schema, self.tracking_table_name)
            for table in self.table_names:
                curs.execute(SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(Identifier(self.schema), Identifier(table)))
            curs.execute("SELECT to_regclass(%s) AS t", (f"{self.schema}.{self.tracking_table_name}",))
            if curs.fetchone()["t"] is not None:
                curs.execute(SQL("DELETE FROM {}.{} WHERE application_name <> %s").format(
                    Identifier(self.schema), Identifier(self.tracking_table_name)), (self.table_migration_identifier,))
        refresh_tracking_state(self, curs)
        super()._create_table(curs)
        curs.execute(SQL("INSERT INTO {} VALUES (%s, %s) ON CONFLICT (tracking_table) DO UPDATE "
                         "SET fingerprint = EXCLUDED.fingerprint").format(fingerprints),
                     (self.tracking_table_name, self.fingerprint()))

    announces: bool = True
    """Whether projections tell live subscribers about what they write (a replay into a
    scratch schema does not)."""

    held: Sequence[Held] = ()
    """The tables a batch keeps in memory (services.common.batching): those most events change."""

    _state: Batch | None = None

    keeps_rows: int = 0
    """Up to how many held rows to keep from one batch to the next (0: none, each batch loads
    what it touches). Only for a read model no one else writes while this recorder does (a
    replay into a schema of its own: `services.common.replay`): what memory holds of a held table
    is then what is stored. Dropped when a batch fails, and when more than this is held."""

    _kept: dict[str, HeldRows] | None = None

    sends_each_event: bool = True
    """Whether an event's statements go out as it is applied, so that they run in its span
    (services.common.telemetry). A replay, which traces nothing, leaves them queued until
    something is read or the batch ends: runs of the same statement across events then go out
    as one `executemany`, the order unchanged."""

    @property
    def kept_rows(self) -> dict[str, HeldRows] | None:
        """The held rows kept across batches (`keeps_rows`), by table, or None."""
        if not self.keeps_rows:
            return None
        if self._kept is None:
            self._kept = {}
        return self._kept

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for every event applied inside, in a few round trips
        (services.common.batching): the statements of each sent in pipeline mode, the held rows
        written at the end, then the last tracking position once and a NOTIFY, committed
        together (or not at all). A handler sees what the events before it in the batch did."""
        state = self._state or Batch(self)  # adopts an event begun outside a batch
        assert state.curs is None, "batches do not nest"
        try:
            with self.datastore.transaction(commit=True) as curs, curs.connection.pipeline():
                state.curs, self._state = curs, state
                yield
                state.finish()
                if state.tracking is not None:
                    with curs.connection.cursor() as fresh:  # it may read: a cursor without results (pipeline mode)
                        self._insert_tracking(fresh, state.tracking)
                    curs.execute(SQL("NOTIFY {}").format(Identifier(self.channel)))
        except BaseException:
            self._kept = None  # what it held may be what the rolled back transaction wrote
            raise
        else:
            if self._kept is not None and sum(held.size for held in self._kept.values()) > self.keeps_rows:
                self._kept = None
        finally:
            self._state = None

    def _current(self) -> Batch:
        if self._state is None:  # an event applied outside `batch()`: a batch of its own, which `apply` ends
            self._state = Batch(self)
        return self._state

    def apply(self, tracking: Tracking, statements: Iterable[Statement] = ()) -> None:
        """The event's statements and its tracking position, in the batch's transaction (outside
        `batch`, in one of the event's own, with what it changed in held tables)."""
        state = self._current()
        if state.curs is None:
            with self.batch():
                self.apply(tracking, statements)
            return
        state.run(statements)
        state.tracking = tracking

    def rows(self, table: str) -> HeldRows:
        """A held table's rows, as the events so far in the batch left them."""
        return self._current().rows(table)

    def later(self, finish: Callable[[dict[Any, Any]], None]) -> dict[Any, Any]:
        """What to do once at the end of the batch: `finish(items)`, with the dict returned
        here as the handlers filled it (before the held rows are written, or before a statement
        or query that names a held table)."""
        return self._current().later(finish)

    def memo(self, name: str) -> dict[Any, Any]:
        """A dict of the projection's that lasts as long as the batch (what `prefetch` found out)."""
        return self._current().memos.setdefault(name, {})

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read the projection's own tables while processing (the batch's transaction, after
        what the events before it did)."""
        return self._current().read(sql, params)


@dataclass(frozen=True)
class ContractEvent:
    """A stored event as the contract describes it, decoded without the producer's classes."""

    type: str
    originator_id: uuid.UUID
    version: int
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    stored_class_version: int = 1
    """The version the event was stored as; `data` has been upcast past it (`ContractMapper`)."""

    @property
    def timestamp(self) -> datetime:
        return self.data["timestamp"]


class FastDecoding:
    """A JSON transcoder's decoding, faster: orjson parses the stored bytes, then the tagged
    values (`{"_type_": ..., "_data_": ...}`) are decoded by the transcoder's own transcodings,
    innermost first, as its `object_hook` would. The stored bytes are only read: encoding (and so
    the hash chain over them) is the wrapped transcoder's. What orjson refuses (NaN) or reads
    otherwise (integers past 64 bits, which it makes floats) is decoded by the wrapped
    transcoder itself, so the result is always its own."""

    def __init__(self, transcoder: Any) -> None:
        self.transcoder = transcoder
        self.names = {name: t.decode for name, t in transcoder.names.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transcoder, name)

    def encode(self, obj: Any) -> bytes:
        return self.transcoder.encode(obj)

    def decode(self, data: bytes) -> Any:
        try:
            parsed = orjson.loads(data)
            if type(parsed) in (dict, list):
                return self._walk(parsed)
            if type(parsed) is float and _past_64_bits(parsed):
                raise _Refused
            return parsed
        except (orjson.JSONDecodeError, _Refused):
            return self.transcoder.decode(data)

    def _walk(self, o: Any) -> Any:
        walk = self._walk
        if type(o) is dict:
            for k, v in o.items():
                t = type(v)
                if t is dict or t is list:
                    o[k] = walk(v)
                elif t is float and _past_64_bits(v):
                    raise _Refused
            if len(o) == 2 and "_type_" in o and "_data_" in o:
                decode = self.names.get(o["_type_"])
                if decode is None:
                    return self.transcoder._decode_obj(o)  # the library's error
                return decode(o["_data_"])
            return o
        out = []
        for v in o:
            t = type(v)
            if t is dict or t is list:
                v = walk(v)
            elif t is float and _past_64_bits(v):
                raise _Refused
            out.append(v)
        return out


class _Refused(Exception):
    """A value orjson parsed otherwise than the json module would."""


def _past_64_bits(value: float) -> bool:
    """A whole float beyond 64-bit integers: orjson reads an integer that long as a float, where
    the json module keeps it an int (a float written so, 1e300, is decoded again the slow way:
    the same value)."""
    return value.is_integer() and not -(2**63) <= value < 2**64


def fast_decoding(app: Application[Any]) -> Application[Any]:
    """The application's mapper decoding with `FastDecoding` (a reader's: it never writes)."""
    mapper = app.mapper
    if isinstance(getattr(mapper, "transcoder", None), JSONTranscoder):
        mapper.transcoder = FastDecoding(mapper.transcoder)  # type: ignore[assignment]
    return app


class ContractMapper(Mapper[uuid.UUID]):
    """Decodes a stored event into a `ContractEvent` with the JSON transcoder alone, and brings
    an older stored version up to the newest one the contract upcasts know (`upcasts`, keyed by
    event type and version: `services.common.contract_upcasts`), so handlers see one shape."""

    upcasts: Mapping[tuple[str, int], ContractUpcast] = CONTRACT_UPCASTS

    def to_domain_event(self, stored_event: StoredEvent) -> Any:  # type: ignore[override]
        state = self.transcoder.decode(stored_event.state)
        meta = state.pop("meta", {}) or {}
        event_type = topic_event_type(stored_event.topic)
        stored_class_version = int(state.get("class_version", 1))
        upcast_contract_state(event_type, state, self.upcasts)
        return ContractEvent(
            type=event_type,
            originator_id=uuid.UUID(str(stored_event.originator_id)),
            version=stored_event.originator_version,
            data=state,
            meta=meta,
            stored_class_version=stored_class_version,
        )

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        raise TypeError("a followed log is read-only")


class FollowedLog(Application[uuid.UUID]):
    """Reads another service's event log as contract events. Never writes it."""

    def construct_mapper(self) -> Mapper[uuid.UUID]:
        return self.factory.mapper(transcoder=standard_transcoder(), mapper_class=ContractMapper)


def followed_log(name: str) -> type[Application[uuid.UUID]]:
    """A stand-in for the application named `name` (its log's table is `<name>_events`)."""
    return type(name, (FollowedLog,), {"name": name})


@dataclass
class ProjectionSpec:
    """One projection runner: which log it follows and what it writes.

    A read-model projection (`Projection` + `view_class`) writes tables; an event-sourced one
    (the library's `EventSourcedProjection`, no `view_class`) is a policy that records new
    events in its own service's log, with the tracking position in the same transaction, through
    an `AnnouncingProcessRecorder` so that reads waiting on its positions wake when it commits.
    """

    application_class: type[Application[Any]]
    projection_class: type[Projection[Any]] | type[EventSourcedProjection[Any]]
    view_class: type[ReadModel] | None
    application_schema: str
    view_schema: str

    def _process_recorder_env(self) -> dict[str, str]:
        return {f"{self.projection_class.name.upper()}_PROCESS_RECORDER_TOPIC": get_topic(AnnouncingProcessRecorder)}

    def runner(self, database_url: str) -> Any:
        projection_class = traced_projection(self.projection_class)  # a span per event processed
        if self.view_class is None:
            return EventSourcedProjectionRunner(application_class=self.application_class,
                                                projection_class=projection_class,  # type: ignore[arg-type]
                                                env=self.env(database_url))
        # A read model takes the log's new events a batch per transaction (services.common.replay).
        from services.common.replay import BatchingRunner

        return BatchingRunner(self, projection_class, database_url,
                              batch_size=int(os.environ.get("TANDEM_PROJECTION_BATCH_SIZE", "500")))

    def env(self, database_url: str) -> dict[str, str]:
        app_name = self.application_class.name.upper()
        env: dict[str, str] = {}
        is_foreign = self.application_schema != self.view_schema
        for key, value in eventsourcing_env(
            database_url, self.application_schema, create_table=not is_foreign, pool_size=1, max_overflow=2
        ).items():
            env[f"{app_name}_{key}"] = value
        for key, value in eventsourcing_env(database_url, self.view_schema, pool_size=1, max_overflow=2).items():
            env[f"{self.projection_class.name.upper()}_{key}"] = value
        if self.view_class is None:
            env.update(self._process_recorder_env())
        return env

    @property
    def events_table(self) -> str:
        """The followed log's table, as the library names it."""
        return f"{self.application_schema}.{self.application_class.name.lower()}_events"

    @property
    def tracking_table(self) -> str:
        return f"{self.view_schema}.{self.projection_class.name.lower()}_tracking"

    def create_tables(self, database_url: str) -> None:
        """Create the read model's tables (tracking included) now, so that a read that waits
        on a position finds them before the projection thread has got going."""
        env = Environment(self.projection_class.name,
                          {**eventsourcing_env(database_url, self.view_schema, pool_size=1, max_overflow=0),
                           **(self._process_recorder_env() if self.view_class is None else {})})
        factory = InfrastructureFactory.construct(env)
        try:
            if self.view_class is None:
                factory.process_recorder()  # the service's log (shared with its write side) and tracking
            else:
                factory.tracking_recorder(self.view_class)
        finally:
            factory.close()


class AnnouncingProcessRecorder(UnpipelinedInsert, PostgresProcessRecorder):
    """The library's process recorder, which also announces each tracking position it records
    on the channel read-your-writes waits listen on (as `ReadModel.apply` does), in the same
    transaction: a read waiting for a position a policy handles wakes when it commits."""

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.tracking_channel = projection_channel(f"{self.datastore.schema}.{self.tracking_table_name}")

    def _create_table(self, curs: Any) -> None:
        """The write side and this policy's recorder of one log (on one or more replicas)
        create their tables in turns (the chain's creation lock), each deciding under it."""
        self.hash_chain.serialise_creation(curs)
        refresh_tracking_state(self, curs)
        super()._create_table(curs)

    def _insert_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if kwargs.get("tracking") is not None:
            curs.execute(SQL("NOTIFY {}").format(Identifier(self.tracking_channel)))


PROJECTION_LOCK_CLASS = "tandem.projection-runner"
"""The first key of every projection runner's advisory lock (the two-key form, so that no
single-key advisory lock elsewhere can collide with them); the second is `ProjectionThread.lock_key`."""

_LOCK_CONNECTION = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                    "connect_timeout": 10}
_LOCK_SESSION = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5", "SET tcp_keepalives_count = 3")
"""The server drops the session of a runner whose machine vanished (no FIN, no RST) within about
half a minute, so that its lock passes to a standby; a killed process's session ends at once
(its socket is closed). Set in the session rather than as startup options, which poolers refuse."""


class ProjectionThread(threading.Thread):
    """Keeps one projection runner going: if it stops on an error (the database went away, or
    the followed log's table does not exist yet because its service is still starting), it is
    started again after a pause, doubling up to `max_pause`, and resumes from its tracking
    position.

    One active runner per projection, however many replicas run it: before it processes
    anything, the thread takes the projection's PostgreSQL advisory lock
    (`pg_try_advisory_lock(hashtext('tandem.projection-runner'), hashtext(lock_key))`) on a
    connection of its own, held for as long as the runner runs. Without it, the thread stands
    by (`standing_by`), trying again every `standby_retry` seconds; when the holder's session
    ends (it stopped, crashed or was killed) a standby gets the lock and carries on from the
    tracking position. The holder checks its lock connection every `lock_check_interval`
    seconds and stops its runner when that connection is gone. Exactly once does not rest on
    the lock: a position is recorded with the changes it made, and a second writer of the same
    position fails its transaction."""

    def __init__(self, spec: ProjectionSpec, database_url: str, first_pause: float = 0.2,
                 max_pause: float = 5.0, standby_retry: float = 2.0, lock_check_interval: float = 2.0):
        super().__init__(name=f"projection-{spec.projection_class.name}-{spec.application_class.name}",
                         daemon=True)
        self.spec = spec
        self.database_url = database_url
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.standby_retry = standby_retry
        self.lock_check_interval = lock_check_interval
        self.stopping = threading.Event()
        self.running = threading.Event()
        """Set while this thread holds the lock and its runner runs."""
        self.standing_by = threading.Event()
        """Set while another replica holds the lock and this one waits for it."""
        self.last_error: str | None = None
        self._runner: ProjectionRunner[Any, Any] | None = None

    @property
    def lock_key(self) -> str:
        """What names the projection's lock: `<view schema>.<projection>/<followed app>`."""
        return f"{self.spec.view_schema}.{self.spec.projection_class.name}/{self.spec.application_class.name}"

    @property
    def state(self) -> str:
        """For readiness checks: running, standing by, or not running (and why)."""
        if self.running.is_set():
            return "running"
        if self.standing_by.is_set():
            return "standing by"
        return f"not running ({self.last_error or 'starting'})"

    @property
    def ready(self) -> bool:
        """A standby is as ready as the holder: it takes over when the holder goes."""
        return self.running.is_set() or self.standing_by.is_set()

    def _take_lock(self, conn: psycopg.Connection[Any]) -> bool:
        """Try for the projection's lock until it is ours (True) or the thread stops (False)."""
        while not self.stopping.is_set():
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))",
                               (PROJECTION_LOCK_CLASS, self.lock_key)).fetchone()
            if row is not None and row[0]:
                log.info("projection %s: lock taken, running", self.lock_key)
                return True  # a standby stays `standing_by` (ready) until its runner runs
            if not self.standing_by.is_set():
                log.info("projection %s: another runner holds the lock, standing by", self.lock_key)
                self.standing_by.set()
                self.last_error = None
            self.stopping.wait(self.standby_retry)
        return False

    def run(self) -> None:
        pause = self.first_pause
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True,
                                     fallback_application_name=f"tandem projection lock {self.lock_key}",
                                     **_LOCK_CONNECTION) as lock:
                    for statement in _LOCK_SESSION:
                        lock.execute(statement)
                    if not self._take_lock(lock):
                        break
                    # Built only now, holding the lock: the runner starts from the tracking
                    # position the previous holder left.
                    with self.spec.runner(self.database_url) as runner:
                        self._runner = runner
                        self.running.set()
                        self.standing_by.clear()
                        self.last_error = None
                        pause = self.first_pause
                        checked = time.monotonic()
                        while not self.stopping.is_set():
                            runner.run_forever(timeout=0.5)
                            if runner.is_interrupted.is_set():
                                break
                            if time.monotonic() - checked >= self.lock_check_interval:
                                lock.execute("SELECT 1")  # raises when the lock's session is gone
                                checked = time.monotonic()
            except Exception as e:  # noqa: BLE001 - any failure restarts the runner
                self.last_error = f"{type(e).__name__}: {e}"
                level = logging.INFO if "does not exist" in str(e) else logging.WARNING
                log.log(level, "projection %s on %s stopped, retrying in %.1fs: %s",
                        self.spec.projection_class.name, self.spec.application_class.name, pause, e)
            finally:
                self.running.clear()
                self.standing_by.clear()
                self._runner = None
            self.stopping.wait(pause)
            pause = min(pause * 2, self.max_pause)

    def stop(self) -> None:
        self.stopping.set()
        runner = self._runner
        if runner is not None:
            runner.stop()


def start_runners(specs: Sequence[ProjectionSpec], database_url: str, *, run: bool = True) -> list[ProjectionThread]:
    """A thread per projection, started unless `run` is false (they run elsewhere)."""
    threads = [ProjectionThread(spec, database_url) for spec in specs]
    if run:
        for t in threads:
            t.start()
    return threads


async def stop_runners(threads: Sequence[ProjectionThread], timeout: float = 10) -> None:
    """Stop every runner, then wait for each (the event being processed is finished first)."""
    for t in threads:
        t.stop()
    for t in threads:
        if t.is_alive():
            await asyncio.to_thread(t.join, timeout)

