"""Which goals a member may write: the member's part of the roles of DESIGN.md.

`require` (services.common.auth) decides by role alone: `admin` and `service` write everything
their routes let them; `hr_sync` and `auditor` write nothing here (403). A `member` passes the
role check of the objective and key result writes only, and then only for goals that are theirs:

- The member is the person the token's `sub` names in the read model's `people`: by id (the
  UUID as text), else case-insensitively by user name, else by email. A subject that names no
  current person (none, one who left or was deactivated, or two people alike) may write nothing.
- An objective is theirs when they own it (owner kind `person`) or it belongs to their current
  unit. A key result is theirs when they own it or its objective is theirs.
- Creating an objective: the new one must be theirs (owner themselves, or their unit). Writes on
  an objective (update, status transitions, alignment, contributions, guardrails, carry-over, a
  new key result): the objective must be theirs. Aligning or contributing writes the link on the
  child objective (the one in the path) only, so the parent may be anyone's. Writes on a key
  result (revision, KPI binding, check-ins and corrections): the key result must be theirs;
  moving it, the target objective must be theirs too.
- Nothing else of goals is a member's: units, people, cycles (closing them grades), regrades,
  webhooks (those take `Operator`, admin and service, or admin only) and SCIM (hr_sync's).

The order of answers for a member: 401 (token); 403 for the role (before the request is looked
at); 403 when the subject names no current person; 403 when the objective or key result the
path names exists and is not theirs (a dependency: before the body is validated); then the body
(422); then 404 when the path names nothing (the check lets a missing resource through, so a
member learns nothing more than any writer: 404 first, never 403, for what does not exist); then
the domain's rules. Creating an objective and a move's target need the body, so that 403 comes
after validation. Objectives and key results are read from the write side (never behind); the
person from the read model (a person added a moment ago may need it to catch up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from services.common.auth import OPERATORS, WRITERS, Principal, Role, require
from services.common.problems import Problem
from services.goals.domain import OwnerKind

AnyWriter = Annotated[Principal, Depends(require(*WRITERS))]


@dataclass(frozen=True)
class Member:
    """The person a member's token names, with their current unit."""

    person_id: UUID
    unit_id: UUID

    def owns_objective(self, objective: Any) -> bool:
        return ((objective.owner_kind == OwnerKind.person and objective.owner_id == self.person_id)
                or objective.unit_id == self.unit_id)


def _forbidden(detail: str) -> Problem:
    return Problem(403, "Forbidden", detail, kind="forbidden")


def limited(principal: Principal) -> bool:
    """Whether the member's limits apply: a member's token without admin or service."""
    return Role.member in principal.roles and not principal.has_any(OPERATORS)


PERSON = """
SELECT id, unit_id, left_on IS NULL AND active AS current,
       CASE WHEN id::text = lower($1) THEN 0 WHEN lower(user_name) = lower($1) THEN 1 ELSE 2 END AS rank
  FROM people
 WHERE id::text = lower($1) OR lower(user_name) = lower($1) OR lower(email) = lower($1)
 ORDER BY rank, id
"""


async def member(request: Request, principal: Principal) -> Member | None:
    """The member the principal is, or None when no member limits apply; 403 when the token's
    subject names no current person."""
    if not limited(principal):
        return None
    rows = await request.app.state.pool.fetch(PERSON, principal.subject)
    best = [r for r in rows if r["rank"] == rows[0]["rank"]] if rows else []
    if len(best) > 1:
        raise _forbidden("A member writes only their own goals, and this token's subject names more than one "
                         "person: ask an admin to tell them apart.")
    if not best or not best[0]["current"]:
        raise _forbidden("A member writes only their own goals, and this token's subject names no current person "
                         "(by id, user name or email): ask an admin to add or reactivate them.")
    # Not kept in `request.state`: under some servers that dict is shared by every request.
    return Member(person_id=best[0]["id"], unit_id=best[0]["unit_id"])


async def _objective(request: Request, objective_id: UUID) -> Any | None:
    try:
        return await run_in_threadpool(request.app.state.application.get_objective, objective_id)
    except AggregateNotFoundError:
        return None  # the write answers 404, as it does for any role


async def _key_result(request: Request, key_result_id: UUID) -> Any | None:
    try:
        return await run_in_threadpool(request.app.state.application.get_key_result, key_result_id)
    except AggregateNotFoundError:
        return None


async def check_objective(request: Request, principal: Principal, objective_id: UUID,
                          what: str = "this objective") -> None:
    """403 unless the objective (if there is one) is the member's."""
    person = await member(request, principal)
    if person is None:
        return
    objective = await _objective(request, objective_id)
    if objective is not None and not person.owns_objective(objective):
        raise _forbidden(f"A member writes only objectives they own or that belong to their unit; {what} is neither.")


async def check_key_result(request: Request, principal: Principal, key_result_id: UUID) -> None:
    """403 unless the key result (if there is one) is the member's."""
    person = await member(request, principal)
    if person is None:
        return
    kr = await _key_result(request, key_result_id)
    if kr is None or kr.owner_id == person.person_id:
        return
    objective = await _objective(request, kr.objective_id)
    if objective is None or not person.owns_objective(objective):
        raise _forbidden("A member writes only key results they own or whose objective is theirs (owned by them "
                         "or of their unit); this key result is neither.")


async def check_new_objective(request: Request, principal: Principal, owner_kind: OwnerKind, owner_id: UUID,
                              unit_id: UUID) -> None:
    """403 unless the objective to be created would be the member's."""
    person = await member(request, principal)
    if person is None:
        return
    if not person.owns_objective(_Facts(owner_kind=OwnerKind(owner_kind), owner_id=owner_id, unit_id=unit_id)):
        raise _forbidden("A member creates only objectives they own or that belong to their unit.")


@dataclass(frozen=True)
class _Facts:
    owner_kind: OwnerKind
    owner_id: UUID
    unit_id: UUID


# Dependencies: the role check, then the member's. `member_scope` says what a member may do,
# for the contracts (services.contracts puts it on each operation as `x-tandem-member-scope`).

async def objective_creator(request: Request, principal: AnyWriter) -> Principal:
    await member(request, principal)
    return principal


objective_creator.member_scope = "only an objective they own (owner: themselves) or of their current unit"


async def objective_writer(request: Request, objective_id: UUID, principal: AnyWriter) -> Principal:
    await check_objective(request, principal, objective_id)
    return principal


objective_writer.member_scope = "only an objective they own or of their current unit"


async def key_result_writer(request: Request, key_result_id: UUID, principal: AnyWriter) -> Principal:
    await check_key_result(request, principal, key_result_id)
    return principal


key_result_writer.member_scope = "only a key result they own or whose objective they own or is of their unit"


async def key_result_mover(request: Request, key_result_id: UUID, principal: AnyWriter) -> Principal:
    await check_key_result(request, principal, key_result_id)
    return principal


key_result_mover.member_scope = ("only a key result they own or whose objective they own or is of their unit, "
                                 "to an objective they own or of their unit")

ObjectiveCreator = Annotated[Principal, Depends(objective_creator)]
ObjectiveWriter = Annotated[Principal, Depends(objective_writer)]
KeyResultWriter = Annotated[Principal, Depends(key_result_writer)]
KeyResultMover = Annotated[Principal, Depends(key_result_mover)]
Operator = Annotated[Principal, Depends(require(*OPERATORS))]
