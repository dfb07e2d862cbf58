"""How the lab's kubelet reads a container: images are not pulled, so a container's
`command` and `args` run as a process inside the pod's network namespace, with the pod's
environment; a container with no command runs what mesh.lab.images has for its image, its
`args` after. Its readinessProbe is read with Kubernetes' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_CIDR = "10.96.0.0/16"  # the lab's Services' ClusterIPs (the API server's range)


@dataclass(frozen=True)
class Probe:
    """A container's readinessProbe (tcpSocket, httpGet or exec), Kubernetes' defaults
    where a field is not given. Without one the lab probes the first containerPort by TCP
    (a pod without ports is ready once its process runs)."""

    kind: str  # tcp | http | exec
    port: int | None = None
    path: str = "/"
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def _probe(raw: Any, ports: Mapping[str, int]) -> Probe | None:
    spec = _map(raw)
    if not spec:
        return None

    def port_of(v: Any) -> int | None:
        if isinstance(v, int):
            return v
        return ports.get(str(v))

    def number(name: str, default: float, minimum: float) -> float:
        v = spec.get(name)
        return float(v) if isinstance(v, int) and v >= minimum else default

    timing: dict[str, Any] = {"initial_delay": number("initialDelaySeconds", 0, 0),
              "period": number("periodSeconds", 10, 1),
              "timeout": number("timeoutSeconds", 1, 1),
              "success_threshold": int(number("successThreshold", 1, 1)),
              "failure_threshold": int(number("failureThreshold", 3, 1))}
    if "httpGet" in spec:
        http = _map(spec["httpGet"])
        path = str(http.get("path") or "/")
        return Probe("http", port_of(http.get("port")), path if path.startswith("/")
                     else "/" + path, **timing)
    if "tcpSocket" in spec:
        return Probe("tcp", port_of(_map(spec["tcpSocket"]).get("port")), **timing)
    if "exec" in spec:
        command = tuple(str(x) for x in _list(_map(spec["exec"]).get("command")))
        return Probe("exec", command=command, **timing)
    return None


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    labels: Mapping[str, str]
    command: tuple[str, ...]  # command and args; () without a command (the image's)
    env: Mapping[str, str]
    ports: Mapping[str, int]  # containerPort name (or str(number)) -> number
    owner: str = ""  # the Deployment's name, if any
    probe: Probe | None = None
    args: tuple[str, ...] = ()  # for an image's own entrypoint (no command)
    # Without a readiness probe the lab's kubelet connects to the first TCP containerPort
    # (a UDP port cannot be connected to: a pod with only those is ready once it runs).
    ready_port: int | None = None


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def container_spec(namespace: str, name: str, template: Mapping[str, Any],
                   owner: str = "") -> PodSpec:
    """The first container of a pod template, as the lab runs it."""
    meta = _map(template.get("metadata"))
    spec = _map(template.get("spec"))
    containers = [_map(c) for c in _list(spec.get("containers"))]
    c = containers[0] if containers else {}
    ports = {str(p.get("name") or p.get("containerPort")): int(p["containerPort"])
             for p in map(_map, _list(c.get("ports"))) if isinstance(p.get("containerPort"), int)}
    args = tuple(str(x) for x in _list(c.get("args")))
    command = tuple(str(x) for x in _list(c.get("command")))
    command = (*command, *args) if command else ()
    env = {str(e.get("name")): str(e.get("value", "")) for e in map(_map, _list(c.get("env")))
           if e.get("name") and "valueFrom" not in e}
    labels = {str(k): str(v) for k, v in _map(meta.get("labels")).items()}
    tcp = [int(p["containerPort"]) for p in map(_map, _list(c.get("ports")))
           if isinstance(p.get("containerPort"), int) and p.get("protocol", "TCP") == "TCP"]
    return PodSpec(namespace, name, labels, command, env, ports, owner,
                   _probe(c.get("readinessProbe"), ports), args, next(iter(tcp), None))
