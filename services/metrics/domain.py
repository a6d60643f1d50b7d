"""The KPI domain: always-on metrics, their measurements, targets and threshold rules, and the
pure maths of trends and forecasts.

Pure: imports nothing from infrastructure. The aggregate is `KPI`; its events are nested in it
and named in the past tense, so their contract names are `KPIDefined`, `KPIMeasured`,
`KPIMeasurementCorrected`, `KPIThresholdBreached`, `KPIRecovered`, `KPIStale`, `KPIFreshened`,
`KPITargetChanged` and `KPIRulesRevised`. Rules travel in `KPIDefined` / `KPIRulesRevised` as
plain dicts (the contract's JSON), because other services decode them without these classes.

Threshold rules work as Prometheus and Grafana alerting do. A rule is *violated* by a value on
its wrong side. It *fires* (`ThresholdBreached`) once the current run of consecutive violating
measurements has at least `pending_count` measurements and spans at least `pending_for` seconds
of valid time (from the first violating measurement of the run to the latest; Prometheus' `for:`).
While a run has not got that far the rule is *pending*: a state of the read model, not an event.
Once fired it *clears* (`Recovered`) at the first value back past its recovery bound, so a value
hovering at the threshold does not flap.

Valid time decides, not arrival: a rule's state is a function of the rule and the KPI's
measurements ordered by `measured_at` (arrival order breaks ties), with corrected values in
place of the originals. `RuleWalk` is that function. After every command the aggregate compares
the walk with what it has announced and appends the breach or recovery the difference implies,
naming the measurement at which the walk fired or cleared the rule (a late measurement can thus
complete a run whose newest measurement arrived earlier, or cut a run and so clear a breach).
"""

from __future__ import annotations

import bisect
import enum
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, NamedTuple
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class DomainError(ValueError):
    """A well-formed command that breaks a rule of the KPI domain."""


class UnknownMeasurement(LookupError):
    """A measurement id that is not one of the KPI's measurements."""


class Direction(enum.StrEnum):
    higher_is_better = "higher_is_better"
    lower_is_better = "lower_is_better"


class Cadence(enum.StrEnum):
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"
    quarterly = "quarterly"


# How long a cadence promises between measurements (the longest month and quarter, so that a
# KPI measured on the same day of each month never counts as late).
CADENCE_PERIOD = {
    Cadence.daily: timedelta(days=1),
    Cadence.weekly: timedelta(days=7),
    Cadence.monthly: timedelta(days=31),
    Cadence.quarterly: timedelta(days=92),
}
DEFAULT_STALENESS_GRACE = timedelta(hours=6)
MAX_PENDING_FOR = 366 * 24 * 3600


class RuleKind(enum.StrEnum):
    below = "below"
    above = "above"
    outside = "outside"


class Severity(enum.StrEnum):
    warning = "warning"
    critical = "critical"


class RuleState(enum.StrEnum):
    ok = "ok"
    pending = "pending"
    breached = "breached"


class KPIState(enum.StrEnum):
    ok = "ok"
    pending = "pending"
    breached = "breached"
    stale = "stale"
    no_data = "no_data"


@dataclass(frozen=True)
class ThresholdRule:
    """One threshold rule of a KPI, as `KPIDefined` and `KPIRulesRevised` carry it.

    below: violated when value < threshold, cleared when value >= recovery (default threshold).
    above: violated when value > threshold, cleared when value <= recovery (default threshold).
    outside: violated when value < low or value > high, cleared when back inside [low, high].
    It fires after `pending_count` consecutive violating measurements spanning at least
    `pending_for` seconds (both 1 and 0 by default: at the first violating value).
    """

    id: str
    kind: RuleKind
    severity: Severity
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    pending_count: int = 1
    recovery: float | None = None
    pending_for: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RuleKind(self.kind))
            object.__setattr__(self, "severity", Severity(self.severity))
        except ValueError as e:
            raise DomainError(str(e)) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThresholdRule:
        """From the contract's JSON; rules recorded before a field existed get its default."""
        pending_count, pending_for = data.get("pending_count"), data.get("pending_for")
        return cls(**{k: data.get(k) for k in ("id", "kind", "severity", "threshold", "low", "high", "recovery")},
                   pending_count=1 if pending_count is None else pending_count,
                   pending_for=0 if pending_for is None else pending_for)

    def as_dict(self) -> dict[str, Any]:
        """The rule as the event contract spells it: plain JSON values."""
        return {**asdict(self), "kind": self.kind.value, "severity": self.severity.value}

    def validate(self) -> None:
        numbers = [x for x in (self.threshold, self.low, self.high, self.recovery) if x is not None]
        if not all(_is_number(x) and math.isfinite(x) for x in numbers):
            raise DomainError(f"rule {self.id}: bounds must be finite numbers")
        if isinstance(self.pending_count, bool) or not isinstance(self.pending_count, int) or self.pending_count < 1:
            raise DomainError(f"rule {self.id}: pending_count must be a whole number of at least 1")
        if (isinstance(self.pending_for, bool) or not isinstance(self.pending_for, int)
                or not 0 <= self.pending_for <= MAX_PENDING_FOR):
            raise DomainError(f"rule {self.id}: pending_for must be a whole number of seconds from 0 "
                              f"to {MAX_PENDING_FOR}")
        if self.kind is RuleKind.outside:
            if self.low is None or self.high is None or self.low > self.high:
                raise DomainError(f"rule {self.id}: an outside rule needs low <= high")
            if self.threshold is not None or self.recovery is not None:
                raise DomainError(f"rule {self.id}: an outside rule takes low and high only; "
                                  "it clears when the value is back inside them")
            return
        if self.threshold is None:
            raise DomainError(f"rule {self.id}: a {self.kind.value} rule needs a threshold")
        if self.low is not None or self.high is not None:
            raise DomainError(f"rule {self.id}: a {self.kind.value} rule takes a threshold, not low/high")
        if self.recovery is not None:
            if self.kind is RuleKind.below and self.recovery < self.threshold:
                raise DomainError(f"rule {self.id}: a below rule's recovery must be >= its threshold")
            if self.kind is RuleKind.above and self.recovery > self.threshold:
                raise DomainError(f"rule {self.id}: an above rule's recovery must be <= its threshold")

    # Module constants (`_BELOW`, `_ABOVE`) rather than `RuleKind.below`: an enum member read
    # from its class is an attribute lookup through the enum's metaclass, and these two run for
    # every rule and measurement of a bulk load.
    def violated_by(self, value: float) -> bool:
        kind = self.kind
        if kind is _BELOW:
            return value < self.threshold  # type: ignore[operator]
        if kind is _ABOVE:
            return value > self.threshold  # type: ignore[operator]
        return value < self.low or value > self.high  # type: ignore[operator]

    def cleared_by(self, value: float) -> bool:
        """Whether a value ends a breach: past the recovery bound, not merely off the threshold."""
        kind = self.kind
        if kind is _BELOW:
            return value >= (self.recovery if self.recovery is not None else self.threshold)  # type: ignore[operator]
        if kind is _ABOVE:
            return value <= (self.recovery if self.recovery is not None else self.threshold)  # type: ignore[operator]
        return not self.violated_by(value)


_BELOW, _ABOVE = RuleKind.below, RuleKind.above


def _uuid4s(n: int) -> list[UUID]:
    """`n` random (version 4) UUIDs, as `uuid4()` makes them, from one read of `os.urandom`."""
    raw = os.urandom(16 * n)
    return [UUID(bytes=raw[16 * i:16 * i + 16], version=4) for i in range(n)]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # a tuple: `int | float` is built per call


def check_rules(rules: Iterable[ThresholdRule | Mapping[str, Any]]) -> list[ThresholdRule]:
    """Validate a rule set; rules without an id are numbered `rule-1`, `rule-2`, ... in order."""
    checked: list[ThresholdRule] = []
    for n, r in enumerate(rules, start=1):
        rule = r if isinstance(r, ThresholdRule) else ThresholdRule.from_dict(r)
        if not rule.id:
            rule = replace(rule, id=f"rule-{n}")
        rule.validate()
        checked.append(rule)
    if len({r.id for r in checked}) != len(checked):
        raise DomainError("a KPI's rule ids must be unique")
    return checked


# Measurements in valid-time order ------------------------------------------------------------

class Reading(NamedTuple):
    """One measurement as the rules see it. Ordered by valid time, then by arrival (`seq`)."""

    measured_at: datetime
    seq: int
    measurement_id: UUID
    value: float
    source: str


class Series:
    """A KPI's measurements in valid-time order, with the indexes that make a repeat idempotent
    (`(measured_at, source)`) and a correction addressable (the measurement id).

    Readings are immutable tuples, so a copy of the containers is a deep copy: the library
    deep-copies an aggregate on every load from its cache, and this keeps that cheap."""

    __slots__ = ("items", "by_key", "by_id")

    def __init__(self) -> None:
        self.items: list[Reading] = []
        self.by_key: dict[tuple[datetime, str], Reading] = {}
        self.by_id: dict[UUID, Reading] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Series:
        copy = Series()
        copy.items, copy.by_key, copy.by_id = self.items.copy(), self.by_key.copy(), self.by_id.copy()
        return copy

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Series) and self.items == other.items

    @property
    def latest(self) -> Reading | None:
        return self.items[-1] if self.items else None

    def add(self, reading: Reading) -> int:
        """Insert in valid-time order; its index (the last one when it is the newest)."""
        if not self.items or reading > self.items[-1]:
            index = len(self.items)
            self.items.append(reading)
        else:
            index = bisect.bisect_right(self.items, reading)
            self.items.insert(index, reading)
        self.by_key[(reading.measured_at, reading.source)] = reading
        self.by_id[reading.measurement_id] = reading
        return index

    def replace_value(self, measurement_id: UUID, value: float) -> int:
        """Correct a reading's value in place; its index."""
        old = self.by_id[measurement_id]
        new = old._replace(value=value)
        index = bisect.bisect_left(self.items, old)
        self.items[index] = new
        self.by_key[(old.measured_at, old.source)] = new
        self.by_id[measurement_id] = new
        return index


class RuleWalk(NamedTuple):
    """A rule's state after walking measurements in valid-time order: whether it is breached,
    the current run of violating measurements (its length and the valid time it began), and
    the measurement at which the rule last fired or cleared. A named tuple (one is made per
    rule and measurement walked: a tuple is made several times faster than a frozen dataclass)."""

    breached: bool = False
    run: int = 0
    run_start: datetime | None = None
    turned_by: Reading | None = None

    @property
    def state(self) -> RuleState:
        if self.breached:
            return RuleState.breached
        return RuleState.pending if self.run > 0 else RuleState.ok


def step(rule: ThresholdRule, walk: RuleWalk, reading: Reading) -> RuleWalk:
    """The walk one measurement further: ok -> pending -> breached -> ok."""
    violated = rule.violated_by(reading.value)
    if not violated and not walk.run and not walk.breached:
        return walk  # ok and staying ok: the same walk (most steps of a healthy KPI)
    run = walk.run + 1 if violated else 0
    run_start = (walk.run_start or reading.measured_at) if violated else None
    if walk.breached:
        if rule.cleared_by(reading.value):
            return RuleWalk(False, run, run_start, reading)
        return RuleWalk(True, run, run_start, walk.turned_by)
    if (violated and run >= rule.pending_count
            and (reading.measured_at - run_start).total_seconds() >= rule.pending_for):  # type: ignore[operator]
        return RuleWalk(True, run, run_start, reading)
    return RuleWalk(False, run, run_start, walk.turned_by)


_NOT_WALKED = RuleWalk()


def walk(rule: ThresholdRule, readings: Iterable[Reading]) -> RuleWalk:
    """The rule's state over measurements in valid-time order."""
    state = RuleWalk()
    for reading in readings:
        state = step(rule, state, reading)
    return state


class Walks:
    """Every rule's walk after each measurement of the series, so that a late measurement or a
    correction is walked again only from where it lands: a source an hour behind costs an hour of
    measurements, not the KPI's whole history. `valid` leading states are up to date; the rest
    are worked out when asked for (`upto`). Copied as cheaply as `Series`."""

    __slots__ = ("states", "valid")

    def __init__(self, rule_ids: Iterable[str]) -> None:
        self.states: dict[str, list[RuleWalk]] = {rid: [] for rid in rule_ids}
        self.valid = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Walks:
        copy = Walks(())
        copy.states, copy.valid = {k: v.copy() for k, v in self.states.items()}, self.valid
        return copy

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Walks) and (self.states, self.valid) == (other.states, other.valid)

    def invalidate(self, index: int) -> None:
        """The measurement at `index` is new or changed: states from there on must be walked again."""
        if index < self.valid:
            for states in self.states.values():
                del states[index:]
            self.valid = index

    def upto(self, rules: Sequence[ThresholdRule], items: Sequence[Reading]) -> dict[str, RuleWalk]:
        """Each rule's walk over all the items."""
        self.walk_to(rules, items)
        return {rid: states[-1] if states else _NOT_WALKED for rid, states in self.states.items()}

    def walk_to(self, rules: Sequence[ThresholdRule], items: Sequence[Reading]) -> None:
        """Walk every rule over the items not walked yet."""
        if self.valid < len(items):
            for rule in rules:
                states = self.states[rule.id]
                state = states[-1] if states else _NOT_WALKED
                for reading in items[self.valid:]:
                    state = step(rule, state, reading)
                    states.append(state)
            self.valid = len(items)

    def latest(self, rule_id: str) -> RuleWalk:
        """A rule's walk as far as it has been walked (`walk_to` first)."""
        states = self.states[rule_id]
        return states[-1] if states else _NOT_WALKED


def rule_state(breached: bool, latest_violates: bool) -> RuleState:
    """A breached rule stays breached until it recovers; one whose latest value (by valid time)
    violates it without having fired is pending (its run has begun)."""
    if breached:
        return RuleState.breached
    return RuleState.pending if latest_violates else RuleState.ok


def kpi_state(rule_states: Iterable[RuleState | str], has_data: bool, stale: bool = False) -> KPIState:
    """The KPI's state: breached over stale over pending over ok; no_data before the first
    measurement (unless it is already stale, which a KPI never measured becomes in time)."""
    states = {RuleState(s) for s in rule_states}
    if RuleState.breached in states:
        return KPIState.breached
    if stale:
        return KPIState.stale
    if not has_data:
        return KPIState.no_data
    return KPIState.pending if RuleState.pending in states else KPIState.ok


class MeasurementIn(NamedTuple):
    """One measurement a command records (a named tuple: a bulk load makes 10,000)."""

    value: float
    measured_at: datetime
    source: str


@dataclass(frozen=True)
class Recorded:
    """What a record command did: the id of each measurement in the order given (an existing one
    for a repeat), and how many were new, corrected or repeats that changed nothing."""

    ids: tuple[UUID, ...]
    new: int
    corrected: int
    unchanged: int


@dataclass(frozen=True)
class TargetEntry:
    target: float | None
    effective_from: date | None
    reason: str


class KPI(Aggregate):
    """An always-on metric with an owner, a cadence, a target and threshold rules.

    Its measurements, corrections, breaches, recoveries, staleness and changes of target or rules
    are its events; see the module's docstring for how rules are judged."""

    class Defined(Aggregate.Created):
        """The KPI's definition; `rules` are `ThresholdRule.as_dict()`s, the contract's JSON."""

        name: str
        description: str
        unit: str
        owner_id: UUID | None
        unit_id: UUID | None
        direction: Direction
        cadence: Cadence
        target: float | None
        rules: list[dict[str, Any]]

        class_version = 2

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """v1 (e53ee99, 8268a14) rules had no `pending_for`: they fired without waiting (0 s)."""
            state["rules"] = [{**r, "pending_for": r.get("pending_for", 0)} for r in state.get("rules") or []]

    @event(Defined)
    def __init__(
        self,
        name: str,
        description: str,
        unit: str,
        owner_id: UUID | None,
        unit_id: UUID | None,
        direction: Direction,
        cadence: Cadence,
        target: float | None,
        rules: list[dict[str, Any]],
    ) -> None:
        self.name = name
        self.description = description
        self.unit = unit
        self.owner_id = owner_id
        self.unit_id = unit_id
        self.direction = Direction(direction)
        self.cadence = Cadence(cadence)
        self.target = target
        self.targets: list[TargetEntry] = [TargetEntry(target, None, "defined")] if target is not None else []
        self.rules = tuple(ThresholdRule.from_dict(r) for r in rules)
        self.breached: set[str] = set()
        self.series = Series()
        self.stale = False
        self.stale_expected_by: datetime | None = None
        self._seq = 0
        self._walks = Walks(r.id for r in self.rules)

    @classmethod
    def define(
        cls,
        *,
        name: str,
        unit: str,
        direction: Direction | str,
        cadence: Cadence | str,
        rules: Iterable[ThresholdRule | Mapping[str, Any]] = (),
        description: str = "",
        owner_id: UUID | None = None,
        unit_id: UUID | None = None,
        target: float | None = None,
    ) -> KPI:
        """Check everything first, so that no invalid KPI is ever recorded. Rules without an id
        are numbered `rule-1`, `rule-2`, ... in the order given."""
        if not name.strip():
            raise DomainError("a KPI needs a name")
        if target is not None and not (_is_number(target) and math.isfinite(target)):
            raise DomainError("a KPI's target must be a finite number")
        try:
            direction, cadence = Direction(direction), Cadence(cadence)
        except ValueError as e:
            raise DomainError(str(e)) from None
        checked = check_rules(rules)
        return cls(name=name, description=description, unit=unit, owner_id=owner_id, unit_id=unit_id,
                   direction=direction, cadence=cadence, target=target,
                   rules=[r.as_dict() for r in checked])

    def collect_events(self) -> list[Any]:
        """The pending events, oldest first, as the library's `collect_events` gives them, without
        its `pop(0)` per event (quadratic in a bulk load's 10,000 events)."""
        collected = list(self._pending_events)
        self._pending_events.clear()
        return collected

    # State ----------------------------------------------------------------------------------

    @property
    def latest(self) -> Reading | None:
        return self.series.latest

    @property
    def latest_value(self) -> float | None:
        return self.series.latest.value if self.series.items else None

    @property
    def latest_measured_at(self) -> datetime | None:
        return self.series.latest.measured_at if self.series.items else None

    @property
    def measurement_count(self) -> int:
        return len(self.series)

    def walks(self) -> dict[str, RuleWalk]:
        """Each rule's walk over the series (stepped as measurements arrive in order; walked again
        from where a late measurement or a correction lands, and from the start for new rules)."""
        return self._walks.upto(self.rules, self.series.items)

    def rule_state(self, rule_id: str) -> RuleState:
        latest = self.series.latest
        rule = next(r for r in self.rules if r.id == rule_id)
        return rule_state(rule_id in self.breached, latest is not None and rule.violated_by(latest.value))

    @property
    def state(self) -> KPIState:
        return kpi_state((self.rule_state(r.id) for r in self.rules), bool(self.series.items), self.stale)

    def target_on(self, day: date) -> float | None:
        """The target in force on a day: the change with the latest `effective_from` on or
        before it (the defined target has none: it holds from the start); later records win ties."""
        current: tuple[date, int] | None = None
        target = None
        for n, entry in enumerate(self.targets):
            start = entry.effective_from or date.min
            if start <= day and (current is None or (start, n) >= current):
                current, target = (start, n), entry.target
        return target

    def expected_by(self, grace: timedelta) -> datetime:
        """When the next measurement is due: the latest valid time (or the definition, before
        any) plus the cadence's period plus the grace."""
        basis = self.latest_measured_at or self.created_on
        return basis + CADENCE_PERIOD[self.cadence] + grace

    # Commands ------------------------------------------------------------------------------

    def measure(self, *, value: float, measured_at: datetime, source: str, measurement_id: UUID | None = None,
                now: datetime | None = None, grace: timedelta = DEFAULT_STALENESS_GRACE) -> UUID:
        """Record one value for a moment (valid time); see `record`."""
        return self.record([MeasurementIn(value, measured_at, source)], now=now, grace=grace,
                           ids=[measurement_id] if measurement_id else None).ids[0]

    def record(self, measurements: Sequence[MeasurementIn], *, now: datetime | None = None,
               grace: timedelta = DEFAULT_STALENESS_GRACE, ids: Sequence[UUID] | None = None) -> Recorded:
        """Record measurements (one or a bulk load) and decide what they fire or clear.

        Idempotent per (measured_at, source): a repeat with the same value changes nothing, with
        another value it corrects the earlier one (`MeasurementCorrected`). The measurements are
        taken in valid-time order: each one newer than all before is judged at once, as if it had
        come alone; older ones are put in their place and the rules are walked again once they
        are all in (before the next newer one is judged). A stale KPI is freshened by a
        measurement that makes its next one due after `now`.
        """
        checked = [self._checked(m) for m in measurements]
        if ids is not None and len(ids) != len(checked):
            raise DomainError("one id per measurement")
        now = (now or datetime.now(UTC)).astimezone(UTC)
        order = sorted(range(len(checked)), key=lambda i: checked[i][1])
        out: list[UUID | None] = [None] * len(checked)
        new = corrected = unchanged = 0
        cause: Reading | None = None
        fresh = iter(_uuid4s(len(checked)) if ids is None or not all(ids) else ())
        series = self.series  # the same object throughout: events change it in place
        items, by_key, by_id = series.items, series.by_key, series.by_id
        for i in order:
            value, measured_at, source = checked[i]
            existing = by_key.get((measured_at, source))
            if existing is not None:
                out[i] = existing.measurement_id
                if existing.value == value:
                    unchanged += 1
                    continue
                self._measurement_corrected(
                    measurement_id=existing.measurement_id, value=value, previous_value=existing.value,
                    measured_at=existing.measured_at, source=existing.source,
                    reason=f"sent again by {source} with another value")
                cause = by_id[existing.measurement_id]
                corrected += 1
                continue
            newest = not items or measured_at >= items[-1].measured_at
            if newest and self._walks.valid < len(items) and cause is not None:
                self._settle(cause)  # the late ones and corrections before it, together
            measurement_id = (ids[i] if ids is not None else None) or next(fresh)
            self._measured(measurement_id=measurement_id, value=value, measured_at=measured_at, source=source)
            cause = by_id[measurement_id]
            out[i] = measurement_id
            new += 1
            if newest:
                self._settle(cause)
        if cause is not None:
            self._settle(cause)
        latest = self.series.latest
        if new and self.stale and latest is not None and self.expected_by(grace) > now:
            self._freshened(measurement_id=latest.measurement_id, measured_at=latest.measured_at)
        return Recorded(tuple(u for u in out if u is not None), new, corrected, unchanged)

    def correct(self, *, measurement_id: UUID, value: float, reason: str) -> bool:
        """Correct a measurement's value; the earlier value stays in the log (and in the read
        model's history). False when the value is already that (nothing appended)."""
        value = self._checked_value(value)
        if not reason.strip():
            raise DomainError("a correction needs a reason")
        existing = self.series.by_id.get(measurement_id)
        if existing is None:
            raise UnknownMeasurement(measurement_id)
        if existing.value == value:
            return False
        self._measurement_corrected(measurement_id=measurement_id, value=value, previous_value=existing.value,
                                    measured_at=existing.measured_at, source=existing.source, reason=reason)
        self._settle(self.series.by_id[measurement_id])
        return True

    def change_target(self, *, target: float, effective_from: date, reason: str) -> None:
        if not (_is_number(target) and math.isfinite(target)):
            raise DomainError("a KPI's target must be a finite number")
        if not isinstance(effective_from, date) or isinstance(effective_from, datetime):
            raise DomainError("effective_from must be a date")
        self._target_changed(target=float(target), effective_from=effective_from, reason=reason)

    def revise_rules(self, *, rules: Iterable[ThresholdRule | Mapping[str, Any]], reason: str) -> bool:
        """Replace the rule set (validated as at definition). A breached rule that is withdrawn
        recovers first; then the new rules are walked over the whole series and whatever they
        say is breached or not is announced. False when the rules are the same (nothing appended)."""
        checked = check_rules(rules)
        if [r.as_dict() for r in checked] == [r.as_dict() for r in self.rules]:
            return False
        latest = self.series.latest
        kept = {r.id for r in checked}
        for rule in self.rules:
            if rule.id in self.breached and rule.id not in kept and latest is not None:
                self._recovered(rule_id=rule.id, value=latest.value, measurement_id=latest.measurement_id,
                                measured_at=latest.measured_at)
        self._rules_revised(rules=[r.as_dict() for r in checked], reason=reason)
        if latest is not None:
            self._settle(latest)
        return True

    def check_staleness(self, *, now: datetime, grace: timedelta = DEFAULT_STALENESS_GRACE) -> bool:
        """Append `Stale` when the next measurement was due before `now` and none has come; once
        per gap (the KPI stays stale until a measurement freshens it). True when it did."""
        if self.stale:
            return False
        expected_by = self.expected_by(grace)
        if now < expected_by:
            return False
        self._stale(expected_by=expected_by, last_measured_at=self.latest_measured_at)
        return True

    def _checked_value(self, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise DomainError("a measurement's value must be a finite number")
        return float(value)

    def _checked(self, m: MeasurementIn) -> tuple[float, datetime, str]:
        """(value, measured_at in UTC, source), or DomainError."""
        value = self._checked_value(m.value)
        if not isinstance(m.measured_at, datetime) or m.measured_at.tzinfo is None:
            raise DomainError("measured_at needs a time zone")
        if m.measured_at.year < 1900:
            raise DomainError("measured_at must be after 1900")
        if not isinstance(m.source, str) or not m.source.strip():
            raise DomainError("a measurement needs a source")
        return value, m.measured_at.astimezone(UTC), m.source

    def _settle(self, cause: Reading) -> None:
        """Announce what the walk says and the log does not yet: a breach or a recovery per rule,
        naming the measurement at which the walk turned (or the one that caused the change)."""
        walks = self._walks
        walks.walk_to(self.rules, self.series.items)
        for rule in self.rules:
            w = walks.latest(rule.id)
            if w.breached == (rule.id in self.breached):
                continue
            r = w.turned_by or cause
            seen = dict(rule_id=rule.id, value=r.value, measurement_id=r.measurement_id, measured_at=r.measured_at)
            if w.breached:
                self._threshold_breached(severity=rule.severity, **seen)
            else:
                self._recovered(**seen)

    # Events ---------------------------------------------------------------------------------

    class Measured(Aggregate.Event):
        """A value for a moment (`measured_at`, valid time) from a source.

        Declared as a class with its own `apply`, not with `@event` on a method: a bulk load
        triggers 10,000 of these, and the decorator's way (the method's arguments matched to
        the event's fields, and again to the method's parameters when applied) took half the
        time of recording one. The fields, their order and so the stored state are the same."""

        measurement_id: UUID
        value: float
        measured_at: datetime
        source: str

        def apply(self, aggregate: Any) -> None:
            aggregate._apply_measured(self.measurement_id, self.value, self.measured_at, self.source)

    def _measured(self, measurement_id: UUID, value: float, measured_at: datetime, source: str) -> None:
        self.trigger_event(self.Measured, measurement_id=measurement_id, value=value, measured_at=measured_at,
                           source=source)

    def _apply_measured(self, measurement_id: UUID, value: float, measured_at: datetime, source: str) -> None:
        reading = Reading(measured_at, self._seq, measurement_id, value, source)
        self._seq += 1
        index = self.series.add(reading)
        self._walks.invalidate(index)
        if self._walks.valid == index:  # the newest, and all before it walked: one step
            self._walks.walk_to(self.rules, self.series.items)

    @event("MeasurementCorrected")
    def _measurement_corrected(self, measurement_id: UUID, value: float, previous_value: float,
                               measured_at: datetime, source: str, reason: str) -> None:
        self._walks.invalidate(self.series.replace_value(measurement_id, value))

    @event("ThresholdBreached")
    def _threshold_breached(self, rule_id: str, severity: Severity, value: float, measurement_id: UUID,
                            measured_at: datetime) -> None:
        self.breached = self.breached | {rule_id}

    @event("Recovered")
    def _recovered(self, rule_id: str, value: float, measurement_id: UUID, measured_at: datetime) -> None:
        self.breached = self.breached - {rule_id}

    @event("Stale")
    def _stale(self, expected_by: datetime, last_measured_at: datetime | None) -> None:
        self.stale = True
        self.stale_expected_by = expected_by

    @event("Freshened")
    def _freshened(self, measurement_id: UUID, measured_at: datetime) -> None:
        self.stale = False
        self.stale_expected_by = None

    @event("TargetChanged")
    def _target_changed(self, target: float, effective_from: date, reason: str) -> None:
        self.targets = [*self.targets, TargetEntry(target, effective_from, reason)]

    @event("RulesRevised")
    def _rules_revised(self, rules: list[dict[str, Any]], reason: str) -> None:
        self.rules = tuple(ThresholdRule.from_dict(r) for r in rules)
        self.breached = self.breached & {r.id for r in self.rules}
        self._walks = Walks(r.id for r in self.rules)


# Trends and forecasts: pure maths over what the read model gives ----------------------------

class Period(enum.StrEnum):
    day = "day"
    week = "week"
    month = "month"


def period_start(day: date, period: Period | str) -> date:
    """The first day of the period that contains `day` (weeks start on Monday, as ISO's do)."""
    period = Period(period)
    if period is Period.day:
        return day
    if period is Period.week:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_period_start(start: date, period: Period | str) -> date:
    period = Period(period)
    if period is Period.day:
        return start + timedelta(days=1)
    if period is Period.week:
        return start + timedelta(days=7)
    return date(start.year + start.month // 12, start.month % 12 + 1, 1)


def previous_period_start(start: date, period: Period | str) -> date:
    period = Period(period)
    if period is Period.day:
        return start - timedelta(days=1)
    if period is Period.week:
        return start - timedelta(days=7)
    return date(start.year - (start.month == 1), (start.month - 2) % 12 + 1, 1)


@dataclass(frozen=True)
class PeriodStats:
    """One period's measurements: how many, the lowest, highest, mean and the last value."""

    start: date
    count: int
    min: float
    max: float
    avg: float
    last: float


@dataclass(frozen=True)
class TrendPoint:
    stats: PeriodStats
    change: float | None
    change_percent: float | None


def trend(stats: Sequence[PeriodStats], period: Period | str) -> list[TrendPoint]:
    """Period-over-period change of the mean, against the calendar period just before (none when
    that period had no measurements); the percentage is of the earlier mean's magnitude (none
    when that mean is 0)."""
    out: list[TrendPoint] = []
    previous: PeriodStats | None = None
    for s in sorted(stats, key=lambda s: s.start):
        change = change_percent = None
        if previous is not None and previous.start == previous_period_start(s.start, period):
            change = s.avg - previous.avg
            change_percent = change / abs(previous.avg) * 100 if previous.avg != 0 else None
        out.append(TrendPoint(s, change, change_percent))
        previous = s
    return out


@dataclass(frozen=True)
class LinearFit:
    """A least-squares line through (days, value) points: value = intercept + slope * days."""

    slope: float
    intercept: float
    count: int

    def at(self, days: float) -> float:
        return self.intercept + self.slope * days


def linear_fit(points: Sequence[tuple[float, float]]) -> LinearFit | None:
    """Ordinary least squares; None with fewer than two distinct times (no line to draw).
    Centred on the means, so that large x values lose no precision."""
    n = len(points)
    if n < 2:
        return None
    mean_x = math.fsum(x for x, _ in points) / n
    mean_y = math.fsum(y for _, y in points) / n
    sxx = math.fsum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return LinearFit(slope, mean_y - slope * mean_x, n)


def _first_below(fit: LinearFit, bound: float) -> float | None:
    """Days from 0 until the line is first below `bound` (0 if it already is; None if never)."""
    if fit.at(0) < bound:
        return 0.0
    if fit.slope >= 0:
        return None
    return (bound - fit.intercept) / fit.slope


def _first_above(fit: LinearFit, bound: float) -> float | None:
    if fit.at(0) > bound:
        return 0.0
    if fit.slope <= 0:
        return None
    return (bound - fit.intercept) / fit.slope


def first_violation(rule: ThresholdRule, fit: LinearFit) -> float | None:
    """Days from the fit's origin until the trend line crosses the rule's threshold into
    violation (0 when it is already past it), or None if it never does."""
    if rule.kind is RuleKind.below:
        return _first_below(fit, rule.threshold)  # type: ignore[arg-type]
    if rule.kind is RuleKind.above:
        return _first_above(fit, rule.threshold)  # type: ignore[arg-type]
    crossings = [d for d in (_first_below(fit, rule.low), _first_above(fit, rule.high)) if d is not None]  # type: ignore[arg-type]
    return min(crossings) if crossings else None


@dataclass(frozen=True)
class PredictedBreach:
    rule: ThresholdRule
    days: float


def predicted_breach(rules: Iterable[ThresholdRule], fit: LinearFit, horizon_days: float) -> PredictedBreach | None:
    """The first rule the trend line violates within the horizon (earliest; the first rule on
    a tie), or None."""
    best: PredictedBreach | None = None
    for rule in rules:
        days = first_violation(rule, fit)
        if days is not None and days <= horizon_days and (best is None or days < best.days):
            best = PredictedBreach(rule, days)
    return best


def days_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 86400


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)
