"""Forwarding in eBPF: bpf/fwd.c at tc ingress of every local pod's host-side veth
(`mesh_from_pod`) and of the node's underlay device (`mesh_from_underlay`, which also
balances NodePorts), redirecting packets for a pod of this node straight into its namespace
(bpf_redirect_peer); the rest goes on to the kernel.

The local endpoints come from what the CNI plugin made, read over netlink: each /32 route to
a `mesh*` veth is a pod, the permanent neighbour entry on it holds the pod's MAC. So the
plugin and the agent need no API between them, and a restarted agent finds the pods again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.cni.interfaces import HOST_PREFIX
from mesh.datapath.flowevents import FlowEvents
from mesh.datapath.fqdn import FqdnReconciler
from mesh.datapath.layout import EndpointInfo, address_of, be32
from mesh.datapath.policy import PolicyReconciler
from mesh.datapath.programs import Loaded, compile_program

log = logging.getLogger(__name__)
_SCHED_CLS = 3
_INGRESS = "ffff:fff2"
_EGRESS = "ffff:fff3"
_PRIO = 0xC001  # our filter's priority and handle on a device's ingress
_HANDLE = 1
_HOST_SIDE = re.compile(HOST_PREFIX + r"[0-9a-f]{11}")  # what the CNI plugin names them


@dataclass(frozen=True)
class LocalEndpoint:
    address: str
    ifindex: int
    pod_mac: str
    host_mac: str


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def local_endpoints(ip: Any) -> list[LocalEndpoint]:
    """This node's pods, from the routes and neighbours the CNI plugin wrote."""
    links = {link["index"]: link for link in ip.get_links()}
    neigh = {(n.get("ifindex"), n.get_attr("NDA_DST")): n.get_attr("NDA_LLADDR")
             for n in ip.get_neighbours(family=2)}
    out = []
    for r in ip.get_routes(family=2):
        oif = r.get_attr("RTA_OIF")
        link = links.get(oif)
        dst = r.get_attr("RTA_DST")
        if r.get("dst_len") != 32 or link is None or dst is None:
            continue
        if not _HOST_SIDE.fullmatch(str(link.get_attr("IFLA_IFNAME"))):
            continue
        pod_mac = neigh.get((oif, dst))
        if pod_mac:
            out.append(LocalEndpoint(dst, oif, pod_mac, link.get_attr("IFLA_ADDRESS")))
    return out


# The policy route of packets handed to the node's Envoy (bpf/lib/common.h's marks): marked
# TO_PROXY, they are delivered locally although sent to a ClusterIP, as Cilium does.
PROXY_MARK, PROXY_MASK, PROXY_TABLE, PROXY_RULE_PRIORITY = 0x200, 0xF00, 2004, 9000
_SCOPE_HOST = 254


def proxy_route(ip: Any) -> None:
    """`ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9000` and `ip route replace local
    default dev lo table 2004`, idempotent."""
    from pyroute2 import NetlinkError

    lo = ip.link_lookup(ifname="lo")[0]
    ip.route("replace", dst="0.0.0.0/0", table=PROXY_TABLE, type="local", oif=lo,
             scope=_SCOPE_HOST, family=2)
    present = any(r.get_attr("FRA_TABLE") == PROXY_TABLE and
                  r.get_attr("FRA_FWMARK") == PROXY_MARK for r in ip.get_rules(family=2))
    if not present:
        try:
            ip.rule("add", table=PROXY_TABLE, priority=PROXY_RULE_PRIORITY, fwmark=PROXY_MARK,
                    fwmask=PROXY_MASK)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: another agent's, the same
                raise


TPROXY_TABLE = "mesh_tproxy"
_TPROXY_RULESET = f"""
table ip {TPROXY_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp meta mark & 0x{PROXY_MASK:x} == 0x{PROXY_MARK:x} \\
      tproxy to 127.0.0.1:{{port}} meta mark set 0x{PROXY_MARK:x} accept
  }}
}}
"""


def tproxy_rule(port: int = 15001) -> None:
    """The TPROXY variant's netfilter side, a table of our own (replaced whole): a packet
    the datapath marked TO_PROXY goes to Envoy's mesh listener (its original destination
    kept), as Cilium's TPROXY rules do."""
    import subprocess

    subprocess.run(["nft", "-f", "-"], check=True, capture_output=True, text=True,
                   input=f"table ip {TPROXY_TABLE}\ndelete table ip {TPROXY_TABLE}\n"
                   + _TPROXY_RULESET.replace("{port}", str(port)))


def host_addresses(ip: Any) -> frozenset[str]:
    """This node's own IPv4 addresses (every interface of its namespace)."""
    return frozenset(str(a.get_attr("IFA_ADDRESS")) for a in ip.get_addr(family=2)
                     if a.get_attr("IFA_ADDRESS"))


class Forwarding:
    def __init__(self, pin_dir: Path, underlay: str | None = None,
                 redirect: str = "sk-assign", dns_cache: Path | None = None) -> None:
        # Only the devices named here are touched: the CNI plugin's host-side veths (by
        # their exact name pattern) and `underlay` if given; on each, only our own filter.
        if redirect not in ("sk-assign", "tproxy"):
            raise ValueError(f"redirect {redirect!r}: sk-assign or tproxy")
        self.redirect = redirect
        self.loaded: Loaded = compile_program(
            "fwd.c", pin_dir, ("MESH_REDIRECT_TPROXY",) if redirect == "tproxy" else ())
        self.program = self.loaded.function("mesh_from_pod", _SCHED_CLS)
        self.underlay_program = self.loaded.function("mesh_from_underlay", _SCHED_CLS)
        self.to_pod_program = self.loaded.function("mesh_to_pod", _SCHED_CLS)
        self.endpoints = self.loaded.table("mesh_endpoints")
        self.policy = PolicyReconciler(
            self.loaded.table("mesh_ipcache"), self.loaded.table("mesh_policy_endpoints"),
            self.loaded.table("mesh_policy"), self.loaded.table("mesh_policy_revision"),
            self.loaded.table("mesh_policy_stats"),
            tiers={"admin": self.loaded.table("mesh_policy_admin"),
                   "baseline": self.loaded.table("mesh_policy_baseline")})
        self.fqdn = FqdnReconciler(self.loaded.table("mesh_policy_fqdn"), dns_cache)
        self.underlay = underlay
        self._attached: set[int] = set()
        self._routed = False
        self._written: dict[str, LocalEndpoint] = {}
        with contextlib.suppress(Exception):  # what a previous agent wrote
            for k, v in self.endpoints.items():
                addr = int(k.value)
                self._written[address_of(addr)] = LocalEndpoint(
                    address_of(addr), int(v.ifindex), "", "")

    def sync(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ip:
            if not self._routed:
                proxy_route(ip)
                if self.redirect == "tproxy":
                    tproxy_rule()
                self._routed = True
            self.policy.set_host_addresses(host_addresses(ip))
            found = {e.address: e for e in local_endpoints(ip)}
            for address, e in found.items():
                if self._written.get(address) != e:
                    info = EndpointInfo(ifindex=e.ifindex)
                    info.pod_mac[:] = list(_mac(e.pod_mac))
                    info.host_mac[:] = list(_mac(e.host_mac))
                    self.endpoints[ctypes.c_uint32(be32(address))] = info
                    self._written[address] = e
            for address in [a for a in self._written if a not in found]:
                with contextlib.suppress(KeyError):
                    del self.endpoints[ctypes.c_uint32(be32(address))]
                del self._written[address]
            targets = {e.ifindex for e in found.values()}
            underlay = set(ip.link_lookup(ifname=self.underlay)) if self.underlay else set()
            for index in (targets | underlay) - self._attached:
                self._attach(ip, index, underlay=index in underlay)
            self._attached &= {link["index"] for link in ip.get_links()}

    def _attach(self, ip: Any, index: int, underlay: bool = False) -> None:
        """Our program at the device's tc ingress (and at a pod veth's egress, the pod's
        ingress policy for what the kernel routes to it), as our own filter (its priority and
        handle): an earlier agent's is replaced, anyone else's filters stay."""
        from pyroute2 import NetlinkError

        with contextlib.suppress(NetlinkError):
            ip.tc("add", "clsact", index)  # there already: fine
        program = self.underlay_program if underlay else self.program
        try:
            ip.tc("replace-filter", "bpf", index, handle=_HANDLE, prio=_PRIO,
                  fd=program.fd, name=program.name.decode(), parent=_INGRESS,
                  direct_action=True)
            if not underlay:
                ip.tc("replace-filter", "bpf", index, handle=_HANDLE, prio=_PRIO,
                      fd=self.to_pod_program.fd, name=self.to_pod_program.name.decode(),
                      parent=_EGRESS, direct_action=True)
            self._attached.add(index)
        except NetlinkError as e:
            log.error("cannot attach the forwarding program", extra={"ifindex": index,
                                                                     "error": str(e)})

    def is_local(self, address: str) -> bool:
        """Whether the address is one of this node's pods (as of the last sync)."""
        return address in self._written

    def metered_tables(self) -> dict[str, Any]:
        """The maps whose fill the metrics report."""
        return {name: self.loaded.table(name) for name in (
            "mesh_endpoints", "mesh_ct4", "mesh_ct4_rev", "mesh_policy_ct", "mesh_flows",
            "mesh_ipcache")}

    def flow_events(self) -> FlowEvents:
        return FlowEvents(self.loaded)

    def encryption_tables(self) -> dict[str, Any]:
        """The maps the encryption sink writes (bpf/lib/encrypt.h)."""
        return {name: self.loaded.table(name) for name in (
            "mesh_encrypt4", "mesh_encrypt6", "mesh_encrypt_config", "mesh_encrypt_stats")}

    def stats(self) -> tuple[int, int, int, int]:
        """(packets redirected to a local pod, left to the kernel, NodePort packets
        balanced, handed to the node's Envoy), all CPUs."""
        table = self.loaded.table("mesh_fwd_stats")
        local, kernel, nodeport, proxy = (sum(table[ctypes.c_uint32(i)]) for i in range(4))
        return (local, kernel, nodeport, proxy)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loaded.close()

