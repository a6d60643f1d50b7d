"""SCIM 2.0 (RFC 7643 / 7644) at `/scim/v2`: how HR systems provision people and org units.

A SCIM User is a Tandem person, a Group an org unit (services.goals.scim_resources). Every
change is a command of the `Goals` application, so it is an event in the log like any REST
write, effective today; reads come from the goals read model, and a write answers once the
read model shows it (its `Tandem-Position` works as a REST write's does).

Which unit a person is in (a person always has one):
- a Group's `members` are the people whose unit it is: adding someone to a group moves them
  into that unit; removing them moves them up to the group's parent unit (nobody is removed
  from a company, the root: 400 invalidValue);
- a User's enterprise `department` naming a unit (case aside, exactly one open unit of that
  name) moves them there when it differs from their unit's name; left out, the unit stays;
- a new User without a department joins the company, when there is exactly one; otherwise
  the creation is refused with 400 invalidValue, as is a department that names no unit (or
  several).
A User's enterprise `department` reads as their unit's name, `groups` as their unit.

DELETE of a User records that the person left (their history and goals stay, their open
objectives show `needsReassignment`, their user name is free again); DELETE of a Group
dissolves an empty unit (409 while it has members or units below it). Both then answer 404.

Only the `hr_sync` role may call it: SCIM is the HR system's channel, and people and units
are the HR system's to decide; an admin changes them over REST, where a human's change is
attributed to a human. Every failure is a SCIM error message (`application/scim+json`).
/Bulk is services.goals.scim_bulk.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from eventsourcing.application import AggregateNotFoundError
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from scim2_models import (
    ConflictException,
    Context,
    EnterpriseUser,
    Error,
    InvalidFilterException,
    InvalidSyntaxException,
    InvalidValueException,
    ListResponse,
    NotFoundException,
    PatchOp,
    PayloadTooLargeException,
    PreconditionFailedException,
    ResponseParameters,
    SCIMException,
    SearchRequest,
    UniquenessException,
)

from services.common import database
from services.common.auth import Principal, Role, require
from services.common.eventstore import ConcurrentWrite, VersionMismatch, Written, run_command
from services.common.problems import render_errors_under
from services.common.web import ReadYourWrites, TrackedLog, command_context, set_position
from services.goals.application import Goals
from services.goals.domain import UNCHANGED, DomainError, UnitKind, UnitNotEmpty, UserNameTaken
from services.goals.scim_query import GROUPS, USERS, Table, fold, search_page
from services.goals.scim_resources import (
    MAX_PAYLOAD_SIZE,
    PROVIDER,
    SCIM_JSON,
    SCIM_PREFIX,
    SERVICE_PROVIDER_CONFIG,
    Locations,
    ScimGroup,
    ScimUser,
    TandemUnit,
    group_of,
    user_of,
    weak_etag,
)

LOG = "goals"
MAX_FILTER_LENGTH = 4096
MAX_STRING_LENGTH = 10_000
HrSync = Annotated[Principal, Depends(require(Role.hr_sync))]
router = APIRouter(prefix=SCIM_PREFIX, include_in_schema=False)

USER_ROWS = ("SELECT p.*, u.name AS unit_name, m.name AS manager_name FROM people p "
             "JOIN units u ON u.id = p.unit_id LEFT JOIN people m ON m.id = p.manager_id")
GROUP_ROWS = "SELECT g.*, pg.name AS parent_name FROM units g LEFT JOIN units pg ON pg.id = g.parent_id"
BULK_ID = re.compile(r"^bulkId:(.+)$")
BEFORE_COMMAND: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "scim_before_command", default=None)
"""Awaited before an operation's command is sent to the write side: /Bulk holds the operations
of a wave there until each has reached its command or failed, so that their saves reach the
log's writer together (services.goals.scim_bulk)."""


# Answers and errors -------------------------------------------------------------------------

class ScimJSON(JSONResponse):
    media_type = SCIM_JSON


def error_response(status: int, scim_type: str | None, detail: str | None,
                   headers: Mapping[str, str] | None = None) -> ScimJSON:
    body = Error(status=status, scim_type=scim_type, detail=detail).model_dump(scim_ctx=Context.DEFAULT)
    return ScimJSON(body, status_code=status, headers=dict(headers or {}))


# The problem kinds services.common.problems gives, as SCIM keywords (RFC 7644 §3.12). SCIM
# answers a request it cannot accept with 400, where REST says 422.
_SCIM_TYPES = {"malformed-json": "invalidSyntax", "validation": "invalidValue", "domain-rule": "invalidValue",
               "no-such-position": "invalidValue", "bad-cursor": "invalidValue"}


def render_problem(request: Request, status: int, title: str, detail: str | None = None, *,
                   kind: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """What the service's error handlers answer under /scim/v2 (401, 403, unknown paths and
    methods, request validation, unexpected errors): SCIM error messages."""
    if status == 422:
        status = 400
    scim_type = _SCIM_TYPES.get(kind or "") if status == 400 else None
    return error_response(status, scim_type, detail or title, headers)


async def _scim_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SCIMException)
    error = exc.to_error()
    return error_response(error.status or 400, error.scim_type, error.detail)


def install(app: FastAPI) -> None:
    """Serve SCIM on the goals app, with SCIM error messages for everything under its prefix."""
    from services.goals.scim_bulk import router as bulk_router  # it builds on this module

    app.include_router(bulk_router)  # first: POST /Bulk is not a resource type's creation
    app.include_router(router)
    render_errors_under(app, SCIM_PREFIX, render_problem)
    app.add_exception_handler(SCIMException, _scim_error)


def scim_exception(exc: BaseException) -> SCIMException | None:
    """A command's or a payload's failure as the SCIM error it is; None for the unexpected."""
    if isinstance(exc, SCIMException):
        return exc
    if isinstance(exc, ValidationError):
        return SCIMException.from_error(Error.from_validation_errors(exc)[0])
    if isinstance(exc, UserNameTaken):
        return UniquenessException(detail=str(exc))
    if isinstance(exc, UnitNotEmpty):
        return ConflictException(detail=str(exc))
    if isinstance(exc, DomainError):
        return InvalidValueException(detail=str(exc))
    if isinstance(exc, VersionMismatch):
        return PreconditionFailedException(detail=f"If-Match names version {exc.expected}; the resource is at "
                                                  f"{weak_etag(exc.actual)}")
    if isinstance(exc, ConcurrentWrite):
        return ConflictException(detail="The resource kept changing while this request was applied; retry.")
    if isinstance(exc, AggregateNotFoundError):
        return NotFoundException(detail="No such resource.")
    if isinstance(exc, RecursionError):
        return InvalidFilterException(detail="The expression is nested too deeply.")
    return None


def _validate(model: Any, payload: Any, context: Context) -> Any:
    """A request payload as a scim2-models object, under Tandem's provider and policy."""
    if not isinstance(payload, dict):
        raise InvalidSyntaxException(detail="The request body is not a JSON object.")
    if model is ScimUser:
        _fill_manager_ref(payload)
    try:
        return model.model_validate(payload, scim_ctx=context, scim_provider=PROVIDER)
    except (ValidationError, RecursionError) as e:
        raise scim_exception(e) from e


def _fill_manager_ref(payload: Any) -> None:
    """A manager given by its id alone (as HR systems send it) gets the $ref the enterprise
    schema requires."""
    manager = _enterprise(payload).get("manager") if isinstance(payload, dict) else None
    if isinstance(manager, dict) and manager.get("value") is not None and "$ref" not in manager:
        manager["$ref"] = f"../Users/{manager['value']}"


def _enterprise(payload: dict[str, Any]) -> dict[str, Any]:
    for key, value in payload.items():
        if key.lower() == str(EnterpriseUser.__schema__).lower() and isinstance(value, dict):
            return value
    return {}


def _check_strings(value: Any) -> None:
    """PostgreSQL stores no NUL and no lone surrogate, and one such event would stop every
    projection."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidValueException(detail="Text cannot hold the NUL character.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidValueException(detail="Text must be valid Unicode (no lone surrogates).") from None
        if len(value) > MAX_STRING_LENGTH:
            raise InvalidValueException(detail=f"Text is limited to {MAX_STRING_LENGTH} characters.")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


async def _body(request: Request) -> Any:
    """The request's JSON (application/scim+json or application/json)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", SCIM_JSON, "application/json"):
        raise SCIMException.from_error(Error(status=415, detail=f"Send {SCIM_JSON} (or application/json)."))
    raw = await request.body()
    if len(raw) > MAX_PAYLOAD_SIZE:
        raise PayloadTooLargeException(detail=f"Requests are limited to {MAX_PAYLOAD_SIZE} bytes.")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidSyntaxException(detail="The request body is not valid JSON.") from None
    _check_strings(payload)
    return payload


def _id(value: Any) -> UUID:
    """asyncpg's UUIDs as the standard library's (the event store's transcoder knows those)."""
    return UUID(str(value))


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value))
    except ValueError:
        return None


def _ref(value: Any, what: str) -> UUID:
    """An id a payload names (a manager, a member, a parent)."""
    if isinstance(value, str) and BULK_ID.match(value):
        raise InvalidValueException(detail=f"{value}: bulkId references are resolved inside /Bulk only, and this "
                                           "one names no resource created there.")
    found = _uuid(value)
    if found is None:
        raise InvalidValueException(detail=f"No {what} has the id {value!r}.")
    return found


def _expected_version(if_match: str | None) -> int | None:
    """The aggregate version `If-Match` names (`W/"3"`, `"3"`); `*` or none: any. A value that
    names no version of this service cannot match: 412."""
    if if_match is None or if_match.strip() == "*":
        return None
    match = re.fullmatch(r'\s*(?:W/)?"(\d{1,18})"\s*', if_match)
    if match is None:
        raise PreconditionFailedException(detail="If-Match names no version of this resource.")
    return int(match.group(1))


def _response_parameters(request: Request, model: Any) -> ResponseParameters[Any] | None:
    """`attributes` / `excludedAttributes` of the query string."""
    values = {name: ",".join(request.query_params.getlist(name))
              for name in ("attributes", "excludedAttributes") if name in request.query_params}
    if not values:
        return None
    try:
        return ResponseParameters[model].model_validate(values)
    except ValidationError as e:
        raise scim_exception(e) from e


def _shows(parameters: ResponseParameters[Any] | None, attribute: str) -> bool:
    """Whether a dump under these parameters carries a (top-level, core) attribute."""
    if parameters is None:
        return True

    def names(paths: Sequence[Any] | None) -> set[str]:
        return {str(p).lower().rsplit(":", 1)[-1].split(".")[0] for p in paths or ()}

    if parameters.attributes:
        return attribute.lower() in names(parameters.attributes)
    return attribute.lower() not in names(parameters.excluded_attributes)


# The session of one request ---------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """A resource type: its name, where its rows are, and its model."""

    name: str
    table: Table
    model: Any


USER = Kind("User", USERS, ScimUser)
GROUP = Kind("Group", GROUPS, ScimGroup)
KINDS = {"users": USER, "groups": GROUP}


class Scim:
    """What one SCIM request works with: the write side under the caller's context, the read
    model, and where resources are."""

    def __init__(self, request: Request, principal: Principal) -> None:
        self.request = request
        self.principal = principal
        self.goals: Goals = request.app.state.application
        self.pool: asyncpg.Pool = request.app.state.pool
        self.at = Locations(str(request.base_url))
        self.tracked: TrackedLog = request.app.state.tracked_logs[LOG]
        self.timeout: float = request.app.state.settings.read_wait_timeout_seconds

    async def command(self, fn: Callable[..., Written], *args: Any, **kwargs: Any) -> Written:
        before = BEFORE_COMMAND.get()
        if before is not None:
            await before()
        try:
            return await run_command(command_context(self.request, self.principal), fn, *args, **kwargs)
        except Exception as e:
            converted = scim_exception(e)
            if converted is None:
                raise
            raise converted from e

    async def caught_up(self, position: int | None = None) -> None:
        """Wait for the read model to reach `position` (the log's head if None): a write's
        answer and the state a change is worked out from are never behind the log."""
        if position is None:
            position = await database.log_head(self.pool, self.tracked.events_table)
        t = self.tracked
        if position <= 0 or await database.tracking_position(self.pool, t.tracking_table,
                                                             t.application_name) >= position:
            return
        if not await database.wait_for_position(self.pool, t.tracking_table, t.application_name, position,
                                                self.timeout):
            raise SCIMException.from_error(Error(
                status=504, detail=f"The change is recorded (goals={position}) but the read model has not shown it "
                                   "yet; read it again with Tandem-Wait-For."))

    # Reading.

    async def user_row(self, user_id: str) -> asyncpg.Record:
        found = _uuid(user_id)
        row = None if found is None else await self.pool.fetchrow(
            f"{USER_ROWS} WHERE p.id = $1 AND p.left_on IS NULL", found)
        if row is None:
            raise NotFoundException(detail=f"No User has the id {user_id}.")
        return row

    async def group_row(self, group_id: str) -> asyncpg.Record:
        found = _uuid(group_id)
        row = None if found is None else await self.pool.fetchrow(
            f"{GROUP_ROWS} WHERE g.id = $1 AND g.dissolved_on IS NULL", found)
        if row is None:
            raise NotFoundException(detail=f"No Group has the id {group_id}.")
        return row

    async def members(self, unit_ids: Sequence[UUID]) -> dict[UUID, list[asyncpg.Record]]:
        out: dict[UUID, list[asyncpg.Record]] = {i: [] for i in unit_ids}
        for r in await self.pool.fetch("SELECT id, name, unit_id FROM people WHERE unit_id = ANY($1::uuid[]) "
                                       "AND left_on IS NULL ORDER BY created_at, id", list(unit_ids)):
            out[r["unit_id"]].append(r)
        return out

    async def user(self, user_id: str) -> Any:
        return user_of(await self.user_row(user_id), self.at)

    async def group(self, group_id: str, with_members: bool = True) -> Any:
        row = await self.group_row(group_id)
        members = (await self.members([row["id"]]))[row["id"]] if with_members else None
        return group_of(row, members, self.at)

    async def resources(self, keys: Sequence[tuple[str, UUID]],
                        parameters: ResponseParameters[Any] | None) -> list[Any]:
        """The resources of a page, in its order."""
        user_ids = [i for t, i in keys if t == "User"]
        group_ids = [i for t, i in keys if t == "Group"]
        found: dict[UUID, Any] = {}
        if user_ids:
            for r in await self.pool.fetch(f"{USER_ROWS} WHERE p.id = ANY($1::uuid[])", user_ids):
                found[r["id"]] = user_of(r, self.at)
        if group_ids:
            members = await self.members(group_ids) if _shows(parameters, "members") else None
            for r in await self.pool.fetch(f"{GROUP_ROWS} WHERE g.id = ANY($1::uuid[])", group_ids):
                found[r["id"]] = group_of(r, members[r["id"]] if members is not None else None, self.at)
        return [found[i] for _, i in keys if i in found]

    async def unit_named(self, department: str) -> UUID:
        rows = await self.pool.fetch("SELECT id FROM units WHERE lower(name) = $1 AND dissolved_on IS NULL",
                                     fold(department))
        if len(rows) != 1:
            why = "no unit has" if not rows else f"{len(rows)} units have"
            raise InvalidValueException(detail=f"A person needs a unit: department {department!r} names none "
                                               f"({why} that name); add them to a Group instead.")
        return _id(rows[0]["id"])

    async def root_unit(self) -> UUID:
        rows = await self.pool.fetch("SELECT id FROM units WHERE kind = 'company' AND dissolved_on IS NULL LIMIT 2")
        if len(rows) != 1:
            raise InvalidValueException(detail="A person needs a unit: give the enterprise department (a unit's "
                                               "name); without one a person joins the company, and there is "
                                               f"{'none' if not rows else 'more than one'}.")
        return _id(rows[0]["id"])

    async def refuse_taken(self, user_name: str, person_id: UUID | None) -> None:
        """A user name no present person has, user names and the emails that stand for the user
        names of people created over REST alike (the write side's index keeps concurrent claims
        apart)."""
        taken = await self.pool.fetchval(
            "SELECT 1 FROM people WHERE left_on IS NULL AND lower(COALESCE(user_name, email)) = $1 "
            "AND id IS DISTINCT FROM $2", fold(user_name), person_id)
        if taken:
            raise UniquenessException(detail=f"The user name {user_name!r} is taken.")

    # Users.

    async def create_user(self, payload: Any) -> Written:
        user = _validate(ScimUser, payload, Context.RESOURCE_CREATION_REQUEST)
        await self.caught_up()
        enterprise = user[EnterpriseUser]
        department = enterprise.department if enterprise else None
        manager = enterprise.manager.value if enterprise and enterprise.manager else None
        unit_id = await self.unit_named(department) if department else await self.root_unit()
        profile = _profile(user)
        await self.refuse_taken(user.user_name, None)
        return await self.command(self.goals.join_person, **profile, unit_id=unit_id,
                                  manager_id=_ref(manager, "User") if manager else None, joined_on=date.today(),
                                  active=True if user.active is None else user.active)

    async def replace_user(self, user_id: str, payload: Any, if_match: str | None) -> Written:
        desired = _validate(ScimUser, payload, Context.RESOURCE_REPLACEMENT_REQUEST)
        await self.caught_up()
        row = await self.user_row(user_id)
        current = user_of(row, self.at)
        _replace(desired, current)
        return await self._change_user(row, current, desired, if_match)

    async def patch_user(self, user_id: str, payload: Any, if_match: str | None) -> Written:
        patch = _validate(PatchOp[ScimUser], payload, Context.RESOURCE_PATCH_REQUEST)
        await self.caught_up()
        row = await self.user_row(user_id)
        current = user_of(row, self.at)
        desired = current.model_copy(deep=True)
        _apply(patch, desired)
        return await self._change_user(row, current, desired, if_match)

    async def _change_user(self, row: asyncpg.Record, current: Any, desired: Any, if_match: str | None) -> Written:
        """The commands that take the person from `current` to `desired`."""
        expected = _expected_version(if_match)
        profile = None
        if _profile_view(desired) != _profile_view(current):
            profile = _profile(desired, row["email"])
            if fold(profile["user_name"]) != fold(current.user_name):
                await self.refuse_taken(profile["user_name"], _id(row["id"]))
        enterprise = desired[EnterpriseUser]
        department = enterprise.department if enterprise else None
        unit_id = None
        if department and fold(department) != fold(row["unit_name"]):
            unit_id = await self.unit_named(department)
        manager = enterprise.manager.value if enterprise and enterprise.manager else None
        current_manager = str(row["manager_id"]) if row["manager_id"] else None
        manager_id: Any = UNCHANGED
        if manager != current_manager:
            manager_id = _ref(manager, "User") if manager else None
        active = desired.active if desired.active is not None and desired.active != row["active"] else None
        return await self.command(self.goals.update_person, _id(row["id"]), profile=profile, unit_id=unit_id,
                                  manager_id=manager_id, active=active, expected_version=expected)

    async def delete_user(self, user_id: str, if_match: str | None) -> Written:
        await self.caught_up()
        row = await self.user_row(user_id)
        return await self.command(self.goals.person_leaves, _id(row["id"]), left_on=date.today(),
                                  expected_version=_expected_version(if_match))

    # Groups.

    async def create_group(self, payload: Any) -> Written:
        group = _validate(ScimGroup, payload, Context.RESOURCE_CREATION_REQUEST)
        unit = group[TandemUnit]
        parent = unit.parent.value if unit and unit.parent else None
        parent_id = _ref(parent, "Group") if parent else None
        kind = unit.kind if unit and unit.kind else (UnitKind.team if parent_id else UnitKind.company)
        return await self.command(self.goals.create_unit, name=group.display_name, kind=kind, parent_id=parent_id,
                                  external_id=group.external_id, add_members=_member_ids(group.members))

    async def replace_group(self, group_id: str, payload: Any, if_match: str | None) -> Written:
        desired = _validate(ScimGroup, payload, Context.RESOURCE_REPLACEMENT_REQUEST)
        await self.caught_up()
        current = await self.group(group_id)
        _replace(desired, current)
        return await self._change_group(current, desired, if_match, replacing=True)

    async def patch_group(self, group_id: str, payload: Any, if_match: str | None) -> Written:
        patch = _validate(PatchOp[ScimGroup], payload, Context.RESOURCE_PATCH_REQUEST)
        await self.caught_up()
        current = await self.group(group_id)
        desired = current.model_copy(deep=True)
        _apply(patch, desired)
        return await self._change_group(current, desired, if_match, replacing=False)

    async def _change_group(self, current: Any, desired: Any, if_match: str | None, *, replacing: bool) -> Written:
        """The command that takes the unit from `current` to `desired`. In a PUT, a group
        without `members` or without the unit extension's `parent` keeps them (RFC 7644
        §3.5.1 lets a service provider read an omitted attribute as not asserted): a unit
        always has its parent, and its people somewhere to be."""
        expected = _expected_version(if_match)
        changes: dict[str, Any] = {}
        if desired.display_name != current.display_name:
            changes["name"] = desired.display_name
        if desired.external_id != current.external_id:
            changes["external_id"] = desired.external_id
        new_unit, old_unit = desired[TandemUnit], current[TandemUnit]
        new_parent = new_unit.parent.value if new_unit and new_unit.parent else None
        old_parent = old_unit.parent.value if old_unit and old_unit.parent else None
        if new_parent != old_parent and not (replacing and new_parent is None):
            changes["parent_id"] = _ref(new_parent, "Group") if new_parent else None
        if not (replacing and desired.members is None):
            wanted = _member_ids(desired.members)
            present = _member_ids(current.members)
            changes["add_members"] = [m for m in wanted if m not in present]
            changes["remove_members"] = [m for m in present if m not in wanted]
        return await self.command(self.goals.update_unit, UUID(current.id), **changes, expected_version=expected)

    async def delete_group(self, group_id: str, if_match: str | None) -> Written:
        await self.caught_up()
        row = await self.group_row(group_id)
        members = [_id(r["id"]) for r in await self.pool.fetch(
            "SELECT id FROM people WHERE unit_id = $1 AND left_on IS NULL", row["id"])]
        children = [_id(r["id"]) for r in await self.pool.fetch(
            "SELECT id FROM units WHERE parent_id = $1 AND dissolved_on IS NULL", row["id"])]
        return await self.command(self.goals.dissolve_unit, _id(row["id"]), dissolved_on=date.today(),
                                  member_ids=members, child_unit_ids=children,
                                  expected_version=_expected_version(if_match))

    # Dispatch by resource type (the endpoints and /Bulk share it).

    async def create(self, kind: Kind, payload: Any) -> Written:
        return await (self.create_user(payload) if kind is USER else self.create_group(payload))

    async def replace(self, kind: Kind, resource_id: str, payload: Any, if_match: str | None) -> Written:
        if kind is USER:
            return await self.replace_user(resource_id, payload, if_match)
        return await self.replace_group(resource_id, payload, if_match)

    async def patch(self, kind: Kind, resource_id: str, payload: Any, if_match: str | None) -> Written:
        if kind is USER:
            return await self.patch_user(resource_id, payload, if_match)
        return await self.patch_group(resource_id, payload, if_match)

    async def delete(self, kind: Kind, resource_id: str, if_match: str | None) -> Written:
        if kind is USER:
            return await self.delete_user(resource_id, if_match)
        return await self.delete_group(resource_id, if_match)

    async def resource(self, kind: Kind, resource_id: str, parameters: ResponseParameters[Any] | None) -> Any:
        if kind is USER:
            return await self.user(resource_id)
        return await self.group(resource_id, with_members=_shows(parameters, "members"))


def _replace(desired: Any, current: Any) -> None:
    """PUT semantics (RFC 7644 §3.5.1): read-only attributes kept, immutable ones unchanged."""
    try:
        desired.replace(current)
    except ValidationError as e:
        raise scim_exception(e) from e


def _apply(patch: Any, resource: Any) -> None:
    try:
        patch.patch(resource, scim_policy=PROVIDER.policy)
    except (ValidationError, RecursionError) as e:
        raise scim_exception(e) from e


def _profile_view(user: Any) -> Any:
    """What of a User makes up the person's profile (to tell whether a change touches it)."""
    return user.model_dump(include={"user_name", "external_id", "name", "display_name", "emails"})


def _profile(user: Any, current_email: str | None = None) -> dict[str, Any]:
    """The person's profile (`Person.update_profile`) a User describes. The person's email is
    the primary address, else the first work one, else the first; with no address, the one they
    have (a change), else a user name that is one. Their name is the displayName, else name.formatted, else given and family
    names, else the user name."""
    emails = []
    for e in user.emails or []:
        entry = {"value": str(e.value), "type": getattr(e.type, "value", e.type), "primary": e.primary,
                 "display": e.display}
        emails.append({k: v for k, v in entry.items() if v is not None})
    chosen = (next((e for e in emails if e.get("primary")), None)
              or next((e for e in emails if e.get("type") == "work"), None) or (emails[0] if emails else None))
    email = chosen["value"] if chosen else current_email or (user.user_name if "@" in user.user_name else None)
    if email is None:
        raise InvalidValueException(detail="Tandem needs an email address for each person: give emails, or a "
                                           "userName that is one.")
    name = user.name
    given = name.given_name if name else None
    family = name.family_name if name else None
    formatted = name.formatted if name else None
    display = user.display_name or formatted or " ".join(n for n in (given, family) if n) or user.user_name
    return {"name": display, "email": email, "user_name": user.user_name, "external_id": user.external_id,
            "given_name": given, "family_name": family, "formatted_name": formatted, "emails": emails}


def _member_ids(members: Sequence[Any] | None) -> list[UUID]:
    """The people a group's members name: Tandem groups hold people, not groups."""
    out: list[UUID] = []
    for m in members or []:
        if m.type is not None and m.type != "User":
            raise InvalidValueException(detail="A group's members are people (type User); a unit below another "
                                               "names it as its parent in the unit extension.")
        member = _ref(m.value, "User")
        if member not in out:
            out.append(member)
    return out


# Endpoints ----------------------------------------------------------------------------------

def _answer(body: dict[str, Any], status: int = 200, headers: Mapping[str, str] | None = None) -> ScimJSON:
    return ScimJSON(body, status_code=status, headers=dict(headers or {}))


def _dump(resource: Any, context: Context, parameters: ResponseParameters[Any] | None = None) -> dict[str, Any]:
    return resource.model_dump(scim_ctx=context, response_parameters=parameters)


def _kind(resource_type: str) -> Kind:
    kind = KINDS.get(resource_type.lower())
    if kind is None:
        raise NotFoundException(detail=f"No resource type is served at /{resource_type}.")
    return kind


async def _written_answer(s: Scim, kind: Kind, written: Written, status: int, created: bool = False) -> ScimJSON:
    """A write's answer: the resource as the read model now shows it."""
    await s.caught_up(written.position)
    parameters = _response_parameters(s.request, kind.model)
    resource = await s.resource(kind, str(written.id), parameters)
    headers = {"ETag": resource.meta.version, "Tandem-Position": f"{LOG}={written.position}"}
    if created:
        headers["Location"] = resource.meta.location
    context = Context.RESOURCE_CREATION_RESPONSE if created else Context.RESOURCE_REPLACEMENT_RESPONSE
    return _answer(_dump(resource, context, parameters), status, headers)


def _discovery(resource: Any, location: str) -> dict[str, Any]:
    return resource.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE) | {"meta": {
        "resourceType": type(resource).__name__, "location": location}}


@router.get("/ServiceProviderConfig")
async def service_provider_config(request: Request, _: HrSync) -> ScimJSON:
    at = Locations(str(request.base_url))
    body = SERVICE_PROVIDER_CONFIG.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
    body["meta"] = {"resourceType": "ServiceProviderConfig", "location": f"{at.base}/ServiceProviderConfig"}
    return _answer(body)


def _listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schemas": [str(ListResponse.__schema__)], "totalResults": len(items), "startIndex": 1,
            "itemsPerPage": len(items), "Resources": items}


@router.get("/ResourceTypes")
async def resource_types(request: Request, _: HrSync) -> ScimJSON:
    at = Locations(str(request.base_url))
    return _answer(_listing([_discovery(t, f"{at.base}/ResourceTypes/{t.id}") for t in PROVIDER.resource_types]))


@router.get("/ResourceTypes/{name}")
async def resource_type(name: str, request: Request, _: HrSync) -> ScimJSON:
    at = Locations(str(request.base_url))
    for t in PROVIDER.resource_types:
        if str(t.id) == name:
            return _answer(_discovery(t, f"{at.base}/ResourceTypes/{t.id}"))
    raise NotFoundException(detail=f"No resource type {name}.")


@router.get("/Schemas")
async def schemas(request: Request, _: HrSync) -> ScimJSON:
    at = Locations(str(request.base_url))
    return _answer(_listing([_discovery(s, f"{at.base}/Schemas/{s.id}") for s in PROVIDER.schemas]))


@router.get("/Schemas/{schema_id}")
async def schema(schema_id: str, request: Request, _: HrSync) -> ScimJSON:
    at = Locations(str(request.base_url))
    for s in PROVIDER.schemas:
        if str(s.id) == schema_id:
            return _answer(_discovery(s, f"{at.base}/Schemas/{s.id}"))
    raise NotFoundException(detail=f"No schema {schema_id}.")


def _search(model: Any, values: Any) -> SearchRequest[Any]:
    if not isinstance(values, dict):
        raise InvalidSyntaxException(detail="A search is a JSON object (a SearchRequest).")
    text = values.get("filter")
    if isinstance(text, str) and len(text) > MAX_FILTER_LENGTH:
        raise InvalidFilterException(detail=f"Filters are limited to {MAX_FILTER_LENGTH} characters.")
    try:
        return SearchRequest[model].model_validate(values, scim_ctx=Context.SEARCH_REQUEST, scim_provider=PROVIDER)
    except (ValidationError, RecursionError) as e:
        raise scim_exception(e) from e


async def _list(s: Scim, tables: Sequence[Table], model: Any, search: SearchRequest[Any]) -> ScimJSON:
    try:
        page = await search_page(s.pool, tables, search)
    except RecursionError as e:
        raise InvalidFilterException(detail="The filter is nested too deeply.") from e
    resources = await s.resources(page.keys, search)
    listing = ListResponse[model](total_results=page.total, start_index=page.start_index,
                                  items_per_page=len(resources), resources=resources)
    return _answer(listing.model_dump(scim_ctx=Context.SEARCH_RESPONSE, response_parameters=search))


QUERY_PARAMETERS = ("filter", "startIndex", "count", "sortBy", "sortOrder", "attributes", "excludedAttributes")


@router.get("/{resource_type}")
async def list_resources(resource_type: str, request: Request, principal: HrSync, _: ReadYourWrites) -> ScimJSON:
    kind = _kind(resource_type)
    values = {name: ",".join(request.query_params.getlist(name)) for name in QUERY_PARAMETERS
              if name in request.query_params}
    return await _list(Scim(request, principal), [kind.table], kind.model, _search(kind.model, values))


@router.post("/.search")
async def search_everything(request: Request, principal: HrSync, _: ReadYourWrites) -> ScimJSON:
    """A search over Users and Groups together (RFC 7644 §3.4.3)."""
    model = ScimUser | ScimGroup
    search = _search(model, await _body(request))
    return await _list(Scim(request, principal), [USERS, GROUPS], model, search)


@router.post("/{resource_type}/.search")
async def search_resources(resource_type: str, request: Request, principal: HrSync, _: ReadYourWrites) -> ScimJSON:
    kind = _kind(resource_type)
    return await _list(Scim(request, principal), [kind.table], kind.model, _search(kind.model, await _body(request)))


@router.post("/{resource_type}")
async def create(resource_type: str, request: Request, principal: HrSync) -> ScimJSON:
    kind = _kind(resource_type)
    s = Scim(request, principal)
    written = await s.create(kind, await _body(request))
    return await _written_answer(s, kind, written, 201, created=True)


@router.get("/{resource_type}/{resource_id}")
async def read(resource_type: str, resource_id: str, request: Request, principal: HrSync,
               _: ReadYourWrites) -> Response:
    kind = _kind(resource_type)
    parameters = _response_parameters(request, kind.model)
    resource = await Scim(request, principal).resource(kind, resource_id, parameters)
    version = resource.meta.version
    if request.headers.get("if-none-match", "").strip() in (version, version.removeprefix("W/")):
        return Response(status_code=304, headers={"ETag": version})
    return _answer(_dump(resource, Context.RESOURCE_QUERY_RESPONSE, parameters), headers={"ETag": version})


@router.put("/{resource_type}/{resource_id}")
async def replace(resource_type: str, resource_id: str, request: Request, principal: HrSync) -> ScimJSON:
    kind = _kind(resource_type)
    s = Scim(request, principal)
    written = await s.replace(kind, resource_id, await _body(request), request.headers.get("if-match"))
    return await _written_answer(s, kind, written, 200)


@router.patch("/{resource_type}/{resource_id}")
async def patch(resource_type: str, resource_id: str, request: Request, principal: HrSync) -> ScimJSON:
    kind = _kind(resource_type)
    s = Scim(request, principal)
    written = await s.patch(kind, resource_id, await _body(request), request.headers.get("if-match"))
    return await _written_answer(s, kind, written, 200)


@router.delete("/{resource_type}/{resource_id}")
async def delete(resource_type: str, resource_id: str, request: Request, principal: HrSync) -> Response:
    kind = _kind(resource_type)
    s = Scim(request, principal)
    written = await s.delete(kind, resource_id, request.headers.get("if-match"))
    await s.caught_up(written.position)  # gone from every read that follows
    response = Response(status_code=204)
    set_position(response, LOG, written.position)
    return response
