"""SCIM /Bulk (RFC 7644 §3.7) for services.goals.scim: a job of operations on Users and
Groups, each run as its own request would run, with `bulkId` references between them.

Operations that cannot see each other's effects run together (a wave, `_waves`): new Users with
distinct user names, or new Groups moving distinct people, whose bulkId references are all
resolved already. They run concurrently, so their saves reach the log's writer together and are
committed in a few transactions (`services.common.groupcommit`: one INSERT for the batch, and a
save that fails there fails alone), instead of one transaction and one wait for the read model
per operation. Everything else runs alone, in order, as before; the answer for each operation is
the one it would get run alone in its turn."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from scim2_models import (
    BulkOperation,
    BulkRequest,
    BulkResponse,
    ConflictException,
    Context,
    Error,
    InvalidValueException,
    PayloadTooLargeException,
    SCIMException,
)

from services.common import database
from services.common.auth import Principal
from services.goals.scim import (
    BEFORE_COMMAND,
    BULK_ID,
    LOG,
    HrSync,
    Scim,
    ScimJSON,
    _answer,
    _body,
    _fill_manager_ref,
    _kind,
    scim_exception,
)
from services.goals.scim_query import fold
from services.goals.scim_resources import MAX_OPERATIONS, PROVIDER, SCIM_PREFIX, ScimGroup, ScimUser, weak_etag

WAVE = 64
"""At most this many operations run together (the log writer's batch, `TANDEM_GROUP_COMMIT_MAX_BATCH`)."""

router = APIRouter(prefix=SCIM_PREFIX, include_in_schema=False)


@router.post("/Bulk")
async def bulk_endpoint(request: Request, principal: HrSync) -> ScimJSON:
    return await bulk(request, principal)


def _references(value: Any) -> set[str]:
    """The bulkIds a payload refers to ("bulkId:<id>" anywhere in it)."""
    if isinstance(value, str):
        match = BULK_ID.match(value)
        return {match.group(1)} if match else set()
    if isinstance(value, dict):
        return set().union(*(_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


def _resolve(value: Any, created: Mapping[str, str]) -> Any:
    """The payload with each "bulkId:<id>" replaced by the id of the resource it created."""
    if isinstance(value, str):
        match = BULK_ID.match(value)
        return created.get(match.group(1), value) if match else value
    if isinstance(value, dict):
        return {k: _resolve(v, created) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, created) for v in value]
    return value


def _raw(payload: Any, name: str) -> Any:
    """An attribute of a raw payload, whose names are case-insensitive."""
    if not isinstance(payload, dict):
        return None
    return next((v for k, v in payload.items() if k.lower() == name.lower()), None)


@dataclass
class BulkStep:
    index: int
    method: str | None
    bulk_id: str | None
    path: str | None
    version: str | None
    data: Any
    refs: set[str]
    failed: Error | None = None


async def bulk(request: Request, principal: Principal) -> ScimJSON:
    """POST /Bulk (RFC 7644 §3.7): each operation runs as its own request would, in its own
    transaction. An operation may name a resource another one creates ("bulkId:<id>", in its
    data or its path) whatever their order: it runs once that one has; references that go
    round in a circle fail with 409, as does one to an operation that failed. Operations run
    in their order, but one that another refers to runs before the one that refers to it.
    After `failOnErrors` errors the rest is not run, and the answer lists what was, in the
    order of the request."""
    payload = await _body(request)
    operations = _raw(payload, "Operations")
    if isinstance(operations, list) and len(operations) > MAX_OPERATIONS:
        raise PayloadTooLargeException(detail=f"A bulk request holds at most {MAX_OPERATIONS} operations.")
    for operation in operations if isinstance(operations, list) else ():
        _fill_manager_ref(_raw(operation, "data"))
    try:
        envelope = BulkRequest[ScimUser | ScimGroup].model_validate(
            payload, scim_ctx=Context.BULK_REQUEST, scim_provider=PROVIDER)
    except (ValidationError, RecursionError) as e:
        raise scim_exception(e) from e
    if not operations or envelope.operations is None:
        raise InvalidValueException(detail="A bulk request holds one or more Operations.")

    steps: list[BulkStep] = []
    seen: set[str] = set()
    for i, (raw, checked) in enumerate(zip(operations, envelope.operations, strict=True)):
        method = _raw(raw, "method")
        step = BulkStep(i, method if isinstance(method, str) else None, _raw(raw, "bulkId"), _raw(raw, "path"),
                        _raw(raw, "version"), _raw(raw, "data"), _references(_raw(raw, "data")) |
                        _references(str(_raw(raw, "path") or "").rsplit("/", 1)[-1]))
        if checked.status is not None and checked.status >= 400:
            step.failed = checked.response if isinstance(checked.response, Error) else Error(status=checked.status)
        elif step.bulk_id is not None and (not isinstance(step.bulk_id, str) or step.bulk_id in seen):
            step.failed = InvalidValueException(detail="Each bulkId names one operation.").to_error()
        if isinstance(step.bulk_id, str):
            seen.add(step.bulk_id)
        steps.append(step)

    s = Scim(request, principal)
    creators = {st.bulk_id: st for st in reversed(steps) if isinstance(st.bulk_id, str) and st.method == "POST"}
    created: dict[str, str] = {}
    results: dict[int, BulkOperation[Any]] = {}

    def stopped() -> bool:
        errors = sum(1 for r in results.values() if r.status is not None and r.status >= 400)
        return envelope.fail_on_errors is not None and errors >= envelope.fail_on_errors

    async def run(step: BulkStep, waiting: frozenset[int]) -> None:
        """Run the operations a step refers to first (in their order), then the step."""
        if step.index in results or stopped():
            return
        for ref in sorted(step.refs) if step.failed is None else ():
            creator = creators.get(ref)
            if ref not in created and creator is not None and creator.index not in waiting:
                await run(creator, waiting | {step.index})
                if stopped():
                    return
            if ref not in created:
                step.failed = (InvalidValueException(detail=f"No operation creates bulkId {ref}.") if creator is None
                               else ConflictException(detail=f"bulkId {ref}: the references go round in a circle.")
                               if creator.index in waiting or creator.index == step.index
                               else ConflictException(detail=f"bulkId {ref} names an operation that failed.")
                               ).to_error()
                break
        results[step.index] = await _bulk_step(s, step, created)

    def errors() -> int:
        return sum(1 for r in results.values() if r.status is not None and r.status >= 400)

    i = 0
    while i < len(steps) and not stopped():
        budget = None if envelope.fail_on_errors is None else envelope.fail_on_errors - errors()
        wave, i_next = _wave(steps, i, results, created, budget)
        if len(wave) < 2:
            await run(steps[i], frozenset())
            i += 1
            continue
        gate = _Gate(len(wave))
        for step, outcome in zip(wave, await asyncio.gather(*(gate.run(_bulk_step(s, st, created)) for st in wave)),
                                 strict=True):
            results[step.index] = outcome
        i = i_next
    answer = BulkResponse[ScimUser | ScimGroup](operations=[results[i] for i in sorted(results)])
    position = await database.log_head(s.pool, s.tracked.events_table)
    await s.caught_up(position)  # every read that follows sees the whole job
    return _answer(answer.model_dump(scim_ctx=Context.BULK_RESPONSE), headers={"Tandem-Position": f"{LOG}={position}"})


class _Gate:
    """Holds the operations of a wave at their commands (`BEFORE_COMMAND`) until every one of
    them has reached its command or ended without one (a refusal), then lets them all go: the
    commands run at once in the thread pool, and their saves queue for the log's writer
    together."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.open = asyncio.Event()

    def _one_less(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.open.set()

    async def _arrive(self) -> None:
        self._one_less()
        await self.open.wait()

    async def run(self, operation: Awaitable[BulkOperation[Any]]) -> BulkOperation[Any]:
        arrived = False

        async def before() -> None:
            nonlocal arrived
            if not arrived:
                arrived = True
                await self._arrive()

        token = BEFORE_COMMAND.set(before)
        try:
            return await operation
        finally:
            BEFORE_COMMAND.reset(token)
            if not arrived:
                self._one_less()


def _batchable(step: BulkStep, created: Mapping[str, str]) -> tuple[str, set[tuple[str, str]]] | None:
    """("Users" or "Groups", what it claims) for an operation that may run in a wave: a POST of
    a User (claiming its folded user name) or a Group (claiming the people it moves in), every
    bulkId it names created already. None for anything else: it runs alone, in its turn."""
    if step.failed is not None or (step.method or "").upper() != "POST" or not isinstance(step.data, dict):
        return None
    parts = str(step.path or "").strip("/").split("/")
    if len(parts) != 1 or parts[0] not in ("Users", "Groups") or not all(ref in created for ref in step.refs):
        return None
    if parts[0] == "Users":
        user_name = _raw(step.data, "userName")
        return ("Users", {("user", fold(user_name))}) if isinstance(user_name, str) else None
    members = _raw(step.data, "members")
    if members is not None and not isinstance(members, list):
        return None
    claims: set[tuple[str, str]] = set()
    for member in members or ():
        value = _resolve(_raw(member, "value"), created)
        if not isinstance(value, str):
            return None
        claims.add(("person", value.lower()))
    return "Groups", claims


def _wave(steps: list[BulkStep], start: int, results: Mapping[int, Any], created: Mapping[str, str],
          budget: int | None) -> tuple[list[BulkStep], int]:
    """The operations from `start` on that run together, and where the next wave starts.

    Run together, none may see what another does: all new Users or all new Groups (a User's
    department is looked up among the units, which new Groups change), no two claiming the
    same user name or person, each bulkId they name created already. With `failOnErrors`, at
    most as many as the errors still allowed (`budget`): had they run one by one, every one of
    them would have run even if all failed, so the job stops where it would have."""
    wave: list[BulkStep] = []
    kind: str | None = None
    claimed: set[tuple[str, str]] = set()
    i = start
    while i < len(steps) and len(wave) < WAVE and (budget is None or len(wave) < budget):
        step = steps[i]
        if step.index in results:  # pulled forward by an earlier operation that named it
            i += 1
            continue
        batchable = _batchable(step, created)
        if batchable is None or (kind is not None and batchable[0] != kind) or batchable[1] & claimed:
            break
        kind = batchable[0]
        claimed |= batchable[1]
        wave.append(step)
        i += 1
    return wave, i


def _bulk_failure(step: BulkStep) -> BulkOperation[Any]:
    error = step.failed or Error(status=400)
    method = step.method.upper() if step.method and step.method.upper() in {"POST", "PUT", "PATCH", "DELETE"} else None
    return BulkOperation[ScimUser](method=method, bulk_id=step.bulk_id if isinstance(step.bulk_id, str) else None,
                                   location=None, status=error.status or 400, response=error)


async def _bulk_step(s: Scim, step: BulkStep, created: dict[str, str]) -> BulkOperation[Any]:
    """Run one operation as its own request would run."""
    if step.failed is not None:
        return _bulk_failure(step)
    method = (step.method or "").upper()
    parts = str(step.path or "").strip("/").split("/")
    try:
        kind = _kind(parts[0])
        resource_id = _resolve(parts[1], created) if len(parts) == 2 else None
        data = _resolve(step.data, created)
        if method == "POST" and resource_id is None:
            written, status = await s.create(kind, data), 201
        elif method == "PUT" and resource_id:
            written, status = await s.replace(kind, resource_id, data, step.version), 200
        elif method == "PATCH" and resource_id:
            written, status = await s.patch(kind, resource_id, data, step.version), 200
        elif method == "DELETE" and resource_id:
            written, status = await s.delete(kind, resource_id, step.version), 204
        else:
            raise InvalidValueException(detail=f"{method} {step.path}: POST goes to /Users or /Groups, PUT, PATCH "
                                               "and DELETE to one resource.")
    except SCIMException as e:
        step.failed = e.to_error()
        failure = _bulk_failure(step)
        if method != "POST" and len(parts) == 2:
            failure.location = f"{s.at.base}/{parts[0]}/{parts[1]}"
        return failure
    if method == "POST" and isinstance(step.bulk_id, str):
        created[step.bulk_id] = str(written.id)
    resource_version = None if method == "DELETE" else weak_etag(written.version)
    return BulkOperation[kind.model](method=method, bulk_id=step.bulk_id if isinstance(step.bulk_id, str) else None,
                                     version=resource_version, location=s.at.of(kind.name, written.id), status=status)

