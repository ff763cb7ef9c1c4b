from __future__ import annotations

from pathlib import Path

import pytest

from paddler.tiny_model import TinyModelShape, ensure_tiny_model
from tests.support.llamacpp import tiny_model_path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_path()


@pytest.fixture(scope="session")
def slow_model_for_agents() -> Path:
    """About 1,500 generated tokens/s on one core: a long stream outlasts a test's next steps."""
    return ensure_tiny_model(
        TinyModelShape(embedding_length=256, block_count=4, feed_forward_length=768)
    )
