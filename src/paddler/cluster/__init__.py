"""``paddler cluster``: a whole fleet on this machine, as separate processes.

One balancer and N agents, each agent running its own llama.cpp server (``paddler agent
--model``), exactly as they would run on separate machines; the agents authenticate with a token
generated for this cluster.

- ``config``: the frozen ``ClusterConfig`` the CLI builds;
- ``ports``: the ports are checked before anything starts;
- ``child``: one process of the cluster, its output forwarded to stderr, its last line kept;
- ``notify_socket``: how the balancer tells us that *it* holds the ports;
- ``progress``: the steps the user sees on stdout;
- ``banner``: the ready-to-paste examples;
- ``cluster``: start-up, supervision and the ordered stop.
"""

from paddler.cluster.cluster import Cluster, ClusterFailed
from paddler.cluster.config import ClusterConfig

__all__ = ["Cluster", "ClusterConfig", "ClusterFailed"]
