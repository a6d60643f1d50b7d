"""Write-side plumbing around the `eventsourcing` library.

Every stored event records who did it, within which request and trace, and what caused it
(DESIGN.md, "Write side"). The domain stays pure: the metadata is added by the mapper when an
event is stored, from the command context of the request that saved it, under the key `meta`.
The event's own `timestamp` is its recorded time; a valid time, where one applies, is a field
of the domain event.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from typing import Any, ClassVar, TypeVar

from eventsourcing import persistence
from eventsourcing.domain import Aggregate, MutableOrImmutableAggregate
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    IntegrityError,
    JSONTranscoder,
    Mapper,
    StoredEvent,
    Transcoding,
    UUIDAsHex,
)
from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier
from starlette.concurrency import run_in_threadpool
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from services.common.idempotency import (
    IdempotencyClaim,
    IdempotentRecorder,
    KeyReused,
    KeyTaken,
    StoredAnswer,
    current_claim,
    reset_claim,
    set_claim,
)
from services.common.snapshots import SnapshottingApplication
from services.common.telemetry import command_name, command_span, in_current_trace

T = TypeVar("T")
log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 100
"""Events between snapshots of an aggregate with a long history (key results, KPIs)."""


@dataclass(frozen=True)
class CommandContext:
    """Who asked for a change, and within which request and trace."""

    actor: str
    correlation_id: str
    causation_id: str | None = None
    trace_id: str | None = None

    def caused_by(self, causation_id: str) -> CommandContext:
        return replace(self, causation_id=causation_id)


SYSTEM_CONTEXT = CommandContext(actor="system", correlation_id="system")
_current_context: contextvars.ContextVar[CommandContext] = contextvars.ContextVar(
    "tandem_command_context", default=SYSTEM_CONTEXT
)


def current_context() -> CommandContext:
    return _current_context.get()


def new_correlation_id() -> str:
    return uuid.uuid4().hex


class MetadataMapper(Mapper[uuid.UUID]):
    """Adds the command context to each stored event's state under `meta`."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        self.stamp(domain_event)
        return super().to_stored_event(domain_event)

    @staticmethod
    def stamp(domain_event: Any) -> dict[str, Any] | None:
        """Give the event the current command context's `meta` (a copy), unless it has one: the
        context's own `meta` (shared: never to change) when it stamped, else None."""
        if "meta" in vars(domain_event):
            return None
        meta = context_meta(current_context())
        object.__setattr__(domain_event, "meta", dict(meta))
        return meta


@functools.lru_cache(maxsize=256)
def context_meta(context: CommandContext) -> dict[str, Any]:
    """A context's `meta`, worked out once per context (`asdict` per event was a tenth of the
    time a bulk load of measurements spent encoding its events); each event gets a copy."""
    return asdict(context)


class DateAsISO(Transcoding):
    """Valid times that are days (a check-in's date) are stored as ISO dates."""

    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


def standard_transcoder() -> JSONTranscoder:
    """The JSON encoding of stored event state: plain JSON with tagged UUIDs, datetimes and
    decimals. Followers in other services decode it with this alone, without domain classes."""
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DatetimeAsISO(), DecimalAsStr(), DateAsISO()):
        transcoder.register(transcoding)
    return transcoder


class ConcurrentWrite(Exception):
    """The aggregate changed between load and save, and retrying did not help."""


class VersionMismatch(Exception):
    """The client's If-Match names another version than the aggregate's current one."""

    def __init__(self, expected: int, actual: int):
        super().__init__(f"expected version {expected}, current version is {actual}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Written:
    """What a command tells its caller: the aggregate, its new version (the ETag) and the log
    position of the last event stored (for read-your-writes)."""

    id: uuid.UUID
    version: int
    position: int


class TandemApplication(SnapshottingApplication):
    """An `eventsourcing` Application that stamps metadata and reports log positions. Its
    snapshots go through a transcoder of their own (`services.common.snapshots`): each
    application registers its domain's types in `register_snapshot_transcodings`."""

    env: ClassVar[dict[str, str]] = {
        "AGGREGATE_CACHE_MAXSIZE": "10000",
        "APPLICATION_RECORDER_TOPIC": "services.common.idempotency:IdempotentRecorder",
    }

    def construct_mapper(self) -> Mapper[uuid.UUID]:
        return self.factory.mapper(transcoder=self.construct_transcoder(), mapper_class=MetadataMapper)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """The library's save; under an Idempotency-Key, the first save of the command also
        records the key, in the same transaction (see services.common.idempotency)."""
        claim = current_claim()
        if claim is not None and not claim.used:
            primary = next((o for o in objs if isinstance(o, Aggregate)), None)
            if primary is not None:
                kwargs["idempotency"] = (claim, primary.id, primary.version)
        recordings = super().save(*objs, **kwargs)
        if claim is not None and "idempotency" in kwargs:
            claim.used = True
        return recordings

    def _take_snapshots(self, processing_event: Any) -> None:
        """A snapshot of each aggregate whose save crossed a multiple of its class's interval in
        `snapshotting_intervals`, taken from the aggregate as saved (the library's own reloads
        it, once per multiple: a bulk save of 10,000 measurements would reload it 100 times).
        Loading replays at most an interval's events on top of the latest snapshot. A snapshot
        is only a shortcut: one that cannot be written is logged, and the save, which is
        committed already, stands."""
        if not (self.snapshots and self.snapshotting_intervals):
            return
        versions: dict[uuid.UUID, list[int]] = {}
        for event in processing_event.events:
            versions.setdefault(event.originator_id, []).append(event.originator_version)
        for aggregate_id, saved in versions.items():
            aggregate = processing_event.aggregates.get(aggregate_id)
            interval = self.snapshotting_intervals.get(type(aggregate))
            if aggregate is None or not interval or (min(saved) - 1) // interval == max(saved) // interval:
                continue
            try:
                snapshot_class = getattr(type(aggregate), "Snapshot", type(self).snapshot_class)
                self.snapshots.put([snapshot_class.take(aggregate)])
                self._prune_snapshots(aggregate_id, aggregate.version)
            except Exception:  # noqa: BLE001 - a missing snapshot costs a longer replay, nothing else
                log.warning("no snapshot of %s at version %s", aggregate_id, aggregate.version, exc_info=True)

    def _prune_snapshots(self, aggregate_id: uuid.UUID, version: int) -> None:
        """Delete the aggregate's snapshots older than the one just taken. Loading only ever
        starts from the latest, and a KPI's snapshot holds its whole series, so keeping them all
        would store a long history over and over. A read of an older version (`get(id,
        version=n)`) replays from the start instead: the events, not snapshots, are the record."""
        recorder = self.snapshots.recorder  # type: ignore[union-attr]
        if not isinstance(recorder, PostgresAggregateRecorder):
            return  # in memory (the domain's unit tests): nothing stored to prune
        statement = SQL("DELETE FROM {}.{} WHERE originator_id = %s AND originator_version < %s").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        with recorder.datastore.transaction(commit=True) as cursor:
            cursor.execute(statement, (aggregate_id, version))

    def answer_once(self, claim: IdempotencyClaim, command: Callable[..., Written], *args: Any,
                    **kwargs: Any) -> tuple[Written, StoredAnswer | None]:
        """Run the command under the claim, unless the key already has an answer: then that
        answer (second item) and no new events. The same key with another request: KeyReused."""
        recorder: IdempotentRecorder = self.recorder  # type: ignore[assignment]
        for _ in range(3):
            answer = recorder.stored_answer(claim.subject, claim.key)
            if answer is not None:
                if answer.request_hash != claim.request_hash:
                    raise KeyReused(claim.key)
                return Written(answer.aggregate_id, answer.version, answer.position), answer
            token = set_claim(claim)
            try:
                return command(*args, **kwargs), None
            except KeyTaken:
                continue  # a twin request committed first: answer as it was answered
            finally:
                reset_claim(token)
        raise ConcurrentWrite(f"Idempotency-Key {claim.key!r} kept being taken")

    def up_to_date_cached(self, *aggregate_ids: uuid.UUID, copy_first: bool = False) -> list[Any] | None:
        """The cached instances of these aggregates, each brought up to date with the log, as the
        library's cache does on `repository.get` (its fast-forward), but with ONE query for all
        of them, where `get` reads each one's new events in a round trip of its own (a pooled
        connection, its check, the SELECT: a check-in loads three aggregates), holding the
        aggregate's lock across it (so every check-in in a cycle queued on the cycle's lock). The
        instances themselves, to look at, never to change; `copy_first`: the first one a copy
        (to change), taken under its lock. None when one of them is not cached (or the cache
        does not fast-forward), or the query met a connection error: load them one by one then
        (`repository.get`, which retries).

        Each aggregate is fast-forwarded under the library's own lock for it (the cache's
        fast-forward is not thread-safe without it), with only the events after the version it
        has by then: another thread may have brought it further meanwhile, never less far."""
        repository = self.repository
        cache = repository.cache
        if cache is None or not repository.fastforward or not aggregate_ids:
            return None
        try:
            cached = [cache.get(i) for i in aggregate_ids]
        except KeyError:
            return None
        recorder: Any = self.recorder
        if any(a is None for a in cached) or not isinstance(recorder, PostgresAggregateRecorder):
            return None  # in memory (the domain's unit tests): the library's way
        try:
            # Rows as tuples: the pool's dict rows build their keys again for every query.
            with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
                curs.execute(self._select_after, ([a.id for a in cached], [a.version for a in cached]),
                             prepare=True)
                rows = curs.fetchall()
        except (persistence.InterfaceError, persistence.OperationalError):
            return None
        newer: dict[Any, list[StoredEvent]] = {}
        for originator_id, version, topic, state in rows:
            newer.setdefault(originator_id, []).append(StoredEvent(
                originator_id=originator_id, originator_version=version, topic=topic, state=bytes(state)))
        mapper = repository.event_store.mapper
        out = list(cached)
        for n, aggregate in enumerate(cached):
            stored = newer.get(aggregate.id, ())
            if not stored and not (copy_first and n == 0):
                continue
            lock = repository._use_fastforward_lock(aggregate.id)  # noqa: SLF001 - the library's per-aggregate lock
            try:
                with lock:
                    for event in stored:
                        if event.originator_version > aggregate.version and \
                                mapper.to_domain_event(event).mutate(aggregate) is not aggregate:
                            return None  # not an aggregate mutated in place: the library's way then
                    if copy_first and n == 0:
                        out[0] = copy.deepcopy(aggregate)
            finally:
                repository._disuse_fastforward_lock(aggregate.id)  # noqa: SLF001
        return out

    @functools.cached_property
    def _select_after(self) -> Any:
        """Every event after a given version of each of the given aggregates, in their order."""
        recorder: Any = self.recorder
        id_type = "uuid" if recorder.datastore.originator_id_type == "uuid" else "text"
        statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state FROM {}.{} e "
            "JOIN unnest(%s::{}[], %s::bigint[]) AS n(id, version) "
            "ON e.originator_id = n.id AND e.originator_version > n.version "
            "ORDER BY e.originator_id, e.originator_version").format(
                Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name), SQL(id_type))
        return statement

    def save_written(self, aggregate: MutableOrImmutableAggregate[uuid.UUID]) -> Written:
        """Save, and say where the aggregate's events landed."""
        recordings = self.save(aggregate)
        position = max((r.notification.id for r in recordings), default=0)
        return Written(aggregate.id, aggregate.version, position)

    def position(self) -> int:
        return int(self.recorder.max_notification_id() or 0)

    @staticmethod
    def check_version(aggregate: MutableOrImmutableAggregate[uuid.UUID], expected: int | None) -> None:
        if expected is not None and aggregate.version != expected:
            raise VersionMismatch(expected, aggregate.version)


_RETRY_TURNS = tuple(threading.Lock() for _ in range(64))
"""Striped locks, by a command's first argument (the aggregate's id, for most commands): the
retries of commands that lost a race on one aggregate take turns within a process."""


def retry_on_conflict(fn: Callable[..., T]) -> Callable[..., T]:
    """Re-run a command whose save lost a race with another writer of the same aggregate.

    The first attempt runs at once. A command that lost retries holding its aggregate's turn
    (`_RETRY_TURNS`), so that many concurrent writers of one aggregate (64 check-ins on one key
    result) are applied one after the other instead of colliding again and again until some run
    out of attempts (409); a retry can then only lose to a first attempt or another process.

    A command with an explicit expected version (If-Match) is not retried: the client asked
    to write over one version only, and `VersionMismatch` tells it so.
    """
    retrying = retry(
        retry=retry_if_exception_type(IntegrityError),
        stop=stop_after_attempt(20),
        wait=wait_random_exponential(multiplier=0.002, max=0.1),
        reraise=True,
    )(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except IntegrityError:
            pass
        turn = _RETRY_TURNS[hash(args[1] if len(args) > 1 else fn.__qualname__) % len(_RETRY_TURNS)]
        with turn:
            try:
                return retrying(*args, **kwargs)
            except IntegrityError as e:
                raise ConcurrentWrite(str(e)) from e

    return wrapper


@contextlib.contextmanager
def in_context(context: CommandContext) -> Iterator[None]:
    """Run what follows (synchronously) under a command context: the events it saves carry it."""
    token = _current_context.set(context)
    try:
        yield
    finally:
        _current_context.reset(token)


async def run_command(context: CommandContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a synchronous command in the thread pool under the request's command context."""

    def call() -> T:
        with in_context(context):
            return fn(*args, **kwargs)

    # A span for the command; the thread runs it (and the append inside) in the request's trace.
    with command_span(command_name(fn, args), context.actor, context.correlation_id):
        return await run_in_threadpool(in_current_trace(call))


def topic_event_type(topic: str) -> str:
    """`services.goals.domain:KeyResult.Progressed` -> `KeyResultProgressed`.

    The contract's name for an event type: its aggregate and its past-tense verb.
    """
    qualname = topic.split(":", 1)[1]
    return "".join(qualname.split("."))


def event_classes(aggregate: type) -> list[type]:
    """The event classes an aggregate records: its nested events, less the library's base
    `Event` class and a default `Created` class the aggregate does not use (an aggregate whose
    creation event is named otherwise, such as `KPI.Defined`, still inherits one)."""
    from eventsourcing.domain import CanInitAggregate, CanMutateAggregate, _created_event_classes

    used_created = set(_created_event_classes.get(aggregate, ()))
    return [
        v for k, v in vars(aggregate).items()
        if isinstance(v, type) and issubclass(v, CanMutateAggregate) and k != "Event"
        and (not issubclass(v, CanInitAggregate) or v in used_created)
    ]


def event_types(aggregates: Sequence[type]) -> dict[str, type]:
    """Contract event type name -> event class, for every event the aggregates record."""
    from eventsourcing.utils import get_topic

    return {topic_event_type(get_topic(c)): c for a in aggregates for c in event_classes(a)}
