"""SCIM /Bulk (RFC 7644 §3.7) for services.goals.scim: a job of operations on Users and
Groups, each run as its own request would run, with `bulkId` references between them."""

from __future__ import annotations

from collections.abc import Mapping
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
from services.goals.scim_resources import MAX_OPERATIONS, PROVIDER, SCIM_PREFIX, ScimGroup, ScimUser, weak_etag

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

    for step in steps:
        await run(step, frozenset())
    answer = BulkResponse[ScimUser | ScimGroup](operations=[results[i] for i in sorted(results)])
    position = await database.log_head(s.pool, s.tracked.events_table)
    await s.caught_up(position)  # every read that follows sees the whole job
    return _answer(answer.model_dump(scim_ctx=Context.BULK_RESPONSE), headers={"Tandem-Position": f"{LOG}={position}"})


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

