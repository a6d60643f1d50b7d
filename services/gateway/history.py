"""GraphQL `history` on objectives, key results, KPIs, people and units: the aggregate's events,
as the owning service's `GET /v1/.../{id}/history` answers them (services.common.history).

The gateway's read model keeps no history; each `history` field asked for is one request to
the service (it is an auditor's query, not a hot path), forwarded as mutations are
(`services.gateway.mutations.forward_read`): with the caller's token, so the service decides
who may read it, and a refusal is the same GraphQL error with the problem in `extensions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from services.common.schemas import decode_cursor, encode_cursor
from services.gateway.mutations import MutationError, forward_read

if TYPE_CHECKING:
    from services.gateway.api import PageInfo

MAX_PAGE = 100
DEFAULT_PAGE = 20
CURSOR_KIND = "history"
DESCRIPTION = ("Every event recorded about it, oldest first, a page at a time (first: 1-100): who, when (recorded "
               "and valid time), why, within which request and trace, and what changed. Fetched from the service "
               "that owns it, with the caller's token (roles that may not read histories get FORBIDDEN).")


@strawberry.type(description="A value of the aggregate's state that an event changed.")
class HistoryChange:
    field: str = strawberry.field(description="A path into the state: `title`, `targets[1]`, `series.items[3]`.")
    from_: JSON | None = strawberry.field(name="from", description="The value before the event (null: none).")
    to: JSON | None = strawberry.field(description="The value after the event (null: none).")


@strawberry.type(description="One event of an aggregate's history.")
class HistoryEntry:
    type: str = strawberry.field(description="The event type, as the event contracts name it.")
    version: int = strawberry.field(description="The aggregate's version this event made.")
    recorded_at: str = strawberry.field(description="When it was recorded (recorded time), ISO 8601.")
    valid_at: str | None = strawberry.field(
        description="The day (YYYY-MM-DD) or moment (ISO 8601) its value applies to: a check-in's day, a "
                    "measurement's time, an effective day; null for an event without one.")
    actor: str | None = strawberry.field(description="Who recorded it: the token's subject, or the process.")
    reason: str | None = strawberry.field(description="Why, where the event says (a regrade, a target change, ...).")
    correlation_id: str | None
    causation_id: str | None
    trace_id: str | None
    data: JSON = strawberry.field(description="The event's own fields, by the event contract's names.")
    changes: list[HistoryChange]


@strawberry.type
class HistoryEdge:
    cursor: str
    node: HistoryEntry


@strawberry.type(description="A page of an aggregate's history, oldest first.")
class HistoryConnection:
    edges: list[HistoryEdge]
    page_info: Annotated[PageInfo, strawberry.lazy("services.gateway.api")]


def _bad(message: str) -> MutationError:
    return MutationError(message, code="BAD_USER_INPUT")


def _after_version(after: str | None, node: UUID) -> int | None:
    if after is None:
        return None
    try:
        kind, node_id, version = decode_cursor(after, 3)
    except Exception:  # noqa: BLE001 - any undecodable cursor is the client's mistake
        raise _bad("after is not a cursor this API gave out") from None
    if kind != CURSOR_KIND or node_id != str(node) or not version.isdigit() or len(version) > 18:
        raise _bad("after is not a cursor of this history")
    return int(version)


def _entry(item: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        type=item["type"], version=item["version"], recorded_at=item["recordedAt"], valid_at=item["validAt"],
        actor=item["actor"], reason=item["reason"], correlation_id=item["correlationId"],
        causation_id=item["causationId"], trace_id=item["traceId"], data=item["data"],
        changes=[HistoryChange(field=c["field"], from_=c["from"], to=c["to"]) for c in item["changes"]])


async def history(info: Info, service: str, resource: str, node: UUID, first: int,
                  after: str | None) -> HistoryConnection:
    """A page of the node's history from `GET /v1/{resource}/{node}/history` on the service."""
    if not 1 <= first <= MAX_PAGE:
        raise _bad(f"first must be from 1 to {MAX_PAGE}")
    params: dict[str, Any] = {"limit": first}
    version = _after_version(after, node)
    if version is not None:
        params["after"] = encode_cursor(version)
    page = await forward_read(info, service, f"/v1/{resource}/{node}/history", params)
    edges = [HistoryEdge(cursor=encode_cursor(CURSOR_KIND, node, item["version"]), node=_entry(item))
             for item in page["items"]]
    from services.gateway.api import PageInfo

    return HistoryConnection(edges=edges, page_info=PageInfo(
        has_next_page=page["nextCursor"] is not None, end_cursor=edges[-1].cursor if edges else None))
