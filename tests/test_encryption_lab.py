"""WireGuard between the nodes of a two-node lab (`mesh lab up --encryption wireguard`: each
agent's wireguard-go, keys published on the real API server's Nodes): pod traffic across
nodes crosses, and a capture on the underlay sees only UDP to WireGuard's port, never the
payload; full-size TCP segments and 1,400-byte datagrams cross without fragmentation; strict
mode drops (and counts) what would leave in the clear, IPv6 included; a key rotation under
load loses no request; a node joining later becomes a peer; the private key file is 0600 and
in no log."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh.encryption import keys
from mesh.encryption.wireguard import PORT
from mesh.lab import cluster

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
KUBECTL = ROOT / ".kube" / "bin" / "kubectl"
NS = "enc"
# The lab names fd00:10:244::/48 (its pods' IPv6 range, were they dual-stack) as strict.
STRICT6 = "fd00:10:244::/48"

# A TCP echo on 5000 and a UDP echo on 5001, stdlib only (the lab runs the host's python3).
ECHO = r"""
import socket, threading
def tcp(c):
    with c:
        while (d := c.recv(65536)):
            c.sendall(d)
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", 5001))
    while True:
        d, a = u.recvfrom(65535)
        u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5000))
s.listen(128)
while True:
    threading.Thread(target=tcp, args=(s.accept()[0],), daemon=True).start()
"""

# In the client pod: sends argv's payload over TCP (echoed back) and as one UDP datagram of
# the given size; prints what came back.
SEND = r"""
import json, socket, sys, threading
host, payload, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
out = {}
with socket.create_connection((host, 5000), timeout=10) as c:
    c.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += c.recv(65536)
    out["tcp"] = got == payload
    big = bytes(range(256)) * 16384  # 4 MiB in full-size segments
    # sent while the echo is read: neither side's buffers fill up
    sender = threading.Thread(target=c.sendall, args=(big,))
    sender.start()
    got = 0
    while got < len(big):
        got += len(c.recv(1 << 20))
    sender.join()
    out["bulk"] = got
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
datagram = (payload * (size // len(payload) + 1))[:size]
u.sendto(datagram, (host, 5001))
try:
    out["udp"] = u.recvfrom(65535)[0] == datagram
except OSError as e:
    out["udp"] = str(e)
print(json.dumps(out))
"""

# In the client pod: requests (a line out, the same back, each on a new connection) for
# argv[2] seconds; prints how many passed and failed.
LOAD = r"""
import json, socket, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
errors = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((host, 5000), timeout=5) as c:
            c.sendall(b"ping\n")
            if c.recv(64) == b"ping\n":
                ok += 1
            else:
                failed += 1
    except OSError as e:
        failed += 1
        errors.append(str(e))
    time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""

# In the underlay's namespace: every frame on every port of its bridge for argv[1] seconds;
# prints whether a needle was seen, the UDP and TCP destinations of IPv4 packets, and how many
# IPv6 packets went to the pods' IPv6 range.
CAPTURE = r"""
import json, select, socket, struct, sys, time
needles = [n.encode() for n in sys.argv[2:]]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
end = time.monotonic() + float(sys.argv[1])
seen, udp, tcp, v6 = [], {}, {}, 0
print("ready", flush=True)
while (left := end - time.monotonic()) > 0:
    if not select.select([s], [], [], left)[0]:
        continue
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING:
        continue  # each frame once: as the bridge's port received it
    seen += [n.decode() for n in needles if n in frame]
    kind = struct.unpack("!H", frame[12:14])[0]
    if kind == 0x86DD and frame[38:44] == bytes.fromhex("fd0000100244"):
        v6 += 1  # to the lab's pods' IPv6 range (not the nodes' own link-local chatter)
    if kind != 0x0800:
        continue
    ihl = (frame[14] & 0xF) * 4
    proto, dst = frame[23], socket.inet_ntoa(frame[30:34])
    if proto in (6, 17):
        port = struct.unpack("!H", frame[14 + ihl + 2:14 + ihl + 4])[0]
        bucket = udp if proto == 17 else tcp
        key = f"{dst}:{port}"
        bucket[key] = bucket.get(key, 0) + 1
print(json.dumps({"seen": sorted(set(seen)), "udp": udp, "tcp": tcp, "ipv6": v6}))
"""


@dataclass
class EncLab:
    name: str
    state: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)  # name -> IP

    def refresh(self) -> None:
        found = cluster.read_state(self.name)
        assert found is not None
        self.state = found

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        r = subprocess.run([str(KUBECTL), "--kubeconfig", self.state["kubeconfig"], *args],
                           input=input_text, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def node(self, i: int) -> dict[str, Any]:
        info: dict[str, Any] = self.state["node_info"][i]
        return info

    def agent_dir(self, i: int) -> Path:
        return cluster.lab_dir(self.name) / str(self.node(i)["name"]) / "agent"

    def status(self, i: int) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "mesh.cli", "encryption", "status",
                              "--state-dir", str(self.agent_dir(i)), "-o", "json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert out.returncode == 0, out.stderr
        found: dict[str, Any] = json.loads(out.stdout)
        return found

    def in_pod(self, pod: str, *argv: str, timeout: float = 60) -> str:
        out = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "exec", "--name",
                              self.name, "-n", NS, pod, "--", *argv], capture_output=True,
                             text=True, cwd=ROOT, timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def python(self, pod: str, script: str, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.in_pod(pod, "python3", "-c", script, *args,
                                      timeout=timeout).strip().splitlines()[-1])


def _wait(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def _peers_up(lab: EncLab, i: int) -> bool:
    try:
        peers = lab.status(i)["peers"]
    except AssertionError:
        return False
    return bool(peers) and all(p["state"] == "up" for p in peers
                               if not p["node"].startswith("ghost"))


@pytest.fixture(scope="module")
def lab() -> Iterator[EncLab]:
    name = f"enc{os.getpid() % 10000}"
    try:
        up = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "up", "--nodes", "2",
                             "--name", name, "--encryption", "wireguard", "--timeout", "240"],
                            cwd=ROOT, capture_output=True, text=True)
        assert up.returncode == 0, up.stderr[-3000:]
        lab = EncLab(name)
        lab.refresh()
        nodes = [n["name"] for n in lab.state["node_info"]]

        def pod(pod_name: str, node: str, command: list[str]) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": NS},
                    "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0,
                             "containers": [{"name": "c", "image": "busybox:1.36",
                                             "command": command}]}}

        lab.kubectl("apply", "-f", "-", input_text=json.dumps({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                pod("server", nodes[1], ["python3", "-c", ECHO]),
                pod("client", nodes[0], ["sleep", "infinity"])]}))

        def ready() -> bool:
            lab.refresh()
            found = {k.split("/")[1]: v for k, v in lab.state["pods"].items()
                     if k.startswith(f"{NS}/")}
            lab.pods = {k: v["ip"] for k, v in found.items()}
            return len(found) == 2 and all(p["ready"] for p in found.values())

        _wait("the pods ready", ready, 120)
        _wait("both nodes' peers up", lambda: _peers_up(lab, 0) and _peers_up(lab, 1))
        yield lab
    finally:
        down = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", name],
                              cwd=ROOT, capture_output=True, text=True)
        assert down.returncode == 0, down.stderr


class Capture:
    """A capture on the underlay while a block runs."""

    def __init__(self, lab: EncLab, seconds: float, *needles: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab.name}-underlay", sys.executable, "-c", CAPTURE,
             str(seconds), *needles], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=60)
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return found


def _frag_counters(node: str) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", node, "cat", "/proc/net/snmp"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    heads, values = [line.split()[1:] for line in out if line.startswith("Ip:")]
    return {k: int(v) for k, v in zip(heads, values, strict=True) if "Frag" in k}


def test_pod_traffic_across_nodes_is_encrypted_on_the_wire(lab: EncLab) -> None:
    needle = f"MESH-SECRET-{secrets.token_hex(8)}"
    nodes = [lab.node(0), lab.node(1)]
    before = [_frag_counters(n["name"]) for n in nodes]
    capture = Capture(lab, 8, needle)
    got = lab.python("client", SEND, lab.pods["server"], needle, "1400")
    seen = capture.result()
    assert got == {"tcp": True, "bulk": 4 << 20, "udp": True}, got
    assert seen["seen"] == [], "the payload crossed the underlay in the clear"
    assert not any(k.endswith(":5000") or k.endswith(":5001") for k in seen["tcp"]), seen
    tunnel = {k: n for k, n in seen["udp"].items() if k.endswith(f":{PORT}")}
    assert {k.split(":")[0] for k in tunnel} == {nodes[0]["underlay"], nodes[1]["underlay"]}
    # 4 MiB each way in full-size segments (the capture may see them merged by GRO), and
    # not one fragment made or reassembled on either node
    assert sum(tunnel.values()) > 1000
    assert [_frag_counters(n["name"]) for n in nodes] == before
    assert lab.in_pod("client", "cat", "/sys/class/net/eth0/mtu").strip() == "1440"
    status = lab.status(0)
    assert status["mtu"] == 1440 and status["backend"] == "wireguard-go"
    (peer,) = status["peers"]
    assert peer["node"] == nodes[1]["name"] and peer["lastHandshake"] > 0
    assert peer["rxBytes"] > 4 << 20 and status["datapath"]["sent"] > 0


def test_strict_mode_drops_what_would_leave_in_the_clear(lab: EncLab) -> None:
    """A Node whose key is refused (a ghost: no agent runs it), with a route to its pods in
    the clear; and IPv6 to the lab's strict range: dropped and counted, never on the wire."""
    index = lab.state["index"]
    ghost = {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": "ghost-node", "annotations": {keys.ANNOTATION: "garbage"}},
             "spec": {"podCIDR": "10.244.99.0/24", "podCIDRs": ["10.244.99.0/24"]}}
    lab.kubectl("apply", "-f", "-", input_text=json.dumps(ghost))
    node0 = lab.node(0)["name"]
    try:
        lab.kubectl("patch", "node", "ghost-node", "--subresource", "status", "--type",
                    "merge", "-p", json.dumps({"status": {"addresses": [
                        {"type": "InternalIP", "address": f"172.30.{index}.99"}]}}))
        # the cleartext path a plain cluster would take
        subprocess.run(["ip", "netns", "exec", node0, "ip", "route", "replace",
                        "10.244.99.0/24", "via", f"172.30.{index}.99"], check=True)

        def refused() -> dict[str, Any] | None:
            peers = {p["node"]: p for p in lab.status(0)["peers"]}
            ghost_peer = peers.get("ghost-node")
            return ghost_peer if ghost_peer and ghost_peer["problem"] else None

        peer = _wait("the ghost's key refused", refused)
        assert peer["state"] == "down" and "not base64" in peer["problem"]
        drops = lab.status(0)["datapath"]
        needle = f"MESH-CLEAR-{secrets.token_hex(8)}"
        capture = Capture(lab, 6, needle)
        send = ("import socket, sys\n"
                "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for _ in range(5): u.sendto(sys.argv[1].encode(), ('10.244.99.5', 5001))\n")
        lab.in_pod("client", "python3", "-c", send, needle)
        # IPv6: the pod gets an address in the strict range and a neighbour for the target
        six = ("import socket, subprocess, sys\n"
               "subprocess.run(['ip', '-6', 'addr', 'add', 'fd00:10:244:1::a/64', 'dev', "
               "'eth0', 'nodad'], check=False)\n"
               "subprocess.run(['ip', '-6', 'route', 'replace', 'fd00:10:244::/48', 'dev', "
               "'eth0'], check=True)\n"
               "subprocess.run(['ip', '-6', 'neigh', 'replace', 'fd00:10:244:9::5', 'lladdr', "
               "'02:00:00:00:00:01', 'dev', 'eth0'], check=True)\n"
               "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
               "for _ in range(5): u.sendto(sys.argv[1].encode(), ('fd00:10:244:9::5', 5001))\n")
        lab.in_pod("client", "python3", "-c", six, needle)
        seen = capture.result()
        assert seen["seen"] == [] and seen["ipv6"] == 0, seen
        after = lab.status(0)["datapath"]
        assert after["dropped_ipv4"] >= drops["dropped_ipv4"] + 5, after
        assert after["dropped_ipv6"] >= drops["dropped_ipv6"] + 5, after
        # the node's own traffic there is blackholed too (Envoy's connections, say)
        ping = subprocess.run(["ip", "netns", "exec", node0, "ping", "-c", "1", "-W", "1",
                               "10.244.99.5"], capture_output=True, text=True)
        assert ping.returncode != 0
    finally:
        subprocess.run(["ip", "netns", "exec", node0, "ip", "route", "del", "10.244.99.0/24",
                        "via", f"172.30.{index}.99"], check=False)
        lab.kubectl("delete", "node", "ghost-node", "--wait=false")


def test_a_node_joining_later_becomes_a_peer(lab: EncLab) -> None:
    pair = keys.generate()
    ghost = {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": "ghost-late", "annotations": {
                 keys.ANNOTATION: pair.public_text}},
             "spec": {"podCIDR": "10.244.98.0/24", "podCIDRs": ["10.244.98.0/24"]}}
    lab.kubectl("apply", "-f", "-", input_text=json.dumps(ghost))
    try:
        lab.kubectl("patch", "node", "ghost-late", "--subresource", "status", "--type",
                    "merge", "-p", json.dumps({"status": {"addresses": [
                        {"type": "InternalIP", "address": f"172.30.{lab.state['index']}.98"}]}}))

        def joined() -> bool:
            return all(any(p["node"] == "ghost-late" and p["state"] == "up" and
                           p["publicKey"] == pair.public_text for p in lab.status(i)["peers"])
                       for i in (0, 1))

        _wait("both nodes have the new node as a peer", joined)
    finally:
        lab.kubectl("delete", "node", "ghost-late", "--wait=false")
    _wait("the peer gone with its Node", lambda: all(
        all(p["node"] != "ghost-late" for p in lab.status(i)["peers"]) for i in (0, 1)))


def test_a_key_rotation_under_load_loses_no_request(lab: EncLab) -> None:
    old = lab.status(0)["publicKey"]
    result: dict[str, Any] = {}

    def load() -> None:
        result.update(lab.python("client", LOAD, lab.pods["server"], "12", timeout=90))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(3)
    rotated = subprocess.run([sys.executable, "-m", "mesh.cli", "encryption", "rotate-key",
                              "--state-dir", str(lab.agent_dir(0))], capture_output=True,
                             text=True, cwd=ROOT, timeout=30)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.split()[-1]
    assert new != old
    worker.join(120)
    assert result["failed"] == 0 and result["ok"] > 100, result
    _wait("the other node follows the new key", lambda: any(
        p["publicKey"] == new and p["state"] == "up" for p in lab.status(1)["peers"]))
    assert lab.status(0)["publicKey"] == new
    assert _wait("a handshake after the rotation",
                 lambda: lab.status(1)["peers"][0]["lastHandshake"] > time.time() - 60)


def test_the_private_key_is_0600_and_in_no_log(lab: EncLab) -> None:
    for i in (0, 1):
        key_file = lab.agent_dir(i) / keys.KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o600
        private = keys.load(key_file).private
        texts = [base64.b64encode(private).decode(), private.hex()]
        node_dir = lab.agent_dir(i).parent
        logs = [node_dir / "agent.log", lab.agent_dir(i) / "wireguard-go.log",
                lab.agent_dir(i) / "encryption.json", cluster.ROOT / f"{lab.name}.log"]
        for path in logs:
            if path.exists():
                content = path.read_text(errors="replace")
                assert not any(t in content for t in texts), f"the private key is in {path}"
