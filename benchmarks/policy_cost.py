"""What network policy costs, in a two-node lab (real API server, the agents' eBPF datapath).

In one run:
- TCP request/response latency (sockperf ping-pong, full round trips, p50) from a client pod on
  node2 to a server pod on node1, with no policy, then with 1,000 NetworkPolicies over 1,000
  identities loaded (each selects the server and lets one identity in; MeshIdentity objects
  stand for the label sets of 1,000 workloads elsewhere; one more lets the client in);
- the time from a policy change (the API server's write) to its enforcement on the node that
  enforces it, seen by the client connecting every millisecond: an ingress change (the
  server's node) and an egress change (the client's node), each way, repeated;
- the memory of the policy map with those policies (the kernel's own accounting of the map:
  `memlock` in its fdinfo).

    python benchmarks/policy_cost.py [--quick]

- HTTP request latency (wrk, paced, p50) from the client to an HTTP server pod through one
  Envoy: the GAMMA redirect (an HTTPRoute on its Service: the client's node Envoy), then a
  MeshNetworkPolicy HTTP rule (the server's node Envoy checks every request), side by side.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from l4_latency import sockperf  # the script's directory is on the path, as for procstat
from l7_latency import SERVER as HTTP_SERVER
from l7_latency import wrk

from mesh.lab import cluster

ROOT = Path(__file__).resolve().parent.parent

LAB = "polcost"
POLICIES = 1000
SERVER = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "server", "namespace": "default", "labels": {"app": "rr"}},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node1"},
             "containers": [{"name": "server", "image": "sockperf",
                             "command": ["sockperf", "server", "--tcp", "-i", "0.0.0.0",
                                         "-p", "11111"],
                             "ports": [{"name": "rr", "containerPort": 11111}]}]}}
CLIENT = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "client", "namespace": "default", "labels": {"app": "client"}},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node2"},
             "containers": [{"name": "client", "image": "sockperf",
                             "command": ["sleep", "infinity"]}]}}


WEB = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node1"},
             "containers": [{"name": "http", "image": "python",
                             "command": [sys.executable, "-c", HTTP_SERVER],
                             "ports": [{"name": "http", "containerPort": 8080}]}]}}
# The Service a GAMMA route sends through the client's node Envoy (the redirect).
ROUTED = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "routed", "namespace": "default"},
     "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                                      "targetPort": "http"}]}},
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
     "metadata": {"name": "routed", "namespace": "default"},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "routed", "port": 80}],
              "rules": [{"backendRefs": [{"name": "routed", "port": 80}]}]}}]
# An L7 rule on the web pod: the client's requests go through the web node's Envoy.
L7_RULE = {
    "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNetworkPolicy",
    "metadata": {"name": "web-get", "namespace": "default"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
             "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                          "toPorts": [{"port": 8080, "http": [{"method": "GET",
                                                               "path": "/.*"}]}]}]}}


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def ingress_policy(allowed_app: str) -> dict[str, Any]:
    return policy("client-in", {"podSelector": {"matchLabels": {"app": "rr"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": allowed_app}}}],
         "ports": [{"port": 11111}]}]})


def egress_policy(allowed_app: str) -> dict[str, Any]:
    return policy("client-out", {"podSelector": {"matchLabels": {"app": "client"}},
                                 "policyTypes": ["Egress"], "egress": [
        {"to": [{"podSelector": {"matchLabels": {"app": allowed_app}}}],
         "ports": [{"port": 11111}]},
        {"to": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8080}]}]})


def bulk() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(POLICIES):
        out.append({"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshIdentity",
                    "metadata": {"name": str(30000 + i)},
                    "spec": {"labels": {"io.kubernetes.pod.namespace": "default",
                                        "bench": str(i),
                                        "ns:kubernetes.io/metadata.name": "default"}}})
        out.append(policy(f"bulk-{i}", {
            "podSelector": {"matchLabels": {"app": "rr"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"bench": str(i)}}}],
                         "ports": [{"port": 11111}]}]}))
    return out


def mesh(*args: str, timeout: float = 300) -> str:
    r = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"mesh {' '.join(args)}: {r.stderr.strip()[-2000:]}")
    return r.stdout


def kubectl_apply(state: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    subprocess.run([str(ROOT / ".kube/bin/kubectl"), "--kubeconfig", state["kubeconfig"],
                    "apply", "--server-side", "-f", "-"], check=True, capture_output=True,
                   text=True, input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                "items": objects}), timeout=600)


def map_memlock_kib(pin: Path) -> float:
    """The kernel's accounting of a pinned map's memory (fdinfo `memlock`), in KiB."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = ctypes.create_string_buffer(str(pin).encode())

    class ObjGet(ctypes.Structure):
        _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                    ("file_flags", ctypes.c_uint32)]

    attr = ObjGet(pathname=ctypes.addressof(path))
    fd = libc.syscall(321, 7, ctypes.byref(attr), ctypes.sizeof(attr))  # bpf(BPF_OBJ_GET)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"cannot open {pin}")
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                return int(line.split()[1]) / 1024
    finally:
        os.close(fd)
    raise RuntimeError(f"no memlock in the fdinfo of {pin}")


# In the client pod: connect to the server every millisecond (20 ms timeout), print each
# change of outcome with the wall clock time.
PROBER = """
import socket, sys, time
last = None
while True:
    try:
        with socket.create_connection((sys.argv[1], 11111), timeout=0.02):
            ok = True
    except OSError:
        ok = False
    if ok != last:
        print(f"{time.time():.6f} {int(ok)}", flush=True)
        last = ok
    time.sleep(0.001)
"""


class Prober:
    def __init__(self, server_ip: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", LAB, "client", "--",
             sys.executable, "-c", PROBER, server_ip], stdout=subprocess.PIPE, text=True,
            cwd=ROOT)
        self.changes: list[tuple[float, bool]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, ok = line.split()
            with self.cond:
                self.changes.append((float(t), ok == "1"))
                self.cond.notify_all()

    def wait_for(self, ok: bool, after: float, timeout: float = 20) -> float:
        """The first time at or after `after` the outcome became `ok`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, state in self.changes:
                    if state == ok and t >= after:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the client never saw {'success' if ok else 'denial'}")
                self.cond.wait(left)

    def current(self) -> bool | None:
        with self.cond:
            return self.changes[-1][1] if self.changes else None

    def stop(self) -> None:
        self.proc.kill()


async def _replace(kubeconfig: str, obj: dict[str, Any]) -> float:
    """Replace a NetworkPolicy; the wall clock time just before the write (the client's
    connection and the read of the current version come before it)."""
    from mesh.kube.client import connect

    async with connect(kubeconfig) as http:
        path = f"/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/" \
               f"{obj['metadata']['name']}"
        code, current = await http.call("GET", path)
        body = dict(obj)
        body["metadata"] = {**obj["metadata"],
                            "resourceVersion": current["metadata"]["resourceVersion"]}
        t0 = time.time()
        code, answer = await http.call("PUT", path, body)
        if code != 200:
            raise RuntimeError(f"PUT {path}: {code} {answer}")
        return t0


def change_latency(state: dict[str, Any], prober: Prober, obj: dict[str, Any],
                   allowed_after: bool) -> float:
    """Milliseconds from just before the API write to the client seeing its effect."""
    t0 = asyncio.run(_replace(state["kubeconfig"], obj))
    seen = prober.wait_for(allowed_after, t0)
    time.sleep(0.3)  # settle before the next change
    return (seen - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 5 if args.quick else 15
    repeats = 3 if args.quick else 10
    if cluster.read_state(LAB) is not None:
        mesh("lab", "down", "--name", LAB)
    mesh("lab", "up", "--nodes", "2", "--name", LAB, "--timeout", "240")
    figures: dict[str, Any] = {}
    prober: Prober | None = None
    try:
        state = cluster.read_state(LAB)
        assert state is not None
        kubectl_apply(state, [SERVER, CLIENT, WEB, *ROUTED])
        deadline = time.monotonic() + 120
        while True:
            state = cluster.read_state(LAB)
            assert state is not None
            pods = state.get("pods", {})
            if all(pods.get(f"default/{p}", {}).get("ready") or
                   pods.get(f"default/{p}", {}).get("phase") == "Running"
                   for p in ("server", "client", "web")) and pods["default/server"].get("ip"):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark's pods did not start")
            time.sleep(1)
        server_ip = pods["default/server"]["ip"]
        prefix = [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", LAB, "client", "--"]
        time.sleep(2)
        figures["rr_p50_us_no_policy"], _ = sockperf(prefix, server_ip, 11111, seconds)

        # HTTP through one Envoy: the GAMMA redirect (the client's node), then an L7 policy
        # rule (the web pod's node), side by side.
        web_ip = pods["default/web"]["ip"]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            redirect = wrk(LAB, "http://routed.default.svc.cluster.local/", seconds, work)
            kubectl_apply(state, [L7_RULE])
            time.sleep(3)
            l7 = wrk(LAB, f"http://{web_ip}:8080/", seconds, work)
        figures["http_p50_us_redirect"] = redirect["p50"]
        figures["http_p50_us_l7_policy"] = l7["p50"]
        figures["l7_policy_ratio"] = round(l7["p50"] / redirect["p50"], 3)

        node1 = Path(f"/run/mesh/lab/{LAB}/{LAB}-node1/agent")
        began = time.monotonic()
        kubectl_apply(state, [*bulk(), ingress_policy("client"), egress_policy("rr")])
        while True:  # until the server's node holds every entry
            found = json.loads(mesh("policy", "status", "--state-dir", str(node1), "-o", "json"))
            entries = found["endpoints"].get(server_ip, {}).get("entries", 0)
            if entries >= POLICIES + 1:
                break
            if time.monotonic() - began > 300:
                raise SystemExit(f"the server's node holds {entries} entries after 300 s")
            time.sleep(1)
        figures["policies_loaded_s"] = round(time.monotonic() - began, 1)
        figures["policy_entries"] = found["policy_entries"]
        figures["rr_p50_us_1000_policies"], _ = sockperf(prefix, server_ip, 11111, seconds)
        figures["l4_policy_ratio"] = round(
            figures["rr_p50_us_1000_policies"] / figures["rr_p50_us_no_policy"], 3)
        figures["policy_map_kib"] = round(map_memlock_kib(node1 / "bpffs" / "mesh_policy"), 1)
        figures["ipcache_map_kib"] = round(map_memlock_kib(node1 / "bpffs" / "mesh_ipcache"),
                                           1)

        prober = Prober(server_ip)
        prober.wait_for(True, 0)
        ingress, egress = [], []
        for _ in range(repeats):
            ingress.append(change_latency(state, prober, ingress_policy("nobody"), False))
            ingress.append(change_latency(state, prober, ingress_policy("client"), True))
            egress.append(change_latency(state, prober, egress_policy("nobody"), False))
            egress.append(change_latency(state, prober, egress_policy("rr"), True))
        every = ingress + egress
        figures["policy_update_ms"] = round(statistics.median(every), 1)
        figures["policy_update_ms_max"] = round(max(every), 1)
        figures["policy_update_ms_ingress"] = round(statistics.median(ingress), 1)
        figures["policy_update_ms_egress"] = round(statistics.median(egress), 1)
    finally:
        if prober is not None:
            prober.stop()
        mesh("lab", "down", "--name", LAB)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
