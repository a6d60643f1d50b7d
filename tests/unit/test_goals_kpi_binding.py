"""KPIs driving key results and guarding objectives, without a database: binding a key result
to a KPI, the check-ins and corrections that measurements make, the binding index, guardrails
and their lint; the application's bind and unbind (POPO), and the KPI policy fed contract events
by hand (its own POPO store), metadata included."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from types import SimpleNamespace
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import Tracking

from services.common.projections import ContractEvent
from services.goals.application import POLICY_ACTOR, Goals, KPIProgress
from services.goals.domain import (
    KPI_CHECK_IN_NOTE,
    MAX_GUARDRAILS,
    NUMERIC_KINDS,
    Cycle,
    DomainError,
    KeyResult,
    KeyResultKind,
    KPIBinding,
    Objective,
    ObjectiveStatus,
    OwnerKind,
    key_result_frozen,
    lint_guardrails,
)
from tests.unit.test_goals_application import Org

POPO = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
D = date


def kr(kind: KeyResultKind = KeyResultKind.increase_to, **measure: object) -> KeyResult:
    measure = measure or {"start": 0, "target": 100}
    return KeyResult.define(objective_id=uuid4(), title="t", kind=kind, **measure)  # type: ignore[arg-type]


def objective(**fields: object) -> Objective:
    return Objective.define(title="Grow", description="", owner_kind=OwnerKind.unit, owner_id=uuid4(),
                            unit_id=uuid4(), cycle_id=uuid4(), **fields)  # type: ignore[arg-type]


def event_names(aggregate: object) -> list[str]:
    return [type(e).__name__ for e in aggregate.collect_events()]  # type: ignore[attr-defined]


# The key result -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(NUMERIC_KINDS))
def test_a_key_result_of_a_numeric_kind_can_follow_a_kpi(kind: KeyResultKind) -> None:
    measures = {KeyResultKind.stay_within: {"low": 1, "high": 2}, KeyResultKind.decrease_to: {"start": 8, "target": 3}}
    k = kr(kind, **measures.get(kind, {"start": 0, "target": 10}))
    kpi = uuid4()
    k.bind_to_kpi(kpi)
    assert k.kpi_id == kpi
    k.bind_to_kpi(kpi)  # the same KPI again: nothing
    assert event_names(k) == ["Created", "BoundToKPI"]


@pytest.mark.parametrize(("kind", "measure"), [(KeyResultKind.done, {}),
                                               (KeyResultKind.milestones, {"milestones": [{"weight": 1}]})])
def test_done_and_milestone_key_results_cannot_follow_a_kpi(kind: KeyResultKind, measure: dict) -> None:
    k = KeyResult.define(objective_id=uuid4(), title="t", kind=kind, **measure)
    with pytest.raises(DomainError, match="cannot follow a KPI"):
        k.bind_to_kpi(uuid4())
    assert k.kpi_id is None


def test_rebinding_replaces_the_kpi_and_unbinding_forgets_it() -> None:
    k = kr()
    first, second = uuid4(), uuid4()
    k.bind_to_kpi(first)
    k.bind_to_kpi(second)
    assert k.kpi_id == second
    k.unbind_from_kpi()
    assert k.kpi_id is None
    with pytest.raises(DomainError, match="not bound"):
        k.unbind_from_kpi()
    events = k.collect_events()
    assert [type(e).__name__ for e in events] == ["Created", "BoundToKPI", "BoundToKPI", "UnboundFromKPI"]
    assert events[2].kpi_id == second


def test_a_measurement_of_the_bound_kpi_is_a_check_in_that_names_it() -> None:
    k = kr()
    kpi, other, m1, m2 = uuid4(), uuid4(), uuid4(), uuid4()
    assert not k.record_measurement(kpi_id=kpi, measurement_id=m1, value=40, valid_on=D(2026, 11, 2))  # not bound
    k.bind_to_kpi(kpi)
    assert not k.record_measurement(kpi_id=other, measurement_id=m1, value=40, valid_on=D(2026, 11, 2))
    assert k.record_measurement(kpi_id=kpi, measurement_id=m1, value=40, valid_on=D(2026, 11, 2))
    assert not k.record_measurement(kpi_id=kpi, measurement_id=m1, value=40, valid_on=D(2026, 11, 2))  # once
    assert k.record_measurement(kpi_id=kpi, measurement_id=m2, value=30, valid_on=D(2026, 11, 1))  # late
    assert (k.current, k.current_valid_on, k.confidence, k.score, k.check_in_count) == (
        40, D(2026, 11, 2), None, pytest.approx(0.4), 2)
    assert (k.measurement_of(3), k.measurement_of(4), k.measurement_of(1)) == (m1, m2, None)
    progressed = k.collect_events()[-1]
    assert (progressed.value, progressed.confidence, progressed.note, progressed.measurement_id) == (
        30, None, KPI_CHECK_IN_NOTE, m2)


def test_a_check_in_a_person_makes_names_no_measurement() -> None:
    k = kr()
    k.check_in(value=10, confidence=7, note="by hand", valid_on=D(2026, 11, 1))
    assert k.collect_events()[-1].measurement_id is None and k.measurement_of(2) is None


def test_a_corrected_measurement_corrects_the_check_in_that_carries_it() -> None:
    k = kr()
    kpi, m = uuid4(), uuid4()
    k.bind_to_kpi(kpi)
    k.record_measurement(kpi_id=kpi, measurement_id=m, value=40, valid_on=D(2026, 11, 2))
    assert not k.correct_measurement(measurement_id=uuid4(), value=45, note="x")  # not carried here
    assert not k.correct_measurement(measurement_id=m, value=40, note="x")  # already says that
    assert k.correct_measurement(measurement_id=m, value=45, note="KPI measurement, corrected: typo")
    assert (k.current, k.current_valid_on, k.correction_count) == (45, D(2026, 11, 2), 1)
    corrected = k.collect_events()[-1]
    assert type(corrected).__name__ == "CheckInCorrected"
    assert (corrected.corrects_version, corrected.value, corrected.valid_on, corrected.confidence) == (
        3, 45, D(2026, 11, 2), None)


def test_old_check_ins_without_a_measurement_id_still_replay() -> None:
    """KeyResultProgressed stored before the field existed decodes with measurement_id None."""
    app = Goals(env=POPO)
    org = Org(app)
    k = org.key_result(org.objective(), start=0, target=10)
    org.check_in(k, 4, D(2026, 11, 1))
    [stored] = [s for s in app.recorder.select_events(k) if s.topic.endswith("KeyResult.Progressed")]
    state = json.loads(stored.state)
    assert state.pop("measurement_id") is None
    old = type(stored)(stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode())
    event = app.mapper.to_domain_event(old)
    assert event.measurement_id is None
    replayed = app.repository.get(k, version=1)
    event.mutate(replayed)
    assert replayed.current == 4 and replayed.measurements == {}


# The binding index ----------------------------------------------------------------------------

def test_a_kpis_binding_has_an_id_derived_from_the_kpi() -> None:
    kpi = uuid4()
    binding = KPIBinding(kpi_id=kpi)
    assert binding.id == KPIBinding.create_id(kpi) == KPIBinding(kpi_id=kpi).id != KPIBinding.create_id(uuid4())
    a, b = uuid4(), uuid4()
    binding.bind(a)
    binding.bind(b)
    binding.bind(a)
    binding.unbind(a)
    binding.unbind(a)
    assert binding.key_result_ids == [b]
    assert event_names(binding) == ["Created", "KeyResultBound", "KeyResultBound", "KeyResultUnbound"]


# Guardrails -----------------------------------------------------------------------------------

def test_an_objective_names_guardrail_kpis_while_it_is_open() -> None:
    o = objective()
    a, b = uuid4(), uuid4()
    o.add_guardrail(a)
    o.add_guardrail(b)
    o.add_guardrail(a)  # again: nothing
    o.remove_guardrail(a)
    assert o.guardrails == [b]
    with pytest.raises(DomainError, match="no such guardrail"):
        o.remove_guardrail(a)
    assert event_names(o) == ["Created", "GuardrailAdded", "GuardrailAdded", "GuardrailRemoved"]
    o.close()
    o.add_guardrail(b)  # already named: nothing, even closed
    with pytest.raises(DomainError, match="closed"):
        o.add_guardrail(uuid4())
    with pytest.raises(DomainError, match="closed"):
        o.remove_guardrail(b)


def test_an_objective_names_a_limited_number_of_guardrails() -> None:
    o = objective()
    for _ in range(MAX_GUARDRAILS):
        o.add_guardrail(uuid4())
    with pytest.raises(DomainError, match="at most"):
        o.add_guardrail(uuid4())


def test_a_breached_guardrail_is_a_warning_while_the_objective_is_pursued() -> None:
    o = objective(status=ObjectiveStatus.draft)
    healthy = SimpleNamespace(kpi_id=uuid4(), name="NPS", breached=False)
    breached = SimpleNamespace(kpi_id=uuid4(), name="Uptime", breached=True)
    unnamed = SimpleNamespace(kpi_id=uuid4(), name=None, breached=True)
    assert lint_guardrails(o, [healthy]) == []
    [warning] = lint_guardrails(o, [healthy, breached])
    assert (warning.code, warning.subject_kind, warning.subject_id) == ("guardrail_breached", "objective", o.id)
    assert "'Uptime' is breached" in warning.message
    [both] = lint_guardrails(o, [breached, unnamed])
    assert f"'Uptime', '{unnamed.kpi_id}' are breached" in both.message
    o.activate()
    o.close()
    assert lint_guardrails(o, [breached]) == []  # no longer pursued


def test_a_key_result_is_frozen_by_a_closed_cycle_or_an_objective_no_longer_open() -> None:
    cycle = Cycle.define(name="Q4", starts_on=D(2026, 10, 1), ends_on=D(2026, 12, 31))
    o = objective()
    assert key_result_frozen(o, cycle) is None
    o.close()
    assert "closed" in key_result_frozen(o, cycle)  # type: ignore[operator]
    o.reopen()
    cycle.close()
    assert "cycle is closed" in key_result_frozen(o, cycle)  # type: ignore[operator]


# The application ------------------------------------------------------------------------------

@pytest.fixture
def app() -> Goals:
    return Goals(env=POPO)


@pytest.fixture
def org(app: Goals) -> Org:
    return Org(app)


def test_binding_saves_the_key_result_and_the_kpis_index_together(app: Goals, org: Org) -> None:
    k = org.key_result(org.objective(), start=0, target=100)
    first, second = uuid4(), uuid4()
    written = app.bind_key_result_to_kpi(k, first, expected_version=1)
    assert (written.id, written.version, written.position) == (k, 2, app.position())
    assert app.get_kpi_binding(first).key_result_ids == [k]  # type: ignore[union-attr]
    assert app.bind_key_result_to_kpi(k, first).version == 2  # the same KPI: nothing new
    app.bind_key_result_to_kpi(k, second)
    assert app.get_key_result(k).kpi_id == second
    assert app.get_kpi_binding(first).key_result_ids == []  # type: ignore[union-attr]
    assert app.get_kpi_binding(second).key_result_ids == [k]  # type: ignore[union-attr]
    unbound = app.unbind_key_result_from_kpi(k)
    assert unbound.version == 4 and app.get_key_result(k).kpi_id is None
    assert app.get_kpi_binding(second).key_result_ids == []  # type: ignore[union-attr]
    assert app.get_kpi_binding(uuid4()) is None


def test_binding_is_refused_for_frozen_or_non_numeric_key_results(app: Goals, org: Org) -> None:
    o = org.objective()
    done = org.key_result(o, "Ship it", KeyResultKind.done)
    with pytest.raises(DomainError, match="cannot follow a KPI"):
        app.bind_key_result_to_kpi(done, uuid4())
    k = org.key_result(o, start=0, target=10)
    kpi = uuid4()
    app.bind_key_result_to_kpi(k, kpi)
    app.close_objective(o)
    with pytest.raises(DomainError, match="frozen"):
        app.bind_key_result_to_kpi(k, uuid4())
    assert app.bind_key_result_to_kpi(k, kpi).version == 2  # already so: fine
    app.unbind_key_result_from_kpi(k)  # stopping is allowed once frozen
    assert app.get_kpi_binding(kpi).key_result_ids == []  # type: ignore[union-attr]


def test_a_carried_over_key_result_follows_the_same_kpi(app: Goals, org: Org) -> None:
    o = org.objective()
    k = org.key_result(o, start=0, target=10)
    kpi = uuid4()
    app.bind_key_result_to_kpi(k, kpi)
    app.close_cycle(org.q4, [o])
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31))
    written = app.carry_over(o, q1)
    assert len(written) == 3  # the new objective, its key result, the original
    copy = app.get_key_result(written[1].id)
    assert copy.kpi_id == kpi
    assert app.get_kpi_binding(kpi).key_result_ids == [k, copy.id]  # type: ignore[union-attr]


def test_guardrails_through_the_application(app: Goals, org: Org) -> None:
    o = org.objective()
    kpi = uuid4()
    assert app.add_guardrail(o, kpi, expected_version=1).version == 2
    assert app.get_objective(o).guardrails == [kpi]
    assert app.remove_guardrail(o, kpi).version == 3
    with pytest.raises(DomainError, match="no such guardrail"):
        app.remove_guardrail(o, kpi)


# The KPI policy -------------------------------------------------------------------------------

class Policy:
    """The policy on its own in-memory store, with an objective in an active cycle, a key result
    bound to a KPI and the KPI's binding saved through it."""

    def __init__(self) -> None:
        self.app = KPIProgress(env=POPO)
        self.kpi = uuid4()
        self.cycle = Cycle.define(name="Q4", starts_on=D(2026, 10, 1), ends_on=D(2026, 12, 31))
        self.cycle.activate()
        self.objective = Objective.define(title="Grow", description="", owner_kind=OwnerKind.unit,
                                          owner_id=uuid4(), unit_id=uuid4(), cycle_id=self.cycle.id)
        self.kr = KeyResult.define(objective_id=self.objective.id, title="t", kind=KeyResultKind.increase_to,
                                   start=0, target=100)
        self.objective.attach_key_result(self.kr.id)
        self.kr.bind_to_kpi(self.kpi)
        binding = KPIBinding(kpi_id=self.kpi)
        binding.bind(self.kr.id)
        self.app.save(self.cycle, self.objective, self.kr, binding)
        self.position = 0

    def feed(self, type_: str, **data: object) -> int:
        self.position += 1
        event = ContractEvent(type=type_, originator_id=self.kpi, version=self.position,
                              data={"timestamp": datetime.now(UTC), **data},
                              meta={"actor": "ada", "correlation_id": "corr-7", "trace_id": "ab" * 16})
        self.app.process_event(event, Tracking("Metrics", self.position))
        return self.position

    def measure(self, value: float, at: datetime, measurement_id: UUID | None = None) -> UUID:
        measurement_id = measurement_id or uuid4()
        self.feed("KPIMeasured", measurement_id=measurement_id, value=value, measured_at=at, source="api")
        return measurement_id

    def key_result(self) -> KeyResult:
        return self.app.repository.get(self.kr.id)


def test_the_policy_checks_in_each_measurement_once_with_its_metadata() -> None:
    p = Policy()
    late_evening = datetime(2026, 11, 2, 23, 30, tzinfo=UTC).astimezone()  # any zone: the day is UTC's
    m = p.measure(40, late_evening)
    kr = p.key_result()
    assert (kr.current, kr.current_valid_on, kr.version, kr.measurement_of(3)) == (40, D(2026, 11, 2), 3, m)
    [stored] = [s for s in p.app.recorder.select_events(kr.id) if s.originator_version == 3]
    state = json.loads(stored.state)
    assert state["meta"] == {"actor": POLICY_ACTOR, "correlation_id": "corr-7", "causation_id": "metrics:1",
                             "trace_id": "ab" * 16}
    assert state["note"] == KPI_CHECK_IN_NOTE and state["confidence"] is None
    assert p.app.recorder.max_tracking_id("Metrics") == 1

    p.app.process_event(ContractEvent("KPIMeasured", p.kpi, 1, {"measurement_id": m, "value": 40,
                                                                "measured_at": late_evening}),
                        Tracking("Metrics", 1))  # delivered again: already tracked
    assert p.key_result().version == 3

    p.feed("KPIDefined", name="CSAT")  # any other event only moves the position
    assert p.app.recorder.max_tracking_id("Metrics") == 2 and p.key_result().version == 3


def test_the_policy_corrects_the_check_in_of_a_corrected_measurement() -> None:
    p = Policy()
    m = p.measure(40, datetime(2026, 11, 2, 9, tzinfo=UTC))
    p.feed("KPIMeasurementCorrected", measurement_id=m, value=45, previous_value=40,
           measured_at=datetime(2026, 11, 2, 9, tzinfo=UTC), source="api", reason="typo")
    kr = p.key_result()
    assert (kr.current, kr.correction_count, kr.version) == (45, 1, 4)
    p.feed("KPIMeasurementCorrected", measurement_id=uuid4(), value=1, previous_value=2,
           measured_at=datetime(2026, 11, 2, 9, tzinfo=UTC), source="api", reason="not ours")
    assert p.key_result().version == 4


def test_the_policy_skips_key_results_that_are_frozen_or_unbound() -> None:
    p = Policy()
    p.cycle = p.app.repository.get(p.cycle.id)
    p.cycle.close()
    p.app.save(p.cycle)
    p.measure(40, datetime(2026, 11, 2, tzinfo=UTC))
    assert p.key_result().version == 2 and p.app.recorder.max_tracking_id("Metrics") == 1

    q = Policy()
    kr = q.key_result()
    kr.unbind_from_kpi()  # saved without touching the binding: the key result decides
    q.app.save(kr)
    q.measure(40, datetime(2026, 11, 2, tzinfo=UTC))
    assert q.key_result().version == 3 and q.key_result().check_in_count == 0

    unbound = Policy()
    unbound.kpi = uuid4()  # a KPI nobody follows
    unbound.measure(40, datetime(2026, 11, 2, tzinfo=UTC))
    assert unbound.app.recorder.max_tracking_id("Metrics") == 1
