"""The ``paddler`` command: ``agent``, ``balancer``, ``cluster`` and ``dashboard``.

One module per subcommand; ``options`` holds the option kinds they share and ``process`` what
only a command line does (logging, signals, exit codes). This is the only layer that reads the
environment, installs signal handlers or exits the process. Every flag can also be set with an
environment variable, named ``PADDLER_`` plus the flag in upper case with dashes as underscores
(``--request-buffer-size`` is ``PADDLER_REQUEST_BUFFER_SIZE``). Every host flag also accepts
``aws:metadata:local-ipv4``: the EC2 instance's private address.
"""

from __future__ import annotations

import click

from paddler import __version__
from paddler.cli.agent import agent
from paddler.cli.balancer import balancer
from paddler.cli.cluster import cluster
from paddler.cli.dashboard import dashboard


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="paddler")
def cli() -> None:
    """Paddler: a slot-aware load balancer for llama.cpp servers.

    Run `paddler cluster` for a complete local cluster, or an `agent` beside each llama.cpp
    server and one `balancer` in front of them.

    Every flag can be set with a PADDLER_* environment variable (shown in each command's --help);
    boolean flags take --flag, --flag=true or --flag=false. Every host flag also accepts
    `aws:metadata:local-ipv4`, the EC2 instance's private address.
    """


for command in (agent, balancer, cluster, dashboard):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="paddler")
