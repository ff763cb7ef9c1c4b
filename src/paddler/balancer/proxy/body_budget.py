"""A bound on the request bodies the balancer holds in memory at once, across all requests.

Bodies are read whole before dispatch (they may have to be resent to another server), so without
this bound many clients sending large bodies at once could exhaust the balancer's memory, no
matter how small the request buffer is. Each request takes bytes from the budget as they arrive
and gives them back when it ends; a request that finds the budget spent is refused with 503.
"""

from __future__ import annotations


class BodyBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (and nothing reserved) if that would pass the limit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size
