"""``scripts/bootstrap``: after the test command installed everything, the cluster installs
nothing more (it used to reinstall it all)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cluster_installs_nothing_after_the_test_command() -> None:
    """`scripts/bootstrap cluster` finds the `cluster` extra inside the installed `test` one:
    no install line, no pip run."""
    record = ROOT / ".venv" / ".paddler-installed"
    assert record.exists(), "run the tests through ./scripts/test, which installs the venv"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    recorded = record.read_text().split()
    assert recorded[:2] == ["pyproject", digest], "pyproject.toml changed: run ./scripts/test"
    assert "test" in recorded, recorded
    result = subprocess.run(
        [str(ROOT / "scripts" / "bootstrap"), "cluster"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", result.stdout
    assert result.stderr == "", result.stderr
