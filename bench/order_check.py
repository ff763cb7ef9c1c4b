"""How far an observed order is from FIFO: inversions and displacement, for the buffer sweep.

The fast upstream records the ``seq`` of each request in the order it arrived; the load
generator numbered them in the order it sent them. A buffer that lets waiters leave in FIFO
order gives the sorted sequence, up to local swaps: with ``window`` slots serving at once, the
requests dispatched together race each other over separate connections, so a displacement below
``window`` says nothing about the buffer. Hence three figures:

- ``inversions``: pairs that arrived in the opposite order to the one they were sent in;
- ``max_displacement``: how far any request arrived from its place in send order;
- ``displaced_beyond``: requests that arrived more than ``window`` places from that place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OrderCheck:
    count: int
    inversions: int
    max_displacement: int
    displaced_beyond: int
    window: int

    @property
    def inverted_share(self) -> float:
        """Inversions as a share of all pairs (0: in order; about 0.5: random)."""
        pairs = self.count * (self.count - 1) // 2
        return self.inversions / pairs if pairs else 0.0


def inversions(values: Sequence[int]) -> int:
    """Pairs i < j with values[i] > values[j], by merge sort: O(n log n)."""
    items = list(values)
    count = 0
    width = 1
    while width < len(items):
        merged: list[int] = []
        for start in range(0, len(items), 2 * width):
            left = items[start : start + width]
            right = items[start + width : start + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if left[i] <= right[j]:
                    merged.append(left[i])
                    i += 1
                else:
                    merged.append(right[j])
                    count += len(left) - i
                    j += 1
            merged += left[i:]
            merged += right[j:]
        items = merged
        width *= 2
    return count


def check_order(arrived: Sequence[int], window: int) -> OrderCheck:
    """Compare ``arrived`` (seq numbers in arrival order) with their sorted order."""
    rank = {seq: place for place, seq in enumerate(sorted(arrived))}
    displacements = [abs(place - rank[seq]) for place, seq in enumerate(arrived)]
    return OrderCheck(
        count=len(arrived),
        inversions=inversions(arrived),
        max_displacement=max(displacements, default=0),
        displaced_beyond=sum(displacement > window for displacement in displacements),
        window=window,
    )
