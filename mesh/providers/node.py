"""The node provider: this node's facts as a core `Node` object in the store.

Its addresses (every interface's, from netlink) go in `status.addresses` as Kubernetes
reports them. A Gateway's static address may be added to the node after the Gateway, so they
are read again every few seconds; the store only changes when they do.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from pyroute2 import IPRoute

from mesh.store.objects import content_hash, parse_object
from mesh.store.store import Store

log = logging.getLogger(__name__)
SOURCE = "node"
INTERVAL = 5.0  # seconds


def node_addresses() -> list[str] | None:
    """The IP addresses of this node's interfaces, or None if they cannot be read."""
    try:
        with IPRoute() as ip:
            return sorted({str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
                           for a in ip.get_addr() if a.get_attr("IFA_ADDRESS")})
    except (OSError, ValueError) as e:
        log.warning("cannot list the node's addresses", extra={"error": str(e)})
        return None


def node_object(name: str, addresses: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a}
                                     for a in addresses]}}


class NodeProvider:
    def __init__(self, node_name: str, store: Store, interval: float = INTERVAL) -> None:
        self.node_name = node_name
        self.store = store
        self.interval = interval
        self.synced = asyncio.Event()

    def load(self, addresses: list[str] | None) -> bool:
        """Put the node with these addresses in the store; None (unknown) puts none, and
        then any address a Gateway asks for is tried (Envoy says if it cannot bind)."""
        if addresses is None:
            return self.store.replace(SOURCE, ())
        body = node_object(self.node_name, addresses)
        obj = parse_object(body, SOURCE, body_hash=content_hash(body))
        return self.store.replace(SOURCE, (obj,))

    async def run(self) -> None:
        while True:
            addresses = await asyncio.to_thread(node_addresses)
            if self.load(addresses):
                log.info("node addresses", extra={"addresses": addresses})
            self.synced.set()
            await asyncio.sleep(self.interval)
