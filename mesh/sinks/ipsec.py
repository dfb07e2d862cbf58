"""The IPsec sink: the IR's peers (mesh/ir/encryption.py) onto the kernel's xfrm states and
policies (mesh/encryption/ipsec.py), the datapath's maps (bpf/lib/encrypt.h), the agent's
routing table for the node's own traffic, and the node's announcement of the key SPIs it has
states for; a status file for `mesh encryption status`.

The keys: the cluster's secret, a file (the chart mounts a Secret there; kubelet replaces
it when the Secret changes), read again when it changes. A file that does not parse is
refused with an error in the log and the status, and the last good keys stay.

A peer is up once this node has sent it through ESP, which it does once the peer announces
(the `mesh.dev/ipsec-spis` annotation, published by NodeAnnotationPublisher) a key of ours:
the newest such. Its pod CIDRs are then marked up in the datapath with MESH_ENC_XFRM (the
pods' packets go on to the kernel, whose out policy encrypts them), and routed in the agent's
table from the node's tunnel source (its pod CIDR's first address, on `lo`), so that the node's
own traffic, Envoy's among it, matches the same policies both ways. Order, so that no packet
leaves in the clear while a peer changes: going up, states and policy first, then the route,
then the map; going down, the map first (strict mode drops from then on), then the route
(blackholed in strict mode), then the policy.

Where the kernel has no ESP the sink says so (log, status), configures nothing, and strict
mode drops what would have gone to other nodes' pods: it fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import ir
from mesh.datapath.layout import ENC_STRICT, ENC_XFRM, EncryptConfig
from mesh.encryption import ipsec
from mesh.encryption.wireguard import ROUTE_TABLE
from mesh.sinks.encryption import (
    add_rule,
    datapath_counters,
    entries_down,
    entries_up,
    iproute,
    steering,
    write_status,
)
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
RECHECK = 2.0  # seconds between looks at the keys file and the counters
REWRITE_EVERY = 15  # rounds: everything is written again (someone may have flushed xfrm)
MAX_KEYS_FILE = 64 * 1024  # bytes


@dataclass
class IpsecSettings:
    state_dir: Path
    keys_file: Path  # the cluster's secret
    node: str  # this node's name: what its pair keys and SPIs are derived with
    strict: bool = True
    strict_cidrs: tuple[str, ...] = ()  # beyond the peers' pod CIDRs (IPv6 ones, say)


@dataclass
class _Applied:
    plan: ipsec.Plan | None = None
    routes: dict[str, str] = field(default_factory=dict)  # CIDR -> "via <endpoint>" | "blackhole"
    entries: dict[str, int] = field(default_factory=dict)  # CIDR -> flags
    rule: bool = False
    source: str | None = None  # the tunnel source, on lo


class IpsecSink:
    name = "encryption"

    def __init__(self, settings: IpsecSettings, tables: Mapping[str, Any] | None) -> None:
        """`tables`: the datapath's loaded maps (mesh_encrypt4, mesh_encrypt6,
        mesh_encrypt_config, mesh_encrypt_stats), None without a datapath."""
        self.settings = settings
        self.tables = tables
        self.desired = ir.Encryption()
        self.keys: list[ipsec.Key] = []
        self.keys_error = ""
        self._keys_stamp: tuple[int, int, int] | None = None
        self.esp_missing: str | None = None
        self.error = ""
        self.errors = 0
        self.rounds = 0
        self.applied = _Applied()
        self.sending: dict[str, int] = {}  # peer -> the key SPI sent to it with
        self._announcement: str | None = None  # set once the states are in
        self.announcement_changed = asyncio.Event()
        self._due = asyncio.Event()
        self.configured = asyncio.Event()

    # -- the sink's side -----------------------------------------------------------------

    def apply(self, model: ir.IR) -> None:
        if self._announcement is not None and \
                model.encryption.published_spis != self._announcement and \
                model.encryption.published_spis != self.desired.published_spis:
            self.announcement_changed.set()  # the Node says otherwise: published again
        if model.encryption != self.desired:
            self.desired = model.encryption
            self._due.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # nothing here changes an object's readiness

    def announcement(self) -> str | None:
        """The key SPIs this node has states for, once it has them (for its Node)."""
        return self._announcement

    # -- the component's side ------------------------------------------------------------

    async def run(self) -> None:
        self.esp_missing = await asyncio.to_thread(probe_esp)
        if self.esp_missing is not None:
            log.error("IPsec cannot run on this kernel: nothing is encrypted"
                      + (", and strict mode drops what would go to other nodes' pods"
                         if self.settings.strict else ""),
                      extra={"reason": self.esp_missing})
        log.info("encryption", extra={"mode": "ipsec", "keys": str(self.settings.keys_file),
                                      "strict": self.settings.strict})
        while True:
            try:
                await self._reconcile()
                self.error = ""
                self.configured.set()
            except (OSError, ipsec.IpsecError, RuntimeError) as e:
                self.errors += 1
                self.error = str(e)
                log.error("IPsec not configured: retrying", extra={"error": str(e)})
            self.rounds += 1
            write_status(self.settings.state_dir, self.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), RECHECK)
            self._due.clear()

    def _load_keys(self) -> None:
        """The secret's keys, read again when the file changed; a bad file leaves the last
        good keys (its error, never its content, in the log and the status)."""
        path = self.settings.keys_file
        try:
            st = path.stat()
        except FileNotFoundError:
            self.keys_error = f"no keys file {path}"
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._keys_stamp:
            return
        self._keys_stamp = stamp
        try:
            if st.st_size > MAX_KEYS_FILE:
                raise ipsec.IpsecError(f"larger than {MAX_KEYS_FILE} bytes")
            keys = ipsec.parse_keys(path.read_text())
        except (OSError, UnicodeDecodeError, ipsec.IpsecError) as e:
            self.keys_error = f"keys file {path} refused: {e}" + (
                "; the previous keys stay" if self.keys else "")
            log.error("IPsec keys refused", extra={"file": str(path), "error": str(e)})
            return
        if [k.spi for k in keys] != [k.spi for k in self.keys]:
            log.info("IPsec keys", extra={"spis": ipsec.format_spis(keys)})
        self.keys, self.keys_error = keys, ""

    def _me(self) -> ipsec.Node | None:
        d = self.desired
        if d.address is None or not d.pod_cidrs or self.esp_missing or not self.keys:
            return None
        return ipsec.Node(self.settings.node, d.address, d.pod_cidrs)

    async def _reconcile(self) -> None:
        self._load_keys()
        me = self._me()
        peers = [ipsec.Node(p.node, p.endpoint, p.allowed_ips) for p in self.desired.peers]
        send: dict[str, int] = {}
        wanted = ipsec.Plan((), ())
        if me is not None:
            for p in self.desired.peers:
                spi = ipsec.send_spi(self.keys, p.ipsec_spis)
                if spi is not None:
                    send[p.node] = spi
            wanted = ipsec.plan(me, peers, self.keys, send)
        entries, through = steering(self.desired.peers, set(send), self.settings.strict,
                                    self.settings.strict_cidrs, "tunnel")
        endpoint = {c: p.endpoint for p in self.desired.peers for c in p.allowed_ips}
        routes = {cidr: f"via {endpoint[cidr]}" if kind == "tunnel" else kind
                  for cidr, kind in through.items()}
        await asyncio.to_thread(self._take_down, entries, routes)
        await asyncio.to_thread(ipsec.apply, wanted, self.applied.plan,
                                self.rounds % REWRITE_EVERY == 0)
        self.applied.plan, self.sending = wanted, send
        if me is not None:
            announcement = ipsec.format_spis(self.keys)
            if announcement != self._announcement:
                # announced once the states for every peer are in: a peer that switches at
                # once finds them
                self._announcement = announcement
                self.announcement_changed.set()
        await asyncio.to_thread(self._bring_up, entries, routes)

    def _take_down(self, entries: Mapping[str, int], routes: Mapping[str, str]) -> None:
        """What is up and should not be: out of the maps, then out of the routes."""
        if self.tables is not None:
            entries_down(self.tables, self.applied.entries, entries)
        gone = [c for c, kind in self.applied.routes.items()
                if kind.startswith("via") and routes.get(c) != kind]
        if gone:
            with iproute() as ip:
                for cidr in gone:
                    self._route(ip, cidr, routes.get(cidr))

    def _bring_up(self, entries: Mapping[str, int], routes: Mapping[str, str]) -> None:
        from pyroute2 import NetlinkError

        with iproute() as ip:
            source = self.desired.tunnel_source
            if source is not None and source != self.applied.source:
                with contextlib.suppress(NetlinkError):  # there already
                    ip.addr("add", index=ip.link_lookup(ifname="lo")[0], address=source,
                            prefixlen=32)
                self.applied.source = source
                self.applied.routes = {c: k for c, k in self.applied.routes.items()
                                       if not k.startswith("via")}  # again, from it
            if not self.applied.rule:
                add_rule(ip)
                self.applied.rule = True
            for cidr, kind in routes.items():
                if self.applied.routes.get(cidr) != kind:
                    self._route(ip, cidr, kind)
            for cidr in [c for c in self.applied.routes if c not in routes]:
                self._route(ip, cidr, None)
        if self.tables is None:
            return
        flags = ENC_XFRM | (ENC_STRICT if self.settings.strict else 0)
        self.tables["mesh_encrypt_config"][ctypes.c_uint32(0)] = EncryptConfig(
            ifindex=0, flags=flags)
        entries_up(self.tables, self.applied.entries, entries)

    def _route(self, ip: Any, cidr: str, kind: str | None) -> None:
        """The table's route for `cidr`: the way to the peer's endpoint from the tunnel
        source (the xfrm policy then matches), blackholed, or none."""
        from pyroute2 import NetlinkError

        spec: dict[str, Any] = {"dst": cidr, "table": ROUTE_TABLE,
                                "family": 2 if ipaddress.ip_network(cidr).version == 4
                                else 10}
        if kind is None:
            with contextlib.suppress(NetlinkError):
                ip.route("del", **spec)
            self.applied.routes.pop(cidr, None)
            return
        if kind == "blackhole":
            ip.route("replace", type="blackhole", **spec)
        else:
            endpoint = kind.removeprefix("via ")
            (found,) = ip.route("get", dst=endpoint)[:1]
            spec["oif"] = found.get_attr("RTA_OIF")
            # as the main table's route to the peer's pods: through the peer (or the
            # router before it)
            spec["gateway"] = found.get_attr("RTA_GATEWAY") or endpoint
            if spec["family"] == 2 and self.applied.source:
                spec["prefsrc"] = self.applied.source
            ip.route("replace", **spec)
        self.applied.routes[cidr] = kind

    # -- visibility ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        try:
            counted = ipsec.traffic() if self.esp_missing is None else {}
        except (OSError, subprocess.CalledProcessError):
            counted = {}
        peers = []
        for p in self.desired.peers:
            spi = self.sending.get(p.node)
            problem = ""
            if spi is None:
                problem = ("this kernel has no ESP" if self.esp_missing else
                           "no usable keys" if not self.keys else
                           self.error or p.problem or (
                               "no key of ours announced by it yet" if p.ipsec_spis else
                               "no IPsec announcement from it yet"))
            peers.append({
                "node": p.node, "endpoint": p.endpoint, "allowedIPs": list(p.allowed_ips),
                "state": "up" if spi is not None else "down", "problem": problem,
                "sendSPI": spi, "announcedSPIs": list(p.ipsec_spis),
                **_sums(counted, self.desired.address, p.endpoint)})
        return {"mode": "ipsec", "backend": "kernel xfrm", "device": "-",
                "algorithm": ipsec.ALGORITHM, "strict": self.settings.strict,
                "keySPIs": [k.spi for k in self.keys], "announced": self._announcement,
                "error": "; ".join(e for e in (self.esp_missing, self.keys_error, self.error)
                                   if e),
                "peers": peers, "datapath": datapath_counters(self.tables),
                "errors": self.errors, "updated": time.time()}


def _sums(counted: Mapping[tuple[str, str, int], tuple[int, int]], me: str | None,
          peer: str) -> dict[str, int]:
    """Packets and bytes of the states to the peer and from it."""
    out = [(n, b) for (src, dst, _), (n, b) in counted.items() if (src, dst) == (me, peer)]
    into = [(n, b) for (src, dst, _), (n, b) in counted.items() if (src, dst) == (peer, me)]
    return {"txPackets": sum(n for n, _ in out), "txBytes": sum(b for _, b in out),
            "rxPackets": sum(n for n, _ in into), "rxBytes": sum(b for _, b in into)}


def probe_esp() -> str | None:
    """None if this kernel can run IPsec here, else why not."""
    # the modules load on first use on most kernels; asking first costs nothing
    with contextlib.suppress(OSError):  # no modprobe: the probe below says what is missing
        subprocess.run(["modprobe", "-q", "esp4"], capture_output=True, check=False)
    try:
        return ipsec.kernel_has_esp()
    except OSError as e:
        return f"cannot ask the kernel for ESP: {e}"
