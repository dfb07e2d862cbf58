"""Manifest builders the end-to-end tests share: the objects a user would `kubectl apply`,
as dicts, and `docs()` to write them as one multi-document YAML file.

Only the shapes several tests use live here; a test that needs an odd object (an invalid
port, a Deployment) builds it itself, next to the assertion that explains why.
"""

from __future__ import annotations

from typing import Any

import yaml

GATEWAY_API = "gateway.networking.k8s.io/v1"
CONTROLLER = "mesh.dev/gateway-controller"


def docs(*items: dict[str, Any]) -> str:
    """The objects as one YAML stream, as `kubectl apply -f` reads it."""
    return yaml.safe_dump_all(items)


def gateway_class(name: str = "mesh") -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "GatewayClass", "metadata": {"name": name},
            "spec": {"controllerName": CONTROLLER}}


def listener(name: str, port: int, protocol: str = "HTTP", **fields: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": protocol, **fields}


def gateway(address: str | None, *listeners: dict[str, Any], name: str = "gw",
            namespace: str = "default", labels: dict[str, str] | None = None,
            **spec: Any) -> dict[str, Any]:
    """A Gateway of the class `mesh`; one HTTP listener on 8080 unless listeners are given."""
    body: dict[str, Any] = {"gatewayClassName": "mesh", **spec,
                            "listeners": list(listeners) or [listener("http", 8080)]}
    if address is not None:
        body["addresses"] = [{"type": "IPAddress", "value": address}]
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": GATEWAY_API, "kind": "Gateway", "metadata": meta, "spec": body}


def gateway_with_class(address: str | None, *listeners: dict[str, Any], **kw: Any) -> str:
    """The GatewayClass and one Gateway, as YAML: what most agent tests start from."""
    return docs(gateway_class(), gateway(address, *listeners, **kw))


def local_service(name: str, ports: list[int], namespace: str = "default",
                  target_port: int | str | None = None) -> list[dict[str, Any]]:
    """A Service on port 80 whose endpoints are loopback ports of this host (an echo server
    each), one EndpointSlice per port."""
    port: dict[str, Any] = {"name": "http", "port": 80}
    if target_port is not None:
        port["targetPort"] = target_port
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace}, "spec": {"ports": [port]}},
        *({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": f"{name}-{i + 1}", "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": p}],
           "endpoints": [{"addresses": ["127.0.0.1"]}]} for i, p in enumerate(ports))]


def http_route(name: str, hostnames: list[str], backend: str = "echo",
               namespace: str = "default", parent: str = "gw",
               matches: list[dict[str, Any]] | None = None,
               rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An HTTPRoute on the Gateway `parent`: one rule to `backend`:80 unless rules are given."""
    rule: dict[str, Any] = {
        "matches": matches or [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [{"name": backend, "port": 80}]}
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [{"name": parent}], "hostnames": hostnames,
                     "rules": rules or [rule]}}


def ingress(name: str, host: str, service: str, annotations: dict[str, str] | None = None,
            namespace: str = "default", created: str = "2026-01-01T00:00:00Z"
            ) -> dict[str, Any]:
    """An Ingress of the class `mesh`: one Prefix path `/` on `host` to `service`:80."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": annotations or {}, "creationTimestamp": created},
            "spec": {"ingressClassName": "mesh", "rules": [{"host": host, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {
                    "service": {"name": service, "port": {"number": 80}}}}]}}]}}
