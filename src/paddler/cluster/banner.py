"""The banner a ready cluster prints: its addresses and examples that work when pasted into bash.

The examples name their programs by full path: the Python and the ``paddler`` that run this
cluster, which are in a virtualenv that is usually not on the user's PATH (``./scripts/cluster``
installs into ``.venv``), and whose Python has the ``openai`` package when the ``cluster`` extra
is installed.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Commands:
    """How to run this installation's Python and ``paddler`` from any shell."""

    python: str
    paddler: str
    has_openai: bool

    @classmethod
    def of_this_installation(cls) -> Commands:
        python = sys.executable
        # Not resolved: a virtualenv's python is a link to the system's, its scripts sit beside it.
        paddler = Path(python).parent / "paddler"
        return cls(
            python=shlex.quote(python),
            paddler=(
                shlex.quote(str(paddler))
                if paddler.is_file()
                else f"{shlex.quote(python)} -m paddler"
            ),
            has_openai=importlib.util.find_spec("openai") is not None,
        )


def banner(
    *,
    servers: int,
    slots: int,
    model: Path,
    alias: str,
    proxy_port: int,
    management_port: int,
    commands: Commands,
    took: float,
) -> str:
    url = f"http://127.0.0.1:{proxy_port}"
    management = f"127.0.0.1:{management_port}"
    message = '[{"role": "user", "content": "Hello"}]'
    python_example = (
        f"  {commands.python} -c 'from openai import OpenAI; \\\n"
        f'    client = OpenAI(base_url="{url}/v1", api_key="none"); \\\n'
        f'    reply = client.chat.completions.create(model="{alias}", messages={message}, '
        "max_tokens=16); \\\n"
        "    print(reply.choices[0].message.content)'"
    )
    if not commands.has_openai:
        python_example = (
            f"  # with the openai package ({commands.python} -m pip install openai):\n"
            + python_example
        )
    return f"""
Paddler cluster is ready ({took:.1f} s): {servers} llama.cpp server(s) x {slots} slot(s), model {model}

  proxy (OpenAI / llama.cpp API): {url}
  dashboard:                      http://{management}/dashboard
                                  (or in this terminal: {commands.paddler} dashboard --management-addr {management})
  fleet status:                   http://{management}/api/v1/agents
  Prometheus metrics:             http://{management}/metrics
  aggregate health:               {url}/health

Try it (any model name works: a cluster of one model serves every name):

  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{alias}", "messages": {message}, "max_tokens": 16}}'

{python_example}

Press Ctrl-C to stop everything.
"""
