"""The node's last flows and the streams of those who follow them.

A ring of the last `capacity` flows; each follower gets a bounded queue of its own, and a
follower that does not keep up loses flows rather than hold the others back or grow without
bound: what it lost is counted, per follower and in all, and told to it in order (a `Lost`
where the gap is), as Hubble's LostEvent does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from mesh.flows.model import Flow

DEFAULT_CAPACITY = 4095  # Hubble's default ring (2^12 - 1)
FOLLOWER_QUEUE = 1024


# Where flows were lost (flow.proto's LostEventSource names): a follower's queue was full,
# or the datapath's ring buffer was (the events never reached the store).
FOLLOWER_LOST = "HUBBLE_RING_BUFFER"
RING_LOST = "PERF_EVENT_RING_BUFFER"


@dataclass(frozen=True)
class Lost:
    """Flows a follower did not get, and where they were lost."""

    count: int
    source: str = FOLLOWER_LOST


class Follower:
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[Flow | Lost] = asyncio.Queue(size)
        self.pending_lost = 0

    def offer(self, item: Flow | Lost) -> bool:
        if self.pending_lost and not self.queue.full():
            self.queue.put_nowait(Lost(self.pending_lost))
            self.pending_lost = 0
        if self.queue.full():
            self.pending_lost += item.count if isinstance(item, Lost) else 1
            return False
        self.queue.put_nowait(item)
        return True


class FlowStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 follower_queue: int = FOLLOWER_QUEUE,
                 listener: Callable[[Flow], None] | None = None) -> None:
        """`listener`: told of each flow added (the metrics)."""
        if capacity < 1:
            raise ValueError("the ring holds at least one flow")
        self.capacity = capacity
        self.listener = listener
        self.follower_queue = follower_queue
        self._ring: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self._followers: set[Follower] = set()
        self.seen = 0  # flows added since the start
        self.lost = 0  # flows some follower did not get
        self.lost_at_source = 0  # flows that never reached the store (add_lost)

    def add(self, flow: Flow) -> None:
        self._ring.append(flow)
        self.seen += 1
        if self.listener is not None:
            self.listener(flow)
        for f in self._followers:
            if not f.offer(flow):
                self.lost += 1

    def add_lost(self, count: int, source: str) -> None:
        """Flows lost before they reached the store: counted, and told to every follower."""
        self.lost_at_source += count
        for f in self._followers:
            f.offer(Lost(count, source))

    def __len__(self) -> int:
        return len(self._ring)

    def last(self, number: int | None = None,
             match: Callable[[Flow], bool] | None = None) -> list[Flow]:
        """The last `number` flows that `match` takes (all: None), oldest first."""
        found = [f for f in self._ring if match is None or match(f)]
        return found if number is None else found[max(0, len(found) - number):]

    async def follow(self, number: int = 0, match: Callable[[Flow], bool] | None = None
                     ) -> AsyncGenerator[Flow | Lost, None]:
        """The last `number` flows `match` takes, then every new one as it comes (and a
        `Lost` where this follower fell behind)."""
        follower = Follower(self.follower_queue)
        self._followers.add(follower)  # before reading the ring: no flow falls between
        try:
            for flow in self.last(number, match) if number else []:
                yield flow
            while True:
                item = await follower.queue.get()
                if isinstance(item, Lost) or match is None or match(item):
                    yield item
        finally:
            self._followers.discard(follower)
