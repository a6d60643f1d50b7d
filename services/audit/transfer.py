"""`python -m services.audit export` / `import` (`make export`, `make import FILE=...`): the whole
event log of every service as JSON Lines, and back into an empty installation.

The first line describes the file: its format version, when it was written, and per log the
number of events and the head of its hash chain. Then one line per stored event, each log in
notification order: the log, the position, the aggregate id and version, the event type's topic,
its schema version (the event class's `class_version` when it was stored; upcasters read the
older ones) and its state as JSON (metadata included).

An import writes every event back at its position, with the exact bytes it was stored with, and
chains the log again: the head hash it reaches must be the one the file names, or the import
is rolled back. The read models are then built from the imported logs (`services.common.replay`),
so their checksums equal the exporting installation's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.sql import SQL, Identifier

from services.audit import SERVICE_LOGS, read_model_sources
from services.audit.database import connect_database
from services.common.database import ensure_schema, eventsourcing_env
from services.common.hashchain import HashChain, rechain
from services.common.replay import checksum, replay
from services.common.settings import DATA_DIR

FORMAT = "tandem-event-log"
FORMAT_VERSION = 1
BATCH = 2000
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""How the library's JSON transcoder writes a state: re-encoding a decoded state with it gives
the stored bytes back, which the export checks for every event."""


class ImportRefused(Exception):
    """The file cannot be imported here, and nothing was written."""


def register(subparsers: Any) -> None:
    export = subparsers.add_parser("export", help="write every service's event log as JSON Lines",
                                   description=__doc__)
    export.add_argument("--out", type=Path, help="the file to write (default .data/export/tandem-<time>.jsonl)")
    export.set_defaults(run=run_export)
    imp = subparsers.add_parser("import", help="load an export into an empty installation", description=__doc__)
    imp.add_argument("file", type=Path)
    imp.set_defaults(run=run_import)


def _state_json(state: bytes) -> tuple[str, Any]:
    """("state", the decoded JSON) when re-encoding gives the same bytes, else ("stateText", the
    stored text as is), so that an import always writes back exactly what was stored."""
    text = state.decode()
    value = json.loads(text)
    return ("state", value) if _ENCODER.encode(value) == text else ("stateText", text)


def _rows(conn: psycopg.Connection[Any], schema: str, table: str) -> Iterator[tuple[Any, ...]]:
    with conn.cursor(name=f"export_{table}") as cur:
        cur.itersize = BATCH
        cur.execute(SQL("SELECT notification_id, originator_id, originator_version, topic, state FROM {}.{} "
                        "ORDER BY notification_id").format(Identifier(schema), Identifier(table)))
        yield from cur


def _head(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, str | None]:
    chain = HashChain(schema, table)
    if conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{table}"',)).fetchone()[0] is None:
        return 0, None
    count = conn.execute(SQL("SELECT count(*) FROM {}.{}").format(Identifier(schema), Identifier(table))).fetchone()[0]
    head = conn.execute(chain.head_statement).fetchone()
    return int(count), (bytes(head[1]).hex() if head else None)


def export(database_url: str, out: IO[str]) -> dict[str, Any]:
    """Write the header and every event; return the header. One snapshot for all logs."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        logs = {}
        for name, schema, table in SERVICE_LOGS:
            count, head = _head(conn, schema, table)
            logs[name] = {"schema": schema, "table": table, "events": count, "chainHead": head}
        header = {"format": FORMAT, "formatVersion": FORMAT_VERSION,
                  "exportedAt": datetime.now(UTC).isoformat(), "logs": logs}
        out.write(json.dumps(header) + "\n")
        for name, schema, table in SERVICE_LOGS:
            if not logs[name]["events"]:
                continue
            for position, originator_id, version, topic, state in _rows(conn, schema, table):
                key, value = _state_json(bytes(state))
                version_of_schema = value.get("class_version", 1) if key == "state" else \
                    json.loads(value).get("class_version", 1)
                out.write(json.dumps({"log": name, "position": position, "originatorId": str(originator_id),
                                      "originatorVersion": version, "topic": topic,
                                      "schemaVersion": version_of_schema, key: value}, ensure_ascii=False) + "\n")
    return header


def _create_logs(database_url: str) -> None:
    """The services' schemas and logs (events, chain and idempotency tables), as the services
    create them on start-up."""
    from services.goals.application import Goals
    from services.metrics.application import Metrics

    for app_class, schema in ((Goals, "goals"), (Metrics, "metrics")):
        ensure_schema(database_url, schema)
        app_class(env=eventsourcing_env(database_url, schema)).close()


def import_file(database_url: str, lines: IO[str]) -> dict[str, int]:
    """Load an export into an installation whose logs are empty; returns events per log."""
    header = json.loads(lines.readline() or "{}")
    if header.get("format") != FORMAT or header.get("formatVersion") != FORMAT_VERSION:
        raise ImportRefused(f"not a {FORMAT} file of format version {FORMAT_VERSION}")
    _create_logs(database_url)
    tables = {name: (schema, table) for name, schema, table in SERVICE_LOGS}
    counts = dict.fromkeys(tables, 0)
    with psycopg.connect(database_url) as conn, conn.transaction():
        for name, (schema, table) in tables.items():
            conn.execute(SQL("LOCK TABLE {}.{} IN EXCLUSIVE MODE").format(Identifier(schema), Identifier(table)))
            if conn.execute(SQL("SELECT EXISTS (SELECT FROM {}.{})").format(
                    Identifier(schema), Identifier(table))).fetchone()[0]:
                raise ImportRefused(f"the {name} log is not empty: import only into an empty installation")
        with conn.cursor() as cur:
            copying: tuple[str, ExitStack, Any] | None = None  # one COPY at a time per connection
            try:
                for line in lines:
                    record = json.loads(line)
                    name = record["log"]
                    if name not in tables:
                        raise ImportRefused(f"unknown log {name!r} at line {sum(counts.values()) + 2}")
                    if copying is None or copying[0] != name:
                        if copying is not None:
                            copying[1].close()
                        schema, table = tables[name]
                        stack = ExitStack()
                        copy = stack.enter_context(cur.copy(SQL(
                            "COPY {}.{} (notification_id, originator_id, originator_version, topic, state) "
                            "FROM STDIN").format(Identifier(schema), Identifier(table))))
                        copying = (name, stack, copy)
                    state = record["stateText"] if "stateText" in record else _ENCODER.encode(record["state"])
                    copying[2].write_row((record["position"], record["originatorId"], record["originatorVersion"],
                                          record["topic"], state.encode()))
                    counts[name] += 1
            finally:
                if copying is not None:
                    copying[1].close()
        for name, (schema, table) in tables.items():
            expected = header["logs"].get(name, {})
            if counts[name] != expected.get("events", 0):
                raise ImportRefused(f"the {name} log has {counts[name]} events, the header says "
                                    f"{expected.get('events', 0)}")
            reached = rechain(conn, schema, table)
            if reached != expected.get("chainHead"):
                raise ImportRefused(f"the {name} log's chain ends at {reached}, the file says "
                                    f"{expected.get('chainHead')}: the file was altered")
    return counts


def build_read_models(database_url: str, out: IO[str]) -> None:
    """Every read model from the imported logs, with its checksum."""
    for source in read_model_sources():
        report = replay(source, database_url, source.schema)
        with psycopg.connect(database_url) as conn:
            digest = checksum(conn, source, source.schema).digest
        print(f"{source.label:<24} {report.events:>9} events  checksum {digest}", file=out, flush=True)


def run_export(args: argparse.Namespace) -> int:
    path = args.out or DATA_DIR / "export" / f"tandem-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect_database() as url, path.open("w", encoding="utf-8") as out:
        header = export(url, out)
    for name, log in header["logs"].items():
        print(f"{name:<8} {log['events']:>9} events   chain head {log['chainHead']}")
    print(f"written to {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    with connect_database() as url:
        try:
            with args.file.open(encoding="utf-8") as lines:
                counts = import_file(url, lines)
        except (ImportRefused, json.JSONDecodeError, KeyError) as e:
            print(f"import refused, nothing written: {e}", file=sys.stderr)
            return 1
        for name, count in counts.items():
            print(f"{name:<8} {count:>9} events imported, chain verified")
        build_read_models(url, sys.stdout)
    return 0
