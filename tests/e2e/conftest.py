"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from paddler.tiny_model import TinyModelShape, ensure_tiny_model

# Slow enough (about 1,500 generated and 1,900 prompt tokens/s on one core, measured) that a long
# generation is still running while a test acts, and that a prompt cache hit shows.
SLOW_SHAPE = TinyModelShape(embedding_length=256, block_count=4, feed_forward_length=768)


@pytest.fixture(scope="session")
def slow_model() -> Path:
    return ensure_tiny_model(SLOW_SHAPE)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Where the spans of ``provider`` go, for a test to read."""
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider that exports every span at once to ``exporter``."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every end-to-end test runs real llama.cpp, so ``-m "not llamacpp"`` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.llamacpp)
