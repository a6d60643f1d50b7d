"""GraphQL mutations: the writes front-ends need, each forwarded to the REST endpoint of the
service that owns the data (goals or metrics) over HTTP.

The gateway decides nothing about a write. It forwards the caller's `Authorization` header
unchanged (the service authorises, so the gateway never widens access), the idempotency key and
expected version the caller gave (as `Idempotency-Key` and `If-Match`), the caller's correlation
id, and the W3C trace context of the current span, so one trace runs from the gateway through
the service into the stored event's metadata. A service's problem details come back as a
GraphQL error with the problem in `extensions`; a service that cannot be asked is an error that
says so without naming where it lives.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Annotated, Any
from uuid import UUID

import httpx
import strawberry
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic.alias_generators import to_camel
from starlette.requests import HTTPConnection
from strawberry.types import Info

from services.common.eventstore import new_correlation_id
from services.common.web import CORRELATION_HEADER, POSITION_HEADER, etag, format_position
from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# As the services' `Idempotency-Key` header takes it: checked here, because anything else could
# not even be sent as a header.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")

# GraphQL error codes for the statuses a service answers with.
ERROR_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 412: "PRECONDITION_FAILED",
               415: "UNSUPPORTED_MEDIA_TYPE", 422: "UNPROCESSABLE", 428: "PRECONDITION_REQUIRED",
               429: "TOO_MANY_REQUESTS", 500: "INTERNAL_SERVER_ERROR", 502: "BAD_GATEWAY",
               503: "SERVICE_UNAVAILABLE", 504: "GATEWAY_TIMEOUT"}


def error_code(status: int) -> str:
    return ERROR_CODES.get(status) or ("BAD_REQUEST" if status < 500 else "INTERNAL_SERVER_ERROR")


class MutationError(Exception):
    """A failed mutation whose message and `extensions` are meant for the client (the schema's
    error masking lets it through): the service's problem details, or why it was not asked."""

    def __init__(self, message: str, **extensions: Any):
        super().__init__(message)
        self.extensions = extensions


@strawberry.type(description="What a write answers.")
class WritePayload:
    id: strawberry.ID = strawberry.field(description="The resource written (for a check-in, its key result).")
    version: int = strawberry.field(
        description="The aggregate's version after the write: pass it as `expectedVersion` to the next write.")
    position: str = strawberry.field(
        description="The write's log position, e.g. `goals=42`: send it as the `Tandem-Wait-For` header with "
                    "the next query to read this write.")
    replayed: bool = strawberry.field(
        description="True when the idempotencyKey was used before: nothing new was written, and this is "
                    "the first answer again.")


class Forwarder:
    """The app's one HTTP client to the services it forwards writes to."""

    def __init__(self, settings: GatewaySettings, tracer_provider: trace.TracerProvider | None = None):
        self.base_urls = {"goals": settings.goals_url.rstrip("/"), "metrics": settings.metrics_url.rstrip("/")}
        self.timeout = settings.forward_timeout_seconds
        self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self.tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def write(self, service: str, method: str, path: str, body: Any = None, *, authorization: str | None,
                    correlation_id: str, idempotency_key: str | None = None,
                    expected_version: int | None = None) -> WritePayload:
        headers = {"Accept": "application/json, application/problem+json", CORRELATION_HEADER: correlation_id}
        if authorization:
            headers["Authorization"] = authorization
        if idempotency_key is not None:
            if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                raise MutationError("idempotencyKey must be 1 to 200 printable ASCII characters without spaces.",
                                    code="BAD_USER_INPUT")
            headers["Idempotency-Key"] = idempotency_key
        if expected_version is not None:
            headers["If-Match"] = etag(expected_version)
        response = await self._send(service, method, path, headers, body)
        if response.is_success:
            data = response.json()
            return WritePayload(
                id=strawberry.ID(str(data["id"])), version=int(data["version"]),
                position=response.headers.get(POSITION_HEADER) or format_position(service, int(data["position"])),
                replayed=response.headers.get("Idempotent-Replayed") == "true")
        raise _service_error(service, response)

    async def read(self, service: str, path: str, *, authorization: str | None, correlation_id: str,
                   params: dict[str, Any] | None = None) -> Any:
        """GET a service's JSON answer (what the gateway's read model does not hold, such as an
        aggregate's history), forwarded as a write is; a refusal is the same error."""
        headers = {"Accept": "application/json, application/problem+json", CORRELATION_HEADER: correlation_id}
        if authorization:
            headers["Authorization"] = authorization
        response = await self._send(service, "GET", path, headers, params=params)
        if response.is_success:
            return response.json()
        raise _service_error(service, response)

    async def _send(self, service: str, method: str, path: str, headers: dict[str, str], body: Any = None, *,
                    params: dict[str, Any] | None = None) -> httpx.Response:
        """One request in a client span whose trace context goes with it; failing to get an
        answer is a MutationError that says whether a write may have happened."""
        writing = method != "GET"
        written = "; nothing was written" if writing else ""
        maybe_written = ("; the write may have happened. Retry with the same idempotencyKey, or read before "
                         "writing again." if writing else ". Retry later.")
        with self.tracer.start_as_current_span(
                f"{method} {service}", kind=SpanKind.CLIENT,
                attributes={"http.request.method": method, "tandem.service": service}) as span:
            inject(headers)  # traceparent and tracestate of this span, a child of the caller's
            try:
                response = await self.client.request(method, self.base_urls[service] + path, headers=headers,
                                                     json=body, params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                log.warning("%s unreachable for %s %s: %r", service, method, path, e)
                raise MutationError(f"The {service} service could not be reached{written}. Retry later.",
                                    code="SERVICE_UNAVAILABLE", status=503, service=service) from None
            except httpx.TimeoutException as e:
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                log.warning("%s did not answer %s %s in %ss: %r", service, method, path, self.timeout, e)
                raise MutationError(f"The {service} service did not answer in time{maybe_written}",
                                    code="GATEWAY_TIMEOUT", status=504, service=service) from None
            except httpx.HTTPError as e:
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                log.warning("%s failed %s %s: %r", service, method, path, e)
                raise MutationError(f"The connection to the {service} service failed{maybe_written}",
                                    code="SERVICE_UNAVAILABLE", status=503, service=service) from None
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_status(Status(StatusCode.ERROR, str(response.status_code)))
        return response


def _service_error(service: str, response: httpx.Response) -> MutationError:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict) or not isinstance(problem.get("title"), str):
        # Not a Tandem service's answer (a proxy's page, say): its body says nothing to the client.
        problem = {"type": "about:blank", "title": response.reason_phrase or "Error", "status": response.status_code}
    detail = problem.get("detail")
    message = f"{problem['title']}: {detail}" if isinstance(detail, str) and detail else problem["title"]
    return MutationError(message, code=error_code(response.status_code), status=response.status_code,
                         service=service, problem=problem)


@asynccontextmanager
async def forwarding(app: FastAPI) -> AsyncIterator[None]:
    """The lifespan of the GraphQL router: one client for the app's life, closed at shut-down."""
    app.state.forwarder = Forwarder(app.state.settings, getattr(app.state, "tracer_provider", None))
    try:
        yield
    finally:
        await app.state.forwarder.aclose()


# Inputs: the REST bodies, field for field (camelCase on both sides). A field left out is left
# out of the body, so the service's default or "unchanged" applies; an explicit null is sent as
# null, which clears where the REST API allows it and is refused elsewhere.

@strawberry.input(description="Who owns an objective.")
class OwnerInput:
    kind: str = strawberry.field(description="person or unit.")
    id: strawberry.ID


@strawberry.input(description="A new objective, as `POST /v1/objectives` on goals takes it.")
class ObjectiveInput:
    title: str
    owner: OwnerInput
    unit_id: strawberry.ID
    cycle_id: strawberry.ID
    description: str | None = strawberry.UNSET
    parent_id: strawberry.ID | None = strawberry.field(default=strawberry.UNSET,
                                                      description="The objective this one aligns to.")
    status: str | None = strawberry.field(default=strawberry.UNSET, description="draft or active (the default).")


@strawberry.input(description="Changes to an objective (`PATCH /v1/objectives/{id}`); fields left out stay.")
class ObjectiveChanges:
    title: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    owner: OwnerInput | None = strawberry.UNSET


@strawberry.input
class MilestoneInput:
    title: str
    weight: float | None = strawberry.UNSET


@strawberry.input(description="A new key result, as `POST /v1/objectives/{id}/key-results` on goals takes it.")
class KeyResultInput:
    title: str
    kind: str = strawberry.field(description="increase_to, decrease_to, stay_above, stay_below, stay_within, "
                                             "done or milestones.")
    start: float | None = strawberry.UNSET
    target: float | None = strawberry.UNSET
    low: float | None = strawberry.UNSET
    high: float | None = strawberry.UNSET
    milestones: list[MilestoneInput] | None = strawberry.UNSET
    unit: str | None = strawberry.UNSET
    weight: float | None = strawberry.UNSET
    owner_id: strawberry.ID | None = strawberry.UNSET


@strawberry.input(description="Changes to a key result (`PATCH /v1/key-results/{id}`): fields left out stay; "
                              "null clears the owner or a bound the kind does not use. The kind stays.")
class KeyResultChanges:
    title: str | None = strawberry.UNSET
    unit: str | None = strawberry.UNSET
    weight: float | None = strawberry.UNSET
    owner_id: strawberry.ID | None = strawberry.UNSET
    start: float | None = strawberry.UNSET
    target: float | None = strawberry.UNSET
    low: float | None = strawberry.UNSET
    high: float | None = strawberry.UNSET
    milestones: list[MilestoneInput] | None = strawberry.UNSET


@strawberry.input(description="A check-in, as `POST /v1/key-results/{id}/check-ins` on goals takes it.")
class CheckInInput:
    value: float
    confidence: int | None = strawberry.field(default=strawberry.UNSET, description="0-10.")
    note: str | None = strawberry.UNSET
    valid_on: date | None = strawberry.field(default=strawberry.UNSET,
                                             description="The day the value applies to; today if left out.")


@strawberry.input(description="A measurement, as `POST /v1/kpis/{id}/measurements` on metrics takes it.")
class MeasurementInput:
    value: float
    measured_at: datetime | None = strawberry.field(
        default=strawberry.UNSET, description="When the value applies (with its time zone); now if left out.")
    source: str | None = strawberry.UNSET


def _body(value: Any) -> Any:
    """An input as the REST body: camelCase names, fields left out omitted, days and moments ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {to_camel(f.name): _body(v) for f in dataclasses.fields(value)
                if (v := getattr(value, f.name)) is not strawberry.UNSET}
    if isinstance(value, list):
        return [_body(v) for v in value]
    if isinstance(value, date | datetime):
        return value.isoformat()
    return value


def _path_id(value: str, what: str) -> str:
    """An id that goes into the URL path: only a UUID, so no argument can name another path."""
    try:
        return str(UUID(str(value)))
    except ValueError:
        raise MutationError(f"{what} is not an id this API gave out.", code="BAD_USER_INPUT") from None


async def _write(info: Info, service: str, method: str, path: str, body: Any = None, *,
                 idempotency_key: str | None = None, expected_version: int | None = None) -> WritePayload:
    forwarder, authorization, correlation_id = _forwarding(info)
    return await forwarder.write(service, method, path, body, authorization=authorization,
                                 correlation_id=correlation_id, idempotency_key=idempotency_key,
                                 expected_version=expected_version)


def _forwarding(info: Info) -> tuple[Forwarder, str | None, str]:
    """The app's forwarder, the caller's Authorization and the request's correlation id."""
    connection: HTTPConnection = info.context.request
    forwarder: Forwarder = connection.app.state.forwarder
    # Mutations come over HTTP only (the websocket carries subscriptions): the header as the
    # caller sent it, and one correlation id for every mutation of the request.
    authorization = connection.headers.get("authorization")
    principal = getattr(info.context, "principal", None)
    if not authorization and principal is not None:  # a websocket: the connection_init token
        authorization = f"Bearer {principal.token}"
    if not hasattr(connection.state, "correlation_id"):
        connection.state.correlation_id = connection.headers.get(CORRELATION_HEADER) or new_correlation_id()
    return forwarder, authorization, connection.state.correlation_id


async def forward_read(info: Info, service: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """A read the gateway's read model cannot answer (an aggregate's history), forwarded to the
    owning service as a mutation is: the caller's token, correlation id and trace context."""
    forwarder, authorization, correlation_id = _forwarding(info)
    return await forwarder.read(service, path, authorization=authorization, correlation_id=correlation_id,
                                params=params)


IdempotencyKey = Annotated[str | None, strawberry.argument(
    description="Makes a retry safe: the same key with the same input writes nothing new and answers as the "
                "first time (`replayed`); with other input it is refused.")]
ExpectedVersion = Annotated[int | None, strawberry.argument(
    description="The version this write is based on (sent as If-Match): a stale one is refused with "
                "PRECONDITION_FAILED.")]


@strawberry.type(description="Writes, each forwarded to the service that owns the data with the caller's token; "
                             "a refusal is an error whose `extensions` carry `code`, `status` and the service's "
                             "`problem` details.")
class Mutation:
    @strawberry.mutation(description="Create an objective in an open cycle, optionally aligned to a parent.")
    async def create_objective(self, info: Info, input: ObjectiveInput,
                               idempotency_key: IdempotencyKey = None) -> WritePayload | None:
        return await _write(info, "goals", "POST", "/v1/objectives", _body(input), idempotency_key=idempotency_key)

    @strawberry.mutation(description="Change the title, description or owner of an open objective.")
    async def update_objective(self, info: Info, id: strawberry.ID, input: ObjectiveChanges,
                               expected_version: ExpectedVersion = None) -> WritePayload | None:
        return await _write(info, "goals", "PATCH", f"/v1/objectives/{_path_id(id, 'id')}", _body(input),
                            expected_version=expected_version)

    @strawberry.mutation(description="Align the objective to a parent objective; null or left out: to none.")
    async def align_objective(self, info: Info, id: strawberry.ID, parent_id: strawberry.ID | None = None,
                              expected_version: ExpectedVersion = None) -> WritePayload | None:
        return await _write(info, "goals", "PUT", f"/v1/objectives/{_path_id(id, 'id')}/alignment",
                            {"parentId": parent_id}, expected_version=expected_version)

    @strawberry.mutation(description="Contribute to another objective besides the parent, with a weight "
                                      "(1 if left out); again with another weight changes it.")
    async def add_contribution(self, info: Info, id: strawberry.ID, to_objective_id: strawberry.ID,
                               weight: float | None = None,
                               expected_version: ExpectedVersion = None) -> WritePayload | None:
        path = f"/v1/objectives/{_path_id(id, 'id')}/contributions/{_path_id(to_objective_id, 'toObjectiveId')}"
        return await _write(info, "goals", "PUT", path, {} if weight is None else {"weight": weight},
                            expected_version=expected_version)

    @strawberry.mutation(description="Stop contributing to the other objective.")
    async def remove_contribution(self, info: Info, id: strawberry.ID, to_objective_id: strawberry.ID,
                                  expected_version: ExpectedVersion = None) -> WritePayload | None:
        path = f"/v1/objectives/{_path_id(id, 'id')}/contributions/{_path_id(to_objective_id, 'toObjectiveId')}"
        return await _write(info, "goals", "DELETE", path, expected_version=expected_version)

    @strawberry.mutation(description="Add a key result to the objective.")
    async def create_key_result(self, info: Info, objective_id: strawberry.ID, input: KeyResultInput,
                                idempotency_key: IdempotencyKey = None) -> WritePayload | None:
        return await _write(info, "goals", "POST", f"/v1/objectives/{_path_id(objective_id, 'objectiveId')}/key-results",
                            _body(input), idempotency_key=idempotency_key)

    @strawberry.mutation(description="Revise what a key result measures, its title, weight or owner.")
    async def revise_key_result(self, info: Info, id: strawberry.ID, input: KeyResultChanges,
                                expected_version: ExpectedVersion = None) -> WritePayload | None:
        return await _write(info, "goals", "PATCH", f"/v1/key-results/{_path_id(id, 'id')}", _body(input),
                            expected_version=expected_version)

    @strawberry.mutation(description="Check a key result in: a value, a confidence (0-10) and a note.")
    async def check_in(self, info: Info, key_result_id: strawberry.ID, input: CheckInInput,
                       expected_version: ExpectedVersion = None,
                       idempotency_key: IdempotencyKey = None) -> WritePayload | None:
        return await _write(info, "goals", "POST", f"/v1/key-results/{_path_id(key_result_id, 'keyResultId')}/check-ins",
                            _body(input), idempotency_key=idempotency_key, expected_version=expected_version)

    @strawberry.mutation(description="Record a KPI's value for a moment (metrics); a key result bound to the KPI "
                                      "follows it.")
    async def record_measurement(self, info: Info, kpi_id: strawberry.ID, input: MeasurementInput,
                                 expected_version: ExpectedVersion = None,
                                 idempotency_key: IdempotencyKey = None) -> WritePayload | None:
        return await _write(info, "metrics", "POST", f"/v1/kpis/{_path_id(kpi_id, 'kpiId')}/measurements",
                            _body(input), idempotency_key=idempotency_key, expected_version=expected_version)
