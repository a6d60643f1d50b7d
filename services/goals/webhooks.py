"""Webhooks: the changes feed (services.goals.feeds) pushed to subscribers over HTTP.

A subscriber registers a URL and the event types it wants (`POST /v1/webhooks`, admin), and
gets its signing secret in that answer only. The subscription is event-sourced
(`WebhookSubscription`, listed by `WebhookRegistry`); its delivery progress is not an event but
a row of `webhook_cursors`, and each attempt is a row of `webhook_deliveries` (the delivery log).

Delivery, by a worker in each goals process (an asyncio task of the app's lifespan):
- In order per subscriber: the items of the merged feed that match its types, one request
  each, the next only once the previous was answered with a 2xx. The cursor row moves past an
  item in the same transaction that records its successful attempt.
- At least once: a process that stops between the answer and the commit sends the item again.
  Each item has a stable id (the feed's, e.g. `goals:42`) in the `Tandem-Delivery-Id` header
  and as `deliveryId` in the body: a receiver deduplicates on it.
- One process at a time per subscriber: an attempt holds `SELECT ... FOR UPDATE SKIP LOCKED` on
  the subscriber's cursor row, so processes share the subscribers and never send an item twice
  at once.
- Retries: after a failure (no 2xx, or no answer within the timeout) the subscriber waits
  `webhook_retry_base_seconds`, doubling with each failure in a row up to
  `webhook_retry_max_seconds`. A subscriber still failing `webhook_pause_after_seconds` after
  its first failure in a row, or after `webhook_pause_after_attempts` failures in a row, is
  paused (`WebhookSubscriptionPaused`); `POST /v1/webhooks/{id}/resume` (admin) starts it again
  from the item it stopped at.

Verifying a delivery (the receiver's side): the body is JSON,
`{"deliveryId": "goals:42", "subscriptionId": "...", "event": <a /v1/changes item>}`, and
`Tandem-Signature: t=<unix seconds>,v1=<hex>` where the hex is HMAC-SHA256, keyed with the
secret (its UTF-8 bytes), of `"<t>.<body>"` (the body's exact bytes). Check the HMAC in
constant time and that `t` is recent (a replay defence); `verify_signature` below does both.
The secret is derived from the server's key and the subscription's id, so it is stored nowhere
and never logged; only the registration's answer shows it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated
from uuid import UUID

import asyncpg
import httpx
from eventsourcing.application import AggregateNotFoundError
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import Field, field_validator
from starlette.concurrency import run_in_threadpool

from services.common import database
from services.common.auth import Principal, Role, require, signing_secret
from services.common.eventstore import CommandContext, new_correlation_id, run_command
from services.common.problems import Problem
from services.common.schemas import (
    ApiModel,
    Cursor,
    Page,
    WriteResult,
    decode_cursor,
    decode_keyset,
    encode_cursor,
    keyset_next,
)
from services.common.web import (
    PROBLEM_RESPONSES,
    WRITE_RESPONSES,
    IdempotencyKey,
    IfMatch,
    etag,
    execute_write,
    if_match_version,
)
from services.goals.application import (
    Goals,
    get_webhook,
    list_webhooks,
    pause_webhook,
    register_webhook,
    remove_webhook,
    resume_webhook,
)
from services.goals.domain import DomainError, WebhookStatus, WebhookSubscription
from services.goals.feeds import FEED_LOGS, ChangeOut, FeedPosition, known_event_types, read_changes
from services.goals.settings import GoalsSettings

log = logging.getLogger(__name__)

LOG = "goals"
SIGNATURE_HEADER = "Tandem-Signature"
DELIVERY_ID_HEADER = "Tandem-Delivery-Id"
ATTEMPT_HEADER = "Tandem-Delivery-Attempt"
EVENT_TYPE_HEADER = "Tandem-Event-Type"
SUBSCRIPTION_HEADER = "Tandem-Subscription-Id"
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_ITEMS_PER_ROUND = 100  # per subscriber, so that a pause or removal is seen between batches
PRUNE_EVERY_SECONDS = 3600


# Signing ------------------------------------------------------------------------------------

def server_key(settings: GoalsSettings) -> bytes:
    """The key every subscriber's secret is derived from: `webhook_secret_key`, or in
    development one derived from the JWT secret (with a label of its own, so neither key can
    stand in for the other)."""
    if settings.webhook_secret_key is not None:
        return settings.webhook_secret_key.get_secret_value().encode()
    return hmac.new(signing_secret(settings).encode(), b"tandem-webhook-key/v1", hashlib.sha256).digest()


def subscription_secret(key: bytes, subscription_id: UUID) -> str:
    digest = hmac.new(key, b"tandem-webhook-secret/v1:" + subscription_id.bytes, hashlib.sha256).digest()
    return "whsec_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Tandem-Signature` header's value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
                     now: float | None = None) -> bool:
    """What a receiver runs on each delivery: True when `header` (`t=<unix>,v1=<hex>`, possibly
    with several `v1`) signs exactly `body` with `secret` and `t` is within `tolerance` seconds
    of `now`. The comparison takes constant time."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, s) for s in signatures)


# Tables: delivery progress and the delivery log ------------------------------------------------

TABLES = (
    # One row per subscriber the worker has seen: how far delivery got (feed positions), and
    # the state of the failures in a row at the item it is on.
    """CREATE TABLE IF NOT EXISTS webhook_cursors (
        subscription_id uuid PRIMARY KEY, goals_position bigint NOT NULL, metrics_position bigint NOT NULL,
        pending_id text, attempts integer NOT NULL DEFAULT 0, failures integer NOT NULL DEFAULT 0,
        failing_since timestamptz, next_attempt_at timestamptz, resumes integer NOT NULL DEFAULT 0,
        last_delivered_at timestamptz, last_error text)""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        id bigserial PRIMARY KEY, subscription_id uuid NOT NULL, delivery_id text NOT NULL,
        event_type text NOT NULL, attempt integer NOT NULL, status_code integer, error text,
        duration_ms integer NOT NULL, attempted_at timestamptz NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_subscription ON webhook_deliveries (subscription_id, id)",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_attempted ON webhook_deliveries (attempted_at)",
)


async def create_tables(pool: asyncpg.Pool) -> None:
    """Processes starting together would collide in the catalogue: they take turns."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tandem.goals.webhook_tables'))")
        for ddl in TABLES:
            await conn.execute(ddl)


# The worker ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int


def backoff(failures: int, base: float, ceiling: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row."""
    return min(base * 2 ** min(failures - 1, 60), ceiling)


def delivery_body(subscription_id: UUID, item: ChangeOut) -> bytes:
    return json.dumps({"deliveryId": item.id, "subscriptionId": str(subscription_id),
                       "event": item.model_dump(mode="json")}, separators=(",", ":")).encode()


class WebhookWorker:
    """Delivers the feed to every active subscriber, a round at a time: at start-up, whenever
    an event is committed to either log (LISTEN on the logs' channels), and at least every
    poll interval (for retries falling due)."""

    def __init__(self, application: Goals, settings: GoalsSettings, pool: asyncpg.Pool,
                 client: httpx.AsyncClient, key: bytes):
        self.application = application
        self.settings = settings
        self.pool = pool
        self.client = client
        self.key = key
        self.wake = asyncio.Event()
        self.semaphore = asyncio.Semaphore(settings.webhook_concurrency)
        self._listener: asyncpg.Connection | None = None
        self._pruned_at = 0.0
        self.active = 0
        self.stopping = False
        self.rounds = 0
        self._round_done = asyncio.Condition()

    async def rounds_pass(self, n: int = 1) -> None:
        """Return once `n` more rounds have finished: a test can tell that the worker has looked
        (and, say, left a paused subscriber alone) without waiting on a clock."""
        async with self._round_done:
            target = self.rounds + n
            await self._round_done.wait_for(lambda: self.rounds >= target)

    async def run(self) -> None:
        while not self.stopping:
            self.wake.clear()
            try:
                await self._listen()
                await self.round()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("webhook round failed, retrying: %s", e)
            except Exception:  # noqa: BLE001 - the worker must outlive any one round
                log.exception("webhook round failed")
            async with self._round_done:
                self.rounds += 1
                self._round_done.notify_all()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as its timeout fires, and shut-down would hang.
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.webhook_poll_interval_seconds):
                    await self.wake.wait()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        conn = await asyncpg.connect(self.settings.database_url)
        for _, table in FEED_LOGS:
            # The library NOTIFYs on the log's table name when it appends; with no one to deliver
            # to, a busy log need not wake the worker (a registration wakes it itself).
            await conn.add_listener(table.rpartition(".")[2], lambda *_: self.active and self.wake.set())
        self._listener = conn

    async def close(self) -> None:
        if self._listener is not None:
            with suppress(Exception):
                await self._listener.close(timeout=5)

    async def round(self) -> None:
        subscriptions = [s for s in await asyncio.to_thread(list_webhooks, self.application)
                         if s.status == WebhookStatus.active]
        self.active = len(subscriptions)
        await self._prune()
        if not subscriptions:
            return
        await self.pool.executemany(
            "INSERT INTO webhook_cursors (subscription_id, goals_position, metrics_position) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING", [(s.id, s.start_goals, s.start_metrics) for s in subscriptions])
        await asyncio.gather(*(self._drain(s) for s in subscriptions))

    async def _drain(self, subscription: WebhookSubscription) -> None:
        """Deliver what is due to one subscriber; its troubles never stop the others'."""
        async with self.semaphore:
            for _ in range(MAX_ITEMS_PER_ROUND):
                try:
                    if not await self.deliver_next(subscription):
                        return
                except Problem as e:  # a cursor the logs no longer reach (a database restored from backup)
                    log.error("webhook %s cannot continue: %s", subscription.id, e.detail)
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    log.warning("delivery to webhook %s failed, retrying: %s", subscription.id, e)
                    return
                except Exception:  # noqa: BLE001 - logged; the next round tries again
                    log.exception("delivery to webhook %s failed", subscription.id)
                    return

    async def deliver_next(self, subscription: WebhookSubscription) -> bool:
        """Attempt the subscriber's next item, unless another process has it in hand or its
        retry is not due. True when an item was delivered (there may be more)."""
        pause: int | None = None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM webhook_cursors WHERE subscription_id = $1 "
                                      "FOR UPDATE SKIP LOCKED", subscription.id)
            if row is None:
                return False
            now = datetime.now(UTC)
            failures, failing_since, due = row["failures"], row["failing_since"], row["next_attempt_at"]
            if subscription.resumes > row["resumes"]:  # resumed since: a fresh start at the same item
                failures, failing_since, due = 0, None, None
                await conn.execute("UPDATE webhook_cursors SET failures = 0, failing_since = NULL, "
                                   "next_attempt_at = NULL, resumes = $2 WHERE subscription_id = $1",
                                   subscription.id, subscription.resumes)
            if due is not None and due > now:
                return False
            after = FeedPosition(row["goals_position"], row["metrics_position"])
            page = await read_changes(conn, after, 1, frozenset(subscription.event_types))
            if not page.items:
                if page.next != after:
                    await conn.execute("UPDATE webhook_cursors SET goals_position = $2, metrics_position = $3 "
                                       "WHERE subscription_id = $1", subscription.id, page.next.goals,
                                       page.next.metrics)
                return False
            item = page.items[0]
            attempt = row["attempts"] + 1 if row["pending_id"] == item.id else 1
            outcome = await self.post(subscription, item, attempt)
            await conn.execute(
                "INSERT INTO webhook_deliveries (subscription_id, delivery_id, event_type, attempt, status_code, "
                "error, duration_ms, attempted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                subscription.id, item.id, item.type, attempt, outcome.status_code, outcome.error,
                outcome.duration_ms, now)
            if outcome.ok:
                await conn.execute(
                    "UPDATE webhook_cursors SET goals_position = $2, metrics_position = $3, pending_id = NULL, "
                    "attempts = 0, failures = 0, failing_since = NULL, next_attempt_at = NULL, "
                    "last_delivered_at = $4, last_error = NULL WHERE subscription_id = $1",
                    subscription.id, page.next.goals, page.next.metrics, now)
                return True
            # The wait counts from the end of the failed attempt, however long it took.
            failures += 1
            failing_since = failing_since or now
            ended = datetime.now(UTC)
            wait = backoff(failures, self.settings.webhook_retry_base_seconds, self.settings.webhook_retry_max_seconds)
            await conn.execute(
                "UPDATE webhook_cursors SET pending_id = $2, attempts = $3, failures = $4, failing_since = $5, "
                "next_attempt_at = $6, last_error = $7 WHERE subscription_id = $1",
                subscription.id, item.id, attempt, failures, failing_since, ended + timedelta(seconds=wait),
                outcome.error)
            if (failures >= self.settings.webhook_pause_after_attempts
                    or (ended - failing_since).total_seconds() >= self.settings.webhook_pause_after_seconds):
                pause = failures
        if pause is not None:
            await self._pause(subscription, pause, outcome.error or "failed")
        return False

    async def post(self, subscription: WebhookSubscription, item: ChangeOut, attempt: int) -> Outcome:
        body = delivery_body(subscription.id, item)
        secret = subscription_secret(self.key, subscription.id)
        headers = {"Content-Type": "application/json", "User-Agent": "Tandem-Webhooks/1",
                   DELIVERY_ID_HEADER: item.id, EVENT_TYPE_HEADER: item.type, ATTEMPT_HEADER: str(attempt),
                   SUBSCRIPTION_HEADER: str(subscription.id), SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
        started = time.monotonic()
        try:
            async with self.client.stream("POST", subscription.url, content=body, headers=headers) as answer:
                status = answer.status_code
            error = None if 200 <= status < 300 else f"answered HTTP {status}"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            status, error = None, f"{type(e).__name__}: {e}"[:500]
        return Outcome(error is None, status, error, int((time.monotonic() - started) * 1000))

    async def _pause(self, subscription: WebhookSubscription, failures: int, last_error: str) -> None:
        reason = f"{failures} failed attempt(s) in a row; the last: {last_error}"[:1000]
        context = CommandContext(actor="goals:webhook-worker", correlation_id=new_correlation_id())
        try:
            await run_command(context, pause_webhook, self.application, subscription.id, reason=reason,
                              failures=failures)
        except (DomainError, AggregateNotFoundError):
            return  # paused or removed meanwhile: nothing to add
        log.warning("webhook %s paused after %d failed attempts in a row", subscription.id, failures)

    async def _prune(self) -> None:
        if time.monotonic() - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = time.monotonic()
        await self.pool.execute("DELETE FROM webhook_deliveries WHERE attempted_at < now() - $1::interval",
                                timedelta(days=self.settings.webhook_delivery_log_days))


@asynccontextmanager
async def webhook_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the service's own lifespan (the pool and the write side are up): creates the
    delivery tables and starts the worker, with a pool and an HTTP client of its own so that
    slow subscribers never hold the API's connections."""
    settings: GoalsSettings = app.state.settings
    await create_tables(app.state.pool)
    app.state.webhook_key = server_key(settings)
    worker: WebhookWorker | None = None
    task: asyncio.Task[None] | None = None
    if settings.run_webhook_worker:
        pool = await database.create_pool(settings.database_url, settings.schema_name, settings.webhook_concurrency + 1)
        client = httpx.AsyncClient(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        worker = WebhookWorker(app.state.application, settings, pool, client, app.state.webhook_key)
        task = asyncio.create_task(worker.run(), name="webhook-worker")
    app.state.webhook_worker = worker
    try:
        yield
    finally:
        if task is not None and worker is not None:
            worker.stopping = True  # a stop the loop sees even if a cancellation went astray
            worker.wake.set()
            task.cancel()  # an attempt in flight is sent again later: at least once
            with suppress(asyncio.CancelledError):
                await task
            await worker.close()
            await worker.client.aclose()
            await worker.pool.close()


# Routes -------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES, tags=["webhooks"], lifespan=webhook_lifespan)

Admin = Annotated[Principal, Depends(require(Role.admin))]
WebhookReader = Annotated[Principal, Depends(require(Role.admin, Role.auditor, Role.hr_sync))]
Limit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#\x00-\x1f\x7f]+([/?#][^\s\x00-\x1f\x7f]*)?$"
EventTypeName = Annotated[str, Field(pattern=r"^[A-Za-z]{1,100}$")]


class WebhookIn(ApiModel):
    url: str = Field(max_length=2000, pattern=URL_PATTERN, description="An http or https URL to POST deliveries to.")
    event_types: list[EventTypeName] = Field(min_length=1, max_length=50, description=(
        "Event types of the changes feed to deliver, e.g. `KeyResultProgressed`, `KPIThresholdBreached`, "
        "`KPIRecovered`, `ObjectiveClosed`."))
    description: str = Field("", max_length=500, pattern=r"^[^\x00]*$")
    after: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,400}$", description=(
        "Deliver what comes after this changes-feed cursor (a `nextCursor` of /v1/changes); left out, what "
        "comes after the events recorded so far."))

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, ValueError) as e:
            raise ValueError(f"not a valid URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http or https URL with a host")
        if url.port is not None and not 0 < url.port < 65536:
            raise ValueError("the port must be from 1 to 65535")
        return value

    @field_validator("event_types")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        try:
            known_event_types(value, "eventTypes")
        except Problem as e:
            raise ValueError(e.detail) from None
        return value


class WebhookCreated(WriteResult):
    secret: str = Field(description="The signing secret: shown in this answer only. Verify each delivery's "
                                    "`Tandem-Signature` (t=<unix>,v1=HMAC-SHA256(secret, \"<t>.<body>\") in hex).")


class DeliveryState(ApiModel):
    cursor: str = Field(description="Delivery has got past this changes-feed cursor.")
    failures: int = Field(description="Failed attempts in a row (0 while all is well).")
    failing_since: datetime | None
    next_attempt_at: datetime | None = Field(description="When the failing item is tried again.")
    last_delivered_at: datetime | None
    last_error: str | None


class WebhookOut(ApiModel):
    id: UUID
    url: str
    event_types: list[str]
    description: str
    status: WebhookStatus
    paused_reason: str | None
    created_at: datetime
    version: int
    delivery: DeliveryState


class DeliveryOut(ApiModel):
    id: int = Field(description="The attempt's number in the delivery log.")
    delivery_id: str = Field(description="The item delivered (the changes feed's id), the same in every attempt.")
    event_type: str
    attempt: int = Field(description="1 for the item's first attempt, then 2, 3, ...")
    status_code: int | None = Field(description="The subscriber's HTTP status; null when it did not answer.")
    error: str | None
    succeeded: bool
    duration_ms: int
    attempted_at: datetime


def _app(request: Request) -> Goals:
    return request.app.state.application


def _wake(request: Request) -> None:
    """A new or resumed subscriber: this process's worker looks at once."""
    worker: WebhookWorker | None = request.app.state.webhook_worker
    if worker is not None:
        worker.wake.set()


async def _subscription(request: Request, subscription_id: UUID) -> WebhookSubscription:
    return await run_in_threadpool(get_webhook, _app(request), subscription_id)


def _out(subscription: WebhookSubscription, row: asyncpg.Record | None) -> WebhookOut:
    if row is None:  # the worker has not seen it yet
        state = DeliveryState(cursor=FeedPosition(subscription.start_goals, subscription.start_metrics).encode(),
                              failures=0, failing_since=None, next_attempt_at=None, last_delivered_at=None,
                              last_error=None)
    else:
        state = DeliveryState.from_row(row, cursor=FeedPosition(row["goals_position"], row["metrics_position"]).encode())
    return WebhookOut(id=subscription.id, url=subscription.url, event_types=subscription.event_types,
                      description=subscription.description, status=subscription.status,
                      paused_reason=subscription.paused_reason, created_at=subscription.created_on,
                      version=subscription.version, delivery=state)


async def _cursor_rows(request: Request, ids: Sequence[UUID]) -> dict[UUID, asyncpg.Record]:
    rows = await request.app.state.pool.fetch("SELECT * FROM webhook_cursors WHERE subscription_id = ANY($1::uuid[])",
                                              list(ids))
    return {r["subscription_id"]: r for r in rows}


@router.post("/webhooks", status_code=201, responses=WRITE_RESPONSES)
async def register(body: WebhookIn, request: Request, response: Response, principal: Admin,
                   idempotency_key: IdempotencyKey = None) -> WebhookCreated:
    """Register a subscriber: each item of the changes feed of the given types that comes after
    the start is POSTed to the URL, in order, signed; the answer holds the signing secret, which
    is never shown again (a retry with the same Idempotency-Key gets the same answer)."""
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        heads = FeedPosition(*[await database.log_head(conn, table) for _, table in FEED_LOGS])
    start = FeedPosition.decode(body.after) if body.after else heads
    if start.goals > heads.goals or start.metrics > heads.metrics:
        raise Problem(422, "Invalid request", "after: the cursor is past the end of the logs: it is not one this "
                      "service gave out.", kind="bad-cursor")
    written = await execute_write(request, response, principal, LOG, register_webhook, _app(request),
                                  url=body.url, event_types=body.event_types, description=body.description,
                                  start_goals=start.goals, start_metrics=start.metrics,
                                  location="/v1/webhooks/{id}", idempotency_key=idempotency_key)
    _wake(request)
    return WebhookCreated(**written.model_dump(), secret=subscription_secret(request.app.state.webhook_key, written.id))


@router.get("/webhooks")
async def list_subscriptions(request: Request, _: WebhookReader, limit: Limit = 100,
                             after: Cursor = None) -> Page[WebhookOut]:
    """The subscribers (not removed), in the order registered, with how far delivery got."""
    created_at, last_id = decode_keyset(after)
    subscriptions = sorted(await run_in_threadpool(list_webhooks, _app(request)), key=lambda s: (s.created_on, s.id))
    if created_at is not None:
        subscriptions = [s for s in subscriptions if (s.created_on, s.id) > (created_at, last_id)]
    page, next_cursor = keyset_next([{"created_at": s.created_on, "id": s.id, "subscription": s}
                                     for s in subscriptions[:limit + 1]], limit)
    rows = await _cursor_rows(request, [p["id"] for p in page])
    return Page(items=[_out(p["subscription"], rows.get(p["id"])) for p in page], next_cursor=next_cursor)


@router.get("/webhooks/{subscription_id}")
async def get_subscription(subscription_id: UUID, request: Request, response: Response,
                           _: WebhookReader) -> WebhookOut:
    """A subscriber (never its secret), its status and how far delivery got."""
    subscription = await _subscription(request, subscription_id)
    response.headers["ETag"] = etag(subscription.version)
    return _out(subscription, (await _cursor_rows(request, [subscription_id])).get(subscription_id))


@router.delete("/webhooks/{subscription_id}", responses=WRITE_RESPONSES)
async def remove(subscription_id: UUID, request: Request, response: Response, principal: Admin,
                 if_match: IfMatch = None) -> WriteResult:
    """Stop delivering to the subscriber, for good; it and its delivery log are no longer shown."""
    return await execute_write(request, response, principal, LOG, remove_webhook, _app(request), subscription_id,
                               expected_version=if_match_version(if_match), status=200)


@router.post("/webhooks/{subscription_id}/resume", responses=WRITE_RESPONSES)
async def resume(subscription_id: UUID, request: Request, response: Response, principal: Admin,
                 if_match: IfMatch = None, idempotency_key: IdempotencyKey = None) -> WriteResult:
    """Start delivering to a paused subscriber again, from the item it stopped at, with its
    failures forgotten."""
    written = await execute_write(request, response, principal, LOG, resume_webhook, _app(request), subscription_id,
                                  expected_version=if_match_version(if_match), status=200,
                                  idempotency_key=idempotency_key)
    _wake(request)
    return written


@router.get("/webhooks/{subscription_id}/deliveries")
async def deliveries(subscription_id: UUID, request: Request, _: WebhookReader, limit: Limit = 100,
                     after: Cursor = None) -> Page[DeliveryOut]:
    """The delivery log: every attempt, newest first, with the subscriber's status code or the
    error, when, and the attempt's number for its item."""
    await _subscription(request, subscription_id)
    before = None
    if after:
        value = decode_cursor(after, 1)[0]
        if not value.isdigit() or len(value) > 18:
            raise Problem(422, "Invalid request", "The cursor is not one this service gave out.", kind="bad-cursor")
        before = int(value)
    rows = await request.app.state.pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE subscription_id = $1 AND ($2::bigint IS NULL OR id < $2) "
        "ORDER BY id DESC LIMIT $3", subscription_id, before, limit + 1)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return Page(items=[DeliveryOut.from_row(r, succeeded=r["error"] is None) for r in page], next_cursor=next_cursor)
