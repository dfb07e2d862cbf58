"""WireGuard's cross-platform userspace API (https://www.wireguard.com/xplatform/), as
wireguard-go serves it on its unix socket: `set=1` with key=value lines, `get=1` answered the
same way, each exchange ended by an empty line and an `errno=N` line.

Only what the agent configures and reads is here: the private key, the listening port, the
fwmark, and peers (public key, endpoint, allowed IPs, keepalive) replaced whole or one by one;
read back with their handshake times and byte counts. Keys go over the socket in hex; the
socket is the device owner's (0600, root), as the private key.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


class UapiError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    endpoint: str | None  # "address:port"
    allowed_ips: tuple[str, ...]
    keepalive: int = 0  # seconds; 0: off


@dataclass
class PeerState:
    public_key: bytes
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake: float = 0.0  # seconds since the epoch; 0: never
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0


@dataclass
class DeviceState:
    private_key: bytes | None = field(default=None, repr=False)  # compared, never shown
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerState] = field(default_factory=dict)


def endpoint(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def set_device(private_key: bytes | None = None, listen_port: int | None = None,
               fwmark: int | None = None) -> list[str]:
    lines = []
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    return lines


def set_peer(peer: PeerConfig) -> list[str]:
    """A peer made or updated to exactly `peer` (its allowed IPs replaced)."""
    lines = [f"public_key={peer.public_key.hex()}"]
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    lines.append(f"persistent_keepalive_interval={peer.keepalive}")
    lines.append("replace_allowed_ips=true")
    lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
    return lines


def remove_peer(public_key: bytes) -> list[str]:
    return [f"public_key={public_key.hex()}", "remove=true"]


class Uapi:
    """A client of one device's UAPI socket."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    async def _exchange(self, request: str) -> list[str]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.path)), self.timeout)
        try:
            writer.write(request.encode())
            await writer.drain()
            lines = []
            while True:
                raw = await asyncio.wait_for(reader.readline(), self.timeout)
                if not raw:
                    raise UapiError("the device closed its socket mid-answer")
                line = raw.decode().rstrip("\n")
                if line == "":
                    break
                lines.append(line)
        finally:
            writer.close()
        errno = next((line.split("=", 1)[1] for line in lines if line.startswith("errno=")),
                     None)
        if errno not in (None, "0"):
            raise UapiError(f"the device refused the request: errno={errno}")
        return [line for line in lines if not line.startswith("errno=")]

    async def set(self, lines: Iterable[str]) -> None:
        body = "\n".join(lines)
        await self._exchange(f"set=1\n{body}\n\n" if body else "set=1\n\n")

    async def get(self) -> DeviceState:
        state = DeviceState()
        peer: PeerState | None = None
        for line in await self._exchange("get=1\n\n"):
            key, _, value = line.partition("=")
            if key == "public_key":
                peer = PeerState(bytes.fromhex(value))
                state.peers[peer.public_key] = peer
            elif peer is None:
                if key == "private_key":
                    state.private_key = bytes.fromhex(value)
                elif key == "listen_port":
                    state.listen_port = int(value)
                elif key == "fwmark":
                    state.fwmark = int(value)
            elif key == "endpoint":
                peer.endpoint = value
            elif key == "allowed_ip":
                peer.allowed_ips.append(value)
            elif key == "last_handshake_time_sec":
                peer.last_handshake += int(value)
            elif key == "last_handshake_time_nsec":
                peer.last_handshake += int(value) / 1e9
            elif key == "rx_bytes":
                peer.rx_bytes = int(value)
            elif key == "tx_bytes":
                peer.tx_bytes = int(value)
            elif key == "persistent_keepalive_interval":
                peer.keepalive = int(value)
        return state
