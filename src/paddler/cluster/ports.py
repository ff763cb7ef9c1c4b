"""The cluster's two ports, checked before anything starts.

A second ``paddler cluster`` on the ports of a running one must not start a balancer that dies
while the first cluster answers in its place, so each port is tried first, the way the balancer
will bind it (with SO_REUSEADDR, so that a closed connection lingering in TIME_WAIT does not
count as taken).
"""

from __future__ import annotations

import errno
import os
import socket

HOST = "127.0.0.1"


class PortUnavailable(Exception):
    """A port of the cluster is taken or cannot be used; the message says so in one line."""


def check_ports(proxy_port: int, management_port: int) -> None:
    """Raise ``PortUnavailable`` unless both ports (0: any free port) can be listened on."""
    if proxy_port and proxy_port == management_port:
        raise PortUnavailable(
            f"--reverseproxy-port and --management-port are both {proxy_port}; "
            "give them different ports"
        )
    for port, flag in ((proxy_port, "--reverseproxy-port"), (management_port, "--management-port")):
        if port:
            _check(port, flag)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _check(port: int, flag: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortUnavailable(
                    f"port {port} is already in use (another Paddler cluster may be running): "
                    f"stop it, or choose another port with {flag}"
                ) from None
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise PortUnavailable(
                f"cannot use port {port} ({reason}): choose another with {flag}"
            ) from None
