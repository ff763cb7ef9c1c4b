"""The fleet's state: its agents, their slots and reservations, the buffer of waiting requests, and the link that shares them with ``--workers``' processes."""
