"""The node's WireGuard device, `mesh-wg0`: which implementation runs it, its MTU, and the
agent's routing table for other nodes' pods.

The kernel's WireGuard where the kernel has it (a probe link of kind wireguard can be made);
otherwise `wireguard-go` (Debian's package), which makes a TUN device of that name and serves
WireGuard's UAPI on /var/run/wireguard/mesh-wg0.sock. Both are configured through that UAPI
here: for the kernel's device the agent runs no daemon, and the machines this is built on have
no kernel WireGuard, so the kernel path stops at saying so (see `choose`).

wireguard-go runs in a session of its own: an agent that dies leaves it, and the tunnels up;
the next agent finds its socket answering and adopts it (as Envoy is adopted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mesh.encryption.uapi import Uapi

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
    """'wireguard-go', or an error saying why no implementation can run here."""
    if kernel_has_wireguard(ip):
        # Its generic netlink configuration is not built yet: wireguard-go serves there too
        # (it takes the same name); said once, at start.
        log.info("the kernel has WireGuard; the agent drives wireguard-go for now")
    if shutil.which("wireguard-go") is None:
        raise RuntimeError("no WireGuard: the kernel has none usable and wireguard-go is not "
                           "installed (Debian: apt-get install wireguard-go)")
    return "wireguard-go"


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
