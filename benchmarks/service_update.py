"""One Service change at 1,000 and 10,000 Services (4 backends each): the eBPF service maps
against kube-proxy's iptables rules, side by side in one run, in a scratch namespace.

BPF: the datapath's own reconciler writes the change into the real (bcc-compiled, pinned)
maps. Figures: the map writes of the change alone (`bpf_update_ms_N`, what the datapath pays
per change), and the sink's whole apply, which also diffs every frontend of the IR
(`bpf_apply_ms_N`). iptables: the KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* chains kube-proxy
writes for the same Services, restored whole with `iptables-restore --noflush`, as
kube-proxy does on every change (`iptables_update_ms_N`).

    python benchmarks/service_update.py [--quick] [--sizes 1000,10000] [--plot PATH]

`--quick` leaves out the iptables restore above 2,000 Services (at 10,000 it takes minutes
here) and prints null for it; the full run measures everything. `--sizes` are the Service
counts; `--plot` draws the figures as a PNG.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plots

from mesh import ir
from mesh.datapath.programs import compile_program, unmount_bpffs
from mesh.datapath.services import ServiceReconciler

BACKENDS = 4
QUICK_IPTABLES_MAX = 2000  # --quick: iptables-restore measured up to this many Services


def service_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def backend_ip(i: int, j: int) -> str:
    n = i * BACKENDS + j
    return f"10.{244 + n // 65000}.{n // 250 % 260 % 256}.{n % 250 + 1}"


def frontends(count: int, changed: int | None = None, trial: int = 0) -> list[ir.ServiceFrontend]:
    out = []
    for i in range(count):
        backends = [ir.L4Backend(backend_ip(i, j), 8080) for j in range(BACKENDS)]
        if i == changed:
            backends[0] = ir.L4Backend(f"10.250.{trial // 250}.{trial % 250 + 1}", 8080)
        out.append(ir.ServiceFrontend(service_ip(i), 80, "TCP", tuple(backends)))
    return out


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16].upper()


def iptables_rules(fronts: list[ir.ServiceFrontend]) -> str:
    """The nat table part kube-proxy (iptables mode) writes for these Services."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    for f in fronts:
        svc = f"KUBE-SVC-{_h(f.address)}"
        chains.append(f":{svc} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {f.address}/32 -p tcp -m tcp --dport {f.port} "
                     f"-j {svc}")
        n = len(f.backends)
        for k, b in enumerate(f.backends):
            sep = f"KUBE-SEP-{_h(f.address + b.address)}"
            chains.append(f":{sep} - [0:0]")
            if k < n - 1:
                rules.append(f"-A {svc} -m statistic --mode random --probability "
                             f"{1 / (n - k):.10f} -j {sep}")
            else:
                rules.append(f"-A {svc} -j {sep}")
            rules.append(f"-A {sep} -s {b.address}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination "
                         f"{b.address}:{b.port}")
    return "*nat\n" + "\n".join(chains + rules) + "\nCOMMIT\n"


def restore(netns: str, text: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", netns, "iptables-restore", "--noflush"],
                   input=text.encode(), check=True)
    return time.perf_counter() - start


def plot(path: Path, sizes: list[int], figures: dict[str, object]) -> None:
    def series(key: str) -> list[tuple[float, float | None]]:
        return [(n, None if figures[f"{key}_{n}"] is None
                 else float(figures[f"{key}_{n}"])) for n in sizes]  # type: ignore[arg-type]

    title = f"One Service change (one of its {BACKENDS} backends replaced): eBPF against iptables"
    plots.save(path, title, [
        plots.Panel("time for one change, by Services installed", "Services",
                    "milliseconds (log scale)", {
                        "eBPF: the map writes of the change": series("bpf_update_ms"),
                        "eBPF: the sink's whole apply (diff + writes)": series("bpf_apply_ms"),
                        "kube-proxy: iptables-restore of the table": series(
                            "iptables_update_ms"),
                    }, logy=True),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (under 60 s)")
    parser.add_argument("--sizes", default="1000,10000",
                        help="Service counts, comma-separated (default: 1000,10000)")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also draw the figures (PNG)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    trials = 3 if args.quick else 11
    work = Path(tempfile.mkdtemp(prefix="mesh-svc-bench-"))
    netns = f"mesh-svc-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    figures: dict[str, object] = {"benchmark": "service_update", "quick": args.quick,
                                  "backends_per_service": BACKENDS}
    try:
        for count in sizes:
            pins = work / f"bpffs-{count}"
            loaded = compile_program("sock_lb.c", pins)
            try:
                rec = ServiceReconciler(*[loaded.table(n) for n in (
                    "mesh_services", "mesh_backends", "mesh_rev_nat")])
                rec.apply(frontends(count))
                writes, applies = [], []
                for t in range(trials):
                    changed = (t * 7919) % count
                    new = frontends(count, changed, t)
                    start = time.perf_counter()
                    rec.update(new[changed])
                    writes.append(time.perf_counter() - start)
                    again = frontends(count, changed, t + 1000)
                    start = time.perf_counter()
                    rec.apply(again)
                    applies.append(time.perf_counter() - start)
                figures[f"bpf_update_ms_{count}"] = round(statistics.median(writes) * 1000, 3)
                figures[f"bpf_apply_ms_{count}"] = round(statistics.median(applies) * 1000, 2)
            finally:
                loaded.close()
                unmount_bpffs(pins)
            if args.quick and count > QUICK_IPTABLES_MAX:
                # One restore of 10,000 Services' rules takes minutes here (iptables-nft):
                # only the full run measures it.
                figures[f"iptables_update_ms_{count}"] = None
                continue
            restore(netns, iptables_rules(frontends(count)))  # the rules as they were
            times = [restore(netns, iptables_rules(frontends(count, (t * 7919) % count, t)))
                     for t in range(1 if count == 10000 else trials)]
            figures[f"iptables_update_ms_{count}"] = round(statistics.median(times) * 1000, 1)
            subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-F"],
                           check=False)
            print(f"{count} services: bpf {figures[f'bpf_update_ms_{count}']} ms "
                  f"(apply with diff {figures[f'bpf_apply_ms_{count}']} ms), iptables "
                  f"{figures[f'iptables_update_ms_{count}']} ms", file=sys.stderr)
        for count in reversed(sizes):
            ipt = figures[f"iptables_update_ms_{count}"]
            figures[f"ratio_{count}"] = None if ipt is None else round(
                float(ipt) / float(figures[f"bpf_update_ms_{count}"]), 1)  # type: ignore[arg-type]
        lo, hi = sizes[0], sizes[-1]
        figures[f"bpf_{hi}_over_{lo}"] = round(
            float(figures[f"bpf_update_ms_{hi}"]) / float(figures[f"bpf_update_ms_{lo}"]), 2)  # type: ignore[arg-type]
        if args.plot:
            plot(args.plot, sizes, figures)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
