"""The CNI plugin, called the way the CNI specification says (environment variables and the
configuration on stdin), in real network namespaces: a node and its pods, real traffic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.cni.interfaces import host_ifname
from mesh.cni.runtime import HOST_LOCAL, NetworkList, Runtime

pytestmark = pytest.mark.netns
PLUGIN = Path(sys.executable).parent / "mesh-cni"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@dataclass
class Node:
    name: str
    bin_dir: Path
    ipam_dir: Path
    pods: list[str]

    def runtime(self, subnet: str, cache: Path) -> Runtime:
        net = NetworkList("mesh", "1.0.0", ({
            "type": "mesh-cni", "mtu": 1500,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "dataDir": str(self.ipam_dir)}},))
        return Runtime(net, [str(self.bin_dir)], cache, ["ip", "netns", "exec", self.name])

    def pod(self, name: str) -> str:
        full = f"{self.name}-{name}"
        sh("ip", "netns", "add", full)
        self.pods.append(full)
        return full


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    assert HOST_LOCAL.exists(), "host-local missing: `make install` sets up the CNI plugins"
    name = f"mt-{os.getpid() % 100000}"
    sh("ip", "netns", "del", name, check=False)  # a crashed run's, if any
    sh("ip", "netns", "add", name)
    sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mesh-cni").symlink_to(PLUGIN)
    (bin_dir / "host-local").symlink_to(HOST_LOCAL)
    n = Node(name, bin_dir, tmp_path / "ipam", [])
    try:
        yield n
    finally:
        for pod in n.pods:
            sh("ip", "netns", "del", pod, check=False)
        sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(tmp_path / "ipam", ignore_errors=True)


def call(node: Node, command: str, config: Any, container: str = "c1",
         netns: str = "", ifname: str = "eth0") -> tuple[int, Any]:
    """The plugin run as a runtime runs it: CNI_* variables, the configuration on stdin."""
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": str(node.bin_dir)}
    stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
    out = subprocess.run(["ip", "netns", "exec", node.name, str(node.bin_dir / "mesh-cni")],
                         input=stdin, env=env, capture_output=True, check=False)
    text = out.stdout.decode().strip()
    return out.returncode, json.loads(text) if text else None


def config(node: Node, subnet: str = "10.210.0.0/24", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "mesh", "type": "mesh-cni",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "dataDir": str(node.ipam_dir)}, **extra}


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(); print("listening", flush=True)
c, peer = s.accept(); c.sendall(("hello " + peer[0]).encode()); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=5); print(c.recv(100).decode())
"""


def test_pods_on_a_node_get_addresses_and_talk(node: Node, tmp_path: Path) -> None:
    rt = node.runtime("10.210.0.0/24", tmp_path / "cache")
    a, b = node.pod("a"), node.pod("b")
    ra = rt.add("pod-a", f"/var/run/netns/{a}")
    rb = rt.add("pod-b", f"/var/run/netns/{b}")
    ip_a, ip_b = (r["ips"][0]["address"].split("/")[0] for r in (ra, rb))
    assert ra["cniVersion"] == "1.0.0" and ra["ips"][0]["address"].endswith("/32")
    assert ra["interfaces"][1] == {"name": "eth0", "mac": ra["interfaces"][1]["mac"],
                                   "sandbox": f"/var/run/netns/{a}"}
    assert ra["interfaces"][0]["name"] == host_ifname("pod-a", "eth0")
    # The host side is in the node's namespace, with a route to the pod.
    routes = sh("ip", "netns", "exec", node.name, "ip", "route").stdout
    assert f"{ip_a} dev {host_ifname('pod-a', 'eth0')}" in routes
    # Real traffic, pod to pod through the node.
    server = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", SERVER, ip_b],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        got = sh("ip", "netns", "exec", a, sys.executable, "-c", CLIENT, ip_b).stdout
        assert got.strip() == f"hello {ip_a}"  # the pod's own address, not NATed
    finally:
        server.kill()
        server.wait()
    rt.check("pod-a", f"/var/run/netns/{a}")
    rt.delete("pod-a", f"/var/run/netns/{a}")
    links = sh("ip", "netns", "exec", node.name, "ip", "-br", "link").stdout
    assert host_ifname("pod-a", "eth0") not in links
    assert host_ifname("pod-b", "eth0") in links
    assert not (node.ipam_dir / "mesh" / ip_a).exists()  # the address went back
    assert "eth0" not in sh("ip", "netns", "exec", a, "ip", "-br", "link").stdout
    rt.delete("pod-a", f"/var/run/netns/{a}")  # DEL is idempotent


def test_version_and_an_older_cni_version(node: Node) -> None:
    code, out = call(node, "VERSION", b"")
    assert code == 0 and "1.0.0" in out["supportedVersions"]
    pod = node.pod("old")
    code, out = call(node, "ADD", config(node, cniVersion="0.4.0"), netns=f"/var/run/netns/{pod}")
    assert code == 0 and out["cniVersion"] == "0.4.0" and out["ips"][0]["version"] == "4"


@pytest.mark.parametrize("stdin, command, code, words", [
    (b"{not json", "ADD", 6, "cannot decode"),
    (b'{"cniVersion": "1.0.0", "name": "mesh", "type": "mesh-cni"}', "ADD", 7, "ipam.type"),
    (b'{"name": "mesh", "type": "mesh-cni", "ipam": {"type": "host-local"}}', "ADD", 7,
     "cniVersion is required"),
    (b'{"cniVersion": "9.9.9", "name": "m", "type": "x", "ipam": {"type": "h"}}', "ADD", 1,
     "not supported"),
    (b"{}", "RESIZE", 4, "unknown CNI_COMMAND"),
])
def test_bad_input_gets_a_cni_error(node: Node, stdin: bytes, command: str, code: int,
                                    words: str) -> None:
    pod = node.pod("bad")
    status, out = call(node, command, stdin, netns=f"/var/run/netns/{pod}")
    assert status != 0
    assert out["code"] == code and words in out["msg"], out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}


def test_an_exhausted_range_is_an_error_and_loses_nothing(node: Node) -> None:
    cfg = config(node, subnet="10.211.0.0/30")  # one usable address (.1 is the gateway)
    first, second = node.pod("p1"), node.pod("p2")
    code, out = call(node, "ADD", cfg, "c1", f"/var/run/netns/{first}")
    assert code == 0
    code, out = call(node, "ADD", cfg, "c2", f"/var/run/netns/{second}")
    assert code != 0 and out["code"] == 100 and "no IP addresses available" in out["msg"]
    links = sh("ip", "netns", "exec", node.name, "ip", "-br", "link").stdout
    assert host_ifname("c2", "eth0") not in links  # nothing half made
    assert host_ifname("c1", "eth0") in links


def test_del_of_an_unknown_container_succeeds_and_check_says_unknown(node: Node) -> None:
    code, out = call(node, "DEL", config(node), "nobody")
    assert (code, out) == (0, None)
    pod = node.pod("empty")
    cfg = config(node, prevResult={"cniVersion": "1.0.0", "ips": [{"address": "10.9.9.9/32"}]})
    code, out = call(node, "CHECK", cfg, "nobody", f"/var/run/netns/{pod}")
    assert code != 0 and out["code"] == 3


def test_a_missing_namespace_on_add_is_an_error(node: Node) -> None:
    code, out = call(node, "ADD", config(node), "c1", "/var/run/netns/does-not-exist")
    assert code != 0 and out["code"] == 3 and "does not exist" in out["msg"]
