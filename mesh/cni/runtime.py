"""The runtime side of CNI: a network configuration list run the way libcni (and a kubelet's
container runtime) runs it, for the lab and the tests. Debian has no `cnitool`; this is the
same protocol: each plugin of the list in order for ADD (the previous result passed on as
`prevResult`), in reverse for DEL, the list's name and cniVersion injected in each plugin's
configuration, the ADD result cached per container for CHECK and DEL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.cni.plugin import CNIError

PLUGIN = "mesh-cni"  # the plugin's binary, which is its `type` in a network configuration


@dataclass(frozen=True)
class NetworkList:
    name: str
    version: str
    plugins: tuple[dict[str, Any], ...]

    @classmethod
    def load(cls, path: Path) -> NetworkList:
        doc = json.loads(path.read_text())
        return cls(str(doc["name"]), str(doc["cniVersion"]), tuple(doc["plugins"]))

    def to_json(self) -> dict[str, Any]:
        return {"cniVersion": self.version, "name": self.name, "plugins": list(self.plugins)}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))


def mesh_network(pod_cidr: str, mtu: int = 1500, ipam_dir: Path | None = None) -> NetworkList:
    """The mesh's network: our plugin, addresses from host-local over the node's pod CIDR
    (in `ipam_dir`, else host-local's default). On a node (`mesh cni-install`) and in the
    lab alike."""
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]]}
    if ipam_dir is not None:
        ipam["dataDir"] = str(ipam_dir)
    return NetworkList("mesh", "1.0.0", ({"type": PLUGIN, "mtu": mtu, "ipam": ipam},))


class Runtime:
    def __init__(self, network: NetworkList, bin_dirs: list[str], cache_dir: Path,
                 netns_exec: list[str] | None = None) -> None:
        self.network = network
        self.bin_dirs = bin_dirs
        self.cache_dir = cache_dir
        # A prefix to run plugins with, e.g. ["ip", "netns", "exec", NODE]: the node's
        # namespace, where the host side of the pod's interface goes.
        self.netns_exec = netns_exec or []

    def _cache(self, container_id: str, ifname: str) -> Path:
        return self.cache_dir / f"{self.network.name}-{container_id}-{ifname}.json"

    def _call(self, plugin: dict[str, Any], command: str, container_id: str, netns: str,
              ifname: str, prev: dict[str, Any] | None) -> dict[str, Any] | None:
        conf = {**plugin, "name": self.network.name, "cniVersion": self.network.version}
        if prev is not None:
            conf["prevResult"] = prev
        binary = next((str(Path(d) / plugin["type"]) for d in self.bin_dirs
                       if os.access(Path(d) / plugin["type"], os.X_OK)), None)
        if binary is None:
            raise CNIError(7, f"plugin {plugin['type']} not found in {self.bin_dirs}")
        env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_PATH": os.pathsep.join(self.bin_dirs)}
        out = subprocess.run([*self.netns_exec, binary], input=json.dumps(conf).encode(),
                             env=env, capture_output=True, timeout=60, check=False)
        text = out.stdout.decode(errors="replace").strip()
        if out.returncode != 0:
            try:
                err = json.loads(text)
            except ValueError:
                raise CNIError(999, text or out.stderr.decode(errors="replace")) from None
            raise CNIError(int(err.get("code", 999)), str(err.get("msg", "")),
                           str(err.get("details", "")))
        return json.loads(text) if text else None

    def add(self, container_id: str, netns: str, ifname: str = "eth0") -> dict[str, Any]:
        result: dict[str, Any] | None = None
        for plugin in self.network.plugins:
            result = self._call(plugin, "ADD", container_id, netns, ifname, result) or result
        assert result is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache(container_id, ifname).write_text(json.dumps(result))
        return result

    def cached(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._cache(container_id, ifname).read_text())
            return data
        except (OSError, ValueError):
            return None

    def check(self, container_id: str, netns: str, ifname: str = "eth0") -> None:
        prev = self.cached(container_id, ifname)
        for plugin in self.network.plugins:
            self._call(plugin, "CHECK", container_id, netns, ifname, prev)

    def delete(self, container_id: str, netns: str, ifname: str = "eth0") -> None:
        prev = self.cached(container_id, ifname)
        for plugin in reversed(self.network.plugins):
            self._call(plugin, "DEL", container_id, netns, ifname, prev)
        self._cache(container_id, ifname).unlink(missing_ok=True)


HOST_LOCAL = Path("/usr/lib/cni/host-local")  # Debian's containernetworking-plugins
CONFLIST = Path("net.d") / "10-mesh.conflist"


def node_runtime(base: Path, pod_cidr: str, node_netns: str, mtu: int = 1500) -> Runtime:
    """A node's CNI setup, as a kubelet's container runtime finds it, under `base`: the
    plugins (ours and host-local) in bin/, the conflist in net.d/, IPAM state and the
    results cache beside them; plugins run in the node's network namespace."""
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in ((PLUGIN, Path(sys.executable).parent / PLUGIN),
                         ("host-local", HOST_LOCAL)):
        link = bin_dir / name
        if not link.is_symlink():
            link.symlink_to(target)
    mesh_network(pod_cidr, mtu, ipam_dir=base / "ipam").write(base / CONFLIST)
    return existing_runtime(base, node_netns)


def existing_runtime(base: Path, node_netns: str) -> Runtime:
    """The runtime of a node set up by node_runtime (for DEL, after a restart)."""
    return Runtime(NetworkList.load(base / CONFLIST), [str(base / "bin")], base / "cache",
                   ["ip", "netns", "exec", node_netns])
