"""The datapath's flow events for real: bpf/fwd.c compiled by bcc at pods' veths in network
namespaces (the CNI plugin's wiring), real TCP and UDP, the ring buffer read by the agent's
reader, the events named and stored as flows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cni import node  # noqa: F401  (the fixture)
from tests.test_datapath import Lab, lab, pins  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.netns

# In the node's namespace: the agent's forwarding and flow reader; 20 TCP connections from
# the client pod to backend-a (each: a request, an answer, a close); then 10 datagrams from
# one UDP socket to another node's pod CIDR whose encryption peer is down (strict mode drops
# them); then flow events switched off and 5 more connections. Prints the flows as JSON.
SCRIPT = """
import asyncio, ctypes, dataclasses, json, subprocess, sys
from pathlib import Path
from mesh.datapath.forwarding import Forwarding
from mesh.datapath.layout import ENC_STRICT, EncryptConfig
from mesh.flows.datapath import DatapathFlows
from mesh.flows.store import FlowStore
from mesh.sinks.encryption import write_entry

pins, client_ns, backend = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
CONNECT = '''
import socket, sys
for _ in range(int(sys.argv[2])):
    with socket.create_connection((sys.argv[1], 8080), timeout=5) as c:
        c.sendall(b"hi"); c.recv(100)
'''
SEND = '''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(10): s.sendto(b"x", ("10.214.0.9", 9))
'''

def in_client(*args):
    subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", *args], check=True)

fwd = Forwarding(pins, underlay=None)
fwd.sync()  # off the event loop: pyroute2 runs one of its own
tables = fwd.encryption_tables()
tables["mesh_encrypt_config"][ctypes.c_uint32(0)] = EncryptConfig(ifindex=0, flags=ENC_STRICT)
write_entry(tables, "10.214.0.0/24", 0)  # another node's pods, its peer down

async def main():
    store = FlowStore()
    flows = DatapathFlows(fwd.flow_events(), store, "node-1", local=fwd.is_local)
    task = asyncio.create_task(flows.run())
    await flows.ready.wait()
    await asyncio.to_thread(in_client, CONNECT, backend, "20")
    await asyncio.to_thread(in_client, SEND)
    await asyncio.sleep(0.5)
    seen = len(store)
    flows.events.enable(False)
    await asyncio.to_thread(in_client, CONNECT, backend, "5")
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    print(json.dumps({"flows": [dataclasses.asdict(f) for f in store.last()], "seen": seen,
                      "counters": fwd.flow_events().counters(),
                      "received": flows.received}))

asyncio.run(main())
"""


def test_each_connection_is_reported_on_its_state_changes_only(lab: Lab, pins: Path) -> None:  # noqa: F811
    """A TCP connection is two events whatever its length: NEW (its first packet, SYN,
    forwarded into the pod) and CLOSED (both FINs), with the packets and bytes each way;
    a UDP socket's 10 datagrams that strict encryption drops are one DROPPED event with
    the reason; with flow events off, nothing is tracked."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node.name, sys.executable, "-c", SCRIPT, str(pins),
         f"{lab.node.name}-client", lab.pods["backend-a"]],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    flows = result["flows"]
    client, backend = lab.pods["client"], lab.pods["backend-a"]
    tcp = [f for f in flows if f["protocol"] == "TCP"]
    events = [f["connection"]["event"] for f in tcp]
    assert events.count("NEW") == 20 and events.count("CLOSED") == 20, events
    assert len(tcp) == 40  # nothing else: no per-packet events
    for f in tcp:
        assert f["kind"] == "L3_L4" and f["node"] == "node-1"
        assert f["verdict"] == "FORWARDED" and f["direction"] == "EGRESS"
        assert f["connection"]["point"] == "TO_ENDPOINT"
    new = [f for f in tcp if f["connection"]["event"] == "NEW"]
    assert all(f["connection"]["tcp_flags"] == ["SYN"] for f in new)
    assert all((f["source"]["ip"], f["destination"]["ip"], f["destination"]["port"]) ==
               (client, backend, 8080) for f in new)
    assert len({f["source"]["port"] for f in new}) == 20  # twenty connections
    closed = [f for f in tcp if f["connection"]["event"] == "CLOSED"]
    for f in closed:
        sent, replies = f["connection"]["packets"]
        sent_bytes, reply_bytes = f["connection"]["bytes"]
        # SYN, ACK, data, FIN (+ ACKs) one way; SYN-ACK, data, FIN (+ ACKs) the other
        assert 3 <= sent <= 6 and 3 <= replies <= 6, f
        assert sent_bytes >= sent * 54 and reply_bytes >= replies * 54
    assert {f["source"]["port"] for f in closed} | \
        {f["destination"]["port"] for f in closed} >= {f["source"]["port"] for f in new}
    udp = [f for f in flows if f["protocol"] == "UDP"]
    assert len(udp) == 1, udp  # ten datagrams of one socket: one event
    (drop,) = udp
    assert (drop["verdict"], drop["drop_reason"]) == ("DROPPED", "UNENCRYPTED_TRAFFIC")
    assert (drop["destination"]["ip"], drop["destination"]["port"]) == ("10.214.0.9", 9)
    assert drop["connection"]["event"] == "NEW"
    assert result["seen"] == 41 == len(flows)  # off: the last 5 connections left no flow
    assert result["counters"] == {"sent": 41, "lost": 0}
    assert result["received"] == 41


def test_a_drops_direction_is_its_policys() -> None:
    from mesh.datapath.flowevents import FlowEvent
    from mesh.datapath.layout import FLOW_NEW, FLOW_POLICY_EGRESS, FLOW_POLICY_INGRESS
    from mesh.flows.datapath import direction

    def event(policy: int) -> FlowEvent:
        return FlowEvent(0, "10.0.0.1", "10.0.0.2", 40000, 80, 6, (1, 0), (60, 0), 3,
                         FLOW_NEW, 2 if policy else 1, 133 if policy else 0, 101, False, 2,
                         policy)

    def local(address: str) -> bool:
        return True  # both ends pods of this node

    # the receiver's ingress policy dropped it, though the sender is a pod of this node
    assert direction(event(FLOW_POLICY_INGRESS), local) == "INGRESS"
    assert direction(event(FLOW_POLICY_EGRESS), local) == "EGRESS"
    assert direction(event(0), local) == "EGRESS"
    assert direction(event(0), lambda a: a == "10.0.0.2") == "INGRESS"


# In the node's namespace: the agent's datapath sink (the socket load balancer on the
# client's cgroup, the forwarding at the veths), a TCP Service (two backends) and a UDP one
# (one backend) on the ClusterIP, the directory naming it; from the client pod (in that
# cgroup): 6 connections to the TCP Service, one to a backend straight, and 10 datagrams of
# one socket to the UDP Service. Prints the flows as JSON.
TRANSLATIONS = """
import asyncio, dataclasses, json, os, subprocess, sys
from pathlib import Path
from mesh import ir
from mesh.flows.connections import Connections
from mesh.flows.datapath import DatapathFlows
from mesh.flows.directory import FlowDirectory
from mesh.flows.store import FlowStore
from mesh.sinks.datapath import DatapathSink

pins, cgroup, client_ns, cluster_ip = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
backends = sys.argv[5:8]
CONNECT = '''
import socket, sys
for _ in range(int(sys.argv[3])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        c.sendall(b"hi"); c.recv(100)
'''
SEND = '''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(10): s.sendto(b"x", (sys.argv[1], 5353))
'''

def join():
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))

def in_client(*args):
    subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", *args],
                   check=True, preexec_fn=join)

sink = DatapathSink(pins, Path(cgroup), forwarding=True)
model = ir.IR(
    services=(ir.ServiceFrontend(cluster_ip, 80, "TCP", tuple(
                  ir.L4Backend(b, 8080) for b in backends[:2])),
              ir.ServiceFrontend(cluster_ip, 5353, "UDP", (ir.L4Backend(backends[2], 53),))),
    directory=ir.Directory(services=(ir.DirectoryService(cluster_ip, "default", "web"),)))
sink.apply(model)
sink.forwarding.sync()
names = FlowDirectory()
names.apply(model)

async def main():
    store = FlowStore()
    flows = DatapathFlows(sink.forwarding.flow_events(), store, "node-1", names,
                          local=sink.forwarding.is_local, connections=Connections())
    task = asyncio.create_task(flows.run())
    await flows.ready.wait()
    await asyncio.to_thread(in_client, CONNECT, cluster_ip, "80", "6")
    await asyncio.to_thread(in_client, CONNECT, backends[0], "8080", "1")
    await asyncio.to_thread(in_client, SEND, cluster_ip)
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    print(json.dumps([dataclasses.asdict(f) for f in store.last()]))

asyncio.run(main())
sink.close()
"""


def test_a_connection_balanced_at_its_socket_names_its_service(lab: Lab, pins: Path) -> None:  # noqa: F811
    """The socket load balancer tells the flow tracking what it translated (TCP: by sock_ops
    once connect() has its port; UDP: at sendmsg()): each such connection's first flow is
    preceded by a TRANSLATED SOCK flow (the client to the backend, the Service named, as
    Hubble's socket trace after translation) and names the Service; a connection made to a
    backend straight has neither; an unconnected UDP socket's datagrams to one backend are
    one translation."""
    from tests.test_datapath import CLUSTER_IP

    backends = [lab.pods[n] for n in ("backend-a", "backend-b", "backend-c")]
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node.name, sys.executable, "-c", TRANSLATIONS, str(pins),
         str(lab.cgroup), f"{lab.node.name}-client", CLUSTER_IP, *backends],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    flows = json.loads(out.stdout)
    client = lab.pods["client"]
    new = [f for f in flows if f["kind"] == "L3_L4" and f["connection"]["event"] == "NEW"]
    socks = [f for f in flows if f["kind"] == "SOCK"]
    tcp_new = [f for f in new if f["protocol"] == "TCP"]
    assert len(tcp_new) == 7, tcp_new
    balanced = [f for f in tcp_new if f["destination"]["service"]]
    assert len(balanced) == 6
    for f in balanced:
        assert f["destination"]["service"] == "default/web"
        assert f["destination"]["ip"] in backends[:2] and f["destination"]["port"] == 8080
    (straight,) = [f for f in tcp_new if not f["destination"]["service"]]
    assert straight["destination"]["ip"] == backends[0]
    (udp,) = [f for f in new if f["protocol"] == "UDP"]
    assert (udp["destination"]["ip"], udp["destination"]["port"],
            udp["destination"]["service"]) == (backends[2], 53, "default/web")
    # one translation per balanced connection, just before its first flow, with its tuple
    assert len(socks) == 7
    for s in socks:
        assert s["verdict"] == "TRANSLATED" and s["source"]["ip"] == client
        (first,) = [f for f in new if (f["source"], f["destination"]) ==
                    (s["source"], s["destination"])]
        assert flows.index(first) == flows.index(s) + 1
        assert s["connection_id"] == first["connection_id"] != ""
    # every flow of a connection carries its id: one id per connection
    ids = {f["connection_id"] for f in flows}
    assert len(ids) == len(new) == 8 and "" not in ids
