"""Gateway API at scale: 1,000 and 10,000 HTTPRoutes over 100 hostnames and 100 Services.

A real `mesh run --manifests DIR` (agent and Envoy), routes written as files of 100 routes.
Measures the time from writing the routes to every sampled route answering, the time from
changing one route at 10,000 routes to the change answering, and the agent's and Envoy's
resident memory. Then the same 10,000 routes as one multi-document YAML file, and one change
in it (the whole file rewritten): it should go live as fast as a change in a 100-route file.

    python benchmarks/gateway_scale.py [--quick] [--sizes 1000,10000] [--plot PATH]

The last line printed is one JSON object with every figure. `--sizes` are the route counts
applied (the changes are measured at the largest); `--plot` draws them as a PNG.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import plots
import yaml
from manifests import base, host_and_path, route
from procstat import rss_mib

from mesh.echo import EchoServer

ADDRESS = "127.4.0.1"
PORT = 8080
PER_FILE = 100
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def write_json(path: Path, docs: list[dict[str, Any]]) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    os.replace(tmp, path)


def get(i: int, timeout: float = 2.0) -> tuple[int, str | None]:
    host, path = host_and_path(i)
    conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("x-bench")
    except OSError:
        return 0, None
    finally:
        conn.close()


def wait_answering(indices: list[int], deadline_s: float = 120) -> float:
    """Seconds until every route in `indices` answers 200 (each checked until it does)."""
    start = time.perf_counter()
    pending = list(indices)
    while pending:
        if time.perf_counter() - start > deadline_s:
            raise TimeoutError(f"{len(pending)} routes still not answering")
        pending = [i for i in pending if get(i)[0] != 200]
        if pending:
            time.sleep(0.01)
    return time.perf_counter() - start


def apply_routes(directory: Path, count: int) -> None:
    for f in range(0, count, PER_FILE):
        write_json(directory / f"routes-{f // PER_FILE:04d}.json",
                   [route(i) for i in range(f, min(f + PER_FILE, count))])


def remove_routes(directory: Path) -> None:
    for p in directory.glob("routes-*.json"):
        p.unlink()


def yaml_text(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_DUMPER, sort_keys=False) for d in docs)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


def one_change_one_file(path: Path, count: int, trial: int) -> float:
    i = random.Random(trial).randrange(count)
    marker = f"change-one-file-{trial}"
    text = yaml_text([route(j, marker if j == i else "") for j in range(count)])
    start = time.perf_counter()  # from the edit saved, as a user would see it
    write_text(path, text)
    while get(i)[1] != marker:
        if time.perf_counter() - start > 30:
            raise TimeoutError("the change never answered")
        time.sleep(0.002)
    return time.perf_counter() - start


def one_change(directory: Path, count: int, trial: int) -> float:
    i = random.Random(trial).randrange(count)
    marker = f"change-{trial}"
    f = i // PER_FILE
    docs = [route(j, marker if j == i else "") for j in range(f * PER_FILE,
                                                             min((f + 1) * PER_FILE, count))]
    start = time.perf_counter()
    write_json(directory / f"routes-{f:04d}.json", docs)
    while get(i)[1] != marker:
        if time.perf_counter() - start > 30:
            raise TimeoutError("the change never answered")
        time.sleep(0.002)
    return time.perf_counter() - start


def plot(path: Path, sizes: list[int], figures: dict[str, Any],
         changes: dict[str, list[float]]) -> None:
    n = max(sizes)
    plots.save(path, "Gateway API at scale: a real mesh run --manifests (agent and Envoy)", [
        plots.Panel("routes written, until every sampled route answers", "routes", "seconds",
                    {"HTTPRoutes, files of 100": [
                        (k, figures[f"apply_to_answering_s_{k}"]) for k in sizes]},
                    targets={"target at 10,000 routes: 10 s": 10.0}),
        plots.Panel(f"one route change at {n:,} routes, until it answers", "trial",
                    "milliseconds",
                    {label: [(i + 1, ms) for i, ms in enumerate(trials)]
                     for label, trials in changes.items()},
                    targets={"target: 300 ms": 300.0}, lines=False),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (under 60 s)")
    parser.add_argument("--sizes", default="1000,10000",
                        help="route counts, comma-separated (default: 1000,10000)")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also draw the figures (PNG)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    n = max(sizes)
    trial_times: dict[str, list[float]] = {}
    samples, trials = (100, 3) if args.quick else (500, 11)
    work = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    manifests = work / "manifests"
    manifests.mkdir()
    echo = EchoServer("127.0.0.1", 0).start()
    docs = base(PORT, echo.port)
    docs[2]["spec"]["addresses"] = [{"type": "IPAddress", "value": ADDRESS}]
    write_json(manifests / "base.json", docs)
    log_path = work / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "run", "--manifests", str(manifests),
         "--state-dir", str(work / "state"), "--node-id", "bench"],
        stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    figures: dict[str, Any] = {"benchmark": "gateway_scale", "quick": args.quick}
    try:
        deadline = time.monotonic() + 60
        while b"node ready" not in log_path.read_bytes():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mesh run did not start:\n" + log_path.read_text())
            time.sleep(0.05)
        envoy_pid = int(re.findall(r"envoy started pid=(\d+)", log_path.read_text())[-1])
        rng = random.Random(1)
        for count in sizes:
            sample = rng.sample(range(count), min(samples, count))
            start = time.perf_counter()
            apply_routes(manifests, count)
            wait_answering(sample)
            took = time.perf_counter() - start
            figures[f"apply_to_answering_s_{count}"] = round(took, 2)
            print(f"{count} routes: sampled routes answering after {took:.2f}s",
                  file=sys.stderr)
            if count == n:
                figures[f"agent_rss_mib_{n}"] = round(rss_mib(agent.pid), 1)
                figures[f"envoy_rss_mib_{n}"] = round(rss_mib(envoy_pid), 1)
                changes = [one_change(manifests, count, t) * 1000 for t in range(trials)]
                trial_times["in a file of 100 routes"] = changes
                figures[f"one_change_live_ms_{n}"] = round(statistics.median(changes), 1)
                figures[f"one_change_live_ms_{n}_max"] = round(max(changes), 1)
                print(f"one change at {count}: {[round(c) for c in changes]} ms",
                      file=sys.stderr)
            else:
                remove_routes(manifests)
                time.sleep(1.0)
        # One file of 10,000 routes: a change in it parses one document, not 10,000.
        remove_routes(manifests)
        one_file = manifests / "all-routes.yaml"
        write_text(one_file, yaml_text([route(i) for i in range(n)]))
        wait_answering(rng.sample(range(n), min(samples, n)))
        changes = [one_change_one_file(one_file, n, 100 + t) * 1000 for t in range(trials)]
        trial_times[f"in one file of {n:,} routes"] = changes
        figures[f"one_change_live_ms_{n}_one_file"] = round(statistics.median(changes), 1)
        figures["one_file_over_100_route_files"] = round(
            figures[f"one_change_live_ms_{n}_one_file"] / figures[f"one_change_live_ms_{n}"], 2)
        print(f"one change in one file of {n}: {[round(c) for c in changes]} ms",
              file=sys.stderr)
        figures[f"scaling_{n}_over_{sizes[0]}"] = round(
            figures[f"apply_to_answering_s_{n}"] / figures[f"apply_to_answering_s_{sizes[0]}"],
            1)
        if args.plot:
            plot(args.plot, sizes, figures, trial_times)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        echo.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
