"""IPsec between nodes: ESP in tunnel mode with `rfc4106(gcm(aes))`, a key per node pair and
direction derived from one cluster secret, and SPI rotation without drops. The kernel part
only (the xfrm states and policies of one node, planned purely and applied with iproute2's
`ip xfrm`: pyroute2 has no XFRM messages). The agent's side (`--encryption ipsec`) is
mesh/sinks/ipsec.py.

- **Keys.** The cluster secret holds one or more keys, each with its SPI (1-255, as Cilium's
  `N rfc4106(gcm(aes)) KEY 128`), the newest last (SPIs may wrap from 255 to 1: order, not
  number, says which is newer). For each SPI, each ordered node pair (A sends to B) gets its
  own 20 bytes (16 of AES key, 4 of GCM salt): HKDF-SHA256 of the secret, salted with the
  SPI, the info naming both nodes in order. A leaked pair key exposes one direction of one
  pair, not the cluster.
- **States.** For every key the secret holds, both directions with every peer: inbound states
  for all SPIs at once, so a peer may send with any of them.
- **Policies.** Out: this node's pod CIDRs to the peer's, through a template that names the
  SPI to send with (`spi` in the template), once the peer has announced a key; in and fwd:
  the peer's pod CIDRs to ours, any SPI of the pair's reqid, optional (`level use`). What
  strict mode keeps from leaving in the clear is the datapath's and the routing table's
  (mesh/sinks/ipsec.py), as with WireGuard.
- **Rotation** (`plan(..., send=)`): a new key is added to the secret; every node installs
  its states and then announces the SPIs it has states for (the Node annotation
  `mesh.dev/ipsec-spis`); a node sends to each peer with the newest key that peer announced
  (`send_spi`), so it switches only once the peer can decrypt; once every node announces the
  new key, the old one is removed from the secret and its states go. Sending with an SPI
  before the receiver's states exist is what drops traffic (`xfrm_error no_state` in
  Cilium's users' reports): the switch waits for the announcement.
- **Sequence numbers** never wrap: extended sequence numbers (64 bits, `flag esn`) with a
  replay window of 128.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALGORITHM = "rfc4106(gcm(aes))"
ICV_BITS = 128
KEY_BYTES = 20  # AES-128 key and the 4-byte GCM salt
REQID = 0x4D45  # "ME": this project's states and policies
REPLAY_WINDOW = 128
# The Node annotation where a node announces the key SPIs it has states for ("1,2").
SPIS_ANNOTATION = "mesh.dev/ipsec-spis"
# ESP's cost in tunnel mode, IPv4: outer header 20, SPI and sequence 8, IV 8, padding up to
# 3, pad length and next header 2, ICV 16 = 57; the same 60 as WireGuard's keeps one MTU.
OVERHEAD = 60


class IpsecError(RuntimeError):
    pass


@dataclass(frozen=True)
class Key:
    spi: int  # 1-255
    secret: bytes


@dataclass(frozen=True)
class Node:
    name: str
    address: str  # the tunnel's end: its underlay address
    cidrs: tuple[str, ...]  # its pods'


def parse_keys(text: str) -> list[Key]:
    """The cluster secret: lines `SPI rfc4106(gcm(aes)) HEX 128` (Cilium's format) or
    `SPI HEX`, the newest last; at most one key per SPI, at most 255 lines."""
    keys: dict[int, Key] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 4 and fields[1] == ALGORITHM and fields[3] == str(ICV_BITS):
            spi_text, hex_key = fields[0], fields[2]
        elif len(fields) == 2:
            spi_text, hex_key = fields
        else:
            raise IpsecError(f"line {n}: not `SPI {ALGORITHM} KEY {ICV_BITS}` nor `SPI KEY`")
        try:
            spi = int(spi_text.rstrip("+"))
            secret = bytes.fromhex(hex_key.removeprefix("0x"))
        except ValueError:
            raise IpsecError(f"line {n}: the SPI is not a number or the key not hex") from None
        if not 1 <= spi <= 255:
            raise IpsecError(f"line {n}: SPI {spi} is not within 1-255")
        if len(secret) < 16:
            raise IpsecError(f"line {n}: the key is {len(secret)} bytes; at least 16")
        if spi in keys:
            raise IpsecError(f"line {n}: SPI {spi} given twice")
        keys[spi] = Key(spi, secret)
    if not keys:
        raise IpsecError("no key")
    return list(keys.values())  # in the file's order: the newest last


def format_spis(keys: Iterable[Key]) -> str:
    """The announcement: the SPIs, in the secret's order."""
    return ",".join(str(k.spi) for k in keys)


def parse_spis(text: str) -> tuple[int, ...]:
    """A node's announcement; ValueError if it is not one."""
    if len(text) > 1024:
        raise ValueError("longer than 1024 characters")
    try:
        spis = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not SPIs separated by commas") from None
    if any(not 1 <= s <= 255 for s in spis):
        raise ValueError("an SPI not within 1-255")
    return spis


def send_spi(keys: Sequence[Key], announced: Iterable[int]) -> int | None:
    """The SPI to send to a peer with: the newest key of ours the peer has states for."""
    theirs = set(announced)
    return next((k.spi for k in reversed(keys) if k.spi in theirs), None)


def derive(key: Key, sender: str, receiver: str) -> bytes:
    """The 20 bytes `sender` encrypts to `receiver` with under this SPI."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES,
                salt=b"mesh-ipsec-spi-" + bytes([key.spi]),
                info=f"{sender}>{receiver}".encode()).derive(key.secret)


def wire_spi(key_spi: int, sender: str) -> int:
    """The SPI on the wire: the key's in the high byte, 16 bits of the sender's name's hash
    below it. The kernel finds an inbound state by destination and SPI alone, so every peer
    sending to a node needs SPIs of its own (`plan` refuses two peers that collide)."""
    tag = int.from_bytes(hashlib.sha256(sender.encode()).digest()[:2], "big")
    return key_spi << 24 | tag << 8 | 0x4D


@dataclass(frozen=True)
class State:
    src: str
    dst: str
    spi: int
    key: bytes

    def args(self) -> list[str]:
        return ["state", "add", "src", self.src, "dst", self.dst, "proto", "esp",
                "spi", hex(self.spi), "reqid", str(REQID), "mode", "tunnel", "flag", "esn",
                "replay-window", str(REPLAY_WINDOW), "aead", ALGORITHM,
                "0x" + self.key.hex(), str(ICV_BITS)]


@dataclass(frozen=True)
class Policy:
    src: str  # CIDR
    dst: str
    direction: str  # out | in | fwd
    tunnel_src: str
    tunnel_dst: str
    spi: int | None  # out: the SPI to send with; in and fwd: any

    def args(self) -> list[str]:
        tmpl = ["tmpl", "src", self.tunnel_src, "dst", self.tunnel_dst, "proto", "esp",
                "reqid", str(REQID), "mode", "tunnel"]
        if self.spi is not None:
            tmpl[7:7] = ["spi", hex(self.spi)]  # after "proto esp"
        else:
            # Inbound, the template is optional: a packet that came through ESP must match a
            # policy (the kernel refuses a decrypted packet no policy takes), and one in the
            # clear still passes, as while a peer has not seen this node's announcement yet.
            tmpl += ["level", "use"]
        return ["policy", "update", "src", self.src, "dst", self.dst, "dir",
                self.direction, *tmpl]


@dataclass(frozen=True)
class Plan:
    states: tuple[State, ...]
    policies: tuple[Policy, ...]


def plan(me: Node, peers: Iterable[Node], keys: Iterable[Key],
         send: int | Mapping[str, int]) -> Plan:
    """This node's states (every key, both directions, every peer) and policies: to each
    peer named in `send` (or to all, one SPI for all), sending with its SPI, which must be
    among the keys. A peer `send` leaves out gets states and no policy: nothing is sent to
    it through ESP."""
    keys = list(keys)
    peers = sorted(peers, key=lambda n: n.name)
    sending = {p.name: send for p in peers} if isinstance(send, int) else dict(send)
    for spi in set(sending.values()):
        if spi not in {k.spi for k in keys}:
            raise IpsecError(f"SPI {spi} to send with is not among the keys")
    tags: dict[int, str] = {}
    for node in [me, *peers]:
        tag = wire_spi(1, node.name)
        if tag in tags:
            raise IpsecError(f"nodes {tags[tag]} and {node.name} would share SPIs: rename one")
        tags[tag] = node.name
    states, policies = [], []
    for peer in peers:
        for key in keys:
            states.append(State(me.address, peer.address, wire_spi(key.spi, me.name),
                                derive(key, me.name, peer.name)))
            states.append(State(peer.address, me.address, wire_spi(key.spi, peer.name),
                                derive(key, peer.name, me.name)))
        for mine in me.cidrs:
            for theirs in peer.cidrs:
                if ipaddress.ip_network(mine).version != ipaddress.ip_network(theirs).version:
                    continue
                if peer.name in sending:
                    policies.append(Policy(mine, theirs, "out", me.address, peer.address,
                                           wire_spi(sending[peer.name], me.name)))
                for direction in ("in", "fwd"):
                    policies.append(Policy(theirs, mine, direction, peer.address,
                                           me.address, None))
    return Plan(tuple(states), tuple(policies))


def kernel_has_esp() -> str | None:
    """None if this kernel takes an ESP state with the algorithm, else why not (its words)."""
    probe = State("192.0.2.1", "192.0.2.2", 0x100, bytes(KEY_BYTES))  # 192.0.2.0/24: TEST-NET
    out = subprocess.run(["ip", "xfrm", *probe.args()], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return (f"this kernel has no ESP with {ALGORITHM}: `ip xfrm state add` says "
                f"{out.stderr.strip()!r}")
    subprocess.run(["ip", "xfrm", "state", "delete", "src", probe.src, "dst", probe.dst,
                    "proto", "esp", "spi", hex(probe.spi)], capture_output=True, check=False)
    return None


def apply(wanted: Plan, current: Plan | None = None, rewrite: bool = False) -> None:
    """Write what of `wanted` is not in `current` (all of it with `rewrite`: someone may
    have flushed the kernel's), states first: a policy never points at a state not there
    yet; then remove what `current` had and `wanted` has not (policies first)."""
    for s in wanted.states:
        if rewrite or current is None or s not in current.states:
            _state(s)
    for p in wanted.policies:
        if rewrite or current is None or p not in current.policies:
            _ip(p.args())
    if current is None:
        return
    for p in set(current.policies) - set(wanted.policies):
        if not any((q.src, q.dst, q.direction) == (p.src, p.dst, p.direction)
                   for q in wanted.policies):
            _ip(["policy", "delete", "src", p.src, "dst", p.dst, "dir", p.direction],
                check=False)
    for s in set(current.states) - set(wanted.states):
        if not any((t.src, t.dst, t.spi) == (s.src, s.dst, s.spi) for t in wanted.states):
            _ip(["state", "delete", "src", s.src, "dst", s.dst, "proto", "esp", "spi",
                 hex(s.spi)], check=False)


def _state(s: State) -> None:
    """Added; if one of its SPI is there (a previous agent's, another key), updated."""
    args = s.args()
    try:
        _ip(args)
    except IpsecError as e:
        if "File exists" not in str(e):
            raise
        args[1] = "update"
        _ip(args)


def _ip(args: list[str], check: bool = True) -> None:
    out = subprocess.run(["ip", "xfrm", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        # the key material never goes into an error: only the verb and the addresses
        shown = [a for a in args if not a.startswith("0x") or len(a) < 12]
        raise IpsecError(f"ip xfrm {' '.join(shown)}: {out.stderr.strip()}")


def remove_all() -> int:
    """This project's policies and states (its reqid) out of the kernel, as when the agent
    runs without IPsec after it ran with it; how many policies went."""
    out = subprocess.run(["ip", "xfrm", "policy"], capture_output=True, text=True,
                         check=False).stdout
    removed = 0
    for block in re.split(r"\n(?=src )", out):
        words = block.split()
        if len(words) < 6 or words[0] != "src" or words[2] != "dst" or "dir" not in words:
            continue
        if "reqid" in words and words[words.index("reqid") + 1] == str(REQID):
            _ip(["policy", "delete", "src", words[1], "dst", words[3], "dir",
                 words[words.index("dir") + 1]], check=False)
            removed += 1
    _ip(["state", "deleteall", "reqid", str(REQID)], check=False)
    return removed


def traffic() -> dict[tuple[str, str, int], tuple[int, int]]:
    """(packets, bytes) per state of this node ((source, destination, SPI): a node sends
    with the same SPI to every peer), from `ip -s xfrm state`, for the status and tests."""
    out = subprocess.run(["ip", "-s", "xfrm", "state"], capture_output=True, text=True,
                         check=True).stdout
    found: dict[tuple[str, str, int], tuple[int, int]] = {}
    ends: tuple[str, str] | None = None
    state: tuple[str, str, int] | None = None
    for line in out.splitlines():
        words = line.replace(",", " ").split()
        if words[:1] == ["src"] and len(words) >= 4 and words[2] == "dst":
            ends, state = (words[1], words[3]), None
        elif "spi" in words and ends is not None:
            spi = int(words[words.index("spi") + 1].split("(")[0], 16)  # "0x..(decimal)"
            state = (*ends, spi)
        elif state is not None and any(w.endswith("(packets)") for w in words) and \
                any(w.endswith("(bytes)") for w in words):
            # the first such line is the current lifetime's ("12(bytes), 1(packets)")
            count = {w.split("(")[1].rstrip(")"): int(w.split("(")[0]) for w in words
                     if w.endswith(("(packets)", "(bytes)"))}
            found.setdefault(state, (count["packets"], count["bytes"]))
    return found
