"""xDS push benchmark: a real Envoy, routes spread over 100 clusters, both ADS protocols.

Measures, per protocol: push-to-ACK time for 1,000 and 10,000 routes; for one route change
at 10,000 routes, the time to its ACK and to the first request that sees it, and the bytes
sent; the agent's (this process's) resident memory at 10,000 routes, and Envoy's.

    python benchmarks/xds_push.py [--quick] [--sizes 1000,10000] [--plot PATH]

The last line printed is one JSON object with every figure. `--sizes` are the route counts
pushed (the one change is measured at the largest); `--plot` draws them as a PNG.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import plots
from envoy.config.core.v3 import base_pb2
from google.protobuf.message import Message
from procstat import rss_mib

from mesh.echo import EchoServer
from mesh.sinks.envoy import resources as r
from meshxds import types
from meshxds.cache import Resource

# The test bed is development tooling under tests/, not part of the product's package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.testbed import Harness, http_get

CLUSTERS = 100
HOSTS = 100
LISTEN_PORT = 19480


def build(routes: int, backend_port: int, marked: int = -1) -> list[Resource]:
    """`routes` routes over HOSTS virtual hosts and CLUSTERS clusters. Route `marked` adds a
    response header, so a client can tell when a change is live."""
    out: list[Message] = []
    for c in range(CLUSTERS):
        out += [r.eds_cluster(f"c{c}"), r.load_assignment(f"c{c}", [("127.0.0.1", backend_port)])]
    per_host = routes // HOSTS
    vhosts = []
    for h in range(HOSTS):
        rs = []
        for k in range(per_host):
            i = h * per_host + k
            route = r.prefix_route(f"/r{k}/", f"c{i % CLUSTERS}", timeout=5.0)
            if i == marked:
                route.response_headers_to_add.add(
                    header=base_pb2.HeaderValue(key="x-bench", value="changed"))
            rs.append(route)
        vhosts.append(r.virtual_host(f"h{h}", [f"h{h}.example.com"], rs))
    out.append(r.http_listener("http", "127.0.0.1", LISTEN_PORT, "routes"))
    out.append(r.route_configuration("routes", vhosts))
    return [Resource.of(m) for m in out]


def get(path: str, host: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", LISTEN_PORT, timeout=5)
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def push_to_ack(h: Harness, resources: list[Resource]) -> float:
    start = time.perf_counter()
    h.set_snapshot("bench", resources)
    h.wait_settled("bench", timeout=60)
    return time.perf_counter() - start


def sample_routes_answer(routes: int) -> None:
    per_host = routes // HOSTS
    for h in range(0, HOSTS, 17):
        for k in range(0, per_host, max(1, per_host // 5)):
            reply = http_get(LISTEN_PORT, f"/r{k}/x", host=f"h{h}.example.com")
            assert reply.status == 200, (h, k, reply.status)


def one_change(h: Harness, routes: int, backend: int, trial: int) -> dict[str, Any]:
    """Mark one route; time its ACK and the first request that sees the header."""
    per_host = routes // HOSTS
    marked = (trial * 7919) % routes
    host, path = f"h{marked // per_host}.example.com", f"/r{marked % per_host}/x"
    resources = build(routes, backend, marked=marked)
    seen = threading.Event()
    seen_at = [0.0]
    stop = threading.Event()

    def poll() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", LISTEN_PORT, timeout=5)
        while not stop.is_set():
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            if resp.getheader("x-bench") == "changed":
                seen_at[0] = time.perf_counter()
                seen.set()
                return
        conn.close()

    node = h.sync(lambda: h.cache.node("bench"))
    bytes_before, responses_before = node.bytes_sent, dict(node.responses_sent)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    h.set_snapshot("bench", resources)
    h.wait_settled("bench", timeout=30)
    acked = time.perf_counter() - start
    if not seen.wait(10):
        stop.set()
        raise AssertionError(f"the change to {host}{path} was never seen")
    poller.join()
    figures = {
        "ack_ms": acked * 1000,
        "live_ms": (seen_at[0] - start) * 1000,
        "bytes": node.bytes_sent - bytes_before,
        "responses": {types.SHORT_NAMES[t]: n - responses_before.get(t, 0)
                      for t, n in node.responses_sent.items()
                      if n != responses_before.get(t, 0)},
    }
    # Back to unmarked, so the next trial starts from the same state.
    h.set_snapshot("bench", build(routes, backend))
    h.wait_settled("bench", timeout=30)
    return figures


def run_protocol(protocol: str, sizes: list[int], trials: int, backend: int) -> dict[str, object]:
    h = Harness()
    h.start_server()
    out: dict[str, object] = {}
    try:
        h.set_snapshot("bench", [])
        sup = h.start_envoy("bench", protocol=protocol)  # type: ignore[arg-type]
        h.wait_settled("bench")
        for n in sizes:
            t0 = time.perf_counter()
            resources = build(n, backend)
            out[f"build_s_{n}"] = round(time.perf_counter() - t0, 3)
            # Push to an Envoy that has nothing yet, then measure.
            h.set_snapshot("bench", [])
            h.wait_settled("bench", timeout=30)
            took = push_to_ack(h, resources)
            sample_routes_answer(n)
            out[f"push_ack_s_{n}"] = round(took, 3)
            print(f"{protocol}: {n} routes pushed and ACKed in {took:.3f}s", file=sys.stderr)
        n = max(sizes)
        out["agent_rss_mib"] = round(rss_mib(), 1)
        out["envoy_rss_mib"] = round(rss_mib(str(sup.pid)), 1)
        changes = [one_change(h, n, backend, trial) for trial in range(trials)]
        out[f"change_ack_ms_{n}"] = round(statistics.median(c["ack_ms"] for c in changes), 1)
        out[f"change_live_ms_{n}"] = round(statistics.median(c["live_ms"] for c in changes), 1)
        out[f"change_bytes_{n}"] = int(statistics.median(c["bytes"] for c in changes))
        # What one change sent, by type (the same in every trial).
        out[f"change_responses_{n}"] = changes[0]["responses"]
        print(f"{protocol}: one change at {n} routes: {out}", file=sys.stderr)
    finally:
        h.close()
    return out


def plot(path: Path, sizes: list[int], results: dict[str, dict[str, object]]) -> None:
    n = max(sizes)
    names = {"delta": "delta", "sotw": "SotW"}
    plots.save(path, "xDS push to a real Envoy (100 clusters, 100 virtual hosts)", [
        plots.Panel("routes pushed, until Envoy ACKed them", "routes", "seconds", {
            names[p]: [(k, float(res[f"push_ack_s_{k}"])) for k in sizes]  # type: ignore[arg-type]
            for p, res in results.items()}),
        plots.Panel(f"one route change at {n:,} routes (median)", "", "milliseconds", {
            names[p]: [(0, float(res[f"change_ack_ms_{n}"])),  # type: ignore[arg-type]
                       (1, float(res[f"change_live_ms_{n}"]))]  # type: ignore[arg-type]
            for p, res in results.items()},
            categories=["to the ACK", "to the first request\nthat sees it"],
            targets={"target: 100 ms": 100.0}),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (under 60 s)")
    parser.add_argument("--sizes", default="1000,10000",
                        help="route counts, comma-separated (default: 1000,10000)")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also draw the figures (PNG)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    trials = 3 if args.quick else 21
    echo = EchoServer("127.0.0.1", 0).start()
    try:
        results = {}
        for protocol in ("delta", "sotw"):
            results[protocol] = run_protocol(protocol, sizes, trials, echo.port)
    finally:
        echo.stop()
    d, s = results["delta"], results["sotw"]
    figures: dict[str, object] = {"benchmark": "xds_push", "quick": args.quick}
    for proto, res in results.items():
        for k, v in res.items():
            figures[f"{proto}_{k}"] = v
    n = max(sizes)
    figures["sotw_over_delta_change_bytes"] = round(
        float(s[f"change_bytes_{n}"]) / float(d[f"change_bytes_{n}"]), 2)  # type: ignore[arg-type]
    if args.plot:
        plot(args.plot, sizes, results)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
