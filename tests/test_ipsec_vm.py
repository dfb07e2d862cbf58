"""IPsec's kernel part under Debian's kernel in qemu (tests/vm.py; these machines' kernel has no
ESP): two node namespaces joined by a veth, each with a pod address; `mesh.encryption.ipsec`
plans and applies each node's states and policies from one secret; a capture on the wire sees
ESP and no packet between the pod addresses; a key rotation (a second SPI installed on both,
each node switching to it, the first removed) under a continuous ping loses nothing, and the
traffic ends on the new SPI."""

from __future__ import annotations

import json
import shutil

import pytest

from tests import vm

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.vm,
              pytest.mark.skipif(vm.missing() is not None,
                                 reason=f"no VM here: {vm.missing()}")]

SCRIPT = r"""
import json, os, socket, subprocess, threading, time
from pyroute2.netns import setns
from mesh.encryption import ipsec

out = {}
def sh(*a):
    subprocess.run(a, check=True)

subprocess.run(["modprobe", "esp4"], check=False)
out["esp_missing"] = ipsec.kernel_has_esp()
for ns in ("na", "nb", "wire"):
    sh("ip", "netns", "add", ns)
# the wire: a bridge in a namespace of its own, so that a capture there sees only what
# crosses it (on a node's own interface the kernel shows ESP's decrypted packets again)
sh("ip", "-n", "wire", "link", "add", "br0", "type", "bridge")
sh("ip", "-n", "wire", "link", "set", "br0", "up")
for ns, dev, port in (("na", "ua", "pa"), ("nb", "ub", "pb")):
    sh("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port,
       "netns", "wire")
    sh("ip", "-n", "wire", "link", "set", port, "master", "br0", "up")
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
    found = ipsec.counters()
    setns(root)
    return found

k1, k2 = secret
install("na", [k1], 1)
install("nb", [k1], 1)

# the wire: ESP, and never a packet between the pod addresses
seen = {"esp": 0, "plain": 0}
def capture():
    setns("/run/netns/wire")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("pa", 0))  # node a's port: both ways, as received or sent by the bridge
    s.settimeout(0.5)
    end = time.monotonic() + 60
    while time.monotonic() < end and not stop.is_set():
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if frame[12:14] != b"\x08\x00":
            continue
        proto, src, dst = frame[23], frame[26:30], frame[30:34]
        if proto == 50:
            seen["esp"] += 1
        if src[:2] == bytes([10, 1]) or dst[:2] == bytes([10, 1]):
            seen["plain"] += 1
stop = threading.Event()
t = threading.Thread(target=capture)
t.start()
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
out["after"] = {hex(k): v for k, v in install("nb", [k2], 2).items()}
out["before_removal"] = {hex(k): v for k, v in before_removal.items()}
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
