"""Turning OpenTelemetry on from the standard ``OTEL_*`` environment variables.

Tracing is off unless the environment asks for it: ``OTEL_TRACES_EXPORTER`` names an exporter
other than ``none``, or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` always wins. Spans are then
exported over OTLP/HTTP in batches; the exporter reads its own settings (endpoint, headers,
timeout, ...) from the same variables, as the OpenTelemetry specification describes.
``OTEL_SERVICE_NAME`` defaults to ``paddler-balancer``.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider

from paddler import __version__


def tracing_requested(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def provider_from_environment(environ: Mapping[str, str]) -> TracerProvider | None:
    """A tracer provider exporting over OTLP/HTTP, or None when tracing was not asked for."""
    if not tracing_requested(environ):
        return None
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name not in ("otlp", "console"):
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={exporter_name} is not supported; use otlp, console or none"
        )
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create(
        {
            SERVICE_NAME: environ.get("OTEL_SERVICE_NAME", "paddler-balancer"),
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
