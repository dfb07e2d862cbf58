"""Generated Gateway API manifests for the scale benchmarks."""

from __future__ import annotations

from typing import Any

NAMESPACE = "bench"
HOSTS = 100
SERVICES = 100


def base(gateway_port: int, backend_port: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "bench"}, "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "bench", "namespace": NAMESPACE},
         "spec": {"gatewayClassName": "bench", "listeners": [
             {"name": "http", "port": gateway_port, "protocol": "HTTP"}]}},
    ]
    for s in range(SERVICES):
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": f"svc{s}", "namespace": NAMESPACE},
                     "spec": {"ports": [{"name": "http", "port": 80,
                                         "targetPort": backend_port}]}})
        docs.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": f"svc{s}-1", "namespace": NAMESPACE,
                                  "labels": {"kubernetes.io/service-name": f"svc{s}"}},
                     "addressType": "IPv4",
                     "ports": [{"name": "http", "port": backend_port}],
                     "endpoints": [{"addresses": ["127.0.0.1"]}]})
    return docs


def route(i: int, marker: str = "") -> dict[str, Any]:
    """Route i: host h{i % HOSTS}, path /r{i // HOSTS}/, Service svc{i % SERVICES}."""
    rule: dict[str, Any] = {
        "matches": [{"path": {"type": "PathPrefix", "value": f"/r{i // HOSTS}/"}}],
        "backendRefs": [{"name": f"svc{i % SERVICES}", "port": 80}],
    }
    if marker:
        rule["filters"] = [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {
            "set": [{"name": "x-bench", "value": marker}]}}]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": f"r{i}", "namespace": NAMESPACE},
            "spec": {"parentRefs": [{"name": "bench"}],
                     "hostnames": [f"h{i % HOSTS}.example.com"], "rules": [rule]}}


def host_and_path(i: int) -> tuple[str, str]:
    return f"h{i % HOSTS}.example.com", f"/r{i // HOSTS}/x"
