"""The original Paddler's documented commands work verbatim (see original_paddler_scenario)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.llamacpp import tiny_model_path
from tests.support.processes import clean_env

SCENARIO = Path(__file__).with_name("original_paddler_scenario.py")


def test_the_original_paddlers_documented_commands_run_verbatim() -> None:
    """Its README's agent, balancer (with dashboard and StatsD) and AWS agent commands, pasted
    as they are, run a fleet that serves real llama.cpp."""
    paddler = Path(sys.executable).with_name("paddler")
    assert paddler.exists(), paddler
    assert shutil.which("unshare") and shutil.which("ip"), "util-linux and iproute2 are needed"
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--fork",
            sys.executable,
            str(SCENARIO),
            str(tiny_model_path()),
            str(paddler),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == "ok", result.stdout
