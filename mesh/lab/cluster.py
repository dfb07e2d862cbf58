"""A cluster on one machine: the lab's supervisor.

It builds the network (mesh.lab.network), runs one agent per node inside the node's
namespace (the agent as on a real node: its own Envoy, the eBPF datapath on the node's pod
cgroup), wires each pod with the project's CNI plugin exactly as a kubelet would (the node's
conflist, CNI_* variables, stdin), runs the pods' processes, restarts those that exit, probes
their readiness and writes what Kubernetes' controllers would: Services with ClusterIPs and
the EndpointSlices of ready pods, into the manifests directory every agent watches.

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
from mesh.cni.plugin import CNIError
from mesh.cni.runtime import HOST_LOCAL, Runtime, existing_runtime, node_runtime
from mesh.datapath.programs import ensure_bpffs
from mesh.lab import dns, network, workloads
from mesh.lab.network import LabError, NodeNet
from mesh.lab.workloads import PodSpec, ServiceSpec

log = logging.getLogger(__name__)
ROOT = Path("/run/mesh/lab")
# The cgroup2 hierarchy, mounted under /run: `ip netns exec` gives the agents a /sys of
# their node's namespace, where the host's cgroup mount is not to be seen.
REDIS_PORT = 6379  # on the host's underlay address, one per lab
CGROUP_MOUNT = Path("/run/mesh/lab-cgroup2")
CGROUP_ROOT = CGROUP_MOUNT / "mesh-lab"
WORKLOAD_KINDS = ("Deployment", "Pod")
FAILURE_THRESHOLD = 3
SETTLE = 1.0  # seconds an agent is given, once it loaded a change, to have Envoy run it


NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")


def check_name(name: str) -> str:
    """A lab's name goes into namespace, file and cgroup names: short, plain."""
    if not NAME.fullmatch(name):
        raise LabError(f"lab name {name!r}: use 1 to 16 of a-z, 0-9 and '-', starting "
                       "with a letter")
    return name


def lab_dir(name: str) -> Path:
    return ROOT / check_name(name)


@dataclass
class Pod:
    spec: PodSpec
    node: NodeNet
    netns: str
    ip: str = ""
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: int = 0
    started: float = 0.0
    failures: int = 0  # probes failed in a row
    successes: int = 0  # ... and succeeded in a row
    next_probe: float = 0.0  # when its readinessProbe is due (monotonic)

    @property
    def key(self) -> str:
        return f"{self.spec.namespace}/{self.spec.name}"


@dataclass
class Agent:
    node: NodeNet
    process: subprocess.Popen[bytes]
    log: Path
    ready: bool = False


@dataclass
class State:
    """What the lab made, as written to lab.json: enough to remove it all."""

    name: str
    supervisor: int
    nodes: list[str] = field(default_factory=list)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    dns: dict[str, int] = field(default_factory=dict)  # node -> its cluster DNS's pid
    etc_netns: list[str] = field(default_factory=list)  # pods' /etc/netns/NAME (resolv.conf)
    cgroups: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    node_info: list[dict[str, Any]] = field(default_factory=list)
    index: int = 0  # the lab's underlay is 172.30.<index>.0/24
    host_address: str = ""  # the host's on the underlay
    redis: int = 0  # the pid of the lab's redis-server (global rate limits' counters)
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


class Lab:
    def __init__(self, name: str, nodes: int, manifests: Path | None,
                 redirect: str = "sk-assign") -> None:
        self.name = name
        self.redirect = redirect
        self.dir = lab_dir(name)
        self.index = _free_index(name)
        self.nodes = network.plan(name, nodes, self.index)
        self.manifests = manifests
        self._manifests_stamp = self._stamp()
        docs = self._read_manifests()
        self.docs = docs
        self.services: list[ServiceSpec] = workloads.services_of(docs)
        self.pods: list[Pod] = [self._new_pod(spec, i)
                                for i, spec in enumerate(workloads.pods_of(docs))]
        self.agents: dict[str, Agent] = {}
        self.dns: dict[str, subprocess.Popen[bytes]] = {}
        self._seen_at_write: dict[str, int] = {}
        self._loaded_since: float | None = None
        self.state = State(name, os.getpid())
        self._runtimes: dict[str, Runtime] = {}

    # -- the manifests ---------------------------------------------------------------------

    def _files(self) -> list[Path]:
        if self.manifests is None:
            return []
        return sorted(p for p in self.manifests.rglob("*") if p.suffix in (".yaml", ".yml"))

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in self._files():
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read_manifests(self) -> list[dict[str, Any]]:
        """The manifests' documents, read under the agents' own input limits."""
        docs: list[dict[str, Any]] = []
        for path in self._files():
            try:
                text = documents.check_text(path.read_bytes())
                for chunk in documents.split(text):
                    docs += [d for d in documents.load_yaml(chunk) if isinstance(d, dict)]
            except (OSError, documents.DocumentError) as e:
                log.error("manifest skipped", extra={"file": str(path), "error": str(e)})
        return docs

    def _new_pod(self, spec: PodSpec, i: int) -> Pod:
        node = self.nodes[i % len(self.nodes)]
        return Pod(spec, node, f"{self.name}-{spec.namespace}-{spec.name}"[:60])

    def reload(self) -> bool:
        """The manifests changed: pods that are no longer wanted go (a scaled-down
        Deployment), new ones come, Services keep their ClusterIPs."""
        stamp = self._stamp()
        if stamp == self._manifests_stamp:
            return False
        self._manifests_stamp = stamp
        docs = self._read_manifests()
        if docs == self.docs:
            return False
        self.docs = docs
        self.services = workloads.services_of(docs, self.services)
        wanted = {f"{p.namespace}/{p.name}": p for p in workloads.pods_of(docs)}
        for pod in [p for p in self.pods if p.key not in wanted]:
            self.remove_pod(pod)
        have = {p.key for p in self.pods}
        for key, spec in wanted.items():
            if key not in have:
                pod = self._new_pod(spec, len(self.pods))
                self.pods.append(pod)
                self.add_pod(pod)
        log.info("manifests reloaded", extra={"pods": len(self.pods),
                                              "services": len(self.services)})
        return True

    def remove_pod(self, p: Pod) -> None:
        if p.process is not None:
            _kill(p.process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.process.wait(5)
        with contextlib.suppress(Exception):
            self._runtimes[p.node.name].delete(p.key.replace("/", "_"),
                                               f"/var/run/netns/{p.netns}")
        subprocess.run(["ip", "netns", "del", p.netns], capture_output=True, check=False)
        shutil.rmtree(Path("/etc/netns") / p.netns, ignore_errors=True)
        self.pods.remove(p)

    # -- state ---------------------------------------------------------------------------

    def save(self) -> None:
        self.state.pods = {p.key: {"node": p.node.name, "netns": p.netns, "ip": p.ip,
                                   "env": self._env(p),
                                   "ready": p.ready, "restarts": p.restarts,
                                   "pid": p.process.pid if p.process else None,
                                   "log": str(self._pod_log(p))} for p in self.pods}
        self.state.services = [{"namespace": s.namespace, "name": s.name,
                                "clusterIP": s.cluster_ip,
                                "ports": workloads.as_served(s)["spec"]["ports"],
                                "endpoints": [p.ip for p in self._selected(s) if p.ready]}
                               for s in self.services]
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.state.__dict__, indent=2))
        tmp.replace(self.dir / "lab.json")

    def _pod_log(self, p: Pod) -> Path:
        return self.dir / "pods" / f"{p.spec.namespace}_{p.spec.name}.log"

    def _selected(self, s: ServiceSpec) -> list[Pod]:
        return [p for p in self.pods if s.selector and p.spec.namespace == s.namespace and
                all(p.spec.labels.get(k) == v for k, v in s.selector.items())]

    # -- building ------------------------------------------------------------------------

    def build(self) -> None:
        if network.underlay_ns(self.name) in network.namespaces():
            raise LabError(f"lab {self.name} exists: `mesh lab down --name {self.name}` first")
        if not HOST_LOCAL.exists():
            raise LabError(f"{HOST_LOCAL} missing: `make install` sets up the CNI plugins")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.dir / "pods").mkdir(exist_ok=True)
        (self.dir / "cluster").mkdir(exist_ok=True)
        self.state.nodes = [n.name for n in self.nodes]
        self.state.index = self.index
        self.state.host_address = network.host_address(self.index)
        self.state.node_info = [{"name": n.name, "underlay": n.underlay_ip,
                                 "podCIDR": n.pod_cidr} for n in self.nodes]
        self.save()
        network.build(self.name, self.nodes, self.index)
        _mount("cgroup2", CGROUP_MOUNT)
        for n in self.nodes:
            # The agent's bpffs, mounted from here: it outlives the agent (whose mounts die
            # with its `ip netns exec` mount namespace), so a restarted agent finds its maps.
            pins = self.dir / n.name / "agent" / "bpffs"
            ensure_bpffs(pins)
            self.state.mounts.append(str(pins))
            cg = CGROUP_ROOT / self.name / n.name
            cg.mkdir(parents=True, exist_ok=True)
            self.state.cgroups.append(str(cg))
            self._runtimes[n.name] = self._cni(n)
        self.save()
        self.write_cluster()
        self._start_redis()
        for n in self.nodes:
            self._start_agent(n)
            self._start_dns(n)
        self.save()

    def _start_redis(self) -> None:
        """One redis-server for the lab, on the host's underlay address: every node's rate
        limit service keeps the global limits' counters there, as a cluster's would."""
        binary = shutil.which("redis-server")
        if binary is None:
            return  # the agents run without global rate limits (their policies say so)
        proc = subprocess.Popen(
            [binary, "--bind", self.state.host_address, "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.state.redis = proc.pid
        self.save()

    def redis_url(self) -> str | None:
        if not self.state.redis:
            return None
        return f"redis://{self.state.host_address}:{REDIS_PORT}"

    def _cni(self, n: NodeNet) -> Runtime:
        return node_runtime(self.dir / n.name / "cni", n.pod_cidr, n.name)

    def _start_agent(self, n: NodeNet) -> None:
        state = self.dir / n.name / "agent"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        logf = self.dir / n.name / "agent.log"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", n.name, sys.executable, "-m", "mesh.cli", "run",
             "--manifests", str(self.dir / "cluster"), "--state-dir", str(state),
             "--node-id", n.name, "--datapath-cgroup", str(CGROUP_ROOT / self.name / n.name),
             "--datapath-underlay", "eth0", "--datapath-redirect", self.redirect,
             *(["--ratelimit-redis", url] if (url := self.redis_url()) else [])],
            stdout=subprocess.DEVNULL, stderr=logf.open("ab"), start_new_session=True)
        self.agents[n.name] = Agent(n, proc, logf)
        self.state.agents[n.name] = proc.pid

    def _start_dns(self, n: NodeNet) -> None:
        logf = self.dir / n.name / "dns.log"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", n.name, sys.executable, "-m", "mesh.lab.dns", "--listen",
             n.underlay_ip, "--state", str(self.dir / "lab.json")],
            stdout=logf.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.dns[n.name] = proc
        self.state.dns[n.name] = proc.pid

    def write_cluster(self) -> None:
        """What the API server would hold: the manifests (workloads aside), Services with
        their ClusterIPs, the pods (node, IP, readiness) and their EndpointSlices."""
        docs = [d for d in self.docs if d.get("kind") not in (*WORKLOAD_KINDS, "Service")]
        docs += [workloads.as_served(s) for s in self.services]
        docs += [workloads.pod_object(p.spec, p.node.name, p.ip, p.ready)
                 for p in self.pods if p.ip]
        pods = [(p.spec, p.ip, p.ready) for p in self.pods if p.ip]
        docs += [es for s in self.services if (es := workloads.endpoint_slice(s, pods))]
        text = yaml.safe_dump_all(docs, sort_keys=False)
        path = self.dir / "cluster" / "cluster.yaml"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(".cluster.yaml")
            tmp.write_text(text)
            tmp.replace(path)
            # Each agent logs the load of a changed file: until its log has grown, it may
            # not serve this version yet.
            self._seen_at_write = {n: _size(a.log) for n, a in self.agents.items()}
            self._loaded_since = None

    # -- pods ----------------------------------------------------------------------------

    def add_pod(self, p: Pod) -> None:
        subprocess.run(["ip", "netns", "add", p.netns], check=True, capture_output=True)
        # `ip netns exec` mounts /etc/netns/NAME/* over /etc: the pod's own resolv.conf,
        # the node's cluster DNS with the Kubernetes search path.
        etc = Path("/etc/netns") / p.netns
        etc.mkdir(parents=True, exist_ok=True)
        self.state.etc_netns.append(str(etc))
        (etc / "resolv.conf").write_text(dns.resolv_conf(p.node.underlay_ip, p.spec.namespace))
        self.save()  # recorded as made: a teardown after a failure below removes it
        result = self._runtimes[p.node.name].add(p.key.replace("/", "_"),
                                                 f"/var/run/netns/{p.netns}")
        p.ip = result["ips"][0]["address"].split("/")[0]
        self.start_pod(p)
        self.save()

    def _env(self, p: Pod) -> dict[str, str]:
        """The pod's environment: the downward API basics, the Services of its namespace,
        the container's own."""
        return {"POD_NAME": p.spec.name, "NAMESPACE": p.spec.namespace,
                "POD_NAMESPACE": p.spec.namespace, "POD_IP": p.ip, "NODE_NAME": p.node.name,
                **workloads.service_env(self.services, p.spec.namespace), **p.spec.env}

    def start_pod(self, p: Pod) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self._env(p)}
        procs = str(CGROUP_ROOT / self.name / p.node.name / "cgroup.procs")

        def join() -> None:  # in the child, before exec: the node's pod cgroup
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        logf = self._pod_log(p).open("ab")
        p.process = subprocess.Popen(["ip", "netns", "exec", p.netns, *p.spec.command],
                                     env=env, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=join,
                                     start_new_session=True)
        p.started = time.monotonic()

    def probe(self, p: Pod) -> bool:
        """The pod's readinessProbe (or a TCP connect to its first port) once, from its
        node as the kubelet probes: HTTP 200-399, a TCP connection, or exit status 0."""
        if p.process is None or p.process.poll() is not None:
            return False
        probe = p.spec.probe or workloads.Probe("tcp", p.spec.ready_port, timeout=2)
        if probe.kind == "exec":
            cmd = ["ip", "netns", "exec", p.netns, *probe.command]
        elif probe.port is None:
            return probe.kind == "tcp" and p.spec.probe is None  # no port to probe: ready
        elif probe.kind == "http":
            cmd = ["ip", "netns", "exec", p.node.name, "curl", "-s", "-o", "/dev/null",
                   "-w", "%{http_code}", "--max-time", str(probe.timeout),
                   f"http://{p.ip}:{probe.port}{probe.path}"]
        else:
            cmd = ["ip", "netns", "exec", p.node.name, "timeout", str(probe.timeout), "bash",
                   "-c", f"exec 3<>/dev/tcp/{p.ip}/{probe.port}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 timeout=probe.timeout + 2)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if probe.kind == "http":
            return out.stdout.isdigit() and 200 <= int(out.stdout) < 400
        return out.returncode == 0

    def _probe_due(self, p: Pod) -> bool:
        now = time.monotonic()
        probe = p.spec.probe
        if probe is None:
            return True  # the default probe: every tick
        if now < max(p.next_probe, p.started + probe.initial_delay):
            return False
        p.next_probe = now + probe.period
        return True

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        self.build()
        for p in self.pods:
            self.add_pod(p)
        self.save()

    def tick(self) -> bool:
        """One round of supervision; whether anything changed."""
        try:
            changed = self.reload()
        except (LabError, OSError, subprocess.SubprocessError, CNIError) as e:
            # A bad edit (a pod that cannot be wired): the lab goes on as it was.
            log.error("manifests not applied", extra={"error": str(e)})
            changed = False
        for a in self.agents.values():
            if not a.ready and b"node ready" in a.log.read_bytes():
                a.ready = changed = True
            if a.process.poll() is not None:
                log.error("agent exited, restarting", extra={"node": a.node.name})
                self._start_agent(a.node)
                changed = True
        for name, proc in list(self.dns.items()):
            if proc.poll() is not None:
                log.error("cluster DNS exited, restarting", extra={"node": name})
                self._start_dns(next(n for n in self.nodes if n.name == name))
                changed = True
        for p in self.pods:
            if p.process is not None and p.process.poll() is not None:
                p.restarts += 1
                log.warning("pod exited, restarting",
                            extra={"pod": p.key, "code": p.process.returncode})
                self.start_pod(p)
                p.ready, p.failures, p.successes, changed = False, 0, 0, True
                p.next_probe = 0.0
            alive = p.process is not None and p.process.poll() is None
            if not alive:
                if p.ready:
                    p.ready, changed = False, True  # at once: its process is gone
                continue
            if not self._probe_due(p):
                continue
            # As the kubelet: ready after successThreshold successes in a row, unready after
            # failureThreshold failures in a row (a busy pod may miss one probe).
            ok = self.probe(p)
            p.failures = 0 if ok else p.failures + 1
            p.successes = p.successes + 1 if ok else 0
            probe = p.spec.probe
            needed = probe.success_threshold if probe else 1
            allowed = probe.failure_threshold if probe else FAILURE_THRESHOLD
            ready = p.successes >= needed or (p.ready and p.failures < allowed)
            if ready != p.ready:
                p.ready, changed = ready, True
        if changed:
            self.write_cluster()
        # An agent's log grows as it loads the change, before it has built and pushed it:
        # a second more lets Envoy take it (a build and a push take tens of milliseconds).
        loaded = all(_size(a.log) > self._seen_at_write.get(n, -1)
                     for n, a in self.agents.items())
        if loaded and self._loaded_since is None:
            self._loaded_since = time.monotonic()
        elif not loaded:
            self._loaded_since = None
        caught_up = self._loaded_since is not None and \
            time.monotonic() - self._loaded_since >= SETTLE
        ready = caught_up and all(a.ready for a in self.agents.values()) and \
            all(p.ready for p in self.pods)
        if ready != self.state.ready or changed:
            self.state.ready = ready
            self.save()
        return changed

    def run_forever(self, stop: list[bool]) -> None:
        try:
            self.start()
            while not stop:
                self.tick()
                time.sleep(0.5)
        finally:
            teardown(self.name)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
    return True


def teardown(name: str) -> list[str]:
    """Remove everything lab.json says the lab made; what could not be removed."""
    state = read_state(name)
    if state is None:
        return []
    left: list[str] = []
    pods = state.get("pods", {})
    pod_pids = [int(p["pid"]) for p in pods.values() if p.get("pid")]
    for pid in pod_pids:
        _kill(pid)
    _wait_gone(pod_pids, 5)
    d = lab_dir(name)
    for key, p in pods.items():
        with contextlib.suppress(Exception):
            existing_runtime(d / p["node"] / "cni", p["node"]).delete(
                key.replace("/", "_"), f"/var/run/netns/{p['netns']}")
        subprocess.run(["ip", "netns", "del", p["netns"]], capture_output=True, check=False)
    resolvers = [int(pid) for pid in state.get("dns", {}).values()]
    for pid in resolvers:
        _kill(pid)
    _wait_gone(resolvers, 5)
    for etc in state.get("etc_netns", []):
        shutil.rmtree(etc, ignore_errors=True)
    agents = [int(pid) for pid in state.get("agents", {}).values()]
    for pid in agents:
        _kill(pid)  # a stop on purpose: each agent stops its Envoy
    _wait_gone(agents, 15)
    # An agent that had crashed leaves its Envoy serving (as on a real node): stop those too.
    envoys = []
    for node in state.get("nodes", []):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads((d / node / "agent" / "envoy.pid").read_text())["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                envoys.append(pid)
    _wait_gone(envoys, 5)
    redis = int(state.get("redis") or 0)
    if redis:
        _kill(redis)
        _wait_gone([redis], 5)
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
        (ROOT / f"{name}.log").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ROOT.rmdir()
    return left
