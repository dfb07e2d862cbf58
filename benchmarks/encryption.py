"""What WireGuard between the nodes costs, in two-node labs (real API server, the agents' eBPF
datapath, each node's wireguard-go).

In one run:
- a lab without encryption: single-stream TCP throughput (iperf3) and TCP request/response
  latency (sockperf ping-pong, full round trips, p50) from a client pod on node2 to a server
  pod on node1 (`gbps_plain`, `rr_p50_us_plain`);
- a lab with `--encryption wireguard`: the same pods, the same measures (`gbps_wireguard`,
  `rr_p50_us_wireguard`); then the raw tunnel as the reference: a second wireguard-go device
  in each of the two node namespaces, configured by hand (the same implementation, no pods,
  no eBPF), iperf3 between its two addresses (`gbps_raw_wireguard`;
  `wireguard_over_raw` = gbps_wireguard / gbps_raw_wireguard);
- a key rotation under load: requests (each on a new connection, 5 s timeout) from the client
  to the server while node1's key is rotated; the ones that failed (`rotation_lost_requests`).

    python benchmarks/encryption.py [--quick]

`--quick` measures 3 s instead of 10 (it still brings up two labs: about three minutes). The
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from l4_latency import iperf, sockperf  # the script's directory is on the path

from mesh.encryption import keys
from mesh.encryption.uapi import PeerConfig, Uapi, set_device, set_peer
from mesh.lab import cluster

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = ROOT / ".kube" / "bin" / "kubectl"
RAW_PORT = 51999
RAW_DEVICE = "bench-wg"


def pods(lab: str) -> list[dict[str, Any]]:
    server_cmd = ["sh", "-c", "iperf3 -s >/dev/null 2>&1 & exec sockperf server --tcp -i "
                  "0.0.0.0 -p 11111"]
    return [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "server", "namespace": "default"},
         "spec": {"nodeName": f"{lab}-node1", "containers": [
             {"name": "server", "image": "sockperf", "command": server_cmd}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "client", "namespace": "default"},
         "spec": {"nodeName": f"{lab}-node2", "containers": [
             {"name": "client", "image": "sockperf", "command": ["sleep", "infinity"]}]}},
        # the rotation's echo (each request a line on a new connection)
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "echo", "namespace": "default"},
         "spec": {"nodeName": f"{lab}-node1", "containers": [
             {"name": "echo", "image": "busybox", "command": ["python3", "-c", ECHO]}]}}]


ECHO = r"""
import socket, threading
def serve(c):
    with c:
        while (d := c.recv(4096)):
            c.sendall(d)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5000))
s.listen(512)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

LOAD = r"""
import json, socket, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((host, 5000), timeout=5) as c:
            c.sendall(b"ping\n")
            ok += c.recv(64) == b"ping\n"
    except OSError:
        failed += 1
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failed": failed}))
"""


def mesh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, check=check, cwd=ROOT)


def lab_up(name: str, encryption: str) -> dict[str, Any]:
    mesh("lab", "down", "--name", name, check=False)
    up = mesh("lab", "up", "--nodes", "2", "--name", name, "--encryption", encryption,
              "--timeout", "240", check=False)
    if up.returncode != 0:
        raise SystemExit(f"lab {name} did not come up: {up.stderr[-2000:]}")
    state = cluster.read_state(name)
    assert state is not None
    subprocess.run([str(KUBECTL), "--kubeconfig", state["kubeconfig"], "apply", "-f", "-"],
                   input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods(name)}),
                   text=True, capture_output=True, check=True)
    deadline = time.monotonic() + 120
    while True:
        state = cluster.read_state(name) or {}
        found = {k: p for k, p in state.get("pods", {}).items() if k.startswith("default/")}
        if len(found) == 3 and all(p["ready"] for p in found.values()):
            return state
        if time.monotonic() > deadline:
            raise SystemExit(f"lab {name}: the pods are not ready: {found}")
        time.sleep(1)


def in_client(name: str) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", name, "-n", "default",
            "client", "--"]


def measure(name: str, state: dict[str, Any], seconds: int) -> tuple[float, float]:
    server = state["pods"]["default/server"]["ip"]
    time.sleep(1)
    gbps = iperf(in_client(name), server, seconds)
    p50, _ = sockperf(in_client(name), server, 11111, seconds)
    return gbps, p50


def raw_tunnel(name: str, seconds: int) -> float:
    """iperf3 between two node namespaces over a wireguard-go pair of their own."""
    import asyncio

    nodes = [f"{name}-node1", f"{name}-node2"]
    underlay = {n["name"]: n["underlay"] for n in (cluster.read_state(name) or {})["node_info"]}
    pairs = [keys.generate() for _ in nodes]
    socket_dir = Path(f"/run/mesh/bench-wg-{name}")
    procs = []
    try:
        for node in nodes:
            d = socket_dir / node
            d.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", node, "sh", "-c",
                 'mount --bind "$0" /var/run/wireguard && exec wireguard-go -f "$1"', str(d),
                 RAW_DEVICE], env={"WG_PROCESS_FOREGROUND": "1", "PATH": "/usr/bin:/bin:"
                                   "/usr/sbin:/sbin"}, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(1)
        for i, node in enumerate(nodes):
            other = 1 - i
            uapi = Uapi(socket_dir / node / f"{RAW_DEVICE}.sock")
            asyncio.run(uapi.set([*set_device(pairs[i].private, RAW_PORT), *set_peer(
                PeerConfig(pairs[other].public, f"{underlay[nodes[other]]}:{RAW_PORT}",
                           (f"10.250.0.{other + 1}/32",)))]))
            for args in (["addr", "add", f"10.250.0.{i + 1}/24", "dev", RAW_DEVICE],
                         ["link", "set", RAW_DEVICE, "mtu", "1440", "up"]):
                subprocess.run(["ip", "netns", "exec", node, "ip", *args], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", nodes[0], "iperf3", "-s", "-B",
                                   "10.250.0.1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(1)
        try:
            return iperf(["ip", "netns", "exec", nodes[1]], "10.250.0.1", seconds)
        finally:
            server.terminate()
            server.wait()
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        for node in nodes:
            subprocess.run(["ip", "netns", "exec", node, "ip", "link", "del", RAW_DEVICE],
                           capture_output=True, check=False)
            subprocess.run(["umount", str(socket_dir / node)], capture_output=True,
                           check=False)
        subprocess.run(["rm", "-rf", str(socket_dir)], check=False)


def rotation(name: str, state: dict[str, Any], seconds: float) -> dict[str, int]:
    echo = state["pods"]["default/echo"]["ip"]
    result: dict[str, int] = {}

    def load() -> None:
        out = subprocess.run([*in_client(name), "python3", "-c", LOAD, echo, str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 60)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(seconds / 3)
    mesh("encryption", "rotate-key", "--state-dir",
         str(cluster.lab_dir(name) / f"{name}-node1" / "agent"))
    worker.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 3 if args.quick else 10
    out: dict[str, Any] = {}
    try:
        state = lab_up("encplain", "none")
        out["gbps_plain"], out["rr_p50_us_plain"] = measure("encplain", state, seconds)
        print(f"plain: {out['gbps_plain']:.2f} Gbit/s, p50 {out['rr_p50_us_plain']} us",
              file=sys.stderr)
    finally:
        mesh("lab", "down", "--name", "encplain", check=False)
    try:
        state = lab_up("encwg", "wireguard")
        out["gbps_wireguard"], out["rr_p50_us_wireguard"] = measure("encwg", state, seconds)
        out["gbps_raw_wireguard"] = raw_tunnel("encwg", seconds)
        out["wireguard_over_raw"] = round(out["gbps_wireguard"] / out["gbps_raw_wireguard"], 3)
        load = rotation("encwg", state, 12.0 if not args.quick else 6.0)
        out["rotation_requests"] = load["ok"] + load["failed"]
        out["rotation_lost_requests"] = load["failed"]
    finally:
        mesh("lab", "down", "--name", "encwg", check=False)
    for k in ("gbps_plain", "gbps_wireguard", "gbps_raw_wireguard"):
        out[k] = round(out[k], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
