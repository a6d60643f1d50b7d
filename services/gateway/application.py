"""Queries over the alignment read model (asyncpg), a unit subtree at a time.

A GraphQL query walks a tree of units, objectives and key results; resolving it node by node
would cost one SQL round trip per node. Instead `Alignment` (one per request) loads a whole
unit subtree in a fixed number of round trips (the units by a recursive CTE, then one
`= ANY($1)` query per kind of child) and the resolvers walk the rows in memory. Objectives
aligned to a loaded objective are always loaded too, wherever their unit is, so that
rolledUpScore is exact for every objective shown. A KPI's state and the target in force are
worked out from the read model's facts as the request reads them, on one `today` (UTC) per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from uuid import UUID

import asyncpg

from services.gateway.domain import (
    Measure,
    ObjectiveNode,
    Rule,
    TargetChange,
    kpi_state,
    rolled_up_scores,
    target_in_force,
)

UNITS_SQL = """
WITH RECURSIVE tree(id) AS (
    SELECT id FROM units WHERE id = $1
    UNION
    SELECT u.id FROM units u JOIN tree t ON u.parent_id = t.id)
SELECT u.* FROM units u JOIN tree USING (id) ORDER BY u.name, u.id"""

# The subtree's objectives and, transitively, every objective aligned or contributing to one
# of them, wherever its unit is: their scores roll up into the subtree's.
OBJECTIVES_SQL = """
WITH RECURSIVE edges(child, parent) AS (
    SELECT id, parent_id FROM objectives WHERE parent_id IS NOT NULL
    UNION ALL
    SELECT objective_id, to_objective_id FROM contributions),
related(id) AS (
    SELECT id FROM objectives WHERE unit_id = ANY($1::uuid[])
    UNION
    SELECT e.child FROM edges e JOIN related r ON e.parent = r.id)
SELECT o.* FROM objectives o JOIN related USING (id) ORDER BY o.created_at, o.id"""

# Each KPI with its target history (effective_from, version, target), oldest record first.
KPIS_SQL = """
SELECT k.*, ARRAY(SELECT (t.effective_from, t.version, t.target) FROM kpi_targets t
                  WHERE t.kpi_id = k.id ORDER BY t.version) AS target_changes
FROM kpis k WHERE k.unit_id = ANY($1::uuid[]) ORDER BY k.name, k.id"""


@dataclass(frozen=True)
class KeyResult:
    row: asyncpg.Record

    @property
    def score(self) -> float | None:
        r = self.row
        return Measure(r["kind"], r["start"], r["target"], r["low"], r["high"],
                       tuple(r["milestone_weights"])).score(r["current"])


@dataclass(frozen=True)
class KPI:
    """A KPI's facts as the read model keeps them, and what they mean on `today` (UTC)."""

    row: asyncpg.Record
    rules: Sequence[Rule]
    today: date

    @property
    def rule_states(self) -> list[str]:
        return [r.state(self.row["latest_value"]) for r in self.rules]

    @property
    def state(self) -> str:
        return kpi_state(self.row["latest_measured_at"] is not None, self.rule_states, self.row["stale"])

    @property
    def target(self) -> float | None:
        """The target in force today."""
        return target_in_force(self.row["target"], (TargetChange(target, effective_from, version)
                                                    for effective_from, version, target in self.row["target_changes"]),
                               self.today)


class Alignment:
    """A request's view of the read model, filled one unit subtree at a time.

    A unit is `complete` once its children, objectives and KPIs are loaded; only complete
    units are handed to resolvers. `queries` counts SQL round trips, so tests can hold the
    number bounded.
    """

    def __init__(self, pool: asyncpg.Pool, today: date | None = None):
        self.pool = pool
        self.today = today or datetime.now(UTC).date()
        self.queries = 0
        self.units: dict[UUID, asyncpg.Record] = {}
        self.complete: set[UUID] = set()
        self.children: dict[UUID, list[UUID]] = {}
        self.objectives: dict[UUID, asyncpg.Record] = {}
        self.objectives_of_unit: dict[UUID, list[UUID]] = {}
        self.aligned: dict[UUID, list[UUID]] = {}
        self.key_results: dict[UUID, list[KeyResult]] = {}
        self.contributes_to: dict[UUID, dict[UUID, float]] = {}
        self.kpis_of_unit: dict[UUID, list[KPI]] = {}
        self.scores: dict[UUID, float | None] = {}
        self.rolled_up: dict[UUID, float | None] = {}
        self._loading: dict[UUID, asyncio.Task[None]] = {}

    async def organization(self) -> asyncpg.Record | None:
        """The company: the first root unit created (a unit with no parent)."""
        self.queries += 1
        root = await self.pool.fetchval(
            "SELECT id FROM units WHERE parent_id IS NULL ORDER BY created_at, id LIMIT 1")
        return None if root is None else await self.unit(root)

    async def unit(self, unit_id: UUID) -> asyncpg.Record | None:
        """One unit, loading its subtree first unless it is loaded already."""
        if unit_id not in self.complete:
            if unit_id not in self._loading:
                self._loading[unit_id] = asyncio.ensure_future(self._load(unit_id))
            await self._loading[unit_id]
        return self.units.get(unit_id)

    async def _load(self, root: UUID) -> None:
        async with self.pool.acquire() as conn:
            units = await conn.fetch(UNITS_SQL, root)
            unit_ids = [u["id"] for u in units]
            objectives = await conn.fetch(OBJECTIVES_SQL, unit_ids)
            objective_ids = [o["id"] for o in objectives]
            key_results = await conn.fetch(
                "SELECT * FROM key_results WHERE objective_id = ANY($1::uuid[]) ORDER BY created_at, id",
                objective_ids)
            contributions = await conn.fetch(
                "SELECT * FROM contributions WHERE objective_id = ANY($1::uuid[])", objective_ids)
            kpis = await conn.fetch(KPIS_SQL, unit_ids)
            rules = await conn.fetch(
                "SELECT kpi_id, rule_id AS id, kind, severity, threshold, low, high, pending_count, pending_for, "
                "recovery, breached FROM kpi_rules WHERE kpi_id = ANY($1::uuid[]) ORDER BY ordinal",
                [k["id"] for k in kpis])
        self.queries += 6
        self._merge(units, objectives, key_results, contributions, kpis, rules)

    def _merge(self, units: list[asyncpg.Record], objectives: list[asyncpg.Record],
               key_results: list[asyncpg.Record], contributions: list[asyncpg.Record],
               kpis: list[asyncpg.Record], rules: list[asyncpg.Record]) -> None:
        """Add a loaded subtree. Every list is complete for the parents it covers, so each
        parent's entry is replaced, never appended to twice."""
        loaded = {u["id"] for u in units}
        for u in units:
            self.units[u["id"]] = u
            self.children[u["id"]] = []
            self.objectives_of_unit[u["id"]] = []
            self.kpis_of_unit[u["id"]] = []
        for u in units:
            if u["parent_id"] in loaded:
                self.children[u["parent_id"]].append(u["id"])
        for o in objectives:
            self.objectives[o["id"]] = o
            self.aligned[o["id"]] = []
            self.key_results[o["id"]] = []
        for o in objectives:
            if o["unit_id"] in loaded:
                self.objectives_of_unit[o["unit_id"]].append(o["id"])
            if o["parent_id"] in self.aligned and o["id"] not in self.aligned[o["parent_id"]]:
                self.aligned[o["parent_id"]].append(o["id"])
        for kr in key_results:
            self.key_results[kr["objective_id"]].append(KeyResult(kr))
        for c in contributions:
            self.contributes_to.setdefault(c["objective_id"], {})[c["to_objective_id"]] = c["weight"]
        rules_of: dict[UUID, list[Rule]] = {k["id"]: [] for k in kpis}
        for r in rules:
            rules_of[r["kpi_id"]].append(Rule.from_contract(r, breached=r["breached"]))
        for k in kpis:
            self.kpis_of_unit[k["unit_id"]].append(KPI(k, rules_of[k["id"]], self.today))
        self.complete |= loaded
        self._score()

    def _score(self) -> None:
        nodes = {oid: ObjectiveNode(o["parent_id"], [(kr.score, kr.row["weight"]) for kr in self.key_results[oid]],
                                    self.contributes_to.get(oid, {}))
                 for oid, o in self.objectives.items()}
        self.scores = {oid: n.score for oid, n in nodes.items()}
        self.rolled_up = rolled_up_scores(nodes)
