"""The original Paddler's documented commands, pasted verbatim, against real llama.cpp.

Run by ``test_original_commands.py`` inside private network and mount namespaces (``unshare
--net --mount``), because the commands name fixed ports (8085, 8088, 8080), a public address
(``196.168.2.10``, a typo for 192.168 in the original's README, kept as it is), a host name
(``paddler_balancer.example.com``) and the EC2 metadata service. In the namespace those are all
this machine's: the addresses are put on its loopback, the host name in its own /etc/hosts, and a
stand-in for the metadata service answers on 169.254.169.254 (the one fake: EC2 is not here).

Exit code 0 and a last line "ok" mean every check passed; anything else says what failed.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# README.md of distantmagic/paddler, "Running Agents" (every version from v0.1.0 to v0.10).
AGENT = """\
./paddler agent \\
    --external-llamacpp-host 127.0.0.1 \\
    --external-llamacpp-port 8088 \\
    --local-llamacpp-host 127.0.0.1 \\
    --local-llamacpp-port 8088 \\
    --management-host 127.0.0.1 \\
    --management-port 8085
"""

# "Running Load Balancer", with the flag its next paragraph gives ("You can enable dashboard
# ... with `--management-dashboard-enable=true` flag"), and the flags of its "StatsD Metrics"
# block in place of that block's "# .. put all the other flags here ..." line.
BALANCER = """\
./paddler balancer \\
    --management-host 127.0.0.1 \\
    --management-port 8085 \\
    --reverseproxy-host 196.168.2.10 \\
    --reverseproxy-port 8080 \\
    --management-dashboard-enable=true \\
    --statsd-enable=true \\
    --statsd-host=127.0.0.1 \\
    --statsd-port=8125 \\
    --statsd-scheme=http
"""

# "AWS Integration" (v0.6.0 and later).
AWS_AGENT = """\
./paddler agent \\
    --external-llamacpp-host aws:metadata:local-ipv4 \\
    --external-llamacpp-port 8088 \\
    --local-llamacpp-host 127.0.0.1 \\
    --local-llamacpp-port 8088 \\
    --management-host paddler_balancer.example.com \\
    --management-port 8085
"""

PROXY = "http://196.168.2.10:8080"
MANAGEMENT = "http://127.0.0.1:8085"
INSTANCE_ADDRESS = "10.20.30.40"


def run(command: str) -> None:
    subprocess.run(command, shell=True, check=True)


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def post(url: str, body: dict[str, object]) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read(), dict(response.headers)


def until(what: str, condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if condition():  # type: ignore[operator]
                return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Metadata(http.server.BaseHTTPRequestHandler):
    """EC2's instance metadata service, IMDSv2, as far as ``aws:metadata:local-ipv4`` uses it."""

    def do_PUT(self) -> None:
        self._answer("token" if self.path == "/latest/api/token" else None)

    def do_GET(self) -> None:
        authorized = self.headers.get("X-aws-ec2-metadata-token") == "token"
        wanted = self.path == "/latest/meta-data/local-ipv4"
        self._answer(INSTANCE_ADDRESS if authorized and wanted else None)

    def _answer(self, text: str | None) -> None:
        self.send_response(200 if text else 404)
        self.end_headers()
        if text:
            self.wfile.write(text.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def started(command: list[str] | str, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        command,
        shell=isinstance(command, str),
        cwd=cwd,
        start_new_session=True,
        # A pipe nobody writes: llama.cpp's child process exits when its stdin ends.
        stdin=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def agents() -> list[dict[str, object]]:
    return list(json.loads(get(f"{MANAGEMENT}/api/v1/agents")[1])["agents"])


def main(model: str, paddler: str) -> None:
    run("ip link set lo up")
    for address in ("196.168.2.10", "169.254.169.254", INSTANCE_ADDRESS):
        run(f"ip addr add {address}/32 dev lo")
    workdir = Path(tempfile.mkdtemp())
    hosts = workdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 paddler_balancer.example.com\n")
    run(f"mount --bind {hosts} /etc/hosts")
    (workdir / "paddler").symlink_to(paddler)  # the commands say ./paddler

    metadata = http.server.ThreadingHTTPServer(("169.254.169.254", 80), Metadata)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 8125))
    statsd.settimeout(10)

    llamacpp = [
        sys.executable,
        "-m",
        "paddler.agent.llamacpp_child",
        f"--model={model}",
        "--host=0.0.0.0",  # the AWS agent's balancer reaches it at the instance's address
        "--port=8088",
        "--slots=2",
        "--ctx=2048",
        "--threads=1",
    ]
    with (
        started(llamacpp, workdir),
        started(BALANCER, workdir),
        started(AGENT, workdir) as agent,
    ):
        until("llama.cpp on 8088", lambda: get("http://127.0.0.1:8088/health")[0] == 200)
        until(
            "the aggregated /health on 196.168.2.10:8080",
            lambda: json.loads(get(f"{PROXY}/health")[1])["slots_idle"] == 2,
        )
        # ignore_eos: the tiny model samples its end-of-sequence token now and then.
        status, body, _ = post(
            f"{PROXY}/completion", {"prompt": "Hello", "n_predict": 4, "ignore_eos": True}
        )
        assert status == 200 and json.loads(body)["tokens_predicted"] == 4, body
        status, body, headers = get(f"{MANAGEMENT}/dashboard")
        assert status == 200 and headers["Content-Type"].startswith("text/html"), status
        gauges = set()
        while not {"paddler.slots_idle", "paddler.slots_processing"} <= gauges:
            for line in statsd.recv(4096).decode().splitlines():
                gauges.add(line.split(":", 1)[0])
        print("documented agent and balancer: served, dashboard and StatsD on", flush=True)

        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(15)
        until("the agent to leave", lambda: agents() == [])
        with started(AWS_AGENT, workdir):
            until(
                "the AWS agent, registered at the instance's address",
                lambda: (
                    [(a["url"], a["state"]) for a in agents()]
                    == [(f"http://{INSTANCE_ADDRESS}:8088", "ok")]
                ),
            )
            status, body, _ = post(f"{PROXY}/completion", {"prompt": "Hello", "n_predict": 2})
            assert status == 200, body
        print("documented AWS agent: served through the instance's address", flush=True)
    print("ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
