"""OpenTelemetry for every Tandem process: traces, metrics and JSON logs.

One tracer provider and one meter provider per process (`configure_process`, on the first
`setup_telemetry`), set as OpenTelemetry's global ones, because the client libraries are
instrumented process-wide: httpx (the gateway's calls to the services, webhook deliveries),
asyncpg (the read side) and psycopg (the write side and the projections). Each FastAPI app is
instrumented on its own, its server spans marked with `tandem.service`.

Exporters: the console exporter by default, to `TANDEM_TELEMETRY_CONSOLE_PATH` when it is set
(`make run` points it at `.data/logs/<service>-spans.jsonl`; metrics go beside it, to
`<service>-metrics.jsonl`), else to stderr; OTLP (HTTP) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
or `TANDEM_TELEMETRY_EXPORTER=otlp`; nothing with `TANDEM_TELEMETRY_EXPORTER=none` (the tests,
which add an in-memory exporter where they look at spans).

The trace of a write: the gateway's request, its forwarding span and the httpx call, the
service's request, `command <name>` (`run_command`), `append <log>` (the recorder's insert, with
the database statements inside), and later, in the projection runner's thread, `project
<projection>` for each event it processes. The event's metadata keeps only the trace id, so a
projection span is made a child of a remote parent in that trace (its span id derived from the
event's position, since the appending span's own id is not stored): the projection shows up in
the request's trace, as does everything it writes (a policy's appends included). A database
statement outside any such span (a runner's lock check, LISTEN, polling) starts no trace of its
own (`_NoLoneStatements`; `OTEL_TRACES_SAMPLER` overrides).

Metrics: `http.server.*` from the FastAPI instrumentation; `tandem.events.appended` (per log and
event type); `tandem.kpi.breaches` (per KPI, counted where `KPIThresholdBreached` is appended);
`tandem.projection.lag.events` and `tandem.projection.lag.seconds` (observable gauges for each
projection running in the process: the log's head less the tracking position, and the age of
the oldest event not processed yet).

Logs: `logging_config(service)` is a `logging.config.dictConfig` (what uvicorn takes as its
`log_config`) that writes one JSON object per line to stderr, uvicorn's loggers included, with
timestamp, level, logger, message, service, trace_id and span_id.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

INSTRUMENTATION_NAME = "tandem"
_lock = threading.RLock()
_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None
_instruments: _Instruments | None = None
_streams: list[IO[str]] = []
_apps: weakref.WeakSet[FastAPI] = weakref.WeakSet()


# --- process set-up -------------------------------------------------------------------------

def _exporting_to_otlp(settings: ServiceSettings) -> bool:
    return bool(settings.otel_exporter_otlp_endpoint) or settings.telemetry_exporter == "otlp"


def _console_stream(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", buffering=1)
    _streams.append(stream)
    return stream


def metrics_path(spans_path: Path) -> Path:
    """Where the console metric exporter writes, beside the spans: `goals-spans.jsonl` ->
    `goals-metrics.jsonl`."""
    name = spans_path.name
    return spans_path.with_name(name.replace("spans", "metrics") if "spans" in name else f"{name}.metrics")


def _metric_readers(settings: ServiceSettings) -> list[MetricReader]:
    if _exporting_to_otlp(settings):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return [PeriodicExportingMetricReader(OTLPMetricExporter())]
    if settings.telemetry_exporter == "console":
        path = settings.telemetry_console_path
        stream = _console_stream(metrics_path(path)) if path is not None else None
        exporter = (ConsoleMetricExporter(out=stream, formatter=lambda m: m.to_json(indent=None) + "\n")
                    if stream is not None else ConsoleMetricExporter())
        return [PeriodicExportingMetricReader(exporter)]
    return []


def _add_span_exporters(provider: TracerProvider, settings: ServiceSettings) -> None:
    if _exporting_to_otlp(settings):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif settings.telemetry_exporter == "console":
        stream = _console_stream(settings.telemetry_console_path)
        exporter = (ConsoleSpanExporter(out=stream, formatter=lambda s: s.to_json(indent=None) + "\n")
                    if stream is not None else ConsoleSpanExporter())
        provider.add_span_processor(BatchSpanProcessor(exporter))


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "HTTP"})


class _NoLoneStatements(Sampler):
    """The root sampler: every trace, except one that would be a database statement alone (a
    client span not named after an HTTP method): the housekeeping that runs outside any
    request, command or projection span (lock checks, LISTEN, polling) is not traced."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: SpanKind | None = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        if kind == SpanKind.CLIENT and name.split(" ", 1)[0].upper() not in _HTTP_METHODS:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "NoLoneStatements"


def _sampler() -> Sampler | None:
    """Ours, unless OTEL_TRACES_SAMPLER chooses (the SDK reads it when given None)."""
    return None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(root=_NoLoneStatements())


def configure_process(settings: ServiceSettings) -> TracerProvider:
    """The process's tracer and meter providers, made (and the client libraries instrumented)
    on the first call; later calls return what the first made."""
    global _tracer_provider, _meter_provider
    with _lock:
        if _tracer_provider is not None:
            return _tracer_provider
        resource = Resource.create({"service.name": settings.service_name})
        tracer_provider = TracerProvider(resource=resource, sampler=_sampler())
        _add_span_exporters(tracer_provider, settings)
        meter_provider = MeterProvider(resource=resource, metric_readers=_metric_readers(settings))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _tracer_provider = tracer_provider
        use_meter_provider(meter_provider)
        _instrument_libraries(tracer_provider, meter_provider)
        return tracer_provider


def _instrument_libraries(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    # Statement parameters are never recorded (they carry personal data); statements are.
    HTTPXClientInstrumentor().instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    AsyncPGInstrumentor().instrument(tracer_provider=tracer_provider)
    PsycopgInstrumentor().instrument(tracer_provider=tracer_provider, enable_commenter=False)


def tracer_provider() -> TracerProvider:
    """The process's tracer provider (made with the defaults if nothing configured it yet:
    a test adds its in-memory span processor here)."""
    if _tracer_provider is None:
        raise RuntimeError("telemetry is not configured in this process yet (setup_telemetry)")
    return _tracer_provider


def setup_telemetry(app: FastAPI, settings: ServiceSettings) -> None:
    """Configure the process (once) and instrument the app: its requests become server spans
    (health probes excepted) and `http.server.*` metrics."""
    provider = configure_process(settings)
    service = settings.service_name

    def mark_service(span: trace.Span, scope: dict[str, Any]) -> None:
        if span.is_recording():
            span.set_attribute("tandem.service", service)

    # No spans for the ASGI receive and send messages: two or more a request that say nothing
    # the request's own span does not, and cost CPU on every write.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, meter_provider=_meter_provider,
                                       excluded_urls="healthz,readyz", server_request_hook=mark_service,
                                       exclude_spans=["receive", "send"])
    app.state.tracer_provider = provider
    _apps.add(app)


def shutdown_telemetry(app: FastAPI) -> None:
    """At an app's shut-down: export what is pending. The providers live as long as the process
    (other apps in it may still use them) and shut down at its exit."""
    _apps.discard(app)
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None:
        provider.force_flush(5_000)
    if _meter_provider is not None:
        _meter_provider.force_flush(5_000)


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _tracer() -> trace.Tracer:
    return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=_tracer_provider)


# --- metrics --------------------------------------------------------------------------------

class _Instruments:
    def __init__(self, provider: MeterProvider):
        meter = provider.get_meter(INSTRUMENTATION_NAME)
        self.events_appended = meter.create_counter(
            "tandem.events.appended", unit="{event}", description="Events appended to a service's log, by type")
        self.kpi_breaches = meter.create_counter(
            "tandem.kpi.breaches", unit="{breach}", description="KPIThresholdBreached events appended, per KPI")
        meter.create_observable_gauge(
            "tandem.projection.lag.events", callbacks=[_lag_events], unit="{event}",
            description="How many events of its log a projection running in this process has not processed yet")
        meter.create_observable_gauge(
            "tandem.projection.lag.seconds", callbacks=[_lag_seconds], unit="s",
            description="Age of the oldest event a projection running in this process has not processed yet")


def use_meter_provider(provider: MeterProvider) -> MeterProvider | None:
    """Make Tandem's own instruments on this meter provider, and instrument apps set up from
    now on with it (a test passes one with an in-memory reader); returns the one used before."""
    global _meter_provider, _instruments
    with _lock:
        previous = _meter_provider
        _meter_provider = provider
        _instruments = _Instruments(provider)
        return previous


def _event_type(topic: str) -> str:
    # as services.common.eventstore.topic_event_type (not imported: it imports the recorder)
    return "".join(topic.split(":", 1)[-1].split("."))


def record_appended(log_name: str, stored_events: Sequence[Any]) -> None:
    """Count a committed append: events per type, and KPI breaches per KPI."""
    instruments = _instruments
    if instruments is None:
        return
    counts: dict[str, int] = {}
    for event in stored_events:
        event_type = _event_type(event.topic)
        counts[event_type] = counts.get(event_type, 0) + 1
        if event_type == "KPIThresholdBreached":
            instruments.kpi_breaches.add(1, {"tandem.kpi.id": str(event.originator_id)})
    for event_type, n in counts.items():
        instruments.events_appended.add(n, {"tandem.log": log_name, "tandem.event.type": event_type})


def traced_append(insert_events: Callable[..., T]) -> Callable[..., T]:
    """For a recorder's `insert_events`: an `append <log>` span around it (the statements are
    its children), and the events counted once it has committed."""

    @functools.wraps(insert_events)
    def wrapper(self: Any, stored_events: Sequence[Any], **kwargs: Any) -> T:
        log_name = f"{self.datastore.schema}.{self.events_table_name}"
        with _tracer().start_as_current_span(
                f"append {log_name}", kind=SpanKind.INTERNAL,
                attributes={"tandem.log": log_name, "tandem.events": len(stored_events),
                            "db.system": "postgresql"}) as span:
            result = insert_events(self, stored_events, **kwargs)
            if result and span.is_recording():
                span.set_attribute("tandem.position", max(result))
        record_appended(log_name, stored_events)
        return result

    return wrapper


# --- commands -------------------------------------------------------------------------------

def command_name(fn: Callable[..., Any], args: Sequence[Any] = ()) -> str:
    """What a command is called in its span: the function's name, through partials, and for an
    idempotent write (`answer_once(claim, command, ...)`) the command it runs."""
    if getattr(fn, "__name__", "") == "answer_once" and len(args) > 1:
        fn = args[1]
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@contextmanager
def command_span(name: str, actor: str, correlation_id: str) -> Iterator[trace.Span]:
    with _tracer().start_as_current_span(
            f"command {name}", kind=SpanKind.INTERNAL,
            attributes={"tandem.command": name, "enduser.id": actor,
                        "tandem.correlation_id": correlation_id}) as span:
        yield span


def in_current_trace(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn`, to be run in another thread under the trace context current here."""
    ctx = otel_context.get_current()

    def call() -> T:
        token = otel_context.attach(ctx)
        try:
            return fn()
        finally:
            otel_context.detach(token)

    return call


# --- projections ----------------------------------------------------------------------------

def _event_parent(trace_id: Any, position: int) -> otel_context.Context | None:
    """A remote parent in the trace the event was recorded in (None: no trace recorded)."""
    try:
        tid = int(str(trace_id), 16)
    except ValueError:
        return None
    if not tid or tid >> 128:
        return None
    span_id = (position & 0xFFFF_FFFF_FFFF_FFFF) or 1
    parent = SpanContext(trace_id=tid, span_id=span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent), otel_context.Context())


@contextmanager
def projection_span(projection: str, domain_event: Any, tracking: Any) -> Iterator[trace.Span]:
    """The span of one event processed by a projection, in the trace the event's metadata
    names."""
    meta = getattr(domain_event, "meta", None) or {}
    position = int(getattr(tracking, "notification_id", 0) or 0)
    parent = _event_parent(meta.get("trace_id"), position) if isinstance(meta, dict) else None
    event_type = (domain_event.type if type(domain_event).__name__ == "ContractEvent"  # a followed log's
                  else type(domain_event).__qualname__.replace(".", ""))
    attributes = {"tandem.projection": projection, "tandem.event.type": str(event_type),
                  "tandem.event.position": position,
                  "tandem.event.log": str(getattr(tracking, "application_name", ""))}
    if isinstance(meta, dict) and meta.get("correlation_id"):
        attributes["tandem.correlation_id"] = str(meta["correlation_id"])
    with _tracer().start_as_current_span(f"project {projection}", context=parent, kind=SpanKind.CONSUMER,
                                         attributes=attributes) as span:
        yield span


@functools.cache
def traced_projection(projection_class: type[T]) -> type[T]:
    """The projection class, with a span around each event it processes (`projection_span`).
    Same name, so the same environment, tables and tracking rows."""
    base: Any = projection_class

    class Traced(base):  # type: ignore[misc,valid-type]
        name = base.name

        def process_event(self, domain_event: Any, tracking: Any) -> None:
            with projection_span(base.name, domain_event, tracking):
                super().process_event(domain_event, tracking)

    Traced.__name__ = base.__name__
    Traced.__qualname__ = base.__qualname__
    Traced.__module__ = base.__module__
    return Traced  # type: ignore[return-value]


def _running_projections() -> Iterable[Any]:
    for app in list(_apps):
        for thread in getattr(app.state, "projection_threads", ()):
            if thread.running.is_set():
                yield thread


def _projection_lag(thread: Any) -> tuple[int, float]:
    """How far a projection is behind its log: events, and the age in seconds of the oldest one
    it has not processed (0 when it is caught up). Measured on a connection of its own, outside
    any trace."""
    import psycopg

    from services.common.eventstore import standard_transcoder

    spec = thread.spec
    with suppress_instrumentation(), psycopg.connect(thread.database_url, autocommit=True,
                                                     connect_timeout=5) as conn:
        position = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {spec.tracking_table} "
                                "WHERE application_name = %s", (spec.application_class.name,)).fetchone()[0]
        head = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {spec.events_table}").fetchone()[0]
        behind = max(int(head) - int(position), 0)
        if not behind:
            return 0, 0.0
        row = conn.execute(f"SELECT state FROM {spec.events_table} WHERE notification_id > %s "
                           "ORDER BY notification_id LIMIT 1", (position,)).fetchone()
    seconds = 0.0
    if row is not None:
        recorded = standard_transcoder().decode(bytes(row[0])).get("timestamp")
        if isinstance(recorded, datetime):
            seconds = max((datetime.now(UTC) - recorded).total_seconds(), 0.0)
    return behind, seconds


_lag_cache: dict[str, tuple[float, int, float]] = {}


def _lags() -> Iterator[tuple[dict[str, str], int, float]]:
    now = time.monotonic()
    for thread in _running_projections():
        key = f"{thread.spec.view_schema}.{thread.spec.projection_class.name}/{thread.spec.application_class.name}"
        cached = _lag_cache.get(key)
        if cached is None or now - cached[0] > 1.0:  # both gauges read once per collection
            try:
                cached = (now, *_projection_lag(thread))
            except Exception as e:  # noqa: BLE001 - a gauge that cannot be read is left out
                log.debug("projection lag of %s not measured: %r", key, e)
                continue
            _lag_cache[key] = cached
        yield {"tandem.projection": key}, cached[1], cached[2]


def _lag_events(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(events, attrs) for attrs, events, _ in _lags()]


def _lag_seconds(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(seconds, attrs) for attrs, _, seconds in _lags()]


# --- logs -----------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message, service,
    trace_id and span_id (of the span current where the record was logged), and the exception
    when there is one."""

    def __init__(self, service: str = ""):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ctx = trace.get_current_span().get_span_context()
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else None,
            "span_id": format(ctx.span_id, "016x") if ctx.is_valid else None,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def logging_config(service: str, level: str = "INFO") -> dict[str, Any]:
    """A dictConfig for the whole process, uvicorn's loggers included (pass it to `uvicorn.run`
    as `log_config`): JSON lines on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
        },
    }
