"""What these machines' kernel lacks, under Debian's kernel in qemu (tests/vm.py): the kernel's
WireGuard driven by the agent's code. Two node namespaces joined by a veth; in each, the
encryption's device layer (`KernelWireGuard`, chosen by `choose` because the kernel has
WireGuard) is given a key pair and the other node as its peer, exactly as the encryption sink
gives them; traffic between the two nodes' tunnel addresses crosses, the state read back has
the handshake and the bytes, and a peer removed is gone."""

from __future__ import annotations

import json

import pytest

from tests import vm

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.vm,
              pytest.mark.skipif(vm.missing() is not None,
                                 reason=f"no VM here: {vm.missing()}")]

# Run as root in the VM, in the project: prints one JSON line of findings.
SCRIPT = r"""
import asyncio, json, subprocess, sys
from pyroute2 import IPRoute
from mesh.encryption import keys, wireguard
from mesh.encryption.uapi import PeerConfig

def sh(*a):
    subprocess.run(a, check=True)

node, me, other, my_net, other_net, my_key, other_pub = sys.argv[1:8]
out = {}
with IPRoute() as ip:
    out["backend"] = wireguard.choose(ip)
dev = wireguard.device(out["backend"])
pair = keys.load(__import__("pathlib").Path(my_key))

async def main():
    out["made"] = await dev.ensure()
    await dev.configure(pair.private, wireguard.PORT)
    await dev.set_peer(PeerConfig(keys.parse_public(other_pub), f"{other}:{wireguard.PORT}",
                                  (other_net,), 25))
    state = await dev.get()
    out["port"] = state.listen_port
    out["key_set"] = state.private_key == pair.private
    (peer,) = state.peers.values()
    out["peer"] = {"endpoint": peer.endpoint, "allowed": peer.allowed_ips,
                   "keepalive": peer.keepalive}
asyncio.run(main())
sh("ip", "addr", "add", my_net.replace("0/24", "1/32"), "dev", wireguard.DEVICE)
sh("ip", "link", "set", wireguard.DEVICE, "mtu", str(wireguard.tunnel_mtu(1500)), "up")
sh("ip", "route", "add", other_net, "dev", wireguard.DEVICE)
print(json.dumps(out))
"""

AFTER = r"""
import asyncio, json, sys
from mesh.encryption import keys, wireguard
dev = wireguard.device("kernel")
async def main():
    state = await dev.get()
    (peer,) = state.peers.values()
    out = {"handshake": peer.last_handshake > 0, "rx": peer.rx_bytes, "tx": peer.tx_bytes}
    await dev.remove_peer(peer.public_key)
    out["after_remove"] = len((await dev.get()).peers)
    print(json.dumps(out))
asyncio.run(main())
"""


def test_the_kernels_wireguard_driven_by_the_agents_code(tmp_path_factory: pytest.TempPathFactory
                                                         ) -> None:
    from mesh.encryption import keys

    work = vm.WORK_ROOT / "wg-test"
    work.mkdir(parents=True, exist_ok=True)
    pairs = [keys.generate(), keys.generate()]
    for i, pair in enumerate(pairs):
        keys.save(work / f"key{i}", pair)
    (work / "setup.py").write_text(SCRIPT)
    (work / "after.py").write_text(AFTER)
    py = ".venv/bin/python"
    nodes = [("na", "192.0.2.1", "10.1.0.0/24"), ("nb", "192.0.2.2", "10.2.0.0/24")]
    lines = ["set -e", "modprobe wireguard", "ip netns add na", "ip netns add nb",
             "ip link add ua netns na type veth peer name ub netns nb",
             "ip -n na addr add 192.0.2.1/24 dev ua", "ip -n nb addr add 192.0.2.2/24 dev ub",
             "ip -n na link set ua up", "ip -n nb link set ub up",
             "ip -n na link set lo up", "ip -n nb link set lo up"]
    for i, (name, address, net) in enumerate(nodes):
        other = nodes[1 - i]
        lines.append(f"echo SETUP-{name}; ip netns exec {name} {py} {work}/setup.py {name} "
                     f"{address} {other[1]} {net} {other[2]} {work}/key{i} "
                     f"{pairs[1 - i].public_text}")
    lines += ["echo PING; ip netns exec na busybox ping -c 3 -W 5 -I 10.1.0.1 10.2.0.1 "
              ">/dev/null && echo PING-OK",
              "echo PLAIN; ip netns exec na ip route get 10.2.0.1",
              f"echo AFTER; ip netns exec na {py} {work}/after.py"]
    try:
        status, output = vm.run("\n".join(lines), timeout=900)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    assert status == 0, output[-3000:]
    found = {}
    for tag in ("SETUP-na", "SETUP-nb", "AFTER"):
        block = output.split(tag, 1)[1].strip().splitlines()
        found[tag] = json.loads(next(line for line in block if line.startswith("{")))
    for tag, other in (("SETUP-na", nodes[1]), ("SETUP-nb", nodes[0])):
        got = found[tag]
        assert got["backend"] == "kernel" and got["made"] is True and got["key_set"], got
        assert got["port"] == 51871
        assert got["peer"] == {"endpoint": f"{other[1]}:51871", "allowed": [other[2]],
                               "keepalive": 25}, got
    assert "PING-OK" in output, output[-2000:]
    assert "dev mesh-wg0" in output.split("PLAIN", 1)[1].splitlines()[1]
    after = found["AFTER"]
    assert after["handshake"] and after["rx"] > 0 and after["tx"] > 0, after
    assert after["after_remove"] == 0
