"""What rate limits cost a request, and the rate limit service alone under load.

In one run: one agent and its Envoy (`mesh run --ratelimit-redis`, a real redis-server) with
three routes to the same minimal backend: no limit, a local limit and a global limit, the
limits high enough never to refuse. Sequential keep-alive requests, the three routes in
interleaved rounds (the machine's noise falls on all three alike); p50 and p99 of each.
Then the rate limit service alone (benchmarks/rls_load.py): decisions per second with the
service on one core, p99 decision latency, and admitted - limit under concurrency.

    python benchmarks/policy_overhead.py [--quick]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from l7_latency import SERVER
from rls_load import free_port, start_redis, wait
from rls_load import run as rls_run

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "127.5.9.1"
PORT = 8080
VARIANTS = ("none", "local", "global")


def manifests(backend_port: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
         "metadata": {"name": "mesh"}, "spec": {"controllerName": "mesh.dev/gateway-controller"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "gw", "namespace": "default"},
         "spec": {"gatewayClassName": "mesh",
                  "addresses": [{"type": "IPAddress", "value": ADDRESS}],
                  "listeners": [{"name": "http", "port": PORT, "protocol": "HTTP"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "app", "namespace": "default"},
         "spec": {"ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "app-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "app"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": backend_port}],
         "endpoints": [{"addresses": ["127.0.0.1"]}]},
    ]
    for v in VARIANTS:
        docs.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                     "metadata": {"name": v, "namespace": "default"},
                     "spec": {"parentRefs": [{"name": "gw"}], "hostnames": [f"{v}.bench"],
                              "rules": [{"backendRefs": [{"name": "app", "port": 80}]}]}})
    never = {"limit": {"requests": 1_000_000, "unit": "Second"}}
    for v, spec in (("local", {"local": {"rules": [never]}}),
                    ("global", {"global": {"rules": [never]}})):
        docs.append({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
                     "metadata": {"name": v, "namespace": "default"},
                     "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io",
                                              "kind": "HTTPRoute", "name": v}],
                              "rateLimit": spec}})
    return docs


def percentile(values: list[int], p: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def limited(host: str) -> bool:
    conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=2)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200 and (host == "none.bench" or
                                       resp.getheader("x-ratelimit-limit") is not None)
    finally:
        conn.close()


class RawClient:
    """One keep-alive connection, a fixed request, the answer read by its content-length:
    Python's http.client parses every header, which would charge the limited routes' extra
    x-ratelimit-* headers to them."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_connection((ADDRESS, PORT))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def get(self) -> bytes:
        self.sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        at = head.lower().find(b"content-length:")
        length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else 0
        while len(body) < length:
            body += self.sock.recv(65536)
        return head[:12]

    def close(self) -> None:
        self.sock.close()


def measure(rounds: int, per_round: int) -> dict[str, list[int]]:
    clients = {v: RawClient(f"{v}.bench") for v in VARIANTS}
    out: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            client, samples = clients[v], out[v]
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                status = client.get()
                samples.append((time.perf_counter_ns() - t0) // 1000)
                if status != b"HTTP/1.1 200":
                    raise RuntimeError(f"{v}: {status!r} (a limit refused?)")
    for c in clients.values():
        c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_port = free_port()
        procs.append(start_redis(redis_port, str(work)))
        backend_port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-c", SERVER.replace("8080", str(backend_port))]))
        (work / "manifests").mkdir()
        (work / "manifests" / "all.yaml").write_text(yaml.safe_dump_all(manifests(backend_port)))
        log = (work / "agent.log").open("wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "run", "--manifests", str(work / "manifests"),
             "--state-dir", str(work / "state"), "--node-id", "bench",
             "--ratelimit-redis", f"redis://127.0.0.1:{redis_port}"],
            stderr=log, cwd=ROOT))
        for v in VARIANTS:
            wait(partial(limited, f"{v}.bench"), f"route {v}", timeout=60)
        measure(2, 200)  # warm up: connections, the service's Redis pool
        rounds, per_round = (10, 200) if args.quick else (40, 500)
        lat = measure(rounds, per_round)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    figures: dict[str, Any] = {}
    for v in VARIANTS:
        figures[f"p50_us_{v}"] = percentile(lat[v], 0.5)
        figures[f"p99_us_{v}"] = percentile(lat[v], 0.99)
    figures["local_ratio_p50"] = round(figures["p50_us_local"] / figures["p50_us_none"], 3)
    figures["global_added_p50_us"] = figures["p50_us_global"] - figures["p50_us_none"]
    figures["requests_per_variant"] = len(lat["none"])
    figures.update(rls_run(args.quick))
    figures["cpus"] = os.cpu_count()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
