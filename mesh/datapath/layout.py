"""The maps' key and value layouts, mirrored from bpf/lib/lb.h and bpf/lib/endpoints.h in one place.

Each ctypes structure here is the C struct of the same name, field for field; the test
tests/test_datapath.py compares them with the types bcc builds from the C. Addresses and
ports are kept in network byte order, as the C keeps them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from typing import Any

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}


def be32(address: str) -> int:
    """An IPv4 address as the __be32 the C compares (its bytes in network order, read as
    the host's integer)."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, "little")


def be16(port: int) -> int:
    return socket.htons(port)


def address_of(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, "little")))


class Lb4Key(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint32), ("dport", ctypes.c_uint16),
                ("backend_slot", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class Lb4Service(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("count", ctypes.c_uint16),
                ("rev_nat_index", ctypes.c_uint16), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class Lb4Backend(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("flags", ctypes.c_uint8)]


class Lb4ReverseNat(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class Lb4SockRev(ctypes.Structure):
    _fields_ = [("address", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("rev_nat_index", ctypes.c_uint16), ("backend_address", ctypes.c_uint32),
                ("backend_port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class EndpointInfo(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("pod_mac", ctypes.c_uint8 * 6),
                ("host_mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


# map name -> (key type, value type), as lb.h declares them
MAPS: dict[str, tuple[type[ctypes._SimpleCData] | type[ctypes.Structure],  # type: ignore[type-arg]
                      type[ctypes.Structure]]] = {
    "mesh_services": (Lb4Key, Lb4Service),
    "mesh_backends": (ctypes.c_uint32, Lb4Backend),
    "mesh_rev_nat": (ctypes.c_uint16, Lb4ReverseNat),
    "mesh_sock_rev": (ctypes.c_uint64, Lb4SockRev),
}
# ... and as endpoints.h declares them (bpf/fwd.c)
FWD_MAPS: dict[str, tuple[Any, type[ctypes.Structure] | Any]] = {
    "mesh_endpoints": (ctypes.c_uint32, EndpointInfo),
}
