"""Network policy in the kernel (bpf/fwd.c with lib/policy.h), loaded by the agent's code
(Forwarding and its PolicyReconciler) in a node's namespace with pods wired by the CNI plugin:
what a policy allows connects, what it does not is dropped and counted, replies of allowed
connections pass, a change re-decides established connections (keeping those still allowed),
and the pinned maps keep enforcing after the agent's process is gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.datapath.policy import port_prefixes
from tests.test_cni import node  # noqa: F401  (the fixture)
from tests.test_datapath import Lab, lab, pins  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[1]

# Run in the node's namespace: the agent's datapath with a policy state given as JSON, then
# probes from the client pod (a connection that must answer within a second, or not), as
# steps: [["apply", state] | ["probe", pod, port] | ["hold", pod] | ["send"] | ["stats"]].
AGENT = r"""
import json, subprocess, sys, time
from pathlib import Path
from mesh import ir
from mesh.datapath.forwarding import Forwarding

pins, client_ns, steps = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
fwd = Forwarding(pins, underlay=None)
fwd.sync()
PROBE = '''
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 8080), timeout=1) as c:
        c.sendall(b"hi"); print(c.recv(100).decode().split()[0])
except OSError as e:
    print("refused" if isinstance(e, ConnectionRefusedError) else "timeout")
'''
HOLD = '''
import socket, sys
c = socket.create_connection((sys.argv[1], 8080), timeout=1)
for line in sys.stdin:
    try:
        c.sendall(b"hi"); print(c.recv(100).decode().split()[0], flush=True)
    except OSError:
        print("timeout", flush=True)
'''
held = None
out = []
for step in steps:
    if step[0] == "apply":
        s = step[1]
        fwd.policy.apply(ir.NetworkPolicies(
            ipcache=tuple(ir.IpcacheEntry(*e) for e in s["ipcache"]),
            endpoints=tuple(ir.EndpointPolicy(e["address"], e["identity"], e["in"], e["out"],
                                              tuple(ir.PolicyAllow(*a) for a in e["allow"]),
                                              tiers=tuple(ir.TierEntry(*t)
                                                          for t in e.get("tiers", [])))
                            for e in s["endpoints"])))
    elif step[0] == "probe":
        r = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", PROBE,
                            step[1]], capture_output=True, text=True, timeout=20)
        out.append(r.stdout.strip())
    elif step[0] == "hold":
        held = subprocess.Popen(["ip", "netns", "exec", client_ns, sys.executable, "-c", HOLD,
                                 step[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    elif step[0] == "send":
        held.stdin.write("x\n"); held.stdin.flush()
        out.append(held.stdout.readline().strip())
    elif step[0] == "stats":
        out.append(dict(fwd.policy.stats()))
if held:
    held.kill()
print(json.dumps(out))
"""
# After the agent's process is gone: probes only.
PROBE_ONLY = r"""
import subprocess, sys
for target in sys.argv[2:]:
    r = subprocess.run(["ip", "netns", "exec", sys.argv[1], sys.executable, "-c", '''
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 8080), timeout=1) as c:
        c.sendall(b"hi"); print(c.recv(100).decode().split()[0])
except OSError:
    print("timeout")
''', target], capture_output=True, text=True, timeout=20)
    print(r.stdout.strip())
"""

CLIENT_ID, BACKEND_ID, OTHER_ID = 300, 400, 500


def state(lab: Lab, a: dict[str, object],  # noqa: F811
          b: dict[str, object]) -> list[object]:
    """A node's policy state: the pods' identities, and backend-a's and backend-b's policy."""
    p = lab.pods
    return ["apply", {
        "ipcache": [[f"{p['client']}/32", CLIENT_ID, 0], [f"{p['backend-a']}/32", BACKEND_ID, 0],
                    [f"{p['backend-b']}/32", BACKEND_ID, 0],
                    [f"{p['backend-c']}/32", OTHER_ID, 0]],
        "endpoints": [{"address": p["backend-a"], "identity": BACKEND_ID, **a},
                      {"address": p["backend-b"], "identity": BACKEND_ID, **b}]}]


def run(lab: Lab, pins: Path,  # noqa: F811
        steps: list[list[object]]) -> list[object]:
    r = subprocess.run(["ip", "netns", "exec", lab.node.name, sys.executable, "-c", AGENT,
                        str(pins), f"{lab.node.name}-client", json.dumps(steps)],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    result: list[object] = json.loads(r.stdout.splitlines()[-1])
    return result


def test_a_policy_allows_its_peers_drops_the_rest_and_keeps_enforcing_without_the_agent(
        lab: Lab, pins: Path) -> None:  # noqa: F811
    a, b = lab.pods["backend-a"], lab.pods["backend-b"]
    from_client = {"in": True, "out": False, "allow": [["ingress", CLIENT_ID, "TCP", 8080]]}
    from_other = {"in": True, "out": False, "allow": [["ingress", OTHER_ID, "TCP", 8080]]}
    open_ = {"in": False, "out": False, "allow": []}
    got = run(lab, pins, [
        ["probe", a], ["probe", b],                               # no policy: both answer
        state(lab, from_client, from_other),
        ["probe", a], ["probe", b], ["stats"],                    # a lets the client in, b not
        state(lab, open_, open_), ["hold", b], ["send"],          # a connection to b, open
        state(lab, open_, from_client), ["send"],                 # still allowed: goes on
        state(lab, open_, from_other), ["send"],                  # no longer: dropped
        state(lab, from_client, from_other),
    ])
    assert got[:2] == ["backend-a", "backend-b"]
    assert got[2:4] == ["backend-a", "timeout"]
    stats = got[4]
    assert isinstance(stats, dict)
    assert stats["denied_ingress"] >= 1  # the SYN (and its retries) to b
    assert got[5:8] == ["backend-b", "backend-b", "timeout"]
    # The agent's process is gone; its pinned maps and attached programs are not.
    r = subprocess.run(["ip", "netns", "exec", lab.node.name, sys.executable, "-c", PROBE_ONLY,
                        f"{lab.node.name}-client", a, b], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split() == ["backend-a", "timeout"]


def test_egress_and_port_ranges(lab: Lab, pins: Path) -> None:  # noqa: F811
    """The client's egress: allowed to backend-a's identity on a port range holding 8080, not
    to backend-c's; and a range split into the LPM's port prefixes exactly."""
    p = lab.pods
    client = {"address": p["client"], "identity": CLIENT_ID, "in": False, "out": True,
              "allow": [["egress", BACKEND_ID, "TCP", 8000, 8100]]}
    steps: list[list[object]] = [["apply", {
        "ipcache": [[f"{p['client']}/32", CLIENT_ID, 0], [f"{p['backend-a']}/32", BACKEND_ID, 0],
                    [f"{p['backend-c']}/32", OTHER_ID, 0]],
        "endpoints": [client]}], ["probe", p["backend-a"]], ["probe", p["backend-c"]],
        ["stats"]]
    got = run(lab, pins, steps)
    assert got[:2] == ["backend-a", "timeout"]
    stats = got[2]
    assert isinstance(stats, dict) and stats["denied_egress"] >= 1


def test_port_ranges_become_exact_prefixes() -> None:
    for low, high in ((80, 80), (8000, 8100), (1, 65535), (0, 65535), (1024, 2047), (81, 90)):
        blocks = port_prefixes(low, high)
        covered = set()
        for port, bits in blocks:
            size = 1 << (16 - bits)
            assert port % size == 0
            covered |= set(range(port, port + size))
        assert covered == set(range(low, high + 1)), (low, high)
    assert port_prefixes(0, 65535) == [(0, 0)]
    assert len(port_prefixes(1, 65535)) == 16



def test_cluster_network_policy_tiers(lab: Lab, pins: Path) -> None:  # noqa: F811
    """The Admin tier before NetworkPolicy (Deny wins over its allow, Pass falls through to
    it), the Baseline tier after it for a pod no NetworkPolicy isolates. (The order of rules
    within a tier is the compiler's: tests/test_cnp_model.py.)"""
    a, b = lab.pods["backend-a"], lab.pods["backend-b"]

    def tier(tier: str, action: str, precedence: int = 1) -> list[object]:
        return [tier, "ingress", CLIENT_ID, "TCP", 8080, None, action, precedence]

    np_allows = {"in": True, "out": False, "allow": [["ingress", CLIENT_ID, "TCP", 8080]]}
    open_ = {"in": False, "out": False, "allow": []}
    got = run(lab, pins, [
        state(lab, {**np_allows, "tiers": [tier("admin", "Deny")]}, open_),
        ["probe", a],                                             # Admin Deny wins
        state(lab, {**np_allows, "tiers": [tier("admin", "Pass")]}, open_),
        ["probe", a],                                             # Pass: NetworkPolicy allows
        state(lab, open_, {**open_, "tiers": [tier("baseline", "Deny")]}),
        ["probe", b],                                             # Baseline Deny
        state(lab, open_, {**open_, "tiers": [tier("baseline", "Accept")]}),
        ["probe", b],                                             # Baseline Accept
        state(lab, {**np_allows, "tiers": [tier("baseline", "Deny")]}, open_),
        ["probe", a],                                             # NetworkPolicy decided
    ])
    assert got == ["timeout", "backend-a", "timeout", "backend-b", "backend-a"]
