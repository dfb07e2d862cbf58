"""The node's WireGuard public key on its Node: the `mesh.dev/wireguard-public-key` annotation
(as Cilium's agent writes network.cilium.io/wg-pub-key), which every other agent reads to make
this node its peer. Written at start and after each rotation (a merge patch of the one
annotation), retried until the API server takes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.encryption.keys import ANNOTATION
from mesh.kube.client import API_ERRORS, api_message
from mesh.kube.resources import NODES

log = logging.getLogger(__name__)
RETRY = 2.0
Patch = Callable[[str, str, Any, str], Awaitable[tuple[int, Any]]]


class NodeKeyPublisher:
    def __init__(self, call: Patch, node: str, public_key: Callable[[], str | None],
                 changed: asyncio.Event) -> None:
        """`call`: the client's (method, path, body, content type); `changed` is set when
        `public_key()` has a new value to publish."""
        self.call = call
        self.node = node
        self.public_key = public_key
        self.changed = changed
        self.writes = 0

    async def run(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            key = self.public_key()
            published = None
            while key is not None and key != published:
                try:
                    code, body = await self.call(
                        "PATCH", NODES.item("", self.node),
                        {"metadata": {"annotations": {ANNOTATION: key}}},
                        "application/merge-patch+json")
                    if code != 200:
                        raise ConnectionError(f"{code} {api_message(body)}")
                    published = key
                    self.writes += 1
                    log.info("WireGuard public key published on the Node",
                             extra={"node": self.node, "public_key": key})
                except API_ERRORS as e:
                    log.warning("WireGuard public key not published: retrying",
                                extra={"node": self.node, "error": str(e)})
                    await asyncio.sleep(RETRY)
                key = self.public_key()
