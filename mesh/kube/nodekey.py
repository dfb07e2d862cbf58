"""What the node's encryption tells the other nodes, on its Node: the WireGuard public key
(`mesh.dev/wireguard-public-key`, as Cilium's agent writes network.cilium.io/wg-pub-key), or
the IPsec key SPIs it has states for (`mesh.dev/ipsec-spis`), which every other agent reads
to make this node its peer. Written at start and after each change (a merge patch of the one
annotation), retried until the API server takes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.kube.client import API_ERRORS, api_message
from mesh.kube.resources import NODES

log = logging.getLogger(__name__)
RETRY = 2.0
Patch = Callable[[str, str, Any, str], Awaitable[tuple[int, Any]]]


class NodeAnnotationPublisher:
    def __init__(self, call: Patch, node: str, annotation: str,
                 value: Callable[[], str | None], changed: asyncio.Event) -> None:
        """`call`: the client's (method, path, body, content type); `changed` is set when
        `value()` has a new value to publish (None: nothing yet)."""
        self.call = call
        self.node = node
        self.annotation = annotation
        self.value = value
        self.changed = changed
        self.writes = 0

    async def run(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            key = self.value()
            published = None
            while key is not None and key != published:
                try:
                    code, body = await self.call(
                        "PATCH", NODES.item("", self.node),
                        {"metadata": {"annotations": {self.annotation: key}}},
                        "application/merge-patch+json")
                    if code != 200:
                        raise ConnectionError(f"{code} {api_message(body)}")
                    published = key
                    self.writes += 1
                    log.info("published on the Node", extra={
                        "node": self.node, "annotation": self.annotation, "value": key})
                except API_ERRORS as e:
                    log.warning("not published on the Node: retrying", extra={
                        "node": self.node, "annotation": self.annotation, "error": str(e)})
                    await asyncio.sleep(RETRY)
                key = self.value()
