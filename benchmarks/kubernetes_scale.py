"""HTTPRoutes at scale through a real API server: a lab (its control plane built from
source, two nodes, their agents in Kubernetes mode), N HTTPRoutes over 100 Services and 100
hostnames applied through the API, until every one carries `Programmed: True` at its
generation (written by the leader) and a sample answers through a node's Envoy; then one
route changed, until its traffic is live and its status says the new generation.

    python benchmarks/kubernetes_scale.py [--quick] [--routes N]

Routes are created (POST) CLIENTS requests at a time; the change is a server-side apply.
The clock starts once the Gateway is Programmed and the backends are ready. Prints, last,
one JSON line: routes, applied_s (until the API server took the last route),
all_programmed_s, all_live_s, one_change_live_ms, one_change_status_ms, agent_rss_mib,
apiserver_rss_mib, agent_cpu_s and apiserver_cpu_s (CPU seconds from the first route until
all were Programmed; the agents' summed), quiet_after_s (how long after the last route was
live the agents and the API server fell quiet, when the one change is made), status_writes
(the status writes the API server counted for HTTPRoutes, from its own metrics).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from procstat import cpu_seconds, rss_mib

from mesh.lab import cluster
from mesh.lab.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
LAB = "kscale"
NS = "scale"
SERVICES = 100
CLIENTS = 8  # routes created at once
ECHO = "registry.k8s.io/gateway-api/echo-basic:v1.5.1"


def mesh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mesh.cli", *args], check=True, cwd=ROOT,
                   capture_output=True)


def route(i: int, path: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": f"r{i}", "namespace": NS},
            "spec": {"parentRefs": [{"name": "scale"}],
                     "hostnames": [f"h{i % SERVICES}.scale.example"],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix",
                                                      "value": path or f"/r{i}"}}],
                                "backendRefs": [{"name": f"s{i % SERVICES}", "port": 80}]}]}}


def base() -> list[dict[str, Any]]:
    labels = {"app": "echo"}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "echo", "namespace": NS},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"containers": [{"name": "echo", "image": ECHO,
                                      "ports": [{"containerPort": 3000}]}]}}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "scale", "namespace": NS},
         "spec": {"gatewayClassName": "mesh",
                  "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}]
    docs += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": NS},
              "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 3000}]}}
             for i in range(SERVICES)]
    return docs


def apply(cp: ControlPlane, docs: list[dict[str, Any]]) -> None:
    for i in range(0, len(docs), 500):
        done = cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                          input=yaml.safe_dump_all(docs[i:i + 500]), check=False, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])


def apply_routes(cp: ControlPlane, routes: list[dict[str, Any]], create: bool) -> None:
    """Each route created (POST) or changed (server-side apply), CLIENTS at a time on
    kept-open connections, as a controller or a GitOps tool writes many objects (kubectl
    applies one after the other: 25 s for 1,000 routes here, which would measure kubectl)."""
    local = threading.local()
    base = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"

    def one(r: dict[str, Any]) -> None:
        if not hasattr(local, "conn"):
            local.conn = cp.connection(timeout=120)
        if create:
            code, body = cp.request("POST", base, r, conn=local.conn)
        else:
            code, body = cp.request(
                "PATCH", f"{base}/{r['metadata']['name']}?fieldManager=benchmark&force=true",
                r, conn=local.conn, content_type="application/apply-patch+yaml")
        if code not in (200, 201):
            raise RuntimeError(f"{r['metadata']['name']}: {code} {str(body)[:300]}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, routes))


def programmed(cp: ControlPlane) -> dict[str, int]:
    """Route name -> the generation its status is Programmed True at (0: not)."""
    code, body = cp.request("GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes",
                            timeout=120)
    out = {}
    for r in (body or {}).get("items", []) if code == 200 else []:
        gen = r["metadata"]["generation"]
        ok = any(c.get("type") == "Programmed" and c.get("status") == "True"
                 and c.get("observedGeneration") == gen
                 for p in (r.get("status") or {}).get("parents") or []
                 for c in p.get("conditions") or [])
        out[r["metadata"]["name"]] = gen if ok else 0
    return out


def get(address: str, host: str, path: str) -> int:
    try:
        with socket.create_connection((address, 80), timeout=3) as c:
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                      .encode())
            head = c.recv(64)
        return int(head.split(b" ")[1])
    except (OSError, ValueError, IndexError):
        return 0


def wait_quiet(pids: list[int], limit: float = 60.0) -> float:
    """Wait until these processes use under a fifth of a core together over a second (the
    tail of the bulk load done: the leader's last status round, the controller manager's
    garbage collector taking in the new objects), at most `limit` seconds; the seconds
    waited. One change is measured on a quiet cluster, as it happens in use."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(1.0)
        if sum(cpu_seconds(p) for p in pids) - before < 0.2:
            break
    return time.monotonic() - began


def settled(cp: ControlPlane) -> bool:
    """The Gateway Programmed and the echo Deployment's pods ready: nothing left to do but
    the routes."""
    _, gw = cp.request("GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/"
                              "gateways/scale")
    _, dep = cp.request("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/echo")
    conds = (gw or {}).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Programmed" and c.get("status") == "True" for c in conds) \
        and (dep or {}).get("status", {}).get("readyReplicas") == 2


def status_writes(cp: ControlPlane) -> int:
    """HTTPRoute status writes the API server served, from its /metrics."""
    _, text = cp.request("GET", "/metrics", timeout=60)
    total = 0
    pattern = re.compile(r'^apiserver_request_total\{(.*)\} (\d+)')
    for line in str(text).splitlines():
        m = pattern.match(line)
        if m and 'resource="httproutes"' in m.group(1) and 'subresource="status"' in \
                m.group(1) and re.search(r'verb="(PATCH|PUT|APPLY)"', m.group(1)):
            total += int(m.group(2))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 routes")
    parser.add_argument("--routes", type=int)
    args = parser.parse_args()
    n = args.routes or (1000 if args.quick else 10_000)
    subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", LAB],
                   capture_output=True, cwd=ROOT, check=False)
    mesh("lab", "up", "--nodes", "2", "--name", LAB, "--timeout", "240")
    try:
        state = cluster.read_state(LAB)
        assert state is not None
        cp = ControlPlane(Path(state["control_plane"]))
        cp.port = int(state["server"].rsplit(":", 1)[1])
        apply(cp, base())
        deadline = time.monotonic() + 120
        while not settled(cp):
            if time.monotonic() > deadline:
                raise RuntimeError("the Gateway or the backends never became ready")
            time.sleep(0.5)
        agent_pids = [int(p) for p in state["agents"].values()]
        apiserver = int((Path(state["control_plane"]) / "pids" / "kube-apiserver.pid")
                        .read_text())
        cpu_before = [cpu_seconds(p) for p in agent_pids], cpu_seconds(apiserver)
        writes_before = status_writes(cp)
        began = time.monotonic()
        apply_routes(cp, [route(i) for i in range(n)], create=True)
        applied = time.monotonic() - began
        while sum(1 for g in programmed(cp).values() if g) < n:
            time.sleep(1)
        all_programmed = time.monotonic() - began
        agent_cpu = sum(cpu_seconds(p) for p in agent_pids) - sum(cpu_before[0])
        apiserver_cpu = cpu_seconds(apiserver) - cpu_before[1]
        _, gw = cp.request("GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/"
                                     "gateways/scale")
        address = gw["status"]["addresses"][0]["value"]
        sample = range(0, n, max(1, n // 500))
        pending = set(sample)
        while pending:
            pending = {i for i in pending
                       if get(address, f"h{i % SERVICES}.scale.example", f"/r{i}") != 200}
            if pending:
                time.sleep(0.5)
        all_live = time.monotonic() - began
        quiet = wait_quiet([*agent_pids, apiserver])
        changed = time.monotonic()
        apply_routes(cp, [route(0, "/changed")], create=False)
        live_ms = status_ms = 0.0
        while not (live_ms and status_ms):
            now = time.monotonic()
            if not live_ms and get(address, "h0.scale.example", "/changed") == 200:
                live_ms = (now - changed) * 1000
            if not status_ms and programmed(cp).get("r0") == 2:
                status_ms = (now - changed) * 1000
            time.sleep(0.01)
        agents = [rss_mib(p) for p in agent_pids]
        figures = {"benchmark": "kubernetes_scale", "quick": args.quick, "routes": n,
                   "applied_s": round(applied, 2),
                   "all_programmed_s": round(all_programmed, 2),
                   "all_live_s": round(all_live, 2),
                   "quiet_after_s": round(quiet, 1),
                   "one_change_live_ms": round(live_ms, 1),
                   "one_change_status_ms": round(status_ms, 1),
                   "agent_rss_mib": round(max(agents), 1),
                   "apiserver_rss_mib": round(rss_mib(apiserver), 1),
                   "agent_cpu_s": round(agent_cpu, 1),
                   "apiserver_cpu_s": round(apiserver_cpu, 1),
                   "status_writes": status_writes(cp) - writes_before}
    finally:
        subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", LAB],
                       capture_output=True, cwd=ROOT, check=False)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
