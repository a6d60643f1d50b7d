"""Read models as they stood at an instant: what auditors replay.

An as-of read names up to two instants:

- `known_at`, recorded time: only the events the logs held then ("what did we know on 31
  March"). Left out: everything recorded so far.
- `as_of`, valid time: only what was in force at that instant ("about the state on 31 March").
  An event with a valid-time field (a check-in's `valid_on`, a measurement's `measured_at`, a
  move's `effective_on`, a target's `effective_from`, a join, a leaving, a dissolution) counts
  from that time, any other event from the time it was recorded. Left out: now.

The read model for an instant is the live read model's own projection run again over the events
the instant keeps, into a schema of its own (`services.common.replay`), so an as-of answer is
computed by exactly the code that computes the live one. The schema is kept (a few per process,
least recently used dropped) and brought up to date before each read, so a backdated check-in
recorded after the first as-of read still shows in the next one. Building one costs a replay of
the logs up to the instant; reads after that cost what live reads cost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any

import asyncpg
import psycopg
from fastapi import Query, Request

from services.common.database import check_identifier
from services.common.problems import Problem
from services.common.projections import ProjectionSpec
from services.common.replay import ReadModelSource, drop_schema, read_model_sources, replay
from services.common.schemas import IsoDateTime

log = logging.getLogger(__name__)

VALID_TIME_FIELDS = ("valid_on", "measured_at", "effective_on", "effective_from", "joined_on", "left_on",
                     "dissolved_on")
AS_OF_SETTING = "tandem.as_of"
"""Set on an as-of read's connections to the valid-time instant, for SQL that needs "today"."""


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _field(event: Any, name: str) -> Any:
    data = getattr(event, "data", None)
    return data.get(name) if isinstance(data, dict) else getattr(event, name, None)


def valid_time_of(event: Any) -> datetime | date | None:
    """The day or moment an event's value applies to, if it says (its first valid-time field)."""
    for name in VALID_TIME_FIELDS:
        value = _field(event, name)
        if isinstance(value, datetime | date):
            return value
    return None


def valid_time(event: Any) -> datetime | date:
    """When an event takes effect: its valid-time field if it has one, else its recorded time."""
    when = valid_time_of(event)
    return event.timestamp if when is None else when


@dataclass(frozen=True)
class Instant:
    """A point in valid time seen from a point in recorded time (either may be left out)."""

    as_of: datetime | None = None
    known_at: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "as_of", self.as_of and _utc(self.as_of))
        object.__setattr__(self, "known_at", self.known_at and _utc(self.known_at))

    @property
    def is_now(self) -> bool:
        return self.as_of is None and self.known_at is None

    @property
    def moment(self) -> datetime:
        """The instant reads are about: `as_of`, else `known_at`, else now."""
        return self.as_of or self.known_at or datetime.now(UTC)

    def keep(self, event: Any) -> bool:
        if self.known_at is not None and _utc(event.timestamp) > self.known_at:
            return False
        if self.as_of is None:
            return True
        when = valid_time(event)
        if isinstance(when, datetime):
            return _utc(when) <= self.as_of
        return when <= self.as_of.date()

    @property
    def key(self) -> str:
        text = f"{self.as_of and self.as_of.isoformat()}|{self.known_at and self.known_at.isoformat()}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def instant_of(
    as_of: Annotated[IsoDateTime | None, Query(
        description="Read as things stood at this instant (valid time): check-ins, measurements and "
                    "moves count from the time they apply to, anything else from when it was recorded.")] = None,
    known_at: Annotated[IsoDateTime | None, Query(
        description="Read only what had been recorded by this instant (recorded time). With as_of: "
                    "what was known then about that instant.")] = None,
) -> Instant:
    """The as-of query parameters of a read."""
    now = datetime.now(UTC)
    for name, value in (("as_of", as_of), ("known_at", known_at)):
        if value is not None and _utc(value) > now:
            raise Problem(422, "Unprocessable Content", f"{name} is in the future.", kind="validation",
                          errors=[{"field": name, "message": "must not be in the future"}])
    return Instant(as_of, known_at)


class AsOfViews:
    """A process's read models at past instants, each in a schema of its own.

    The schemas are this process's (their names carry a token of it), so no other process drops
    one under a read; those a process leaves behind are dropped by `sweep` once unused for a day.
    """

    REGISTRY = "as_of_views"

    def __init__(self, database_url: str, specs: Sequence[ProjectionSpec], schema: str, keep: int = 6):
        self.database_url = database_url
        self.sources: list[ReadModelSource] = read_model_sources(specs)
        self.schema = check_identifier(schema)
        self.keep = keep
        self.token = secrets.token_hex(3)
        self.pools: OrderedDict[str, asyncpg.Pool] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def schema_for(self, instant: Instant) -> str:
        return f"{self.schema}_asof_{self.token}_{instant.key}"

    async def pool(self, instant: Instant) -> asyncpg.Pool:
        """A pool reading the read model as of `instant`, brought up to date with the logs."""
        schema = self.schema_for(instant)
        lock = self._locks.setdefault(schema, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self._catch_up, schema, instant)
            pool = self.pools.get(schema)
            if pool is None:
                pool = await asyncpg.create_pool(
                    self.database_url, min_size=0, max_size=2,
                    server_settings={"search_path": schema, "jit": "off",
                                     AS_OF_SETTING: instant.moment.isoformat()})
                self.pools[schema] = pool
            self.pools.move_to_end(schema)
        await self._evict()
        return pool

    def _catch_up(self, schema: str, instant: Instant) -> None:
        self._register(schema)
        for source in self.sources:
            replay(source, self.database_url, schema, keep=instant.keep)

    @classmethod
    def create_registry(cls, database_url: str, schema: str) -> None:
        """The table of a service's as-of schemas and when each was last read; created with the
        service's other tables at start-up (one replica at a time), not on a read."""
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {check_identifier(schema)}.{cls.REGISTRY} "
                         "(schema_name text PRIMARY KEY, last_used timestamptz NOT NULL)")

    def _register(self, schema: str) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {self.schema}.{self.REGISTRY} VALUES (%s, now()) "
                         "ON CONFLICT (schema_name) DO UPDATE SET last_used = now()", (schema,))

    async def _evict(self) -> None:
        while len(self.pools) > self.keep:
            schema, pool = self.pools.popitem(last=False)
            await pool.close()
            await asyncio.to_thread(self._drop, schema)

    def _drop(self, schema: str) -> None:
        drop_schema(self.database_url, schema)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"DELETE FROM {self.schema}.{self.REGISTRY} WHERE schema_name = %s", (schema,))

    def sweep(self, unused_for: str = "1 day") -> None:
        """Drop the as-of schemas nobody has read for a while (left by stopped processes)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            stale = [r[0] for r in conn.execute(
                f"SELECT schema_name FROM {self.schema}.{self.REGISTRY} WHERE last_used < now() - %s::interval",
                (unused_for,))]
        for schema in stale:
            self._drop(schema)

    async def close(self, drop: bool = True) -> None:
        for schema, pool in list(self.pools.items()):
            await pool.close()
            if drop:
                await asyncio.to_thread(self._drop, schema)
        self.pools.clear()


async def read_pool(request: Request, instant: Instant) -> asyncpg.Pool:
    """The live pool, or for an as-of read the pool of the read model at that instant."""
    if instant.is_now:
        return request.app.state.pool
    return await request.app.state.as_of_views.pool(instant)
