"""IPsec under Debian's kernel in qemu (tests/vm.py; these machines' kernel has no ESP).

The kernel part: two node namespaces joined through a bridge, each with a pod address;
`mesh.encryption.ipsec` plans and applies each node's states and policies from one secret; a
capture on the wire sees ESP and no packet between the pod addresses; a key rotation (a
second SPI installed on both, each node switching to it, the first removed) under a
continuous ping loses nothing, and the traffic ends on the new SPI.

The agent's part: each node runs the agent's IPsec sink (tests/ipsec_node.py: the sink fed by
the encryption translator from Node objects, the test playing the API server), with a pod in
a namespace of its own; the nodes find each other through their announcements, pods' and the
nodes' own traffic cross as ESP, a rotation done by editing the secret (one node first) waits
for the announcements and loses nothing, and a node that announced nothing is blackholed."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from tests import vm

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.vm,
              pytest.mark.skipif(vm.missing() is not None,
                                 reason=f"no VM here: {vm.missing()}")]

# Both scripts' start: two node namespaces joined through a third, the wire (a bridge in a
# namespace of its own, so that a capture there sees only what crosses it: on a node's own
# interface the kernel shows ESP's decrypted packets again), and a capture on node a's port.
WIRE = r"""
import json, os, socket, subprocess, sys, threading, time
from pyroute2.netns import setns

out = {}
def sh(*a):
    subprocess.run(a, check=True)

subprocess.run(["modprobe", "esp4"], check=False)
def wire(*more):
    for ns in ("na", "nb", "wire", *more):
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", "wire", "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", "wire", "link", "set", "br0", "up")
    for ns, dev, port in (("na", "ua", "wa"), ("nb", "ub", "wb")):
        sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port,
           "netns", "wire")
        sh("ip", "-n", "wire", "link", "set", port, "master", "br0", "up")

seen = {"esp": 0, "plain": 0, "spis": []}  # on the wire: ESP, its key SPIs, pods in clear
stop = threading.Event()
def capture(pods):
    setns("/run/netns/wire")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("wa", 0))  # node a's port: both ways, as received or sent by the bridge
    s.settimeout(0.5)
    while not stop.is_set():
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if frame[12:14] != b"\x08\x00":
            continue
        proto, src, dst = frame[23], frame[26:30], frame[30:34]
        if proto == 50:
            seen["esp"] += 1
            spi = int.from_bytes(frame[34:38], "big") >> 24
            if spi not in seen["spis"]:
                seen["spis"].append(spi)
        if src[:2] in pods or dst[:2] in pods:
            seen["plain"] += 1
def start_capture(*pods):
    t = threading.Thread(target=capture, args=(pods,), daemon=True)
    t.start()
    return t
"""

SCRIPT = WIRE + r"""
from mesh.encryption import ipsec

out["esp_missing"] = ipsec.kernel_has_esp()
wire()
for ns, dev, address, pod, other_pods, gw in (
        ("na", "ua", "192.0.2.1", "10.1.0.1", "10.2.0.0/24", "192.0.2.2"),
        ("nb", "ub", "192.0.2.2", "10.2.0.1", "10.1.0.0/24", "192.0.2.1")):
    for args in (["addr", "add", address + "/24", "dev", dev], ["link", "set", dev, "up"],
                 ["link", "set", "lo", "up"], ["addr", "add", pod + "/32", "dev", "lo"],
                 ["route", "add", other_pods, "via", gw, "src", pod]):
        sh("ip", "-n", ns, *args)

nodes = {"na": ipsec.Node("node-a", "192.0.2.1", ("10.1.0.0/24",)),
         "nb": ipsec.Node("node-b", "192.0.2.2", ("10.2.0.0/24",))}
secret = ipsec.parse_keys("1 rfc4106(gcm(aes)) " + "11" * 20 + " 128\n2 " + "22" * 20)
applied = {}
root = os.open("/proc/self/ns/net", os.O_RDONLY)

def install(ns, keys, send):
    setns(f"/run/netns/{ns}")
    other = nodes["nb" if ns == "na" else "na"]
    wanted = ipsec.plan(nodes[ns], [other], keys, send)
    ipsec.apply(wanted, applied.get(ns))
    applied[ns] = wanted
    found = ipsec.traffic()
    setns(root)
    return found

k1, k2 = secret
install("na", [k1], 1)
install("nb", [k1], 1)

# the wire: ESP, and never a packet between the pod addresses
t = start_capture(bytes([10, 1]))
time.sleep(1)
ping = subprocess.Popen(["ip", "netns", "exec", "na", "busybox", "ping", "-c", "120", "-i",
                         "0.1", "-W", "2", "-I", "10.1.0.1", "10.2.0.1"],
                        stdout=subprocess.PIPE, text=True)
time.sleep(3)
install("na", [k1, k2], 1)   # both nodes get the new key's states, still sending with SPI 1
install("nb", [k1, k2], 1)
time.sleep(1)
install("na", [k1, k2], 2)   # each switches once every peer has the states
time.sleep(1)
install("nb", [k1, k2], 2)
time.sleep(2)
before_removal = install("na", [k1, k2], 2)
install("na", [k2], 2)       # the old key goes, everywhere
def by_spi(found):
    spis = {}
    for (_, _, spi), (n, _) in found.items():
        spis[hex(spi)] = spis.get(hex(spi), 0) + n
    return spis
out["after"] = by_spi(install("nb", [k2], 2))
out["before_removal"] = by_spi(before_removal)
result = ping.communicate(timeout=120)[0]
stop.set()
t.join()
out["ping"] = [line for line in result.splitlines() if "packets" in line]
out["wire"] = seen
out["spi1"] = hex(ipsec.wire_spi(1, "node-a"))
out["spi2"] = hex(ipsec.wire_spi(2, "node-a"))
print("RESULT " + json.dumps(out))
"""


def test_esp_between_two_nodes_and_a_rotation_that_drops_nothing() -> None:
    work = vm.WORK_ROOT / "ipsec-test"
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.py").write_text(SCRIPT)
    try:
        status, output = vm.run(f".venv/bin/python {work}/run.py", timeout=900)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert status == 0, output[-4000:]
    line = next((x for x in output.splitlines() if "RESULT " in x), None)
    assert line is not None, output[-4000:]
    got = json.loads(line.split("RESULT ", 1)[1])
    assert got["esp_missing"] is None
    (summary,) = got["ping"]
    assert "120 packets transmitted, 120 packets received, 0% packet loss" in summary, got
    assert got["wire"]["esp"] >= 200 and got["wire"]["plain"] == 0, got["wire"]
    # before the old key went, both SPIs had carried traffic; after, only the new one is left
    assert got["before_removal"][got["spi1"]] > 0 and got["before_removal"][got["spi2"]] > 0
    assert got["spi1"] not in got["after"] and got["after"][got["spi2"]] > 0, got


AGENT_SCRIPT = WIRE + r"""
from pathlib import Path

DATAPATH = sys.argv[1:] == ["datapath"]
W = Path("/run/ipsec")
W.mkdir()
wire("pa", "pb")
nodes = []
for ns, dev, address, cidr, pod_ns, pod, other, gw in (
        ("na", "ua", "192.0.2.1", "10.1.0.0/24", "pa", "10.1.0.5", "10.2.0.0/24", "192.0.2.2"),
        ("nb", "ub", "192.0.2.2", "10.2.0.0/24", "pb", "10.2.0.5", "10.1.0.0/24", "192.0.2.1")):
    for args in (["addr", "add", address + "/24", "dev", dev], ["link", "set", dev, "up"],
                 ["link", "set", "lo", "up"], ["route", "add", other, "via", gw]):
        sh("ip", "-n", ns, *args)
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # the pod: a veth into its own namespace, its gateway the node (as the lab's pods; the
    # host side named as the CNI plugin names it, which the datapath looks for)
    host = "mesh0000000000" + ns[1]
    sh("ip", "link", "add", host, "netns", ns, "type", "veth", "peer", "name", "eth0",
       "netns", pod_ns)
    sh("ip", "-n", ns, "link", "set", host, "up")
    sh("ip", "-n", ns, "route", "add", pod + "/32", "dev", host)
    sh("ip", "-n", ns, "addr", "add", "169.254.1.1/32", "dev", host)
    sh("ip", "-n", pod_ns, "addr", "add", pod + "/32", "dev", "eth0")
    sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
    mac = subprocess.run(["ip", "-n", pod_ns, "-j", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    sh("ip", "-n", ns, "neigh", "replace", pod, "lladdr", json.loads(mac)[0]["address"],
       "dev", host, "nud", "permanent")
    sh("ip", "-n", pod_ns, "link", "set", "lo", "up")
    sh("ip", "-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", pod_ns, "route", "add", "default", "via", "169.254.1.1")
    nodes.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": ns},
                  "spec": {"podCIDRs": [cidr]},
                  "status": {"addresses": [{"type": "InternalIP", "address": address}]}})
# a third Node that never announces: blackholed in strict mode (nothing of it runs)
nodes.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "nc"},
              "spec": {"podCIDRs": ["10.3.0.0/24"]},
              "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.3"}]}})

K1 = "1 rfc4106(gcm(aes)) " + os.urandom(20).hex() + " 128\n"
K2 = "2 rfc4106(gcm(aes)) " + os.urandom(20).hex() + " 128\n"
for n in ("na", "nb"):
    (W / f"{n}.keys").write_text(K1)

def publish():  # the API server: the announcements onto the Nodes
    for node in nodes:
        f = W / (node["metadata"]["name"] + ".announce")
        text = f.read_text() if f.exists() else ""
        if text:
            node["metadata"]["annotations"] = {"mesh.dev/ipsec-spis": text}
    tmp = W / "nodes.tmp"
    tmp.write_text(json.dumps(nodes))
    tmp.replace(W / "nodes.json")
def api():
    while not stop.is_set():
        publish()
        time.sleep(0.2)
threading.Thread(target=api, daemon=True).start()
agents = {n: subprocess.Popen(["ip", "netns", "exec", n, sys.executable, "-m",
                               "tests.ipsec_node", str(W), n,
                               *(["u" + n[1]] if DATAPATH else [])],
                              stderr=open(W / f"{n}.log", "w"))
          for n in ("na", "nb")}

def status(n):
    try:
        return json.loads((W / n / "encryption.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
def sending(n, peer):
    return next((p["sendSPI"] for p in status(n).get("peers", []) if p["node"] == peer), None)
def wait(what, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end and all(a.poll() is None for a in agents.values()):
        if what():
            return True
        time.sleep(0.2)
    return False

out["up"] = wait(lambda: sending("na", "nb") == 1 and sending("nb", "na") == 1,
                 300 if DATAPATH else 60)  # bcc compiles the programs first: slow in qemu
def datapath(n):
    try:
        return json.loads((W / f"{n}.datapath").read_text())
    except (FileNotFoundError, ValueError):
        return {}

t = start_capture(bytes([10, 1]), bytes([10, 2]), bytes([10, 3]))
time.sleep(1)
def ping(ns, target, count, *extra):
    return subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "ping", "-c", str(count),
                             "-i", "0.1", "-W", "2", *extra, target],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
pods = ping("pa", "10.2.0.5", 250)
node = ping("na", "10.2.0.5", 250)   # the node's own traffic (Envoy's, say)
time.sleep(3)
# the rotation: the new key reaches one node's secret first (as kubelet updates mounts)
(W / "na.keys").write_text(K1 + K2)
out["na_announced_both"] = wait(lambda: status("na").get("announced") == "1,2")
time.sleep(1)
# nb has not got the key: na may not send with it yet, and does not
out["na_waits"] = sending("na", "nb")
(W / "nb.keys").write_text(K1 + K2)
out["switched"] = wait(lambda: sending("na", "nb") == 2 and sending("nb", "na") == 2)
time.sleep(2)
for n in ("na", "nb"):  # the old key leaves the secret
    (W / f"{n}.keys").write_text(K2)
out["old_gone"] = wait(lambda: status("na").get("announced") == "2" and
                       status("nb").get("announced") == "2")
time.sleep(2)
out["pods"] = [l for l in pods.communicate(timeout=120)[0].splitlines() if "packets" in l]
out["node"] = [l for l in node.communicate(timeout=120)[0].splitlines() if "packets" in l]
strict = subprocess.run(["ip", "netns", "exec", "na", "busybox", "ping", "-c", "1", "-W", "1",
                         "10.3.0.5"], capture_output=True, text=True)
# a pod's packets to a node that announced nothing: the datapath drops them (strict mode)
pod_strict = subprocess.run(["ip", "netns", "exec", "pa", "busybox", "ping", "-c", "3", "-W",
                             "1", "10.3.0.5"], capture_output=True, text=True)
out["pod_strict"] = pod_strict.stdout + pod_strict.stderr
time.sleep(1.5)
out["datapath"] = {n: datapath(n) for n in ("na", "nb")}
out["strict"] = strict.stdout + strict.stderr
out["table"] = subprocess.run(["ip", "-n", "na", "route", "show", "table", "2005"],
                              capture_output=True, text=True).stdout
stop.set()
t.join()
out["wire"] = seen
out["na_status"] = status("na")
out["states"] = subprocess.run(["ip", "-n", "na", "xfrm", "state"], capture_output=True,
                               text=True).stdout.count("proto esp")
(W / "stop").touch()
for a in agents.values():
    a.wait(timeout=30)
logs = {n: (W / f"{n}.log").read_text() for n in agents}
out["logs"] = {n: text[-1500:] for n, text in logs.items()}
out["key_in_logs"] = any(k.split()[2] in text for k in (K1, K2) for text in logs.values())
print("RESULT " + json.dumps(out))
"""


def _agents(datapath: bool) -> dict[str, Any]:
    work = vm.WORK_ROOT / f"ipsec-agent-test-{datapath}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.py").write_text(AGENT_SCRIPT)
    try:
        status, output = vm.run(
            f".venv/bin/python {work}/run.py" + (" datapath" if datapath else ""), timeout=1200,
            kernel=vm.with_headers() if datapath else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert status == 0, output[-4000:]
    line = next((x for x in output.splitlines() if "RESULT " in x), None)
    assert line is not None, output[-4000:]
    found: dict[str, Any] = json.loads(line.split("RESULT ", 1)[1])
    return found


def test_the_agents_ipsec_finds_its_peers_and_rotates_by_announcement() -> None:
    got = _agents(datapath=False)
    assert got["up"], got
    # one node had the new key, the other not yet: still sending with the old one
    assert got["na_announced_both"] and got["na_waits"] == 1, got
    assert got["switched"] and got["old_gone"], got
    for what in ("pods", "node"):
        (summary,) = got[what]
        assert "250 packets transmitted, 250 packets received, 0% packet loss" in summary, got
    assert got["wire"]["esp"] >= 1000 and got["wire"]["plain"] == 0, got["wire"]
    assert got["wire"]["spis"] == [1, 2], got["wire"]
    # only the new key's states are left: both ways with nb (nc has no announcement, but
    # states for it are in: it may start sending any time)
    assert got["states"] == 4, got
    # the node's own packets: to nb from its tunnel source, to nc blackholed (the kernel
    # refuses to send: EINVAL)
    assert "10.2.0.0/24 via 192.0.2.2 dev ua proto static src 10.1.0.1" in got["table"]
    assert "blackhole 10.3.0.0/24" in got["table"], got["table"]
    assert "Invalid argument" in got["strict"] and "1 packets received" not in got["strict"]
    peers = {p["node"]: p for p in got["na_status"]["peers"]}
    assert peers["nb"]["state"] == "up" and peers["nb"]["sendSPI"] == 2
    assert peers["nb"]["txPackets"] > 0 and peers["nb"]["rxPackets"] > 0
    assert (peers["nc"]["txPackets"], peers["nc"]["rxPackets"]) == (0, 0)
    assert peers["nc"]["state"] == "down" and \
        peers["nc"]["problem"] == "no IPsec announcement from it yet"
    assert not got["key_in_logs"]
    for log in got["logs"].values():
        assert "Traceback" not in log, log


@pytest.mark.skipif(vm.with_headers() is None,
                    reason="no Debian kernel with its headers installed: bcc compiles the "
                           "datapath against the VM's kernel's (Debian: linux-headers-amd64)")
@pytest.mark.timeout(1500)
def test_the_datapath_leaves_pods_packets_to_xfrm_and_strict_mode_drops_the_rest() -> None:
    """The same two nodes with the agent's datapath (bpf/fwd.c on the pods' veths and the
    underlay) beside the IPsec sink: the pods' packets to an up peer are counted and left
    to the kernel, whose ESP carries them (nothing in the clear on the wire), and come out
    decrypted into the datapath, which delivers them to the pod; to a node that announced
    nothing, dropped and counted."""
    got = _agents(datapath=True)
    assert got["up"], got
    (summary,) = got["pods"]
    assert "250 packets transmitted, 250 packets received, 0% packet loss" in summary, got
    assert got["wire"]["esp"] >= 1000 and got["wire"]["plain"] == 0, got["wire"]
    na, nb = got["datapath"]["na"], got["datapath"]["nb"]
    assert na["sent"] >= 250 and nb["sent"] >= 250, got["datapath"]  # each way's pings
    # what ESP brought in, decrypted, passes the underlay's program again, which delivers it
    # into the pod (bpf_redirect_peer): the replies to pa's pings
    assert na["local"] >= 250, got["datapath"]
    assert na["dropped_ipv4"] == 3 and "100% packet loss" in got["pod_strict"], got
