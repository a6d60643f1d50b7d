"""The goals application's rules that span aggregates, on the library's in-memory (POPO)
persistence: alignment and contribution cycles, unit-tree and management cycles, nested
cycles, closing a cycle (grades and frozen check-ins), carry-over, moving a key result,
corrections and forecasts. Numbers in the scoring and forecast tests are computed by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date
from uuid import UUID, uuid4

import pytest

from services.common.eventstore import VersionMismatch, Written
from services.goals.application import Goals
from services.goals.domain import (
    CycleKind,
    CycleStatus,
    DomainError,
    KeyResultKind,
    ObjectiveStatus,
    OwnerKind,
    UnitKind,
)

D = date


@pytest.fixture
def app() -> Goals:
    return Goals(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


class Org:
    """Acme with a Support department and Q4 2026 active, built through the application."""

    def __init__(self, app: Goals) -> None:
        self.app = app
        self.company = app.create_unit(name="Acme", kind=UnitKind.company, parent_id=None).id
        self.support = app.create_unit(name="Support", kind=UnitKind.department, parent_id=self.company).id
        self.q4 = self.cycle("Q4 2026", D(2026, 10, 1), D(2026, 12, 31))

    def cycle(self, name: str, starts_on: date, ends_on: date, **kw: object) -> UUID:
        return self.app.create_cycle(name=name, starts_on=starts_on, ends_on=ends_on, activate=True, **kw).id  # type: ignore[arg-type]

    def objective(self, title: str = "Deliver exceptional customer support", cycle: UUID | None = None,
                  parent: UUID | None = None, **kw: object) -> UUID:
        fields: dict[str, object] = {"owner_kind": OwnerKind.unit, "owner_id": self.support}
        return self.app.create_objective(title=title, description="why it matters", unit_id=self.support,
                                         cycle_id=cycle or self.q4, parent_id=parent,
                                         **{**fields, **kw}).id  # type: ignore[arg-type]

    def key_result(self, objective: UUID, title: str = "Increase CSAT", kind: KeyResultKind = KeyResultKind.increase_to,
                   weight: float = 1.0, **measure: object) -> UUID:
        fields: dict[str, object] = {"start": None, "target": None, "low": None, "high": None, "milestones": [],
                                     "unit": "", "owner_id": None}
        return self.app.add_key_result(objective_id=objective, title=title, kind=kind, weight=weight,
                                       **{**fields, **measure}).id  # type: ignore[arg-type]

    def check_in(self, kr: UUID, value: float, on: date, confidence: int | None = 5) -> Written:
        return self.app.check_in(kr, value=value, confidence=confidence, note="", valid_on=on, expected_version=None)


@pytest.fixture
def org(app: Goals) -> Org:
    return Org(app)


# Writes report where they landed -----------------------------------------------------------------

def test_a_key_result_is_attached_to_its_objective_in_the_same_transaction(app: Goals, org: Org) -> None:
    o = org.objective()
    written = app.add_key_result(objective_id=o, title="Increase CSAT", kind=KeyResultKind.increase_to, start=70,
                                 target=90, low=None, high=None, milestones=[], unit="%", weight=1, owner_id=None)
    assert (written.version, written.position) == (1, app.position())  # the objective's event came last
    objective = app.get_objective(o)
    assert objective.key_result_ids == [written.id] and objective.version == 2
    with pytest.raises(DomainError, match="no owner"):
        org.key_result(o, owner_id=uuid4(), start=0, target=1)  # a key result's owner is a person


# Org units -------------------------------------------------------------------------------------

def test_moving_a_unit_never_forms_a_cycle(app: Goals, org: Org) -> None:
    team = app.create_unit(name="Tier 1", kind=UnitKind.team, parent_id=org.support).id
    with pytest.raises(DomainError, match="cycle"):
        app.move_unit(org.support, team)  # under its own child
    with pytest.raises(DomainError, match="cycle"):
        app.move_unit(org.company, team)  # the walk up from the team meets the company first
    with pytest.raises(DomainError, match="own parent"):
        app.move_unit(team, team)
    with pytest.raises(DomainError, match="no org unit"):
        app.move_unit(team, uuid4())
    sales = app.create_unit(name="Sales", kind=UnitKind.department, parent_id=org.company).id
    moved = app.move_unit(team, sales, expected_version=1)
    assert moved.version == 2 and app.get_unit(team).parent_id == sales
    with pytest.raises(VersionMismatch):
        app.move_unit(team, org.support, expected_version=1)


def test_a_company_cannot_get_a_parent(app: Goals, org: Org) -> None:
    other = app.create_unit(name="Holding", kind=UnitKind.company, parent_id=None).id
    with pytest.raises(DomainError, match="company"):
        app.move_unit(org.company, other)
    with pytest.raises(DomainError, match="company"):
        app.create_unit(name="Sub", kind=UnitKind.company, parent_id=other)


def test_rename_unit(app: Goals, org: Org) -> None:
    assert app.rename_unit(org.support, "Customer Support").version == 2
    assert app.get_unit(org.support).name == "Customer Support"
    with pytest.raises(DomainError):
        app.rename_unit(org.support, " ")


# People ----------------------------------------------------------------------------------------

def test_people_join_move_and_leave(app: Goals, org: Org) -> None:
    with pytest.raises(DomainError, match="no org unit"):
        app.join_person(name="Ada", email="ada@example.com", unit_id=uuid4(), joined_on=D(2026, 1, 5))
    boss = app.join_person(name="Grace", email="grace@example.com", unit_id=org.company, joined_on=D(2025, 1, 1)).id
    ada = app.join_person(name="Ada", email="ada@example.com", unit_id=org.support, manager_id=boss,
                          joined_on=D(2026, 1, 5)).id
    with pytest.raises(DomainError, match="cycle"):
        app.change_manager(boss, manager_id=ada, effective_on=D(2026, 2, 1))  # Ada already reports to Grace
    with pytest.raises(DomainError, match="own manager"):
        app.change_manager(ada, manager_id=ada, effective_on=D(2026, 2, 1))
    sales = app.create_unit(name="Sales", kind=UnitKind.department, parent_id=org.company).id
    app.move_person(ada, unit_id=sales, effective_on=D(2026, 6, 1))
    app.person_leaves(ada, left_on=D(2026, 9, 30))
    person = app.get_person(ada)
    assert (person.unit_on(D(2026, 5, 1)), person.unit_on(D(2026, 7, 1)), person.has_left) == (
        org.support, sales, True)
    with pytest.raises(DomainError, match="left"):
        app.move_person(ada, unit_id=org.support, effective_on=D(2026, 10, 1))
    with pytest.raises(DomainError, match="left"):
        app.join_person(name="Bo", email="bo@example.com", unit_id=sales, manager_id=ada, joined_on=D(2026, 10, 1))
    with pytest.raises(DomainError, match="left"):
        org.objective(owner_kind=OwnerKind.person, owner_id=ada)
    assert app.get_objective(org.objective(owner_kind=OwnerKind.person, owner_id=boss)).owner_id == boss
    with pytest.raises(DomainError, match="no owner"):
        org.objective(owner_kind=OwnerKind.person, owner_id=uuid4())


# Cycles ----------------------------------------------------------------------------------------

def test_a_quarter_sits_inside_its_year(app: Goals, org: Org) -> None:
    year = org.cycle("2027", D(2027, 1, 1), D(2027, 12, 31))
    assert app.get_cycle(year).kind == CycleKind.year  # inferred from its length
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31), parent_id=year)
    assert (app.get_cycle(q1).kind, app.get_cycle(q1).parent_id) == (CycleKind.quarter, year)
    with pytest.raises(DomainError, match="not a year"):
        org.cycle("Jan", D(2027, 1, 1), D(2027, 1, 31), parent_id=q1)
    with pytest.raises(DomainError, match="inside its year"):
        org.cycle("Q1 2028", D(2027, 12, 1), D(2028, 2, 28), parent_id=year)
    with pytest.raises(DomainError, match="no cycle"):
        org.cycle("Q2", D(2027, 4, 1), D(2027, 6, 30), parent_id=uuid4())
    with pytest.raises(DomainError, match="cannot sit inside"):
        org.cycle("2027 again", D(2027, 1, 1), D(2027, 12, 31), kind=CycleKind.year, parent_id=year)
    app.close_cycle(year)
    with pytest.raises(DomainError, match="closed"):
        org.cycle("Q2 2027", D(2027, 4, 1), D(2027, 6, 30), parent_id=year)


def test_cycle_lifecycle_through_the_application(app: Goals) -> None:
    c = app.create_cycle(name="Q1", starts_on=D(2027, 1, 1), ends_on=D(2027, 3, 31), activate=False)
    assert app.get_cycle(c.id).status == CycleStatus.planning
    assert app.activate_cycle(c.id, expected_version=1).version == 2
    with pytest.raises(DomainError):
        app.activate_cycle(c.id)
    assert app.close_cycle(c.id).version == 3
    with pytest.raises(DomainError, match="already closed"):
        app.close_cycle(c.id)


# The alignment graph: parents and contributions together ---------------------------------------

def test_contributions_and_alignment_never_form_a_cycle(app: Goals, org: Org) -> None:
    a = org.objective("Company: delight customers")
    b = org.objective("Support: answer faster", parent=a)
    c = org.objective("Tier 1: first-contact resolution")
    with pytest.raises(DomainError, match="cycle"):
        app.add_contribution(a, b, 1.0)  # a <- b (parent); a -> b would close the loop
    app.add_contribution(c, b, 2.0)  # c contributes to b
    with pytest.raises(DomainError, match="cycle"):
        app.align_objective(a, c, None)  # a -> c -> b -> a
    with pytest.raises(DomainError, match="cycle"):
        app.add_contribution(a, c, 1.0)  # the same loop through a contribution edge
    d = org.objective("Elsewhere")
    app.add_contribution(a, d, 0.5)
    assert app.get_objective(a).contributes_to == {d: 0.5}
    with pytest.raises(DomainError, match="cycle"):
        app.add_contribution(d, c, 1.0)  # d -> c -> b -> a -> d


def test_contribution_rules_through_the_application(app: Goals, org: Org) -> None:
    parent = org.objective("Parent")
    child = org.objective("Child", parent=parent)
    with pytest.raises(DomainError, match="twice"):
        app.add_contribution(child, parent, 1.0)
    with pytest.raises(DomainError, match="itself"):
        app.add_contribution(child, child, 1.0)
    with pytest.raises(DomainError, match="no objective"):
        app.add_contribution(child, uuid4(), 1.0)
    archived = org.objective("Old")
    app.archive_objective(archived)
    with pytest.raises(DomainError, match="archived"):
        app.add_contribution(child, archived, 1.0)
    other = org.objective("Other")
    written = app.add_contribution(child, other, 3.0, expected_version=2)
    assert written.version == 3
    assert app.remove_contribution(child, other).version == 4
    with pytest.raises(DomainError, match="does not contribute"):
        app.remove_contribution(child, other)


# Objectives ------------------------------------------------------------------------------------

def test_objective_lifecycle_through_the_application(app: Goals, org: Org) -> None:
    o = org.objective(status=ObjectiveStatus.draft)
    assert app.get_objective(o).status == ObjectiveStatus.draft
    app.activate_objective(o, expected_version=1)
    app.close_objective(o)
    app.reopen_objective(o)  # the cycle is open
    written = app.update_objective(o, title="Delight our customers", expected_version=4)
    assert written.version == 5 and app.get_objective(o).title == "Delight our customers"
    with pytest.raises(VersionMismatch):
        app.update_objective(o, description="stale", expected_version=4)
    with pytest.raises(DomainError, match="no org unit"):
        app.update_objective(o, owner_id=uuid4())
    app.archive_objective(o)
    with pytest.raises(DomainError):
        app.update_objective(o, title="too late")


# Closing a cycle: grades and a freeze ----------------------------------------------------------

def closed_q4(app: Goals, org: Org) -> dict[str, UUID]:
    """Q4 with a scored objective, a draft without key results and an archived one, closed."""
    scored = org.objective()
    response = org.key_result(scored, "Reduce average response time from 8 hours to under 3 hours",
                              KeyResultKind.decrease_to, weight=1, start=8, target=3, unit="h")
    training = org.key_result(scored, "Increase support team trained in the new protocols",
                              KeyResultKind.increase_to, weight=3, start=0, target=100, unit="%")
    launch = org.key_result(scored, "Reach 90% CSAT on resolved tickets", KeyResultKind.stay_above, weight=5,
                            target=90)
    org.check_in(response, 5.5, D(2026, 11, 2))  # 0.5
    org.check_in(training, 60, D(2026, 11, 3))  # 0.6
    draft = org.objective("Draft idea", status=ObjectiveStatus.draft)
    archived = org.objective("Dropped")
    app.archive_objective(archived)
    written = app.close_cycle(org.q4, [scored, draft, archived, scored], reason="end of Q4", expected_version=2)
    assert written == Written(org.q4, 3, app.position())
    return {"scored": scored, "draft": draft, "archived": archived, "response": response, "training": training,
            "launch": launch}


def test_closing_a_cycle_grades_every_objective_that_is_not_archived(app: Goals, org: Org) -> None:
    ids = closed_q4(app, org)
    assert app.get_cycle(org.q4).status == CycleStatus.closed
    scored = app.get_objective(ids["scored"])
    # (0.5 * 1 + 0.6 * 3) / 4 = 0.575; the unscored stay_above key result (weight 5) is left out
    assert scored.final_score == pytest.approx(0.575)
    assert (scored.status, scored.graded, scored.grade_reason) == (ObjectiveStatus.closed, True, "end of Q4")
    draft = app.get_objective(ids["draft"])
    assert (draft.status, draft.graded, draft.final_score) == (ObjectiveStatus.closed, True, None)
    archived = app.get_objective(ids["archived"])
    assert (archived.status, archived.graded, archived.version) == (ObjectiveStatus.archived, False, 2)


def test_a_closed_cycle_freezes_check_ins_and_its_grades(app: Goals, org: Org) -> None:
    ids = closed_q4(app, org)
    with pytest.raises(DomainError, match="frozen"):
        org.check_in(ids["training"], 80, D(2026, 12, 30))
    with pytest.raises(DomainError, match="frozen"):
        app.correct_check_in(ids["training"], corrects_version=2, value=70, confidence=5, note="",
                             valid_on=D(2026, 11, 3))
    with pytest.raises(DomainError, match="frozen"):
        app.revise_key_result(ids["training"], target=90)
    with pytest.raises(DomainError, match="closed"):
        app.reopen_objective(ids["scored"])
    with pytest.raises(DomainError, match="closed cycle"):
        org.objective("Late addition")
    assert app.get_key_result(ids["training"]).version == 2  # nothing was appended
    app.regrade_objective(ids["scored"], final_score=0.7, reason="training records came in late")
    assert app.get_objective(ids["scored"]).final_score == 0.7
    with pytest.raises(DomainError, match="reason"):
        app.regrade_objective(ids["scored"], final_score=0.8, reason="")


def test_closing_refuses_objectives_of_another_cycle_and_writes_nothing(app: Goals, org: Org) -> None:
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31))
    mine, theirs = org.objective(), org.objective(cycle=q1)
    before = app.position()
    with pytest.raises(DomainError, match="not in this cycle"):
        app.close_cycle(org.q4, [mine, theirs])
    assert app.position() == before
    assert app.get_cycle(org.q4).status == CycleStatus.active
    with pytest.raises(DomainError, match="no objective"):
        app.close_cycle(org.q4, [uuid4()])


def test_check_ins_freeze_on_a_closed_or_archived_objective_too(app: Goals, org: Org) -> None:
    o = org.objective()
    kr = org.key_result(o, start=0, target=10)
    app.close_objective(o)
    with pytest.raises(DomainError, match="closed"):
        org.check_in(kr, 1, D(2026, 11, 1))
    app.reopen_objective(o)
    assert org.check_in(kr, 1, D(2026, 11, 1)).version == 2


# Carry-over ------------------------------------------------------------------------------------

def test_carry_over_copies_the_objective_and_its_key_results_into_a_later_cycle(app: Goals, org: Org) -> None:
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31))
    open_objective = org.objective("Still running")
    with pytest.raises(DomainError, match="graded"):
        app.carry_over(open_objective, q1)
    ids = closed_q4(app, org)
    written = app.carry_over(ids["scored"], q1)
    assert len(written) == 5  # the new objective, its three key results, the original
    assert {w.position for w in written} == {app.position()}
    new_id = written[0].id
    new, original = app.get_objective(new_id), app.get_objective(ids["scored"])
    assert written[-1] == Written(original.id, original.version, app.position())
    assert (new.title, new.description, new.owner_kind, new.owner_id, new.unit_id) == (
        original.title, original.description, original.owner_kind, original.owner_id, original.unit_id)
    assert (new.cycle_id, new.carried_from, new.status, new.parent_id) == (q1, original.id, ObjectiveStatus.active,
                                                                            None)
    assert new.key_result_ids == [w.id for w in written[1:4]]
    copies = [app.get_key_result(i) for i in new.key_result_ids]
    originals = [app.get_key_result(ids[k]) for k in ("response", "training", "launch")]
    for copy, old in zip(copies, originals, strict=True):
        assert copy.objective_id == new_id
        for field in ("title", "kind", "start", "target", "low", "high", "milestones", "unit", "weight", "owner_id"):
            assert getattr(copy, field) == getattr(old, field), field
        assert (copy.current, copy.check_in_count) == (None, 0)  # baselines and targets intact, no progress
    assert original.carried_to_cycles == [q1]
    with pytest.raises(DomainError, match="already carried"):
        app.carry_over(ids["scored"], q1)


def test_carry_over_goes_forward_into_an_open_cycle(app: Goals, org: Org) -> None:
    ids = closed_q4(app, org)
    overlapping = org.cycle("Dec sprint", D(2026, 12, 1), D(2026, 12, 31))
    with pytest.raises(DomainError, match="start after"):
        app.carry_over(ids["scored"], overlapping)
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31))
    app.close_cycle(q1)
    with pytest.raises(DomainError, match="closed"):
        app.carry_over(ids["scored"], q1)
    with pytest.raises(DomainError, match="no cycle"):
        app.carry_over(ids["scored"], uuid4())
    q2 = org.cycle("Q2 2027", D(2027, 4, 1), D(2027, 6, 30))
    written = app.carry_over(ids["draft"], q2, status=ObjectiveStatus.draft)
    assert len(written) == 2 and app.get_objective(written[0].id).status == ObjectiveStatus.draft


# Moving a key result ---------------------------------------------------------------------------

def test_a_key_result_moves_to_an_open_objective_of_the_same_cycle(app: Goals, org: Org) -> None:
    source, target = org.objective("Source"), org.objective("Target")
    kr = org.key_result(source, start=0, target=10)
    org.check_in(kr, 4, D(2026, 11, 1))
    written = app.move_key_result(kr, target, expected_version=2)
    assert written == Written(kr, 3, app.position())
    assert app.get_key_result(kr).objective_id == target
    assert app.get_objective(source).key_result_ids == []
    assert app.get_objective(target).key_result_ids == [kr]
    assert app.get_key_result(kr).current == 4  # its history moves with it
    with pytest.raises(DomainError, match="already belongs"):
        app.move_key_result(kr, target)
    q1 = org.cycle("Q1 2027", D(2027, 1, 1), D(2027, 3, 31))
    with pytest.raises(DomainError, match="same cycle"):
        app.move_key_result(kr, org.objective(cycle=q1))
    closed = org.objective("Closed")
    app.close_objective(closed)
    with pytest.raises(DomainError, match="closed"):
        app.move_key_result(kr, closed)
    archived = org.objective("Archived")
    app.archive_objective(archived)
    with pytest.raises(DomainError, match="archived"):
        app.move_key_result(kr, archived)
    with pytest.raises(DomainError, match="no objective"):
        app.move_key_result(kr, uuid4())


# Revisions, corrections and forecasts ----------------------------------------------------------

def test_revise_a_key_result(app: Goals, org: Org) -> None:
    kr = org.key_result(org.objective(), start=45, target=65)
    owner = app.join_person(name="Ada", email="ada@example.com", unit_id=org.support, joined_on=D(2026, 1, 1)).id
    assert app.revise_key_result(kr, target=70, owner_id=owner, expected_version=1).version == 2
    assert (app.get_key_result(kr).target, app.get_key_result(kr).owner_id) == (70, owner)
    with pytest.raises(DomainError, match="target above"):
        app.revise_key_result(kr, target=40)
    with pytest.raises(DomainError, match="no owner"):
        app.revise_key_result(kr, owner_id=uuid4())


def test_a_correction_and_the_forecast_through_the_application(app: Goals, org: Org) -> None:
    kr = org.key_result(org.objective(), start=0, target=100)
    org.check_in(kr, 0, D(2026, 10, 1))
    org.check_in(kr, 100, D(2026, 10, 11))  # version 3: a typo
    org.check_in(kr, 14, D(2026, 10, 21))
    written = app.correct_check_in(kr, corrects_version=3, value=10, confidence=6, note="typo: 10, not 100",
                                   valid_on=D(2026, 10, 11), expected_version=4)
    assert written.version == 5
    result = app.get_key_result(kr)
    assert (result.current, result.check_in_count, result.correction_count) == (14, 3, 1)
    assert [c.value for c in result.effective_check_ins] == [0, 10, 14]
    # trend: 1 + 0.7 a day from Oct 1; Q4 ends Dec 31, day 91: 1 + 63.7 = 64.7 of 100
    value, score = app.forecast_key_result(kr)
    assert value == pytest.approx(64.7)
    assert score == pytest.approx(0.647)
    with pytest.raises(DomainError, match="version 5"):
        app.correct_check_in(kr, corrects_version=5, value=1, confidence=None, note="", valid_on=D(2026, 10, 1))


def test_objective_score_from_the_write_side(app: Goals, org: Org) -> None:
    o = org.objective()
    a = org.key_result(o, kind=KeyResultKind.stay_within, low=2, high=4, weight=1)
    b = org.key_result(o, kind=KeyResultKind.milestones, weight=1,
                       milestones=[{"title": "a", "weight": 1}, {"title": "b", "weight": 2}, {"title": "c", "weight": 3}])
    assert app.objective_score(o) is None
    org.check_in(a, 4.5, D(2026, 11, 1))  # outside the range: 0.0
    org.check_in(b, 2, D(2026, 11, 1))  # (1 + 2) / 6 = 0.5
    assert app.objective_score(o) == pytest.approx(0.25)


# Coaching lints from the write side ------------------------------------------------------------

def test_lint_objectives(app: Goals, org: Org) -> None:
    ada = app.join_person(name="Ada", email="ada@example.com", unit_id=org.support, joined_on=D(2026, 1, 1)).id
    o = org.objective("Maintain NPS above 50", owner_kind=OwnerKind.person, owner_id=ada)
    kr = org.key_result(o, "Launch new website", KeyResultKind.done)
    app.person_leaves(ada, left_on=D(2026, 11, 1))
    warnings = app.lint_objectives([o])
    assert sorted((w.code, w.subject_id) for w in warnings) == sorted([
        ("objective_without_owner", o), ("objective_is_a_kpi", o), ("too_few_key_results", o),
        ("key_result_is_a_task", kr), ("done_only_key_result", kr)])


# Stored events from before this version --------------------------------------------------------

def test_created_events_stored_before_kinds_and_drafts_still_load(app: Goals, org: Org) -> None:
    """A `CycleCreated` without `kind`/`parent_id` and an `ObjectiveCreated` without
    `status`/`carried_from`, as the first version stored them, load with the defaults."""
    from services.goals.domain import Cycle, Objective

    def stored_without(aggregate: object, *fields: str):  # noqa: ANN202
        stored = app.mapper.to_stored_event(aggregate.collect_events()[0])  # type: ignore[attr-defined]
        state = json.loads(stored.state)
        for f in fields:
            del state[f]
        return replace(stored, state=json.dumps(state).encode())

    cycle = Cycle(name="Q3 2026", starts_on=D(2026, 7, 1), ends_on=D(2026, 9, 30))
    objective = Objective(title="Old", description="", owner_kind=OwnerKind.unit, owner_id=org.support,
                          unit_id=org.support, cycle_id=org.q4)
    app.recorder.insert_events([stored_without(cycle, "kind", "parent_id"),
                                stored_without(objective, "status", "carried_from")])
    loaded = app.get_cycle(cycle.id)
    assert (loaded.kind, loaded.parent_id, loaded.status) == (CycleKind.quarter, None, CycleStatus.planning)
    old = app.get_objective(objective.id)
    assert (old.status, old.carried_from, old.key_result_ids) == (ObjectiveStatus.active, None, [])
    # and the old objective takes part in the new commands
    app.add_contribution(old.id, org.objective("New"), 1.0)
    assert app.close_cycle(org.q4, [old.id]).version == 3
    assert app.get_objective(old.id).final_score is None
