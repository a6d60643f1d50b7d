"""OpenTelemetry end to end, in one process on real PostgreSQL: one GraphQL mutation, and the
spans it leaves, from the gateway's request through the httpx call to goals (a real HTTP server:
uvicorn in a thread), the goals request, the command, the append and its statements, to the
goals projection's span for the event, in the trace id the event's metadata records. Also the
metrics (events appended per type, KPI breaches per KPI, projection lag, http.server.*), JSON
logs with the trace id, and /healthz and /readyz (a projection held back makes it 503).

Spans are collected in memory (`InMemorySpanExporter` on the process's tracer provider); the
metrics with an `InMemoryMetricReader` on a meter provider of this module's own.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.common.eventstore import standard_transcoder
from services.gateway.api import create_app as create_gateway
from services.gateway.settings import GatewaySettings
from services.goals.api import create_app as create_goals
from services.goals.projections import VIEW_SPEC
from services.goals.settings import GoalsSettings
from services.metrics.api import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from tests.conftest import free_port, serve_in_process

pytestmark = pytest.mark.asyncio(loop_scope="session")

Headers = Callable[..., dict[str, str]]
CREATE_OBJECTIVE = """mutation($input: ObjectiveInput!) {
  createObjective(input: $input) { id version position replayed } }"""


@pytest.fixture(scope="module")
def telemetry_capture() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    """Spans and metrics of everything this module's apps do, in memory."""
    telemetry.configure_process(GoalsSettings())  # the process's providers (no-op when made already)
    spans = InMemorySpanExporter()
    telemetry.tracer_provider().add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    previous = telemetry.use_meter_provider(MeterProvider(metric_readers=[reader]))
    try:
        yield spans, reader
    finally:
        spans.shutdown()  # the processor stays, exporting nothing any more
        if previous is not None:
            telemetry.use_meter_provider(previous)


class ThreadedServer:
    """An app served by uvicorn on a free port in a thread of its own (with its own event loop),
    so that the gateway's call to it is a real HTTP request."""

    def __init__(self, app: Any):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "goals did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def goals_server(telemetry_capture: Any, own_database: str) -> Iterator[ThreadedServer]:
    settings = GoalsSettings(DATABASE_URL=own_database, ready_max_lag_events=0)
    with ThreadedServer(create_goals(settings)) as server:
        yield server


@pytest.fixture(scope="module")
async def metrics(telemetry_capture: Any, own_database: str, auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    """The metrics service in process (ASGI): its log is what the goals KPI policy follows."""
    async for client in serve_in_process(create_metrics(MetricsSettings(DATABASE_URL=own_database))):
        client.headers.update(auth("admin", "ada"))
        yield client


@pytest.fixture(scope="module")
async def gateway(goals_server: ThreadedServer, metrics: httpx.AsyncClient,
                  own_database: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(DATABASE_URL=own_database, run_projections=False, goals_url=goals_server.url,
                               metrics_url=f"http://127.0.0.1:{free_port()}")
    async for client in serve_in_process(create_gateway(settings)):
        yield client


@pytest.fixture(scope="module")
async def goals(goals_server: ThreadedServer, auth: Headers) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=goals_server.url, headers=auth("admin", "ada"), timeout=30) as client:
        yield client


async def created(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
async def org(goals: httpx.AsyncClient) -> dict[str, str]:
    unit = await created(goals, "/v1/units", {"name": "Acme", "kind": "company"})
    cycle = await created(goals, "/v1/cycles", {"name": "Q4", "startsOn": "2026-10-01", "endsOn": "2026-12-31",
                                                "status": "active"})
    return {"unit": unit["id"], "cycle": cycle["id"]}


async def wait_for_spans(exporter: InMemorySpanExporter, found: Callable[[list[ReadableSpan]], bool],
                         timeout: float = 15) -> list[ReadableSpan]:
    deadline = time.monotonic() + timeout
    while True:
        spans = list(exporter.get_finished_spans())
        if found(spans):
            return spans
        assert time.monotonic() < deadline, "spans did not come: " + ", ".join(s.name for s in spans[-40:])
        await asyncio.sleep(0.05)


def scope(span: ReadableSpan) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """The span's parents up to the root, nearest first (within what was collected)."""
    out = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


async def test_one_trace_from_graphql_to_the_projection(
        telemetry_capture: tuple[InMemorySpanExporter, InMemoryMetricReader], gateway: httpx.AsyncClient,
        goals: httpx.AsyncClient, org: dict[str, str], own_database: str, auth: Headers) -> None:
    exporter, _ = telemetry_capture
    exporter.clear()
    r = await gateway.post("/graphql", headers={**auth("admin", "ada"), "X-Correlation-ID": "corr-trace"}, json={
        "query": CREATE_OBJECTIVE, "variables": {"input": {
            "title": "Traced from end to end", "owner": {"kind": "unit", "id": org["unit"]},
            "unitId": org["unit"], "cycleId": org["cycle"]}}})
    assert r.status_code == 200 and "errors" not in r.json(), r.text
    written = r.json()["data"]["createObjective"]
    objective_id, position = written["id"], int(written["position"].removeprefix("goals="))

    # The gateway's request is the root of the trace.
    spans = await wait_for_spans(exporter, lambda ss: any(
        s.kind == SpanKind.SERVER and s.attributes.get("tandem.service") == "gateway" for s in ss))
    root = next(s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("tandem.service") == "gateway")
    trace_id = root.context.trace_id
    assert root.name == "POST /graphql" and root.parent is None

    # ... and on through the goals projection, which handles the event in that trace.
    def projected(ss: list[ReadableSpan]) -> bool:
        return any(s.name == f"project {VIEW_SPEC.projection_class.name}" and s.context.trace_id == trace_id
                   and s.attributes.get("tandem.event.position") == position for s in ss)

    spans = [s for s in await wait_for_spans(exporter, projected) if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in spans}

    forward = next(s for s in spans if s.name == "POST goals" and s.kind == SpanKind.CLIENT)
    http_call = next(s for s in spans if scope(s).endswith("httpx") and s.kind == SpanKind.CLIENT)
    served = next(s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("tandem.service") == "goals")
    command = next(s for s in spans if s.name.startswith("command "))
    append = next(s for s in spans if s.name == "append goals.goals_events")
    statements = [s for s in spans if scope(s).endswith("psycopg")]
    project = next(s for s in spans if s.name == f"project {VIEW_SPEC.projection_class.name}")

    assert served.name == "POST /v1/objectives"
    assert command.name == "command create_objective"
    assert append.attributes["tandem.events"] == 1 and append.attributes["tandem.position"] == position
    # Each step is a descendant of the one before: gateway -> forward -> httpx -> goals -> command -> append.
    chain = [root, forward, http_call, served, command, append]
    for parent, child in zip(chain, chain[1:], strict=False):
        assert parent in ancestors(child, by_id), f"{child.name} is not under {parent.name}"
    # The database statements of the append: the log's lock, NOTIFY, the INSERT of the event (the
    # library passes that one by keyword, so the instrumentation leaves its text out), the chain's.
    appended = [s.attributes.get("db.statement", "") for s in statements if append in ancestors(s, by_id)]
    assert 'LOCK TABLE "goals"."goals_events" IN EXCLUSIVE MODE' in appended, appended
    assert any(s.startswith('INSERT INTO "goals"."goals_event_chain"') for s in appended), appended
    assert len(appended) >= 5, appended
    assert all(s.attributes.get("db.system") == "postgresql" for s in statements)

    # The projection's span: a consumer of the event, in the trace its metadata names, with its
    # own statements (the read model's and the tracking position's) under it.
    assert project.kind == SpanKind.CONSUMER
    assert (project.attributes["tandem.event.type"], project.attributes["tandem.correlation_id"]) == (
        "ObjectiveCreated", "corr-trace")
    assert project.parent is not None and project.parent.is_remote
    assert any(project in ancestors(s, by_id) for s in statements)
    with psycopg.connect(own_database) as conn:
        state = conn.execute("SELECT state FROM goals.goals_events WHERE originator_id = %s AND originator_version = 1",
                             (uuid.UUID(objective_id),)).fetchone()[0]
    assert standard_transcoder().decode(bytes(state))["meta"]["trace_id"] == format(trace_id, "032x")

    # The read side: a read that waits for the write is one trace of asyncpg statements.
    exporter.clear()
    r = await goals.get(f"/v1/objectives/{objective_id}", headers={"Tandem-Wait-For": written["position"]})
    assert r.status_code == 200, r.text
    spans = await wait_for_spans(exporter, lambda ss: any(
        s.kind == SpanKind.SERVER and s.attributes.get("tandem.service") == "goals" for s in ss))
    served = next(s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("tandem.service") == "goals")
    reads = [s for s in spans if scope(s).endswith("asyncpg") and s.context.trace_id == served.context.trace_id]
    assert reads and all(s.attributes.get("db.system") == "postgresql" for s in reads)


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [p for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points]


async def test_metrics(telemetry_capture: tuple[InMemorySpanExporter, InMemoryMetricReader],
                       metrics: httpx.AsyncClient, goals: httpx.AsyncClient, org: dict[str, str]) -> None:
    _, reader = telemetry_capture
    kpi = await created(metrics, "/v1/kpis", {
        "name": "CSAT", "unit": "%", "direction": "higher_is_better", "cadence": "daily", "target": 90,
        "rules": [{"id": "floor", "kind": "below", "threshold": 80, "severity": "critical"}]})
    measured = await created(metrics, f"/v1/kpis/{kpi['id']}/measurements",
                             {"value": 70, "measuredAt": "2026-02-03T10:00:00Z"})

    breaches = {p.attributes["tandem.kpi.id"]: p.value for p in points(reader, "tandem.kpi.breaches")}
    assert breaches[kpi["id"]] == 1
    appended = {(p.attributes["tandem.log"], p.attributes["tandem.event.type"]): p.value
                for p in points(reader, "tandem.events.appended")}
    assert appended[("metrics.metrics_events", "KPIDefined")] >= 1
    assert appended[("metrics.metrics_events", "KPIThresholdBreached")] >= 1
    assert appended[("goals.goals_events", "OrgUnitCreated")] >= 1
    assert any(p.attributes.get("http.route") == "/v1/kpis" or p.attributes.get("http.target") == "/v1/kpis"
               for name in ("http.server.duration", "http.server.request.duration")
               for p in points(reader, name)), "no http.server metric for POST /v1/kpis"

    # Projection lag: every projection running here has a gauge; caught up, they read 0.
    r = await metrics.get(f"/v1/kpis/{kpi['id']}", headers={"Tandem-Wait-For": f"metrics={measured['position']}"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    while True:
        lags = {p.attributes["tandem.projection"]: p.value for p in points(reader, "tandem.projection.lag.events")}
        seconds = {p.attributes["tandem.projection"]: p.value for p in points(reader, "tandem.projection.lag.seconds")}
        view = f"goals.{VIEW_SPEC.projection_class.name}/{VIEW_SPEC.application_class.name}"
        if view in lags and all(v == 0 for v in lags.values()):
            break
        assert time.monotonic() < deadline, lags
        await asyncio.sleep(0.2)
    assert set(seconds) == set(lags) and all(v == 0 for v in seconds.values())
    assert any(key.startswith("metrics.") for key in lags)


async def test_log_lines_are_json_with_the_trace_id(goals: httpx.AsyncClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter(service="goals"))
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        # The request in a trace of the test's: its traceparent goes along (httpx is instrumented).
        with telemetry.tracer_provider().get_tracer("tests").start_as_current_span("client") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            r = await goals.get("/v1/units")
        assert r.status_code == 200, r.text
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    line = next(entry for entry in lines if "/v1/units" in entry["message"])
    assert set(line) >= {"timestamp", "level", "logger", "message", "service", "trace_id", "span_id"}
    assert (line["level"], line["logger"], line["service"], line["trace_id"]) == (
        "INFO", "uvicorn.access", "goals", trace_id)
    assert len(line["span_id"]) == 16


async def test_the_process_logging_config_makes_uvicorn_log_json() -> None:
    """What a service's entry point gives uvicorn: its own loggers and everyone else's, as JSON."""
    program = ("import logging, logging.config; from services.common.telemetry import logging_config; "
               "logging.config.dictConfig(logging_config('metrics')); "
               "logging.getLogger('uvicorn.error').info('Started server process'); "
               "logging.getLogger('services.x').warning('careful: %s', 42)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["logger"], e["level"], e["message"], e["service"], e["trace_id"]) for e in lines] == [
        ("uvicorn.error", "INFO", "Started server process", "metrics", None),
        ("services.x", "WARNING", "careful: 42", "metrics", None)]


async def test_healthz_and_readyz_with_a_projection_held_back(goals: httpx.AsyncClient, org: dict[str, str],
                                                             own_database: str) -> None:
    assert (await goals.get("/healthz")).json() == {"status": "ok"}
    lag_key = next(k for k in (await ready(goals, 200))["checks"] if k.startswith(f"lag:goals.{VIEW_SPEC.projection_class.name}"))

    # Hold the goals read model's tracking table (reads go on, its writes wait): the projection
    # cannot record the next event, so it falls behind the log's head.
    with psycopg.connect(own_database) as holder:
        holder.execute(f"LOCK TABLE {VIEW_SPEC.tracking_table} IN SHARE MODE")
        await created(goals, "/v1/units", {"name": "Held back", "kind": "team", "parentId": org["unit"]})
        body = await ready(goals, 503)
        assert body["status"] == "not ready" and body["checks"][lag_key] >= 1 and body["checks"]["database"] == "ok"
        holder.rollback()
    body = await ready(goals, 200)
    assert body["checks"][lag_key] == 0


async def ready(client: httpx.AsyncClient, status: int, timeout: float = 20) -> dict[str, Any]:
    """/readyz, asked until it answers `status`."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get("/readyz")
        if r.status_code == status:
            return r.json()
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.1)
