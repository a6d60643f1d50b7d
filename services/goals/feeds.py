"""What HR systems pull from the goals service: the changes feed and a person's goals.

`GET /v1/changes` is the domain events of the goals and metrics logs, merged, for a system to
poll (and for the webhook worker to deliver, services.goals.webhooks). Its cursor is made of
the two logs' notification ids, never of a read model, so it means the same thing after a
restart or a read-model rebuild. Each log's notification ids are given out in commit order
(the library locks the log's table for each insert), so a reader that has seen position n of a
log has seen every event before it: an item appears once it is committed, and no item of a
log ever shows up behind a later one of the same log.

`GET /v1/people/{id}/goals` is a person's objectives with their key results, scores and
check-ins, for a review, from the goals read model through the objective endpoints' helpers.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic
from fastapi import APIRouter, Query, Response
from pydantic import Field

from services.common.eventstore import event_classes, event_types
from services.common.problems import Problem
from services.common.schemas import ApiModel, Cursor
from services.common.web import PROBLEM_RESPONSES, ReadYourWrites
from services.goals import domain
from services.goals.api import (
    CheckInOut,
    CycleOut,
    FeedReader,
    KeyResultOut,
    KPIHealthCaughtUp,
    Limit,
    ObjectiveOut,
    PersonOut,
    Pool,
    Where,
    _keyset_page,
    _not_found,
    _objectives,
)
from services.goals.projections import POLICY_SPEC, VIEW_SPEC

# The logs of the feed, in the order that breaks a tie in recorded time: goals first.
FEED_LOGS: tuple[tuple[str, str], ...] = (("goals", VIEW_SPEC.events_table), ("metrics", POLICY_SPEC.events_table))
LOG_RANK = {name: rank for rank, (name, _) in enumerate(FEED_LOGS)}
CONTRACT_BASE = "https://tandem.dev/contracts/events"
MAX_CHANGES = 1000

# Webhook subscriptions are configuration of this service, not goal data: their events stay out
# of the feed (a subscriber's URL is nobody else's business).
INTERNAL_AGGREGATES: tuple[type, ...] = (domain.WebhookSubscription, domain.WebhookRegistry)
INTERNAL_TOPICS = sorted(get_topic(c) for a in INTERNAL_AGGREGATES for c in event_classes(a))

# The metrics log's event types, as its contract (contracts/events/metrics) names them: goals
# never imports the metrics classes. A test checks this against the committed contract.
METRICS_EVENT_TYPES = frozenset({
    "KPIDefined", "KPIMeasured", "KPIMeasurementCorrected", "KPIThresholdBreached", "KPIRecovered",
    "KPIStale", "KPIFreshened", "KPITargetChanged", "KPIRulesRevised",
})


def _goals_event_types() -> frozenset[str]:
    aggregates = [v for v in vars(domain).values()
                  if inspect.isclass(v) and issubclass(v, Aggregate) and v.__module__ == domain.__name__
                  and v not in INTERNAL_AGGREGATES]
    return frozenset(event_types(aggregates))


GOALS_EVENT_TYPES = _goals_event_types()
FEED_EVENT_TYPES = GOALS_EVENT_TYPES | METRICS_EVENT_TYPES
TYPE_NAME = r"[A-Za-z]{1,100}"
TYPES_PATTERN = rf"^{TYPE_NAME}(,{TYPE_NAME}){{0,49}}$"


def known_event_types(names: Sequence[str], field: str = "types") -> frozenset[str]:
    """The names, if each is an event type of the feed; a typo would otherwise match nothing
    forever without anyone noticing, so it is refused (422)."""
    unknown = sorted(set(names) - FEED_EVENT_TYPES)
    if unknown:
        raise Problem(422, "Invalid request", f"{field}: unknown event type(s): {', '.join(unknown)}; the feed's "
                      "types are those of contracts/events/goals and contracts/events/metrics.",
                      kind="validation", errors=[{"field": field, "in": "query", "message": f"unknown: {n}",
                                                  "type": "unknown_event_type"} for n in unknown])
    return frozenset(names)


# The cursor ----------------------------------------------------------------------------------

_POSITIONS = re.compile(r"goals=([0-9]{1,18}),metrics=([0-9]{1,18})")


@dataclass(frozen=True)
class FeedPosition:
    """How far a reader of the feed has got in each log: the cursor, in plain words."""

    goals: int = 0
    metrics: int = 0

    def encode(self) -> str:
        """Opaque to clients (base64url of `goals=N,metrics=M`), so its form may change."""
        return base64.urlsafe_b64encode(str(self).encode()).decode().rstrip("=")

    def __str__(self) -> str:
        return f"goals={self.goals},metrics={self.metrics}"

    @classmethod
    def decode(cls, cursor: str | None) -> FeedPosition:
        if not cursor:
            return cls()
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            text = ""
        match = _POSITIONS.fullmatch(text)
        if match is None:
            raise _bad_cursor()
        return cls(int(match[1]), int(match[2]))

    def of(self, log: str) -> int:
        return int(getattr(self, log))


def _bad_cursor(detail: str = "The cursor is not one this service gave out.") -> Problem:
    return Problem(422, "Invalid request", detail, kind="bad-cursor")


# Reading the logs ----------------------------------------------------------------------------

class ChangeOut(ApiModel):
    id: str = Field(description="`<log>:<position>`: the same for this event in every poll, after restarts and "
                                "rebuilds; deduplicate on it.")
    log: Literal["goals", "metrics"]
    position: int = Field(description="The event's notification id in its log.")
    type: str = Field(description="The contract's event type, e.g. `KeyResultProgressed`.")
    aggregate_id: UUID
    version: int = Field(description="The aggregate's version after this event.")
    recorded_at: datetime = Field(description="When the event was recorded (a valid time, where one applies, "
                                              "is in `data`).")
    contract: str = Field(description="The JSON Schema that `data` conforms to.")
    data: dict[str, Any] = Field(description="The event as stored: UUIDs, dates and datetimes are tagged values "
                                             "(`{\"_type_\": \"uuid_hex\", \"_data_\": ...}`), as in the contract.")
    meta: dict[str, Any] = Field(description="Who made the change: actor, correlation id, causation id, trace id.")


class ChangesPage(ApiModel):
    items: list[ChangeOut]
    next_cursor: str = Field(description="Pass as `after` to continue; always given, also when nothing came.")
    has_more: bool = Field(description="true: there may be more already, poll again at once; false: this page "
                                       "reached the end of what was committed when it was read.")


@dataclass(frozen=True)
class Changes:
    items: list[ChangeOut]
    next: FeedPosition
    has_more: bool


def _change(log: str, row: asyncpg.Record) -> ChangeOut:
    state = json.loads(row["state"])
    meta = state.pop("meta", None) or {}
    event_type = "".join(row["topic"].split(":", 1)[1].split("."))
    return ChangeOut(
        id=f"{log}:{row['notification_id']}", log=log, position=row["notification_id"], type=event_type,
        aggregate_id=row["originator_id"], version=row["originator_version"],
        recorded_at=datetime.fromisoformat(state["timestamp"]["_data_"]),
        contract=f"{CONTRACT_BASE}/{log}/{event_type}.v{state.get('class_version', 1)}.json", data=state, meta=meta)


async def _head(conn: asyncpg.Connection, table: str) -> int:
    """The log's last position (0 while its service has never started); checked for existence
    first, since an error would spoil a transaction the caller may be in."""
    if await conn.fetchval("SELECT to_regclass($1) IS NULL", table):
        return 0
    return int(await conn.fetchval(f"SELECT max(notification_id) FROM {table}") or 0)


def merge(streams: dict[str, Sequence[ChangeOut]], limit: int) -> list[ChangeOut]:
    """Merge the logs' items by recorded time (ties: goals first, then position), each log
    staying in its own order: a log's items are taken from its front only."""
    taken: list[ChangeOut] = []
    fronts = dict.fromkeys(streams, 0)
    while len(taken) < limit:
        candidates = [(s[fronts[log]].recorded_at, LOG_RANK[log], s[fronts[log]].position, log)
                      for log, s in streams.items() if fronts[log] < len(s)]
        if not candidates:
            break
        log = min(candidates)[3]
        taken.append(streams[log][fronts[log]])
        fronts[log] += 1
    return taken


async def read_changes(conn: asyncpg.Connection, after: FeedPosition, limit: int,
                       types: frozenset[str] | None = None) -> Changes:
    """The next `limit` items after `after`, and the position to continue from.

    Each log's head is read before its events and bounds them: every event up to a committed
    head is committed too (commit order is position order), so a log whose matching events up
    to its head were all taken may move on to the head, skipping nothing, whatever the
    transaction isolation of `conn`. Without that, a filter that matches nothing would rescan
    the same events on every poll."""
    streams: dict[str, list[ChangeOut]] = {}
    heads: dict[str, int] = {}
    for log, table in FEED_LOGS:
        heads[log] = await _head(conn, table)
        if after.of(log) > heads[log]:
            raise _bad_cursor(f"The cursor is past the end of the {log} log: it is not one this service gave out.")
        rows = [] if after.of(log) == heads[log] else await conn.fetch(
            f"""SELECT notification_id, originator_id, originator_version, topic, state FROM {table}
                WHERE notification_id > $1 AND notification_id <= $2 AND topic <> ALL($3::text[])
                  AND ($4::text[] IS NULL OR replace(split_part(topic, ':', 2), '.', '') = ANY($4::text[]))
                ORDER BY notification_id LIMIT $5""",
            after.of(log), heads[log], INTERNAL_TOPICS, sorted(types) if types is not None else None, limit)
        streams[log] = [_change(log, r) for r in rows]
    taken = merge(streams, limit)
    positions: dict[str, int] = {}
    has_more = False
    for log, items in streams.items():
        mine = [c for c in taken if c.log == log]
        exhausted = len(items) < limit
        if exhausted and len(mine) == len(items):
            positions[log] = heads[log]
        else:
            positions[log] = mine[-1].position if mine else after.of(log)
            has_more = True
    return Changes(taken, FeedPosition(**positions), has_more)


# Routes -------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)

ChangesLimit = Annotated[int, Query(ge=1, le=MAX_CHANGES, description="Items per page.")]
TypesFilter = Annotated[str, Query(pattern=TYPES_PATTERN, description=(
    "Only these event types, comma-separated (e.g. `KeyResultProgressed,ObjectiveClosed`); the cursor "
    "still moves past the others."))]


@router.get("/changes", tags=["changes"])
async def changes(pool: Pool, _: FeedReader, response: Response, after: Cursor = None, limit: ChangesLimit = 100,
                  types: TypesFilter = None) -> ChangesPage:
    """The domain events of the goals and metrics logs, oldest first, for a system to poll.

    The logs are merged by recorded time (ties: goals first, then position); each log's events
    always come in their log's order. An event shows up once it is committed, and a page never
    holds an event of a log that comes before one an earlier page gave: poll with `nextCursor`
    and nothing is missed or repeated. Across the two logs the order is that of what was
    committed when the page was read: an event committed later in one log may carry an earlier
    `recordedAt` than one the other log already gave. The cursor is built from the logs'
    positions, so it stays valid across restarts and read-model rebuilds."""
    position = FeedPosition.decode(after)
    wanted = known_event_types(types.split(",")) if types else None
    async with pool.acquire() as conn:
        page = await read_changes(conn, position, limit, wanted)
    response.headers["Cache-Control"] = "no-store"
    return ChangesPage(items=page.items, next_cursor=page.next.encode(), has_more=page.has_more)


class ReviewKeyResult(KeyResultOut):
    check_ins: list[CheckInOut] = Field(description="Every check-in and correction, in the order recorded.")


class ReviewObjective(ObjectiveOut):
    key_results: list[ReviewKeyResult]


class PersonGoalsOut(ApiModel):
    person: PersonOut
    cycle: CycleOut | None = Field(description="The cycle asked for, if one was.")
    objectives: list[ReviewObjective] = Field(description="The objectives the person owns, oldest first.")
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")


@router.get("/people/{person_id}/goals", tags=["people"])
async def person_goals(
    person_id: UUID, pool: Pool, _: FeedReader, __: ReadYourWrites, ___: KPIHealthCaughtUp,
    cycle: Annotated[UUID | None, Query(description="Only this cycle's objectives.")] = None,
    limit: Limit = 50, after: Cursor = None,
) -> PersonGoalsOut:
    """What a review needs of one person: the objectives they own (in one cycle, or all), each
    with its key results, scores, forecasts, guardrails and coaching warnings, and every
    check-in of each key result. An unknown cycle is 422: the person exists, the filter is wrong."""
    person = await pool.fetchrow("SELECT * FROM people WHERE id = $1", person_id)
    if person is None:
        raise _not_found("person")
    cycle_row = None
    if cycle is not None:
        cycle_row = await pool.fetchrow("SELECT * FROM cycles WHERE id = $1", cycle)
        if cycle_row is None:
            raise Problem(422, "Invalid request", f"cycle: no cycle with id {cycle}.", kind="validation",
                          errors=[{"field": "cycle", "in": "query", "message": "no such cycle",
                                   "type": "unknown_id"}])
    where = Where().add("owner_kind = {}", domain.OwnerKind.person.value).add("owner_id = {}", person_id)
    rows, next_cursor = await _keyset_page(pool, "SELECT * FROM objectives", where.equal("cycle_id", cycle),
                                           limit, after)
    objectives = await _objectives(pool, rows)
    check_ins: dict[UUID, list[CheckInOut]] = {}
    for r in await pool.fetch("SELECT * FROM check_ins WHERE key_result_id = ANY($1::uuid[]) "
                              "ORDER BY key_result_id, version",
                              [k.id for o in objectives for k in o.key_results]):
        check_ins.setdefault(r["key_result_id"], []).append(CheckInOut.from_row(r))
    return PersonGoalsOut(
        person=PersonOut.from_row(person), cycle=CycleOut.from_row(cycle_row) if cycle_row else None,
        objectives=[ReviewObjective.model_validate({
            **o.model_dump(), "keyResults": [{**k.model_dump(), "checkIns": check_ins.get(k.id, [])}
                                             for k in o.key_results]}) for o in objectives],
        next_cursor=next_cursor)
