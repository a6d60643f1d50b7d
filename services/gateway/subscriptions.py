"""GraphQL subscriptions on the gateway: `kpiStateChanged(unit)` and `keyResultProgressed(unit)`,
each for the unit and every unit below it, over graphql-transport-ws.

Announcing: the alignment projection appends `announcements(event)` to the statements it
applies for an event, so a `pg_notify` on `<schema>_changes` runs in the same transaction as the
read-model change and its tracking position. PostgreSQL delivers a notification only when that
transaction commits, so a subscriber never hears of a change the read model does not have yet.
The payload (ids, numbers, the event type) is computed in SQL after the handler's statements.

Listening: one `ChangeFeed` per app (`app.state.change_feed`) holds one dedicated connection
that LISTENs while anyone subscribes. Per change it reads the unit's ancestors (so a unit moved
into a subscribed subtree counts from then on) and the announced facts once, and queues them to
every subscriber whose unit is among them: 1,000 subscribers share one connection and two
queries per change. A subscriber that falls too far behind, or a lost listening connection,
ends the subscription with an error: the client subscribes again (`snapshot: true` gives it
the state to start from).

Replays: a read model rebuilt from the log announces its events again. kpiStateChanged only
reports a state that differs from the last one the subscriber saw, so a replay shows at most the
transitions the read model passes through while it catches up; keyResultProgressed reports each
check-in the replay announces again (`version` tells a client which it already has).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import asyncpg
import strawberry
from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse
from starlette.requests import HTTPConnection
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import GraphQLRouter
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.types import Info
from strawberry.types.unset import UnsetType

from services.common.auth import DATA_READERS, Principal, TokenVerifier
from services.common.database import check_identifier
from services.common.problems import Problem
from services.common.projections import ContractEvent, Statement
from services.gateway.application import KPI as LoadedKPI
from services.gateway.application import KPIS_SQL, UNITS_SQL
from services.gateway.application import KeyResult as LoadedKeyResult
from services.gateway.domain import Rule, band

if TYPE_CHECKING:
    from services.gateway.api import ThresholdRule

log = logging.getLogger(__name__)

CHANNEL = "{schema}_changes"
"""The channel the alignment projection announces changes on (`{schema}` as statements use it)."""

INBOX_SIZE = 1000
"""Changes a subscriber may have waiting before it counts as gone and its subscription ends."""

KPI_EVENTS = frozenset({"KPIMeasured", "KPIMeasurementCorrected", "KPIThresholdBreached", "KPIRecovered",
                        "KPIStale", "KPIFreshened", "KPIRulesRevised"})
"""Every event that can change a KPI's state (KPIDefined starts at no_data; targets are not state)."""
KEY_RESULT_EVENTS = frozenset({"KeyResultProgressed", "KeyResultCheckInCorrected"})

ANNOUNCE_KPI = f"""
SELECT pg_notify('{CHANNEL}', json_build_object(
    'kind', 'kpi', 'id', id, 'unit_id', unit_id, 'cause', %s::text, 'recorded_at', %s::timestamptz)::text)
FROM {{schema}}.kpis WHERE id = %s"""

ANNOUNCE_CHECK_IN = f"""
SELECT pg_notify('{CHANNEL}', json_build_object(
    'kind', 'key_result', 'id', kr.id, 'unit_id', o.unit_id, 'current', kr.current, 'version', %s::bigint,
    'cause', %s::text, 'recorded_at', %s::timestamptz)::text)
FROM {{schema}}.key_results kr JOIN {{schema}}.objectives o ON o.id = kr.objective_id WHERE kr.id = %s"""
"""A payload of ids, numbers and an event type name: always far below NOTIFY's 8,000 bytes, so an
announcement can never fail the projection's transaction."""


def announcements(event: ContractEvent) -> list[Statement]:
    """The notifications an event gives subscribers, to run after its read-model statements in
    the same transaction (so they describe the read model as that transaction leaves it)."""
    if event.type in KPI_EVENTS:
        return [(ANNOUNCE_KPI, (event.type, event.timestamp, event.originator_id))]
    if event.type in KEY_RESULT_EVENTS:
        return [(ANNOUNCE_CHECK_IN, (event.version, event.type, event.timestamp, event.originator_id))]
    return []


# Reading what a notification names ----------------------------------------------------------------

ANCESTORS_SQL = """
WITH RECURSIVE up(id, parent_id) AS (
    SELECT id, parent_id FROM units WHERE id = $1
    UNION
    SELECT u.id, u.parent_id FROM units u JOIN up ON u.id = up.parent_id)
SELECT id FROM up"""
"""The unit and every unit above it, as the read model has them when the change is handled, so a
unit that moved into a subscribed subtree counts from then on (UNION stops at a loop, which the
goals service refuses anyway)."""

RULES_SQL = """
SELECT kpi_id, rule_id AS id, kind, severity, threshold, low, high, pending_count, pending_for, recovery, breached
FROM kpi_rules WHERE kpi_id = ANY($1::uuid[]) ORDER BY ordinal"""

ONE_KPI_SQL = """
SELECT k.*, ARRAY(SELECT (t.effective_from, t.version, t.target) FROM kpi_targets t
                  WHERE t.kpi_id = k.id ORDER BY t.version) AS target_changes
FROM kpis k WHERE k.id = $1"""

_CHECK_IN_COLUMNS = """c.key_result_id, c.version, c.valid_on, c.value, c.confidence, c.note, c.corrects_version,
    c.recorded_at, kr.objective_id, o.unit_id, kr.kind, kr.start, kr.target, kr.low, kr.high,
    kr.milestone_weights, kr.current"""

ONE_CHECK_IN_SQL = f"""
SELECT {_CHECK_IN_COLUMNS}
FROM check_ins c JOIN key_results kr ON kr.id = c.key_result_id JOIN objectives o ON o.id = kr.objective_id
WHERE c.key_result_id = $1 AND c.version = $2"""

# The last check-in (or correction) recorded on each key result of a subtree's objectives.
LAST_CHECK_INS_SQL = f"""
WITH RECURSIVE tree(id) AS (
    SELECT id FROM units WHERE id = $1
    UNION
    SELECT u.id FROM units u JOIN tree t ON u.parent_id = t.id)
SELECT DISTINCT ON (c.key_result_id) {_CHECK_IN_COLUMNS}
FROM check_ins c JOIN key_results kr ON kr.id = c.key_result_id JOIN objectives o ON o.id = kr.objective_id
WHERE o.unit_id IN (SELECT id FROM tree)
ORDER BY c.key_result_id, c.version DESC"""


async def load_kpis(conn: asyncpg.Connection, rows: list[asyncpg.Record], today: date) -> list[LoadedKPI]:
    """KPI rows with their rules, built as the Query side builds them, so that states agree."""
    rules: dict[UUID, list[Rule]] = {k["id"]: [] for k in rows}
    for r in await conn.fetch(RULES_SQL, list(rules)):
        rules[r["kpi_id"]].append(Rule.from_contract(r, breached=r["breached"]))
    return [LoadedKPI(k, rules[k["id"]], today) for k in rows]


async def subtree_kpis(pool: asyncpg.Pool, root: UUID) -> list[LoadedKPI] | None:
    """Every KPI of the unit's subtree as it stands; None when there is no such unit."""
    async with pool.acquire() as conn:
        units = await conn.fetch(UNITS_SQL, root)
        if not units:
            return None
        return await load_kpis(conn, await conn.fetch(KPIS_SQL, [u["id"] for u in units]), datetime.now(UTC).date())


@dataclass(frozen=True)
class Announced:
    """A change as its notification tells it."""

    kind: str
    id: UUID
    unit_id: UUID
    cause: str
    recorded_at: datetime
    version: int | None = None
    current: float | None = None

    @classmethod
    def parse(cls, payload: str) -> Announced:
        p = json.loads(payload)
        return cls(kind=p["kind"], id=UUID(p["id"]), unit_id=UUID(p["unit_id"]), cause=p["cause"],
                   recorded_at=datetime.fromisoformat(p["recorded_at"]), version=p.get("version"),
                   current=p.get("current"))


@dataclass(frozen=True)
class KPIFacts:
    kpi: LoadedKPI
    cause: str | None
    at: datetime


@dataclass(frozen=True)
class CheckInFacts:
    """A check-in with its key result; `current` is the key result's value right after it."""

    row: asyncpg.Record
    current: float | None

    @property
    def score(self) -> float | None:
        return LoadedKeyResult({**dict(self.row), "current": self.current}).score  # type: ignore[arg-type]


Facts = KPIFacts | CheckInFacts


async def load_facts(conn: asyncpg.Connection, change: Announced) -> Facts | None:
    """What subscribers are told of a change: the KPI as the read model has it now, or the
    announced check-in; None if the read model no longer has it (a rebuild dropped it since)."""
    if change.kind == "kpi":
        row = await conn.fetchrow(ONE_KPI_SQL, change.id)
        if row is None:
            return None
        [kpi] = await load_kpis(conn, [row], datetime.now(UTC).date())
        return KPIFacts(kpi, change.cause, change.recorded_at)
    row = await conn.fetchrow(ONE_CHECK_IN_SQL, change.id, change.version)
    return None if row is None else CheckInFacts(row, change.current)


# The one listener per app ------------------------------------------------------------------------

class SubscriptionEnded(Exception):
    """The feed can no longer serve a subscriber; the message says why, for the client."""


@dataclass(eq=False)
class Inbox:
    """One subscriber: the kind of change it wants, its subtree's root, its waiting changes."""

    kind: str
    root: UUID
    queue: asyncio.Queue[Facts | SubscriptionEnded] = field(default_factory=lambda: asyncio.Queue(INBOX_SIZE + 1))
    ended: bool = False

    def offer(self, facts: Facts) -> None:
        if self.queue.qsize() >= INBOX_SIZE:
            self.end("This subscriber fell too far behind; subscribe again.")
        elif not self.ended:
            self.queue.put_nowait(facts)

    def end(self, reason: str) -> None:
        """Wake the subscriber with an error; the slot kept free in the queue is for this."""
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(SubscriptionEnded(reason))

    async def get(self) -> Facts:
        item = await self.queue.get()
        if isinstance(item, SubscriptionEnded):
            raise item
        return item


class ChangeFeed:
    """LISTENs on the announcement channel while there are subscribers, on one connection of
    its own, and fans each change out: its unit's ancestry and its facts are read once, then
    queued to each inbox whose subtree holds it, in the order PostgreSQL delivered them."""

    def __init__(self, database_url: str, schema: str, pool: asyncpg.Pool):
        self.database_url = database_url
        self.channel = CHANNEL.format(schema=check_identifier(schema))
        self.pool = pool
        self.inboxes: set[Inbox] = set()
        self._lock = asyncio.Lock()
        self._conn: asyncpg.Connection | None = None
        self._incoming: asyncio.Queue[str] = asyncio.Queue()
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._conn is not None

    @asynccontextmanager
    async def inbox(self, kind: str, root: UUID) -> AsyncIterator[Inbox]:
        """An inbox that receives every change announced from now until the block ends."""
        inbox = Inbox(kind, root)
        async with self._lock:
            if self._conn is None:
                await self._start()
            self.inboxes.add(inbox)
        try:
            yield inbox
        finally:
            # Shielded: the subscriber's task is usually being cancelled (the client went away).
            await asyncio.shield(self._leave(inbox))

    async def _leave(self, inbox: Inbox) -> None:
        async with self._lock:
            self.inboxes.discard(inbox)
            if not self.inboxes:
                await self._stop()

    async def _start(self) -> None:
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.add_listener(self.channel, self._notified)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._lost)
        self._conn = conn
        self._incoming = asyncio.Queue()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="gateway-change-feed")

    async def _stop(self) -> None:
        conn, dispatcher = self._conn, self._dispatcher
        self._conn = self._dispatcher = None
        if dispatcher is not None:
            dispatcher.cancel()
            with suppress(asyncio.CancelledError):
                await dispatcher
        if conn is not None:
            conn.remove_termination_listener(self._lost)
            with suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.close(timeout=5)

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._incoming.put_nowait(payload)

    def _lost(self, conn: object) -> None:
        """The listening connection died (the database restarted, say): notifications may have
        been missed, so every subscription ends; the next subscriber listens afresh."""
        log.warning("gateway change feed lost its connection; ending %d subscriptions", len(self.inboxes))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self._conn = self._dispatcher = None
        for inbox in self.inboxes:
            inbox.end("The subscription lost its feed of changes; subscribe again.")

    async def _dispatch(self) -> None:
        while True:
            payload = await self._incoming.get()
            try:
                change = Announced.parse(payload)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed change notification: %.200s", payload)
                continue
            candidates = [i for i in self.inboxes if i.kind == change.kind and not i.ended]
            if not candidates:
                continue
            try:
                async with self.pool.acquire() as conn:
                    units = {change.unit_id, *(r["id"] for r in await conn.fetch(ANCESTORS_SQL, change.unit_id))}
                    interested = [i for i in candidates if i.root in units]
                    facts = await load_facts(conn, change) if interested else None
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("could not read a change from the read model: %s", e)
                for inbox in candidates:
                    inbox.end("The read model could not be read; subscribe again.")
                continue
            if facts is not None:
                for inbox in interested:
                    inbox.offer(facts)


def change_feed(connection: HTTPConnection) -> ChangeFeed:
    """The app's feed, made on first use (it listens only while someone subscribes)."""
    state = connection.app.state
    feed: ChangeFeed | None = getattr(state, "change_feed", None)
    if feed is None:
        feed = state.change_feed = ChangeFeed(state.settings.database_url, state.settings.schema_name, state.pool)
    return feed


# GraphQL ----------------------------------------------------------------------------------------

def _bad_input(message: str) -> Exception:
    """api.py's BadInput (shown to the client, not masked); imported late, as api imports us."""
    from services.gateway.api import BadInput

    return BadInput(message)


async def _subtree_root(info: Info, unit: str) -> UUID:
    try:
        root = UUID(str(unit))
    except ValueError:
        raise _bad_input("unit is not an id this API gave out") from None
    if not await info.context.request.app.state.pool.fetchval("SELECT EXISTS (SELECT 1 FROM units WHERE id = $1)",
                                                              root):
        raise _bad_input("There is no unit with this id.")
    return root


SNAPSHOT = "Start with the state as it stands (see the type), then report changes: no gap and no overlap " \
           "between what a query would read and what the subscription reports."


@strawberry.type(description="A KPI whose state (breached, stale, pending, ok or no_data) changed, with its facts as "
                               "the read model has them when the change is reported.")
class KPIStateChange:
    kpi_id: strawberry.ID
    name: str
    unit_id: strawberry.ID
    previous_state: str | None = strawberry.field(
        description="The state this subscription last reported or started from; null in a snapshot and for a KPI "
                    "it had not seen (defined, or moved into the subtree, since it started).")
    state: str
    stale: bool
    latest_value: float | None
    latest_measured_at: datetime | None
    target: float | None = strawberry.field(description="The target in force today (UTC).")
    rules: list[Annotated[ThresholdRule, strawberry.lazy("services.gateway.api")]]
    cause: str | None = strawberry.field(
        description="The event whose announcement reported it, e.g. KPIThresholdBreached; null in a snapshot.")
    at: datetime = strawberry.field(description="When that event was recorded; in a snapshot, when it was read.")


@strawberry.type(description="A check-in on a key result, or a correction of one.")
class KeyResultProgress:
    key_result_id: strawberry.ID
    objective_id: strawberry.ID
    unit_id: strawberry.ID
    version: int = strawberry.field(description="The key result's version this check-in recorded.")
    corrects: int | None = strawberry.field(description="The version of the check-in this corrects, if it does.")
    value: float
    confidence: int | None
    note: str
    valid_on: date
    current: float | None = strawberry.field(
        description="The key result's current value right after it (in a snapshot: now).")
    score: float | None = strawberry.field(description="The key result's score at that current value.")
    band: str | None
    at: datetime = strawberry.field(description="When it was recorded.")


def _kpi_change(facts: KPIFacts, previous: str | None) -> KPIStateChange:
    """Built from the Query side's KPI (its rules and target worked out the same way), leaving
    out its fields that read more of the read model: on a websocket those would share one
    request context for the connection's whole life."""
    from services.gateway.api import KPI

    kpi = KPI.of(facts.kpi)
    return KPIStateChange(kpi_id=kpi.id, name=kpi.name, unit_id=strawberry.ID(str(facts.kpi.row["unit_id"])),
                          previous_state=previous, state=kpi.state, stale=kpi.stale, latest_value=kpi.latest_value,
                          latest_measured_at=kpi.latest_measured_at, target=kpi.target, rules=kpi.rules,
                          cause=facts.cause, at=facts.at)


def _progress(facts: CheckInFacts) -> KeyResultProgress:
    row, score = facts.row, facts.score
    return KeyResultProgress(
        key_result_id=strawberry.ID(str(row["key_result_id"])), objective_id=strawberry.ID(str(row["objective_id"])),
        unit_id=strawberry.ID(str(row["unit_id"])), version=row["version"], corrects=row["corrects_version"],
        value=row["value"], confidence=row["confidence"], note=row["note"], valid_on=row["valid_on"],
        current=facts.current, score=score, band=band(score), at=row["recorded_at"])


@strawberry.type
class Subscription:
    @strawberry.subscription(description="KPIs of the unit and of every unit below it whose state changes: each "
                                         "reported when its state differs from the last one this subscription saw.")
    async def kpi_state_changed(
        self, info: Info, unit: strawberry.ID,
        snapshot: Annotated[bool, strawberry.argument(description=SNAPSHOT + " The snapshot is one item per KPI, "
                                                      "with previousState and cause null.")] = False,
    ) -> AsyncGenerator[KPIStateChange, None]:
        root = await _subtree_root(info, unit)
        async with change_feed(info.context.request).inbox("kpi", root) as inbox:
            # Listening before reading the states: a change in between is heard, and reported
            # only if it leaves a state other than the one read.
            read_at = datetime.now(UTC)
            kpis = await subtree_kpis(info.context.request.app.state.pool, root)
            if kpis is None:
                raise _bad_input("There is no unit with this id.")
            seen = {k.row["id"]: k.state for k in kpis}
            if snapshot:
                for kpi in kpis:
                    yield _kpi_change(KPIFacts(kpi, None, read_at), None)
            while True:
                facts = await inbox.get()
                assert isinstance(facts, KPIFacts)
                kpi_id, state = facts.kpi.row["id"], facts.kpi.state
                previous = seen.get(kpi_id)
                if state != previous:
                    seen[kpi_id] = state
                    yield _kpi_change(facts, previous)

    @strawberry.subscription(description="Every check-in (and correction of one) on the key results of the "
                                         "objectives of the unit and of every unit below it.")
    async def key_result_progressed(
        self, info: Info, unit: strawberry.ID,
        snapshot: Annotated[bool, strawberry.argument(description=SNAPSHOT + " The snapshot is the last check-in "
                                                      "(or correction) recorded on each key result.")] = False,
    ) -> AsyncGenerator[KeyResultProgress, None]:
        root = await _subtree_root(info, unit)
        async with change_feed(info.context.request).inbox("key_result", root) as inbox:
            reported: dict[UUID, int] = {}
            if snapshot:
                for row in await info.context.request.app.state.pool.fetch(LAST_CHECK_INS_SQL, root):
                    reported[row["key_result_id"]] = row["version"]
                    yield _progress(CheckInFacts(row, row["current"]))
            while True:
                facts = await inbox.get()
                assert isinstance(facts, CheckInFacts)
                # A check-in heard while the snapshot was read is in the snapshot already.
                if facts.row["version"] > reported.get(facts.row["key_result_id"], 0):
                    yield _progress(facts)


# Authentication of a websocket ---------------------------------------------------------------

def connection_token(params: object) -> str | None:
    """The bearer token in a connection_init payload: `{"Authorization": "Bearer <token>"}` (the
    header's name in any case) or `{"authToken": "<token>"}`."""
    if not isinstance(params, dict):
        return None
    for key, value in params.items():
        if not isinstance(value, str):
            continue
        if key.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif key == "authToken" and value.strip():
            return value.strip()
    return None


def websocket_principal(verifier: TokenVerifier, params: object) -> Principal:
    """Who a websocket's connection_init says it is; ConnectionRejectionError (closed with 4403)
    when the token is missing, invalid or of no reading role."""
    token = connection_token(params)
    if token is None:
        raise ConnectionRejectionError({"message": "A bearer token is required in connection_init."})
    try:
        principal = verifier.verify(token)
    except Problem as e:
        raise ConnectionRejectionError({"message": e.detail}) from None
    if not principal.has_any(DATA_READERS):
        raise ConnectionRejectionError({"message": "This token's role may not read."})
    return principal


def operation_type(payload: object, max_tokens: int) -> OperationType | None:
    """The type of the operation a subscribe message asks for; None when it cannot tell (a
    syntax error, no such operation), which the protocol handler then answers as it does."""
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return None
    try:
        document = parse(payload["query"], no_location=True, max_tokens=max_tokens)
    except GraphQLError:
        return None
    name = payload.get("operationName")
    chosen = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)
              and (name is None or (d.name is not None and d.name.value == name))]
    return chosen[0].operation if len(chosen) == 1 else None


class SubscriptionsOnly(BaseGraphQLTransportWSHandler):
    """graphql-transport-ws carrying subscriptions only. The connection's context (and the
    `Alignment` cache in it) lives as long as the socket, so a query sent over it would read
    what an earlier one cached; queries and mutations go by POST, with Tandem-Wait-For."""

    async def handle_subscribe(self, message: Any) -> None:
        from services.gateway.api import MAX_TOKENS

        kind = operation_type(message.get("payload"), MAX_TOKENS) if self.connection_acknowledged else None
        if kind is not None and kind is not OperationType.SUBSCRIPTION:
            await self.send_message({"id": message["id"], "type": "error", "payload": [
                {"message": f"Only subscriptions go over the websocket; send a {kind.value} by POST."}]})
            return
        await super().handle_subscribe(message)


class GraphQLSocketRouter(GraphQLRouter):
    """The GraphQL router, authenticating a websocket on its connection_init (a browser cannot
    send headers on one): the principal goes on the connection's context for every operation."""

    graphql_transport_ws_handler_class = SubscriptionsOnly

    async def on_ws_connect(self, context: Any) -> UnsetType | dict[str, object] | None:
        context.principal = websocket_principal(context.request.app.state.token_verifier,
                                                context.connection_params)
        return await super().on_ws_connect(context)

