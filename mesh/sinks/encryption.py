"""The encryption sink: the IR's peers (mesh/ir/encryption.py) onto the node's WireGuard
device, its routing table and the datapath's maps (bpf/lib/encrypt.h); the node's key pair;
and a status file for `mesh encryption status`.

A peer is up once its public key is known and configured on the device: its pod CIDRs are
then routed through the device (the agent's table, for the node's own traffic, Envoy's among
it) and marked up in the datapath (the pods' traffic, sent into the device by bpf_redirect).
Order, so that no packet leaves in the clear while a peer changes: going up, device first,
then the route, then the map; going down, the map first (strict mode drops from then on), then
the route (blackholed in strict mode), then the device.

The key: made at first start (0600 in the state directory), published by the Kubernetes
provider's NodeKeyPublisher on the Node. Rotation is a new key file (`mesh encryption
rotate-key`, or any tool writing it): the sink notices the file changed, sets the new key and
publishes it; peers follow when they see the annotation (their packets meanwhile ride the old
sessions, and TCP resends what the switch held back).

The sink runs in the node's namespace, where the device is; everything is re-checked every
RECHECK seconds, so a wireguard-go that died is started again and given the whole state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import ir
from mesh.datapath.layout import (
    ENC_PEER_UP,
    ENC_STRICT,
    ENCRYPT_STATS,
    Encrypt4Key,
    Encrypt6Key,
    EncryptConfig,
    EncryptEntry,
    be32,
)
from mesh.encryption import STATUS_FILE, keys
from mesh.encryption.uapi import (
    DeviceState,
    PeerConfig,
    UapiError,
    endpoint,
)
from mesh.encryption.wireguard import (
    DEVICE,
    PORT,
    ROUTE_TABLE,
    RULE_PRIORITY,
    Device,
    choose,
    device,
    tunnel_mtu,
)
from mesh.sinks.sink import Readiness
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
RECHECK = 2.0  # seconds between looks at the device, the key file and the counters
# A peer's persistent keepalive (seconds). Besides keeping sessions warm, turning it on for a
# new peer (a node's new key) makes the device send a handshake at once, rather than when it
# next has a packet for that node: after a rotation the rotated node, whose own handshakes
# were refused until then and are retried only every 5 s, is reached in milliseconds.
KEEPALIVE = 25


@dataclass
class EncryptionSettings:
    state_dir: Path
    underlay: str  # the device towards other nodes: its MTU sets the tunnel's
    strict: bool = True
    strict_cidrs: tuple[str, ...] = ()  # beyond the peers' pod CIDRs (IPv6 ones, say)
    socket_dir: Path = Path("/var/run/wireguard")


@dataclass
class _Applied:
    ifindex: int = 0
    mtu: int = 0
    routes: dict[str, str] = field(default_factory=dict)  # CIDR -> "device" | "blackhole"
    entries: dict[str, int] = field(default_factory=dict)  # CIDR -> flags
    rule: bool = False
    source: str | None = None  # the device's address (the tunnel source)


class EncryptionSink:
    name = "encryption"

    def __init__(self, settings: EncryptionSettings, tables: Mapping[str, Any] | None) -> None:
        """`tables`: the datapath's loaded maps (mesh_encrypt4, mesh_encrypt6,
        mesh_encrypt_config, mesh_encrypt_stats), None without a datapath."""
        self.settings = settings
        self.tables = tables
        self.key_file = settings.state_dir / keys.KEY_FILE
        self.pair: keys.KeyPair | None = None
        self._key_stamp: tuple[int, int] | None = None
        self._published_for: bytes | None = None  # the key the device had when published
        self.key_changed = asyncio.Event()  # a new public key to publish
        self.desired = ir.Encryption()
        self.device: Device | None = None  # chosen at start: the kernel's, or wireguard-go
        self.backend = ""
        self.applied = _Applied()
        self.device_state = DeviceState()
        self.errors = 0
        self._due = asyncio.Event()
        self.configured = asyncio.Event()  # the first full configuration is done

    # -- the sink's side -----------------------------------------------------------------

    def apply(self, model: ir.IR) -> None:
        mine = self.public_key()
        if mine is not None and model.encryption.published_key != mine and \
                model.encryption.published_key != self.desired.published_key:
            # the Node says another key (someone changed the annotation): published again
            self.key_changed.set()
        if model.encryption != self.desired:
            self.desired = model.encryption
            for p in model.encryption.peers:
                if p.problem:
                    log.warning("peer key refused", extra={"node": p.node,
                                                           "problem": p.problem})
            self._due.set()

    def readiness(self) -> dict[ObjectKey, Readiness]:
        return {}

    async def wait_progress(self) -> None:
        await asyncio.Event().wait()  # nothing here changes an object's readiness

    def public_key(self) -> str | None:
        return self.pair.public_text if self.pair is not None else None

    # -- the component's side ------------------------------------------------------------

    async def run(self) -> None:
        def pick() -> str:
            with iproute() as ip:  # pyroute2 wants no running loop in its thread
                return choose(ip)

        self.backend = await asyncio.to_thread(pick)
        self.device = device(self.backend, self.settings.socket_dir,
                             self.settings.state_dir / "wireguard-go.log")
        self._load_key()
        log.info("encryption", extra={"mode": "wireguard", "backend": self.backend,
                                      "device": DEVICE, "public_key": self.public_key(),
                                      "strict": self.settings.strict})
        while True:
            try:
                await self._reconcile()
                self.configured.set()
            except (OSError, UapiError, RuntimeError, TimeoutError) as e:
                self.errors += 1
                log.error("encryption not configured: retrying", extra={"error": str(e)})
            self._write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), RECHECK)
            self._due.clear()

    def _load_key(self) -> None:
        """The key file's pair (made on first start); a changed file is a rotation."""
        pair, made = keys.load_or_create(self.key_file)
        st = self.key_file.stat()
        self._key_stamp = (st.st_ino, st.st_mtime_ns)
        if self.pair is None or pair.public != self.pair.public:
            if self.pair is not None or made:
                log.info("WireGuard key " + ("rotated" if self.pair else "made"),
                         extra={"public_key": pair.public_text})
            self.pair = pair

    def _key_file_changed(self) -> bool:
        try:
            st = self.key_file.stat()
        except FileNotFoundError:
            return True  # gone: a new one is made
        return (st.st_ino, st.st_mtime_ns) != self._key_stamp

    async def _reconcile(self) -> None:
        if self._key_file_changed():
            try:
                self._load_key()
            except keys.InvalidKey as e:
                log.error("the new key file is refused; the old key stays",
                          extra={"error": str(e)})
        assert self.device is not None
        dev = self.device
        restarted = await dev.ensure()
        if restarted:
            # the old device took its routes with it; the blackholes stay
            self.applied = _Applied(rule=self.applied.rule, routes={
                c: k for c, k in self.applied.routes.items() if k != "device"})
        assert self.pair is not None
        state = await dev.get()
        if state.private_key != self.pair.private or state.listen_port != PORT:
            await dev.configure(self.pair.private, PORT)
        if self._published_for != self.pair.public:
            # published once the device has it: a peer that takes the new key and answers
            # at once finds it in place
            self._published_for = self.pair.public
            self.key_changed.set()
        up = {p.node: p for p in self.desired.peers if p.public_key is not None}
        wanted = {keys.parse_public(p.public_key): PeerConfig(
            keys.parse_public(p.public_key), endpoint(p.endpoint, PORT), p.allowed_ips,
            KEEPALIVE) for p in up.values() if p.public_key is not None}
        # What goes down leaves the maps and routes first, then the device changes, then
        # what is up enters the routes and maps.
        entries, routes = steering(self.desired.peers, set(up), self.settings.strict,
                                   self.settings.strict_cidrs, "device")
        await asyncio.to_thread(self._take_down, entries, routes)
        for public in state.peers:  # as read above: setting the key leaves peers alone
            if public not in wanted:
                await dev.remove_peer(public)
        for public, config in wanted.items():
            have = state.peers.get(public)
            if have is None or have.endpoint != config.endpoint or \
                    have.keepalive != config.keepalive or \
                    sorted(have.allowed_ips) != sorted(config.allowed_ips):
                await dev.set_peer(config)
        self.device_state = await dev.get()
        await asyncio.to_thread(self._bring_up, entries, routes)

    def _take_down(self, entries: Mapping[str, int], routes: Mapping[str, str]) -> None:
        """What is up and should not be: out of the maps, then out of the routes."""
        if self.tables is not None:
            entries_down(self.tables, self.applied.entries, entries)
        gone = [c for c, kind in self.applied.routes.items()
                if kind == "device" and routes.get(c) != "device"]
        if gone:
            with iproute() as ip:
                for cidr in gone:
                    self._route(ip, cidr, routes.get(cidr), 0)

    def _bring_up(self, entries: Mapping[str, int], routes: Mapping[str, str]) -> None:
        with iproute() as ip:
            found = ip.link_lookup(ifname=DEVICE)
            ifindex = found[0] if found else 0
            if ifindex:
                under = ip.link_lookup(ifname=self.settings.underlay)
                mtu = tunnel_mtu(ip.get_links(under[0])[0].get_attr("IFLA_MTU")) \
                    if under else 1420
                if (ifindex, mtu) != (self.applied.ifindex, self.applied.mtu):
                    ip.link("set", index=ifindex, mtu=mtu, state="up")
                    self.applied.ifindex, self.applied.mtu = ifindex, mtu
                source = self.desired.tunnel_source
                if source is not None and source != self.applied.source:
                    from pyroute2 import NetlinkError

                    with contextlib.suppress(NetlinkError):  # there already
                        ip.addr("add", index=ifindex, address=source, prefixlen=32)
                    self.applied.source = source
                    self.applied.routes = {c: k for c, k in self.applied.routes.items()
                                           if k != "device"}  # again, from this source
            if not self.applied.rule:
                add_rule(ip)
                self.applied.rule = True
            for cidr, kind in routes.items():
                if self.applied.routes.get(cidr) != kind and (kind != "device" or ifindex):
                    self._route(ip, cidr, kind, ifindex)
            for cidr in [c for c in self.applied.routes if c not in routes]:
                self._route(ip, cidr, None, ifindex)
        if self.tables is None:
            return
        self.tables["mesh_encrypt_config"][ctypes.c_uint32(0)] = EncryptConfig(
            ifindex=ifindex, flags=ENC_STRICT if self.settings.strict else 0)
        # an up entry only once the device is there to redirect into
        entries_up(self.tables, self.applied.entries, entries, up_ready=bool(ifindex))

    def _route(self, ip: Any, cidr: str, kind: str | None, ifindex: int) -> None:
        """The table's route for `cidr`: through the device, blackholed, or none."""
        from pyroute2 import NetlinkError

        spec: dict[str, Any] = {"dst": cidr, "table": ROUTE_TABLE,
                                "family": 2 if ipaddress.ip_network(cidr).version == 4
                                else 10}
        if kind is None:
            with contextlib.suppress(NetlinkError):
                ip.route("del", **spec)
            self.applied.routes.pop(cidr, None)
            return
        if kind == "device":
            if spec["family"] == 2 and self.applied.source:
                # the node's own packets leave from its tunnel address (the peers' allowed
                # IPs hold it; replies to it come back through the tunnel)
                spec["prefsrc"] = self.applied.source
            ip.route("replace", oif=ifindex, **spec)
        else:
            ip.route("replace", type="blackhole", **spec)
        self.applied.routes[cidr] = kind

    # -- visibility ------------------------------------------------------------------------

    def drops(self) -> dict[str, int]:
        return datapath_counters(self.tables)

    def status(self) -> dict[str, Any]:
        peers = []
        for p in self.desired.peers:
            raw = keys.parse_public(p.public_key) if p.public_key else None
            live = self.device_state.peers.get(raw) if raw is not None else None
            peers.append({
                "node": p.node, "endpoint": endpoint(p.endpoint, PORT),
                "allowedIPs": list(p.allowed_ips), "publicKey": p.public_key,
                "state": "up" if live is not None else "down",
                "problem": p.problem or ("" if p.public_key else "no public key published yet"),
                "lastHandshake": live.last_handshake if live is not None else 0.0,
                "rxBytes": live.rx_bytes if live is not None else 0,
                "txBytes": live.tx_bytes if live is not None else 0})
        return {"mode": "wireguard", "backend": self.backend, "device": DEVICE,
                "port": PORT, "mtu": self.applied.mtu, "strict": self.settings.strict,
                "publicKey": self.public_key(), "peers": peers, "datapath": self.drops(),
                "deviceStarts": self.device.starts if self.device else 0, "errors": self.errors,
                "updated": time.time()}

    def _write_status(self) -> None:
        write_status(self.settings.state_dir, self.status())


def steering(peers: tuple[ir.EncryptionPeer, ...], up: set[str], strict: bool,
             strict_cidrs: tuple[str, ...], through: str
             ) -> tuple[dict[str, int], dict[str, str]]:
    """The datapath's entries (CIDR -> flags) and the routing table (CIDR -> `through` |
    "blackhole"): the up peers' pod CIDRs through the tunnel; in strict mode, the other
    peers' and the configured CIDRs blackholed."""
    up_cidrs = {c for p in peers if p.node in up for c in p.allowed_ips}
    down = {c for p in peers if p.node not in up for c in p.allowed_ips}
    blackholed = (down | set(strict_cidrs)) - up_cidrs if strict else set()
    entries = {**{c: 0 for c in blackholed}, **{c: ENC_PEER_UP for c in up_cidrs}}
    routes = {**{c: "blackhole" for c in blackholed}, **{c: through for c in up_cidrs}}
    return entries, routes


def entries_down(tables: Mapping[str, Any], applied: dict[str, int],
                 wanted: Mapping[str, int]) -> None:
    """The datapath's up entries that `wanted` does not have up: written to what they become
    (strict mode's drop, or none), before the tunnel to them goes."""
    for cidr, flags in list(applied.items()):
        if flags == ENC_PEER_UP and wanted.get(cidr) != ENC_PEER_UP:
            _set_entry(tables, applied, cidr, wanted.get(cidr))


def entries_up(tables: Mapping[str, Any], applied: dict[str, int],
               wanted: Mapping[str, int], up_ready: bool = True) -> None:
    """The datapath's entries as `wanted` (up ones only if `up_ready`), the rest removed;
    `applied` (what the maps hold) follows."""
    for cidr, flags in wanted.items():
        if applied.get(cidr) != flags and (flags != ENC_PEER_UP or up_ready):
            _set_entry(tables, applied, cidr, flags)
    for cidr in [c for c in applied if c not in wanted]:
        _set_entry(tables, applied, cidr, None)


def _set_entry(tables: Mapping[str, Any], applied: dict[str, int], cidr: str,
               flags: int | None) -> None:
    write_entry(tables, cidr, flags)
    if flags is None:
        applied.pop(cidr, None)
    else:
        applied[cidr] = flags


def add_rule(ip: Any) -> None:
    """The agent's routing rule (its table, for the node's own traffic to other nodes'
    pods), once."""
    from pyroute2 import NetlinkError

    with contextlib.suppress(NetlinkError):  # there already
        ip.rule("add", table=ROUTE_TABLE, priority=RULE_PRIORITY)


def write_entry(tables: Mapping[str, Any], cidr: str, flags: int | None) -> None:
    """The datapath's entry for `cidr` (None: none)."""
    net = ipaddress.ip_network(cidr)
    key: ctypes.Structure
    if net.version == 4:
        key = Encrypt4Key(prefixlen=net.prefixlen, address=be32(str(net.network_address)))
        table = tables["mesh_encrypt4"]
    else:
        key = Encrypt6Key(prefixlen=net.prefixlen)
        key.address[:] = list(net.network_address.packed)
        table = tables["mesh_encrypt6"]
    if flags is None:
        with contextlib.suppress(KeyError):
            del table[key]
    else:
        table[key] = EncryptEntry(flags=flags)


def datapath_counters(tables: Mapping[str, Any] | None) -> dict[str, int]:
    """Packets sent into the tunnel, and strict mode's drops."""
    if tables is None:
        return {}
    stats = tables["mesh_encrypt_stats"]
    return {name: sum(stats[ctypes.c_uint32(i)]) for i, name in enumerate(ENCRYPT_STATS)}


def write_status(state_dir: Path, status: Mapping[str, Any]) -> None:
    """What `mesh encryption status` reads (0600, replaced whole)."""
    path = state_dir / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(status, indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(path)


def iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def disable(tables: Mapping[str, Any] | None) -> None:
    """Encryption off: what an agent with it left behind (the datapath's entries, the routing
    rule and table, IPsec's policies and states) goes, so that nothing is dropped, or sent to
    a device no one configures. A WireGuard device, if any, is left alone."""
    from pyroute2 import NetlinkError

    from mesh.encryption import ipsec

    with contextlib.suppress(OSError):  # no `ip`: nothing of IPsec's was made either
        ipsec.remove_all()

    if tables is not None:
        tables["mesh_encrypt_config"][ctypes.c_uint32(0)] = EncryptConfig(ifindex=0, flags=0)
        for name in ("mesh_encrypt4", "mesh_encrypt6"):
            with contextlib.suppress(Exception):
                tables[name].clear()
    with iproute() as ip:
        with contextlib.suppress(NetlinkError):
            while True:
                ip.rule("del", table=ROUTE_TABLE, priority=RULE_PRIORITY)
        for family in (2, 10):
            with contextlib.suppress(NetlinkError):
                ip.flush_routes(table=ROUTE_TABLE, family=family)
