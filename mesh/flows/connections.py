"""The node's connections by their tuple, so that all the flows of one connection carry one
id: its L3/L4 events (new, changed, closed), its socket's translation, and the requests the
node's Envoy served over it. That is how an L7 flow is joined to its connection.

The tuple is the client's address and port, the address and port it connected to (a
ClusterIP for a connection handed to Envoy: the datapath and Envoy's access log both see
that one) and the protocol. Bounded: the oldest connections are forgotten first (a request
on a connection forgotten gets no id).
"""

from __future__ import annotations

import collections
import uuid

MAX_CONNECTIONS = 65536

# (client address, client port, server address, server port, protocol name)
Tuple = tuple[str, int, str, int, str]


class Connections:
    def __init__(self, capacity: int = MAX_CONNECTIONS) -> None:
        self.capacity = capacity
        self._ids: collections.OrderedDict[Tuple, str] = collections.OrderedDict()

    def open(self, key: Tuple) -> str:
        """A new connection on this tuple (a reused tuple is a new connection): its id."""
        self._ids.pop(key, None)
        self._ids[key] = new = str(uuid.uuid4())
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return new

    def get(self, key: Tuple) -> str:
        """The id of the connection on this tuple, or "" (not seen, or forgotten)."""
        return self._ids.get(key, "")

    def __len__(self) -> int:
        return len(self._ids)
