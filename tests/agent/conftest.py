from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.llamacpp import tiny_model_path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_path()
