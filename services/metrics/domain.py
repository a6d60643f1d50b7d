"""The KPI domain: always-on metrics, their measurements and threshold rules.

Pure: imports nothing from infrastructure. The aggregate is `KPI`; its events are nested in it
and named in the past tense, so their contract names are `KPIDefined`, `KPIMeasured`,
`KPIThresholdBreached` and `KPIRecovered`. Rules travel in `KPIDefined` as plain dicts (the
contract's JSON), because other services decode them without these classes.

Threshold rules work as Prometheus and Grafana alerting do: a rule is *violated* by a value on
its wrong side; it *fires* (`ThresholdBreached`) after `pending_count` consecutive violating
measurements, and while it has seen fewer it is *pending*, which is a state of the read model,
not an event; once fired it *clears* (`Recovered`) only when a value is back past its recovery
bound, so a value hovering at the threshold does not flap.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate, event


class DomainError(ValueError):
    """A well-formed command that breaks a rule of the KPI domain."""


class Direction(enum.StrEnum):
    higher_is_better = "higher_is_better"
    lower_is_better = "lower_is_better"


class Cadence(enum.StrEnum):
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"
    quarterly = "quarterly"


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
    no_data = "no_data"


@dataclass(frozen=True)
class ThresholdRule:
    """One threshold rule of a KPI, as the `KPIDefined` event carries it.

    below: violated when value < threshold, cleared when value >= recovery (default threshold).
    above: violated when value > threshold, cleared when value <= recovery (default threshold).
    outside: violated when value < low or value > high, cleared when back inside [low, high].
    """

    id: str
    kind: RuleKind
    severity: Severity
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    pending_count: int = 1
    recovery: float | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RuleKind(self.kind))
            object.__setattr__(self, "severity", Severity(self.severity))
        except ValueError as e:
            raise DomainError(str(e)) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThresholdRule:
        pending_count = data.get("pending_count")
        return cls(**{k: data.get(k) for k in ("id", "kind", "severity", "threshold", "low", "high",
                                                "recovery")}, pending_count=1 if pending_count is None else pending_count)

    def as_dict(self) -> dict[str, Any]:
        """The rule as the event contract spells it: plain JSON values."""
        return {**asdict(self), "kind": self.kind.value, "severity": self.severity.value}

    def validate(self) -> None:
        numbers = [x for x in (self.threshold, self.low, self.high, self.recovery) if x is not None]
        if not all(math.isfinite(x) for x in numbers):
            raise DomainError(f"rule {self.id}: bounds must be finite numbers")
        if isinstance(self.pending_count, bool) or not isinstance(self.pending_count, int) or self.pending_count < 1:
            raise DomainError(f"rule {self.id}: pending_count must be a whole number of at least 1")
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

    def violated_by(self, value: float) -> bool:
        if self.kind is RuleKind.below:
            return value < self.threshold  # type: ignore[operator]
        if self.kind is RuleKind.above:
            return value > self.threshold  # type: ignore[operator]
        return value < self.low or value > self.high  # type: ignore[operator]

    def cleared_by(self, value: float) -> bool:
        """Whether a value ends a breach: past the recovery bound, not merely off the threshold."""
        if self.kind is RuleKind.below:
            return value >= (self.recovery if self.recovery is not None else self.threshold)  # type: ignore[operator]
        if self.kind is RuleKind.above:
            return value <= (self.recovery if self.recovery is not None else self.threshold)  # type: ignore[operator]
        return not self.violated_by(value)


def next_consecutive(rule: ThresholdRule, consecutive: int, value: float) -> int:
    """Consecutive violating measurements after `value` (any good value resets the count)."""
    return consecutive + 1 if rule.violated_by(value) else 0


def rule_state(breached: bool, consecutive: int) -> RuleState:
    """A breached rule stays breached until it recovers; a violated one not yet fired is pending."""
    if breached:
        return RuleState.breached
    return RuleState.pending if consecutive > 0 else RuleState.ok


def kpi_state(rule_states: Iterable[RuleState | str], has_data: bool) -> KPIState:
    """The worst of the rules' states; no_data before the first measurement."""
    if not has_data:
        return KPIState.no_data
    states = {RuleState(s) for s in rule_states}
    for worst in (RuleState.breached, RuleState.pending):
        if worst in states:
            return KPIState(worst.value)
    return KPIState.ok


class KPI(Aggregate):
    """An always-on metric with threshold rules; each measurement appends `KPIMeasured`, and
    the same save appends `KPIThresholdBreached` / `KPIRecovered` for the rules it fires or clears.

    Rules are evaluated in order of valid time (`measured_at`), not of arrival: a measurement
    older than the latest one is recorded, but it changes no rule's count or state. Replaying a
    late value into the past would mean re-deciding breaches that were already announced; keeping
    history append-only and judging only the newest value is simple and never contradicts the log.
    """

    @event("Defined")
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
        self.rules = tuple(ThresholdRule.from_dict(r) for r in rules)
        self.consecutive = {r.id: 0 for r in self.rules}
        self.breached: set[str] = set()
        self.latest_value: float | None = None
        self.latest_measured_at: datetime | None = None
        self.measurement_count = 0

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
        if target is not None and not math.isfinite(target):
            raise DomainError("a KPI's target must be a finite number")
        try:
            direction, cadence = Direction(direction), Cadence(cadence)
        except ValueError as e:
            raise DomainError(str(e)) from None
        checked: list[ThresholdRule] = []
        for n, r in enumerate(rules, start=1):
            rule = r if isinstance(r, ThresholdRule) else ThresholdRule.from_dict(r)
            if not rule.id:
                rule = replace(rule, id=f"rule-{n}")
            rule.validate()
            checked.append(rule)
        if len({r.id for r in checked}) != len(checked):
            raise DomainError("a KPI's rule ids must be unique")
        return cls(name=name, description=description, unit=unit, owner_id=owner_id, unit_id=unit_id,
                   direction=direction, cadence=cadence, target=target,
                   rules=[r.as_dict() for r in checked])

    def rule_state(self, rule_id: str) -> RuleState:
        return rule_state(rule_id in self.breached, self.consecutive[rule_id])

    @property
    def state(self) -> KPIState:
        return kpi_state((self.rule_state(r.id) for r in self.rules), self.measurement_count > 0)

    def _is_latest(self, measured_at: datetime) -> bool:
        return self.latest_measured_at is None or measured_at >= self.latest_measured_at

    def measure(self, *, value: float, measured_at: datetime, source: str,
                measurement_id: UUID | None = None) -> UUID:
        """Record a value for a moment (valid time), then fire or clear the rules it decides."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DomainError("a measurement's value must be a finite number")
        if measured_at.tzinfo is None:
            raise DomainError("measured_at needs a time zone")
        measured_at = measured_at.astimezone(UTC)
        measurement_id = measurement_id or uuid4()
        is_latest = self._is_latest(measured_at)
        self._measured(measurement_id=measurement_id, value=float(value), measured_at=measured_at,
                       source=source)
        if not is_latest:
            return measurement_id
        for rule in self.rules:
            seen = dict(rule_id=rule.id, value=float(value), measurement_id=measurement_id,
                        measured_at=measured_at)
            if rule.id in self.breached:
                if rule.cleared_by(value):
                    self._recovered(**seen)
            elif self.consecutive[rule.id] >= rule.pending_count:
                self._threshold_breached(severity=rule.severity, **seen)
        return measurement_id

    @event("Measured")
    def _measured(self, measurement_id: UUID, value: float, measured_at: datetime, source: str) -> None:
        if self._is_latest(measured_at):
            self.consecutive = {r.id: next_consecutive(r, self.consecutive[r.id], value) for r in self.rules}
            self.latest_value = value
            self.latest_measured_at = measured_at
        self.measurement_count += 1

    @event("ThresholdBreached")
    def _threshold_breached(self, rule_id: str, severity: Severity, value: float, measurement_id: UUID,
                            measured_at: datetime) -> None:
        self.breached = self.breached | {rule_id}

    @event("Recovered")
    def _recovered(self, rule_id: str, value: float, measurement_id: UUID, measured_at: datetime) -> None:
        self.breached = self.breached - {rule_id}
