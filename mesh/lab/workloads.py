"""What the lab runs, from the manifests: pods (of Deployments, and bare Pods) spread over
the nodes, Services with ClusterIPs, and the EndpointSlices Kubernetes' endpoint controller
would write for them.

Images are not pulled: a container's `command` and `args` run as a process inside the pod's
network namespace, with the pod's environment; a container with no command runs the
project's echo backend on its first containerPort (8080 if none).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVICE_CIDR = "10.96.0.0/16"
NODE_PORTS = range(30000, 32768)  # the API server's default --service-node-port-range
DEFAULT_PORT = 8080


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
    command: tuple[str, ...]
    env: Mapping[str, str]
    ports: Mapping[str, int]  # containerPort name (or str(number)) -> number
    owner: str = ""  # the Deployment's name, if any
    probe: Probe | None = None

    @property
    def ready_port(self) -> int | None:
        return next(iter(self.ports.values()), None)


@dataclass
class ServiceSpec:
    namespace: str
    name: str
    selector: Mapping[str, str]
    cluster_ip: str
    ports: list[dict[str, Any]]
    body: dict[str, Any] = field(repr=False, default_factory=dict)
    # NodePort and LoadBalancer Services: "port/protocol" -> nodePort (given or allocated)
    node_ports: dict[str, int] = field(default_factory=dict)


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _pod(namespace: str, name: str, template: Mapping[str, Any], owner: str) -> PodSpec:
    meta = _map(template.get("metadata"))
    spec = _map(template.get("spec"))
    containers = [_map(c) for c in _list(spec.get("containers"))]
    c = containers[0] if containers else {}
    ports = {str(p.get("name") or p.get("containerPort")): int(p["containerPort"])
             for p in map(_map, _list(c.get("ports"))) if isinstance(p.get("containerPort"), int)}
    command = tuple(str(x) for x in [*_list(c.get("command")), *_list(c.get("args"))])
    if not command:
        port = next(iter(ports.values()), DEFAULT_PORT)
        ports = ports or {str(port): port}
        command = (sys.executable, "-m", "mesh.cli", "echo", "--listen", f"0.0.0.0:{port}")
    env = {str(e.get("name")): str(e.get("value", "")) for e in map(_map, _list(c.get("env")))
           if e.get("name") and "valueFrom" not in e}
    labels = {str(k): str(v) for k, v in _map(meta.get("labels")).items()}
    return PodSpec(namespace, name, labels, command, env, ports, owner,
                   _probe(c.get("readinessProbe"), ports))


def pods_of(docs: Iterable[Mapping[str, Any]]) -> list[PodSpec]:
    out = []
    for d in docs:
        kind, meta = d.get("kind"), _map(d.get("metadata"))
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if kind == "Deployment":
            spec = _map(d.get("spec"))
            replicas = spec.get("replicas", 1)
            for i in range(replicas if isinstance(replicas, int) else 1):
                out.append(_pod(ns, f"{name}-{i}", _map(spec.get("template")), name))
        elif kind == "Pod":
            out.append(_pod(ns, name, d, ""))
    return out


def _port_key(p: Mapping[str, Any]) -> str:
    return f"{p.get('port')}/{p.get('protocol') or 'TCP'}"


def services_of(docs: Iterable[Mapping[str, Any]],
                previous: Iterable[ServiceSpec] = ()) -> list[ServiceSpec]:
    """Services with ClusterIPs: `spec.clusterIP` where given (as Kubernetes honours it),
    the one a Service already had (in `previous`), else the next free address of the
    service CIDR, in order. NodePort and LoadBalancer Services get their nodePorts the same
    way, from NODE_PORTS."""
    net = ipaddress.ip_network(SERVICE_CIDR)
    services, taken = [], {str(net.network_address + 1)}  # .1 is the API server's
    docs = [d for d in docs if d.get("kind") == "Service"]
    before = {(s.namespace, s.name): s for s in previous}
    taken.update(s.cluster_ip for s in before.values())
    ports_taken = {n for s in before.values() for n in s.node_ports.values()}
    for d in docs:
        for p in map(_map, _list(_map(d.get("spec")).get("ports"))):
            if isinstance(p.get("nodePort"), int):
                ports_taken.add(p["nodePort"])
    free_ports = (n for n in NODE_PORTS if n not in ports_taken)
    for d in docs:
        ip = _map(d.get("spec")).get("clusterIP")
        if isinstance(ip, str) and ip not in ("", "None"):
            taken.add(ip)
    hosts = (str(h) for h in net.hosts())
    for d in docs:
        meta, spec = _map(d.get("metadata")), _map(d.get("spec"))
        ip = spec.get("clusterIP")
        key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
        old = before.get(key)
        if (not isinstance(ip, str) or ip == "") and old is not None:
            ip = old.cluster_ip
        elif not isinstance(ip, str) or ip == "":
            ip = next(h for h in hosts if h not in taken)
            taken.add(ip)
        ports = [dict(_map(p)) for p in _list(spec.get("ports"))]
        node_ports = {}
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for p in ports:
                given = p.get("nodePort")
                if isinstance(given, int):
                    node_ports[_port_key(p)] = given
                elif old is not None and _port_key(p) in old.node_ports:
                    node_ports[_port_key(p)] = old.node_ports[_port_key(p)]
                else:
                    node_ports[_port_key(p)] = next(free_ports)
        services.append(ServiceSpec(
            str(meta.get("namespace") or "default"), str(meta.get("name")),
            {str(k): str(v) for k, v in _map(spec.get("selector")).items()}, ip,
            ports, dict(d), node_ports))
    return services


def as_served(svc: ServiceSpec) -> dict[str, Any]:
    """The Service as the API server would hold it: its ClusterIP and nodePorts filled."""
    body = dict(svc.body)
    ports = [{**p, "nodePort": svc.node_ports[_port_key(p)]}
             if _port_key(p) in svc.node_ports else p for p in svc.ports]
    body["spec"] = {**_map(body.get("spec")), "clusterIP": svc.cluster_ip, "ports": ports}
    return body


def endpoint_slice(svc: ServiceSpec, pods: Iterable[tuple[PodSpec, str, bool]]
                   ) -> dict[str, Any] | None:
    """The EndpointSlice of a Service with a selector: its pods (spec, IP, ready), ports by
    targetPort (a number, or a containerPort's name)."""
    if not svc.selector:
        return None  # its EndpointSlices are the user's
    selected = [(p, ip, ready) for p, ip, ready in pods if p.namespace == svc.namespace
                and all(p.labels.get(k) == v for k, v in svc.selector.items())]
    ports = []
    for sp in svc.ports:
        target = sp.get("targetPort", sp.get("port"))
        number = target if isinstance(target, int) else next(
            (p.ports[str(target)] for p, _, _ in selected if str(target) in p.ports), None)
        if number is not None:
            ports.append({"name": str(sp.get("name", "")), "port": number,
                          "protocol": str(sp.get("protocol", "TCP"))})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc.name}-lab", "namespace": svc.namespace,
                         "labels": {"kubernetes.io/service-name": svc.name}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "name": p.name,
                                         "namespace": p.namespace}}
                          for p, ip, ready in sorted(selected, key=lambda x: x[0].name)]}


def pod_object(spec: PodSpec, node: str, ip: str, ready: bool) -> dict[str, Any]:
    """The Pod as the API server shows it once the kubelet reported it."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": spec.namespace,
                         "labels": dict(spec.labels)},
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


def service_env(services: Iterable[ServiceSpec], namespace: str) -> dict[str, str]:
    """The variables Kubernetes gives a pod for each Service of its namespace."""
    env = {}
    for s in services:
        if s.namespace != namespace or not s.ports:
            continue
        prefix = s.name.upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = s.cluster_ip
        env[f"{prefix}_SERVICE_PORT"] = str(s.ports[0].get("port"))
    return env
