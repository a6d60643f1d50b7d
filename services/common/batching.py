"""A batch of events applied to a read model in a few round trips, whatever its size.

`ReadModel.batch()` (services.common.projections) runs one `Batch` per transaction. The rows
come out exactly as if each event had been applied on its own, one statement after another;
only the number of round trips changes:

- Statements a handler gives `ReadModel.apply` go out at once in psycopg's pipeline mode (a
  run of the same statement as one `executemany`): nothing waits for the server until
  something is read or the batch ends.
- Held tables (`Held`, listed in `ReadModel.held`: the ones most events change) are kept in
  memory for the batch. The rows its events touch are loaded with one `= ANY` statement per
  table (`prefetch(events)` of the projection, called before the first event, says which; a
  row it did not name is loaded when asked for), changed in memory by the handlers
  (`HeldRows.insert`, `update`), and written once at the end of the batch: one statement per
  table and shape of change (`INSERT ... SELECT ... FROM json_populate_recordset`,
  `UPDATE ... FROM json_populate_recordset`).
- Work to do once per batch rather than once per event (a key result's current value and
  forecast) is queued with `ReadModel.later(finish)`, a dict the handlers fill; at the end of
  the batch, before the held rows are written, `finish(items)` runs once.
- A statement or a query that names a held table (`{schema}.name`) first runs the queued work
  and sends that table's pending writes, so it sees what the events before it did; a statement
  that may write it (anything but a SELECT) also drops the rows held of it, which are loaded
  again when next asked for. So a rare event can keep its plain SQL beside the held tables.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson
from psycopg.types.json import Jsonb

if TYPE_CHECKING:
    from services.common.projections import ReadModel

Row = dict[str, Any]
Key = Any
Statement = tuple[str, Sequence[Any]]
Finish = Callable[[dict[Any, Any]], None]

_TABLE = re.compile(r"\{schema\}\.(\w+)")


@functools.lru_cache(maxsize=1024)
def tables_named(sql: str) -> frozenset[str]:
    """The tables of the read model's schema a statement names (`{schema}.name`)."""
    return frozenset(_TABLE.findall(sql))


@functools.lru_cache(maxsize=1024)
def _only_reads(sql: str) -> bool:
    return sql.lstrip().upper().startswith("SELECT")


@dataclass(frozen=True)
class Held:
    """A table a batch holds in memory: rows keyed by `key` (its primary key)."""

    name: str
    key: tuple[str, ...] = ("id",)
    group: str | None = None
    """A key column by which all rows can be loaded at once (a key result's check-ins); a table
    with a composite key needs one, as rows are loaded by group."""
    json: tuple[str, ...] = ()
    """Columns of type json or jsonb (their values are Python objects, as psycopg loads them)."""
    columns: tuple[str, ...] | None = None
    """The columns the handlers read, loaded beside the key (None: all of them). Rows inserted in
    the batch have every column they were given; a column changed need not be loaded."""
    blind: bool = False
    """Rows are only inserted, never read back (measurements): nothing is loaded, and a row
    whose key is already stored is left as it is, as `INSERT ... ON CONFLICT DO NOTHING` does."""

    def __post_init__(self) -> None:
        assert self.blind or len(self.key) == 1 or self.group in self.key, self

    @property
    def select(self) -> str:
        if self.columns is None:
            return f"SELECT * FROM {{schema}}.{self.name}"
        columns = dict.fromkeys((*self.key, *((self.group,) if self.group else ()), *self.columns))
        return f"SELECT {', '.join(columns)} FROM {{schema}}.{self.name}"


class HeldRows:
    """One held table's rows within one batch: those loaded, inserted and changed.

    A table with a group keeps its rows per group value, then by the rest of the key (a key
    result's check-ins by version), so that loading many rows hashes few uuids."""

    def __init__(self, batch: Batch, spec: Held) -> None:
        self.batch = batch
        self.spec = spec
        self._rows: dict[Any, Row | None] = {}
        """Rows known in this batch by key (None: neither stored nor inserted), without a group."""
        self._groups: dict[Any, dict[Any, Row]] = {}
        """With a group: the rows known of each group, by the rest of the key."""
        self._loaded_groups: set[Any] = set()
        self.size = 0
        """About how many rows are held (rows loaded or inserted), to bound what a replay keeps."""
        self._new: dict[Key, Row] = {}
        self._changed: dict[Key, set[str]] = {}
        self._key = operator.itemgetter(*spec.key)
        """A row's key: the value of a one-column key, else a tuple."""
        if spec.group is not None:
            rest = [i for i, column in enumerate(spec.key) if column != spec.group]
            self._group_of_key = operator.itemgetter(spec.key.index(spec.group))
            self._rest_of_key = operator.itemgetter(*rest)
            self._rest_of_row = operator.itemgetter(*(spec.key[i] for i in rest))

    @property
    def pending(self) -> bool:
        return bool(self._new or self._changed)

    def _lookup(self, key: Any) -> Row | None:
        if self.spec.group is None:
            return self._rows.get(key)
        bucket = self._groups.get(self._group_of_key(key))
        return None if bucket is None else bucket.get(self._rest_of_key(key))

    def _remember(self, key: Any, row: Row) -> None:
        self.size += 1
        if self.spec.group is None:
            self._rows[key] = row
        else:
            self._groups.setdefault(self._group_of_key(key), {})[self._rest_of_key(key)] = row

    # Loading: rows not held yet, one statement for many; what memory holds is never replaced.

    def load(self, keys: Iterable[Any]) -> None:
        """Load the stored rows of these keys (a one-column key's values)."""
        assert not self.spec.blind and len(self.spec.key) == 1 and self.spec.group is None, self.spec
        wanted = set(keys) - self._rows.keys()
        if not wanted:
            return
        column = self.spec.key[0]
        rows = self._rows
        for row in self.batch.fetch(f"{self.spec.select} WHERE {column} = ANY(%s)", (list(wanted),), binary=True):
            rows.setdefault(row[column], row)
        for key in wanted:
            rows.setdefault(key, None)
        self.size += len(wanted)

    def load_groups(self, values: Iterable[Any]) -> None:
        """Load every stored row of these groups (`Held.group`)."""
        assert self.spec.group is not None, self.spec
        wanted = set(values) - self._loaded_groups
        if not wanted:
            return
        group, rest, groups = self.spec.group, self._rest_of_row, self._groups
        bucket: dict[Any, Row] = {}
        current: Any = None
        for row in self.batch.fetch(f"{self.spec.select} WHERE {group} = ANY(%s) ORDER BY {group}",
                                    (list(wanted),), binary=True):
            if row[group] != current:
                current = row[group]
                bucket = groups.setdefault(current, {})
            bucket.setdefault(rest(row), row)
            self.size += 1
        self._loaded_groups |= wanted

    # Reading and changing, as the events so far left the table.

    def get(self, *key: Any) -> Row | None:
        """The row with this key, or None. Change it only through `update`."""
        assert not self.spec.blind, self.spec
        k = key[0] if len(key) == 1 else key
        if self.spec.group is None:
            if k not in self._rows:
                self.load([k])
            return self._rows[k]
        group = self._group_of_key(k)
        if group not in self._loaded_groups:
            self.load_groups([group])
        return self._lookup(k)

    def group(self, value: Any) -> list[Row]:
        """Every row of a group (`Held.group`), in no particular order."""
        if value not in self._loaded_groups:
            self.load_groups([value])
        return list(self._groups.get(value, {}).values())

    def insert(self, **row: Any) -> bool:
        """`INSERT ... ON CONFLICT DO NOTHING`: the row, unless one with its key is there
        already. Columns left out get their defaults. True if it was inserted."""
        key = self._key(row)
        if self.spec.blind:
            if key in self._new:
                return False
        elif self.get(*(key if len(self.spec.key) > 1 else (key,))) is not None:
            return False
        self._new[key] = row
        if not self.spec.blind:
            self._remember(key, row)
        return True

    def update(self, *key: Any, **columns: Any) -> Row | None:
        """`UPDATE ... SET columns WHERE key`: the row changed, or None if there is none."""
        assert not set(columns) & {*self.spec.key, self.spec.group}, columns
        row = self.get(*key)
        if row is None:
            return None
        row.update(columns)
        k = key[0] if len(key) == 1 else key
        if k not in self._new:
            self._changed.setdefault(k, set()).update(columns)
        return row

    # Writing.

    def flush(self) -> None:
        """Send the batch's inserts and changes so far: one statement per shape."""
        if not self.pending:
            return
        table = f"{{schema}}.{self.spec.name}"
        statements: list[tuple[str, list[Row], tuple[str, ...], bool]] = []
        inserts: dict[tuple[str, ...], list[Row]] = {}
        for row in self._new.values():
            inserts.setdefault(tuple(row), []).append(row)
        for columns, rows in inserts.items():
            names = ", ".join(columns)
            statements.append((f"INSERT INTO {table} ({names}) SELECT {names} "
                               f"FROM json_populate_recordset(NULL::{table}, %s) ON CONFLICT DO NOTHING",
                               rows, columns, True))
        updates: dict[tuple[str, ...], list[Row]] = {}
        for key, changed in self._changed.items():
            row = self._lookup(key)
            assert row is not None
            updates.setdefault(tuple(sorted(changed)), []).append(row)
        match = " AND ".join(f"t.{k} = r.{k}" for k in self.spec.key)
        for columns, rows in updates.items():
            sets = ", ".join(f"{c} = r.{c}" for c in columns)
            statements.append((f"UPDATE {table} AS t SET {sets} FROM json_populate_recordset(NULL::{table}, %s) AS r "
                               f"WHERE {match}", rows, (*self.spec.key, *columns), False))
        self._new.clear()
        self._changed.clear()
        for sql, rows, columns, whole in statements:
            self.batch.send(self._statements(sql, rows, columns, whole))

    def _statements(self, sql: str, rows: list[Row], columns: tuple[str, ...], whole: bool = False) -> list[Statement]:
        """One statement for all the rows as a JSON array (orjson: UUIDs, dates and datetimes
        as `str()` and `isoformat()` give them), unless a value is a float JSON cannot carry (NaN,
        infinity: orjson would write null) or orjson refuses one: then a plain statement per row."""
        values = rows if whole else [{c: row[c] for c in columns} for row in rows]  # whole: rows are just these
        if _finite(values):
            try:
                return [(sql, (orjson.dumps(values, default=_json_value).decode(),))]
            except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, say
                pass
        return [self._plain(sql, row, columns) for row in rows]

    def _plain(self, sql: str, row: Row, columns: tuple[str, ...]) -> Statement:
        table = f"{{schema}}.{self.spec.name}"
        values = tuple(Jsonb(row[c]) if c in self.spec.json else row[c] for c in columns)
        if sql.startswith("INSERT"):
            return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
                    "ON CONFLICT DO NOTHING", values)
        keys = len(self.spec.key)
        sets = ", ".join(f"{c} = %s" for c in columns[keys:])
        match = " AND ".join(f"{k} = %s" for k in self.spec.key)
        return f"UPDATE {table} SET {sets} WHERE {match}", (*values[keys:], *values[:keys])

    def forget(self) -> None:
        """Drop what is held (nothing may be pending): a statement may have changed the rows."""
        assert not self.pending
        self._rows.clear()
        self._groups.clear()
        self._loaded_groups.clear()
        self.size = 0


def _finite(rows: list[Row]) -> bool:
    """No float column is NaN or infinite (a sum of floats is finite only then, or a huge sum
    overflows, which only costs the plain statements)."""
    return math.isfinite(sum(v for row in rows for v in row.values() if type(v) is float))


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a held row")


class Batch:
    """One batch's state: its cursor (in pipeline mode), held rows, queued work and the last
    tracking position. Without a cursor it is an event applied outside `ReadModel.batch()`,
    which reads on short transactions until `apply` gives it one."""

    def __init__(self, view: ReadModel) -> None:
        self.view = view
        self.curs: Any = None
        self.tracking: Any = None
        self._held: dict[str, HeldRows] = {}
        self._later: dict[Finish, dict[Any, Any]] = {}
        self._queue: list[Statement] = []
        self.memos: dict[str, dict[Any, Any]] = {}

    def rows(self, table: str) -> HeldRows:
        held = self._held.get(table)
        if held is None:
            kept = self.view.kept_rows
            held = kept.get(table) if kept is not None else None
            if held is None:
                spec = next((h for h in self.view.held if h.name == table), None)
                if spec is None:
                    raise KeyError(f"{table} is not a held table of {type(self.view).__name__}")
                held = HeldRows(self, spec)
                if kept is not None:
                    kept[table] = held
            held.batch = self
            self._held[table] = held
        return held

    def later(self, finish: Finish) -> dict[Any, Any]:
        return self._later.setdefault(finish, {})

    def run_later(self) -> None:
        while self._later:
            finish = next(iter(self._later))
            finish(self._later.pop(finish))

    def _before(self, sql: str, writes: bool) -> None:
        """What a statement naming held tables needs first: queued work done, their pending
        writes sent; and if it may write them, their rows dropped."""
        named = tables_named(sql) & {h.name for h in self.view.held}
        if not named:
            return
        self.run_later()
        for table in named:
            held = self._held.get(table)
            if held is not None:
                held.flush()
                if writes:
                    held.forget()

    def run(self, statements: Iterable[Statement]) -> None:
        """A handler's statements, in order."""
        for sql, params in statements:
            self._before(sql, writes=not _only_reads(sql))
            self.send([(sql, params)])
        if self._queue and self.view.sends_each_event:
            self.drain()  # now, so that they run in the event's span (services.common.telemetry)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        if self.curs is None and any(self._held[t].pending for t in tables_named(sql) & self._held.keys()):
            raise RuntimeError("an event applied outside a batch queried a held table after changing it")
        self._before(sql, writes=False)
        return self.fetch(sql, params)

    def send(self, statements: Iterable[Statement]) -> None:
        """Queue statements, sent in order before anything is read and at the end of the batch."""
        assert self.curs is not None, "statements are sent inside a batch's transaction"
        self._queue.extend(statements)

    def drain(self) -> None:
        """Send the queued statements in pipeline mode, a run of the same statement as one
        `executemany` (nothing waits for the server)."""
        queue, self._queue = self._queue, []
        schema = self.view.schema
        for sql, run in itertools.groupby(queue, key=operator.itemgetter(0)):
            params = [p for _, p in run]
            if len(params) == 1:
                self.curs.execute(sql.format(schema=schema), params[0])
            else:
                self.curs.executemany(sql.format(schema=schema), params)

    def fetch(self, sql: str, params: Sequence[Any] = (), binary: bool = False) -> list[Row]:
        if self._queue:
            self.drain()
        with self._cursor() as curs:
            curs.execute(sql.format(schema=self.view.schema), params, binary=binary)
            return list(curs.fetchall())

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        if self.curs is not None:
            # A cursor of its own: in pipeline mode a cursor that has results of earlier
            # statements would hand those out instead of waiting for this one's.
            with self.curs.connection.cursor() as curs:
                yield curs
            return
        with self.view.datastore.transaction(commit=False) as curs:
            yield curs

    def finish(self) -> None:
        """The end of the batch: queued work, then every held table's writes."""
        self.run_later()
        for held in self._held.values():
            held.flush()
        self.drain()
