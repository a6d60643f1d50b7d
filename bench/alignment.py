"""Timing the whole-organisation alignment query: the gateway over HTTP against one
hand-written SQL statement over the same read model.

- gateway: `ALIGNMENT` POSTed to the running gateway, timed from sending to the last byte of
  the answer (parsing the JSON on our side is not timed).
- SQL baseline: one recursive CTE with `json_agg` over the gateway's read-model tables (schema
  `gateway`), fetched as JSON text over one asyncpg connection in this process. It fetches
  the same units (three levels), objectives of the cycle (archived left out) and key results
  with the same fields, but computes no scores: scoring is the gateway's work, so what the
  ratio shows includes it.
- statements: what the gateway sends to PostgreSQL for one such query, counted by running it
  in this process through the gateway's own schema and resolvers on a pool whose connections
  log every statement (asyncpg's query logger), leaving out the pool's own reset of a
  connection it takes back. The baseline is one statement by construction.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import httpx

ALIGNMENT = ("query($cycle: ID) { alignment(cycle: $cycle) { ...N children { ...N children { ...N } } } } "
             "fragment N on AlignmentNode { unit { id name kind } score objectives { id title score "
             "rolledUpScore band parentId keyResults { id title current score } } }")

BASELINE = """
WITH RECURSIVE tree(id, depth) AS (
    SELECT id, 0 FROM gateway.units WHERE id = $1
    UNION ALL
    SELECT u.id, t.depth + 1 FROM gateway.units u JOIN tree t ON u.parent_id = t.id WHERE t.depth < 2)
SELECT coalesce(json_agg(json_build_object(
    'id', u.id, 'name', u.name, 'kind', u.kind, 'parentId', u.parent_id, 'depth', t.depth,
    'objectives', (
        SELECT coalesce(json_agg(json_build_object(
            'id', o.id, 'title', o.title, 'parentId', o.parent_id,
            'keyResults', (
                SELECT coalesce(json_agg(json_build_object('id', k.id, 'title', k.title, 'current', k.current)
                                         ORDER BY k.created_at, k.id), '[]')
                FROM gateway.key_results k WHERE k.objective_id = o.id))
            ORDER BY o.created_at, o.id), '[]')
        FROM gateway.objectives o
        WHERE o.unit_id = u.id AND o.cycle_id = $2 AND o.status <> 'archived'))
    ORDER BY t.depth, u.name, u.id), '[]')::text
FROM tree t JOIN gateway.units u USING (id)"""


POOL_RESET = "SELECT pg_advisory_unlock_all()"
"""How asyncpg's reset of a connection going back to its pool begins: the pool's, not a query."""


@dataclass(frozen=True)
class Timing:
    samples: list[float]
    units: int
    objectives: int
    key_results: int
    nbytes: int
    statements: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        """The nearest-rank 95th percentile."""
        ordered = sorted(self.samples)
        return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


async def repeat(run: Callable[[], Awaitable[bytes]], warmup: int, repetitions: int) -> tuple[list[float], bytes]:
    """Seconds per run after `warmup` untimed runs, and the last answer."""
    answer = b""
    for _ in range(warmup):
        answer = await run()
    samples = []
    for _ in range(repetitions):
        started = time.perf_counter()
        answer = await run()
        samples.append(time.perf_counter() - started)
    return samples, answer


def count_tree(node: dict[str, Any] | None) -> tuple[int, int, int]:
    """Units, objectives and key results in an alignment answer."""
    if node is None:
        return 0, 0, 0
    units, objectives = 1, len(node["objectives"])
    key_results = sum(len(o["keyResults"]) for o in node["objectives"])
    for child in node.get("children") or []:
        u, o, k = count_tree(child)
        units, objectives, key_results = units + u, objectives + o, key_results + k
    return units, objectives, key_results


async def time_gateway(gateway_url: str, token: str, cycle: UUID, statements: int,
                       warmup: int, repetitions: int) -> Timing:
    body = {"query": ALIGNMENT, "variables": {"cycle": str(cycle)}}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=600,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        async def run() -> bytes:
            r = await client.post("/graphql", json=body)
            r.raise_for_status()
            return r.content

        samples, answer = await repeat(run, warmup, repetitions)
    data = json.loads(answer)
    if data.get("errors"):
        raise RuntimeError(f"the gateway refused the alignment query: {data['errors']}")
    return Timing(samples, *count_tree(data["data"]["alignment"]), len(answer), statements)


async def time_baseline(database_url: str, company: UUID, cycle: UUID, warmup: int, repetitions: int) -> Timing:
    conn = await asyncpg.connect(database_url)
    try:
        async def run() -> bytes:
            return (await conn.fetchval(BASELINE, company, cycle)).encode()

        samples, answer = await repeat(run, warmup, repetitions)
    finally:
        await conn.close()
    units = json.loads(answer)
    objectives = [o for u in units for o in u["objectives"]]
    return Timing(samples, len(units), len(objectives), sum(len(o["keyResults"]) for o in objectives),
                  len(answer), 1)


async def gateway_statements(database_url: str, cycle: UUID) -> int:
    """Statements the gateway's resolvers send for one alignment query, run in this process."""
    from services.common.auth import Principal, Role
    from services.gateway.api import Context, schema

    count = 0

    def logged(record: Any) -> None:
        nonlocal count
        if not record.query.startswith(POOL_RESET):
            count += 1

    async def log_statements(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(logged)

    # The gateway's own pool settings (services.common.database.create_pool), plus the logger.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10, init=log_statements,
                                     server_settings={"search_path": "gateway,public"})
    try:
        principal = Principal(subject="bench", roles=frozenset({Role.admin}), token="")
        result = await schema.execute(ALIGNMENT, variable_values={"cycle": str(cycle)},
                                      context_value=Context(pool, principal))
    finally:
        await pool.close()
    if result.errors:
        raise RuntimeError(f"the alignment query failed in process: {result.errors}")
    return count
