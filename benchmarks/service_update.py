"""One Service change at 1,000 and 10,000 Services (4 backends each): the eBPF service maps
against kube-proxy's iptables rules, side by side in one run, in a scratch namespace.

BPF: the datapath's own reconciler writes the change into the real (bcc-compiled, pinned)
maps. Figures: the map writes of the change alone (`bpf_update_ms_N`, what the datapath pays
per change), and the sink's whole apply, which also diffs every frontend of the IR
(`bpf_apply_ms_N`). iptables: the KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* chains kube-proxy
writes for the same Services, restored whole with `iptables-restore --noflush`, as
kube-proxy does on every change (`iptables_update_ms_N`).

    python benchmarks/service_update.py [--quick]

`--quick` leaves out the iptables restore at 10,000 Services (it takes minutes here) and
prints null for it; the full run measures everything.

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

from mesh import ir
from mesh.datapath.programs import compile_program, unmount_bpffs
from mesh.datapath.services import ServiceReconciler

BACKENDS = 4


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (under 60 s)")
    args = parser.parse_args()
    trials = 3 if args.quick else 11
    work = Path(tempfile.mkdtemp(prefix="mesh-svc-bench-"))
    netns = f"mesh-svc-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    figures: dict[str, object] = {"benchmark": "service_update", "quick": args.quick,
                                  "backends_per_service": BACKENDS}
    try:
        for count in (1000, 10000):
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
            if args.quick and count == 10000:
                # One restore of 10,000 Services' rules takes minutes here (iptables-nft):
                # only the full run measures it.
                figures["iptables_update_ms_10000"] = None
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
        ipt = figures["iptables_update_ms_10000"]
        figures["ratio_10000"] = None if ipt is None else round(
            float(ipt) / float(figures["bpf_update_ms_10000"]), 1)  # type: ignore[arg-type]
        figures["ratio_1000"] = round(float(figures["iptables_update_ms_1000"]) /  # type: ignore[arg-type]
                                      float(figures["bpf_update_ms_1000"]), 1)  # type: ignore[arg-type]
        figures["bpf_10000_over_1000"] = round(
            float(figures["bpf_update_ms_10000"]) / float(figures["bpf_update_ms_1000"]), 2)  # type: ignore[arg-type]
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
