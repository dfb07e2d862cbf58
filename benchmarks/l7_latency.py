"""What one node Envoy buys: HTTP latency pod to pod across nodes, at a fixed rate.

In one run, in one lab (two nodes; an echo server pod on node1, a client pod on node2):
- `direct`: to a Service with no route: the eBPF socket load balancer, no Envoy;
- `node_envoy`: to a Service with one HTTPRoute (GAMMA): the datapath hands the connection
  to node2's Envoy, which routes it to the server on node1;
- `two_envoys`: the sidecar model: an Envoy in the client pod and one in the server pod (the
  same HTTP filters as the node Envoy's, one route each), the client calling its own.
wrk (Debian's; no wrk2 or fortio there) drives 4 keep-alive connections, each paced by
wrk's `delay()` at 4 ms between requests (about 950 requests/s in all: a fixed rate, not a
saturating one), and reports p50 and p99 from its histogram.

Memory: the RSS of node2's Envoy with the lab's 20 routed Services, against the summed RSS
of 20 sidecar Envoys (one route each), all on Envoy's default concurrency.

A second lab, the same but built for the other redirect (`--redirect tproxy`: a mark at tc,
netfilter's TPROXY delivering to Envoy), runs beside the first for `node_envoy_tproxy`. The
modes are measured in interleaved rounds (medians over the rounds).

    python benchmarks/l7_latency.py [--quick]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from mesh.envoy.supervisor import envoy_binary
from mesh.lab import cluster
from mesh.sinks.envoy import httpfilters, listeners

ROOT = Path(__file__).resolve().parent.parent
LAB = "l7bench"
LAB_TPROXY = "l7tproxy"  # the same, its datapath built for the TPROXY redirect
ROUTED = 20  # Services with an HTTPRoute: the node Envoy's share of 20 pods' config
GAP_MS = 4
# The application: a minimal keep-alive HTTP/1.1 server (asyncio, a fixed small answer), so
# that what the figures show is the path, not a slow backend.
SERVER = """
import asyncio
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nContent-Type: text/plain\\r\\n\\r\\nok"
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            if not head:
                break
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", 8080, reuse_address=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""
WRK_SCRIPT = """
local gap = tonumber(os.getenv("WRK_GAP_MS") or "4")
function delay() return gap end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"p50": %d, "p99": %d, "requests": %d, "errors": %d, '
    .. '"non2xx": %d, "seconds": %.3f}\\n', latency:percentile(50), latency:percentile(99),
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status,
    summary.duration / 1e6))
end
"""


def manifests(lab: str) -> list[dict[str, Any]]:
    """The server on node1, the client on node2 (nodeSelector: the scheduler places them)."""
    def on(node: int) -> dict[str, str]:
        return {"kubernetes.io/hostname": f"{lab}-node{node}"}

    server = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "server", "namespace": "default", "labels": {"app": "srv"}},
              "spec": {"nodeSelector": on(1), "containers": [{
                  "name": "http", "image": "python", "command": [sys.executable, "-c", SERVER],
                  "ports": [{"name": "http", "containerPort": 8080}]}]}}
    client = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "client", "namespace": "default"},
              "spec": {"nodeSelector": on(2), "containers": [{
                  "name": "client", "image": "busybox", "command": ["sleep", "infinity"]}]}}
    docs: list[dict[str, Any]] = [server, client]
    for name in ["direct", *[f"routed-{i}" for i in range(ROUTED)]]:
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": "default"},
                     "spec": {"selector": {"app": "srv"},
                              "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        if name != "direct":
            docs.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"parentRefs": [{"group": "", "kind": "Service",
                                                  "name": name, "port": 80}],
                                  "rules": [{"backendRefs": [{"name": name, "port": 80}]}]}})
    return docs


def sidecar_config(listen: tuple[str, int], upstream: tuple[str, int], admin: Path
                   ) -> dict[str, Any]:
    """A sidecar's Envoy: one HTTP listener, the node Envoy's HTTP filters, one route."""
    filters = [json_format.MessageToDict(f) for f in httpfilters.listener_filters()]
    # ... and its access log (the mesh listener logs every request), on stdout as there.
    access_log = json_format.MessageToDict(listeners.mesh_access_log())
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "sidecar", "codec_type": "AUTO", "http_filters": filters,
           "access_log": [access_log], "normalize_path": True, "merge_slashes": True,
           "route_config": {"name": "local", "virtual_hosts": [{
               "name": "all", "domains": ["*"],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]}}
    return {
        "admin": {"address": {"pipe": {"path": str(admin)}}},
        "static_resources": {
            "listeners": [{"name": "sidecar", "address": {"socket_address": {
                "address": listen[0], "port_value": listen[1]}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network."
                                                "http_connection_manager",
                                                "typed_config": hcm}]}]}],
            "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "2s",
                          "load_assignment": {"cluster_name": "upstream", "endpoints": [{
                              "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                                  "address": upstream[0],
                                  "port_value": upstream[1]}}}}]}]}}]}}


def start_envoy(netns: str | None, config: dict[str, Any], work: Path, name: str
                ) -> subprocess.Popen[bytes]:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    cmd = [str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "--log-level",
           "error"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, stdout=(work / f"{name}.log").open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(admin: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["curl", "-s", "--unix-socket", str(admin), "http://x/ready"],
                             capture_output=True, text=True, check=False)
        if out.stdout.strip() == "LIVE":
            return
        time.sleep(0.1)
    raise RuntimeError(f"the Envoy with admin {admin} did not become ready")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wrk(lab: str, url: str, seconds: int, work: Path) -> dict[str, Any]:
    """wrk from the lab's client pod (its namespace and cgroup, through `mesh lab exec`)."""
    script = work / "paced.lua"
    script.write_text(WRK_SCRIPT)

    def cmd(duration: int) -> list[str]:
        return [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab, "client", "--",
                "env", f"WRK_GAP_MS={GAP_MS}", "wrk", "-t", "1", "-c", "4", "-d",
                f"{duration}s", "-s", str(script), url]

    subprocess.run(cmd(1), capture_output=True, check=False, cwd=ROOT)  # warm-up
    out = subprocess.run(cmd(seconds), capture_output=True, text=True, check=False, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith('{"p50"')), None)
    if line is None:
        raise RuntimeError(f"wrk to {url} gave no figures: {out.stdout[-1500:]}"
                           f"{out.stderr[-1500:]}")
    figures: dict[str, Any] = json.loads(line)
    if figures["errors"] or figures["non2xx"]:
        raise RuntimeError(f"wrk to {url}: {figures}")
    return figures


def lab_up(lab: str, work: Path, redirect: str) -> dict[str, Any]:
    (work / "app.yaml").write_text(yaml.safe_dump_all(manifests(lab)))
    lab_down(lab)
    subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "up", "--nodes", "2", "--name",
                    lab, "--manifests", str(work), "--redirect", redirect],
                   capture_output=True, check=True, cwd=ROOT)
    state = cluster.read_state(lab)
    assert state is not None
    pods = state["pods"]
    assert pods["default/server"]["node"] != pods["default/client"]["node"]
    return state


def lab_down(lab: str) -> None:
    subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", lab],
                   capture_output=True, cwd=ROOT, check=False)


def median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter samples (under 60 s)")
    args = parser.parse_args()
    seconds, rounds = (3, 1) if args.quick else (10, 3)
    work = Path(tempfile.mkdtemp(prefix="mesh-l7-"))
    (work / "tproxy").mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    figures: dict[str, Any] = {"benchmark": "l7_latency", "quick": args.quick,
                               "seconds_per_sample": seconds, "rounds": rounds,
                               "rate_per_connection_gap_ms": GAP_MS, "connections": 4}
    try:
        state = lab_up(LAB, work, "sk-assign")
        other = lab_up(LAB_TPROXY, work / "tproxy", "tproxy")
        pods, services = state["pods"], {s["name"]: s for s in state["services"]}
        server, client = pods["default/server"], pods["default/client"]
        # The sidecars: inbound beside the server, outbound beside the client.
        procs.append(start_envoy(server["netns"], sidecar_config(
            ("0.0.0.0", 15006), ("127.0.0.1", 8080), work / "in.sock"), work, "in"))
        procs.append(start_envoy(client["netns"], sidecar_config(
            ("127.0.0.1", 15000), (server["ip"], 15006), work / "out.sock"), work, "out"))
        wait_ready(work / "in.sock")
        wait_ready(work / "out.sock")
        routed = f"http://{services['routed-0']['clusterIP']}/"
        routed_tproxy = "http://{}/".format(next(
            s for s in other["services"] if s["name"] == "routed-0")["clusterIP"])
        modes = [("direct", LAB, f"http://{services['direct']['clusterIP']}/"),
                 ("node_envoy", LAB, routed), ("two_envoys", LAB, "http://127.0.0.1:15000/"),
                 ("node_envoy_tproxy", LAB_TPROXY, routed_tproxy)]
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m, _, _ in modes}
        for _ in range(rounds):  # interleaved, so that the machine's drift hits every mode
            for mode, lab, url in modes:
                samples[mode].append(wrk(lab, url, seconds, work))
        for mode, got in samples.items():
            figures[f"p50_us_{mode}"] = median([g["p50"] for g in got])
            figures[f"p99_us_{mode}"] = median([g["p99"] for g in got])
            figures[f"rps_{mode}"] = round(sum(g["requests"] / g["seconds"] for g in got)
                                           / len(got))
        for q in ("p50", "p99"):
            added_node = figures[f"{q}_us_node_envoy"] - figures[f"{q}_us_direct"]
            added_two = figures[f"{q}_us_two_envoys"] - figures[f"{q}_us_direct"]
            figures[f"added_ratio_{q}"] = round(added_node / added_two, 3) if added_two > 0 \
                else None
        envoy_pid = int(json.loads((cluster.lab_dir(LAB) / client["node"] / "agent" /
                                    "envoy.pid").read_text())["pid"])
        figures["rss_mib_node_envoy"] = round(rss_mib(envoy_pid), 1)
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
        procs.clear()
        lab_down(LAB_TPROXY)
        # 20 sidecars, one route each (on this host: only their memory is measured).
        for i in range(20):
            procs.append(start_envoy(None, sidecar_config(
                ("127.0.0.1", 0), ("127.0.0.1", 8080), work / f"s{i}.sock"), work, f"s{i}"))
        for i in range(20):
            wait_ready(work / f"s{i}.sock")
        time.sleep(1)
        figures["rss_mib_20_envoys"] = round(sum(rss_mib(p.pid) for p in procs), 1)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lab_down(LAB)
        lab_down(LAB_TPROXY)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
