"""A Kubernetes cluster on one machine: the lab's supervisor.

It builds the network (mesh.lab.network), starts a real control plane on the host's loopback
(mesh.lab.controlplane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler built
from source), installs the CRDs and the chart's objects (mesh.lab.bootstrap), and runs on
each node, as a cluster's node runs them:
- the node's kubelet (mesh.lab.kubelet): it registers the Node, heartbeats, runs the Pods the
  scheduler binds to it (network namespaces through the project's CNI plugin, the
  containers' commands as processes in the node's pod cgroup) and writes their status;
- the node's agent, `mesh run --kubernetes` with a token of the chart's ServiceAccount,
  leader election and MeshNode on, its own Envoy and the eBPF datapath;
- the node's cluster DNS (mesh.lab.dns).
The API server reaches the nodes' loopback through mesh.lab.apirelay.

Deployments, ReplicaSets, Services' ClusterIPs, EndpointSlices and placement are the real
controllers' and scheduler's. `--manifests DIR` is applied through the API (server-side
apply, field manager `mesh-lab`) and followed: a changed file is applied again, an object
gone from the files is deleted. The supervisor mirrors what the API says (pods, Services,
their ready endpoints, Nodes) into STATE/lab.json for `mesh lab status`, `exec`, `logs` and
the cluster DNS.

Everything it makes is recorded in STATE/lab.json as it is made, so a teardown (its own, or
`mesh lab down` after a crash of the supervisor) removes exactly that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh import documents
from mesh.cni.runtime import HOST_LOCAL
from mesh.datapath.programs import ensure_bpffs
from mesh.lab import bootstrap, network
from mesh.lab.controlplane import Binaries, ControlPlane, ControlPlaneError
from mesh.lab.kubelet import Kubelet, node_kubeconfig, serving_certificate
from mesh.lab.network import LabError, NodeNet

log = logging.getLogger(__name__)
ROOT = Path("/run/mesh/lab")
REDIS_PORT = 6379  # on the host's underlay address, one per lab
HUBBLE_PORT = 4244  # the agents' Observer API for the relay, on each node's address (the chart's)
# The cgroup2 hierarchy, mounted under /run: `ip netns exec` gives the agents a /sys of
# their node's namespace, where the host's cgroup mount is not to be seen.
CGROUP_MOUNT = Path("/run/mesh/lab-cgroup2")
SOCKET_ROOT = Path("/var/run/wireguard")
POD_IPV6_RANGE = "fd00:10:244::/48"  # a mount point in each lab agent's namespace
CGROUP_ROOT = CGROUP_MOUNT / "mesh-lab"
FIELD_MANAGER = "mesh-lab"
CONTROLLER = "mesh.dev/gateway-controller"
SETTLE = 1.0  # seconds the cluster's view must stay unchanged before the lab is ready
# Pods the kubelet says it cannot run: the lab is up without them (`mesh lab up` and
# `mesh lab status` name them), rather than waiting for what will not come.
CANNOT_RUN = ("CreateContainerError", "CreateContainerConfigError", "RunContainerError",
              "CrashLoopBackOff", "ErrImageNeverPull")
TICK = 0.5

NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")


def check_name(name: str) -> str:
    """A lab's name goes into namespace, file, cgroup and Node names: short, plain."""
    if not NAME.fullmatch(name):
        raise LabError(f"lab name {name!r}: use 1 to 16 of a-z, 0-9 and '-', starting "
                       "with a letter")
    return name


def lab_dir(name: str) -> Path:
    return ROOT / check_name(name)


@dataclass
class State:
    """What the lab made, as written to lab.json: enough to remove it all; and what the
    cluster shows (pods, services, nodes), for `mesh lab status`, `exec` and the DNS."""

    name: str
    supervisor: int
    nodes: list[str] = field(default_factory=list)
    node_info: list[dict[str, Any]] = field(default_factory=list)
    index: int = 0  # the lab's underlay is 172.30.<index>.0/24
    host_address: str = ""  # the host's on the underlay
    pool: str = ""  # the agents' Gateway address pool, routed from the host
    control_plane: str = ""  # its directory (ControlPlane.cleanup)
    kubeconfig: str = ""  # the admin's
    server: str = ""
    relay: int = 0
    hubble_relay: int = 0  # the flows of every node in one Observer API (hubble-relay.sock)
    kubelets: dict[str, int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    dns: dict[str, int] = field(default_factory=dict)  # node -> its cluster DNS's pid
    redis: int = 0  # the pid of the lab's redis-server (global rate limits' counters)
    cgroups: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # node -> the pod CIDR routed to it
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    applied: list[list[str]] = field(default_factory=list)  # [apiVersion, kind, ns, name]
    errors: list[str] = field(default_factory=list)  # the manifests' last apply
    ready: bool = False


def read_state(name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((lab_dir(name) / "lab.json").read_text())
        return data
    except (OSError, ValueError):
        return None


def _free_index(name: str) -> int:
    """The lowest underlay index no other lab on this machine uses (by their states)."""
    used = set()
    if ROOT.is_dir():
        for path in ROOT.glob("*/lab.json"):
            if path.parent.name == name:
                continue
            with contextlib.suppress(OSError, ValueError, AttributeError):
                used.add(int(json.loads(path.read_text()).get("index", 0)))
    index = next(i for i in range(256) if i not in used)
    if index > 254:
        raise LabError("no free underlay network for one more lab")
    return index


def object_ref(doc: dict[str, Any]) -> list[str]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    return [str(doc.get("apiVersion") or ""), str(doc.get("kind") or ""),
            str(meta.get("namespace") or ""), str(meta.get("name") or "")]


def kubectl_type(api_version: str, kind: str) -> str:
    """kubectl's TYPE for a kind: `deployment.v1.apps`, `service` (the core group)."""
    group, _, version = api_version.rpartition("/")
    return f"{kind.lower()}.{version}.{group}" if group else kind.lower()


class Lab:
    def __init__(self, name: str, nodes: int, manifests: Path | None,
                 redirect: str = "sk-assign", encryption: str = "none") -> None:
        self.name = name
        self.redirect = redirect
        self.encryption = encryption
        self.dir = lab_dir(name)
        self.index = _free_index(name)
        self.nodes = network.plan(name, nodes, self.index)
        self.manifests = manifests
        self.state = State(name, os.getpid())
        self.cp = ControlPlane(self.dir / "control-plane")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # "agent/node1", "relay"...
        self._stamp_seen: tuple[tuple[str, int, int], ...] | None = None
        self._docs: list[dict[str, Any]] | None = None
        self._view: Any = None
        self._view_since = time.monotonic()
        self._agents_ready: set[str] = set()

    # -- state ---------------------------------------------------------------------------

    def save(self) -> None:
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.state.__dict__, indent=2))
        tmp.replace(self.dir / "lab.json")

    def node_dir(self, n: NodeNet) -> Path:
        return self.dir / n.name

    # -- building ------------------------------------------------------------------------

    def build(self) -> None:
        if network.underlay_ns(self.name) in network.namespaces():
            raise LabError(f"lab {self.name} exists: `mesh lab down --name {self.name}` first")
        if not HOST_LOCAL.exists():
            raise LabError(f"{HOST_LOCAL} missing: `make install` sets up the CNI plugins")
        missing = Binaries.at().missing()
        if missing:
            raise LabError(f"{', '.join(p.name for p in missing)} missing from "
                           f"{missing[0].parent}: `make kube-bin` builds them")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state.nodes = [n.name for n in self.nodes]
        self.state.index = self.index
        self.state.host_address = network.host_address(self.index)
        self.state.node_info = [{"name": n.name, "underlay": n.underlay_ip, "podCIDR": "",
                                 "ready": False} for n in self.nodes]
        self.state.control_plane = str(self.cp.state_dir)
        self.save()
        network.build(self.name, self.nodes, self.index, routes=False)
        self.state.pool = network.gateway_pool(self.index)
        network.route_pool(self.state.pool, self.nodes)
        _mount("cgroup2", CGROUP_MOUNT)
        for n in self.nodes:
            # The agent's bpffs, mounted from here: it outlives the agent (whose mounts die
            # with its `ip netns exec` mount namespace), so a restarted agent finds its maps.
            pins = self.node_dir(n) / "agent" / "bpffs"
            ensure_bpffs(pins)
            self.state.mounts.append(str(pins))
            cg = CGROUP_ROOT / self.name / n.name
            cg.mkdir(parents=True, exist_ok=True)
            self.state.cgroups.append(str(cg))
            self.save()
        seconds = self.cp.start()
        self.state.kubeconfig, self.state.server = str(self.cp.kubeconfig), self.cp.server
        self.save()
        log.info("control plane ready", extra={"seconds": round(seconds, 2),
                                               "server": self.cp.server})
        self._start_relay()
        began = time.monotonic()
        bootstrap.install_crds(self.cp)
        installed = bootstrap.install_chart(self.cp, encryption=self.encryption)
        log.info("CRDs and the chart installed",
                 extra={"seconds": round(time.monotonic() - began, 2)})
        self._start_redis()
        for n in self.nodes:
            node_kubeconfig(self.cp.certs, self.cp.server, n.name,
                            self.node_dir(n) / "kubelet.kubeconfig")
            serving_certificate(self.cp.certs, n.name, n.underlay_ip, self.node_dir(n))
            bootstrap.token_kubeconfig(self.cp, self.node_dir(n) / "agent.kubeconfig",
                                       installed.agent_account)
            bootstrap.write_tls(self.node_dir(n) / "hubble-tls", installed.tls("server"))
            self._start_kubelet(n)
            self._start_dns(n)
            self._start_agent(n)
        bootstrap.token_kubeconfig(self.cp, self.dir / "hubble-relay.kubeconfig",
                                   installed.relay_account)
        bootstrap.write_tls(self.dir / "hubble-relay-tls", installed.tls("relay"))
        self._start_hubble_relay()
        self.save()

    def _spawn(self, key: str, args: list[str], logf: Path) -> subprocess.Popen[bytes]:
        logf.parent.mkdir(parents=True, exist_ok=True)
        with logf.open("ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[key] = proc
        return proc

    def _start_relay(self) -> None:
        proc = self._spawn("relay", [sys.executable, "-m", "mesh.lab.apirelay", "--port",
                                     str(self.cp.port), *[n.name for n in self.nodes]],
                           self.dir / "apirelay.log")
        self.state.relay = proc.pid
        self.save()

    def _start_hubble_relay(self) -> None:
        """`mesh relay` on the lab's hubble-relay.sock, joining every node agent's Observer
        API (what `mesh observe` and `hubble observe` ask by default in a lab) as the chart
        deploys it: the agents found from the Nodes with the relay's own token, each asked
        at its node's address with mutual TLS (the chart's certificates)."""
        proc = self._spawn("hubble-relay", [
            sys.executable, "-m", "mesh.cli", "relay",
            "--listen", f"unix://{self.dir / 'hubble-relay.sock'}",
            "--peers-from-kubernetes", "--kubeconfig", str(self.dir / "hubble-relay.kubeconfig"),
            "--peer-port", str(HUBBLE_PORT), "--tls-dir", str(self.dir / "hubble-relay-tls")],
            self.dir / "hubble-relay.log")
        self.state.hubble_relay = proc.pid
        self.save()

    def _start_redis(self) -> None:
        """One redis-server for the lab, on the host's underlay address: every node's rate
        limit service keeps the global limits' counters there, as a cluster's would."""
        binary = shutil.which("redis-server")
        if binary is None:
            return  # the agents run without global rate limits (their policies say so)
        proc = self._spawn("redis", [
            binary, "--bind", self.state.host_address, "--port", str(REDIS_PORT),
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir)], self.dir / "redis.log")
        self.state.redis = proc.pid
        self.save()

    def redis_url(self) -> str | None:
        if not self.state.redis:
            return None
        return f"redis://{self.state.host_address}:{REDIS_PORT}"

    def _start_kubelet(self, n: NodeNet) -> None:
        d = self.node_dir(n)
        proc = self._spawn(f"kubelet/{n.name}", [
            sys.executable, "-m", "mesh.lab.kubelet", "--name", n.name,
            "--kubeconfig", str(d / "kubelet.kubeconfig"),
            "--state-dir", str(d / "kubelet"), "--netns", n.name,
            "--address", n.underlay_ip, "--cgroup", str(CGROUP_ROOT / self.name / n.name),
            "--dns", n.underlay_ip, "--mtu", str(self.pod_mtu()),
            "--tls-cert", str(d / "kubelet-serving.crt"),
            "--tls-key", str(d / "kubelet-serving.key"),
            "--client-ca", str(self.cp.certs / "ca.crt")], d / "kubelet.log")
        self.state.kubelets[n.name] = proc.pid

    def pod_mtu(self) -> int:
        """The pods' interface MTU: the underlay's (1500), less the tunnel's overhead."""
        from mesh.encryption import ipsec
        from mesh.encryption.wireguard import tunnel_mtu

        if self.encryption == "ipsec":
            return 1500 - ipsec.OVERHEAD
        return tunnel_mtu(1500) if self.encryption == "wireguard" else 1500

    def ipsec_keys(self) -> Path:
        """The lab's IPsec secret (0600), made once: what the chart mounts from a Secret."""
        import secrets

        from mesh.encryption import ipsec

        path = self.dir / "ipsec-keys"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"1 {ipsec.ALGORITHM} {secrets.token_hex(20)} {ipsec.ICV_BITS}\n")
        return path

    def _start_agent(self, n: NodeNet) -> None:
        state = self.node_dir(n) / "agent"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Each node has a filesystem of its own; the lab's share the host's, so a node's
        # /var/run/wireguard (wireguard-go's socket: one device name on every node) is its
        # own directory, mounted over it in the agent's mount namespace (`ip netns exec`
        # makes one), the same one again after a restart.
        wireguard = self.node_dir(n) / "wireguard"
        wireguard.mkdir(exist_ok=True, mode=0o700)
        SOCKET_ROOT.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(f"agent/{n.name}", [
            "ip", "netns", "exec", n.name, "sh", "-c",
            'mount --bind "$0" /var/run/wireguard && exec "$@"', str(wireguard),
            sys.executable, "-m", "mesh.cli", "run",
            "--kubernetes", "--kubeconfig", str(self.node_dir(n) / "agent.kubeconfig"),
            "--node-name", n.name, "--leader-elect", "--address-pool", self.state.pool,
            "--leader-namespace", bootstrap.NAMESPACE, "--state-dir", str(state),
            "--datapath-cgroup", str(CGROUP_ROOT / self.name / n.name),
            "--datapath-underlay", "eth0", "--datapath-redirect", self.redirect,
            "--encryption", self.encryption,
            "--hubble-listen-address", f"{n.underlay_ip}:{HUBBLE_PORT}",
            "--hubble-tls-dir", str(self.node_dir(n) / "hubble-tls"),
            *(["--ipsec-keys", str(self.ipsec_keys())] if self.encryption == "ipsec" else []),
            # the pods' IPv6 range, were they dual-stack: never in the clear either
            *(["--encryption-strict-cidr", POD_IPV6_RANGE] if self.encryption != "none"
              else []),
            *(["--ratelimit-redis", url] if (url := self.redis_url()) else [])],
            self.node_dir(n) / "agent.log")
        self.state.agents[n.name] = proc.pid
        self._agents_ready.discard(n.name)

    def _start_dns(self, n: NodeNet) -> None:
        proc = self._spawn(f"dns/{n.name}", [
            "ip", "netns", "exec", n.name, sys.executable, "-m", "mesh.lab.dns", "--listen",
            n.underlay_ip, "--state", str(self.dir / "lab.json"), "--hosts",
            str(self.dir / "hosts")],
            self.node_dir(n) / "dns.log")
        self.state.dns[n.name] = proc.pid

    # -- the manifests ---------------------------------------------------------------------

    def _files(self) -> list[Path]:
        if self.manifests is None:
            return []
        return sorted(p for p in self.manifests.rglob("*")
                      if p.suffix in (".yaml", ".yml", ".json"))

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in self._files():
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read_manifests(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The manifests' documents, read under the agents' own input limits; the errors
        of the files that could not be read."""
        docs: list[dict[str, Any]] = []
        errors = []
        for path in self._files():
            try:
                text = documents.check_text(path.read_bytes())
                for chunk in documents.split(text):
                    docs += [d for d in documents.load_yaml(chunk) if isinstance(d, dict)]
            except (OSError, documents.DocumentError) as e:
                errors.append(f"{path}: {e}")
        return docs, errors

    def apply_manifests(self) -> bool:
        """Apply the manifests if they changed (and delete what left them); whether they
        did. A document the API server refuses is reported, the others are applied."""
        stamp = self._stamp()
        if stamp == self._stamp_seen:
            return False
        self._stamp_seen = stamp
        docs, errors = self._read_manifests()
        if docs == self._docs and not errors:
            return False
        self._docs = docs
        wanted = [object_ref(d) for d in docs]
        self._ensure_namespaces(docs)
        if docs:
            done = self.cp.kubectl("apply", "--server-side", "--force-conflicts",
                                   f"--field-manager={FIELD_MANAGER}", "-f", "-",
                                   input=yaml.safe_dump_all(docs, sort_keys=False),
                                   check=False, timeout=120)
            if done.returncode != 0:
                errors += [line for line in done.stderr.splitlines() if line.strip()]
        for ref in self.state.applied:
            if ref not in wanted and ref[1] and ref[3]:
                api_version, kind, ns, name = ref
                out = self.cp.kubectl("delete", f"{kubectl_type(api_version, kind)}/{name}",
                                      *(["-n", ns] if ns else []), "--ignore-not-found",
                                      "--wait=false", check=False)
                if out.returncode != 0:
                    errors.append(out.stderr.strip())
        self.state.applied = wanted
        self.state.errors = errors
        for e in errors:
            log.error("manifest not applied", extra={"error": e})
        log.info("manifests applied", extra={"objects": len(docs), "errors": len(errors)})
        self.save()
        return True

    def _ensure_namespaces(self, docs: list[dict[str, Any]]) -> None:
        """The namespaces the manifests use and do not declare, made as `kubectl create
        namespace` would: a lab's manifests need not carry their Namespace objects."""
        declared = {object_ref(d)[3] for d in docs if d.get("kind") == "Namespace"}
        used = {ns for d in docs if (ns := object_ref(d)[2]) and ns not in declared}
        for ns in sorted(used):
            code, _ = self.cp.request("GET", f"/api/v1/namespaces/{ns}")
            if code == 404:
                self.cp.request("POST", "/api/v1/namespaces", {
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # -- what the cluster says -------------------------------------------------------------

    def _list(self, path: str) -> list[dict[str, Any]]:
        code, body = self.cp.request("GET", path, timeout=10)
        if code != 200 or not isinstance(body, dict):
            raise ControlPlaneError(f"GET {path}: {code} {str(body)[:200]}")
        items: list[dict[str, Any]] = body.get("items") or []
        return items

    def mirror(self) -> Any:
        """Read pods, Services, EndpointSlices and Nodes from the API into the state (with
        what each node's kubelet recorded of its pods); the view that readiness watches."""
        pods = self._list("/api/v1/pods")
        services = self._list("/api/v1/services")
        slices = self._list("/apis/discovery.k8s.io/v1/endpointslices")
        nodes = {n["metadata"]["name"]: n for n in self._list("/api/v1/nodes")}
        records: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            for path in (self.node_dir(n) / "kubelet" / "pods").glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    records[path.stem] = json.loads(path.read_text())
        self.state.pods = {}
        for p in pods:
            meta, spec, status = p["metadata"], p.get("spec") or {}, p.get("status") or {}
            rec = records.get(meta["uid"], {})
            cs = (status.get("containerStatuses") or [{}])[0]
            waiting = (cs.get("state") or {}).get("waiting") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
            owner = next((o["name"] for o in meta.get("ownerReferences") or []), "")
            rs_hash = (meta.get("labels") or {}).get("pod-template-hash")
            if rs_hash and owner.endswith(f"-{rs_hash}"):
                owner = owner[:-len(rs_hash) - 1]  # the Deployment's name
            self.state.pods[f"{meta['namespace']}/{meta['name']}"] = {
                "node": spec.get("nodeName") or "", "ip": status.get("podIP") or "",
                "phase": status.get("phase") or "", "ready": ready,
                "restarts": int(cs.get("restartCount") or 0), "reason": waiting.get("reason")
                or "", "message": waiting.get("message") or "", "owner": owner,
                "deleting": bool(meta.get("deletionTimestamp")),
                "netns": rec.get("netns") or "", "pid": (rec.get("pids") or [None])[0],
                "env": rec.get("env") or {}, "log": rec.get("log") or ""}
        ready_ips: dict[tuple[str, str], list[str]] = {}
        for s in slices:
            svc = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if not svc:
                continue
            key = (s["metadata"]["namespace"], svc)
            for e in s.get("endpoints") or []:
                if (e.get("conditions") or {}).get("ready", True):
                    ready_ips.setdefault(key, []).extend(e.get("addresses") or [])
        self.state.services = [{
            "namespace": s["metadata"]["namespace"], "name": s["metadata"]["name"],
            "clusterIP": (s.get("spec") or {}).get("clusterIP") or "",
            "type": (s.get("spec") or {}).get("type") or "ClusterIP",
            "ports": (s.get("spec") or {}).get("ports") or [],
            "endpoints": sorted(ready_ips.get((s["metadata"]["namespace"],
                                               s["metadata"]["name"]), []))}
            for s in services]
        for info in self.state.node_info:
            node = nodes.get(info["name"]) or {}
            info["podCIDR"] = (node.get("spec") or {}).get("podCIDR") or ""
            info["ready"] = any(c.get("type") == "Ready" and c.get("status") == "True"
                                for c in (node.get("status") or {}).get("conditions") or [])
        return (self.state.pods, self.state.services, self.state.node_info)

    def route_pod_cidrs(self) -> None:
        """Each node's pod CIDR (node-ipam's, on its Node) routed to it from the others."""
        for info in self.state.node_info:
            cidr, node = info["podCIDR"], info["name"]
            if not cidr or self.state.routes.get(node) == cidr:
                continue
            for other in self.nodes:
                if other.name != node:
                    network.ip("route", "replace", cidr, "via", info["underlay"],
                               netns=other.name)
            self.state.routes[node] = cidr
            log.info("pod CIDR routed", extra={"node": node, "podCIDR": cidr})

    def _caught_up(self) -> bool:
        """Every Gateway of ours Programmed and every route we wrote status for, at their
        current generations: the leader saw the last changes."""
        classes = {c["metadata"]["name"] for c in self._list(
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses")
            if (c.get("spec") or {}).get("controllerName") == CONTROLLER}
        for g in self._list("/apis/gateway.networking.k8s.io/v1/gateways"):
            if (g.get("spec") or {}).get("gatewayClassName") not in classes:
                continue
            gen = g["metadata"].get("generation")
            if not any(c.get("type") == "Programmed" and c.get("observedGeneration") == gen
                       for c in (g.get("status") or {}).get("conditions") or []):
                return False
        for kind in ("httproutes", "grpcroutes"):
            for r in self._list(f"/apis/gateway.networking.k8s.io/v1/{kind}"):
                gen = r["metadata"].get("generation")
                ours = [p for p in (r.get("status") or {}).get("parents") or []
                        if p.get("controllerName") == CONTROLLER]
                if any(c.get("observedGeneration") != gen
                       for p in ours for c in p.get("conditions") or []):
                    return False
        return True

    def _deployments_rolled_out(self) -> bool:
        """Every Deployment's pods made (their readiness is the pods' own check)."""
        for d in self._list("/apis/apps/v1/deployments"):
            spec, status = d.get("spec") or {}, d.get("status") or {}
            if status.get("observedGeneration") != d["metadata"].get("generation"):
                return False
            if (status.get("updatedReplicas") or 0) != spec.get("replicas", 1) or \
                    (status.get("replicas") or 0) != spec.get("replicas", 1):
                return False
        return True

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        self.build()
        self.tick()

    def _watch_processes(self) -> None:
        for n in self.nodes:
            for key, start in ((f"kubelet/{n.name}", self._start_kubelet),
                               (f"agent/{n.name}", self._start_agent),
                               (f"dns/{n.name}", self._start_dns)):
                proc = self.procs.get(key)
                if proc is not None and proc.poll() is not None:
                    log.error("exited, restarting", extra={"component": key,
                                                           "code": proc.returncode})
                    start(n)
                    self.save()
            if n.name not in self._agents_ready and \
                    b"node ready" in _read_bytes(self.node_dir(n) / "agent.log"):
                self._agents_ready.add(n.name)
        relay = self.procs.get("relay")
        if relay is not None and relay.poll() is not None:
            log.error("the API relay exited, restarting", extra={"code": relay.returncode})
            self._start_relay()
        flows = self.procs.get("hubble-relay")
        if flows is not None and flows.poll() is not None:
            log.error("the flows relay exited, restarting", extra={"code": flows.returncode})
            self._start_hubble_relay()

    def tick(self) -> None:
        """One round of supervision."""
        self._watch_processes()
        try:
            view = self.mirror()
            self.route_pod_cidrs()
            # Once every node has joined (as one deploys to a cluster that is up): the
            # scheduler spreads the first pods over all of them.
            if all(i["ready"] and i["podCIDR"] for i in self.state.node_info) and \
                    self.apply_manifests():
                view = self.mirror()
        except (ControlPlaneError, OSError, subprocess.SubprocessError, LabError) as e:
            log.error("the cluster did not answer", extra={"error": str(e)})
            return
        if json.dumps(view, sort_keys=True) != self._view:
            self._view = json.dumps(view, sort_keys=True)
            self._view_since = time.monotonic()
        ready = False
        settled = time.monotonic() - self._view_since >= SETTLE
        if settled and len(self._agents_ready) == len(self.nodes) and \
                all(i["ready"] and i["podCIDR"] for i in self.state.node_info) and \
                all(p["ready"] for p in self.state.pods.values()
                    if p["phase"] not in ("Succeeded", "Failed")
                    and p["reason"] not in CANNOT_RUN):
            with contextlib.suppress(ControlPlaneError, OSError):
                ready = self._deployments_rolled_out() and self._caught_up()
        self.state.ready = ready
        self.save()

    def run_forever(self, stop: list[bool]) -> None:
        failed = True
        try:
            self.start()
            while not stop:
                time.sleep(TICK)
                try:
                    self.tick()
                except Exception:  # a bug in one round must not take the cluster down
                    log.exception("supervision round failed")
            failed = False
        except Exception:
            log.exception("the lab failed")
            raise
        finally:
            # After a failure the supervisor's log stays, for `mesh lab up` to show.
            teardown(self.name, keep_log=failed)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _mount(fstype: str, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode != 0:
        subprocess.run(["mount", "-t", fstype, fstype, str(path)], check=True,
                       capture_output=True)


def _kill(pid: int | None, sig: int = signal.SIGTERM) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.1)
    for p in pids:
        _kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:  # a zombie whose parent (a crashed supervisor) is gone is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pids: list[int], timeout: float) -> None:
    for pid in pids:
        _kill(pid)
    _wait_gone(pids, timeout)


def teardown(name: str, keep_log: bool = False) -> list[str]:
    """Remove everything lab.json says the lab made; what could not be removed."""
    state = read_state(name)
    if state is None:
        return []
    left: list[str] = []
    d = lab_dir(name)
    # The kubelets first, so that none starts a pod again; then what they ran.
    _stop([int(p) for p in state.get("kubelets", {}).values()], 10)
    for node in state.get("nodes", []):
        left += Kubelet.cleanup(d / node / "kubelet", node)
    _stop([int(p) for p in state.get("dns", {}).values()], 5)
    _stop([int(p) for p in state.get("agents", {}).values()], 15)  # each stops its Envoy
    # An agent that had crashed leaves its Envoy serving (as on a real node): stop those too.
    envoys = []
    for node in state.get("nodes", []):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads((d / node / "agent" / "envoy.pid").read_text())["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                envoys.append(pid)
    _wait_gone(envoys, 5)
    # What is left in a node's namespace: a wireguard-go (an agent leaves its device up, as
    # on a real node), anything an agent started and did not stop.
    for node in state.get("nodes", []):
        out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True,
                             check=False)
        _stop([int(p) for p in out.stdout.split() if p.isdigit()], 5)
    _stop([p for p in (int(state.get("redis") or 0), int(state.get("relay") or 0),
                       int(state.get("hubble_relay") or 0)) if p], 5)
    if state.get("control_plane"):
        ControlPlane.cleanup(Path(state["control_plane"]))
    for mount in state.get("mounts", []):
        subprocess.run(["umount", mount], capture_output=True, check=False)
    for cg in reversed(state.get("cgroups", [])):
        with contextlib.suppress(OSError):
            Path(cg).rmdir()
    for parent in (CGROUP_ROOT / name, CGROUP_ROOT):
        with contextlib.suppress(OSError):
            parent.rmdir()
    if not any(CGROUP_ROOT.glob("*")) and \
            subprocess.run(["mountpoint", "-q", str(CGROUP_MOUNT)], check=False).returncode == 0:
        subprocess.run(["umount", str(CGROUP_MOUNT)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            CGROUP_MOUNT.rmdir()
    left += network.teardown(name, state.get("nodes", []))
    if not left:
        shutil.rmtree(d, ignore_errors=True)
        if not keep_log:
            (ROOT / f"{name}.log").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ROOT.rmdir()
    return left
