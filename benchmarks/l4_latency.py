"""L4 between pods on two nodes: the lab's eBPF datapath against plain kernel routing.

In one run: a lab (two nodes, agents, Envoys, the eBPF service datapath on the pods' cgroup)
with a server pod on node2 and a client pod on node1; and the same wiring (two node
namespaces on an underlay bridge, pods wired by the same CNI plugin) with none of our
programs. TCP request/response latency with sockperf (ping-pong, full round trips, p50 and
p99), single-stream throughput with iperf3, pod to pod in both, and through a ClusterIP in
the lab (`rr_p50_us_service`).

    python benchmarks/l4_latency.py [--quick]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mesh.cni.runtime import node_runtime
from mesh.lab import cluster, network

ROOT = Path(__file__).resolve().parent.parent
SERVER_CMD = ["sh", "-c", "iperf3 -s >/dev/null 2>&1 & exec sockperf server --tcp -i 0.0.0.0 "
              "-p 11111"]
LAB = "l4bench"
# The server on node1, the client on node2 (nodeSelector: the scheduler places them).
MANIFEST = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "server", "namespace": "default",
                                                   "labels": {"app": "rr"}},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node1"},
             "containers": [{"name": "server", "image": "sockperf", "command": SERVER_CMD,
                             "ports": [{"name": "rr", "containerPort": 11111}]}]},
}
CLIENT = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client",
                                                          "namespace": "default"},
          "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node2"},
                   "containers": [{"name": "client", "image": "sockperf",
                                   "command": ["sleep", "infinity"]}]}}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rr", "namespace":
                                                               "default"},
           "spec": {"clusterIP": "10.96.9.9", "selector": {"app": "rr"},
                    "ports": [{"name": "rr", "port": 80, "targetPort": "rr"}]}}


def sockperf(prefix: list[str], address: str, port: int, seconds: int) -> tuple[float, float]:
    run = subprocess.run([*prefix, "sockperf", "ping-pong", "--tcp", "--full-rtt", "-i",
                          address, "-p", str(port), "-t", str(seconds)],
                         capture_output=True, text=True, check=False)
    p50 = re.search(r"percentile 50\.000 =\s+([\d.]+)", run.stdout)
    p99 = re.search(r"percentile 99\.000 =\s+([\d.]+)", run.stdout)
    if p50 is None or p99 is None:
        raise RuntimeError(f"sockperf to {address}:{port} gave no percentiles:\n"
                           f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return float(p50.group(1)), float(p99.group(1))


def iperf(prefix: list[str], address: str, seconds: int) -> float:
    out = subprocess.run([*prefix, "iperf3", "-c", address, "-t", str(seconds), "-J"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def mesh(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout


def ebpf(seconds: int) -> dict[str, float]:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="mesh-l4-"))
    (work / "rr.yaml").write_text(yaml.safe_dump_all([MANIFEST, CLIENT, SERVICE]))
    name = LAB
    subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", name],
                   capture_output=True, cwd=ROOT, check=False)
    mesh("lab", "up", "--nodes", "2", "--name", name, "--manifests", str(work))
    try:
        state = cluster.read_state(name)
        assert state is not None
        pods = state["pods"]
        assert pods["default/server"]["node"] != pods["default/client"]["node"]
        server = pods["default/server"]["ip"]
        prefix = [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", name, "client",
                  "--"]
        p50, p99 = sockperf(prefix, server, 11111, seconds)
        s50, _ = sockperf(prefix, "10.96.9.9", 80, seconds)
        gbps = iperf(prefix, server, seconds)
        return {"rr_p50_us_ebpf": p50, "rr_p99_us_ebpf": p99, "rr_p50_us_service": s50,
                "gbps_ebpf": gbps}
    finally:
        mesh("lab", "down", "--name", name)


def kernel(seconds: int) -> dict[str, float]:
    """The same wiring, none of our programs: two nodes on a bridge, a pod on each."""
    name = "l4kern"
    nodes = network.plan(name, 2, lab_index=9)
    work = Path(tempfile.mkdtemp(prefix="mesh-l4k-"))
    pods = []
    server_proc = None
    try:
        network.build(name, nodes, 9)
        ips = []
        for n, pod in zip(nodes, ("server", "client"), strict=True):
            rt = node_runtime(work / n.name, n.pod_cidr, n.name)  # as the lab's nodes
            ns = f"{name}-{pod}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            pods.append(ns)
            ips.append(rt.add(pod, f"/var/run/netns/{ns}")["ips"][0]["address"].split("/")[0])
        server_proc = subprocess.Popen(["ip", "netns", "exec", pods[0], *SERVER_CMD],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        time.sleep(1)
        prefix = ["ip", "netns", "exec", pods[1]]
        p50, p99 = sockperf(prefix, ips[0], 11111, seconds)
        gbps = iperf(prefix, ips[0], seconds)
        return {"rr_p50_us_kernel": p50, "rr_p99_us_kernel": p99, "gbps_kernel": gbps}
    finally:
        if server_proc is not None:
            os.killpg(server_proc.pid, signal.SIGKILL)  # sockperf and iperf3 both
            server_proc.wait()

        for ns in pods:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        network.teardown(name, [n.name for n in nodes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter samples (under 60 s)")
    args = parser.parse_args()
    seconds = 3 if args.quick else 10
    figures: dict[str, Any] = {"benchmark": "l4_latency", "quick": args.quick,
                               "seconds_per_sample": seconds}
    figures.update(kernel(seconds))
    figures.update(ebpf(seconds))
    figures["ratio_p50"] = round(figures["rr_p50_us_ebpf"] / figures["rr_p50_us_kernel"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
