"""Source trees of the balancer with one part of its per-request logic switched off, to count
what each part costs: ``python -m bench.profile_proxy instructions`` runs each as
``paddler@TREE``, and a part's cost is the difference from the whole.

Usage::

    python -m bench.ablations DIR [SOURCES]

makes ``DIR/NAME/src`` for each ablation below: a link to ``SOURCES/src/paddler`` (this
checkout's by default) and a ``sitecustomize.py`` that switches the part off when the balancer
starts; it prints the ``--contestants`` list of them. For example::

    python -m bench.profile_proxy instructions --what small \\
        --contestants paddler,$(python -m bench.ablations /tmp/ablations)

What is switched off is only skipped, never replaced by something cheaper, so a difference is
the part's whole cost (the connection guard's is the site and its middleware frame).
"""

from __future__ import annotations

import sys
from pathlib import Path

_OBSERVER = "from paddler.balancer.observability.observers import Observer, _HOOKS\n"

ABLATIONS = {
    "no-request-log": _OBSERVER
    + "import paddler.balancer.observability.request_log as m\n"
    + "m.RequestLog.request_finished = Observer.request_finished\n",
    "no-prometheus": _OBSERVER
    + "import paddler.balancer.observability.prometheus_metrics as m\n"
    + "for hook in _HOOKS:\n"
    + "    setattr(m.PrometheusMetrics, hook, getattr(Observer, hook))\n",
    "no-stats-history": _OBSERVER
    + "import paddler.balancer.observability.stats_history as m\n"
    + "m.StatsHistory.request_finished = Observer.request_finished\n",
    "no-observers": "import paddler.balancer.observability.observers as m\n"
    + "m.Observers.add = lambda self, observer: None\n",
    "no-traits": "import paddler.balancer.routing.traits_reader as m\n"
    + "from paddler.balancer.routing.request_traits import NO_TRAITS\n"
    + "async def read(self, method, path, query, body):\n"
    + "    return NO_TRAITS\n"
    + "m.TraitsReader.read = read\n",
    "no-response-tail": "import paddler.balancer.proxy.reverse_proxy as m\n"
    + "class Tail:\n"
    + "    def feed(self, chunk): pass\n"
    + "    def cache_report(self): return None\n"
    + "m.ResponseTail = Tail\n",
    "no-connection-guard": "from aiohttp import web\n"
    + "import paddler.balancer.proxy.client_connections as c\n"
    + "import paddler.balancer.service as s\n"
    + "async def middleware(self, request, handler):\n"
    + "    return await handler(request)\n"
    + "c.ClientConnections.middleware = middleware\n"
    + "async def listen(runner, host, port, connections, ssl_context=None):\n"
    + "    await web.TCPSite(runner, host, port).start()\n"
    + "    return int(runner.addresses[-1][1])\n"
    + "s._listen = listen\n",
}


def make(directory: Path, sources: Path) -> list[str]:
    """The ablation trees in ``directory``, of the package in ``sources``; their contestants."""
    package = (sources / "src" / "paddler").resolve()
    contestants = []
    for name, patch in ABLATIONS.items():
        tree = directory / name
        (tree / "src").mkdir(parents=True, exist_ok=True)
        link = tree / "src" / "paddler"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(package)
        (tree / "src" / "sitecustomize.py").write_text(patch)
        contestants.append(f"paddler@{tree.resolve()}")
    return contestants


def main(argv: list[str]) -> None:
    if not 1 <= len(argv) <= 2:
        raise SystemExit(__doc__)
    sources = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parents[1]
    print(",".join(make(Path(argv[0]), sources)))


if __name__ == "__main__":
    main(sys.argv[1:])
