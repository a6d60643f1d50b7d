"""An aggregate's history for auditors: every stored event of one aggregate, with who recorded
it, when, within which request and trace, why, and what it changed.

Plumbing only: it works on any `eventsourcing` aggregate of any `TandemApplication`, never on
a service's domain classes. The events are read from the application's recorder
(`select_events`) and decoded with the application's mapper, so upcasting applies; the metadata
is the `meta` that `MetadataMapper` stored in each event's state. What changed is worked out by
replaying the events one by one onto the aggregate (`event.mutate`) and comparing its public
state (the instance attributes whose names do not start with `_`) before and after each event:
one `{field, from, to}` per value that differs, where `field` is a path into that state
(`title`, `targets[1]`, `series.items[3]`, `contributions[<id>]`). A list that grew or shrank
at one place shows the items added (from null) or removed (to null); any other change shows
the whole value. Values are JSON: UUIDs as strings, days and moments in ISO 8601, enums as
their values, sets as sorted lists, dataclasses and named tuples as objects.

Pages run oldest first by version (`after` is the last version of the previous page). A page
replays the events up to its last one, and compares state only for the events it shows.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

from eventsourcing.utils import get_topic
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from services.common.asof import valid_time_of
from services.common.auth import Principal, Role, require
from services.common.eventstore import topic_event_type
from services.common.problems import Problem
from services.common.schemas import ApiModel, Cursor, Page, decode_cursor, encode_cursor

# Who may read histories: everyone who reads goal data, and auditors; not an HR system's
# provisioning token (SCIM and the read feeds only, DESIGN.md).
HISTORY_READERS = (Role.admin, Role.member, Role.auditor, Role.service)

# Fields every stored event has, which the entry shows in its own fields rather than in `data`.
ENVELOPE_FIELDS = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})
MAX_DEPTH = 12

_MISSING = object()
# Values that are one value, never a record to look into.
_SCALARS = (str, bytes, bool, int, float, Decimal, UUID, date, time, timedelta, enum.Enum)


class NoSuchAggregate(LookupError):
    """The id names no aggregate, or one of another kind."""


@dataclass(frozen=True)
class Change:
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class HistoryItem:
    type: str
    version: int
    recorded_at: datetime
    valid_at: date | datetime | None
    actor: str | None
    reason: str | None
    correlation_id: str | None
    causation_id: str | None
    trace_id: str | None
    data: dict[str, Any]
    changes: list[Change]


# JSON values ---------------------------------------------------------------------------------

def plain(value: Any, depth: int = 0) -> Any:
    """The value as JSON can carry it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return plain(value.value, depth)
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if depth >= MAX_DEPTH:
        return str(value)
    if isinstance(value, Mapping):
        return {key_text(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((plain(v, depth + 1) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    fields = _fields(value)
    if fields is not None:
        return {k: plain(v, depth + 1) for k, v in fields.items()}
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    return str(value)


def key_text(key: Any) -> str:
    """A mapping key as text (a tuple's parts joined by commas)."""
    if isinstance(key, tuple):
        return ",".join(key_text(k) for k in key)
    text = plain(key, MAX_DEPTH)
    return text if isinstance(text, str) else json.dumps(text)


def _fields(value: Any) -> dict[str, Any] | None:
    """The named parts of a record or an object (None for anything else): a dataclass's fields,
    a named tuple's, or an object's public attributes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return dict(zip(value._fields, value, strict=True))
    if isinstance(value, _SCALARS) or isinstance(value, list | tuple | Mapping | set | frozenset | type) \
            or callable(value):
        return None
    return public_state(value) if _has_attributes(value) else None


def _has_attributes(value: Any) -> bool:
    return hasattr(value, "__dict__") or any(getattr(c, "__slots__", ()) for c in type(value).__mro__)


def public_state(obj: Any) -> dict[str, Any]:
    """An object's instance attributes whose names do not start with `_` (from `__dict__` and
    `__slots__`)."""
    state = {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if not name.startswith("_") and name not in state and hasattr(obj, name):
                state[name] = getattr(obj, name)
    return state


# What changed --------------------------------------------------------------------------------

def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """Every value of the public state that differs between before and after."""
    out: list[Change] = []
    _diff_mapping("", before, after, out, 0, attributes=True)
    return out


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - a value that cannot be compared is compared as JSON
        return plain(a) == plain(b)


def _whole(path: str, a: Any, b: Any, out: list[Change]) -> None:
    out.append(Change(path, None if a is _MISSING else plain(a), None if b is _MISSING else plain(b)))


def _diff(path: str, a: Any, b: Any, out: list[Change], depth: int) -> None:
    if a is _MISSING or b is _MISSING or a is None or b is None:
        if not (a is b or (a is None and b is None)):
            _whole(path, a, b, out)
        return
    if _equal(a, b):
        return
    if type(a) is not type(b) or depth >= MAX_DEPTH or isinstance(a, _SCALARS):
        _whole(path, a, b, out)
        return
    if isinstance(a, Mapping):
        _diff_mapping(path, a, b, out, depth)
    elif isinstance(a, list | tuple) and not hasattr(a, "_fields"):
        _diff_sequence(path, a, b, out, depth)
    elif isinstance(a, set | frozenset):
        _whole(path, a, b, out)
    elif (fa := _fields(a)) is not None and (fb := _fields(b)) is not None:
        _diff_mapping(path, fa, fb, out, depth, attributes=True)
    else:
        _whole(path, a, b, out)


def _diff_mapping(path: str, a: Mapping[Any, Any], b: Mapping[Any, Any], out: list[Change], depth: int,
                  attributes: bool = False) -> None:
    keys = list(a) + [k for k in b if k not in a]
    for key in keys:
        if attributes:
            sub = f"{path}.{key}" if path else str(key)
        else:
            sub = f"{path}[{key_text(key)}]"
        _diff(sub, a.get(key, _MISSING), b.get(key, _MISSING), out, depth + 1)


def _diff_sequence(path: str, a: Sequence[Any], b: Sequence[Any], out: list[Change], depth: int) -> None:
    if len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(f"{path}[{i}]", x, y, out, depth + 1)
        return
    shorter = min(len(a), len(b))
    prefix = 0
    while prefix < shorter and _equal(a[prefix], b[prefix]):
        prefix += 1
    suffix = 0
    while suffix < shorter - prefix and _equal(a[len(a) - 1 - suffix], b[len(b) - 1 - suffix]):
        suffix += 1
    removed, added = a[prefix:len(a) - suffix], b[prefix:len(b) - suffix]
    if removed and added:
        _whole(path, a, b, out)
        return
    for offset, item in enumerate(removed):
        out.append(Change(f"{path}[{prefix + offset}]", plain(item), None))
    for offset, item in enumerate(added):
        out.append(Change(f"{path}[{prefix + offset}]", None, plain(item)))


# Reading and replaying -----------------------------------------------------------------------

def event_data(event: Any) -> dict[str, Any]:
    """The event's own fields (the envelope and the metadata left out), as stored after
    upcasting; fields a class declares with a default and an old event lacks get the default."""
    if dataclasses.is_dataclass(event):
        names = [f.name for f in dataclasses.fields(event)]
    else:
        names = list(vars(event))
    return {n: getattr(event, n, None) for n in names if n not in ENVELOPE_FIELDS and n != "meta"}


def _meta(application: Any, stored: Any, event: Any) -> dict[str, Any]:
    meta = vars(event).get("meta")
    if meta is None:  # a mapper that kept the metadata out of the event: read the stored state
        try:
            meta = application.mapper.transcoder.decode(stored.state).get("meta")
        except Exception:  # noqa: BLE001 - an event without readable metadata shows none
            meta = None
    return meta if isinstance(meta, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def read_history(application: Any, aggregate_id: UUID, kind: type | tuple[type, ...], *, after: int = 0,
                 limit: int = 100) -> tuple[list[HistoryItem], bool]:
    """The events of the aggregate with versions after `after`, at most `limit` of them, and
    whether more follow. NoSuchAggregate when the id names no aggregate of `kind`."""
    stored_events = application.recorder.select_events(aggregate_id, lte=after + limit + 1)
    if not stored_events:
        raise NoSuchAggregate(aggregate_id)
    aggregate: Any = None
    items: list[HistoryItem] = []
    for stored in stored_events[:after + limit]:
        event = application.mapper.to_domain_event(stored)
        shown = event.originator_version > after
        before = {k: copy.deepcopy(v) for k, v in public_state(aggregate).items()} if shown and aggregate else {}
        aggregate = event.mutate(aggregate)
        if aggregate is None or not isinstance(aggregate, kind):
            raise NoSuchAggregate(aggregate_id)
        if not shown:
            continue
        data = event_data(event)
        meta = _meta(application, stored, event)
        valid_at = valid_time_of(event)
        reason = data.get("reason")
        items.append(HistoryItem(
            type=topic_event_type(get_topic(type(event))), version=event.originator_version,
            recorded_at=event.timestamp, valid_at=valid_at, actor=_text(meta.get("actor")),
            reason=reason if isinstance(reason, str) else None, correlation_id=_text(meta.get("correlation_id")),
            causation_id=_text(meta.get("causation_id")), trace_id=_text(meta.get("trace_id")),
            data={k: plain(v) for k, v in data.items()}, changes=changes(before, public_state(aggregate))))
    return items, len(stored_events) > after + limit


# REST ----------------------------------------------------------------------------------------

class HistoryChange(ApiModel):
    field: str = Field(description="A path into the aggregate's state: `title`, `targets[1]`, `series.items[3]`.")
    from_: Any = Field(alias="from", description="The value before the event (null: none).")
    to: Any = Field(description="The value after the event (null: none).")


class HistoryEntry(ApiModel):
    type: str = Field(description="The event type, as the contract names it (`contracts/events/`).")
    version: int = Field(description="The aggregate's version this event made.")
    recorded_at: datetime = Field(description="When the event was recorded (recorded time).")
    valid_at: datetime | date | None = Field(
        description="The day or moment the event's value applies to (valid time: a check-in's day, a "
                    "measurement's time, an effective day); null for an event without one.")
    actor: str | None = Field(description="Who recorded it: the token's subject, or the process that did.")
    reason: str | None = Field(description="Why, where the event says (a regrade, a target change, ...).")
    correlation_id: str | None = Field(description="The request's X-Correlation-ID (or the one made for it).")
    causation_id: str | None = Field(description="What caused it, where another event or message did.")
    trace_id: str | None = Field(description="The OpenTelemetry trace it was recorded in.")
    data: dict[str, Any] = Field(description="The event's own fields, by the contract's names.")
    changes: list[HistoryChange] = Field(description="What the event changed in the aggregate's state.")


def history_cursor(after: str | None) -> int:
    """The version an `after` cursor names (0: from the start)."""
    if not after:
        return 0
    value = decode_cursor(after, 1)[0]
    if not value.isdigit() or len(value) > 18:
        raise Problem(422, "Invalid request", "The cursor is not one this service gave out.", kind="bad-cursor")
    return int(value)


async def history_page(application: Any, aggregate_id: UUID, kind: type | tuple[type, ...], what: str,
                       limit: int, after: str | None) -> Page[HistoryEntry]:
    """A page of the aggregate's history as the REST APIs answer it; 404 for an id of no such
    aggregate."""
    start = history_cursor(after)
    try:
        items, more = await run_in_threadpool(read_history, application, aggregate_id, kind, after=start,
                                              limit=limit)
    except NoSuchAggregate:
        raise Problem(404, "Not Found", f"No such {what}.", kind="not-found") from None
    entries = [HistoryEntry(
        type=i.type, version=i.version, recorded_at=i.recorded_at, valid_at=i.valid_at, actor=i.actor,
        reason=i.reason, correlation_id=i.correlation_id, causation_id=i.causation_id, trace_id=i.trace_id,
        data=i.data, changes=[HistoryChange(field=c.field, from_=c.before, to=c.after) for c in i.changes])
        for i in items]
    next_cursor = encode_cursor(items[-1].version) if more and items else None
    return Page(items=entries, next_cursor=next_cursor)


HistoryReader = Annotated[Principal, Depends(require(*HISTORY_READERS))]
HistoryLimit = Annotated[int, Query(ge=1, le=200, description="Events per page.")]


def add_history_route(router: APIRouter, resource: str, id_param: str, kind: type | tuple[type, ...], what: str,
                      *, name: str, tags: list[str] | None = None,
                      application: Callable[[Request], Any] = lambda r: r.app.state.application) -> None:
    """`GET {router prefix}/{resource}/{id}/history`: the aggregate's events, oldest first, a page
    at a time, for admin, member, auditor and service tokens."""

    async def endpoint(aggregate_id: UUID, request: Request, _: HistoryReader, limit: HistoryLimit = 100,
                       after: Cursor = None) -> Page[HistoryEntry]:
        return await history_page(application(request), aggregate_id, kind, what, limit, after)

    endpoint.__annotations__["aggregate_id"] = Annotated[UUID, Path(alias=id_param)]
    router.add_api_route(
        f"/{resource}/{{{id_param}}}/history", endpoint, methods=["GET"], name=name, tags=tags,
        response_model=Page[HistoryEntry],
        description=f"Every event of the {what}, oldest first: its type, version, recorded and valid time, actor, "
                    "reason, correlation, causation and trace ids, its own fields, and what it changed "
                    "(`changes`: `{field, from, to}` of the state before and after it). Pages run by version; "
                    "`after` is the previous page's `nextCursor`.")
