"""The eBPF service datapath for real: bcc-compiled programs, pinned maps, pods in network
namespaces wired by the CNI plugin, a cgroup (v2) with the socket load balancer, real TCP."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh import ir
from mesh.datapath import layout
from mesh.datapath.programs import compile_program, unmount_bpffs
from mesh.datapath.services import ServiceReconciler
from mesh.sinks.datapath import DatapathSink
from tests.test_cni import Node, node  # noqa: F401  (the fixture)

pytestmark = pytest.mark.netns
CLUSTER_IP = "10.96.0.10"

SERVER = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(64); print("listening", flush=True)
def serve(c):
    with c:
        while data := c.recv(100):
            c.sendall(sys.argv[2].encode() + b" " + data)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
# Connects N times to the ClusterIP, prints who answered and what getpeername() said; or,
# with "hold", keeps one connection open and answers lines on stdin through it.
CLIENT = """
import socket, sys
ip, n = sys.argv[1], int(sys.argv[2])
if n == 0:
    c = socket.create_connection((ip, 80), timeout=5)
    for line in sys.stdin:
        c.sendall(line.strip().encode()); print(c.recv(100).decode(), flush=True)
else:
    for _ in range(n):
        with socket.create_connection((ip, 80), timeout=5) as c:
            c.sendall(b"hi"); who = c.recv(100).decode().split()[0]
            print(who, c.getpeername()[0], flush=True)
"""


@pytest.fixture
def pins(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bpffs"
    yield path
    unmount_bpffs(path)


@pytest.mark.parametrize("program, maps", [("sock_lb.c", layout.MAPS),
                                           ("fwd.c", layout.FWD_MAPS)])
def test_map_layouts_match_the_c_structs(pins: Path, program: str,
                                         maps: dict[str, Any]) -> None:
    loaded = compile_program(program, pins)
    try:
        for name, (key_type, value_type) in maps.items():
            table = loaded.table(name)
            for ours, theirs in ((key_type, table.Key), (value_type, table.Leaf)):
                assert ctypes.sizeof(ours) == ctypes.sizeof(theirs), (name, ours)
                if issubclass(ours, ctypes.Structure):
                    # bcc adds a __pad_end field where C pads a struct's end; ctypes pads too
                    assert [(f[0], getattr(ours, f[0]).offset) for f in ours._fields_] == \
                        [(f[0], getattr(theirs, f[0]).offset) for f in theirs._fields_
                         if not f[0].startswith("__pad")], name
    finally:
        loaded.close()


def frontend(*backends: str, port: int = 8080) -> ir.ServiceFrontend:
    return ir.ServiceFrontend(CLUSTER_IP, 80, "TCP",
                              tuple(ir.L4Backend(b, port) for b in backends))


def dump(rec: ServiceReconciler) -> dict[tuple[int, int], tuple[int, int, int]]:
    return {(int(k.backend_slot), int(k.dport)): (int(v.backend_id), int(v.count),
                                                 int(v.rev_nat_index))
            for k, v in rec.services.items()}


def test_the_reconciler_writes_only_the_difference_and_adopts_pinned_maps(pins: Path) -> None:
    loaded = compile_program("sock_lb.c", pins)
    tables = [loaded.table(n) for n in ("mesh_services", "mesh_backends", "mesh_rev_nat")]
    rec = ServiceReconciler(*tables)
    others = [ir.ServiceFrontend(f"10.96.1.{i}", 80, "TCP", (ir.L4Backend("10.1.0.1", 80),))
              for i in range(1, 50)]
    rec.apply([frontend("10.244.0.2", "10.244.0.3"), *others])
    before = rec.writes
    rec.apply([frontend("10.244.0.2", "10.244.0.3", "10.244.0.4"), *others])
    # One more backend: its backend entry, its slot, the frontend's count. Nothing else.
    assert rec.writes - before == 3
    state = dump(rec)
    loaded.close()
    # A restarted agent: the maps are pinned; it reads them back and writes nothing.
    loaded = compile_program("sock_lb.c", pins)
    again = ServiceReconciler(*[loaded.table(n) for n in ("mesh_services", "mesh_backends",
                                                          "mesh_rev_nat")])
    assert dump(again) == state
    again.apply([frontend("10.244.0.2", "10.244.0.3", "10.244.0.4"), *others])
    assert again.writes == 0
    again.apply([frontend("10.244.0.3")])  # shrink, and 49 services gone
    assert {k[0] for k in dump(again)} == {0, 1}
    assert len(list(again.backends.items())) == 1
    loaded.close()


@dataclass
class Lab:
    node: Node
    pods: dict[str, str]  # name -> IP
    cgroup: Path


@pytest.fixture
def lab(node: Node, tmp_path: Path) -> Iterator[Lab]:  # noqa: F811
    rt = node.runtime("10.212.0.0/24", tmp_path / "cache")
    pods: dict[str, str] = {}
    servers = []
    for name in ("backend-a", "backend-b", "backend-c", "client"):
        ns = node.pod(name)
        pods[name] = rt.add(name, f"/var/run/netns/{ns}")["ips"][0]["address"].split("/")[0]
        if name != "client":
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER,
                                  pods[name], name], stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and "listening" in p.stdout.readline()
            servers.append(p)
    # The cgroup2 hierarchy mounted for the test, whatever layout the machine's
    # /sys/fs/cgroup has; under /run, never in a temporary directory pytest may later
    # remove recursively (that would walk the machine's cgroups).
    hierarchy = Path(f"/run/mesh-test-cgroup2-{os.getpid()}")
    hierarchy.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(hierarchy)], check=True)
    cgroup = hierarchy / f"mesh-test-{os.getpid()}"
    try:
        cgroup.mkdir(exist_ok=True)
        yield Lab(node, pods, cgroup)
    finally:
        for p in servers:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError):
            for pid in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):  # its programs go with it, once its processes are gone
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if subprocess.run(["umount", str(hierarchy)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(hierarchy)], check=False)
        with contextlib.suppress(OSError):
            hierarchy.rmdir()


def client(lab: Lab, n: int, **kw: object) -> subprocess.Popen[str]:
    procs = str(lab.cgroup / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        ["ip", "netns", "exec", f"{lab.node.name}-client", sys.executable, "-c", CLIENT,
         CLUSTER_IP, str(n)], preexec_fn=join, stdout=subprocess.PIPE, text=True, **kw)
    return proc


def answers(lab: Lab, n: int) -> list[tuple[str, str]]:
    p = client(lab, n)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    return [tuple(line.split()) for line in out.splitlines()]  # type: ignore[misc]


def test_a_cluster_ip_spreads_over_every_backend(lab: Lab, pins: Path) -> None:
    sink = DatapathSink(pins, lab.cgroup)
    try:
        backends = [lab.pods[n] for n in ("backend-a", "backend-b", "backend-c")]
        sink.apply(ir.IR(services=(frontend(*backends),)))
        got = answers(lab, 60)
        seen = Counter(who for who, _ in got)
        assert set(seen) == {"backend-a", "backend-b", "backend-c"}, seen
        assert {peer for _, peer in got} == {CLUSTER_IP}  # getpeername shows the ClusterIP
    finally:
        sink.close()


def test_a_removed_backend_gets_no_new_connection_and_an_established_one_finishes(
        lab: Lab, pins: Path) -> None:
    sink = DatapathSink(pins, lab.cgroup)
    a = lab.pods["backend-a"]
    holders: list[subprocess.Popen[str]] = []
    try:
        sink.apply(ir.IR(services=(frontend(a),)))
        held = client(lab, 0, stdin=subprocess.PIPE)
        holders.append(held)
        assert held.stdin is not None and held.stdout is not None
        held.stdin.write("before\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "backend-a before"
        sink.apply(ir.IR(services=(frontend(lab.pods["backend-b"]),)))
        assert {who for who, _ in answers(lab, 20)} == {"backend-b"}
        held.stdin.write("after\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "backend-a after"
        held.stdin.close()
        held.wait(10)
        # The agent goes away: the programs and pinned maps keep balancing.
        sink.close()
        assert {who for who, _ in answers(lab, 10)} == {"backend-b"}
        sink = DatapathSink(pins, lab.cgroup)  # back: adopts the maps, rewrites nothing
        sink.apply(ir.IR(services=(frontend(lab.pods["backend-b"]),)))
        assert sink.reconciler.writes == 0
    finally:
        for p in holders:
            p.kill()
            p.wait()
        sink.close()


FORWARD = """
import subprocess, sys
from pathlib import Path
from mesh.datapath.forwarding import Forwarding
fwd = Forwarding(Path(sys.argv[1]), underlay=None)
fwd.sync()
before = fwd.stats()
out = subprocess.run(["ip", "netns", "exec", sys.argv[2], sys.executable, "-c", sys.argv[3],
                      sys.argv[4], "20"], capture_output=True, text=True, check=True).stdout
after = fwd.stats()
print(len(out.split()), after[0] - before[0], len(fwd._attached))
"""
DIRECT = """
import socket, sys
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 8080), timeout=5) as c:
        c.sendall(b"hi"); print(c.recv(100).decode().split()[0])
"""


def test_pod_to_local_pod_goes_by_redirect(lab: Lab, pins: Path) -> None:
    """bpf/fwd.c at the pods' veths, loaded by the agent's code in the node's namespace: a
    packet for a pod of the node is redirected into its namespace (the counters say so),
    and the connections work."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node.name, sys.executable, "-c", FORWARD, str(pins),
         f"{lab.node.name}-client", DIRECT, lab.pods["backend-a"]],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    answered, redirected, attached = map(int, out.stdout.split())
    assert answered == 20
    assert attached == 4  # every pod's host-side veth
    assert redirected >= 20 * 4  # every packet of 20 connections goes by redirect, at least


IPSEC = """
import ctypes, subprocess, sys
from pathlib import Path
from mesh.datapath.forwarding import Forwarding
from mesh.datapath.layout import (ENC_PEER_UP, ENC_STRICT, ENC_XFRM, EncryptConfig, FlowConfig,
                                  address_of)
from mesh.sinks.encryption import datapath_counters, write_entry
fwd = Forwarding(Path(sys.argv[1]), underlay=None)
fwd.sync()
tables = fwd.encryption_tables()
tables["mesh_encrypt_config"][ctypes.c_uint32(0)] = EncryptConfig(
    ifindex=0, flags=ENC_XFRM | ENC_STRICT)
fwd.loaded.table("mesh_flow_config")[ctypes.c_uint32(0)] = FlowConfig(enabled=1)
write_entry(tables, "10.213.0.0/24", ENC_PEER_UP)  # a peer whose xfrm policy is in
write_entry(tables, "10.214.0.0/24", 0)  # a peer without one yet
def send(target):
    before = fwd.stats()[1], datapath_counters(tables)
    subprocess.run(["ip", "netns", "exec", sys.argv[2], sys.executable, "-c",
                    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    f"[s.sendto(b'x', ('{target}', 9)) for _ in range(10)]"], check=True)
    after = fwd.stats()[1], datapath_counters(tables)
    # The connection's own record (the node's kernel counter also counts whatever else the
    # node's interfaces carry meanwhile, such as IPv6 neighbour discovery).
    flow = [e for k, e in fwd.loaded.table("mesh_flows").items()
            if address_of(k.daddr) == target]
    assert len(flow) == 1, flow
    return [after[0] - before[0]] + [after[1][k] - before[1][k] for k in
                                     ("sent", "dropped_ipv4")] + [
        flow[0].packets[0], flow[0].verdict[0], flow[0].reason[0]]
print(*send("10.213.0.9"), *send("10.214.0.9"))
"""


def test_with_ipsec_an_up_peers_packets_go_on_to_the_kernel_and_a_down_ones_are_dropped(
        lab: Lab, pins: Path) -> None:
    """IPsec's mode of bpf/fwd.c (MESH_ENC_XFRM): a pod's packets to a peer that is up are
    counted and left to the kernel (its xfrm policy encrypts them: a redirect would skip
    it); to a peer that is not, strict mode drops them. The kernel's ESP is proven under
    qemu (tests/test_ipsec_vm.py); these machines' kernel has none."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node.name, sys.executable, "-c", IPSEC, str(pins),
         f"{lab.node.name}-client"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    up_kernel, up_sent, up_dropped, *up_flow = map(int, out.stdout.split()[:6])
    _, down_sent, down_dropped, *down_flow = map(int, out.stdout.split()[6:])
    forwarded, dropped = 1, 2  # flow.proto's Verdict
    assert (up_sent, up_dropped) == (10, 0) and up_kernel >= 10
    assert up_flow == [10, forwarded, 0]
    assert (down_sent, down_dropped) == (0, 10)
    assert down_flow == [10, dropped, 195]  # UNENCRYPTED_TRAFFIC: never left in the clear


class _Mem(dict[bytes, Any]):
    """A map in memory, keyed by the key's bytes as the kernel's is."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(bytes(key), value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(bytes(key))

    def items(self) -> Any:
        return iter(())  # nothing pinned from before


class _Full(_Mem):
    """A map that is full: every write fails as the kernel's would (E2BIG)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        raise Exception("Could not update table: [Errno 7] Argument list too long")


def test_a_failed_map_write_is_the_services_readiness() -> None:
    from mesh.sinks.sink import State
    from mesh.store.objects import ObjectKey

    owner = ObjectKey("", "Service", "default", "web")
    rec = ServiceReconciler(_Full(), _Mem(), _Mem())
    f = ir.ServiceFrontend(CLUSTER_IP, 80, "TCP", (ir.L4Backend("10.244.0.2", 8080),),
                           frozenset({owner}))
    rec.apply([f])
    assert "Argument list too long" in rec.errors[f.key]
    # The sink turns it into the Service's readiness (Programmed: False with the error).
    sink = DatapathSink.__new__(DatapathSink)
    sink.reconciler, sink._owners = rec, {f.key: f.owners}
    r = sink.readiness()[owner]
    assert r.state is State.FAILED and "Argument list too long" in r.message


def test_maglev_tables_are_balanced_deterministic_and_move_little() -> None:
    from mesh.datapath import maglev

    m = layout.MAGLEV_M
    names = maglev.ordered([maglev.backend_name(f"10.244.{i % 3}.{i}", 8080)
                            for i in range(5)])
    t = maglev.table(names, m)
    assert len(t) == m and maglev.table(tuple(names), m) == t
    shares = Counter(t)
    assert set(shares) == set(range(5))
    assert max(shares.values()) - min(shares.values()) <= m // 100, shares  # within 1%
    # One backend removed: its entries move, and only a few others do (Maglev's bound).
    fewer = names[:2] + names[3:]
    t2 = maglev.table(fewer, m)
    moved = sum(1 for a, b in zip(t, t2, strict=True)
                if a != 2 and names[a] != fewer[b])
    assert moved < m * 0.1, moved
    with pytest.raises(ValueError):
        maglev.table(tuple(b"%d" % i for i in range(m)), m)


def test_a_maglev_frontend_gets_its_whole_table_in_one_write(pins: Path) -> None:
    loaded = compile_program("sock_lb.c", pins)
    try:
        names = ("mesh_services", "mesh_backends", "mesh_rev_nat", "mesh_maglev")
        services, backends_map, _, tables = [loaded.table(n) for n in names]
        rec = ServiceReconciler(*[loaded.table(n) for n in names])
        backends = tuple(ir.L4Backend(f"10.244.0.{i}", 8080) for i in range(2, 6))
        f = ir.ServiceFrontend("172.30.0.11", 30080, "TCP", backends, algorithm="maglev",
                               external=True)
        rec.apply([f])
        front = services[layout.Lb4Key(address=layout.be32("172.30.0.11"),
                                           dport=layout.be16(30080), proto=6)]
        assert front.flags == layout.SVC_MAGLEV | layout.SVC_EXTERNAL and front.count == 4
        table = tables[ctypes.c_uint16(front.rev_nat_index)]
        ids = {v: layout.address_of(backends_map[ctypes.c_uint32(v)].address)
               for v in set(table.backend_ids)}
        assert sorted(ids.values()) == [b.address for b in backends]
        before = rec.writes
        rec.apply([ir.ServiceFrontend(f.address, f.port, f.protocol, backends[:3],
                                      algorithm="maglev", external=True)])
        # The frontend's count, its last slot, the table (whole), the backend released.
        assert rec.writes - before == 4
        assert 3 == len(set(tables[ctypes.c_uint16(front.rev_nat_index)].backend_ids))
        rec.apply([ir.ServiceFrontend(f.address, f.port, f.protocol, backends[:3])])
        assert len(list(tables.items())) == 0  # random again: the table goes
        # An agent restart adopts the flags: nothing to write.
        again = ServiceReconciler(*[loaded.table(n) for n in names])
        again.apply([ir.ServiceFrontend(f.address, f.port, f.protocol, backends[:3])])
        assert again.writes == 0
    finally:
        loaded.close()
