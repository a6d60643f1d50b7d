"""Queries over the alignment read model (asyncpg), a unit subtree at a time.

A GraphQL query walks a tree of units, objectives and key results; resolving it node by node
would cost one SQL round trip per node. Instead `Alignment` (one per request) loads a whole
unit subtree in a fixed number of round trips (the units by a recursive CTE, then one
`= ANY($1)` query per kind of row: objectives with their contributions and guardrails, key
results, KPIs with their rules and targets, people) and the resolvers walk the rows in memory.

Objectives are always loaded with their closure: every objective aligned or contributing to a
loaded one, wherever its unit is, so that rolledUpScore is exact for every objective shown.
What lies outside a loaded subtree (a parent objective, a person, a guardrail KPI, the
ancestors of a unit) and what is fetched per node (check-in pages, measurement series) goes
through per-request DataLoaders, which gather the keys a level of the query asks for into one
`= ANY` query: round trips grow with the query's depth, never with the number of nodes.

A KPI's state and the target in force are worked out from the read model's facts as the
request reads them, on one `now` (UTC) per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from uuid import UUID

import asyncpg
from strawberry.dataloader import DataLoader

from services.gateway.domain import (
    CoachingWarning,
    GuardrailFacts,
    KeyResultFacts,
    Measure,
    ObjectiveFacts,
    ObjectiveNode,
    Point,
    Rule,
    TargetChange,
    kpi_state,
    objective_warnings,
    rolled_up_scores,
    target_in_force,
)

UNITS_SQL = """
WITH RECURSIVE tree(id) AS (
    SELECT id FROM units WHERE id = $1
    UNION
    SELECT u.id FROM units u JOIN tree t ON u.parent_id = t.id)
SELECT u.* FROM units u JOIN tree USING (id) ORDER BY u.name, u.id"""

# Each unit's chain of ancestors, nearest first (hops 1, 2, ...); bounded in case of a loop.
ANCESTORS_SQL = """
WITH RECURSIVE up(start, id, hops) AS (
    SELECT u.id, u.parent_id, 1 FROM units u WHERE u.id = ANY($1::uuid[]) AND u.parent_id IS NOT NULL
    UNION ALL
    SELECT up.start, u.parent_id, up.hops + 1 FROM up JOIN units u ON u.id = up.id
    WHERE u.parent_id IS NOT NULL AND up.hops < 1000)
SELECT up.start, up.hops, u.* FROM up JOIN units u USING (id) ORDER BY up.start, up.hops"""

# Objectives picked by a seed query and, transitively, every objective aligned or contributing
# to one of them, wherever its unit is: their scores roll up into the picked ones'. Each comes
# with what it contributes to and its guardrail KPIs.
OBJECTIVE_CLOSURE_SQL = """
WITH RECURSIVE related(id) AS (
    {seed}
  UNION
    SELECT m.id FROM related r JOIN LATERAL (
        SELECT o.id FROM objectives o WHERE o.parent_id = r.id
        UNION ALL
        SELECT c.objective_id FROM contributions c WHERE c.to_objective_id = r.id) m ON true)
SELECT o.*,
       ARRAY(SELECT (c.to_objective_id, c.weight) FROM contributions c
             WHERE c.objective_id = o.id ORDER BY c.to_objective_id) AS contributes,
       ARRAY(SELECT g.kpi_id FROM objective_guardrails g
             WHERE g.objective_id = o.id ORDER BY g.version, g.kpi_id) AS guardrail_kpis
FROM objectives o JOIN related USING (id) ORDER BY o.created_at, o.id"""

SEEDS = {
    "units": "SELECT id FROM objectives WHERE unit_id = ANY($1::uuid[])",
    "objectives": "SELECT id FROM objectives WHERE id = ANY($1::uuid[])",
    "owners": "SELECT id FROM objectives WHERE owner_kind = 'person' AND owner_id = ANY($1::uuid[])",
    "key_results": "SELECT objective_id FROM key_results WHERE id = ANY($1::uuid[])",
}

KEY_RESULTS_SQL = "SELECT * FROM key_results WHERE objective_id = ANY($1::uuid[]) ORDER BY created_at, id"

# Each KPI with its target history (effective_from, version, target), oldest record first.
KPIS_SQL = """
SELECT k.*, ARRAY(SELECT (t.effective_from, t.version, t.target) FROM kpi_targets t
                  WHERE t.kpi_id = k.id ORDER BY t.version) AS target_changes
FROM kpis k WHERE k.unit_id = ANY($1::uuid[]) ORDER BY k.name, k.id"""

# The KPIs of some units and some more by id, each with its targets and its rules in order.
KPIS_WITH_RULES_SQL = """
SELECT k.*, ARRAY(SELECT (t.effective_from, t.version, t.target) FROM kpi_targets t
                  WHERE t.kpi_id = k.id ORDER BY t.version) AS target_changes,
       ARRAY(SELECT (r.rule_id, r.kind, r.severity, r.threshold, r.low, r.high, r.pending_count, r.pending_for,
                     r.recovery, r.breached) FROM kpi_rules r WHERE r.kpi_id = k.id ORDER BY r.ordinal) AS rule_rows
FROM kpis k WHERE k.unit_id = ANY($1::uuid[]) OR k.id = ANY($2::uuid[]) ORDER BY k.name, k.id"""
RULE_FIELDS = ("id", "kind", "severity", "threshold", "low", "high", "pending_count", "pending_for", "recovery",
               "breached")

PEOPLE_SQL = "SELECT * FROM people WHERE unit_id = ANY($1::uuid[]) OR id = ANY($2::uuid[]) ORDER BY name, id"

# A page of each key result's check-ins, newest first (before a version), each with what it
# corrects and its latest correction, and how many check-ins the key result has in all.
CHECK_INS_SQL = """
SELECT k.ord, (SELECT count(*) FROM check_ins t WHERE t.key_result_id = k.kr) AS total, p.*
FROM unnest($1::uuid[], $2::bigint[], $3::int[]) WITH ORDINALITY AS k(kr, before, lim, ord)
LEFT JOIN LATERAL (
    SELECT c.version, c.valid_on, c.value, c.confidence, c.note, c.corrects_version, c.recorded_at, c.actor,
           COALESCE(c.measurement_id, o.measurement_id) AS measurement_id,
           (SELECT max(x.version) FROM check_ins x
            WHERE x.key_result_id = c.key_result_id AND x.corrects_version = c.version) AS corrected_by,
           o.valid_on AS corrected_valid_on, o.value AS corrected_value, o.confidence AS corrected_confidence,
           o.note AS corrected_note, o.recorded_at AS corrected_recorded_at, o.actor AS corrected_actor
    FROM check_ins c LEFT JOIN check_ins o ON o.key_result_id = c.key_result_id AND o.version = c.corrects_version
    WHERE c.key_result_id = k.kr AND c.version < k.before
    ORDER BY c.version DESC LIMIT k.lim + 1) p ON true
ORDER BY k.ord, p.version DESC"""

MEASUREMENTS_SQL = """
SELECT kpi_id, measured_at, value, version FROM measurements WHERE kpi_id = ANY($1::uuid[])
ORDER BY kpi_id, measured_at, version"""


@dataclass(frozen=True)
class KeyResult:
    row: asyncpg.Record

    @cached_property
    def score(self) -> float | None:
        """Worked out once: the roll-up and the resolvers both read it."""
        r = self.row
        return Measure(r["kind"], r["start"], r["target"], r["low"], r["high"],
                       tuple(r["milestone_weights"])).score(r["current"])

    @property
    def facts(self) -> KeyResultFacts:
        r = self.row
        return KeyResultFacts(r["id"], r["objective_id"], r["title"], r["kind"])


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
    def breached(self) -> bool:
        """Some rule fired and has not recovered (as the metrics log says)."""
        return any(r.breached for r in self.rules)

    @property
    def target(self) -> float | None:
        """The target in force today."""
        return target_in_force(self.row["target"], (TargetChange(target, effective_from, version)
                                                    for effective_from, version, target in self.row["target_changes"]),
                               self.today)


@dataclass(frozen=True)
class CheckInPage:
    """One page of a key result's check-ins (rows of CHECK_INS_SQL), newest first."""

    rows: list[asyncpg.Record]
    has_next: bool
    total: int


@dataclass(frozen=True)
class Loaded:
    """What one round of loading fetched."""

    units: list[asyncpg.Record]
    objectives: list[asyncpg.Record]
    key_results: list[asyncpg.Record]
    kpis: list[asyncpg.Record]
    people: list[asyncpg.Record]


class Alignment:
    """A request's view of the read model, filled a unit subtree (or an objective closure) at a
    time.

    A unit is `complete` once its children, objectives, KPIs and people are loaded; resolvers
    that need those await `unit()` first (no round trip when it is complete already). A unit
    known only by its row (a parent, an ancestor) is in `units` but not `complete`. Every
    loaded objective comes with its closure, so its roll-up is exact. `queries` counts SQL
    round trips.
    """

    def __init__(self, pool: asyncpg.Pool, now: datetime | None = None):
        self.pool = pool
        self.now = now or datetime.now(UTC)
        self.today = self.now.date()
        self.queries = 0
        self.units: dict[UUID, asyncpg.Record] = {}
        self.complete: set[UUID] = set()
        self.children: dict[UUID, list[UUID]] = {}
        self.objectives: dict[UUID, asyncpg.Record] = {}
        self.objectives_of_unit: dict[UUID, list[UUID]] = {}
        self.owned: dict[UUID, set[UUID]] = {}
        self.aligned: dict[UUID, list[UUID]] = {}
        self.key_results: dict[UUID, list[KeyResult]] = {}
        self.key_result_by_id: dict[UUID, KeyResult] = {}
        self.contributes_to: dict[UUID, dict[UUID, float]] = {}
        self.guardrails: dict[UUID, list[UUID]] = {}
        self.kpis: dict[UUID, KPI] = {}
        self.kpis_of_unit: dict[UUID, list[KPI]] = {}
        self.people: dict[UUID, asyncpg.Record] = {}
        self.people_of_unit: dict[UUID, list[UUID]] = {}
        self.scores: dict[UUID, float | None] = {}
        self.rolled_up: dict[UUID, float | None] = {}
        self._warnings: dict[UUID, list[CoachingWarning]] = {}
        self._loading: dict[UUID, asyncio.Task[None]] = {}
        self._cycles: asyncio.Task[list[asyncpg.Record]] | None = None
        self.unit_rows = DataLoader(self._load_unit_rows)
        self.ancestor_ids = DataLoader(self._load_ancestors)
        self.objective_loader = DataLoader(self._load_objectives)
        self.key_result_loader = DataLoader(self._load_key_results)
        self.owner_loader = DataLoader(self._load_owned)
        self.kpi_loader = DataLoader(self._load_kpis)
        self.person_loader = DataLoader(self._load_people)
        self.check_in_pages = DataLoader(self._load_check_ins)
        self.measurements = DataLoader(self._load_measurements)

    # Units --------------------------------------------------------------------------------

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
                self._loading[unit_id] = asyncio.ensure_future(self._load_subtree(unit_id))
            await self._loading[unit_id]
        return self.units.get(unit_id)

    async def unit_row(self, unit_id: UUID) -> asyncpg.Record | None:
        """A unit's row alone (its subtree is loaded only when something asks for it)."""
        return self.units.get(unit_id) or await self.unit_rows.load(unit_id)

    async def ancestors(self, unit_id: UUID) -> list[asyncpg.Record]:
        """The units above this one, the root first."""
        return [self.units[a] for a in await self.ancestor_ids.load(unit_id)]

    def descendants(self, unit_id: UUID, depth: int | None = None) -> list[UUID]:
        """The units below a complete unit, level by level (each level in name order), down to
        `depth` levels (all of them if None)."""
        out: list[UUID] = []
        level, seen = [unit_id], {unit_id}
        n = 0
        while level and (depth is None or n < depth):
            level = sorted((c for u in level for c in self.children.get(u, ()) if c not in seen),
                           key=lambda c: (self.units[c]["name"], c))
            seen.update(level)
            out.extend(level)
            n += 1
        return out

    async def _load_subtree(self, root: UUID) -> None:
        async with self.pool.acquire() as conn:
            units = await conn.fetch(UNITS_SQL, root)
            self.queries += 1
            if not units:  # no such unit: nothing below it either
                return
            loaded = await self._fetch(conn, "units", [u["id"] for u in units])
        self._merge(Loaded(units, *loaded))

    async def _load_unit_rows(self, ids: list[UUID]) -> list[asyncpg.Record | None]:
        self.queries += 1
        rows = {r["id"]: r for r in await self.pool.fetch("SELECT * FROM units WHERE id = ANY($1::uuid[])", ids)}
        for uid, row in rows.items():
            self.units.setdefault(uid, row)
        return [rows.get(i) for i in ids]

    async def _load_ancestors(self, ids: list[UUID]) -> list[list[UUID]]:
        self.queries += 1
        chains: dict[UUID, list[UUID]] = {i: [] for i in ids}
        for r in await self.pool.fetch(ANCESTORS_SQL, ids):
            self.units.setdefault(r["id"], r)
            chains[r["start"]].append(r["id"])
        return [list(reversed(chains[i])) for i in ids]

    # Objectives, key results, KPIs, people ---------------------------------------------------

    async def objective(self, objective_id: UUID) -> asyncpg.Record | None:
        """One objective, loaded with its closure unless it is loaded already."""
        return self.objectives.get(objective_id) or await self.objective_loader.load(objective_id)

    async def key_result(self, key_result_id: UUID) -> KeyResult | None:
        if key_result_id in self.key_result_by_id:
            return self.key_result_by_id[key_result_id]
        return await self.key_result_loader.load(key_result_id)

    async def owned_objectives(self, person_id: UUID) -> list[UUID]:
        """The objectives a person owns, in the order they were created."""
        await self.owner_loader.load(person_id)
        return sorted(self.owned.get(person_id, ()), key=lambda o: (self.objectives[o]["created_at"], o))

    async def kpi(self, kpi_id: UUID) -> KPI | None:
        return self.kpis.get(kpi_id) or await self.kpi_loader.load(kpi_id)

    async def person(self, person_id: UUID) -> asyncpg.Record | None:
        return self.people.get(person_id) or await self.person_loader.load(person_id)

    async def cycles(self) -> list[asyncpg.Record]:
        """Every cycle (a short list), once per request: by start, the longer (a year) first."""
        if self._cycles is None:
            self.queries += 1
            self._cycles = asyncio.ensure_future(
                self.pool.fetch("SELECT * FROM cycles ORDER BY starts_on, ends_on DESC, name, id"))
        return await self._cycles

    async def cycle(self, cycle_id: UUID) -> asyncpg.Record | None:
        return next((c for c in await self.cycles() if c["id"] == cycle_id), None)

    async def current_cycle(self) -> asyncpg.Record | None:
        """The shortest active cycle that contains today (a quarter rather than its year)."""
        running = [c for c in await self.cycles()
                   if c["status"] == "active" and c["starts_on"] <= self.today <= c["ends_on"]]
        return min(running, key=lambda c: (c["ends_on"] - c["starts_on"], c["starts_on"]), default=None)

    async def _load_objectives(self, ids: list[UUID]) -> list[asyncpg.Record | None]:
        await self._load_closure("objectives", [i for i in ids if i not in self.objectives])
        return [self.objectives.get(i) for i in ids]

    async def _load_key_results(self, ids: list[UUID]) -> list[KeyResult | None]:
        await self._load_closure("key_results", [i for i in ids if i not in self.key_result_by_id])
        return [self.key_result_by_id.get(i) for i in ids]

    async def _load_owned(self, ids: list[UUID]) -> list[None]:
        await self._load_closure("owners", ids)
        return [None for _ in ids]

    async def _load_closure(self, seed: str, ids: list[UUID]) -> None:
        if not ids:
            return
        async with self.pool.acquire() as conn:
            loaded = await self._fetch(conn, seed, ids)
        self._merge(Loaded([], *loaded))

    async def _fetch(self, conn: asyncpg.Connection, seed: str, ids: list[UUID]) -> tuple[list[asyncpg.Record], ...]:
        """Objectives picked by `seed` with their closure, then their key results, the KPIs
        they (and the units, when `seed` is "units") need, and the people: the units' and the
        objectives' owners (whether an owner has left is a coaching warning). Four round trips."""
        unit_ids = ids if seed == "units" else []
        objectives = await conn.fetch(OBJECTIVE_CLOSURE_SQL.format(seed=SEEDS[seed]), ids)
        objective_ids = [o["id"] for o in objectives]
        key_results = await conn.fetch(KEY_RESULTS_SQL, objective_ids)
        kpi_ids = {k["kpi_id"] for k in key_results if k["kpi_id"]} | {g for o in objectives for g in o["guardrail_kpis"]}
        kpis = await conn.fetch(KPIS_WITH_RULES_SQL, unit_ids, list(kpi_ids))
        owners = [o["owner_id"] for o in objectives if o["owner_kind"] == "person"]
        people = await conn.fetch(PEOPLE_SQL, unit_ids, list(set(owners)))
        self.queries += 4
        return objectives, key_results, kpis, people

    async def _load_kpis(self, ids: list[UUID]) -> list[KPI | None]:
        self.queries += 1
        self._merge_kpis(await self.pool.fetch(KPIS_WITH_RULES_SQL, [], ids), set())
        return [self.kpis.get(i) for i in ids]

    async def _load_people(self, ids: list[UUID]) -> list[asyncpg.Record | None]:
        self.queries += 1
        for p in await self.pool.fetch(PEOPLE_SQL, [], ids):
            self.people[p["id"]] = p
        return [self.people.get(i) for i in ids]

    async def _load_check_ins(self, keys: list[tuple[UUID, int, int]]) -> list[CheckInPage]:
        """Keys are (key result, first, before version)."""
        self.queries += 1
        rows = await self.pool.fetch(CHECK_INS_SQL, [k[0] for k in keys], [k[2] for k in keys],
                                     [k[1] for k in keys])
        pages: list[list[asyncpg.Record]] = [[] for _ in keys]
        totals = [0 for _ in keys]
        for r in rows:
            totals[r["ord"] - 1] = r["total"]
            if r["version"] is not None:
                pages[r["ord"] - 1].append(r)
        return [CheckInPage(page[:first], len(page) > first, total)
                for page, total, (_, first, _) in zip(pages, totals, keys, strict=True)]

    async def _load_measurements(self, ids: list[UUID]) -> list[list[Point]]:
        self.queries += 1
        points: dict[UUID, list[Point]] = {i: [] for i in ids}
        for r in await self.pool.fetch(MEASUREMENTS_SQL, ids):
            points[r["kpi_id"]].append(Point(r["measured_at"], r["value"], r["version"]))
        return [points[i] for i in ids]

    # Merging and scoring ------------------------------------------------------------------

    def _merge(self, loaded: Loaded) -> None:
        """Add what a load fetched. Every list is complete for the parents it covers (a unit's
        children, an objective's closure and key results), so each parent's entry is replaced,
        never appended to twice."""
        units = {u["id"] for u in loaded.units}
        for u in loaded.units:
            self.units[u["id"]] = u
            self.children[u["id"]] = []
            self.objectives_of_unit[u["id"]] = []
            self.kpis_of_unit[u["id"]] = []
            self.people_of_unit[u["id"]] = []
        for u in loaded.units:
            if u["parent_id"] in units:
                self.children[u["parent_id"]].append(u["id"])
        for o in loaded.objectives:
            oid = o["id"]
            self.objectives[oid] = o
            self.aligned[oid] = []
            self.key_results[oid] = []
            self.contributes_to[oid] = {to: weight for to, weight in o["contributes"]}
            self.guardrails[oid] = list(o["guardrail_kpis"])
            self._warnings.pop(oid, None)
            if o["owner_kind"] == "person":
                self.owned.setdefault(o["owner_id"], set()).add(oid)
        for o in loaded.objectives:
            if o["unit_id"] in units:
                self.objectives_of_unit[o["unit_id"]].append(o["id"])
            if o["parent_id"] in self.aligned and o["id"] not in self.aligned[o["parent_id"]]:
                self.aligned[o["parent_id"]].append(o["id"])
        for row in loaded.key_results:
            kr = KeyResult(row)
            self.key_results[row["objective_id"]].append(kr)
            self.key_result_by_id[row["id"]] = kr
        self._merge_kpis(loaded.kpis, units)
        for p in loaded.people:
            self.people[p["id"]] = p
            if p["unit_id"] in units:
                self.people_of_unit[p["unit_id"]].append(p["id"])
        self.complete |= units
        self._score()

    def _merge_kpis(self, rows: list[asyncpg.Record], units: set[UUID]) -> None:
        for k in rows:
            rules = [Rule(**dict(zip(RULE_FIELDS, r, strict=True))) for r in k["rule_rows"]]
            kpi = KPI(k, rules, self.today)
            self.kpis[k["id"]] = kpi
            if k["unit_id"] in units:
                self.kpis_of_unit[k["unit_id"]].append(kpi)

    def _score(self) -> None:
        """Scores and roll-ups of everything loaded. An archived objective keeps its own scores
        but counts in no other's roll-up (it is put away), as in the goals service."""
        nodes = {}
        for oid, o in self.objectives.items():
            archived = o["status"] == "archived"
            nodes[oid] = ObjectiveNode(None if archived else o["parent_id"],
                                       [(kr.score, kr.row["weight"]) for kr in self.key_results[oid]],
                                       {} if archived else self.contributes_to.get(oid, {}))
        self.scores = {oid: n.score for oid, n in nodes.items()}
        self.rolled_up = rolled_up_scores(nodes)

    # Coaching -----------------------------------------------------------------------------

    def objective_facts(self, objective_id: UUID) -> ObjectiveFacts:
        o = self.objectives[objective_id]
        return ObjectiveFacts(o["id"], o["title"], o["owner_id"], o["cycle_id"], o["status"])

    def guardrail_facts(self, objective_id: UUID) -> list[GuardrailFacts]:
        out = []
        for kpi_id in self.guardrails.get(objective_id, ()):
            kpi = self.kpis.get(kpi_id)
            out.append(GuardrailFacts(kpi_id, kpi.row["name"] if kpi else None, bool(kpi and kpi.breached)))
        return out

    def owner_has_left(self, objective_id: UUID) -> bool:
        """A person owner who left, or whom the read model does not know (as goals judges it)."""
        o = self.objectives[objective_id]
        if o["owner_kind"] != "person":
            return False
        person = self.people.get(o["owner_id"])
        return person is None or person["left_on"] is not None

    def warnings(self, objective_id: UUID) -> list[CoachingWarning]:
        """The coaching warnings an objective shows: its own, its guardrails' and its key results'."""
        if objective_id not in self._warnings:
            o = self.objectives[objective_id]
            self._warnings[objective_id] = objective_warnings(
                self.objective_facts(objective_id), [kr.facts for kr in self.key_results[objective_id]],
                self.guardrail_facts(objective_id), {o["owner_id"]} if self.owner_has_left(objective_id) else ())
        return self._warnings[objective_id]
