"""What the CNI plugin names the interfaces it makes: the host side of each pod's veth pair,
which the datapath recognizes and attaches its programs to.

The plugin runs as a zip application on the node's own Python (3.9 or later) with nothing
of the project's but this module beside it (mesh/cni/install.py): the standard library only.
"""

from __future__ import annotations

import hashlib

HOST_PREFIX = "mesh"


def host_ifname(container_id: str, ifname: str) -> str:
    """The host side's name: stable per (container, interface), at most 15 characters."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_PREFIX + digest[: 15 - len(HOST_PREFIX)]
