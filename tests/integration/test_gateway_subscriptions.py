"""The gateway's change feed against real PostgreSQL: the alignment projection announces in the
transaction that applies an event, and one listening connection per app serves every subscriber.

Events are fed to the real `AlignmentProjection` as contract events (the JSON the goals and
metrics logs hold), so announcements run exactly as in production; every wait for a change is
bounded by a deadline, never a sleep. Over HTTP and websockets: tests/e2e/test_gateway_subscriptions.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import InfrastructureFactory, Tracking
from eventsourcing.utils import Environment

from services.common.database import create_pool, ensure_schema, eventsourcing_env
from services.common.projections import ContractEvent
from services.gateway.projections import AlignmentProjection, AlignmentReadModel, alignment_projections
from services.gateway.subscriptions import INBOX_SIZE, ChangeFeed, Inbox, KPIFacts, SubscriptionEnded, announcements
from tests.conftest import fresh_database

DEADLINE = 30.0
SCHEMA = "gateway"


@dataclass
class ReadModel:
    """The gateway's read model, fed event by event through its projection."""

    url: str
    projection: AlignmentProjection
    positions: dict[str, int] = field(default_factory=lambda: {"Goals": 0, "Metrics": 0})

    def apply(self, log: str, type_: str, originator: uuid.UUID, **data: Any) -> None:
        self.positions[log] += 1
        event = ContractEvent(type_, originator, self.positions[log], {**data, "timestamp": datetime.now(UTC)})
        self.projection.process_event(event, Tracking(log, self.positions[log]))

    def unit(self, parent: uuid.UUID | None = None) -> uuid.UUID:
        unit = uuid.uuid4()
        self.apply("Goals", "OrgUnitCreated", unit, name=f"unit {unit.hex[:6]}",
                   kind="company" if parent is None else "team", parent_id=parent)
        return unit

    def kpi(self, unit: uuid.UUID) -> uuid.UUID:
        kpi = uuid.uuid4()
        self.apply("Metrics", "KPIDefined", kpi, name=f"kpi {kpi.hex[:6]}", unit="tickets", unit_id=unit,
                   direction="lower_is_better", cadence="daily", target=None,
                   rules=[{"id": "backlog", "kind": "above", "threshold": 20, "severity": "critical"}])
        return kpi

    def measure(self, kpi: uuid.UUID, value: float) -> None:
        self.apply("Metrics", "KPIMeasured", kpi, value=value, measurement_id=uuid.uuid4(), source="api",
                   measured_at=datetime.now(UTC) - timedelta(minutes=1))


@pytest.fixture(scope="module")
def read_model() -> Iterator[ReadModel]:
    with fresh_database() as url:
        ensure_schema(url, SCHEMA)
        spec = alignment_projections(SCHEMA)[0]
        spec.create_tables(url)
        factory = InfrastructureFactory.construct(Environment(
            spec.projection_class.name, eventsourcing_env(url, SCHEMA, pool_size=1, max_overflow=0)))
        try:
            yield ReadModel(url, AlignmentProjection(factory.tracking_recorder(AlignmentReadModel)))
        finally:
            factory.close()


@pytest.fixture
async def feed(read_model: ReadModel) -> AsyncIterator[ChangeFeed]:
    pool = await create_pool(read_model.url, SCHEMA, 2)
    try:
        yield ChangeFeed(read_model.url, SCHEMA, pool)
    finally:
        await pool.close()


async def received(inbox: Inbox) -> KPIFacts:
    facts = await asyncio.wait_for(inbox.get(), DEADLINE)
    assert isinstance(facts, KPIFacts)
    return facts


def listening_sessions(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND query LIKE 'LISTEN %gateway_changes%'").fetchone()[0]


async def test_one_connection_serves_every_subscriber_and_closes_after_the_last(
        read_model: ReadModel, feed: ChangeFeed) -> None:
    company = read_model.unit()
    team, sibling = read_model.unit(company), read_model.unit(company)
    kpi, sibling_kpi = read_model.kpi(team), read_model.kpi(sibling)
    async with AsyncExitStack() as stack:
        inboxes = [await stack.enter_async_context(feed.inbox("kpi", root)) for root in [company] * 50 + [team]]
        other = await stack.enter_async_context(feed.inbox("kpi", sibling))
        key_results = await stack.enter_async_context(feed.inbox("key_result", company))
        assert listening_sessions(read_model.url) == 1
        conn = feed._conn
        assert conn is not None

        await asyncio.to_thread(read_model.measure, kpi, 25)
        for inbox in inboxes:
            facts = await received(inbox)
            assert facts.kpi.row["id"] == kpi and facts.kpi.state == "pending" and facts.cause == "KPIMeasured"
        # The sibling team's first change is its own: the team's never reached it.
        await asyncio.to_thread(read_model.measure, sibling_kpi, 5)
        assert (await received(other)).kpi.row["id"] == sibling_kpi
        assert key_results.queue.empty()
    assert not feed.listening and conn.is_closed()


async def test_a_lost_connection_ends_every_subscription_and_the_next_listens_afresh(
        read_model: ReadModel, feed: ChangeFeed) -> None:
    company = read_model.unit()
    kpi = read_model.kpi(company)
    async with feed.inbox("kpi", company) as first, feed.inbox("kpi", company) as second:
        assert feed._conn is not None
        pid = feed._conn.get_server_pid()
        with psycopg.connect(read_model.url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for inbox in (first, second):
            with pytest.raises(SubscriptionEnded, match="lost its feed"):
                await asyncio.wait_for(inbox.get(), DEADLINE)
        assert not feed.listening
    async with feed.inbox("kpi", company) as again:
        await asyncio.to_thread(read_model.measure, kpi, 3)
        assert (await received(again)).kpi.state == "ok"


async def test_notices_the_read_model_cannot_back_are_skipped(read_model: ReadModel, feed: ChangeFeed) -> None:
    company = read_model.unit()
    kpi = read_model.kpi(company)
    async with feed.inbox("kpi", company) as inbox:
        assert feed._conn is not None
        for payload in ("not json", '{"kind": "kpi"}',
                        f'{{"kind": "kpi", "id": "{uuid.uuid4()}", "unit_id": "{company}", "cause": "KPIMeasured", '
                        f'"recorded_at": "{datetime.now(UTC).isoformat()}"}}'):  # no such KPI
            await feed._conn.execute("SELECT pg_notify($1, $2)", feed.channel, payload)
        await asyncio.to_thread(read_model.measure, kpi, 30)
        assert (await received(inbox)).kpi.row["id"] == kpi


async def test_a_subscriber_that_falls_behind_is_ended(read_model: ReadModel, feed: ChangeFeed) -> None:
    company = read_model.unit()
    kpi = read_model.kpi(company)
    async with feed.inbox("kpi", company) as inbox:
        await asyncio.to_thread(read_model.measure, kpi, 1)
        facts = await received(inbox)
        for _ in range(INBOX_SIZE):
            inbox.offer(facts)
        assert not inbox.ended
        inbox.offer(facts)
        assert inbox.ended
        for _ in range(INBOX_SIZE):
            assert await inbox.get() is facts
        with pytest.raises(SubscriptionEnded, match="fell too far behind"):
            await inbox.get()


def test_only_changes_a_subscription_reports_are_announced() -> None:
    def event(type_: str) -> ContractEvent:
        return ContractEvent(type_, uuid.uuid4(), 3, {"timestamp": datetime.now(UTC)})

    for type_ in ("KPIMeasured", "KPIMeasurementCorrected", "KPIThresholdBreached", "KPIRecovered", "KPIStale",
                  "KPIFreshened", "KPIRulesRevised", "KeyResultProgressed", "KeyResultCheckInCorrected"):
        [(sql, _)] = announcements(event(type_))
        assert "pg_notify" in sql
    for type_ in ("OrgUnitCreated", "OrgUnitMoved", "KPIDefined", "KPITargetChanged", "KeyResultCreated"):
        assert announcements(event(type_)) == []
