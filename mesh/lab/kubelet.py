"""The lab's kubelet: one node's daemon against a real API server (mesh.lab.controlplane).

It does what a kubelet does, with processes for containers:
- registers its Node (addresses, capacity, nodeInfo, the Ready condition), heartbeats through
  a Lease in kube-node-lease (every RENEW seconds) and writes the Node's status every
  STATUS_EVERY seconds; it reads the Node's `spec.podCIDR` (node-ipam's) for its pods' IPAM;
- watches the Pods bound to it (fieldSelector spec.nodeName); a new one gets a network
  namespace and its interface from the project's CNI plugin (as mesh.lab.cluster wires pods),
  and each container's command and args run as a process in that namespace, as the lab runs
  them (mesh.lab.workloads: a container without a command runs the project's echo);
- writes each Pod's status: phase, IPs, conditions, container states, readiness from the
  lab's probes, restart counts, exit codes; a container it cannot start (its command does not
  exist) waits with CreateContainerError and a message, and is tried again with back-off;
- restarts exited containers per restartPolicy with back-off (10 s doubling to 5 minutes);
- on a Pod's deletion stops its processes within the grace period, runs CNI DEL, removes the
  namespace and deletes the Pod with gracePeriodSeconds=0, as a kubelet finalizes.

Cancelled, it stops heartbeating and leaves its pods running, as a real kubelet does; the
node lifecycle controller then marks the Node NotReady. What it started is recorded in
STATE/pods/<uid>.json, so `Kubelet.cleanup(STATE)` removes it all (processes, CNI, netns).

Its identity is a node client certificate (CN=system:node:<name>, O=system:nodes) from the
control plane's CA (`node_kubeconfig`), so the Node authorizer and NodeRestriction judge it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.cni.plugin import CNIError
from mesh.cni.runtime import Runtime, existing_runtime, node_runtime
from mesh.kube.client import API_ERRORS, HTTP, Gone, connect
from mesh.lab import images, kubelet_server, volumes, workloads
from mesh.lab.controlplane import Issued, issue, kubeconfig, write_file
from mesh.lab.dns import resolv_conf
from mesh.lab.volumes import VolumeError
from mesh.lab.workloads import PodSpec, Probe

log = logging.getLogger(__name__)

KUBELET_VERSION = "v1.37.2"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
RENEW = 10.0  # seconds between Lease renewals
STATUS_EVERY = 40.0  # seconds between Node status writes when nothing changed
BACKOFF = 10.0  # a container's first restart delay, doubled per restart ...
BACKOFF_MAX = 300.0  # ... up to this
TICK = 0.5  # seconds between a pod worker's rounds
MAX_PODS = 110
DEFAULT_GRACE = 30
FAILURE_THRESHOLD = 3  # the lab's default probe: unready after this many failures in a row


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lab_ca(certs: Path) -> Issued:
    """The control plane's CA (a ControlPlane's `certs`), to issue node certificates."""
    cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(cert, key)


def node_kubeconfig(certs: Path, server: str, node: str, path: Path) -> Path:
    """A kubeconfig for `node` at `path` (0600): a client certificate CN=system:node:<node>,
    O=system:nodes, issued by the CA in `certs` (a ControlPlane's `certs`)."""
    ca = _lab_ca(certs)
    client = issue(ca, f"system:node:{node}", org="system:nodes")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, kubeconfig(server, ca.cert_pem(), client, f"system:node:{node}").encode(),
               0o600)
    return path


def serving_certificate(certs: Path, node: str, address: str, directory: Path) -> None:
    """The kubelet's serving certificate for its node's address (kubelet-serving.crt and
    .key, 0600, in `directory`), from the CA in `certs`: the API server checks it."""
    served = issue(_lab_ca(certs), f"system:node:{node}", org="system:nodes", server=True,
                   dns=(node,), ips=(address,))
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / "kubelet-serving.crt", served.cert_pem(), 0o600)
    write_file(directory / "kubelet-serving.key", served.key_pem(), 0o600)


# -- one container -------------------------------------------------------------------------

@dataclass
class Container:
    name: str
    image: str
    spec: PodSpec  # the lab's reading of it: command, env, ports, readiness probe
    extra_env: dict[str, str] = field(default_factory=dict)  # valueFrom: fieldRef
    # (volume, mountPath, readOnly, subPath) of its volumeMounts
    mounts: tuple[tuple[str, str, bool, str], ...] = ()
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str = ""
    started: float = 0.0  # monotonic
    state: dict[str, Any] = field(default_factory=lambda: {
        "waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    failures: int = 0
    successes: int = 0
    next_probe: float = 0.0
    next_start: float = 0.0  # monotonic: not started again before (back-off)
    backoff: float = 0.0
    done: bool = False  # terminated for good (restartPolicy)


def _field_ref(pod: Mapping[str, Any], path: str, ip: str, host_ip: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    known = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
             "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
             "spec.serviceAccountName": spec.get("serviceAccountName"),
             "status.podIP": ip, "status.hostIP": host_ip}
    return str(known.get(path) or "")


def containers_of(pod: Mapping[str, Any], ip: str, host_ip: str) -> list[Container]:
    """The pod's containers as the lab runs them (mesh.lab.workloads' rule per container)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    out = []
    for c in spec.get("containers") or []:
        one = {"metadata": {"labels": meta.get("labels") or {}},
               "spec": {"containers": [c]}}
        ps = workloads.container_spec(str(meta.get("namespace")), str(meta.get("name")), one, "")
        extra = {}
        for e in c.get("env") or []:
            ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if e.get("name") and ref:
                extra[str(e["name"])] = _field_ref(pod, str(ref), ip, host_ip)
        mounts = tuple((str(m.get("name")), str(m.get("mountPath")), bool(m.get("readOnly")),
                        str(m.get("subPath") or ""))
                       for m in c.get("volumeMounts") or [] if isinstance(m, Mapping))
        out.append(Container(str(c.get("name")), str(c.get("image") or ""), ps, extra,
                             mounts))
    return out


def _mountable(c: Container) -> list[tuple[str, str, bool, str]]:
    """The container's volumeMounts the lab gives. The API server's own service-account
    volume (`kube-api-access-*`, added to every pod) is let pass unmounted: its path
    (/var/run/secrets/...) would be made on the host for every pod, and nothing the lab
    runs reads it; a volume of the pod's own that needs a token is given one."""
    return [m for m in c.mounts if not m[0].startswith("kube-api-access-")]


def _mountpoint(target: str, is_file: bool) -> list[str]:
    """Make `target` exist on the host as an empty mountpoint (a directory, or a file for
    a file's subPath); the paths made, outermost first, for the pod's teardown."""
    if ":" in target or not target.startswith("/"):
        raise VolumeError(f"mountPath {target!r}: an absolute path without ':'")
    made, path = [], Path(target)
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            made.append(str(parent))
    if is_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return made


def _resolve(command: tuple[str, ...], path: str) -> str | None:
    """Why `command` cannot run (as a runtime says it), or None."""
    if not command:
        return "no command"
    exe = command[0]
    if "/" in exe:
        return None if os.access(exe, os.X_OK) and os.path.isfile(exe) else \
            f'exec: "{exe}": stat {exe}: no such file or directory'
    return None if shutil.which(exe, path=path) else \
        f'exec: "{exe}": executable file not found in $PATH'


def probe_once(probe: Probe | None, ready_port: int | None, netns: str, node_netns: str,
               ip: str) -> bool:
    """A readiness probe once, from the node as the kubelet probes (the lab's rules: without
    a probe, a TCP connect to the first TCP containerPort; none: ready)."""
    p = probe or Probe("tcp", ready_port, timeout=2)
    if p.kind == "exec":
        cmd = ["ip", "netns", "exec", netns, *p.command]
    elif p.port is None:
        return p.kind == "tcp" and probe is None
    elif p.kind == "http":
        cmd = ["ip", "netns", "exec", node_netns, "curl", "-s", "-o", "/dev/null", "-w",
               "%{http_code}", "--max-time", str(p.timeout), f"http://{ip}:{p.port}{p.path}"]
    else:
        cmd = ["ip", "netns", "exec", node_netns, "timeout", str(p.timeout), "bash", "-c",
               f"exec 3<>/dev/tcp/{ip}/{p.port}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=p.timeout + 2)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if p.kind == "http":
        return out.stdout.isdigit() and 200 <= int(out.stdout) < 400
    return out.returncode == 0


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _remove_mountpoints(made: list[str]) -> None:
    """Remove the mountpoints a pod made on the host, innermost first, each only if empty
    (and not another pod's mountpoint still: then it stays until that one goes)."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            p = Path(path)
            if p.is_file() and p.stat().st_size == 0:
                p.unlink()
            else:
                p.rmdir()


def _ready_of(status: Mapping[str, Any]) -> str | None:
    """The status of a Pod's or a Node's Ready condition."""
    return next((str(c.get("status")) for c in status.get("conditions") or []
                 if isinstance(c, Mapping) and c.get("type") == "Ready"), None)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- one pod -------------------------------------------------------------------------------

class PodWorker:
    """One Pod bound to the node: its namespace, its containers, its status."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.netns = f"{kubelet.netns}-{self.uid[:8]}"
        self.ip = ""
        self.containers: list[Container] = []
        self.net_error = ""
        self.written: dict[str, Any] | None = None
        self.transitions: dict[str, tuple[str, str]] = {}  # condition -> (status, time)
        self.start_time = now_rfc3339()
        self.deleting = asyncio.Event()
        self.gone = False  # the object is gone from the API: do not write to it
        self.task: asyncio.Task[None] | None = None
        # What an earlier run of this node's kubelet recorded of the pod: its sandbox (the
        # network namespace and address) is taken over, its processes started again.
        self.adopted: dict[str, Any] | None = kubelet.records.pop(self.uid, None)
        # Empty mountpoints made on the host for its volumes (removed with the pod).
        self.mountpoints: list[str] = list((self.adopted or {}).get("mountpoints") or [])

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def restart_policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy") or "Always")

    def _record(self) -> None:
        """What this pod made, for Kubelet.cleanup."""
        self.kubelet.pods_dir.mkdir(parents=True, exist_ok=True)
        first = self.containers[0] if self.containers else None
        data = {"namespace": self.namespace, "name": self.name, "netns": self.netns,
                "ip": self.ip, "pids": [c.process.pid for c in self.containers
                                        if c.process is not None],
                # for `mesh lab exec` and `mesh lab logs`: the first container's
                "env": self._env(first) if first is not None else {},
                "log": str(self._log(first)) if first is not None else "",
                "etc": str(self._etc()) if self.kubelet.dns else "",
                "mountpoints": self.mountpoints,
                "volumes": str(self.kubelet.state_dir / "volumes" / self.uid)}
        tmp = self.kubelet.pods_dir / f".{self.uid}.json"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.kubelet.pods_dir / f"{self.uid}.json")

    # -- network --

    def _adopt(self) -> bool:
        """Take over the sandbox an earlier run made: its namespace and address stay (a
        pod's IP never changes), the processes it left are stopped, to be started again
        (counted as restarts, as when a runtime restarts its containers)."""
        rec = self.adopted
        if not rec or not rec.get("ip") or \
                not Path(f"/var/run/netns/{self.netns}").exists():
            return False
        pids = [int(pid) for pid in rec.get("pids") or []]
        for pid in pids:
            _kill_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        self.ip = str(rec["ip"])
        log.info("pod adopted", extra={"pod": self.key, "ip": self.ip})
        return True

    def _setup_network(self) -> None:
        k = self.kubelet
        if self._adopt():
            self._record()
            return
        self._record()  # before it exists: a cleanup after a failure below removes it
        if not Path(f"/var/run/netns/{self.netns}").exists():
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        if k.dns is not None:
            # `ip netns exec` mounts /etc/netns/NAME/* over /etc: the pod's own
            # resolv.conf, the node's cluster DNS with the Kubernetes search path.
            self._etc().mkdir(parents=True, exist_ok=True)
            (self._etc() / "resolv.conf").write_text(resolv_conf(k.dns, self.namespace))
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"],
                       check=False, capture_output=True)
        assert k.runtime is not None
        result = k.runtime.add(self.uid, f"/var/run/netns/{self.netns}")
        self.ip = str(result["ips"][0]["address"]).split("/")[0]
        self._record()

    def _teardown_network(self) -> None:
        k = self.kubelet
        if k.runtime is not None:
            with contextlib.suppress(CNIError, OSError, subprocess.SubprocessError):
                k.runtime.delete(self.uid, f"/var/run/netns/{self.netns}")
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        shutil.rmtree(self._etc(), ignore_errors=True)
        _remove_mountpoints(self.mountpoints)
        shutil.rmtree(self.kubelet.state_dir / "volumes" / self.uid, ignore_errors=True)

    def _etc(self) -> Path:
        return Path("/etc/netns") / self.netns

    # -- containers --

    def _log(self, c: Container) -> Path:
        return self.kubelet.logs_dir / f"{self.namespace}_{self.name}_{c.name}.log"

    def _env(self, c: Container) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": "/root", "HOSTNAME": self.name, "POD_NAME": self.name,
                "NAMESPACE": self.namespace,
                "POD_NAMESPACE": self.namespace, "POD_IP": self.ip,
                "NODE_NAME": self.kubelet.name,
                **self.kubelet.service_env.get(self.namespace, {}), **c.spec.env,
                **c.extra_env}

    async def _volumes(self, c: Container) -> list[str]:
        """`sandbox` arguments mounting the container's volumes (filled now); VolumeError
        for one the lab cannot give."""
        wanted = _mountable(c)
        if not wanted:
            return []
        k = self.kubelet
        builder = volumes.Builder(self.pod, k.state_dir / "volumes" / self.uid,
                                  lambda path: k.call("GET", path),
                                  lambda path, body: k.call("POST", path, body))
        mounts = await builder.mounts(wanted)
        for m in mounts:
            made = await asyncio.to_thread(_mountpoint, m.target, m.source.is_file())
            self.mountpoints += [p for p in made if p not in self.mountpoints]
        self._record()
        args = [sys.executable, "-m", "mesh.lab.sandbox"]
        for m in mounts:
            args += ["--mount", f"{m.source}:{m.target}" + (":ro" if m.read_only else "")]
        return ["unshare", "--mount", "--propagation", "private", "--", *args, "--"]

    async def _start(self, c: Container) -> None:
        env = self._env(c)
        try:
            sandbox = await self._volumes(c)
        except VolumeError as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            self._back_off(c)
            return
        command = c.spec.command
        if not command:
            try:
                command = images.entrypoint(c.image, c.spec.args, env)
            except KeyError:
                c.state = {"waiting": {"reason": "ErrImageNeverPull", "message": (
                    f'Container image "{c.image}" is not present with pull policy of Never: '
                    "the lab pulls no images and runs a command for these only: "
                    f"{', '.join(images.known())}; give the container a command")}}
                self._back_off(c)
                return
        why = _resolve(command, env["PATH"])
        if why is not None:
            c.state = {"waiting": {"reason": "CreateContainerError", "message": why}}
            self._back_off(c)
            return
        self._spawn(c, [*sandbox, "ip", "netns", "exec", self.netns, *command], env)

    def _spawn(self, c: Container, argv: list[str], env: dict[str, str]) -> None:
        """Start the container's process in the node's pod cgroup (a fork and an exec)."""
        logf = self._log(c)
        logf.parent.mkdir(parents=True, exist_ok=True)
        procs = str(self.kubelet.cgroup / "cgroup.procs") if self.kubelet.cgroup else None

        def join() -> None:  # in the child, before exec: the node's pod cgroup
            if procs is not None:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        # Its output through the log shim, kept as a runtime keeps it (CRI log lines).
        shim = [sys.executable, "-m", "mesh.lab.logshim", str(logf), "--"]
        c.process = subprocess.Popen([*shim, *argv], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=join)
        c.started, c.started_at = time.monotonic(), now_rfc3339()
        c.state = {"running": {"startedAt": c.started_at}}
        c.ready, c.failures, c.successes, c.next_probe = False, 0, 0, 0.0
        self._record()

    def _back_off(self, c: Container) -> None:
        c.backoff = min(BACKOFF_MAX, c.backoff * 2) if c.backoff else self.kubelet.backoff
        c.next_start = time.monotonic() + c.backoff

    def _exited(self, c: Container) -> None:
        assert c.process is not None
        # The container's first process is gone: what it left behind goes with it.
        _kill_group(c.process.pid, signal.SIGKILL)
        rc = c.process.returncode
        code = 128 - rc if rc < 0 else rc
        c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else
                                  "Error", "startedAt": c.started_at,
                                  "finishedAt": now_rfc3339(),
                                  "containerID": self._container_id(c)}}
        c.process, c.ready = None, False
        policy = self.restart_policy
        if policy == "Never" or (policy == "OnFailure" and code == 0):
            c.done = True
            return
        c.last_state = c.state
        c.restarts += 1
        # A container that ran long enough starts over with the first delay.
        if time.monotonic() - c.started > BACKOFF_MAX * 2:
            c.backoff = 0.0
        self._back_off(c)
        c.state = {"waiting": {"reason": "CrashLoopBackOff", "message":
                               f"back-off {c.backoff:.0f}s restarting failed container="
                               f"{c.name} pod={self.name}_{self.namespace}({self.uid})"}}

    def _container_id(self, c: Container) -> str:
        return f"mesh-lab://{self.uid}-{c.name}"

    async def _probe(self, c: Container) -> None:
        if c.process is None:
            return
        probe = c.spec.probe
        now = time.monotonic()
        if probe is not None:
            if now < max(c.next_probe, c.started + probe.initial_delay):
                return
            c.next_probe = now + probe.period
        ok = await asyncio.to_thread(probe_once, probe, c.spec.ready_port, self.netns,
                                     self.kubelet.netns, self.ip)
        c.failures = 0 if ok else c.failures + 1
        c.successes = c.successes + 1 if ok else 0
        needed = probe.success_threshold if probe else 1
        allowed = probe.failure_threshold if probe else FAILURE_THRESHOLD
        c.ready = c.successes >= needed or (c.ready and c.failures < allowed)

    # -- status --

    def _condition(self, kind: str, ok: bool) -> dict[str, Any]:
        status = "True" if ok else "False"
        before = self.transitions.get(kind)
        if before is None or before[0] != status:
            before = (status, now_rfc3339())
            self.transitions[kind] = before
        return {"type": kind, "status": status, "lastProbeTime": None,
                "lastTransitionTime": before[1]}

    def status(self) -> dict[str, Any]:
        cs = self.containers
        running = [c for c in cs if "running" in c.state]
        terminated = [c for c in cs if "terminated" in c.state]
        if cs and len(terminated) == len(cs) and all(c.done for c in cs):
            failed = any(c.state["terminated"]["exitCode"] != 0 for c in cs)
            phase = "Failed" if failed else "Succeeded"
        elif running or any(c.restarts for c in cs):
            phase = "Running"
        else:
            phase = "Pending"
        ready = bool(cs) and all(c.ready for c in cs)
        host = self.kubelet.address
        out: dict[str, Any] = {
            "phase": phase, "hostIP": host, "hostIPs": [{"ip": host}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", bool(self.ip)),
                self._condition("Initialized", True),
                self._condition("Ready", ready),
                self._condition("ContainersReady", ready),
                self._condition("PodScheduled", True)],
            "containerStatuses": [{
                "name": c.name, "image": c.image, "imageID": "",
                "containerID": self._container_id(c), "ready": c.ready,
                "started": "running" in c.state, "restartCount": c.restarts,
                "state": c.state, "lastState": c.last_state} for c in cs]}
        if self.ip:
            out["podIP"], out["podIPs"] = self.ip, [{"ip": self.ip}]
        if self.net_error:
            out["message"], out["reason"] = self.net_error, "NetworkNotReady"
        return out

    async def _write_status(self) -> None:
        if self.gone:
            return
        status = self.status()
        if status == self.written:
            return
        code, body = await self.kubelet.call(
            "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"metadata": {"uid": self.uid}, "status": status},
            "application/merge-patch+json")
        if code == 200:
            self.written = status
        elif code == 404:
            self.gone = True
        else:
            log.warning("pod status not written", extra={"pod": self.key, "code": code,
                                                          "body": str(body)[:300]})

    # -- its life --

    async def run(self) -> None:
        """Until the pod is deleted (then stop it and finalize). Cancelled: leave the pod
        running (the kubelet stops, its pods do not)."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not end the kubelet: say so, keep the others going
            log.exception("pod worker failed", extra={"pod": self.key})

    async def _run(self) -> None:
        delay = 1.0
        while not self.deleting.is_set():
            try:
                await asyncio.to_thread(self._setup_network)
                self.net_error = ""
                break
            except (CNIError, OSError, subprocess.SubprocessError, KeyError) as e:
                self.net_error = f"failed to set up the pod's network: {e}"
                log.error("pod network failed", extra={"pod": self.key, "error": str(e)})
                await self._write_status()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.deleting.wait(), delay)
                delay = min(delay * 2, 30)
        host = self.kubelet.address
        if not self.containers:
            self.containers = containers_of(self.pod, self.ip, host)
            if self.adopted:
                before = {c.get("name"): c for c in (self.pod.get("status") or {}).get(
                    "containerStatuses") or []}
                for c in self.containers:
                    c.restarts = int((before.get(c.name) or {}).get("restartCount") or 0) + 1
                self.start_time = str((self.pod.get("status") or {}).get("startTime")
                                      or self.start_time)
        while not self.deleting.is_set():
            now = time.monotonic()
            for c in self.containers:
                if c.process is not None and c.process.poll() is not None:
                    self._exited(c)
                if c.process is None and not c.done and now >= c.next_start:
                    await self._start(c)
                await self._probe(c)
            await self._write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.deleting.wait(), TICK)
        await self._terminate()

    async def _terminate(self) -> None:
        grace = self._grace()
        for pid in (self.adopted or {}).get("pids") or []:  # an earlier run's, not adopted
            _kill_group(int(pid), signal.SIGKILL)
        procs = [c.process for c in self.containers if c.process is not None]
        for p in procs:
            _kill_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            await asyncio.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                _kill_group(p.pid, signal.SIGKILL)
                await asyncio.to_thread(p.wait, 5)
        await asyncio.to_thread(self._teardown_network)
        (self.kubelet.pods_dir / f"{self.uid}.json").unlink(missing_ok=True)
        if not self.gone:
            code, body = await self.kubelet.call(
                "DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                 "preconditions": {"uid": self.uid}})
            if code not in (200, 202, 404, 409):
                log.warning("pod not deleted", extra={"pod": self.key, "code": code,
                                                       "body": str(body)[:300]})
        log.info("pod removed", extra={"pod": self.key})

    def _grace(self) -> float:
        meta, spec = self.pod.get("metadata") or {}, self.pod.get("spec") or {}
        for v in (meta.get("deletionGracePeriodSeconds"),
                  spec.get("terminationGracePeriodSeconds")):
            if isinstance(v, int):
                return float(v)
        return float(DEFAULT_GRACE)


# -- the node ------------------------------------------------------------------------------

def _memory_ki() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


class Kubelet:
    """One node's kubelet. `netns` is the node's network namespace (its pods' interfaces'
    host sides go there), `address` its underlay address (the Node's InternalIP)."""

    def __init__(self, name: str, kubeconfig: Path, state_dir: Path, *, netns: str,
                 address: str, backoff: float = BACKOFF, renew: float = RENEW,
                 status_every: float = STATUS_EVERY,
                 taints: tuple[dict[str, str], ...] = (), cgroup: Path | None = None,
                 dns: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None, mtu: int = 1500) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.pods_dir = state_dir / "pods"
        self.logs_dir = state_dir / "logs"
        self.netns = netns
        self.address = address
        self.backoff = backoff
        self.renew = renew
        self.status_every = status_every
        self.taints = taints  # registered with (a kubelet's --register-with-taints)
        # The cgroup (v2) its containers' processes join: the node's pod cgroup, where the
        # agent's eBPF socket load balancer is attached.
        self.cgroup = cgroup
        # The cluster DNS its pods' resolv.conf names (None: the host's resolv.conf).
        self.dns = dns
        # (serving certificate, its key, the CA of its clients): with them it serves the
        # API server's `kubectl logs` on the node's address (mesh.lab.kubelet_server).
        self.tls = tls
        self.mtu = mtu  # the pods' interfaces' (the CNI configuration's)
        self.http: HTTP | None = None
        self.runtime: Runtime | None = None
        self.pod_cidr = ""
        self.workers: dict[str, PodWorker] = {}
        self.service_env: dict[str, dict[str, str]] = {}
        self.registered = asyncio.Event()
        # An earlier run's pods (STATE/pods/<uid>.json), until the first list of the pods
        # bound here says which to adopt and which to remove.
        self.records: dict[str, dict[str, Any]] = {}
        self._listed_once = False
        self._stale: asyncio.Task[None] | None = None

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/json") -> tuple[int, Any]:
        """One JSON request (PATCH with its patch type): (status, decoded body or None)."""
        assert self.http is not None
        try:
            resp = await self.http.api.call_api(
                path, method, auth_settings=["BearerToken"], body=body,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                _preload_content=False)
            try:
                text = await resp.read()
            finally:
                resp.release()
            return resp.status, json.loads(text) if text else None
        except API_ERRORS as e:
            return 0, str(e)

    # -- the Node --

    def node_status(self) -> dict[str, Any]:
        t = now_rfc3339()
        resources = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_ki()}Ki",
                     "pods": str(MAX_PODS), "ephemeral-storage": "10Gi"}

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": self._since.get(kind, t)}

        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready"):
            self._since.setdefault(kind, t)
        return {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": self.address},
                          {"type": "Hostname", "address": self.name}],
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure",
                     "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID",
                     "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status")],
            "daemonEndpoints": {"kubeletEndpoint": {
                "Port": kubelet_server.PORT if self.tls else 0}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id"), "systemUUID": self.name,
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(), "osImage": "mesh lab",
                "containerRuntimeVersion": "mesh-lab://0.1", "kubeletVersion":
                KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    platform.machine(), platform.machine())}}

    _since: dict[str, str]

    async def register(self) -> dict[str, Any]:
        """Create the Node (or take the one there), write its status; the Node."""
        self._since = {}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.name, "labels": {
                "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": self.node_status()["nodeInfo"]["architecture"]}},
            "spec": {"taints": list(self.taints)} if self.taints else {},
            "status": self.node_status()}
        while True:
            code, out = await self.call("POST", "/api/v1/nodes", body)
            if code in (201, 409):
                break
            log.warning("node not registered", extra={"node": self.name, "code": code,
                                                       "body": str(out)[:300]})
            await asyncio.sleep(1)
        await self.write_node_status()
        log.info("node registered", extra={"node": self.name})
        return await self.get_node()

    async def get_node(self) -> dict[str, Any]:
        code, node = await self.call("GET", f"/api/v1/nodes/{self.name}")
        if code != 200 or not isinstance(node, dict):
            raise RuntimeError(f"node {self.name}: {code} {str(node)[:200]}")
        return node

    async def write_node_status(self) -> bool:
        code, out = await self.call("PATCH", f"/api/v1/nodes/{self.name}/status",
                                    {"status": self.node_status()},
                                    "application/merge-patch+json")
        if code != 200:
            log.warning("node status not written", extra={"node": self.name, "code": code,
                                                           "body": str(out)[:300]})
        return code == 200

    async def _node_ready(self) -> bool:
        """Whether the Node's Ready condition is True on the API server."""
        with contextlib.suppress(RuntimeError):
            node = await self.get_node()
            return _ready_of(node.get("status") or {}) == "True"
        return True  # unknown: the regular status write will tell

    async def wait_pod_cidr(self) -> str:
        while True:
            with contextlib.suppress(RuntimeError):
                cidr = (await self.get_node()).get("spec", {}).get("podCIDR")
                if cidr:
                    return str(cidr)
            await asyncio.sleep(0.3)

    async def heartbeat(self) -> None:
        """Renew the Lease every `renew` seconds; the Node's status every `status_every`."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        last_status = time.monotonic()
        lease: dict[str, Any] | None = None
        while True:
            if lease is None:
                code, got = await self.call("GET", f"{path}/{self.name}")
                if code == 200 and isinstance(got, dict):
                    lease = got
                elif code == 404:
                    node = await self.get_node()
                    code, got = await self.call("POST", path, {
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE,
                                     "ownerReferences": [{
                                         "apiVersion": "v1", "kind": "Node",
                                         "name": self.name, "uid": node["metadata"]["uid"]}]},
                        "spec": {"holderIdentity": self.name,
                                 "leaseDurationSeconds": LEASE_SECONDS,
                                 "renewTime": micro_time()}})
                    lease = got if code == 201 and isinstance(got, dict) else None
            else:
                lease["spec"]["renewTime"] = micro_time()
                code, got = await self.call("PUT", f"{path}/{self.name}", lease)
                lease = got if code == 200 and isinstance(got, dict) else None
            if lease is None:
                log.warning("lease not renewed", extra={"node": self.name, "code": code})
            elif not await self._node_ready():
                # The node lifecycle controller set Ready Unknown while we were away.
                last_status = 0.0
            if time.monotonic() - last_status >= self.status_every:
                if await self.write_node_status():
                    last_status = time.monotonic()
            await asyncio.sleep(self.renew if lease is not None else 1.0)

    # -- Pods and Services --

    async def watch(self, path: str, query: dict[str, str], handle: Any,
                    resync: Any) -> None:
        """List+watch `path`: `resync(items)` after each list, `handle(type, object)` per
        event; 410 lists again, errors back off."""
        assert self.http is not None
        delay = 0.2
        while True:
            try:
                listed = await self.http.get_json(path, query)
                version = listed["metadata"]["resourceVersion"]
                resync(listed.get("items") or [])
                while True:
                    async for ev in self.http.stream(path, {
                            **query, "watch": "1", "resourceVersion": version,
                            "allowWatchBookmarks": "true", "timeoutSeconds": "300"}):
                        kind, obj = ev.get("type"), ev.get("object") or {}
                        if kind == "ERROR":
                            raise Gone() if obj.get("code") == 410 else \
                                ValueError(obj.get("message"))
                        version = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            handle(kind, obj)
                    delay = 0.2
            except Gone:
                continue
            except API_ERRORS as e:
                log.warning("watch failed", extra={"path": path, "error": str(e)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        w = self.workers.get(uid)
        if kind == "DELETED":
            if w is not None:
                w.gone = True
                w.deleting.set()
            return
        if w is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            if pod["metadata"].get("deletionTimestamp"):
                w = PodWorker(self, pod)
                self.workers[uid] = w
                w.deleting.set()
            else:
                w = PodWorker(self, pod)
                self.workers[uid] = w
            w.task = asyncio.create_task(self._worker(w), name=f"pod {w.key}")
            return
        w.pod = pod
        if w.written is not None and \
                _ready_of(pod.get("status") or {}) != _ready_of(w.written):
            # Someone else wrote it (the node lifecycle controller marks the pods of a
            # NotReady node not ready): write ours again, as a kubelet's status manager does.
            w.written = None
        if pod["metadata"].get("deletionTimestamp"):
            w.deleting.set()

    async def _worker(self, w: PodWorker) -> None:
        try:
            await w.run()
        finally:
            if w.deleting.is_set() and self.workers.get(w.uid) is w:
                del self.workers[w.uid]

    def _pods_listed(self, items: list[dict[str, Any]]) -> None:
        seen = set()
        for pod in items:
            seen.add(pod["metadata"]["uid"])
            self._pod_event("ADDED", pod)
        if not self._listed_once:
            self._listed_once = True
            stale, self.records = self.records, {}
            if stale:  # pods deleted while no kubelet ran: their sandboxes go
                self._stale = asyncio.create_task(asyncio.to_thread(
                    self._remove_records, list(stale.keys())), name="stale pods")
        for uid, w in list(self.workers.items()):
            if uid not in seen:
                w.gone = True
                w.deleting.set()

    def _services_listed(self, items: list[dict[str, Any]]) -> None:
        self._services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s
                          for s in items}
        self._service_env()

    def _service_event(self, kind: str, svc: dict[str, Any]) -> None:
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        if kind == "DELETED":
            self._services.pop(key, None)
        else:
            self._services[key] = svc
        self._service_env()

    def _service_env(self) -> None:
        """The variables a pod gets per Service of its namespace (at its start)."""
        env: dict[str, dict[str, str]] = {}
        for (ns, name), s in self._services.items():
            spec = s.get("spec") or {}
            ip, ports = spec.get("clusterIP"), spec.get("ports") or []
            if not ip or ip == "None" or not ports:
                continue
            prefix = name.upper().replace("-", "_")
            env.setdefault(ns, {})[f"{prefix}_SERVICE_HOST"] = str(ip)
            env[ns][f"{prefix}_SERVICE_PORT"] = str(ports[0].get("port"))
        self.service_env = env

    _services: dict[tuple[str, str], dict[str, Any]]

    # -- running --

    async def run(self) -> None:
        """Register, then heartbeat and run the node's pods until cancelled. Cancelled, the
        pods are left running (Kubelet.cleanup removes them)."""
        self._services = {}
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in self.pods_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                self.records[path.stem] = json.loads(path.read_text())
        server: web.AppRunner | None = None
        async with connect(str(self.kubeconfig)) as http:
            self.http = http
            try:
                await self.register()
                self.pod_cidr = await self.wait_pod_cidr()
                self.runtime = await asyncio.to_thread(
                    node_runtime, self.state_dir / "cni", self.pod_cidr, self.netns,
                    self.mtu)
                if self.tls is not None:
                    server = await kubelet_server.serve(self.find_log, self.netns,
                                                        self.address, *self.tls)
                self.registered.set()
                log.info("kubelet running", extra={"node": self.name,
                                                   "podCIDR": self.pod_cidr})
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.heartbeat())
                    tg.create_task(self.watch("/api/v1/services", {}, self._service_event,
                                              self._services_listed))
                    tg.create_task(self.watch(
                        "/api/v1/pods", {"fieldSelector": f"spec.nodeName={self.name}"},
                        self._pod_event, self._pods_listed))
            finally:
                if server is not None:
                    await server.cleanup()
                tasks = [w.task for w in self.workers.values() if w.task is not None]
                if self._stale is not None:
                    tasks.append(self._stale)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.http = None

    def find_log(self, namespace: str, pod: str, container: str
                 ) -> tuple[Path, Callable[[], bool]] | None:
        """A container's log on this node, and whether it still runs (for `follow`)."""
        for w in self.workers.values():
            if w.namespace == namespace and w.name == pod:
                for c in w.containers:
                    if c.name == container or (not container and c is w.containers[0]):
                        def running(c: Container = c) -> bool:
                            return c.process is not None and c.process.poll() is None
                        return w._log(c), running
        return None

    def _remove_records(self, uids: list[str]) -> None:
        left = Kubelet.cleanup(self.state_dir, self.netns, uids=uids)
        if left:
            log.warning("stale pods not removed", extra={"left": left})

    @staticmethod
    def cleanup(state_dir: Path, netns: str, grace: float = 5.0,
                uids: list[str] | None = None) -> list[str]:
        """Remove what the kubelet in `state_dir` started (its pods' processes, their CNI
        interfaces and namespaces; only the pods `uids` if given), whether it runs or not;
        what could not be removed."""
        left = []
        records = []
        for path in sorted((state_dir / "pods").glob("*.json")):
            if uids is not None and path.stem not in uids:
                continue
            with contextlib.suppress(OSError, ValueError):
                records.append((path, json.loads(path.read_text())))
        pids = [int(p) for _, r in records for p in r.get("pids", [])]
        for pid in pids:
            _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                _kill_group(pid, signal.SIGKILL)
        runtime = None
        if (state_dir / "cni" / "net.d").is_dir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                runtime = existing_runtime(state_dir / "cni", netns)
        for path, r in records:
            uid = path.stem
            if runtime is not None:
                with contextlib.suppress(CNIError, OSError, subprocess.SubprocessError):
                    runtime.delete(uid, f"/var/run/netns/{r['netns']}")
            out = subprocess.run(["ip", "netns", "del", r["netns"]], capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0 and "No such file" not in out.stderr:
                left.append(f"{r['netns']}: {out.stderr.strip()}")
            if r.get("etc"):
                shutil.rmtree(r["etc"], ignore_errors=True)
            _remove_mountpoints(r.get("mountpoints") or [])
            if r.get("volumes"):
                shutil.rmtree(r["volumes"], ignore_errors=True)
            path.unlink(missing_ok=True)
        return left


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--netns", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--cgroup", type=Path, help="the cgroup (v2) the pods' processes join")
    parser.add_argument("--dns", help="the cluster DNS server the pods' resolv.conf names")
    parser.add_argument("--mtu", type=int, default=1500, help="the pods' interfaces' MTU")
    parser.add_argument("--tls-cert", type=Path, help="serve `kubectl logs` with this ...")
    parser.add_argument("--tls-key", type=Path, help="... and this key, ...")
    parser.add_argument("--client-ca", type=Path, help="... to clients this CA signed")
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tls = (a.tls_cert, a.tls_key, a.client_ca) if a.tls_cert and a.tls_key and a.client_ca \
        else None
    kubelet = Kubelet(a.name, a.kubeconfig, a.state_dir, netns=a.netns, address=a.address,
                      cgroup=a.cgroup, dns=a.dns, tls=tls, mtu=a.mtu)

    async def run() -> None:
        # SIGTERM: stop as a kubelet stops (its pods keep running; the lab removes them)
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await kubelet.run()

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(run())


if __name__ == "__main__":
    main()
