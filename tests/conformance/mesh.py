"""The Gateway API mesh conformance profile (GAMMA, MESH-HTTP) in the lab.

The mesh suite's fixtures (../shared/conformance/gateway-api-v1.6.1-mesh) are applied to the
lab's API server and run as lab pods (our echo stands in for the upstream echo image: images
are not pulled), on two nodes with their kubelets, agents and Envoys. Each test's routes are
applied on their own, then every case is sent from inside the mesh, from the client
Deployment's pod, as upstream's MeshPod client sends it (the Service name resolved by cluster
DNS in the client's namespace), and judged as upstream's mesh client judges: status,
response headers, the headers the backend saw, the answering pod; three passes in a row within 30 s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.lab import cluster
from tests.conformance.judge import consistently, headers_problem
from tests.conformance.suite import DEFAULT_DATA

MESH_DATA = DEFAULT_DATA.parent / f"{DEFAULT_DATA.name}-mesh"
ROOT = Path(__file__).resolve().parents[2]
WEIGHT_BATCH, WEIGHT_TOLERANCE, WEIGHT_TRIES = 500, 0.05, 10

# Runs in a client pod: one JSON request per stdin line, one JSON answer per stdout line.
CLIENT = r"""
import http.client, json, sys
for line in sys.stdin:
    req = json.loads(line)
    try:
        c = http.client.HTTPConnection(req["host"], req["port"], timeout=10)
        c.putrequest(req["method"], req["path"], skip_host=True, skip_accept_encoding=True)
        headers = dict(req["headers"])
        headers.setdefault("Host", req["host_header"])
        for k, v in headers.items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        body = r.read()
        out = {"status": r.status, "headers": [[k.lower(), v] for k, v in r.getheaders()],
               "body": body.decode(errors="replace")}
        c.close()
    except OSError as e:
        out = {"status": 0, "headers": [], "body": str(e)}
    print(json.dumps(out), flush=True)
"""


@dataclass
class MeshResult:
    name: str
    features: list[str]
    outcome: str  # PASS | FAIL
    detail: str = ""
    cases: list[tuple[str, str]] = field(default_factory=list)

    @property
    def short_name(self) -> str:
        return self.name

    @property
    def test(self) -> MeshResult:
        """As the gateway runner's results are read by the report (profiles.py)."""
        return self


class Client:
    """A long-lived request loop in a client pod (one `mesh lab exec`)."""

    def __init__(self, lab: str, namespace: str, pod: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "lab", "exec", "--name", lab, "-n", namespace,
             pod, "--", sys.executable, "-c", CLIENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def send(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the client pod's request loop ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def base_manifests() -> list[dict[str, Any]]:
    """The suite's fixtures with our echo as the command of the echo-advanced containers
    (the lab pulls no images, and has no implementation of echo-advanced's own arguments):
    HTTP on 8080, the Services' target port."""
    docs = [d for d in yaml.safe_load_all((MESH_DATA / "base-manifests.yaml").read_text()) if d]
    for d in docs:
        if d.get("kind") == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                c.pop("args", None)
                c["command"] = [sys.executable, "-m", "mesh.cli", "echo", "--listen",
                                "0.0.0.0:8080"]
                c["ports"] = [{"name": "http", "containerPort": 8080}]
    return docs


def request_of(case: dict[str, Any], pod_ips: dict[str, str]) -> dict[str, Any]:
    req = case.get("Request") or {}
    host = re.sub(r"\{POD_IP:([^}]+)\}", lambda m: pod_ips[m.group(1)],
                  req.get("Host") or "echo")
    name, _, port = host.rpartition(":") if re.search(r":\d+$", host) else (host, "", "80")
    headers = dict(req.get("Headers") or {})
    return {"host": name, "port": int(port), "method": req.get("Method") or "GET",
            "path": req.get("Path") or "/", "headers": headers,
            "host_header": name if port == "80" else f"{name}:{port}"}


def judge(case: dict[str, Any], answer: dict[str, Any]) -> str | None:
    """None when the answer is what upstream's mesh client expects, else why not."""
    status = answer["status"]
    expected = case.get("Response") or {}
    codes = expected.get("StatusCodes") or [expected.get("StatusCode") or 200]
    if status not in codes:
        return f"expected status {codes}, got {status}: {answer['body'][:120]}"
    headers: dict[str, list[str]] = {}
    for k, v in answer["headers"]:
        headers.setdefault(k, []).append(v)
    problem = headers_problem("response", expected.get("Headers") or {}, headers)
    if problem:
        return problem
    for name in expected.get("AbsentHeaders") or []:
        if name.lower() in headers:
            return f"response header {name} should be absent"
    if status != 200:
        return None
    try:
        echo = json.loads(answer["body"])
    except ValueError:
        return f"not the echo's answer: {answer['body'][:100]!r}"
    exp = case.get("ExpectedRequest")
    if exp is not None:
        seen = {k.lower(): v for k, v in (echo.get("headers") or {}).items()}
        problem = headers_problem("request", (exp.get("Request") or {}).get("Headers") or {},
                                  seen)
        if problem:
            return problem
        for name in exp.get("AbsentHeaders") or []:
            if name.lower() in seen:
                return f"the backend should not see {name}"
    backend = case.get("Backend") or ""
    if not str(echo.get("pod", "")).startswith(backend):
        return f"expected a pod of {backend}, got {echo.get('pod')}"
    return None


class MeshRunner:
    def __init__(self, log: Callable[[str], None] = print, lab: str = "mconf") -> None:
        self.log = log
        self.lab = lab
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-conformance-"))
        self.clients: dict[tuple[str, str], Client] = {}
        self.cases = json.loads((MESH_DATA / "cases.json").read_text())

    def start(self) -> None:
        (self.dir / "base.yaml").write_text(yaml.safe_dump_all(base_manifests()))
        up = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "up", "--nodes", "2",
                             "--name", self.lab, "--manifests", str(self.dir)],
                            capture_output=True, text=True, cwd=ROOT)
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed: {up.stderr.strip()}")

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", self.lab],
                       capture_output=True, cwd=ROOT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _state(self) -> dict[str, Any]:
        state = cluster.read_state(self.lab)
        assert state is not None
        return state

    def _pod_ips(self) -> dict[str, str]:
        """"namespace/deployment" -> its first pod's address."""
        return {f"{ns}/{owner}": pod["ip"] for (ns, owner), (_, pod) in self._pods().items()}

    def _pods(self) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """(namespace, deployment) -> its first running pod (name, the lab's record)."""
        out: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        for key, pod in sorted(self._state()["pods"].items()):
            ns, name = key.split("/", 1)
            if pod["owner"] and not pod["deleting"]:
                out.setdefault((ns, pod["owner"]), (name, pod))
        return out

    def _client(self, spec: dict[str, Any]) -> Client:
        key = (spec["namespace"], spec["deployment"])
        if key not in self.clients:
            self.clients[key] = Client(self.lab, key[0], self._pods()[key][0])
        return self.clients[key]

    def _apply(self, manifests: list[str]) -> None:
        """Only this test's manifests besides the fixtures; back once the lab says every
        agent runs the new cluster state."""
        text = "\n---\n".join((MESH_DATA / "tests" / Path(m).name).read_text()
                               for m in manifests)
        (self.dir / "test.yaml").write_text(text)
        time.sleep(2.5)  # the lab's manifest follower and the agents' file provider
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self._state().get("ready"):
            time.sleep(0.2)

    def run_test(self, name: str, spec: dict[str, Any]) -> MeshResult:
        result = MeshResult(spec["shortName"], spec["features"], "PASS")
        self._apply(spec.get("manifests") or [])
        ips = self._pod_ips()
        for case in spec["cases"]:
            client = self._client(case["client"])
            req = request_of(case, ips)
            outcome = consistently(
                lambda c=case, cl=client, rq=req: judge(c, cl.send(rq)))  # type: ignore[misc]
            problem = None if outcome.passed else outcome.detail
            label = case.get("TestCaseName") or f"{req['method']} {req['host']}{req['path']}"
            result.cases.append((label, "PASS" if problem is None else "FAIL"))
            if problem is not None:
                result.outcome, result.detail = "FAIL", f"{label}: {problem}"
        weights = spec.get("weights")
        if weights and result.outcome == "PASS":
            problem = self._weights(spec["cases"][0], weights, ips)
            result.cases.append(("weighted distribution", "PASS" if problem is None
                                 else "FAIL"))
            if problem is not None:
                result.outcome, result.detail = "FAIL", problem
        return result

    def _weights(self, case: dict[str, Any], weights: dict[str, float],
                 ips: dict[str, str]) -> str | None:
        client = self._client(case["client"])
        req = request_of(case, ips)
        problem = "no batch"
        for _ in range(WEIGHT_TRIES):
            seen: Counter[str] = Counter()
            for _ in range(WEIGHT_BATCH):
                answer = client.send(req)
                if answer["status"] == 200:
                    pod = str(json.loads(answer["body"]).get("pod", ""))
                    seen[pod.rsplit("-", 2)[0]] += 1  # a ReplicaSet's pod: its Deployment
            shares = {k: v / WEIGHT_BATCH for k, v in seen.items()}
            off = {k: shares.get(k, 0.0) for k in set(shares) | set(weights)
                   if abs(shares.get(k, 0.0) - weights.get(k, 0.0)) > WEIGHT_TOLERANCE}
            if not off:
                return None
            problem = f"shares {shares}, expected {weights} within 5 points"
        return problem

    def tests(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, spec in sorted(self.cases.items()):
            out.append((name, spec))
            for variant in spec.get("variants") or []:
                out.append((f"{name}/{variant['shortName']}", {**spec, **variant}))
        return out


def run(patterns: list[str], log: Callable[[str], None] = print) -> list[MeshResult]:
    runner = MeshRunner(log)
    results = []
    try:
        runner.start()
        for name, spec in runner.tests():
            if patterns and not any(p in name or p in spec["shortName"] for p in patterns):
                continue
            started = time.monotonic()
            r = runner.run_test(name, spec)
            results.append(r)
            log(f"{r.outcome:4} {r.name} ({time.monotonic() - started:.1f}s)"
                + (f": {r.detail}" if r.detail else ""))
    finally:
        runner.stop()
    return results
