"""A large organisation, written through the services' own write paths.

At scale 1: 1 company, 20 departments, 400 teams, 4,000 people, 6,000 objectives (5 for the
company, 5 per department aligned to the company's, the rest spread over the teams, four in
five aligned to one of their department's), 20,000 key results, 10,000 check-ins, 1,000 KPIs
with 30 daily measurements each (the bulk endpoint: one request per KPI). Every count but the
company's scales with `scale`. Requests go `concurrency` at a time; each phase waits for the
one before, since it names what that one created.

Given a token of the `hr_sync` role (`scim_token`), the org units go in over SCIM /Bulk (the
company and the departments in one request, naming the company by bulkId, then the teams, up
to 1,000 a request), where new Groups run together and their saves share transactions; they
are the same units (`create_unit`, no members) as over REST. People stay on REST: a SCIM User
joins today and carries a user name, and these join on 2024-01-08 with none.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx

from services.demo import current_quarter

SCIM_BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
SCIM_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
SCIM_UNIT = "urn:tandem:params:scim:schemas:extension:unit:2.0:Group"
SCIM_MAX_OPERATIONS = 1000
RETRIED = frozenset({409, 503})
"""A lost race (the server retries most of them itself) or a service busy: sent again."""


def spread(total: int, buckets: int) -> list[int]:
    """`total` split over `buckets` as evenly as it goes, the larger shares first."""
    base, extra = divmod(total, buckets)
    return [base + (i < extra) for i in range(buckets)]


@dataclass(frozen=True)
class Shape:
    departments: int
    teams: int
    people: int
    objectives: int
    key_results: int
    check_ins: int
    kpis: int
    measurements_per_kpi: int = 30
    company_objectives: int = 5
    objectives_per_department: int = 5

    @classmethod
    def at(cls, scale: float) -> Shape:
        def n(full: int, least: int = 1) -> int:
            return max(least, round(full * scale))

        departments = n(20)
        teams = n(400, departments)
        objectives = n(6000, 5 + 5 * departments + teams)
        return cls(departments=departments, teams=teams, people=n(4000, 1 + departments + teams),
                   objectives=objectives, key_results=n(20_000, objectives), check_ins=n(10_000, 0),
                   kpis=n(1000))


@dataclass
class Org:
    """What was created: the ids the benchmark reads back, and the log positions to wait for."""

    company: UUID | None = None
    cycle: UUID | None = None
    departments: list[UUID] = field(default_factory=list)
    teams: list[UUID] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=lambda: {"goals": 0, "metrics": 0})
    writes: int = 0
    measurements: int = 0
    seconds: float = 0.0


class Builder:
    def __init__(self, goals_url: str, metrics_url: str, token: str, *, concurrency: int = 24, seed: int = 6,
                 scim_token: str | None = None):
        headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": "bench-load"}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.clients = {
            "goals": httpx.AsyncClient(base_url=goals_url, headers=headers, timeout=120, limits=limits),
            "metrics": httpx.AsyncClient(base_url=metrics_url, headers=headers, timeout=120, limits=limits),
        }
        self.scim = None if scim_token is None else httpx.AsyncClient(
            base_url=goals_url, timeout=600, headers={"Authorization": f"Bearer {scim_token}",
                                                      "X-Correlation-ID": "bench-load"})
        self.concurrency = concurrency
        self.random = random.Random(seed)
        self.org = Org()
        self.department_of: dict[UUID, UUID] = {}

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        if self.scim is not None:
            await self.scim.aclose()

    async def scim_bulk(self, name: str, operations: Sequence[dict[str, Any]]) -> list[UUID]:
        """POST /scim/v2/Bulk, 1,000 operations a request at most, each operation a new Group or
        User that must be created (failOnErrors 1); the ids in the operations' order."""
        assert self.scim is not None
        started = time.perf_counter()
        ids: list[UUID] = []
        for start in range(0, len(operations), SCIM_MAX_OPERATIONS):
            chunk = operations[start:start + SCIM_MAX_OPERATIONS]
            r = await self.scim.post("/scim/v2/Bulk", json={"schemas": [SCIM_BULK], "failOnErrors": 1,
                                                             "Operations": list(chunk)})
            if r.status_code != 200:
                raise RuntimeError(f"SCIM Bulk ({name}) failed: {r.status_code} {r.text[:500]}")
            results = r.json()["Operations"]
            failed = [o for o in results if o.get("status") != "201"]
            if failed or len(results) != len(chunk):
                raise RuntimeError(f"SCIM Bulk ({name}): {len(results)} of {len(chunk)} answered, failed: {failed[:3]}")
            ids += [UUID(o["location"].rsplit("/", 1)[1]) for o in results]
            log, _, position = r.headers["Tandem-Position"].partition("=")
            self.org.positions[log] = max(self.org.positions[log], int(position))
            self.org.writes += 1
        seconds = time.perf_counter() - started
        print(f"  {name}: {len(ids):,} over SCIM Bulk in {seconds:.1f} s ({len(ids) / max(seconds, 1e-9):,.0f}/s)",
              flush=True)
        return ids

    @staticmethod
    def scim_group(name: str, kind: str, parent: str | None, bulk_id: str) -> dict[str, Any]:
        extension: dict[str, Any] = {"kind": kind}
        if parent is not None:
            extension["parent"] = {"value": parent}
        return {"method": "POST", "path": "/Groups", "bulkId": bulk_id, "data": {
            "schemas": [SCIM_GROUP, SCIM_UNIT], "displayName": name, SCIM_UNIT: extension}}

    async def write(self, log: str, method: str, path: str, body: dict[str, Any]) -> UUID:
        for attempt in range(5):
            r = await self.clients[log].request(method, path, json=body)
            if r.status_code not in RETRIED:
                break
            await asyncio.sleep(0.05 * 2**attempt)  # backoff before sending a refused write again
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {path} failed: {r.status_code} {r.text[:500]}")
        data = r.json()
        self.org.positions[log] = max(self.org.positions[log], data["position"])
        self.org.writes += 1
        return UUID(data["id"])

    async def phase(self, name: str, log: str, path_and_bodies: Sequence[tuple[str, dict[str, Any]]]) -> list[UUID]:
        """POST each body, `concurrency` at a time; the ids in the bodies' order. Prints how far
        it got every tenth and the rate at the end."""
        total = len(path_and_bodies)
        ids: list[UUID | None] = [None] * total
        work: Iterator[tuple[int, tuple[str, dict[str, Any]]]] = iter(enumerate(path_and_bodies))
        done = 0
        started = time.perf_counter()
        step = max(1, total // 10)

        async def worker() -> None:
            nonlocal done
            for i, (path, body) in work:
                ids[i] = await self.write(log, "POST", path, body)
                done += 1
                if done % step == 0 and done < total:
                    rate = done / (time.perf_counter() - started)
                    print(f"  {name}: {done:,}/{total:,} ({rate:,.0f}/s)", flush=True)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, total))))
        seconds = time.perf_counter() - started
        print(f"  {name}: {total:,} in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} writes/s)", flush=True)
        return [i for i in ids if i is not None]

    async def build(self, shape: Shape) -> Org:
        started = time.perf_counter()
        org = self.org
        await self.structure(shape)
        owners = await self.people(shape)
        objectives = await self.objectives(shape, owners)
        await self.key_results_and_check_ins(shape, objectives)
        await self.kpis(shape)
        org.seconds = time.perf_counter() - started
        return org

    async def structure(self, shape: Shape) -> None:
        org = self.org
        today = date.today()
        name, starts, ends = current_quarter(today)
        [year] = await self.phase("year", "goals", [("/v1/cycles", {
            "name": f"Bench {today.year}", "kind": "year", "startsOn": date(today.year, 1, 1).isoformat(),
            "endsOn": date(today.year, 12, 31).isoformat(), "status": "active"})])
        [org.cycle] = await self.phase("cycle", "goals", [("/v1/cycles", {
            "name": f"Bench {name}", "kind": "quarter", "parentId": str(year), "startsOn": starts.isoformat(),
            "endsOn": ends.isoformat(), "status": "active"})])
        per_department = spread(shape.teams, shape.departments)
        if self.scim is not None:
            [org.company, *org.departments] = await self.scim_bulk("company and departments", [
                self.scim_group("Bench Corp", "company", None, "company"),
                *(self.scim_group(f"Department {d:02}", "department", "bulkId:company", f"d{d}")
                  for d in range(shape.departments))])
            org.teams = await self.scim_bulk("teams", [
                self.scim_group(f"Team {d:02}-{t:02}", "team", str(department), f"t{d}-{t}")
                for d, (department, count) in enumerate(zip(org.departments, per_department, strict=True))
                for t in range(count)])
        else:
            [org.company] = await self.phase("company", "goals", [
                ("/v1/units", {"name": "Bench Corp", "kind": "company"})])
            org.departments = await self.phase("departments", "goals", [
                ("/v1/units", {"name": f"Department {d:02}", "kind": "department", "parentId": str(org.company)})
                for d in range(shape.departments)])
            org.teams = await self.phase("teams", "goals", [
                ("/v1/units", {"name": f"Team {d:02}-{t:02}", "kind": "team", "parentId": str(department)})
                for d, (department, count) in enumerate(zip(org.departments, per_department, strict=True))
                for t in range(count)])
        self.department_of = {team: department for department, count, start in zip(
            org.departments, per_department, _starts(per_department), strict=True)
            for team in org.teams[start:start + count]}

    def person(self, n: int, unit: UUID, manager: UUID | None) -> tuple[str, dict[str, Any]]:
        return ("/v1/people", {"name": f"Person {n:05}", "email": f"person.{n:05}@bench.example",
                               "unitId": str(unit), "managerId": str(manager) if manager else None,
                               "joinedOn": "2024-01-08"})

    async def people(self, shape: Shape) -> dict[UUID, list[UUID]]:
        """The CEO, a head per department, a lead per team, then the members: each unit's
        people, for owning its objectives."""
        org = self.org
        assert org.company is not None
        [ceo] = await self.phase("people (CEO)", "goals", [self.person(0, org.company, None)])
        heads = await self.phase("people (heads)", "goals", [
            self.person(1 + d, department, ceo) for d, department in enumerate(org.departments)])
        head_of = dict(zip(org.departments, heads, strict=True))
        first = 1 + len(heads)
        leads = await self.phase("people (leads)", "goals", [
            self.person(first + t, team, head_of[self.department_of[team]]) for t, team in enumerate(org.teams)])
        first += len(leads)
        members_per_team = spread(shape.people - first, len(org.teams))
        bodies, units = [], []
        for team, lead, count in zip(org.teams, leads, members_per_team, strict=True):
            for _ in range(count):
                bodies.append(self.person(first + len(bodies), team, lead))
                units.append(team)
        members = await self.phase("people (members)", "goals", bodies)
        owners: dict[UUID, list[UUID]] = {org.company: [ceo], **{d: [h] for d, h in head_of.items()},
                                          **{t: [lead] for t, lead in zip(org.teams, leads, strict=True)}}
        for team, member in zip(units, members, strict=True):
            owners[team].append(member)
        return owners

    def objective(self, n: int, unit: UUID, owner: UUID, parent: UUID | None) -> tuple[str, dict[str, Any]]:
        return ("/v1/objectives", {"title": f"Objective {n:05}", "owner": {"kind": "person", "id": str(owner)},
                                   "unitId": str(unit), "cycleId": str(self.org.cycle),
                                   "parentId": str(parent) if parent else None})

    async def objectives(self, shape: Shape, owners: dict[UUID, list[UUID]]) -> list[UUID]:
        org = self.org
        assert org.company is not None
        company = await self.phase("objectives (company)", "goals", [
            self.objective(i, org.company, owners[org.company][0], None) for i in range(shape.company_objectives)])
        n = len(company)
        bodies = []
        for department in org.departments:
            for i in range(shape.objectives_per_department):
                bodies.append(self.objective(n, department, owners[department][0], company[i % len(company)]))
                n += 1
        departmental = await self.phase("objectives (departments)", "goals", bodies)
        of_department = {d: departmental[i * shape.objectives_per_department:(i + 1) * shape.objectives_per_department]
                         for i, d in enumerate(org.departments)}
        per_team = spread(shape.objectives - n, len(org.teams))
        bodies = []
        for team, count in zip(org.teams, per_team, strict=True):
            parents, people = of_department[self.department_of[team]], owners[team]
            for i in range(count):
                parent = parents[i % len(parents)] if i % 5 != 4 else None  # four in five aligned
                bodies.append(self.objective(n, team, people[i % len(people)], parent))
                n += 1
        return company + departmental + await self.phase("objectives (teams)", "goals", bodies)

    def measure(self, i: int) -> dict[str, Any]:
        """The kinds in turn, each with what it needs."""
        kind = ("increase_to", "decrease_to", "stay_above", "done", "milestones")[i % 5]
        return {
            "increase_to": {"start": 0, "target": 100, "unit": "%"},
            "decrease_to": {"start": 50, "target": 10, "unit": "h"},
            "stay_above": {"target": 90, "unit": "%"},
            "done": {},
            "milestones": {"milestones": [{"title": "First"}, {"title": "Second"}, {"title": "Third", "weight": 2}]},
        }[kind] | {"kind": kind}

    def value(self, measure: dict[str, Any]) -> float:
        kind = measure["kind"]
        if kind in ("increase_to", "stay_above"):
            return round(self.random.uniform(40, 100), 1)
        if kind == "decrease_to":
            return round(self.random.uniform(10, 50), 1)
        return float(self.random.randint(0, 1 if kind == "done" else 3))

    async def key_results_and_check_ins(self, shape: Shape, objectives: list[UUID]) -> None:
        """Key results round the objectives in turn, so that no two requests in flight add to
        the same objective; then a check-in on the first `check_ins` of them."""
        counts = spread(shape.key_results, len(objectives))
        bodies, measures = [], []
        for round_ in range(max(counts)):
            for objective, count in zip(objectives, counts, strict=True):
                if round_ < count:
                    measure = self.measure(len(bodies))
                    bodies.append((f"/v1/objectives/{objective}/key-results",
                                   {"title": f"Key result {len(bodies):05}", **measure}))
                    measures.append(measure)
        key_results = await self.phase("key results", "goals", bodies)
        today = date.today()
        check_ins = [(f"/v1/key-results/{kr}/check-ins", {
            "value": self.value(measure), "confidence": self.random.randint(3, 9), "note": "bench",
            "validOn": (today - timedelta(days=self.random.randint(0, 20))).isoformat()})
            for kr, measure in list(zip(key_results, measures, strict=True))[:shape.check_ins]]
        await self.phase("check-ins", "goals", check_ins)

    async def kpis(self, shape: Shape) -> None:
        org = self.org
        units = org.teams + org.departments
        kpis = await self.phase("KPIs", "metrics", [("/v1/kpis", {
            "name": f"KPI {i:04}", "unit": "%", "unitId": str(units[i % len(units)]),
            "direction": "higher_is_better", "cadence": "daily", "target": 95,
            "rules": [{"kind": "below", "threshold": 80, "severity": "warning", "recovery": 85}]})
            for i in range(shape.kpis)])
        now = datetime.now(UTC).replace(microsecond=0)
        days = shape.measurements_per_kpi
        await self.phase("measurements (bulk)", "metrics", [(f"/v1/kpis/{kpi}/measurements/bulk", {"measurements": [
            {"value": round(self.random.uniform(70, 100), 1), "measuredAt": (now - timedelta(days=days - d)).isoformat(),
             "source": "bench"} for d in range(days)]}) for kpi in kpis])
        org.measurements = len(kpis) * days


def _starts(counts: list[int]) -> list[int]:
    out, start = [], 0
    for count in counts:
        out.append(start)
        start += count
    return out
