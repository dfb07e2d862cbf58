"""Backend "pods" for the conformance suite: one echo process per replica, each on its own
loopback address, and the EndpointSlices that point Services at them."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ECHO_PORTS = (3000, 3001)  # HTTP/1.1, h2c (the echo-basic image's ports)
TLS_PORT = 8443


@dataclass
class Pod:
    name: str
    namespace: str
    app_labels: dict[str, str]
    ip: str
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Backends:
    """Starts and stops the pods of Deployments; writes EndpointSlices for Services."""

    pool: str = "127.1.0.0/16"
    log_dir: str = "/tmp"
    # (namespace, secret name) -> (certificate PEM, key PEM), for pods that serve TLS.
    secrets: dict[tuple[str, str], tuple[bytes, bytes]] = field(default_factory=dict)
    # (namespace, ConfigMap name) -> ca.crt, for pods that check client certificates.
    config_maps: dict[tuple[str, str], bytes] = field(default_factory=dict)
    pods: dict[tuple[str, str], list[Pod]] = field(default_factory=dict)
    _next: int = 0

    def _address(self) -> str:
        self._next += 1
        return str(ipaddress.ip_network(self.pool)[self._next])

    def start(self, deployments: Iterable[dict[str, Any]]) -> None:
        started = []
        for d in deployments:
            meta = d.get("metadata", {})
            ns, name = meta.get("namespace", "default"), meta["name"]
            if (ns, name) in self.pods:
                continue
            spec = d.get("spec", {})
            labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
            pod_spec = spec.get("template", {}).get("spec", {})
            env = {e["name"]: e.get("value", "") for c in pod_spec.get("containers", [])
                   for e in c.get("env", []) if "value" in e}
            # A pod that gets TLS_SERVER_CERT serves TLS with the Secret its volume mounts.
            tls_secret = next((v["secret"]["secretName"] for v in pod_spec.get("volumes", [])
                               if "secret" in v), None)
            if "TLS_SERVER_CERT" in env and (ns, tls_secret) in self.secrets:
                env["_TLS_SECRET"] = tls_secret or ""
            client_ca = next((v["configMap"]["name"] for v in pod_spec.get("volumes", [])
                              if "configMap" in v), None)
            if "TLS_CLIENT_CACERTS" in env and (ns, client_ca) in self.config_maps:
                env["_CLIENT_CA"] = client_ca or ""
            pods = []
            for i in range(int(spec.get("replicas", 1))):
                h = hashlib.sha256(f"{ns}/{name}/{i}".encode()).hexdigest()
                pod = Pod(f"{name}-{h[:10]}-{h[10:15]}", ns, dict(labels), self._address())
                pod.process = self._spawn(pod, env)
                pods.append(pod)
                started.append(pod)
            self.pods[(ns, name)] = pods
        self._wait_listening(started)

    def _spawn(self, pod: Pod, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.log_dir, f"{pod.name}.log"), "wb")
        cmd = [sys.executable, "-m", "mesh.cli", "--log-level", "debug", "echo"]
        if env.get("GRPC_ECHO_SERVER"):
            cmd += ["--grpc", "--listen", f"{pod.ip}:{ECHO_PORTS[0]}"]
        else:
            for port in ECHO_PORTS:
                cmd += ["--listen", f"{pod.ip}:{port}"]
        if env.get("_TLS_SECRET"):
            cert, key = self.secrets[(pod.namespace, env["_TLS_SECRET"])]
            base = os.path.join(self.log_dir, pod.name)
            for suffix, data in ((".crt", cert), (".key", key)):
                fd = os.open(base + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            cmd += ["--tls-listen", f"{pod.ip}:{TLS_PORT}", "--cert", base + ".crt",
                    "--key", base + ".key"]
            if env.get("_CLIENT_CA"):
                with open(base + ".ca", "wb") as f:
                    f.write(self.config_maps[(pod.namespace, env["_CLIENT_CA"])])
                cmd += ["--client-ca", base + ".ca"]
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "POD_NAME": pod.name, "NAMESPACE": pod.namespace})

    def _wait_listening(self, pods: list[Pod], timeout: float = 60) -> None:
        import socket

        deadline = time.monotonic() + timeout
        for pod in pods:
            while True:
                try:
                    socket.create_connection((pod.ip, ECHO_PORTS[0]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"echo pod {pod.name} did not start") from None
                    time.sleep(0.05)

    def endpoint_slices(self, services: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """An EndpointSlice for each Service whose selector picks some of our pods."""
        out = []
        for svc in services:
            meta = svc.get("metadata", {})
            ns, name = meta.get("namespace", "default"), meta["name"]
            selector = svc.get("spec", {}).get("selector") or {}
            if not selector:
                continue
            pods = [p for (pns, _), ps in self.pods.items() if pns == ns for p in ps
                    if all(p.app_labels.get(k) == v for k, v in selector.items())]
            ports = []
            for p in svc.get("spec", {}).get("ports", []):
                target = p.get("targetPort", p["port"])
                if isinstance(target, str):
                    continue  # named container ports: the echo pods have none
                entry = {"name": p.get("name", ""), "port": target,
                         "protocol": p.get("protocol", "TCP")}
                if "appProtocol" in p:
                    entry["appProtocol"] = p["appProtocol"]
                ports.append(entry)
            out.append({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-conformance", "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": [{"addresses": [p.ip], "conditions": {"ready": True},
                               "targetRef": {"kind": "Pod", "name": p.name, "namespace": ns}}
                              for p in pods],
            })
        return out

    def pod_logs(self, namespace: str, deployment: str) -> str:
        text = []
        for pod in self.pods.get((namespace, deployment), []):
            path = os.path.join(self.log_dir, f"{pod.name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text.append(f.read())
        return "\n".join(text)

    def stop(self) -> None:
        for pods in self.pods.values():
            for p in pods:
                if p.process is not None and p.process.poll() is None:
                    p.process.terminate()
        for pods in self.pods.values():
            for p in pods:
                if p.process is not None:
                    try:
                        p.process.wait(5)
                    except subprocess.TimeoutExpired:
                        p.process.kill()
        self.pods.clear()
