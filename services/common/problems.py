"""RFC 9457 problem details for every REST error.

Handlers here turn validation errors, the write side's concurrency errors and the domain's
rule violations into `application/problem+json` answers with a 4xx, the database being out of
reach into a 503 with Retry-After, and anything unexpected into a 500 that says nothing about
the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import psycopg
from eventsourcing import persistence
from eventsourcing.application import AggregateNotFoundError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.eventstore import ConcurrentWrite, VersionMismatch

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "https://tandem.dev/problems/"


class ProblemDetail(BaseModel):
    """RFC 9457 problem details, as documented in the OpenAPI contracts."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Problem(Exception):
    """An error a handler wants to answer with a given status and explanation."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ):
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind
        self.headers = headers or {}
        self.extensions = extensions


RETRY_AFTER_SECONDS = 2

_UNREACHABLE = (
    ConnectionError, TimeoutError,  # refused, reset, timed out
    asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
    psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout,
    persistence.OperationalError, persistence.InterfaceError,
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether an error (or what caused it) is the database being down or restarting rather
    than a bug: the request changed nothing, and the client may retry (503, Retry-After). A
    write that was committed before the connection broke is not lost: its retry finds it (the
    Idempotency-Key, or the aggregate's version)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


ErrorRenderer = Callable[..., JSONResponse]


def render_errors_under(app: FastAPI, prefix: str, renderer: ErrorRenderer) -> None:
    """Let a protocol mounted under `prefix` answer its errors in its own shape (SCIM's error
    messages under /scim/v2): every handler here then calls `renderer(request, status, title,
    detail, kind=..., headers=...)` for a path under `prefix` instead of writing problem details."""
    renderers: dict[str, ErrorRenderer] = getattr(app.state, "error_renderers", {})
    app.state.error_renderers = {**renderers, prefix.rstrip("/"): renderer}


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str | None = None,
    *,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    path = request.url.path
    for prefix, render in getattr(request.app.state, "error_renderers", {}).items():
        if path == prefix or path.startswith(prefix + "/"):
            return render(request, status, title, detail, kind=kind, headers=headers)
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + kind if kind else "about:blank",
        "title": title,
        "status": status,
        "instance": request.url.path,
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in extensions.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append(
            {
                "field": ".".join(p for p in loc if p not in ("body", "query", "path", "header")) or ".".join(loc),
                "in": loc[0] if loc else "body",
                "message": e.get("msg", "invalid"),
                "type": e.get("type", "invalid"),
            }
        )
    return out


# Standard reason phrases for the statuses Starlette raises itself (404 on unknown paths,
# 405 on a wrong method, 400 on a malformed request).
_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict",
           412: "Precondition Failed", 415: "Unsupported Media Type", 422: "Unprocessable Content",
           428: "Precondition Required", 503: "Service Unavailable"}


def _leaf_routes(routes: Sequence[Any]) -> Any:
    """The routes an app serves: FastAPI keeps an included router's routes behind it."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _leaf_routes(candidates())
        else:
            yield route


def _allowed_methods(request: Request) -> list[str]:
    """Every method the path supports: Starlette names only the first route that matched."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_problem_handlers(app: FastAPI, domain_errors: tuple[type[Exception], ...] = ()) -> None:
    """Answer every error on `app` with problem details.

    `domain_errors` are the service's own rule violations (ValueError subclasses in its domain
    module): the request was well-formed but breaks a rule of the domain, so 422.
    """

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, kind=exc.kind,
                                headers=exc.headers, **exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return problem_response(request, 400, "Bad Request", "The request body is not valid JSON.",
                                    kind="malformed-json")
        errors = _field_errors(exc.errors())
        fields = ", ".join(sorted({e["field"] for e in errors}))
        return problem_response(request, 422, "Invalid request", f"Invalid value for: {fields}",
                                kind="validation", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _TITLES.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(request, exc.status_code, title, detail, headers=headers)

    @app.exception_handler(AggregateNotFoundError)
    async def _not_found(request: Request, exc: AggregateNotFoundError) -> JSONResponse:
        return problem_response(request, 404, "Not Found", "No such resource.", kind="not-found")

    @app.exception_handler(VersionMismatch)
    async def _stale(request: Request, exc: VersionMismatch) -> JSONResponse:
        return problem_response(request, 412, "Precondition Failed", str(exc), kind="stale-version",
                                currentVersion=exc.actual)

    @app.exception_handler(ConcurrentWrite)
    async def _conflict(request: Request, exc: ConcurrentWrite) -> JSONResponse:
        return problem_response(request, 409, "Conflict",
                                "The resource kept changing while this request was applied; retry.",
                                kind="conflict")

    for error_class in domain_errors:

        @app.exception_handler(error_class)
        async def _domain(request: Request, exc: Exception) -> JSONResponse:
            return problem_response(request, 422, "Rule violated", str(exc), kind="domain-rule")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if database_unreachable(exc):
            log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc)
            return problem_response(request, 503, "Service Unavailable",
                                    "The database cannot be reached just now; nothing was changed. Retry shortly.",
                                    kind="database-unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "Internal Server Error",
                                "The error was logged; the request may be retried.")

    # The database out of reach is answered where every handled error is (Starlette's
    # ExceptionMiddleware). The catch-all above runs in ServerErrorMiddleware, which raises the
    # error again after answering: uvicorn then logs a traceback and closes the connection, and a
    # client that reuses it for its retry gets a reset instead of an answer.
    for error_class in _UNREACHABLE:
        app.add_exception_handler(error_class, _unexpected)
