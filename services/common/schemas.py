"""Pydantic building blocks shared by the REST contracts: camelCase JSON, pagination, the
answer to a write."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID

from fastapi import Query
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic.alias_generators import to_camel

from services.common.problems import Problem

T = TypeVar("T")


class ApiModel(BaseModel):
    """JSON in camelCase; unknown fields are refused so that typos do not pass silently."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              serialize_by_alias=True)

    @classmethod
    def from_row(cls, row: Any, **overrides: Any) -> Any:
        """Build from a database row, taking the fields this model has."""
        values = {k: row[k] for k in cls.model_fields if k in row.keys() and k not in overrides}
        return cls(**values, **overrides)


class WriteResult(ApiModel):
    id: UUID
    version: int = Field(description="The aggregate's version after the write; its ETag.")
    position: int = Field(description="Log position of the write's last event, for Tandem-Wait-For.")


class Page(ApiModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as `after` for the next page.")


def _moment(value: Any) -> Any:
    """A moment is an ISO 8601 date and time (its time zone is checked by AwareDatetime)."""
    if isinstance(value, date) or (
            isinstance(value, str) and re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}", value)):
        return value
    raise ValueError("expected an ISO 8601 date and time with a time zone")


def _calendar_day(value: Any) -> Any:
    """Lax parsing reads "0" as 1970-01-01 and a datetime as its day: a day is YYYY-MM-DD."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        raise ValueError("expected a day as YYYY-MM-DD")
    return value


# Input types that take JSON at its word: a number is a JSON number (not "5", not true), a day
# is YYYY-MM-DD and a moment an ISO 8601 string with its time zone (not the number 0, which lax
# parsing reads as 1970). Text never holds NUL, which PostgreSQL cannot store: one such event
# would stop every projection that follows the log.
NO_NUL = r"^[^\x00]*$"
Number = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-1e12, le=1e12)]
Weight = Annotated[float, Strict(), Field(gt=0, le=1e6)]
WholeNumber = Annotated[int, Strict()]
IsoDate = Annotated[date, BeforeValidator(_calendar_day)]
IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_moment)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_NUL)]
Text = Annotated[str, Field(max_length=5000, pattern=NO_NUL)]
Label = Annotated[str, Field(max_length=50, pattern=NO_NUL)]
# A list's `after` parameter: the opaque cursor a previous page gave as `nextCursor`.
Cursor = Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,400}$", description="`nextCursor` of the previous page.")]


def decode_keyset(after: str | None) -> tuple[datetime | None, UUID | None]:
    """The (created_at, id) a list's `after` cursor names; lists page on that pair so that a
    page boundary never skips or repeats a row, whatever was created meanwhile."""
    if not after:
        return None, None
    created_at, last_id = decode_cursor(after, 2)
    try:
        return datetime.fromisoformat(created_at), UUID(last_id)
    except ValueError as e:
        raise Problem(422, "Invalid request", "The cursor is not one this service gave out.",
                      kind="bad-cursor") from e


def keyset_next(rows: Sequence[Any], limit: int) -> tuple[Sequence[Any], str | None]:
    """Split `limit + 1` fetched rows into the page and the cursor of the next (None: last page)."""
    page = rows[:limit]
    if len(rows) <= limit:
        return page, None
    return page, encode_cursor(page[-1]["created_at"].isoformat(), page[-1]["id"])


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([str(v) for v in values]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != arity or not all(isinstance(v, str) for v in values):
            raise ValueError
        return values
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(422, "Invalid request", "The cursor is not one this service gave out.",
                      kind="bad-cursor") from e
