"""The runner: every case's Ingresses served by a real `mesh run --manifests DIR` (with the
real Envoy it starts), its requests sent to the Ingress address and judged.

One agent serves every case, as one ingress-nginx controller serves upstream's. Its watched
directory holds `base.yaml` (the IngressClass `mesh`, the Services `main` and `canary` with
EndpointSlices to two `mesh.echo.EchoServer`s) and `case.yaml`: the running case's
Ingresses and certificates, and a probe Ingress whose host changes with every write. All
Ingresses of the class share one route table, so once the probe's new host answers, Envoy
serves that write: the case's configuration, or (after the case) none of it. The probe
Ingress also keeps the Ingress address allocated from case to case.

Each step writes the case's Ingresses so far (created or replaced by name; creation times
in the order they were first applied), waits for the probe, then sends its requests in
order: the first one retried until it meets its expectation or RETRY seconds pass
(upstream waits for the configuration with WaitForNginxServer), every other judged once.
A case stops at its first failing request. After the case, `case.yaml` is rewritten with
the probe alone, and the case is over when the agent serves that.

Cases upstream runs with the controller option `use-forwarded-headers: true` (its
ipdenylist tests) run on a second agent started with `--use-forwarded-headers`, on another
address pool, when `mesh run` has that option.
"""

from __future__ import annotations

import datetime
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.echo import EchoIdentity, EchoServer
from tests.conformance.certs import tls_secret
from tests.ingress_nginx import cases as data
from tests.ingress_nginx import judge
from tests.ingress_nginx.cases import Case
from tests.manifests import docs, local_service
from tests.meshrun import ROOT, MeshRun
from tests.testbed import wait_until

POOLS = {"main": "127.5.43.0/24", "forwarded": "127.5.44.0/24"}  # unused by other tests
NAMESPACE = "default"
PROBE = "zz-ingress-nginx-e2e-probe"
FORWARDED_FLAG = "--use-forwarded-headers"
RETRY = 10.0  # seconds: the first request of a step, until the configuration is live
LIVE = 20.0  # seconds: for the agent to serve a write of case.yaml
_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@dataclass
class CaseResult:
    case: Case
    outcome: str  # PASS | FAIL
    detail: str = ""
    judged: int = 0  # requests judged (each repetition, each distribution counts once)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # the agent's, on the case's Ingresses

    def line(self) -> str:
        return f"{self.outcome} {self.case.id}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Run:
    results: list[CaseResult]
    seconds: float
    notes: list[str] = field(default_factory=list)  # things seen beside the cases


def has_forwarded_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "run", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    return FORWARDED_FLAG in out


class Agent:
    """One `mesh run` and its watched directory."""

    def __init__(self, root: Path, name: str, pool: str, echoes: dict[str, EchoServer],
                 *extra: str) -> None:
        self.name = name
        self.dir = root / name
        self.manifests = self.dir / "manifests"
        self.manifests.mkdir(parents=True)
        base: list[dict[str, Any]] = [
            {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
             "metadata": {"name": "mesh"},
             "spec": {"controller": "mesh.dev/ingress-controller"}}]
        for backend, server in echoes.items():
            base += local_service(backend, [server.port], NAMESPACE, target_port=server.port)
        (self.manifests / "base.yaml").write_text(docs(*base))
        self.token = 0
        self.address = ""
        self._write([])
        self.run = MeshRun(self.manifests, self.dir / "s", "--address-pool", pool, *extra,
                           node_id=f"ingress-nginx-{name}", fresh=True,
                           log=self.dir / "agent.log", wait=False)

    def start(self) -> None:
        deadline = time.monotonic() + 60
        while b"node ready" not in self.run.log.read_bytes():
            if self.run.proc.poll() is not None:
                raise RuntimeError(f"mesh run exited with {self.run.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("mesh run was not ready within 60s")
            time.sleep(0.1)

        def address() -> str | None:
            item = self.run.items().get(("Ingress", PROBE))
            lb = ((item or {}).get("status") or {}).get("loadBalancer", {}).get("ingress")
            return str(lb[0]["ip"]) if lb else None

        self.address = wait_until(address, timeout=LIVE, what="the Ingress address")
        problem = self._wait_live()
        if problem:
            raise RuntimeError(f"agent {self.name}: {problem}\n{self.log_tail()}")

    def _probe_host(self) -> str:
        return f"probe-{self.token}.ingress-nginx-e2e.invalid"

    def _write(self, objects: list[dict[str, Any]]) -> None:
        self.token += 1
        probe = data.ingress({"name": PROBE, "host": self._probe_host(), "path": "/",
                              "backend": "main"}, NAMESPACE, "2000-01-01T00:00:00Z")
        tmp = self.manifests / ".case.yaml.tmp"  # hidden: the agent reads no dot-file
        tmp.write_text(docs(*objects, probe))
        tmp.replace(self.manifests / "case.yaml")

    def _probe(self) -> bool:
        conn = http.client.HTTPConnection(self.address, 80, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": self._probe_host()})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status == 200 and json.loads(body).get("pod") == judge.PODS["main"]
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()

    def _wait_live(self) -> str | None:
        deadline = time.monotonic() + LIVE
        while time.monotonic() < deadline:
            if self._probe():
                return None
            if self.run.proc.poll() is not None:
                return f"mesh run exited with {self.run.proc.returncode}"
            time.sleep(0.05)
        errors = {Path(k).name: v for k, v in self.run.file_errors().items()}
        return f"the agent did not serve the write within {LIVE:.0f}s" + \
            (f" (file errors: {errors})" if errors else "")

    def apply(self, objects: list[dict[str, Any]]) -> str | None:
        """Write `objects` as the case's (with a new probe); None once Envoy serves them."""
        self._write(objects)
        return self._wait_live()

    def warnings(self, names: set[str]) -> list[str]:
        out = []
        for (kind, name), item in sorted(self.run.items().items()):
            if kind == "Ingress" and name in names:
                out += [f"{name}: {e.get('message')}" for e in item.get("events") or []]
        return out

    def alive(self) -> bool:
        return self.run.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.run.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> str:
        return self.run.stop() if self.alive() else self.run.log.read_text(errors="replace")


class Runner:
    def __init__(self, log: Callable[[str], None] = print, verbose: bool = False,
                 retry: float = RETRY) -> None:
        self.log = log
        self.verbose = verbose
        self.retry = retry
        self.created = 0  # creation times handed out, one second apart
        self.secrets: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}

    def _timestamp(self) -> str:
        self.created += 1
        when = _EPOCH + datetime.timedelta(seconds=self.created)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _secret(self, ing: dict[str, Any]) -> dict[str, Any]:
        key = (data.tls_secret_name(ing), tuple(ing["tls"]))
        if key not in self.secrets:
            self.secrets[key] = tls_secret(NAMESPACE, key[0], list(key[1]))
        return self.secrets[key]

    def run_case(self, agent: Agent, case: Case) -> CaseResult:
        started = time.monotonic()
        result = CaseResult(case, "FAIL")
        if case.problems:
            result.detail = "; ".join(case.problems)
            return result
        current: dict[str, dict[str, Any]] = {}
        created: dict[str, str] = {}
        captured: dict[str, str] = {}
        multi = len(case.steps) > 1
        try:
            problem = self._steps(agent, case, current, created, captured, result, multi)
            result.warnings = agent.warnings(set(current))
        finally:
            cleanup = agent.apply([])
        if problem is None and cleanup is not None:
            problem = f"after the case, removing its Ingresses: {cleanup}"
        result.outcome, result.detail = ("FAIL", problem) if problem else ("PASS", "")
        result.seconds = time.monotonic() - started
        return result

    def _steps(self, agent: Agent, case: Case, current: dict[str, dict[str, Any]],
               created: dict[str, str], captured: dict[str, str], result: CaseResult,
               multi: bool) -> str | None:
        for sn, step in enumerate(case.steps, 1):
            where = f"step {sn} " if multi else ""
            for ing in step.apply:
                current[ing["name"]] = ing
                if ing["name"] not in created:
                    created[ing["name"]] = self._timestamp()
            objects = [data.ingress(i, NAMESPACE, created[n]) for n, i in current.items()]
            objects += [self._secret(i) for i in current.values() if i.get("tls")]
            problem = agent.apply(objects)
            if problem:
                return f"{where}applying the Ingresses: {problem}"
            for rn, req in enumerate(step.requests, 1):
                for i in range(req.repeat):
                    def once(req: data.Request = req) -> str | None:
                        return judge.attempt(agent.address, req, captured)

                    first = rn == 1 and i == 0
                    problem = judge.eventually(once, self.retry) if first else once()
                    result.judged += 1
                    rep = f" (repetition {i + 1} of {req.repeat})" if req.repeat > 1 else ""
                    what = f"{where}request {rn}{rep} {req.describe(agent.address)}"
                    if self.verbose:
                        self.log(f"    {what}: {problem or 'ok'}")
                    if problem:
                        return f"{what}: {problem}"
        return None


def select(cases: list[Case], pattern: str | None) -> list[Case]:
    if not pattern:
        return cases
    p = pattern.lower()
    return [c for c in cases if p in c.id.lower() or p == c.annotation.lower()]


def run(pattern: str | None = None, data_dir: Path | None = None,
        log: Callable[[str], None] = print, verbose: bool = False,
        retry: float = RETRY) -> Run:
    """Run the cases whose id contains `pattern` (or whose annotation is `pattern`)."""
    started = time.monotonic()
    every = data.load(data_dir)
    chosen = select(every, pattern)
    runner = Runner(log, verbose, retry)
    results: dict[str, CaseResult] = {}
    notes: list[str] = []
    groups = {"main": [c for c in chosen if not c.forwarded_headers],
              "forwarded": [c for c in chosen if c.forwarded_headers]}
    if groups["forwarded"] and not has_forwarded_flag():
        for c in groups.pop("forwarded"):
            results[c.id] = CaseResult(c, "FAIL", "mesh run has no --use-forwarded-headers")
            log(results[c.id].line())
    groups = {k: v for k, v in groups.items() if v}
    root = Path(tempfile.mkdtemp(prefix="inx-", dir="/tmp"))  # short: unix sockets
    echoes = {b: EchoServer("127.0.0.1", 0, EchoIdentity(pod=judge.PODS[b],
                                                         namespace=NAMESPACE)).start()
              for b in data.BACKENDS}
    agents: dict[str, Agent] = {}
    try:
        for name in groups:
            extra = (FORWARDED_FLAG,) if name == "forwarded" else ()
            agents[name] = Agent(root, name, POOLS[name], echoes, *extra)
        for name, group in groups.items():
            agent = agents[name]
            try:
                agent.start()
                down = ""
            except (RuntimeError, AssertionError) as e:
                down = f"mesh run ({name}) did not start: {str(e).splitlines()[0]}"
                notes.append(f"{down}\n{agent.log_tail()}")
            if verbose and not down:
                log(f"agent {name}: Ingress address {agent.address}, log {agent.run.log}")
            for case in group:
                if not down and not agent.alive():
                    down = f"mesh run ({name}) exited"
                    notes.append(f"{down}:\n{agent.log_tail()}")
                r = results[case.id] = CaseResult(case, "FAIL", down) if down else \
                    runner.run_case(agent, case)
                log(r.line() + (f" ({r.seconds:.1f}s)" if verbose else ""))
                for w in r.warnings if verbose else ():
                    log(f"    warning: {w}")
    finally:
        for name, agent in agents.items():
            text = agent.stop()
            if "Traceback" in text:
                notes.append(f"agent {name}'s log has a Traceback: {agent.run.log}")
        for server in echoes.values():
            server.stop()
        if not notes:
            shutil.rmtree(root, ignore_errors=True)
    ordered = [results[c.id] for c in chosen]
    return Run(ordered, time.monotonic() - started, notes)


def report(run: Run) -> str:
    results = run.results
    passed = sum(r.outcome == "PASS" for r in results)
    lines = [f"cases: {passed} passed, {len(results) - passed} failed, of {len(results)} "
             f"({run.seconds:.0f}s)", "annotations:"]
    by_annotation: dict[str, list[CaseResult]] = {}
    for r in results:
        by_annotation.setdefault(r.case.annotation, []).append(r)
    for annotation, rs in sorted(by_annotation.items()):
        ok = sum(r.outcome == "PASS" for r in rs)
        lines.append(f"  {annotation}: {ok}/{len(rs)} passed")
    lines += [f"note: {n}" for n in run.notes]
    return "\n".join(lines)
