"""The socket on which the balancer we started tells us that it holds its ports.

A probe of the management port cannot tell our balancer from another process on that port (a
first cluster, say, while our own balancer died of ``address already in use``). systemd's
notification protocol can: the balancer sends ``READY=1`` to the Unix datagram socket named by
``NOTIFY_SOCKET`` once both its ports listen (``paddler.cli.process.notify``), and only the child
we give that name to knows it. The socket lives in a private temporary directory (mode 0700), so
no other user can send to it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType


class NotifySocket:
    """``with NotifySocket() as notifications``: bound on entry, removed with its directory on exit."""

    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="paddler-cluster-"))
        self.path = str(self._directory / "notify")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __enter__(self) -> NotifySocket:
        try:
            self._socket.bind(self.path)
            self._socket.setblocking(False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    async def ready(self) -> dict[str, str]:
        """Wait for a ``READY=1`` notification and return its fields (``STATUS`` and so on)."""
        loop = asyncio.get_running_loop()
        while True:
            datagram = await loop.sock_recv(self._socket, 4096)
            fields = dict(
                line.split("=", 1)
                for line in datagram.decode(errors="replace").splitlines()
                if "=" in line
            )
            if fields.get("READY") == "1":
                return fields
