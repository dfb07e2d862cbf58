"""The maps' key and value layouts, mirrored from bpf/lib/lb.h, ct.h, endpoints.h, policy.h,
encrypt.h and flow.h in one place.

Each ctypes structure here is the C struct of the same name, field for field; the test
tests/test_datapath.py compares them with the types bcc builds from the C. Addresses and
ports are kept in network byte order, as the C keeps them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from typing import Any

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
MAGLEV_M = 16381  # MESH_MAGLEV_M
SVC_MAGLEV = 0x2  # MESH_SVC_* flags of a frontend's slot 0
SVC_EXTERNAL = 0x4
SVC_L7 = 0x8


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
                ("pad", ctypes.c_uint8), ("proxy_port", ctypes.c_uint16)]


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


class Lb4Maglev(ctypes.Structure):
    _fields_ = [("backend_ids", ctypes.c_uint32 * MAGLEV_M)]


class Ct4Key(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class Ct4Entry(ctypes.Structure):
    _fields_ = [("backend_address", ctypes.c_uint32), ("backend_port", ctypes.c_uint16),
                ("nat_port", ctypes.c_uint16), ("nat_address", ctypes.c_uint32)]


class Ct4Rev(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16)]


class EndpointInfo(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("pod_mac", ctypes.c_uint8 * 6),
                ("host_mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class IpcacheKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("address", ctypes.c_uint32)]


class IpcacheInfo(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("cidr_identity", ctypes.c_uint32)]


class PolicyEndpoint(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class PolicyKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("endpoint", ctypes.c_uint32),
                ("identity", ctypes.c_uint32), ("direction", ctypes.c_uint8),
                ("proto", ctypes.c_uint8), ("dport", ctypes.c_uint16)]


class PolicyEntry(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("proxy_port", ctypes.c_uint16)]


class FqdnKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("endpoint", ctypes.c_uint32),
                ("address", ctypes.c_uint32), ("proto", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("dport", ctypes.c_uint16)]


class PolicyCtKey(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("daddr", ctypes.c_uint32),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("direction", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 2)]


class PolicyCtEntry(ctypes.Structure):
    _fields_ = [("revision", ctypes.c_uint32), ("allowed", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("proxy_port", ctypes.c_uint16)]


class TierEntry(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
                ("precedence", ctypes.c_uint32)]


class EncryptConfig(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Encrypt4Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("address", ctypes.c_uint32)]


class Encrypt6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("address", ctypes.c_uint8 * 16)]


class EncryptEntry(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32)]


ENC_PEER_UP = 0x1  # MESH_ENC_PEER_UP
ENC_STRICT = 0x1  # MESH_ENC_STRICT
ENC_XFRM = 0x2  # MESH_ENC_XFRM
ENCRYPT_STATS = ("sent", "dropped_ipv4", "dropped_ipv6")  # mesh_encrypt_stats' slots

EP_INGRESS_ISOLATED = 0x1  # MESH_EP_* of a policy endpoint
EP_EGRESS_ISOLATED = 0x2
EP_ADMIN = 0x4
EP_BASELINE = 0x8
EP_FQDN = 0x10
TIER_ACTIONS = {"Accept": 1, "Deny": 2, "Pass": 3}  # MESH_TIER_*
POLICY_ALLOW = 0x1  # MESH_POLICY_ALLOW
INGRESS, EGRESS = 0, 1  # MESH_POLICY_INGRESS, MESH_POLICY_EGRESS
# The policy key's prefix lengths: endpoint + identity + direction (any protocol and port),
# + protocol (any port), + port.
POLICY_PREFIX_ANY_PROTO = 72
POLICY_PREFIX_ANY_PORT = 80
POLICY_PREFIX_PORT = 96
# The FQDN key's: endpoint + address (any protocol and port), + protocol and pad (any port),
# + port.
FQDN_PREFIX_ANY_PROTO = 64
FQDN_PREFIX_ANY_PORT = 80
# mesh_policy_stats' slots, by name.
POLICY_STATS = ("denied_ingress", "denied_egress", "denied_no_identity", "allowed_new",
                "decided_again")


class FlowEntry(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64 * 2), ("bytes", ctypes.c_uint64 * 2),
                ("verdict", ctypes.c_uint8 * 2), ("reason", ctypes.c_uint8 * 2),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class FlowConfig(ctypes.Structure):
    _fields_ = [("enabled", ctypes.c_uint32)]


# struct flow_event, as the ring buffer carries it: time_ns, the key (addresses and ports
# in network byte order, kept as bytes), packets and bytes each way, ifindex, type, verdict,
# reason, point, is_reply, tcp_flags, policy, and the frontend a NEW connection was
# balanced from at its socket (port, address; network byte order, zero when none).
FLOW_EVENT = struct.Struct("=Q4s4s2s2sB3xQQQQIBBBBBBBx2s2x4s4x")
FLOW_POLICY_INGRESS, FLOW_POLICY_EGRESS = 1, 2  # MESH_FLOW_POLICY_*
FLOW_NEW, FLOW_CHANGED, FLOW_CLOSED = 1, 2, 3  # MESH_FLOW_*
FLOW_STATS = ("sent", "lost")  # mesh_flow_stats' slots


# map name -> (key type, value type), as lb.h declares them
MAPS: dict[str, tuple[type[ctypes._SimpleCData] | type[ctypes.Structure],  # type: ignore[type-arg]
                      type[ctypes.Structure]]] = {
    "mesh_services": (Lb4Key, Lb4Service),
    "mesh_backends": (ctypes.c_uint32, Lb4Backend),
    "mesh_rev_nat": (ctypes.c_uint16, Lb4ReverseNat),
    "mesh_sock_rev": (ctypes.c_uint64, Lb4SockRev),
    "mesh_maglev": (ctypes.c_uint16, Lb4Maglev),
    "mesh_lb_xlate": (Ct4Key, Lb4ReverseNat),  # a frontend, by the balanced tuple
}
# ... and as endpoints.h and ct.h declare them (bpf/fwd.c)
FWD_MAPS: dict[str, tuple[Any, type[ctypes.Structure] | Any]] = {
    "mesh_endpoints": (ctypes.c_uint32, EndpointInfo),
    "mesh_ct4": (Ct4Key, Ct4Entry),
    "mesh_ct4_rev": (Ct4Key, Ct4Rev),
    "mesh_ipcache": (IpcacheKey, IpcacheInfo),
    "mesh_policy_endpoints": (ctypes.c_uint32, PolicyEndpoint),
    "mesh_policy": (PolicyKey, PolicyEntry),
    "mesh_policy_admin": (PolicyKey, TierEntry),
    "mesh_policy_baseline": (PolicyKey, TierEntry),
    "mesh_policy_ct": (PolicyCtKey, PolicyCtEntry),
    "mesh_policy_fqdn": (FqdnKey, PolicyEntry),
    "mesh_encrypt4": (Encrypt4Key, EncryptEntry),
    "mesh_encrypt6": (Encrypt6Key, EncryptEntry),
    "mesh_encrypt_config": (ctypes.c_uint32, EncryptConfig),
    "mesh_flows": (Ct4Key, FlowEntry),  # keyed by the connection's tuple, as mesh_ct4
    "mesh_flow_config": (ctypes.c_uint32, FlowConfig),
}
