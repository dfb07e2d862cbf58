"""NetworkPolicy enforced in a two-node lab (its real API server, the agents' eBPF datapath):
a CI-sized selection of the upstream cases (`python -m tests.netpol` runs all 23), and what a
user checks beyond them: a denied flow is dropped and counted, `mesh policy trace` names the
policy, connections keep working while their policy is edited, enforcement goes on while an
agent restarts; and each ClusterNetworkPolicy tier and action, Pass falling through to
NetworkPolicy and Baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.netpol import runner

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.e2e,
              pytest.mark.skipif(not runner.CASES.exists(), reason=f"{runner.CASES} is not "
                                 "beside the project (the shared data is read at run time)")]

SELECTION = ("default-deny-all", "allow-only-from-other-namespace-by-nsselector",
             "egress-named-port", "updated-pod-labels-deny", "egress-cidr-except",
             "ingress-egress-controlled-independently", "multiple-ingress-allow-all-precedence",
             "udp-allow-only-from-pod-in-other-namespace")


@pytest.fixture(scope="module")
def lab() -> Iterator[runner.Lab]:
    name = f"np{os.getpid() % 10000}"
    try:
        lab = runner.lab_up(name, 2, print)
        runner.wait_all_reachable(lab, print)
        yield lab
    finally:
        down = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", name],
                              cwd=runner.ROOT, capture_output=True, text=True)
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("case_id", SELECTION)
def test_upstream_case(lab: runner.Lab, case_id: str) -> None:
    case = next(c for c in runner.data()["reachability_cases"] if c["id"] == case_id)
    result = runner.run_case(lab, case, print)
    assert result.passed, "\n".join(result.wrong[:20])


ONLY_FROM_A = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "only-from-a", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
                          "ports": [{"port": 80}]}]}}


def _connects(lab: runner.Lab, source: str, target: str) -> bool:
    return lab.probe(source, [(f"{lab.cluster_ip(target)}:80", "tcp")])[0]


def _node_dir(lab: runner.Lab, pod_id: str) -> str:
    node = lab.state["pods"][pod_id]["node"]
    return f"/run/mesh/lab/{lab.name}/{node}/agent"


def _counters(lab: runner.Lab, pod_id: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "policy", "status", "--state-dir",
                          _node_dir(lab, pod_id), "-o", "json"], capture_output=True, text=True,
                         cwd=runner.ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    counters: dict[str, int] = json.loads(out.stdout)["counters"]
    return counters


@pytest.fixture
def only_from_a(lab: runner.Lab) -> Iterator[None]:
    lab.apply([ONLY_FROM_A])
    time.sleep(runner.SETTLE)
    try:
        yield
    finally:
        lab.kubectl("delete", "networkpolicy", "--all", "-n", "x")


def test_a_denied_flow_is_dropped_counted_and_explained(lab: runner.Lab,
                                                        only_from_a: None) -> None:
    before = _counters(lab, "x/b")
    assert _connects(lab, "x/a", "x/b")
    assert not _connects(lab, "x/c", "x/b")
    after = _counters(lab, "x/b")
    assert after["denied_ingress"] > before["denied_ingress"]
    trace = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "policy", "trace", "x/c", "x/b", "--port", "80",
         "--kubeconfig", str(lab.state["kubeconfig"])], capture_output=True, text=True,
        cwd=runner.ROOT, timeout=60)
    assert trace.returncode == 1, trace.stderr
    assert "verdict: DENIED (decided by x/only-from-a (Ingress))" in trace.stdout
    allowed = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "policy", "trace", "x/a", "x/b", "--port", "80",
         "--kubeconfig", str(lab.state["kubeconfig"])], capture_output=True, text=True,
        cwd=runner.ROOT, timeout=60)
    assert allowed.returncode == 0 and "verdict: ALLOWED" in allowed.stdout, allowed.stdout


def test_connections_keep_working_while_their_policy_is_edited(lab: runner.Lab,
                                                               only_from_a: None) -> None:
    """x/a connects to x/b again and again (a new connection every 5 ms or so) while
    the policy that lets it is rewritten five times, each time still allowing it: no
    connection fails."""
    target = f"{lab.cluster_ip('x/b')}:80"
    # Paced (5 ms apart) so that the client's ephemeral ports are never all in TIME_WAIT.
    loop = ("import json, sys, time\nfrom mesh.lab.agnhost import connect\n"
            "end = time.monotonic() + float(sys.argv[2]); ok = 0; errors = []\n"
            "while time.monotonic() < end:\n"
            "    e = connect(sys.argv[1], 'tcp', 1.0)\n"
            "    if e: errors.append(e)\n"
            "    else: ok += 1\n"
            "    time.sleep(0.005)\n"
            "print(json.dumps([ok, errors]))\n")
    load = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab.name, "-n", "x", "a",
         "--", sys.executable, "-c", loop, target, "12"], stdout=subprocess.PIPE, text=True,
        cwd=runner.ROOT)
    time.sleep(2)
    for i in range(5):
        edited = json.loads(json.dumps(ONLY_FROM_A))
        edited["spec"]["ingress"][0]["ports"].append({"port": 1000 + i})
        lab.apply([edited])
        time.sleep(1.5)
    out, _ = load.communicate(timeout=60)
    ok, errors = json.loads(out)
    assert ok > 100 and not errors, (ok, errors[:5])


def test_enforcement_goes_on_while_the_agent_restarts(lab: runner.Lab,
                                                      only_from_a: None) -> None:
    agent = f"--state-dir {_node_dir(lab, 'x/b')}"
    pids = subprocess.run(["pgrep", "-f", "--", agent], capture_output=True,
                          text=True).stdout.split()
    assert pids, f"no agent runs with {agent}"
    subprocess.run(["kill", "-9", *pids], check=True)
    # While it is down (the lab restarts it), and after: the pinned maps decide.
    assert not _connects(lab, "x/c", "x/b")
    assert _connects(lab, "x/a", "x/b")
    time.sleep(5)
    assert not _connects(lab, "x/c", "x/b")
    assert _connects(lab, "x/a", "x/b")


def _cnp(name: str, tier: str, priority: int, action: str) -> dict[str, object]:
    """A ClusterNetworkPolicy on namespace x's pods: `action` for what comes from y."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": priority, "subject": {"namespaces": {
                "matchLabels": {"kubernetes.io/metadata.name": "x"}}},
                "ingress": [{"name": f"{action.lower()}-y", "action": action, "from": [
                    {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}}


ALLOW_ALL_X = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "allow-all", "namespace": "x"},
               "spec": {"podSelector": {}, "ingress": [{}]}}
DENY_ALL_X = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny-all", "namespace": "x"},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


@pytest.mark.parametrize("objects, from_y, from_z", [
    # Admin Deny wins over a NetworkPolicy that allows everything.
    ([_cnp("admin-deny", "Admin", 10, "Deny"), ALLOW_ALL_X], False, True),
    # Admin Accept wins over one that denies everything.
    ([_cnp("admin-accept", "Admin", 10, "Accept"), DENY_ALL_X], True, False),
    # Admin Pass: the NetworkPolicy decides (it denies), the Admin Accept after it is skipped.
    ([_cnp("admin-pass", "Admin", 5, "Pass"), _cnp("admin-accept", "Admin", 10, "Accept"),
      DENY_ALL_X], False, False),
    # No NetworkPolicy isolates x: Baseline Deny drops what comes from y.
    ([_cnp("baseline-deny", "Baseline", 10, "Deny")], False, True),
    # Pass falls through NetworkPolicy (none) to Baseline.
    ([_cnp("admin-pass", "Admin", 5, "Pass"), _cnp("baseline-deny", "Baseline", 10, "Deny")],
     False, True),
], ids=["admin-deny", "admin-accept", "admin-pass-to-netpol", "baseline-deny",
        "pass-to-baseline"])
def test_cluster_network_policy_tiers(lab: runner.Lab, objects: list[dict[str, object]],
                                      from_y: bool, from_z: bool) -> None:
    lab.apply(objects)
    try:
        time.sleep(runner.SETTLE)
        assert _connects(lab, "y/a", "x/b") is from_y
        assert _connects(lab, "z/a", "x/b") is from_z
        assert _connects(lab, "x/a", "y/b")  # y is no subject: untouched
    finally:
        lab.kubectl("delete", "clusternetworkpolicies", "--all")
        lab.kubectl("delete", "networkpolicy", "--all", "-n", "x")


# -- MeshNetworkPolicy: L7 rules in the node's Envoy -------------------------------------------

L7_NS = "l7"
ECHO = "registry.k8s.io/gateway-api/echo-basic:v1.5.1"


def _pod(name: str, labels: dict[str, str], container: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": L7_NS, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [container]}}


@pytest.fixture(scope="module")
def l7(lab: runner.Lab) -> Iterator[dict[str, str]]:
    """An HTTP echo, a gRPC echo and two clients in a namespace of their own; their
    addresses by pod name."""
    sleeper: dict[str, object] = {"name": "c", "image": "busybox:1.36",
                                  "command": ["sleep", "infinity"]}
    lab.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": L7_NS}},
               _pod("web", {"app": "web"}, {"name": "echo", "image": ECHO, "ports": [
                   {"name": "http", "containerPort": 3000}]}),
               _pod("grpc", {"app": "grpc"}, {"name": "echo", "image": ECHO, "env": [
                   {"name": "GRPC_ECHO_SERVER", "value": "1"}],
                   "ports": [{"name": "grpc", "containerPort": 3000}]}),
               _pod("a", {"app": "a"}, sleeper), _pod("b", {"app": "b"}, sleeper)])
    deadline = time.monotonic() + 120
    while True:
        lab.refresh()
        pods = {k.split("/")[1]: v for k, v in lab.state["pods"].items()
                if k.startswith(f"{L7_NS}/")}
        if len(pods) == 4 and all(p.get("ready") for p in pods.values()):
            break
        assert time.monotonic() < deadline, f"the l7 pods did not become ready: {pods}"
        time.sleep(1)
    yield {name: p["ip"] for name, p in pods.items()}
    lab.kubectl("delete", "namespace", L7_NS, "--wait=false")


def _mnp(name: str, app: str, port_rules: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNetworkPolicy",
            "metadata": {"name": name, "namespace": L7_NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                                  "toPorts": [{"port": 3000, **port_rules}]}]}}


def _curl(lab: runner.Lab, client: str, method: str, url: str) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab.name, "-n", L7_NS,
         client, "--", "curl", "-s", "-m", "3", "-X", method, "-w", "\n%{http_code}", url],
        capture_output=True, text=True, cwd=runner.ROOT, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    return code, body


def test_an_l7_rule_allows_get_public_to_one_client_and_not_post_admin(
        lab: runner.Lab, l7: dict[str, str]) -> None:
    web = f"http://{l7['web']}:3000"
    # No policy yet: the requests go straight to the pod (it sees the client's own address):
    # a pod without L7 rules never touches Envoy.
    code, body = _curl(lab, "a", "GET", f"{web}/public")
    assert code == "200" and json.loads(body)["client"].startswith(f"{l7['a']}:"), body
    lab.apply([_mnp("public-only", "web",
                    {"http": [{"method": "GET", "path": "/public.*"}]})])
    try:
        time.sleep(runner.SETTLE)
        code, body = _curl(lab, "a", "GET", f"{web}/public/index.html")
        assert code == "200", body
        assert not json.loads(body)["client"].startswith(f"{l7['a']}:")  # by the node Envoy
        code, body = _curl(lab, "a", "POST", f"{web}/admin")
        assert (code, body.strip()) == ("403", "Access denied by network policy l7/public-only")
        code, _ = _curl(lab, "a", "GET", f"{web}/private")
        assert code == "403"
        code, _ = _curl(lab, "b", "GET", f"{web}/public")
        assert code == "000"  # b is not allowed at all: dropped in the kernel
        status = lab.kubectl("get", "mnp", "public-only", "-n", L7_NS, "-o",
                             "jsonpath={.status.conditions[0].status}")
        assert status == "True"
    finally:
        lab.kubectl("delete", "mnp", "--all", "-n", L7_NS)


def test_a_grpc_method_rule(lab: runner.Lab, l7: dict[str, str]) -> None:
    from mesh.grpcecho import SERVICE

    lab.apply([_mnp("echo-only", "grpc", {"grpc": [{"service": SERVICE, "method": "Echo"}]})])
    call = ("import sys\nfrom mesh import grpcecho\n"
            "print(grpcecho.call(sys.argv[1], sys.argv[2], timeout=3)[0].name)\n")
    try:
        time.sleep(runner.SETTLE)
        got = {}
        for method in ("Echo", "EchoTwo"):
            out = subprocess.run(
                [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab.name, "-n",
                 L7_NS, "a", "--", sys.executable, "-c", call, f"{l7['grpc']}:3000", method],
                capture_output=True, text=True, cwd=runner.ROOT, timeout=60)
            got[method] = out.stdout.strip()
        assert got == {"Echo": "OK", "EchoTwo": "PERMISSION_DENIED"}, got
    finally:
        lab.kubectl("delete", "mnp", "--all", "-n", L7_NS)


# Resolves each name (the pod's resolver: its resolv.conf, the lab's DNS) and connects to it on
# port 80, or connects to an address as given; prints {target: "ADDRESS ok" | "ADDRESS error"}.
# With --tcp, a name is asked over TCP (dnslib) instead.
RESOLVE_CONNECT = r"""
import json, socket, sys
out = {}
tcp = sys.argv[1] == "--tcp"
for target in sys.argv[2:]:
    try:
        if tcp:
            from dnslib import DNSRecord
            nameserver = open("/etc/resolv.conf").read().split("nameserver")[1].split()[0]
            answer = DNSRecord.parse(DNSRecord.question(target + ".").send(
                nameserver, 53, tcp=True, timeout=3))
            address = str(answer.rr[0].rdata)
        else:
            address = socket.gethostbyname(target)
    except Exception as e:
        out[target] = f"unresolved {e}"
        continue
    try:
        with socket.create_connection((address, 80), timeout=2):
            out[target] = f"{address} ok"
    except OSError as e:
        out[target] = f"{address} {e or type(e).__name__}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def world(lab: runner.Lab, l7: dict[str, str]) -> Iterator[dict[str, str]]:
    """Two servers outside the cluster (port 80, on addresses of the lab's underlay namespace),
    named in the lab's DNS: name -> address."""
    from mesh.lab import cluster, dns

    under, index = f"{lab.name}-underlay", lab.state["index"]
    names = {"allowed.example.test": f"172.30.{index}.201",
             "other.example.test": f"172.30.{index}.202"}

    def ns(*args: str) -> None:
        subprocess.run(["ip", "netns", "exec", under, *args], check=True)

    for address in names.values():
        ns("ip", "addr", "add", f"{address}/32", "dev", "br0")
    for info in lab.state["node_info"]:  # the way back to the pods
        ns("ip", "route", "replace", info["podCIDR"], "via", info["underlay"], "dev", "br0",
           "onlink")
    server = subprocess.Popen(["ip", "netns", "exec", under, sys.executable, "-m",
                               "mesh.lab.agnhost", "serve-hostname", "--tcp", "--port", "80",
                               "--http=false"], cwd=runner.ROOT)
    hosts = cluster.lab_dir(lab.name) / "hosts"
    hosts.write_text("".join(f"{a} {n}\n" for n, a in names.items()))
    try:
        assert dns.HOSTS_TTL <= 10  # the test waits for an answer's TTL to run out
        yield names
    finally:
        hosts.unlink()
        server.kill()
        server.wait()
        for address in names.values():
            ns("ip", "addr", "del", f"{address}/32", "dev", "br0")


def _resolve_connect(lab: runner.Lab, client: str, *targets: str, tcp: bool = False
                     ) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab.name, "-n", L7_NS,
         client, "--", sys.executable, "-c", RESOLVE_CONNECT, "--tcp" if tcp else "--udp",
         *targets], capture_output=True, text=True, cwd=runner.ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    found: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_a_to_fqdns_rule_allows_one_name_and_not_another(
        lab: runner.Lab, l7: dict[str, str], world: dict[str, str]) -> None:
    from mesh.lab import dns

    allowed, other = world["allowed.example.test"], world["other.example.test"]
    before = _resolve_connect(lab, "a", *world)
    assert before == {n: f"{a} ok" for n, a in world.items()}, before
    lab.apply([{"apiVersion": "mesh.dev/v1alpha1", "kind": "MeshNetworkPolicy",
                "metadata": {"name": "only-allowed", "namespace": L7_NS},
                "spec": {"endpointSelector": {"matchLabels": {"app": "a"}},
                         "egress": [{"toFQDNs": [{"matchName": "allowed.example.test"}],
                                     "toPorts": [{"port": 80}]}]}}])
    try:
        time.sleep(runner.SETTLE)
        # Both names resolve (the pod's DNS goes through the node's DNS proxy); only the
        # allowed one's address connects.
        got = _resolve_connect(lab, "a", *world)
        assert got["allowed.example.test"] == f"{allowed} ok", got
        assert got["other.example.test"] == f"{other} timed out", got
        # the same over TCP DNS
        got = _resolve_connect(lab, "a", *world, tcp=True)
        assert got == {"allowed.example.test": f"{allowed} ok",
                       "other.example.test": f"{other} timed out"}, got
        # b has no policy: both, its DNS not proxied
        assert _resolve_connect(lab, "b", *world) == before
        # the node's maps say what a may reach, and for which name
        node_dir = f"/run/mesh/lab/{lab.name}/{lab.state['pods'][f'{L7_NS}/a']['node']}/agent"
        status = subprocess.run([sys.executable, "-m", "mesh.cli", "policy", "status",
                                 "--state-dir", node_dir, "-o", "json"], capture_output=True,
                                text=True, cwd=runner.ROOT, timeout=60)
        assert json.loads(status.stdout)["endpoints"][l7["a"]]["fqdn_addresses"] == [allowed]
        # The address is allowed for the answer's TTL only: once it ran out, a connection to
        # it (without asking DNS again) is dropped; asking again opens it again.
        time.sleep(dns.HOSTS_TTL + 2)
        assert _resolve_connect(lab, "a", allowed) == {allowed: f"{allowed} timed out"}
        assert _resolve_connect(lab, "a", "allowed.example.test") == {
            "allowed.example.test": f"{allowed} ok"}
        condition = lab.kubectl("get", "mnp", "only-allowed", "-n", L7_NS, "-o",
                                "jsonpath={.status.conditions[0].status}")
        assert condition == "True"
    finally:
        lab.kubectl("delete", "mnp", "--all", "-n", L7_NS)
