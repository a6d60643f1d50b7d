"""OpenTelemetry set-up: one tracer provider per process, FastAPI instrumented.

Console exporter by default (to a file when `TANDEM_TELEMETRY_CONSOLE_PATH` is set, so that
`make run` keeps the terminal readable), OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
"""

from __future__ import annotations

from typing import IO

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from services.common.settings import ServiceSettings

_console_stream: IO[str] | None = None


def setup_telemetry(app: FastAPI, settings: ServiceSettings) -> None:
    global _console_stream
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif settings.telemetry_exporter == "console":
        if settings.telemetry_console_path is not None:
            settings.telemetry_console_path.parent.mkdir(parents=True, exist_ok=True)
            _console_stream = settings.telemetry_console_path.open("a", buffering=1)
            exporter = ConsoleSpanExporter(out=_console_stream, formatter=lambda s: s.to_json(indent=None) + "\n")
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif settings.telemetry_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="healthz,readyz")
    app.state.tracer_provider = provider


def shutdown_telemetry(app: FastAPI) -> None:
    provider = getattr(app.state, "tracer_provider", None)
    if provider is not None:
        provider.shutdown()


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
