"""`mesh cni-install`: the mesh CNI plugin and its network configuration put on a node.

The chart's init container runs it with the node's CNI directories mounted:

- `BIN_DIR/mesh-cni`: the plugin (`mesh/cni/plugin.py`) as one executable file, a Python
  zip application (`#!/usr/bin/env python3`, then a zip archive: the plugin as `__main__.py`,
  the one module of the project it imports (`mesh/cni/interfaces.py`, with its packages'
  `__init__.py`), and the pure-Python `pyroute2` package it uses for netlink, with its
  licence files). The
  container runtime runs it with the node's own `python3` (3.9 or later), which needs
  nothing installed besides.
- `CONF_DIR/05-mesh.conflist`: CNI 1.0.0, the plugin with `host-local` IPAM over the node's
  pod CIDR (as the lab's `mesh.cni.runtime.node_runtime` writes it). `host-local` is not
  installed here: it is the standard plugin of the node's CNI plugins package.

The pod CIDR is given (`--pod-cidr`) or read from the node's Node object
(`--pod-cidr-from-node`: its IPv4 `spec.podCIDRs` entry, which the controller manager
allocates with `--allocate-node-cidrs`); host-local has no way of its own to learn it.

Both files are written atomically (a temporary file in the same directory, then a rename) and
only when their content or mode differ, so running it again changes nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import ipaddress
import json
import os
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import click

from mesh.cni import interfaces, plugin
from mesh.cni.runtime import PLUGIN, mesh_network

PLUGIN_NAME = PLUGIN
CONFLIST_NAME = "05-mesh.conflist"  # sorts before other networks' files: the runtime's first
SHEBANG = b"#!/usr/bin/env python3\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same source gives the same bytes


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def plugin_executable() -> bytes:
    """The plugin as a zip application, byte for byte the same for the same sources."""
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException("pyroute2 is not installed: the plugin needs it")
    pyroute2 = Path(next(iter(spec.submodule_search_locations)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _add(zf, "__main__.py", Path(plugin.__file__).read_bytes())
        # What the plugin imports of the project: stdlib-only modules, as they are here.
        package = Path(interfaces.__file__).parent
        for path in (package.parent / "__init__.py", package / "__init__.py",
                     Path(interfaces.__file__)):
            _add(zf, path.relative_to(package.parent.parent).as_posix(), path.read_bytes())
        for path in sorted(pyroute2.rglob("*.py")):
            _add(zf, f"pyroute2/{path.relative_to(pyroute2).as_posix()}", path.read_bytes())
        for dist in sorted(pyroute2.parent.glob("pyroute2-*.dist-info")):
            for lic in sorted(dist.rglob("LICENSE*")):
                _add(zf, f"pyroute2-licenses/{lic.name}", lic.read_bytes())
    return SHEBANG + buf.getvalue()


def conflist(pod_cidr: str, mtu: int = 1500) -> dict[str, Any]:
    return mesh_network(pod_cidr, mtu).to_json()


def write_atomic(path: Path, data: bytes, mode: int) -> bool:
    """`path` holds `data` with `mode`; whether it had to be written. Readers (the runtime
    running the plugin, reading the conflist) see the old file or the new one, never half."""
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) == mode and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def install(bin_dir: Path, conf_dir: Path, pod_cidr: str, mtu: int = 1500) -> dict[str, bool]:
    """Both files in place; per file, whether it was written."""
    network = ipaddress.ip_network(pod_cidr)
    if network.version != 4:
        raise ValueError(f"pod CIDR {pod_cidr}: the plugin gives pods IPv4 addresses only")
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = (json.dumps(conflist(str(network), mtu), indent=2) + "\n").encode()
    return {
        str(bin_dir / PLUGIN_NAME): write_atomic(bin_dir / PLUGIN_NAME, plugin_executable(),
                                                 0o755),
        str(conf_dir / CONFLIST_NAME): write_atomic(conf_dir / CONFLIST_NAME, conf, 0o644),
    }


def ipv4_pod_cidr(node: dict[str, Any]) -> str | None:
    """The IPv4 range of a Node's spec.podCIDRs (or spec.podCIDR), if it has one."""
    spec = node.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or []) or ([spec["podCIDR"]] if spec.get("podCIDR")
                                                 else [])
    for cidr in cidrs:
        try:
            if ipaddress.ip_network(str(cidr)).version == 4:
                return str(cidr)
        except ValueError:
            continue
    return None


async def node_pod_cidr(node: str, kubeconfig: str | None, timeout: float,
                        interval: float = 2.0) -> str:
    """The node's IPv4 pod CIDR from the API server (in-cluster configuration unless a
    kubeconfig is given), waiting up to `timeout` seconds for the controller manager to
    allocate it. A list with a field selector: the agent's ClusterRole lists nodes, it does
    not get them."""
    # Imported here: `mesh cni-install --pod-cidr` (and the CLI's other commands) need no
    # Kubernetes client.
    from mesh.kube.client import connect
    from mesh.kube.resources import NODES

    deadline = time.monotonic() + timeout
    async with connect(kubeconfig) as http:
        while True:
            problem: str
            try:
                data = await http.get_json(NODES.path, {"fieldSelector": f"metadata.name={node}"})
                items = data.get("items") or []
                if not items:
                    problem = f"no Node named {node}"
                else:
                    cidr = ipv4_pod_cidr(items[0])
                    if cidr is not None:
                        return cidr
                    problem = (f"Node {node} has no IPv4 spec.podCIDRs (does the controller "
                               "manager allocate node CIDRs? else set cni.podCIDR)")
            except Exception as e:  # the API's errors, retried until the deadline
                problem = f"cannot read Node {node}: {e}"
            if time.monotonic() + interval > deadline:
                raise click.ClickException(problem)
            await asyncio.sleep(interval)


@click.command("cni-install")
@click.option("--bin-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/opt/cni/bin"), show_default=True,
              help="The node's CNI plugin directory (mounted from the host).")
@click.option("--conf-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/etc/cni/net.d"), show_default=True,
              help="The node's CNI configuration directory (mounted from the host).")
@click.option("--pod-cidr", metavar="CIDR", help="The node's pod range (IPv4).")
@click.option("--pod-cidr-from-node", "from_node", metavar="NODE",
              help="Instead: read the range from this Node's spec.podCIDRs.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
              help="With --pod-cidr-from-node: the kubeconfig (default: in-cluster).")
@click.option("--timeout", default=120.0, show_default=True, metavar="SECONDS",
              help="With --pod-cidr-from-node: how long to wait for the range.")
@click.option("--mtu", default=1500, show_default=True, type=click.IntRange(576, 65535),
              help="The pods' interface MTU.")
def cni_install(bin_dir: Path, conf_dir: Path, pod_cidr: str | None, from_node: str | None,
                kubeconfig: str | None, timeout: float, mtu: int) -> None:
    """Install the mesh CNI plugin and its network configuration on this node."""
    if (pod_cidr is None) == (from_node is None):
        raise click.UsageError("give one of --pod-cidr and --pod-cidr-from-node")
    if from_node is not None:
        pod_cidr = asyncio.run(node_pod_cidr(from_node, kubeconfig, timeout))
    assert pod_cidr is not None
    try:
        written = install(bin_dir, conf_dir, pod_cidr, mtu)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--pod-cidr") from e
    except OSError as e:
        raise click.ClickException(f"cannot install the CNI plugin: {e}") from e
    for path, changed in written.items():
        click.echo(f"{path}: {'written' if changed else 'unchanged'}")
    click.echo(f"pod CIDR {pod_cidr}, MTU {mtu}", file=sys.stderr)
