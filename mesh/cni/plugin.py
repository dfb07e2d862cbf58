"""The mesh CNI plugin (CNI specification 1.0): ADD, DEL, CHECK and VERSION.

The runtime (a kubelet's, or the lab's) runs this binary with the CNI_* environment variables
and the network configuration on stdin. Per pod it makes a veth pair: `eth0` in the pod's
namespace with the pod's address as a /32, and a host-side interface in the node's namespace
(`mesh` + 11 hex digits of the container id) that the datapath's eBPF programs attach to.
Addresses come from the IPAM plugin the configuration names (the standard `host-local`), run
the way CNI delegates: same environment, same stdin.

Routing, as Calico does it: the pod's default route goes via 169.254.1.1 on eth0, whose
neighbour entry is the host-side interface's MAC, so every packet leaves the pod towards the
node; the node routes the pod's /32 to the host-side interface, with a permanent neighbour
entry for the pod's MAC. No bridge, no proxy ARP, no ARP at all.

Errors are CNI error objects on stdout (code, msg, details) with exit status 1. DEL is
idempotent: a container that is not there (or was half made) is cleaned up as far as it
exists, and succeeds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.cni.interfaces import HOST_PREFIX, host_ifname

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
GATEWAY = "169.254.1.1"  # the pod's next hop: answered by the host side's MAC

# Error codes of the CNI specification (1-99 are the spec's; 100+ are the plugin's own).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
IPAM_FAILURE = 100


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    path: list[str]
    config: dict[str, Any]
    stdin: bytes

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", "1.0.0"))


def parse_request(env: Mapping[str, str], stdin: bytes) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return Request(command, "", "", "", [], {}, stdin)
    if command not in ("ADD", "DEL", "CHECK"):
        raise CNIError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}",
                       "expected ADD, DEL, CHECK or VERSION")
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(DECODE_FAILURE, "cannot decode the network configuration", str(e)) from e
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "the network configuration is not a JSON object")
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(INVALID_CONFIG, "cniVersion is required")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    for key in ("name", "type"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise CNIError(INVALID_CONFIG, f"{key} is required")
    ipam = config.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str):
        raise CNIError(INVALID_CONFIG, "ipam.type is required")
    mtu = config.get("mtu", 1500)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535:
        raise CNIError(INVALID_CONFIG, "mtu must be an integer from 576 to 65535")
    needed = ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]
    if command != "DEL":
        needed.append("CNI_NETNS")  # DEL may come after the namespace is gone
    missing = [k for k in needed if not env.get(k)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT, f"missing {', '.join(missing)}")
    return Request(command, env["CNI_CONTAINERID"], env.get("CNI_NETNS", ""), env["CNI_IFNAME"],
                   [p for p in env["CNI_PATH"].split(os.pathsep) if p], config, stdin)


# -- IPAM, delegated ------------------------------------------------------------------------

def delegate(req: Request, command: str) -> dict[str, Any]:
    """Run the IPAM plugin as CNI delegates: its binary from CNI_PATH, our environment with
    CNI_COMMAND set, our stdin. Its error object comes back as ours."""
    plugin = str(req.config["ipam"]["type"])
    if "/" in plugin:
        raise CNIError(INVALID_CONFIG, f"ipam.type {plugin!r} must be a plugin name")
    binary = next((os.path.join(d, plugin) for d in req.path
                   if os.access(os.path.join(d, plugin), os.X_OK)), None)
    if binary is None:
        raise CNIError(INVALID_CONFIG, f"IPAM plugin {plugin!r} not found in CNI_PATH",
                       os.pathsep.join(req.path))
    env = {**os.environ, "CNI_COMMAND": command}
    try:
        out = subprocess.run([binary], input=req.stdin, env=env, capture_output=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CNIError(IO_FAILURE, f"IPAM plugin {plugin} could not run", str(e)) from e
    text = out.stdout.decode(errors="replace").strip()
    if out.returncode != 0:
        try:
            err = json.loads(text)
            msg, details = str(err.get("msg", text)), str(err.get("details", ""))
        except ValueError:
            msg, details = text or out.stderr.decode(errors="replace").strip(), ""
        raise CNIError(IPAM_FAILURE, f"IPAM ({plugin}): {msg}", details)
    if command != "ADD":
        return {}
    try:
        result = json.loads(text)
    except ValueError as e:
        raise CNIError(IPAM_FAILURE, f"IPAM ({plugin}) gave no result", text) from e
    return result if isinstance(result, dict) else {}


def _ipv4(result: Mapping[str, Any]) -> ipaddress.IPv4Interface:
    for ip in result.get("ips") or []:
        try:
            iface = ipaddress.ip_interface(str(ip.get("address")))
        except ValueError:
            continue
        if isinstance(iface, ipaddress.IPv4Interface):
            return iface
    raise CNIError(IPAM_FAILURE, "IPAM gave no IPv4 address", json.dumps(result))


# -- netlink ------------------------------------------------------------------------------

@contextlib.contextmanager
def _netns(path: str) -> Iterator[Any]:
    from pyroute2 import NetNS

    if not os.path.exists(path):
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist")
    ns = NetNS(path)
    try:
        yield ns
    finally:
        ns.close()


def _link_index(ip: Any, name: str) -> int | None:
    found = ip.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _mac(ip: Any, index: int) -> str:
    return str(ip.get_links(index)[0].get_attr("IFLA_ADDRESS"))


def add(req: Request) -> dict[str, Any]:
    from pyroute2 import IPRoute, NetlinkError

    host = host_ifname(req.container_id, req.ifname)
    mtu = int(req.config.get("mtu", 1500))
    with _netns(req.netns) as ns:
        if _link_index(ns, req.ifname) is not None:
            raise CNIError(INVALID_CONFIG, f"{req.ifname} already exists in {req.netns}")
    result = delegate(req, "ADD")
    address = _ipv4(result)
    pod_ip = str(address.ip)
    try:
        with IPRoute() as ip:
            peer = "tmp" + host[len(HOST_PREFIX):]
            ip.link("add", ifname=host, kind="veth", peer={"ifname": peer}, mtu=mtu)
            host_index = _link_index(ip, host)
            peer_index = _link_index(ip, peer)
            assert host_index is not None and peer_index is not None
            ip.link("set", index=peer_index, mtu=mtu)
            fd = os.open(req.netns, os.O_RDONLY)
            try:
                ip.link("set", index=peer_index, net_ns_fd=fd)
            finally:
                os.close(fd)
            ip.link("set", index=host_index, state="up")
            host_mac = _mac(ip, host_index)
            with _netns(req.netns) as ns:
                index = _link_index(ns, peer)
                assert index is not None
                ns.link("set", index=index, ifname=req.ifname)
                ns.addr("add", index=index, address=pod_ip, prefixlen=32)
                ns.link("set", index=index, state="up")
                lo = _link_index(ns, "lo")
                if lo is not None:
                    ns.link("set", index=lo, state="up")
                ns.route("add", dst=GATEWAY, dst_len=32, oif=index, scope=253)  # link
                ns.neigh("add", dst=GATEWAY, lladdr=host_mac, ifindex=index,
                         state=0x80)  # NUD_PERMANENT
                ns.route("add", dst="0.0.0.0", dst_len=0, gateway=GATEWAY, oif=index)
                pod_mac = _mac(ns, index)
            ip.route("replace", dst=pod_ip, dst_len=32, oif=host_index, scope=253)
            # Both ends know each other's MAC: the node needs no address of its own (nor
            # ARP) to reach the pod.
            ip.neigh("replace", dst=pod_ip, lladdr=pod_mac, ifindex=host_index, state=0x80)
    except (NetlinkError, OSError) as e:
        with contextlib.suppress(CNIError):
            delegate(req, "DEL")  # give the address back
        _delete_host_link(host)
        raise CNIError(IO_FAILURE, f"cannot set up {req.ifname} for {req.container_id}",
                       str(e)) from e
    return _result(req, host, host_mac, pod_mac, f"{pod_ip}/32", result)


def _result(req: Request, host: str, host_mac: str, pod_mac: str, address: str,
            ipam: Mapping[str, Any]) -> dict[str, Any]:
    ip: dict[str, Any] = {"address": address, "gateway": GATEWAY, "interface": 1}
    if req.version == "0.4.0":
        ip["version"] = "4"
    return {
        "cniVersion": req.version,
        "interfaces": [{"name": host, "mac": host_mac},
                       {"name": req.ifname, "mac": pod_mac, "sandbox": req.netns}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY}],
        "dns": ipam.get("dns") or {},
    }


def _delete_host_link(host: str) -> None:
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ip:
        index = _link_index(ip, host)
        if index is not None:
            with contextlib.suppress(NetlinkError):
                ip.link("del", index=index)  # its peer in the pod goes with it


def delete(req: Request) -> None:
    delegate(req, "DEL")
    _delete_host_link(host_ifname(req.container_id, req.ifname))


def check(req: Request) -> None:
    """What ADD made is still there: the host side, eth0 with the address of the previous
    result, the default route; and IPAM agrees."""
    from pyroute2 import IPRoute

    prev = req.config.get("prevResult")
    if not isinstance(prev, dict):
        raise CNIError(INVALID_CONFIG, "CHECK needs prevResult")
    want = _ipv4(prev)
    host = host_ifname(req.container_id, req.ifname)
    with IPRoute() as ip:
        if _link_index(ip, host) is None:
            raise CNIError(UNKNOWN_CONTAINER, f"no interface {host} for container "
                           f"{req.container_id}")
    with _netns(req.netns) as ns:
        index = _link_index(ns, req.ifname)
        if index is None:
            raise CNIError(UNKNOWN_CONTAINER, f"no {req.ifname} in {req.netns}")
        have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=index)}
        if str(want.ip) not in have:
            raise CNIError(INVALID_CONFIG, f"{req.ifname} lacks {want.ip}",
                           f"has {', '.join(sorted(have)) or 'no address'}")
        defaults = [r for r in ns.get_routes(family=2) if r.get("dst_len") == 0
                    and r.get_attr("RTA_GATEWAY") == GATEWAY]
        if not defaults:
            raise CNIError(INVALID_CONFIG, f"no default route via {GATEWAY} in {req.netns}")
    delegate(req, "CHECK")


def run(env: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """(exit status, what to print) for one invocation."""
    version = "1.0.0"
    try:
        req = parse_request(env, stdin)
        version = req.version if req.command != "VERSION" else version
        if req.command == "VERSION":
            return 0, {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
        if req.command == "ADD":
            return 0, add(req)
        if req.command == "DEL":
            delete(req)
            return 0, None
        check(req)
        return 0, None
    except CNIError as e:
        return 1, e.to_json(version)


def main() -> None:
    code, out = run(os.environ, sys.stdin.buffer.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
