"""Routes every service with an event log has, for auditors: `GET /v1/audit/chain` checks the
service's log against its hash chain (`services.common.hashchain`). `create_service_app`
includes them for each service with a write side."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from services.common.auth import Principal, Role, require
from services.common.hashchain import verify_chain
from services.common.problems import ProblemDetail
from services.common.schemas import ApiModel

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDetail, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {401: "Missing or invalid bearer token", 403: "The token's role may not do this"}.items()
}

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=_PROBLEMS)

Auditor = Annotated[Principal, Depends(require(Role.admin, Role.auditor))]


class ChainProblemOut(ApiModel):
    kind: Literal["altered", "deleted", "reordered", "unchained", "broken"] = Field(
        description="altered: the event's content is not what was chained; deleted: the event at "
                    "`position` is gone; reordered: the event at `position` was chained at another "
                    "position; unchained: the event was written without a chain row (behind the "
                    "service's back); broken: the chain rows themselves do not link.")
    position: int = Field(description="The log position (notification id) of the first problem.")
    detail: str


class ChainReportOut(ApiModel):
    log: str
    ok: bool
    records: int = Field(description="Records checked and found intact, up to the first problem.")
    head_position: int | None = Field(description="The last intact record's position (the log's head when ok).")
    head_hash: str | None = Field(description="Its chain hash (hex): keep it outside the database and "
                                              "compare it later, since whoever can write the tables can "
                                              "recompute the whole chain.")
    problem: ChainProblemOut | None = Field(description="The first problem found, or null.")


@router.get("/chain", summary="Check the service's event log against its hash chain")
async def audit_chain(request: Request, principal: Auditor) -> ChainReportOut:
    """Walks the whole log in order and reports the first altered, deleted, reordered or
    unchained record. A read: it takes a consistent snapshot and writes nothing."""
    recorder = request.app.state.application.recorder
    settings = request.app.state.settings
    report = await asyncio.to_thread(verify_chain, settings.database_url, recorder.datastore.schema,
                                     recorder.events_table_name, log=settings.schema_name)
    return ChainReportOut.model_validate(report.as_dict())
