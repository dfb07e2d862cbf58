"""What flow export costs and how much of it the agent takes, in one run.

- **Lossless rate**: the datapath program (bpf/fwd.c's mesh_from_pod, compiled by bcc) is run
  on packets of new connections (a SYN, then a RST: two events each, NEW and CLOSED) at a
  paced rate by the kernel's BPF_PROG_TEST_RUN, from one process on one core; the agent's
  reader (mesh/flows/datapath.py: the ring buffer read on a thread, each event decoded, its
  ends named, counted in the metrics and stored, as in `mesh run`) runs in another process
  pinned to the other core. Where the producer's core cannot go faster, the figure is a
  floor (`producer_bound`). The highest
  rate of connections per second at which every event reaches the store and none is lost in
  the ring (each rate held for a few seconds, longer than the ring can hide), found by
  doubling then bisecting; then the events lost at twice that rate.
- **What export costs a packet**: TCP request/response p50 (sockperf ping-pong) between pods
  on two lab nodes with the datapath's flow tracking off and on (each node's
  `mesh_flow_config`), alternated in eight 5 s pairs in the same lab; `export_ratio` is the
  median of the pairs' ratios (a pair sees the same machine when its speed drifts).

    python benchmarks/flows.py [--quick]

The last line printed is one JSON object: lossless_flows_per_s, lost_at_2x,
rr_p50_us_export_off, rr_p50_us_export_on, export_ratio (and the details).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from l4_latency import sockperf  # the script's directory is on the path

from mesh.lab import cluster

ROOT = Path(__file__).resolve().parent.parent
LAB = "flowbench"
PRODUCER_CPU, CONSUMER_CPU = 0, 1

# The consumer: the agent's reader of the datapath's events, on one core. It loads fwd.c,
# pins mesh_from_pod where the producer finds it, says "ready", then answers each line on
# its stdin with its counts (events received, flows stored, events lost in the ring).
CONSUMER = """
import asyncio, ctypes, json, os, sys
from pathlib import Path
from mesh.agent.metrics import AgentMetrics
from mesh.datapath.flowevents import FlowEvents
from mesh.datapath.programs import compile_program
from mesh.flows.datapath import DatapathFlows
from mesh.flows.directory import FlowDirectory
from mesh.flows.store import FlowStore

os.sched_setaffinity(0, {int(sys.argv[2])})
pins = Path(sys.argv[1])
loaded = compile_program("fwd.c", pins)
fn = loaded.function("mesh_from_pod", 3)
libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
if libbpf.bpf_obj_pin(fn.fd, str(pins / "bench_prog").encode()) != 0:
    raise SystemExit("cannot pin the program")
events = FlowEvents(loaded)
store = FlowStore(listener=AgentMetrics().flow)  # each flow counted, as the agent does

async def main():
    # each end named (a lookup in the directory), as the agent does
    flows = DatapathFlows(events, store, "bench", FlowDirectory(), lambda a: False)
    task = asyncio.create_task(flows.run())
    await flows.ready.wait()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        await asyncio.sleep(float(line.decode().strip() or 0))  # let the reader drain
        print(json.dumps({"received": flows.received, "stored": store.seen,
                          **events.counters()}), flush=True)
    task.cancel()

asyncio.run(main())
"""


class TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (1.1)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def packet(flags: int) -> bytearray:
    """Ethernet + IPv4 + TCP, from 10.99.0.1:1024 to 10.98.0.1:80; the source is changed in
    place for each connection."""
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     bytes([10, 99, 0, 1]), bytes([10, 98, 0, 1]))
    tcp = struct.pack("!HHIIBBHHH", 1024, 80, 0, 0, 5 << 4, flags, 65535, 0, 0)
    return bytearray(eth + ip + tcp)


class Producer:
    """New connections into the program, paced."""

    def __init__(self, prog: Path) -> None:
        self.libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        self.fd = self.libbpf.bpf_obj_get(str(prog).encode())
        if self.fd < 0:
            raise SystemExit(f"cannot open the pinned program {prog}")
        self.syn, self.rst = packet(0x02), packet(0x04)
        self.bufs = [(ctypes.c_char * len(p)).from_buffer(p) for p in (self.syn, self.rst)]
        self.opts = [TestRunOpts(sz=ctypes.sizeof(TestRunOpts),
                                 data_in=ctypes.addressof(b), data_size_in=len(b), repeat=1)
                     for b in self.bufs]
        self.next = 0  # connections made so far: each gets its own source

    def _run(self, i: int) -> None:
        if self.libbpf.bpf_prog_test_run_opts(self.fd, ctypes.byref(self.opts[i])) != 0:
            raise SystemExit(f"BPF_PROG_TEST_RUN: errno {ctypes.get_errno()}")

    def connections(self, rate: float, seconds: float) -> tuple[int, float]:
        """`rate` connections a second for `seconds`; (made, the rate achieved)."""
        total = int(rate * seconds)
        started = time.perf_counter()
        run, syn, rst = self._run, self.syn, self.rst
        for k in range(total):
            n = self.next + k
            # a distinct source for each: 10.99.A.B:PORT
            src = bytes([10, 99, (n >> 24) & 0xFF or 1, (n >> 16) & 0xFF])
            port = struct.pack("!H", 1024 + (n & 0xFFFF) % 64000)
            syn[26:30] = rst[26:30] = src
            syn[34:36] = rst[34:36] = port
            run(0)
            run(1)
            if k % 256 == 255:  # pace: sleep off any lead over the schedule
                lead = started + (k + 1) / rate - time.perf_counter()
                if lead > 0:
                    time.sleep(lead)
        self.next += total
        return total, total / (time.perf_counter() - started)


def measure_rate(quick: bool) -> dict[str, Any]:
    os.sched_setaffinity(0, {PRODUCER_CPU})
    pins = Path(tempfile.mkdtemp(prefix="mesh-flowbench-")) / "bpffs"
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(pins), str(CONSUMER_CPU)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
    assert consumer.stdin is not None and consumer.stdout is not None
    try:
        if consumer.stdout.readline().strip() != "ready":
            raise SystemExit("the consumer did not start")
        producer = Producer(pins / "bench_prog")
        seconds = 2.0 if quick else 4.0

        def counts(drain: float) -> dict[str, int]:
            assert consumer.stdin is not None and consumer.stdout is not None
            consumer.stdin.write(f"{drain}\n")
            consumer.stdin.flush()
            result: dict[str, int] = json.loads(consumer.stdout.readline())
            return result

        def trial(rate: float) -> dict[str, Any]:
            before = counts(0)
            made, achieved = producer.connections(rate, seconds)
            after = counts(1.0)
            got = {k: after[k] - before[k] for k in after}
            return {"rate": rate, "achieved": round(achieved), "events": 2 * made,
                    "received": got["received"], "stored": got["stored"],
                    "lost": got["lost"], "sent": got["sent"],
                    "lossless": got["lost"] == 0 and got["stored"] == 2 * made
                    and achieved >= 0.95 * rate}

        trials = []
        rate, good, bad = 5000.0, 0.0, None
        while bad is None and rate <= 400_000:  # doubling until an event is lost
            t = trial(rate)
            trials.append(t)
            if t["lossless"]:
                good, rate = rate, rate * 2
            elif t["achieved"] < 0.95 * rate and t["lost"] == 0:
                break  # the producer's core is the limit, not the agent
            else:
                bad = rate
        steps = 3 if quick else 5
        while bad is not None and steps:  # then bisecting
            mid = (good + bad) / 2
            t = trial(mid)
            trials.append(t)
            good, bad = (mid, bad) if t["lossless"] else (good, mid)
            steps -= 1
        at_2x = trial(2 * good) if good else {"lost": None, "events": 0}
        trials.append(at_2x)
        return {"lossless_flows_per_s": round(good), "lost_at_2x": at_2x["lost"],
                "events_at_2x": at_2x["events"], "achieved_at_2x": at_2x.get("achieved"),
                "producer_bound": bad is None, "trials": trials}
    finally:
        if consumer.stdin is not None:
            consumer.stdin.close()
        consumer.wait(10)
        subprocess.run(["umount", str(pins)], capture_output=True, check=False)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


SERVER = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "server", "namespace": "default"},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node1"},
             "containers": [{"name": "server", "image": "sockperf",
                             "command": ["sockperf", "server", "--tcp", "-i", "0.0.0.0",
                                         "-p", "11111"]}]}}
CLIENT = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "client", "namespace": "default"},
    "spec": {"nodeSelector": {"kubernetes.io/hostname": f"{LAB}-node2"},
             "containers": [{"name": "client", "image": "sockperf",
                             "command": ["sleep", "infinity"]}]}}


def mesh(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout


def set_export(on: bool) -> None:
    """Each lab node's flow tracking, in its pinned mesh_flow_config (the agent's switch)."""
    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for node in ("node1", "node2"):
        path = cluster.lab_dir(LAB) / f"{LAB}-{node}" / "agent" / "bpffs" / "mesh_flow_config"
        fd = libbpf.bpf_obj_get(str(path).encode())
        if fd < 0:
            raise SystemExit(f"no {path}")
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(int(on))
        if libbpf.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0) != 0:
            raise SystemExit(f"cannot write {path}")
        os.close(fd)


def measure_latency(quick: bool) -> dict[str, Any]:
    import yaml

    # Many short rounds, each setting right after the other: on a machine whose speed drifts
    # the pairs see the same machine, and their ratios' median is the figure.
    seconds = 3 if quick else 5
    rounds = 3 if quick else 8
    if cluster.read_state(LAB) is not None:
        mesh("lab", "down", "--name", LAB)
    work = Path(tempfile.mkdtemp(prefix="mesh-flowbench-"))
    (work / "rr.yaml").write_text(yaml.safe_dump_all([SERVER, CLIENT]))
    mesh("lab", "up", "--nodes", "2", "--name", LAB, "--manifests", str(work),
         "--timeout", "240")
    try:
        state = cluster.read_state(LAB)
        assert state is not None
        server_ip = state["pods"]["default/server"]["ip"]
        prefix = [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", LAB, "client",
                  "--"]
        time.sleep(2)
        off, on = [], []
        for _ in range(rounds):  # alternated, side by side
            set_export(False)
            off.append(sockperf(prefix, server_ip, 11111, seconds)[0])
            set_export(True)
            on.append(sockperf(prefix, server_ip, 11111, seconds)[0])
        p_off, p_on = statistics.median(off), statistics.median(on)
        ratio = statistics.median(b / a for a, b in zip(off, on, strict=True))
        return {"rr_p50_us_export_off": round(p_off, 2), "rr_p50_us_export_on": round(p_on, 2),
                "export_ratio": round(ratio, 3), "rr_rounds_off": off, "rr_rounds_on": on}
    finally:
        mesh("lab", "down", "--name", LAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    figures.update(measure_rate(args.quick))
    figures.update(measure_latency(args.quick))
    trials = figures.pop("trials")
    for t in trials:
        print(json.dumps(t), file=sys.stderr)
    print(json.dumps({k: figures[k] for k in (
        "lossless_flows_per_s", "lost_at_2x", "rr_p50_us_export_off", "rr_p50_us_export_on",
        "export_ratio", "events_at_2x", "achieved_at_2x", "producer_bound", "rr_rounds_off",
        "rr_rounds_on")}))


if __name__ == "__main__":
    main()
