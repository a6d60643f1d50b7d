"""Rebuilding every read model from the logs, timed against a raw read of the same stored events.

    python -m bench --only rebuild --rebuild-sizes 100000,1000000

For each size N, a database of its own gets a realistic log of about N events across the goals
and metrics logs (`generate`), and then, in the same process:

- raw read: each log read in notification order through a server-side cursor, every column of
  every row fetched, nothing decoded (the floor of any replay: PostgreSQL, the wire, psycopg);
- read + decode: each read model's logs read as `replay` reads them (the recorder's
  `select_notifications`, a page of `batch_size` at a time) and every row decoded by the mapper
  its projection uses (domain events for the goals and metrics views, contract events for the
  followers), nothing projected;
- rebuild: each read model of `services.audit.read_model_sources()` replayed from scratch into a
  fresh schema with `services.common.replay.replay`, as `make rebuild` and `make import` do.

Each rebuild is printed beside the raw read of the logs it follows (ratio rebuild / raw), and with
two sizes or more, each time beside the smallest size's (the ratio of times against the ratio of
events: linear means they are about equal). Figures only: nothing here asserts a bound.

The log is generated through the real aggregates in memory (their methods, `collect_events()`),
encoded by the real applications' mappers (metadata included: the bytes are what the services
store) and COPYed into `<schema>.<app>_events` with explicit notification ids, then chained with
`HashChain.create` as `services.audit.transfer.import_file` does. Its shape: one company,
departments of 20 teams, 10 people per team, one quarter inside its year, objectives aligned up
the tree with 3-5 key results each, checked in weekly (about 12 check-ins per key result: the
number of key results grows with N, not their history), some corrected; key results bound to
weekly KPIs get their check-ins from the KPI policy; 3 KPIs per team and 2 per department
(daily and weekly) with a quarter of measurements, breaches and recoveries, some corrections,
target changes, rule revisions and stale spells; a few people move teams, change managers, leave.
"""

from __future__ import annotations

import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from eventsourcing.domain import CanCreateTimestamp
from eventsourcing.persistence import Tracking
from psycopg.sql import SQL, Identifier

from services.common.database import ensure_schema, eventsourcing_env
from services.common.eventstore import CommandContext, in_context
from services.common.hashchain import HashChain, rechain
from services.common.replay import ReadModelSource, checksum, drop_schema, open_log, open_view, replay
from services.goals.domain import (
    Cycle,
    CycleKind,
    KeyResult,
    KeyResultKind,
    KPIBinding,
    Objective,
    ObjectiveStatus,
    OrgUnit,
    OwnerKind,
    Person,
    UnitKind,
)
from services.metrics.domain import KPI

LOGS = (("Goals", "goals", "goals_events"), ("Metrics", "metrics", "metrics_events"))
"""(application name, schema, events table) of each log."""

QUARTER_STARTS, QUARTER_ENDS = date(2025, 7, 1), date(2025, 9, 30)
YEAR_STARTS, YEAR_ENDS = date(2025, 1, 1), date(2025, 12, 31)
PLANNING = datetime(2025, 6, 16, 9, tzinfo=UTC)
"""When the organisation, its KPIs and its objectives were recorded (before the quarter)."""
WEEKS = 13  # Fridays in the quarter: check-in days
CHECK_IN_RATE = 0.92  # the share of weekly check-ins that happen: ~12 of 13 per key result
TEAMS_PER_DEPARTMENT = 20
PEOPLE_PER_TEAM = 10
OBJECTIVES_PER_TEAM = 12
OBJECTIVES_PER_DEPARTMENT = 5
COMPANY_OBJECTIVES = 5
EVENTS_PER_TEAM = 975
"""About how many events one team (with its share of its department and of the company) adds:
the generator's size knob. Measured: the logs come out within a few percent of the size asked."""


@dataclass(frozen=True)
class Shape:
    departments: int
    teams: int
    company_objectives: int = COMPANY_OBJECTIVES
    objectives_per_department: int = OBJECTIVES_PER_DEPARTMENT
    objectives_per_team: int = OBJECTIVES_PER_TEAM

    @classmethod
    def for_events(cls, events: int) -> Shape:
        teams = max(1, round(events / EVENTS_PER_TEAM))
        return cls(departments=max(1, math.ceil(teams / TEAMS_PER_DEPARTMENT)), teams=teams)


class Clock:
    """The recorded time the aggregates stamp their events with while generating: moved forward by
    the generator (each command a second after the one before, each round from its own day)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def at(self, moment: datetime) -> None:
        self.now = max(self.now, moment)

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Events take their timestamp from this clock (the library's `create_timestamp`)."""
        saved = CanCreateTimestamp.__dict__["create_timestamp"]
        CanCreateTimestamp.create_timestamp = staticmethod(lambda: self.now)  # type: ignore[method-assign]
        try:
            yield
        finally:
            CanCreateTimestamp.create_timestamp = saved  # type: ignore[method-assign]


class LogWriter:
    """Encodes the events an aggregate has pending with the application's mapper, under a command
    context (the metadata), and COPYs them into the log at explicit, consecutive positions."""

    def __init__(self, cur: psycopg.Cursor[Any], schema: str, table: str, mapper: Any, clock: Clock) -> None:
        self.mapper = mapper
        self.clock = clock
        self.position = 0
        self.types: Counter[str] = Counter()
        self._copy_cm = cur.copy(SQL("COPY {}.{} (notification_id, originator_id, originator_version, topic, state) "
                                     "FROM STDIN").format(Identifier(schema), Identifier(table)))
        self._copy = self._copy_cm.__enter__()

    def emit(self, *aggregates: Any, actor: str, causation: str | None = None,
             correlation: str | None = None) -> int:
        """One command's save: every pending event of the aggregates, in order. Returns the
        position of the last one (0 if there was none)."""
        context = CommandContext(actor=actor, correlation_id=correlation or uuid.uuid4().hex,
                                 causation_id=causation, trace_id=uuid.uuid4().hex)
        last = 0
        with in_context(context):
            for aggregate in aggregates:
                for event in aggregate.collect_events():
                    stored = self.mapper.to_stored_event(event)
                    self.position += 1
                    self._copy.write_row((self.position, stored.originator_id, stored.originator_version,
                                          stored.topic, stored.state))
                    self.types[stored.topic.rpartition(":")[2]] += 1
                    last = self.position
        self.clock.tick()
        return last

    def close(self) -> None:
        self._copy_cm.__exit__(None, None, None)


@dataclass
class Generated:
    shape: Shape
    events: dict[str, int]
    types: dict[str, dict[str, int]]
    seconds: float
    key_results: int = 0
    objectives: int = 0
    people: int = 0
    kpis: int = 0

    @property
    def total(self) -> int:
        return sum(self.events.values())


@dataclass
class _KPIPlan:
    kpi: KPI
    unit: uuid.UUID
    owner: uuid.UUID
    level: float = 90.0
    trouble_days: int = 0
    gap: range = range(0)
    weekly: list[tuple[uuid.UUID, float, datetime, int]] = field(default_factory=list)
    """Weekly KPIs: (measurement id, value, measured_at, metrics position) of each measurement."""
    corrections: list[tuple[uuid.UUID, float, int]] = field(default_factory=list)
    """(measurement id, new value, metrics position) of each correction."""


def generate(database_url: str, events: int, *, shape: Shape | None = None, seed: int = 8,
             out: Any = None) -> Generated:
    """Fill the goals and metrics logs of an empty database with about `events` events (or in
    the `shape` given)."""
    from services.goals.application import Goals
    from services.metrics.application import Metrics

    started = time.perf_counter()
    shape = shape or Shape.for_events(events)
    apps = {}
    for app_class, schema in ((Goals, "goals"), (Metrics, "metrics")):
        ensure_schema(database_url, schema)
        apps[schema] = app_class(env=eventsourcing_env(database_url, schema, pool_size=1, max_overflow=0))
    clock = Clock(PLANNING)
    rng = random.Random(seed)
    try:
        with clock.installed(), psycopg.connect(database_url) as conn:
            with conn.transaction():
                for _, schema, table in LOGS:
                    conn.execute(SQL("LOCK TABLE {}.{} IN EXCLUSIVE MODE").format(Identifier(schema), Identifier(table)))
                with conn.cursor() as cur:
                    org = _Org(shape, rng, clock)
                    metrics = LogWriter(cur, "metrics", "metrics_events", apps["metrics"].mapper, clock)
                    try:
                        org.run_metrics(metrics)
                    finally:
                        metrics.close()
                    if out:
                        print(f"  metrics log: {metrics.position:,} events "
                              f"({time.perf_counter() - started:.1f} s)", file=out, flush=True)
                    clock.now = PLANNING
                    goals = LogWriter(cur, "goals", "goals_events", apps["goals"].mapper, clock)
                    try:
                        org.run_goals(goals)
                    finally:
                        goals.close()
                    if out:
                        print(f"  goals log: {goals.position:,} events "
                              f"({time.perf_counter() - started:.1f} s)", file=out, flush=True)
                for _, schema, table in LOGS:
                    rechain(conn, schema, table)
            if out:
                print(f"  chained ({time.perf_counter() - started:.1f} s)", file=out, flush=True)
        with psycopg.connect(database_url, autocommit=True) as conn:
            for _, schema, table in LOGS:
                conn.execute(SQL("VACUUM (ANALYZE) {}.{}").format(Identifier(schema), Identifier(table)))
                conn.execute(SQL("VACUUM (ANALYZE) {}.{}").format(
                    Identifier(schema), Identifier(HashChain(schema, table).table)))
    finally:
        for app in apps.values():
            app.close()
    return Generated(shape=shape, events={"goals": goals.position, "metrics": metrics.position},
                     types={"goals": dict(goals.types), "metrics": dict(metrics.types)},
                     seconds=time.perf_counter() - started, key_results=len(org.key_results),
                     objectives=len(org.objectives), people=len(org.people), kpis=len(org.kpis))


class _Org:
    """The organisation being simulated: aggregates in memory, commands in the order a real
    quarter would send them."""

    def __init__(self, shape: Shape, rng: random.Random, clock: Clock) -> None:
        self.shape, self.rng, self.clock = shape, rng, clock
        self.year = Cycle.define(name="FY2025", starts_on=YEAR_STARTS, ends_on=YEAR_ENDS, kind=CycleKind.year)
        self.year.activate()
        self.quarter = Cycle.define(name="2025 Q3", starts_on=QUARTER_STARTS, ends_on=QUARTER_ENDS,
                                    kind=CycleKind.quarter, parent_id=self.year.id)
        self.quarter.activate()
        self.company = OrgUnit(name="Bench Corp", kind=UnitKind.company, parent_id=None)
        self.departments = [OrgUnit(name=f"Department {d:03}", kind=UnitKind.department, parent_id=self.company.id)
                            for d in range(shape.departments)]
        self.teams = [OrgUnit(name=f"Team {t:04}", kind=UnitKind.team,
                              parent_id=self.departments[t % shape.departments].id) for t in range(shape.teams)]
        self.department_of = {t.id: self.departments[i % shape.departments] for i, t in enumerate(self.teams)}
        self.teams_of: dict[uuid.UUID, list[OrgUnit]] = {}
        for team in self.teams:
            self.teams_of.setdefault(self.department_of[team.id].id, []).append(team)
        # People: the CEO, a head per department, a lead and members per team.
        self.people: list[Person] = []
        self.ceo = self._person(self.company.id, None)
        self.head = {d.id: self._person(d.id, self.ceo.id) for d in self.departments}
        self.lead: dict[uuid.UUID, Person] = {}
        self.members: dict[uuid.UUID, list[Person]] = {}
        for team in self.teams:
            lead = self._person(team.id, self.head[self.department_of[team.id].id].id)
            self.lead[team.id] = lead
            self.members[team.id] = [lead, *(self._person(team.id, lead.id) for _ in range(PEOPLE_PER_TEAM - 1))]
        # KPIs: per team two daily and one weekly, per department one daily and one weekly.
        self.kpis: list[_KPIPlan] = []
        self.weekly_kpi: dict[uuid.UUID, _KPIPlan] = {}
        self.daily_kpi: dict[uuid.UUID, _KPIPlan] = {}
        for unit, owner, cadences in (
                *((d, self.head[d.id], ("daily", "weekly")) for d in self.departments),
                *((t, self.lead[t.id], ("daily", "daily", "weekly")) for t in self.teams)):
            for cadence in cadences:
                plan = self._kpi(unit, owner, cadence)
                (self.weekly_kpi if cadence == "weekly" else self.daily_kpi).setdefault(unit.id, plan)
        self.plan_of = {plan.kpi.id: plan for plan in self.kpis}
        self.objectives: list[Objective] = []
        self.objective_of: dict[uuid.UUID, Objective] = {}
        self.key_results: list[KeyResult] = []

    def _person(self, unit: uuid.UUID, manager: uuid.UUID | None) -> Person:
        n = len(self.people)
        person = Person.join(name=f"Person {n:06}", email=f"person.{n:06}@bench.example", unit_id=unit,
                             manager_id=manager, joined_on=date(2022, 1, 3) + timedelta(days=(n * 7) % 1200))
        self.people.append(person)
        return person

    def _kpi(self, unit: OrgUnit, owner: Person, cadence: str) -> _KPIPlan:
        n = len(self.kpis)
        kpi = KPI.define(name=f"KPI {n:05} {unit.name}", unit="%", direction="higher_is_better", cadence=cadence,
                         description="bench", owner_id=owner.id, unit_id=unit.id, target=95.0,
                         rules=[{"kind": "below", "threshold": 80, "severity": "warning", "recovery": 85,
                                 "pending_count": 2},
                                {"kind": "below", "threshold": 70, "severity": "critical"}])
        plan = _KPIPlan(kpi, unit.id, owner.id, level=self.rng.uniform(86, 96))
        if cadence == "daily" and self.rng.random() < 0.05:
            start = self.rng.randrange(10, 80)
            plan.gap = range(start, start + self.rng.randint(3, 5))  # no data for a few days: stale
        self.kpis.append(plan)
        return plan

    # Metrics ------------------------------------------------------------------------------------

    def run_metrics(self, log: LogWriter) -> None:
        rng, clock = self.rng, self.clock
        for plan in self.kpis:
            log.emit(plan.kpi, actor=f"person:{plan.owner}")
        days = (QUARTER_ENDS - QUARTER_STARTS).days + 1
        last: dict[uuid.UUID, tuple[uuid.UUID, float]] = {}
        for day in range(days):
            moment = datetime.combine(QUARTER_STARTS + timedelta(days=day), datetime.min.time(), UTC) + timedelta(hours=6)
            clock.at(moment)
            for plan in self.kpis:
                kpi = plan.kpi
                if kpi.cadence == "weekly" and day % 7:
                    continue
                now = clock.now
                if day in plan.gap:
                    # The staleness watch notices the gap (once: the aggregate decides).
                    kpi.check_staleness(now=now + timedelta(days=1))
                    log.emit(kpi, actor="system:staleness-watch")
                    continue
                previous = last.get(kpi.id)
                if previous is not None and rng.random() < 0.01:
                    # Yesterday's value arrived wrong: corrected by hand.
                    mid, value = previous
                    new = round(value + rng.uniform(-3, 3), 1)
                    if kpi.correct(measurement_id=mid, value=new, reason="the warehouse reloaded the day"):
                        position = log.emit(kpi, actor=f"person:{plan.owner}")
                        plan.corrections.append((mid, new, position))
                if day == 45 and rng.random() < 0.1:
                    kpi.change_target(target=97.0, effective_from=QUARTER_STARTS + timedelta(days=day),
                                      reason="raised at mid-quarter review")
                    log.emit(kpi, actor=f"person:{plan.owner}")
                if day == 30 and rng.random() < 0.02:
                    kpi.revise_rules(rules=[{"kind": "below", "threshold": 82, "severity": "warning",
                                             "recovery": 86, "pending_count": 2}], reason="tightened")
                    log.emit(kpi, actor=f"person:{plan.owner}")
                value = self._next_value(plan)
                measured_at = moment - timedelta(minutes=rng.randrange(0, 240))  # overnight, synced at 6
                mid = kpi.measure(value=value, measured_at=measured_at, source="warehouse", now=now)
                position = log.emit(kpi, actor="service:warehouse-sync")
                last[kpi.id] = (mid, value)
                if kpi.cadence == "weekly":
                    plan.weekly.append((mid, value, measured_at, position))

    def _next_value(self, plan: _KPIPlan) -> float:
        """Mostly healthy around its level; now and then a spell of a few bad days (breaches, then
        recoveries)."""
        rng = self.rng
        if plan.trouble_days:
            plan.trouble_days -= 1
            return round(rng.uniform(62, 82), 1)
        if rng.random() < 0.02:
            plan.trouble_days = rng.randint(2, 5)
        return round(min(100.0, max(0.0, rng.gauss(plan.level, 3))), 1)

    # Goals --------------------------------------------------------------------------------------

    def run_goals(self, log: LogWriter) -> None:
        rng, clock = self.rng, self.clock
        admin = "person:admin"
        log.emit(self.year, actor=admin)
        log.emit(self.quarter, actor=admin)
        for unit in (self.company, *self.departments, *self.teams):
            log.emit(unit, actor="scim:hr")
        for person in self.people:
            log.emit(person, actor="scim:hr")
        clock.at(PLANNING + timedelta(days=7))
        company = [self._objective(self.company.id, self.ceo, None, log) for _ in range(self.shape.company_objectives)]
        of_department = {d.id: [self._objective(d.id, self.head[d.id], company[i % len(company)], log)
                                for i in range(self.shape.objectives_per_department)] for d in self.departments}
        team_objectives: list[Objective] = []
        for team in self.teams:
            parents = of_department[self.department_of[team.id].id]
            people = self.members[team.id]
            for i in range(self.shape.objectives_per_team):
                parent = parents[i % len(parents)] if i % 5 != 4 else None  # four in five aligned
                team_objectives.append(self._objective(team.id, people[i % len(people)], parent, log,
                                                       draft=rng.random() < 0.05))
        bound: dict[uuid.UUID, list[KeyResult]] = {}
        bindings: dict[uuid.UUID, KPIBinding] = {}
        for kr in self.key_results:
            objective = self.objective_of[kr.objective_id]
            plan = self.weekly_kpi.get(objective.unit_id)
            if plan is not None and kr.kind is KeyResultKind.increase_to and rng.random() < 0.25:
                kr.bind_to_kpi(plan.kpi.id)
                binding = bindings.setdefault(plan.kpi.id, KPIBinding(kpi_id=plan.kpi.id))
                binding.bind(kr.id)
                log.emit(kr, binding, actor=f"person:{objective.owner_id}")
                bound.setdefault(plan.kpi.id, []).append(kr)
        for objective in team_objectives:
            if rng.random() < 0.1 and objective.unit_id in self.daily_kpi:
                objective.add_guardrail(self.daily_kpi[objective.unit_id].kpi.id)
                log.emit(objective, actor=f"person:{objective.owner_id}")
        bound_ids = {kr.id for krs in bound.values() for kr in krs}
        manual = [kr for kr in self.key_results if kr.id not in bound_ids]
        corrections: list[tuple[KeyResult, int]] = []
        for week in range(WEEKS):
            friday = QUARTER_STARTS + timedelta(days=3 + 7 * week)  # 2025-07-04 is a Friday
            clock.at(datetime.combine(friday, datetime.min.time(), UTC) + timedelta(hours=9))
            self._week_of_changes(week, friday, team_objectives, of_department, log)
            # Last week's wrong check-ins, corrected.
            for kr, version in corrections:
                kr.correct_check_in(corrects_version=version, value=self._value(kr, week - 1, correction=True))
                log.emit(kr, actor=f"person:{kr.owner_id}")
            corrections = []
            order = list(range(len(manual)))
            rng.shuffle(order)
            for i in order:
                kr = manual[i]
                if rng.random() >= CHECK_IN_RATE:
                    continue
                kr.check_in(value=self._value(kr, week), confidence=rng.randint(3, 9), note="weekly check-in",
                            valid_on=friday)
                log.emit(kr, actor=f"person:{kr.owner_id}")
                if rng.random() < 0.02:
                    corrections.append((kr, kr.version))
            # The KPI policy: this week's measurements of bound KPIs (and their corrections) as
            # check-ins of the key results that follow them.
            week_end = datetime.combine(friday + timedelta(days=4), datetime.min.time(), UTC)
            for kpi_id, krs in bound.items():
                plan = self.plan_of[kpi_id]
                for mid, value, measured_at, position in plan.weekly:
                    if week_end - timedelta(days=7) <= measured_at < week_end:
                        for kr in krs:
                            if kr.record_measurement(kpi_id=kpi_id, measurement_id=mid, value=value,
                                                     valid_on=measured_at.date()):
                                log.emit(kr, actor="kpi-policy", causation=f"metrics:{position}")
                for mid, value, position in plan.corrections:
                    for kr in krs:
                        if kr.correct_measurement(measurement_id=mid, value=value, note="from KPI, corrected"):
                            log.emit(kr, actor="kpi-policy", causation=f"metrics:{position}")

    def _objective(self, unit: uuid.UUID, owner: Person, parent: Objective | None, log: LogWriter,
                   draft: bool = False) -> Objective:
        rng = self.rng
        n = len(self.objectives)
        objective = Objective.define(title=f"Objective {n:06}", description="bench", owner_kind=OwnerKind.person,
                                     owner_id=owner.id, unit_id=unit, cycle_id=self.quarter.id,
                                     status=ObjectiveStatus.draft if draft else ObjectiveStatus.active)
        if parent is not None:
            objective.align_to(parent.id)
        log.emit(objective, actor=f"person:{owner.id}")
        self.objectives.append(objective)
        self.objective_of[objective.id] = objective
        for _ in range(rng.randint(3, 5)):
            kr = self._key_result(objective, owner)
            objective.attach_key_result(kr.id)
            log.emit(kr, objective, actor=f"person:{owner.id}")
        return objective

    def _key_result(self, objective: Objective, owner: Person) -> KeyResult:
        n = len(self.key_results)
        kind = (KeyResultKind.increase_to, KeyResultKind.increase_to, KeyResultKind.decrease_to,
                KeyResultKind.stay_above, KeyResultKind.done, KeyResultKind.milestones)[n % 6]
        measure: dict[str, Any] = {
            KeyResultKind.increase_to: {"start": 0.0, "target": 100.0, "unit": "%"},
            KeyResultKind.decrease_to: {"start": 50.0, "target": 10.0, "unit": "h"},
            KeyResultKind.stay_above: {"target": 90.0, "unit": "%"},
            KeyResultKind.done: {},
            KeyResultKind.milestones: {"milestones": [{"title": "First", "weight": 1.0},
                                                      {"title": "Second", "weight": 1.0},
                                                      {"title": "Third", "weight": 2.0}]},
        }[kind]
        kr = KeyResult.define(objective_id=objective.id, title=f"Key result {n:07}", kind=kind, owner_id=owner.id,
                              **measure)
        self.key_results.append(kr)
        return kr

    def _value(self, kr: KeyResult, week: int, correction: bool = False) -> float:
        """Progress through the quarter, with noise."""
        rng = self.rng
        share = min(1.0, max(0.0, (week + 1) / WEEKS * rng.uniform(0.6, 1.15)))
        kind = kr.kind
        if kind is KeyResultKind.increase_to:
            return round(100 * share, 1)
        if kind is KeyResultKind.decrease_to:
            return round(50 - 40 * share, 1)
        if kind is KeyResultKind.stay_above:
            return round(rng.uniform(84, 99), 1)
        if kind is KeyResultKind.done:
            return 1.0 if share > 0.8 else 0.0
        return float(min(3, int(share * 3.5)))

    def _week_of_changes(self, week: int, friday: date, team_objectives: list[Objective],
                         of_department: dict[uuid.UUID, list[Objective]], log: LogWriter) -> None:
        """What else happens in a quarter: drafts agreed, contributions, revised key results,
        people moving, changing managers, leaving."""
        rng = self.rng
        if week == 0:
            for objective in team_objectives:
                if objective.status == ObjectiveStatus.draft:
                    objective.activate()
                    log.emit(objective, actor=f"person:{objective.owner_id}")
        if week == 1 and len(self.departments) > 1:
            for objective in team_objectives:
                if rng.random() < 0.03:
                    department = self.department_of[objective.unit_id].id
                    other = rng.choice([d for d in self.departments if d.id != department])
                    objective.add_contribution(rng.choice(of_department[other.id]).id, 0.5)
                    log.emit(objective, actor=f"person:{objective.owner_id}")
        if week == 2:
            for kr in self.key_results:
                if kr.kind is KeyResultKind.increase_to and rng.random() < 0.03:
                    kr.revise(title=f"{kr.title} (revised)", target=120.0)
                    log.emit(kr, actor=f"person:{kr.owner_id}")
        if week == 4:
            for team in self.teams:
                siblings = self.teams_of[self.department_of[team.id].id]
                if len(siblings) < 2:
                    continue
                for person in self.members[team.id][1:]:
                    if rng.random() < 0.03:
                        to = rng.choice([t for t in siblings if t.id != team.id])
                        person.move_to_unit(to.id, friday)
                        log.emit(person, actor="scim:hr")
                        person.change_manager(self.lead[to.id].id, friday)
                        log.emit(person, actor="scim:hr")
        if week == 8:
            for team in self.teams:
                for person in self.members[team.id][1:]:
                    if not person.has_left and rng.random() < 0.015:
                        person.leave(friday)
                        log.emit(person, actor="scim:hr")


# Timing -------------------------------------------------------------------------------------------

@dataclass
class Rebuilt:
    label: str
    logs: list[str]
    events: int
    seconds: float
    decode_seconds: float
    rows: int
    digest: str

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class SizeResult:
    requested: int
    generated: dict[str, Any]
    raw: dict[str, float]
    """Seconds of the raw read of each log (median of the runs)."""
    raw_runs: dict[str, list[float]]
    rebuilt: list[Rebuilt]
    profile: str | None = None
    load: dict[str, list[float]] = field(default_factory=dict)
    """The machine's load averages (1, 5, 15 min) before and after: other work on it shows here."""

    @property
    def events(self) -> int:
        return int(sum(self.generated["events"].values()))

    def raw_of(self, logs: Sequence[str]) -> float:
        return sum(self.raw[log] for log in logs)


def _log_name(source_spec: Any) -> str:
    return str(source_spec.application_schema)


def raw_read(database_url: str, schema: str, table: str, batch: int = 1000) -> tuple[int, float]:
    """Every row of the log, every column, in notification order, through a server-side cursor;
    nothing decoded. (events, seconds)."""
    started = time.perf_counter()
    count = 0
    with psycopg.connect(database_url) as conn, conn.cursor(name=f"raw_{table}") as cur:
        cur.itersize = batch
        cur.execute(SQL("SELECT notification_id, originator_id, originator_version, topic, state FROM {}.{} "
                        "ORDER BY notification_id").format(Identifier(schema), Identifier(table)))
        while rows := cur.fetchmany(batch):
            count += len(rows)
    return count, time.perf_counter() - started


def read_and_decode(source: ReadModelSource, database_url: str, batch_size: int = 1000) -> tuple[int, float]:
    """The read model's logs as `replay` reads them (the recorder's pages) and decodes them (the
    followed application's mapper), without projecting. (events, seconds)."""
    started = time.perf_counter()
    count = 0
    for spec in source.specs:
        app = open_log(spec, database_url)
        try:
            position = 0
            while notifications := app.recorder.select_notifications(position, batch_size, inclusive_of_start=False):
                for notification in notifications:
                    app.mapper.to_domain_event(notification)
                count += len(notifications)
                position = notifications[-1].id
        finally:
            app.close()
    return count, time.perf_counter() - started


def measure_size(database_url: str, requested: int, *, raw_runs: int = 3, batch_size: int = 1000,
                 profile: bool = False, out: Any = None) -> SizeResult:
    """Generate a log of about `requested` events in this (empty) database, then time the raw reads,
    the read + decode passes and the rebuild of every read model."""
    from services.audit import read_model_sources

    print(f"Generating about {requested:,} events ...", file=out, flush=True)
    load_before = list(os.getloadavg())
    generated = generate(database_url, requested, out=out)
    print(f"  {generated.total:,} events (goals {generated.events['goals']:,}, metrics "
          f"{generated.events['metrics']:,}): {generated.shape.departments} departments, "
          f"{generated.shape.teams} teams, {generated.people:,} people, {generated.objectives:,} objectives, "
          f"{generated.key_results:,} key results, {generated.kpis:,} KPIs; loaded in {generated.seconds:.1f} s "
          f"({generated.total / generated.seconds:,.0f} events/s)", file=out, flush=True)
    for _, schema, table in LOGS:
        raw_read(database_url, schema, table)  # warm-up: the OS cache and shared buffers
    runs: dict[str, list[float]] = {}
    for _, schema, table in LOGS:
        for _ in range(raw_runs):
            count, seconds = raw_read(database_url, schema, table)
            assert count == generated.events[schema], (count, generated.events)
            runs.setdefault(schema, []).append(seconds)
    raw = {log: statistics.median(seconds) for log, seconds in runs.items()}
    print("  raw read: " + ", ".join(f"{log} {raw[log]:.2f} s ({generated.events[log] / raw[log]:,.0f}/s)"
                                     for log in raw), file=out, flush=True)
    rebuilt = []
    profiles = []
    for source in read_model_sources():
        logs = [_log_name(spec) for spec in source.specs]
        _, decode_seconds = read_and_decode(source, database_url, batch_size)
        schema = f"bench_{source.name.lower()}"
        drop_schema(database_url, schema)
        report = replay(source, database_url, schema, batch_size=batch_size)
        with psycopg.connect(database_url) as conn:
            digest = checksum(conn, source, schema)
        drop_schema(database_url, schema)
        result = Rebuilt(source.label, logs, report.events, report.seconds, decode_seconds, digest.rows,
                         digest.digest)
        rebuilt.append(result)
        print(f"  rebuilt {source.label:<20} {report.events:>9,} events in {report.seconds:8.2f} s "
              f"= {result.events_per_second:>8,.0f}/s  (read + decode {decode_seconds:6.2f} s, raw read "
              f"{sum(raw[log] for log in logs):6.2f} s)  {digest.rows:,} rows", file=out, flush=True)
        if profile:  # again, untimed, under the profiler and the statement timer
            profiles.append(profile_replay(source, database_url, f"{schema}_profiled", batch_size))
    profile_text = "\n".join(profiles) if profiles else None
    load = {"before": load_before, "after": list(os.getloadavg())}
    print(f"  load average before {load['before'][0]:.1f}, after {load['after'][0]:.1f} (1 min; {_cpus()} CPUs)",
          file=out, flush=True)
    return SizeResult(requested, {**asdict(generated), "total": generated.total}, raw, runs, rebuilt, profile_text,
                      load)


def profile_replay(source: ReadModelSource, database_url: str, schema: str, batch_size: int = 1000) -> str:
    """`replay` once more under cProfile, with the time spent per event type (decode, handler and
    its SQL) and per SQL statement (psycopg's `Cursor.execute`, keyed by the statement's text):
    where a rebuild's time goes. Not a timing: the instruments slow it down."""
    by_type: Counter[str] = Counter()
    type_counts: Counter[str] = Counter()
    by_sql: Counter[str] = Counter()
    sql_counts: Counter[str] = Counter()
    original_execute = psycopg.Cursor.execute

    def timed_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original_execute(self, query, *args, **kwargs)
        finally:
            key = " ".join(str(query if isinstance(query, str) else query.as_string(self)).split())[:150]
            by_sql[key] += time.perf_counter() - started
            sql_counts[key] += 1

    drop_schema(database_url, schema)
    view, factory = open_view(source, database_url, schema)
    view.announces = False
    profiler = cProfile.Profile()
    started = time.perf_counter()
    psycopg.Cursor.execute = timed_execute  # type: ignore[method-assign]
    profiler.enable()
    try:
        for spec in source.specs:
            app = open_log(spec, database_url)
            try:
                projection = spec.projection_class(view=view)  # type: ignore[call-arg]
                position = 0
                while notifications := app.recorder.select_notifications(position, batch_size,
                                                                         inclusive_of_start=False):
                    with view.batch():
                        if (prefetch := getattr(projection, "prefetch", None)) is not None:  # as apply_events does
                            prefetch([app.mapper.to_domain_event(n) for n in notifications])
                        for notification in notifications:
                            t0 = time.perf_counter()
                            event = app.mapper.to_domain_event(notification)
                            projection.process_event(event, Tracking(app.name, notification.id))
                            kind = notification.topic.rpartition(":")[2]
                            by_type[kind] += time.perf_counter() - t0
                            type_counts[kind] += 1
                    position = notifications[-1].id
            finally:
                app.close()
    finally:
        profiler.disable()
        psycopg.Cursor.execute = original_execute  # type: ignore[method-assign]
        factory.close()
        drop_schema(database_url, schema)
    total = time.perf_counter() - started
    lines = [f"=== {source.label}: {sum(type_counts.values()):,} events in {total:.2f} s (instrumented)",
             "time per event type (decode + handler + its SQL):"]
    for kind, seconds in by_type.most_common(12):
        lines.append(f"  {seconds:8.2f} s {100 * seconds / total:5.1f}%  {type_counts[kind]:>9,} x "
                     f"{1e6 * seconds / type_counts[kind]:7.0f} us  {kind}")
    lines.append("time per SQL statement (Cursor.execute: the round trip and the server's work):")
    for key, seconds in by_sql.most_common(12):
        lines.append(f"  {seconds:8.2f} s {100 * seconds / total:5.1f}%  {sql_counts[key]:>9,} x "
                     f"{1e6 * seconds / sql_counts[key]:7.0f} us  {key}")
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(15)
    lines.append(stream.getvalue())
    return "\n".join(lines)


# Reporting ----------------------------------------------------------------------------------------

def table_rows(results: Sequence[SizeResult]) -> list[list[str]]:
    """One row per size and read model (and one for all read models together): events, raw read,
    rebuild, and the ratio of the two."""
    rows = [["size", "read model", "events", "raw read", "read + decode", "rebuild", "rebuild/raw"]]
    for r in results:
        total_raw = sum(r.raw.values())
        rows.append([f"{r.events:,}", "raw read (both logs)", f"{r.events:,}",
                     f"{total_raw:.2f} s ({r.events / total_raw:,.0f}/s)", "", "", ""])
        for b in r.rebuilt:
            raw = r.raw_of(b.logs)
            rows.append([f"{r.events:,}", b.label, f"{b.events:,}", f"{raw:.2f} s ({b.events / raw:,.0f}/s)",
                         f"{b.decode_seconds:.2f} s ({b.events / b.decode_seconds:,.0f}/s)",
                         f"{b.seconds:.2f} s ({b.events_per_second:,.0f}/s)", f"{b.seconds / raw:,.0f}x"])
        events = sum(b.events for b in r.rebuilt)
        seconds = sum(b.seconds for b in r.rebuilt)
        raw = sum(r.raw_of(b.logs) for b in r.rebuilt)
        decode = sum(b.decode_seconds for b in r.rebuilt)
        rows.append([f"{r.events:,}", "all read models", f"{events:,}", f"{raw:.2f} s ({events / raw:,.0f}/s)",
                     f"{decode:.2f} s ({events / decode:,.0f}/s)", f"{seconds:.2f} s ({events / seconds:,.0f}/s)",
                     f"{seconds / raw:,.0f}x"])
    return rows


def scaling_rows(results: Sequence[SizeResult]) -> list[list[str]]:
    """Each larger size against the smallest: the ratio of events, and of each time."""
    if len(results) < 2:
        return []
    base = results[0]
    rows = [["sizes", "what", "events ratio", "time ratio", "per-event time ratio"]]
    for r in results[1:]:
        sizes = f"{r.events:,} / {base.events:,}"
        pairs = [("raw read (both logs)", r.events / base.events, sum(r.raw.values()) / sum(base.raw.values()))]
        for b, b0 in zip(r.rebuilt, base.rebuilt, strict=True):
            pairs.append((b.label, b.events / b0.events, b.seconds / b0.seconds))
        pairs.append(("all read models", sum(b.events for b in r.rebuilt) / sum(b.events for b in base.rebuilt),
                      sum(b.seconds for b in r.rebuilt) / sum(b.seconds for b in base.rebuilt)))
        for what, events, seconds in pairs:
            rows.append([sizes, what, f"{events:.2f}x", f"{seconds:.2f}x", f"{seconds / events:.2f}"])
    return rows


def format_table(rows: list[list[str]], markdown: bool = False) -> str:
    if not rows:
        return ""
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " for _ in rows[0]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def report(results: Sequence[SizeResult], out: Any = None) -> None:
    print("\nRebuild of every read model from scratch, beside a raw read of the same stored events "
          "(same process, same database):\n", file=out)
    print(format_table(table_rows(results)), file=out)
    scaling = scaling_rows(results)
    if scaling:
        print("\nScaling (linear: the time ratio about equals the events ratio; per-event time ratio about 1):\n",
              file=out)
        print(format_table(scaling), file=out)
    print("\nraw read: both logs through server-side cursors, every column, nothing decoded (median of runs). "
          "read + decode: as replay reads and decodes them, nothing projected. rebuild: "
          "services.common.replay.replay into a fresh schema.", file=out, flush=True)


def write_results(results: Sequence[SizeResult], command: str, directory: Path) -> Path:
    """Add this run to bench/results/<date>.json (one file a day, runs appended)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{datetime.now(UTC):%Y-%m-%d}.json"
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    runs = document.setdefault("rebuild", [])
    runs.append({
        "recordedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {"cpus": _cpus(), "python": platform.python_version(), "platform": platform.platform()},
        "sizes": [{
            "requested": r.requested,
            "events": r.events,
            "generated": r.generated,
            "loadAverage": r.load,
            "rawReadSeconds": r.raw,
            "rawReadRuns": r.raw_runs,
            "readModels": [{"label": b.label, "logs": b.logs, "events": b.events, "seconds": b.seconds,
                            "eventsPerSecond": b.events_per_second, "readAndDecodeSeconds": b.decode_seconds,
                            "rawReadSeconds": r.raw_of(b.logs), "rebuildOverRaw": b.seconds / r.raw_of(b.logs),
                            "rows": b.rows, "checksum": b.digest} for b in r.rebuilt],
        } for r in results],
        "table": format_table(table_rows(results), markdown=True),
        "scaling": format_table(scaling_rows(results), markdown=True),
    })
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
