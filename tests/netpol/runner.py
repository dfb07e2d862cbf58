"""The upstream Kubernetes NetworkPolicy e2e cases (../shared/netpol/cases.yaml, read at run
time) against a lab: its real API server, its agents' eBPF datapath.

The model as upstream builds it: namespaces x, y, z; pods a, b, c in each, one agnhost
container per port and protocol (80 and 81, TCP and UDP) with the named ports upstream gives
them; a Service per pod. Policies are created, updated and deleted, namespaces and pods
relabelled, through the API server (kubectl, the lab's admin). After each step's changes the
matrix is probed: every pod connects to every pod's Service ClusterIP on the step's ports
(`agnhost connect`, 1 s timeout, from inside the source pod), and the result compared with
upstream's expectation; as upstream, a step whose first probe disagrees is probed once more
and judged on that second probe.
"""

from __future__ import annotations

import concurrent.futures
import functools
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.lab import cluster

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT.parent / "shared" / "netpol" / "cases.yaml"
KUBECTL = ROOT / ".kube" / "bin" / "kubectl"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.53"
SETTLE = 3.0  # seconds a step's changes get before the probe (the cases' README)
RETRY_AFTER = 2.0
# Run in a source pod (its network namespace and cgroup: `mesh lab exec`): connect to every
# target at once, print one line of JSON: the targets answered.
PROBER = """
import concurrent.futures, json, sys
from mesh.lab.agnhost import connect
targets = json.loads(sys.argv[1])
with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
    done = list(pool.map(lambda t: connect(t[0], t[1], 1.0) == "", targets))
print(json.dumps(done))
"""


@functools.cache
def data() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(CASES.read_text(),
                                       Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return loaded


def manifests() -> list[dict[str, Any]]:
    """The model's namespaces, pods and Services."""
    model = data()["model"]
    out: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": n["name"]}} for n in model["namespaces"]]
    for p in model["pods"]:
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p["name"], "namespace": p["namespace"],
                         "labels": dict(p["labels"])},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [
                {"name": c["container"], "image": AGNHOST,
                 "args": ["serve-hostname", f"--{c['protocol'].lower()}", "--http=false",
                          "--port", str(c["port"])],
                 "ports": [{"name": c["name"], "containerPort": c["port"],
                            "protocol": c["protocol"]}]}
                for c in model["container_ports"]]}})
        out.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"s-{p['namespace']}-{p['name']}",
                         "namespace": p["namespace"]},
            "spec": {"selector": dict(p["labels"]), "ports": [
                {"name": f"service-port-{c['protocol'].lower()}-{c['port']}",
                 "port": c["port"], "targetPort": c["port"], "protocol": c["protocol"]}
                for c in model["container_ports"]]}})
    return out


@dataclass
class Lab:
    name: str
    state: dict[str, Any] = field(default_factory=dict)

    def refresh(self) -> None:
        found = cluster.read_state(self.name)
        assert found is not None, f"lab {self.name} is not running"
        self.state = found

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        r = subprocess.run([str(KUBECTL), "--kubeconfig", str(self.state["kubeconfig"]), *args],
                           input=input_text, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def apply(self, objects: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input_text=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objects}))

    def pod_ip(self, pod_id: str) -> str:
        return str(self.state["pods"][pod_id]["ip"])

    def cluster_ip(self, pod_id: str) -> str:
        ns, name = pod_id.split("/")
        for s in self.state["services"]:
            if s["namespace"] == ns and s["name"] == f"s-{ns}-{name}":
                return str(s["clusterIP"])
        raise KeyError(pod_id)

    def probe(self, source: str, targets: list[tuple[str, str]]) -> list[bool]:
        ns, pod = source.split("/")
        r = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", self.name,
                            "-n", ns, pod, "--", sys.executable, "-c", PROBER,
                            json.dumps(targets)], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"probe from {source}: {r.stderr.strip()[-500:]}")
        result: list[bool] = json.loads(r.stdout.strip().splitlines()[-1])
        return result


def fill(value: Any, ip: Callable[[str], str]) -> Any:
    """The ipBlock placeholders, with the pods' real addresses."""
    if isinstance(value, dict):
        return {k: fill(v, ip) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ip) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        kind, pod = m.group(1), m.group(2)
        address = ip(pod)
        if kind == "hostCIDR":
            return f"{address}/32"
        if kind == "supernet4":
            return str(ipaddress.ip_network(f"{address}/4", strict=False))
        return address
    return re.sub(r"\$\((hostCIDR|supernet4|podIP):([a-z]/[a-z])\)", one, value)


@dataclass
class CaseResult:
    id: str
    passed: bool
    probes: int = 0
    wrong: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _probe_step(lab: Lab, expect: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Probe every entry of the step's matrices: (entries probed, the wrong ones)."""
    entries = [e for x in expect for e in x["matrix"] if not e.get("ignored")]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_source.setdefault(e["from"], []).append(e)
    wrong = []
    with concurrent.futures.ThreadPoolExecutor(len(by_source)) as pool:
        futures = {
            source: pool.submit(lab.probe, source, [
                (f"{lab.cluster_ip(e['to'])}:{e['port']}", e["protocol"].lower())
                for e in es]) for source, es in by_source.items()}
        for source, future in futures.items():
            for e, got in zip(by_source[source], future.result(), strict=True):
                if got != e["allowed"]:
                    wrong.append(f"{e['from']} -> {e['to']} {e['protocol']}/{e['port']}: "
                                 f"expected {'allowed' if e['allowed'] else 'denied'}, got "
                                 f"{'allowed' if got else 'denied'}")
    return len(entries), wrong


def run_case(lab: Lab, case: dict[str, Any], log: Callable[[str], None]) -> CaseResult:
    began = time.monotonic()
    result = CaseResult(case["id"], True)
    added_ns: dict[str, set[str]] = {}
    added_pod: dict[str, set[str]] = {}
    try:
        for s, step in enumerate(case["steps"]):
            for action in step["actions"]:
                kind = action["action"]
                if kind == "apply":
                    lab.apply([fill(action["policy"], lab.pod_ip)])
                elif kind == "delete_all_policies":
                    for ns in action["namespaces"]:
                        lab.kubectl("delete", "networkpolicy", "--all", "-n", ns)
                elif kind == "add_namespace_labels":
                    lab.kubectl("label", "--overwrite", "namespace", action["namespace"],
                                *(f"{k}={v}" for k, v in action["labels"].items()))
                    added_ns.setdefault(action["namespace"], set()).update(action["labels"])
                elif kind == "add_pod_labels":
                    pod_id = f"{action['namespace']}/{action['pod']}"
                    lab.kubectl("label", "--overwrite", "pod", "-n", action["namespace"],
                                action["pod"], *(f"{k}={v}" for k, v in action["labels"].items()))
                    added_pod.setdefault(pod_id, set()).update(action["labels"])
                else:
                    raise ValueError(f"unknown action {kind}")
            time.sleep(SETTLE)
            probed, wrong = _probe_step(lab, step["expect"])
            if wrong:
                log(f"  step {s + 1}: {len(wrong)} of {probed} wrong; probing again")
                time.sleep(RETRY_AFTER)
                probed, wrong = _probe_step(lab, step["expect"])
            result.probes += probed
            if wrong:
                result.passed = False
                result.wrong += [f"step {s + 1}: {w}" for w in wrong]
    finally:
        for ns in ("x", "y", "z"):
            lab.kubectl("delete", "networkpolicy", "--all", "-n", ns)
        for ns, keys in added_ns.items():
            lab.kubectl("label", "namespace", ns, *(f"{k}-" for k in keys))
        for pod_id, keys in added_pod.items():
            ns, pod = pod_id.split("/")
            lab.kubectl("label", "pod", "-n", ns, pod, *(f"{k}-" for k in keys))
    result.seconds = time.monotonic() - began
    return result


def lab_up(name: str, nodes: int, log: Callable[[str], None]) -> Lab:
    """The lab with the model deployed (brought up if it does not run), every pod Ready."""
    lab = Lab(name)
    if cluster.read_state(name) is None:
        log(f"bringing up lab {name} ({nodes} nodes)")
        up = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "up", "--nodes",
                             str(nodes), "--name", name, "--timeout", "240"], cwd=ROOT,
                            text=True, capture_output=True)
        if up.returncode != 0:
            raise SystemExit(f"the lab did not come up: {up.stderr.strip()[-2000:]}")
    lab.refresh()
    lab.apply(manifests())
    deadline = time.monotonic() + 180
    want = [p["id"] for p in data()["model"]["pods"]]
    while True:
        lab.refresh()
        pods = lab.state.get("pods", {})
        services = {(s["namespace"], s["name"]) for s in lab.state.get("services", [])}
        if all(pods.get(p, {}).get("ready") for p in want) and all(
                (p.split("/")[0], f"s-{p.split('/')[0]}-{p.split('/')[1]}") in services
                for p in want):
            break
        if time.monotonic() > deadline:
            raise SystemExit("the model's pods did not all become Ready in 180 s")
        time.sleep(1)
    return lab


def wait_all_reachable(lab: Lab, log: Callable[[str], None], timeout: float = 60) -> None:
    """Before the first case, as upstream: every pod reaches every pod on every port."""
    model = data()["model"]
    pods = [p["id"] for p in model["pods"]]
    expect = [{"matrix": [{"from": a, "to": b, "port": c["port"], "protocol": c["protocol"],
                           "allowed": True} for a in pods for b in pods]}
              for c in model["container_ports"]]
    deadline = time.monotonic() + timeout
    while True:
        _, wrong = _probe_step(lab, expect)
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"not every pod reaches every pod: {wrong[:5]}")
        log(f"waiting for full reachability ({len(wrong)} probes fail)")
        time.sleep(2)


def run(lab: Lab, patterns: list[str], log: Callable[[str], None]) -> list[CaseResult]:
    cases = [c for c in data()["reachability_cases"]
             if not patterns or any(p in c["id"] for p in patterns)]
    wait_all_reachable(lab, log)
    out = []
    for case in cases:
        r = run_case(lab, case, log)
        log(f"{'PASS' if r.passed else 'FAIL'} {r.id} ({r.probes} probes, {r.seconds:.0f} s)")
        for w in r.wrong[:10]:
            log(f"  {w}")
        out.append(r)
    return out


def iter_ids() -> Iterator[str]:
    for c in data()["reachability_cases"]:
        yield str(c["id"])
