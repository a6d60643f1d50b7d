"""PostgreSQL plumbing: one DATABASE_URL, one schema per service.

The write side (the `eventsourcing` library) uses psycopg 3 and is configured through its own
environment keys, which `eventsourcing_env` derives from the URL. The read side uses asyncpg.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

import asyncpg
import psycopg

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def check_identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def url_parts(database_url: str) -> dict[str, str]:
    parts = urlsplit(database_url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("DATABASE_URL must start with postgresql://")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
        "dbname": unquote(parts.path.lstrip("/") or "postgres"),
    }


def eventsourcing_env(
    database_url: str, schema: str, *, create_table: bool = True, pool_size: int = 2, max_overflow: int = 10,
) -> dict[str, str]:
    """The `eventsourcing` library's PostgreSQL settings for one schema.

    The library opens `pool_size` connections at once and up to `max_overflow` more under load;
    the defaults suit a write side, and projections ask for fewer (they work one event at a time).
    """
    p = url_parts(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": p["dbname"],
        "POSTGRES_HOST": p["host"],
        "POSTGRES_PORT": p["port"],
        "POSTGRES_USER": p["user"],
        "POSTGRES_PASSWORD": p["password"],
        "POSTGRES_SCHEMA": check_identifier(schema),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(max_overflow),
        "POSTGRES_PRE_PING": "y",
        "POSTGRES_LOCK_TIMEOUT": "5",
        # How long a command waits for a pooled connection (the library's default is 30 s): with
        # the database down, a write is refused (503, Retry-After) after this, not half a minute.
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "CREATE_TABLE": "y" if create_table else "n",
    }


def ensure_schema(database_url: str, schema: str) -> None:
    """Create the service's own schema; a service never creates another's."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{check_identifier(schema)}"')


@contextmanager
def creating_tables(database_url: str, schema: str) -> Iterator[None]:
    """Replicas of a service starting together create its tables in turns: each CREATE ... IF
    NOT EXISTS of one replica can still collide in the catalogue with the other's (a table's row
    type "already exists"), and the library decides some things (a tracking table's migration)
    before its own transaction. A session advisory lock, held while the block runs, released
    when it ends or the process dies."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"tandem.create-tables {schema}",))
        yield


async def create_pool(database_url: str, schema: str, size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool whose search_path is the service's schema."""
    return await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        # JIT compiles a plan for the row counts it expects: on a read model's recursive CTEs it
        # guesses millions of rows and spends ~100 ms compiling a query that runs in 10.
        server_settings={"search_path": f"{check_identifier(schema)},public", "jit": "off"},
    )


async def tracking_position(
    conn: asyncpg.Connection | asyncpg.Pool, tracking_table: str, application_name: str
) -> int:
    """How far a projection has processed one application's event log (0: nothing yet)."""
    row = await conn.fetchval(
        f"SELECT max(notification_id) FROM {tracking_table} WHERE application_name = $1",
        application_name,
    )
    return int(row or 0)


async def wait_for_position(
    pool: asyncpg.Pool,
    tracking_table: str,
    application_name: str,
    position: int,
    timeout: float,
) -> bool:
    """Wait until the projection has processed `position`; False on timeout.

    It listens for the notification the projection sends after each committed batch rather
    than polling on a timer, and re-reads the tracking row after every wake-up.
    """
    async with pool.acquire() as conn:
        woken = asyncio.Event()

        def wake(*_: object) -> None:
            woken.set()

        channel = projection_channel(tracking_table)
        await conn.add_listener(channel, wake)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                if await tracking_position(conn, tracking_table, application_name) >= position:
                    return True
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return False
                woken.clear()
                try:
                    await asyncio.wait_for(woken.wait(), timeout=min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            await conn.remove_listener(channel, wake)


async def log_head(conn: asyncpg.Connection | asyncpg.Pool, events_table: str) -> int:
    """The position of the last event stored in a log (0 for an empty or not yet created one)."""
    try:
        return int(await conn.fetchval(f"SELECT max(notification_id) FROM {events_table}") or 0)
    except asyncpg.UndefinedTableError:
        return 0


def projection_channel(tracking_table: str) -> str:
    """The LISTEN/NOTIFY channel a projection announces its progress on."""
    return "tracking_" + tracking_table.replace(".", "_")
