"""The node's WireGuard device, `mesh-wg0`: which implementation runs it, its MTU, and the
agent's routing table for other nodes' pods.

The kernel's WireGuard where the kernel has it (a probe link of kind wireguard can be made),
configured over generic netlink with pyroute2 (`KernelWireGuard`); otherwise `wireguard-go`
(Debian's package), which makes a TUN device of that name and serves WireGuard's UAPI on
/var/run/wireguard/mesh-wg0.sock (`WireGuardGo`). Both offer the sink the same few calls
(`Device`). The choice is automatic and logged. These machines' kernels have no WireGuard:
the kernel path is proven under Debian's kernel in qemu (tests/test_encryption_vm.py).

wireguard-go runs in a session of its own: an agent that dies leaves it, and the tunnels up;
the next agent finds its socket answering and adopts it (as Envoy is adopted). The kernel's
device needs no daemon and stays as well.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

from mesh.encryption.uapi import (
    DeviceState,
    PeerConfig,
    PeerState,
    Uapi,
    remove_peer,
    set_device,
    set_peer,
)

log = logging.getLogger(__name__)
DEVICE = "mesh-wg0"
PORT = 51871  # Cilium's
SOCKET_DIR = Path("/var/run/wireguard")
# Bytes WireGuard adds to a packet: outer IP header (20 or 40), UDP (8), its own header and
# counter (16), the AEAD tag (16).
OVERHEAD = {4: 60, 6: 80}
ROUTE_TABLE = 2005  # the agent's: other nodes' pod CIDRs through the device
RULE_PRIORITY = 9100  # after the L7 redirect's (9000), before main (32766)
START_TIMEOUT = 10.0


def tunnel_mtu(underlay_mtu: int, underlay_family: int = 4) -> int:
    """The device's MTU: what a packet may be so that, encrypted, it fits the underlay's."""
    return underlay_mtu - OVERHEAD[underlay_family]


def kernel_has_wireguard(ip: Any) -> bool:
    """Whether this kernel makes WireGuard links (a probe link, removed at once)."""
    from pyroute2 import NetlinkError

    probe = "mesh-wgprobe"
    try:
        ip.link("add", ifname=probe, kind="wireguard")
    except NetlinkError:
        return False
    with contextlib.suppress(NetlinkError):
        ip.link("del", ifname=probe)
    return True


def choose(ip: Any) -> str:
    """'kernel' or 'wireguard-go', or an error saying why no implementation can run here."""
    if kernel_has_wireguard(ip):
        return "kernel"
    if shutil.which("wireguard-go") is None:
        raise RuntimeError("no WireGuard: the kernel has none and wireguard-go is not "
                           "installed (Debian: apt-get install wireguard-go)")
    return "wireguard-go"


class Device(Protocol):
    """What the encryption sink asks of a WireGuard device."""

    starts: int

    async def ensure(self) -> bool:
        """The device exists; True if it was made now (its configuration is gone)."""
        ...

    async def get(self) -> DeviceState: ...

    async def configure(self, private_key: bytes, port: int) -> None: ...

    async def set_peer(self, peer: PeerConfig) -> None: ...

    async def remove_peer(self, public_key: bytes) -> None: ...


def device(backend: str, socket_dir: Path = Path("/var/run/wireguard"),
           log_file: Path | None = None) -> Device:
    if backend == "kernel":
        return KernelWireGuard(DEVICE)
    return WireGuardGo(DEVICE, socket_dir, log_file)


class KernelWireGuard:
    """The kernel's device, over generic netlink (pyroute2's WireGuard; each call in a thread
    of its own: pyroute2 wants no running event loop in its thread)."""

    def __init__(self, name: str = DEVICE) -> None:
        self.name = name
        self.starts = 0

    async def ensure(self) -> bool:
        return await asyncio.to_thread(self._ensure)

    def _ensure(self) -> bool:
        from pyroute2 import IPRoute

        with IPRoute() as ip:
            if ip.link_lookup(ifname=self.name):
                return False
            ip.link("add", ifname=self.name, kind="wireguard")
        self.starts += 1
        log.info("kernel WireGuard device made", extra={"device": self.name})
        return True

    def _wg(self) -> Any:
        from pyroute2 import WireGuard

        return WireGuard()

    async def get(self) -> DeviceState:
        return await asyncio.to_thread(self._get)

    def _get(self) -> DeviceState:
        state = DeviceState()
        with self._wg() as wg:
            messages = wg.info(self.name)
        for msg in messages:
            private = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
            if private:
                state.private_key = base64.b64decode(private)
            port = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
            if port:
                state.listen_port = int(port)
            for raw in msg.get_attr("WGDEVICE_A_PEERS") or []:
                peer = PeerState(base64.b64decode(raw.get_attr("WGPEER_A_PUBLIC_KEY")))
                endpoint = raw.get_attr("WGPEER_A_ENDPOINT")
                if endpoint and endpoint.get("addr") and endpoint.get("addr") != "0.0.0.0":
                    peer.endpoint = f"{endpoint['addr']}:{endpoint['port']}"
                for a in raw.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                    if a.get("addr"):  # pyroute2 decodes "ADDRESS/MASK" there
                        peer.allowed_ips.append(str(a["addr"]))
                handshake = raw.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                peer.last_handshake = float(handshake.get("tv_sec", 0)) + float(
                    handshake.get("tv_nsec", 0)) / 1e9
                peer.rx_bytes = int(raw.get_attr("WGPEER_A_RX_BYTES") or 0)
                peer.tx_bytes = int(raw.get_attr("WGPEER_A_TX_BYTES") or 0)
                peer.keepalive = int(raw.get_attr(
                    "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0)
                state.peers[peer.public_key] = peer
        return state

    async def configure(self, private_key: bytes, port: int) -> None:
        def run() -> None:
            with self._wg() as wg:
                wg.set(self.name, private_key=base64.b64encode(private_key).decode(),
                       listen_port=port)
        await asyncio.to_thread(run)

    async def set_peer(self, peer: PeerConfig) -> None:
        address, _, port = (peer.endpoint or "").rpartition(":")

        def run() -> None:
            with self._wg() as wg:
                spec: dict[str, Any] = {
                    "public_key": base64.b64encode(peer.public_key).decode(),
                    "persistent_keepalive": peer.keepalive,
                    "replace_allowed_ips": True, "allowed_ips": list(peer.allowed_ips)}
                if address:
                    spec.update(endpoint_addr=address.strip("[]"), endpoint_port=int(port))
                wg.set(self.name, peer=spec)
        await asyncio.to_thread(run)

    async def remove_peer(self, public_key: bytes) -> None:
        def run() -> None:
            with self._wg() as wg:
                wg.set(self.name, peer={"public_key": base64.b64encode(public_key).decode(),
                                        "remove": True})
        await asyncio.to_thread(run)


class WireGuardGo:
    """wireguard-go for the device: started if its socket does not answer, adopted if it
    does."""

    def __init__(self, device: str = DEVICE, socket_dir: Path = SOCKET_DIR,
                 log_file: Path | None = None) -> None:
        self.device = device
        self.socket = socket_dir / f"{device}.sock"
        self.uapi = Uapi(self.socket)
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def get(self) -> DeviceState:
        return await self.uapi.get()

    async def configure(self, private_key: bytes, port: int) -> None:
        await self.uapi.set(set_device(private_key, port))

    async def set_peer(self, peer: PeerConfig) -> None:
        await self.uapi.set(set_peer(peer))

    async def remove_peer(self, public_key: bytes) -> None:
        await self.uapi.set(remove_peer(public_key))

    async def alive(self) -> bool:
        try:
            await self.uapi.get()
        except (OSError, TimeoutError, RuntimeError, ValueError):
            return False
        return True

    async def ensure(self) -> bool:
        """The device serves; True if it was (re)started now (its configuration is gone)."""
        if await self.alive():
            return False
        self.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a dead daemon's
        out = self.log_file.open("ab") if self.log_file is not None else None
        try:
            self.process = await asyncio.create_subprocess_exec(
                "wireguard-go", "-f", self.device, stdin=subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        finally:
            if out is not None:
                out.close()
        self.starts += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await self.alive():
            if self.process.returncode is not None:
                raise RuntimeError(f"wireguard-go exited ({self.process.returncode}) before "
                                   "serving its socket")
            if loop.time() > deadline:
                raise RuntimeError("wireguard-go did not serve its socket in time")
            await asyncio.sleep(0.05)
        log.info("wireguard-go started", extra={"device": self.device,
                                                 "pid": self.process.pid})
        return True

    async def stop(self) -> None:
        """For tests only: the agent leaves the device up when it stops."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 5)
