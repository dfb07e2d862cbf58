"""The conformance runner: the suite's manifests served by a real `mesh run`, its cases
replayed against the node's Envoy, a report per test and per feature.

One agent runs for the whole suite. The base manifests stay; each test's manifests are
written into the watched directory, judged, then removed, as the upstream suite applies and
deletes them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.store.kinds import KINDS, GroupKind
from mesh.store.objects import group_of
from mesh.translate.config import DEFAULT_CONTROLLER
from tests.conformance import judge
from tests.conformance.backends import Backends
from tests.conformance.certs import (
    backend_client_secret,
    ca_config_map,
    client_validation_objects,
    mismatch_ca_config_map,
    suite_secrets,
)
from tests.conformance.expectations import CHANGES, EXPECTATIONS, Change, Expect
from tests.conformance.suite import ConformanceTest, Suite

INFRA_NS = "gateway-conformance-infra"
UNUSABLE_ADDRESS = "198.51.100.77"  # documentation range: on no node
WEIGHTED = ("httproute-weight", "grpcroute-weight")
GRANT_DELETION = ("httproute-reference-grant",)


def _case(path: str, backend: str | None, status: int = 200, host: str = "",
          sender: str = "http.MakeRequestAndExpectEventuallyConsistentResponse",
          gateway: str = "same-namespace", server_name: str = "") -> dict[str, Any]:
    case: dict[str, Any] = {"Request": {"Path": path, "Host": host} if host else {"Path": path},
                            "Response": {"StatusCode": status}, "gateway": gateway,
                            "kind": "http", "sender": sender, "static": True}
    if backend:
        case.update(Backend=backend, Namespace=INFRA_NS)
    if sender.startswith("tls."):
        case["tlsServerName"] = server_name or host
    return case


def _misdirected(server_name: str, host: str, backend: str | None, status: int = 200,
                 ) -> dict[str, Any]:
    return _case("/detect-misdirected-requests", backend, status, host=host, sender=_TLS,
                 gateway="same-namespace-with-https-listener", server_name=server_name)


_TLS = "tls.MakeTLSRequestAndExpectEventuallyConsistentResponse"
_HTTP = "http.MakeRequestAndExpectEventuallyConsistentResponse"


def _btls(path: str, fail: bool = False, host: str = "abc.example.com",
          gateway: str = "same-namespace", client_sni: str = "") -> dict[str, Any]:
    """A request through a BackendTLSPolicy: answered by a TLS backend that saw SNI
    abc.example.com (the policies' hostname), or, with `fail`, refused."""
    case: dict[str, Any] = {
        "Request": {"Path": path, "Host": host}, "Namespace": INFRA_NS, "gateway": gateway,
        "kind": "http", "static": True,
        "sender": _TLS if client_sni else "http.MakeRequestAndExpectEventuallyConsistentResponse",
        "ExpectedRequest": {"Request": {"Path": path, "Host": host, "SNI": "abc.example.com"}}}
    if client_sni:
        case["tlsServerName"] = client_sni
    if fail:
        case["ExpectFailure"] = True
    return case
# Cases the data holds only as templates or not at all, written out from the tests'
# manifests (which route serves which host or path).
EXTRA_CASES: dict[str, list[dict[str, Any]]] = {
    "httproute-service-types": [
        _case("/manual-endpointslices", "infra-backend-v1"),
        _case("/headless", "infra-backend-v1"),
        _case("/headless-manual-endpointslices", "infra-backend-v1")],
    # Upstream sends these over HTTP/2; over HTTP/1.1 Envoy makes the same choice: the
    # filter chain by SNI, then the virtual host by Host.
    "httproute-https-listener-detect-misdirected-requests": [
        _misdirected("example.org", "example.org", "infra-backend-v1"),
        _misdirected("second-example.org", "second-example.org", "infra-backend-v2"),
        _misdirected("foo.wildcard.org", "foo.wildcard.org", "infra-backend-v3"),
        _misdirected("fourth-example.wildcard.org", "fourth-example.wildcard.org",
                     "infra-backend-v1"),
        _misdirected("second-example.org", "example.org", None, 421),
        _misdirected("second-example.org", "foo.wildcard.org", None, 421),
        _misdirected("foo.wildcard.org", "second-example.org", None, 421)],
    # The backend requires a client certificate its CA signed: only the one the Gateway's
    # spec.tls.backend names is.
    "gateway-tls-backend-client-certificate": [
        _case("/", "tls-backend-with-client-cert-validation", host="abc.example.com",
              gateway="gateway-tls-backend-client-certificate")],
    "backendtlspolicy": [
        _btls("/backendtlspolicy"),
        _btls("/backendtlspolicy-host-mismatch", fail=True, host="abc.example.org"),
        _btls("/backendtlspolicy-cert-mismatch", fail=True),
        # Re-encrypt: TLS from the client to the Gateway, TLS again to the backend.
        _btls("/backendtlspolicy", host="https-listener.org",
              gateway="same-namespace-with-https-listener", client_sni="https-listener.org")],
    "backendtlspolicy-san": [
        _btls(f"/backendtlspolicy-{name}", fail="mismatch" in name)
        for name in ("san-dns", "san-dns-mismatch", "san-uri", "san-uri-mismatch",
                     "multiple-sans", "multiple-mismatch-sans")],
    "httproute-https-listener": [
        _case("/", "infra-backend-v1", host="example.org", sender=_TLS,
              gateway="same-namespace-with-https-listener"),
        _case("/", "infra-backend-v2", host="second-example.org", sender=_TLS,
              gateway="same-namespace-with-https-listener"),
        _case("/", None, 404, host="unknown-example.org", sender=_TLS,
              gateway="same-namespace-with-https-listener")],
}
WEBSOCKET = {"httproute-backend-protocol-websocket": "same-namespace"}  # test -> Gateway
# Tests that check how an implementation without a feature reports it, or that are outside
# the HTTP, GRPC and TLS profiles.
NOT_APPLICABLE = {
    "main": "the suite's entry point, not a test",
    "tlsroute-listener-terminate-not-supported": "TLSRoute Terminate mode is supported",
    "tlsroute-listener-mixed-termination-not-supported": "mixed TLS termination is supported",
    "gateway-infrastructure": "it checks labels on the ServiceAccounts, Pods and Services "
    "an implementation generates for each Gateway; here one Envoy per node serves every "
    "Gateway and nothing is generated",
    "tcproute-": "TCPRoute is outside the HTTP, GRPC and TLS profiles",
    "udproute-": "UDPRoute is outside the HTTP, GRPC and TLS profiles",
}
REQUESTS = 500
TOLERANCE = 0.05
DISTRIBUTION_ATTEMPTS = 10  # upstream's: a fair sample misses 5 % now and then
_DEFAULT_CLIENT = "tls-validity-checks-client-certificate"
_PER_PORT_CLIENT = "tls-validity-checks-per-port-client-certificate"
# The frontend validation tests' TLS cases, which the data holds without the port and the
# client certificate upstream's test uses: (Host, expected to succeed) -> each (port,
# client certificate Secret or None) to send it with.
CLIENT_CERTIFICATES: dict[str, dict[tuple[str, bool], list[tuple[int, str | None]]]] = {
    "gateway-with-clientcertificate-validation": {
        ("example.org", True): [(443, _DEFAULT_CLIENT)],
        ("example.org", False): [(443, _PER_PORT_CLIENT)],
        ("second-example.org", True): [(8443, _PER_PORT_CLIENT)],
        ("second-example.org", False): [(8443, _DEFAULT_CLIENT)]},
    "gateway-invalid-default-frontend-client-certificate-validation": {
        ("example.org", False): [(443, None)]},
    # AllowInsecureFallback: the right certificate, the wrong one and none all get in.
    "gateway-with-clientcertificate-validation-insecure-fallback": {
        ("example.org", True): [(443, _DEFAULT_CLIENT), (443, _PER_PORT_CLIENT), (443, None)],
        ("second-example.org", True): [(8443, _PER_PORT_CLIENT), (8443, _DEFAULT_CLIENT),
                                       (8443, None)]},
}
_TLS_FAILURE = "tls.MakeTLSRequestAndExpectFailureResponse"
# The retry test's cases, which the data holds as one template: (path, the code the backend
# fails with, how many requests it fails, the status the client must see).
RETRIES = {"httproute-retry": [
    ("/retry/code-500-attempts-3", 500, 2, 200),
    ("/retry/code-500-attempts-3", 500, 4, 500),
    ("/retry/code-500-attempts-3", 503, 2, 503),
    *[("/retry/code-all-attempts-2", code, n, 200 if n == 1 else code)
      for code in (500, 502, 503, 504) for n in (1, 3)]]}


@dataclass
class TestResult:
    test: ConformanceTest
    outcome: str  # PASS | FAIL | SKIP
    detail: str = ""
    cases: list[tuple[str, str, str]] = field(default_factory=list)  # (name, outcome, detail)


def _objects_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata", {})
    return doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


class Runner:
    def __init__(self, suite: Suite, log: Callable[[str], None] = print) -> None:
        self.suite = suite
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-conf-"))
        self.manifests = self.dir / "manifests"
        self.manifests.mkdir()
        # Loopback ranges of its own, so two runs (a test and a manual one) never share an
        # address: pods in 127.N.0.0/16, Gateways in 127.(N+100).0.0/24.
        n = 10 + os.getpid() % 100
        self.gateway_pool = f"127.{n + 100}.0.0/24"
        self.usable_address = f"127.{n + 100}.1.1"
        self.backends = Backends(pool=f"127.{n}.0.0/16", log_dir=str(self.dir))
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = self.dir / "agent.log"
        self.trusted = b""
        self.backend_ca_pem = ""
        self.client_certificates: dict[str, tuple[Path, Path]] = {}  # Secret -> files

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        base = self.suite.base()
        secrets = suite_secrets()
        backend_ca = ca_config_map(secrets[-1], INFRA_NS, "tls-checks-ca-certificate")
        secrets.append(backend_client_secret(secrets[-1]))
        for sec in secrets:
            meta = sec["metadata"]
            self.backends.secrets[(meta["namespace"], meta["name"])] = (
                base64.b64decode(sec["data"]["tls.crt"]), base64.b64decode(sec["data"]["tls.key"]))
        self.backends.config_maps[(INFRA_NS, "tls-checks-ca-certificate")] = \
            backend_ca["data"]["ca.crt"].encode()
        self.backends.start(d for d in base if d.get("kind") == "Deployment")
        slices = self.backends.endpoint_slices(d for d in base if d.get("kind") == "Service")
        secrets += [backend_ca, mismatch_ca_config_map()]
        self.backend_ca_pem = backend_ca["data"]["ca.crt"]
        # The client trusts the suite's certificates, as upstream's does.
        self.trusted = b"".join(base64.b64decode(s["data"]["tls.crt"]) for s in secrets
                                if s["kind"] == "Secret")
        for doc in client_validation_objects():
            secrets.append(doc)
            if doc["kind"] == "Secret":
                files = (self.dir / f"{doc['metadata']['name']}.crt",
                         self.dir / f"{doc['metadata']['name']}.key")
                for path, field_ in zip(files, ("tls.crt", "tls.key"), strict=True):
                    path.write_bytes(base64.b64decode(doc["data"][field_]))
                    path.chmod(0o600)
                self.client_certificates[doc["metadata"]["name"]] = files
        self._write("00-base.yaml", [d for d in base if d.get("kind") != "Deployment"]
                    + slices + secrets)
        log = open(self.agent_log, "wb")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "run", "--manifests", str(self.manifests),
             "--state-dir", str(self.dir / "state"), "--node-id", "conformance",
             "--address-pool", self.gateway_pool, "--controller-name", DEFAULT_CONTROLLER],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while b"node ready" not in self.agent_log.read_bytes():
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mesh run did not start:\n" + self.agent_log.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        self.backends.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- manifests and status ------------------------------------------------------------------

    def _write(self, name: str, docs: list[dict[str, Any]]) -> None:
        tmp = self.dir / f".{name}"
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        os.replace(tmp, self.manifests / name)

    def status(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        try:
            doc = json.loads((self.dir / "state" / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {_objects_key(i): i for i in doc.get("items", [])}

    def _wait_status(self, keys: list[tuple[str, str, str]], present: bool,
                     timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if all((k in st) == present for k in keys):
                return True
            time.sleep(0.1)
        return False

    def gateway_address(self, namespace: str, name: str, listener: str | None = None,
                        protocol: str = "HTTP") -> tuple[str, int] | None:
        item = self.status().get(("Gateway", namespace, name))
        if item is None:
            return None
        addresses = item.get("status", {}).get("addresses") or []
        listeners = item.get("spec", {}).get("listeners") or []
        if not addresses or not listeners:
            return None
        http = [li for li in listeners if li.get("protocol") == protocol] or listeners
        chosen = next((li for li in listeners if li.get("name") == listener), http[0])
        return addresses[0]["value"], int(chosen["port"])

    # -- tests ---------------------------------------------------------------------------------

    def run_test(self, test: ConformanceTest) -> TestResult:
        docs = [d for m in test.manifests for d in self.suite.documents(m)]
        deployments = [d for d in docs if d.get("kind") == "Deployment"]
        if deployments:
            self.backends.start(deployments)
        for d in docs:
            # Upstream's test fills the manual EndpointSlices with infra-backend-v1's pods.
            if d.get("kind") == "EndpointSlice" and "manual-endpointslices" in \
                    d["metadata"]["name"] and d.get("addressType") == "IPv4":
                pods = self.backends.pods.get((INFRA_NS, "infra-backend-v1"), [])
                d["endpoints"] = [{"addresses": [p.ip], "conditions": {"ready": True}}
                                  for p in pods]
        self._static_addresses(docs)
        objects = [d for d in docs if d.get("kind") != "Deployment"]
        objects += self.backends.endpoint_slices(d for d in docs if d.get("kind") == "Service")
        # Kinds the agent does not handle (TCPRoute, UDPRoute...) never show in its status.
        keys = [_objects_key(d) for d in objects if GroupKind(
            group_of(str(d.get("apiVersion", ""))), str(d.get("kind", ""))) in KINDS]
        self._write("50-test.yaml", objects)
        try:
            self._wait_status(keys, present=True)
            return self._judge(test)
        finally:
            (self.manifests / "50-test.yaml").unlink(missing_ok=True)
            self._wait_status(keys, present=False)

    def _static_addresses(self, docs: list[dict[str, Any]]) -> None:
        """Fill in the addresses upstream asks the implementation for: one this node can
        serve a Gateway on (loopback, outside the pool) and one it cannot (TEST-NET-2)."""
        for d in docs:
            if d.get("kind") != "Gateway":
                continue
            for a in d.get("spec", {}).get("addresses") or []:
                if a.get("value") == "PLACEHOLDER_USABLE_ADDRS":
                    a.update(type="IPAddress", value=self.usable_address)
                elif a.get("value") == "PLACEHOLDER_UNUSABLE_ADDRS":
                    a.update(type="IPAddress", value=UNUSABLE_ADDRESS)

    def _judge(self, test: ConformanceTest) -> TestResult:
        result = TestResult(test, "PASS")
        for prefix, why in NOT_APPLICABLE.items():
            if test.name.startswith(prefix):
                return TestResult(test, "SKIP", why)
        # A case whose helper the data could not name is a plain request (upstream's
        # MakeRequestAndExpectEventuallyConsistentResponse in a loop over test cases).
        cases = [{**c, "sender": c.get("sender") or _HTTP} if c.get("static") else c
                 for c in test.cases]
        static = [c for c in [*cases, *EXTRA_CASES.get(test.name, [])]
                  if c.get("static") and c.get("sender") in (
            "http.MakeRequestAndExpectEventuallyConsistentResponse",
            "grpc.MakeRequestAndExpectEventuallyConsistentResponse",
            "tls.MakeTLSRequestAndExpectEventuallyConsistentResponse")]
        static += [c for c in cases if c.get("static") and (c.get("sender") ==
                   "tls.MakeTLSConnectionAndExpectEventuallyConnectionRejection" or (
                       c.get("sender") == _TLS_FAILURE and test.name in CLIENT_CERTIFICATES))]
        # Templates are written out in EXTRA_CASES and RETRIES: the rest are not run.
        written_out = test.name in RETRIES or test.name in EXTRA_CASES
        others = sum(1 for c in cases if c not in static
                     and not (written_out and not c.get("static")))
        expectations = EXPECTATIONS.get(test.name, [])
        for e in expectations:
            problem = self._eventually_status(e)
            result.cases.append((e.describe(), "PASS" if problem is None else "FAIL",
                                 problem or ""))
        for changes, after in CHANGES.get(test.name, []):
            if all(c[1] == "PASS" for c in result.cases):
                self._change(changes, after, result)
        if not test.cases and not expectations and test.name not in EXTRA_CASES:
            return TestResult(test, "SKIP", "status-only test: no checks yet")
        for i, case in enumerate(static):
            gw = case.get("gateway") or (test.gateways[0] if test.gateways else None)
            name = case.get("TestCaseName") or f"{i} {case.get('Request', {}).get('Host', '')}" \
                f"{case.get('Request', {}).get('Path', '')}"
            if gw is None:
                result.cases.append((name, "FAIL", "no gateway"))
                continue
            ns, _, gname = gw.rpartition("/")
            listener = (case.get("listeners") or [None])[0]
            tls = case.get("sender", "").startswith("tls.")
            protocol = "HTTP"
            if tls:
                protocol = "TLS" if test.name.startswith("tlsroute") else "HTTPS"
            target = None
            deadline = time.monotonic() + 20
            while target is None and time.monotonic() < deadline:
                target = self.gateway_address(ns or INFRA_NS, gname, listener, protocol)
                if target is None:
                    time.sleep(0.1)
            if target is None:
                result.cases.append((name, "FAIL", f"Gateway {gw} has no address"))
                continue
            host = (case.get("Request") or {}).get("Host") or ""
            if ":" in host and host.rsplit(":", 1)[1].isdigit():
                # Upstream sends these to the listener on the Host header's port.
                target = (target[0], int(host.rsplit(":", 1)[1]))
            if tls and test.name in CLIENT_CERTIFICATES:
                out = self._with_client_certificates(test.name, target[0], case)
            elif case.get("kind") == "grpc":
                out = judge.grpc_eventually(target[0], target[1], case)
            elif case["sender"].endswith("ConnectionRejection"):
                out = judge.rejected_eventually(target[0], target[1], case,
                                                judge.tls_context(self.trusted))
            else:
                out = judge.eventually(target[0], target[1], case,
                                       tls=judge.tls_context(self.trusted) if tls else None)
            if out.passed and case.get("MirroredTo"):
                out = self._mirrored(case)
            result.cases.append((name, "PASS" if out.passed else "FAIL", out.detail))
        for path, code, failures, want in RETRIES.get(test.name, []):
            target = self.gateway_address(INFRA_NS, test.gateways[0])
            case = {"Request": {"Path": path}, "Response": {"StatusCode": want},
                    "Backend": "infra-backend-v3", "Namespace": INFRA_NS}
            out = judge.retry_eventually(*target, case, code, failures) if target else \
                judge.Outcome(False, "no gateway address")
            result.cases.append((f"{path}: {failures} x {code} -> {want}",
                                 "PASS" if out.passed else "FAIL", out.detail))
        if test.name in WEBSOCKET and all(c[1] == "PASS" for c in result.cases):
            target = self.gateway_address(INFRA_NS, WEBSOCKET[test.name])
            out = judge.websocket_echo(*target, host="example.com") if target else \
                judge.Outcome(False, "no gateway address")
            result.cases.append(("WebSocket echo through the gateway",
                                 "PASS" if out.passed else "FAIL", out.detail))
        if test.name in GRANT_DELETION and result.cases and all(
                c[1] == "PASS" for c in result.cases):
            self._delete_grants(static[0], result)
        if test.name in WEIGHTED and result.cases and all(c[1] == "PASS" for c in result.cases):
            result.cases.append(self._distribution(test, static[0]))
        failed = [c for c in result.cases if c[1] == "FAIL"]
        if failed:
            result.outcome, result.detail = "FAIL", f"{failed[0][0]}: {failed[0][2]}"
        elif others:
            result.outcome = "SKIP" if not result.cases else "PASS"
            result.detail = f"{others} case(s) of other kinds not run yet"
        return result


    def _with_client_certificates(self, test: str, address: str,
                                  case: dict[str, Any]) -> judge.Outcome:
        host = (case.get("Request") or {}).get("Host") or ""
        succeeds = case["sender"] != _TLS_FAILURE
        plan = CLIENT_CERTIFICATES[test].get((host, succeeds))
        if not plan:
            return judge.Outcome(False, "no port and client certificate known for this case")
        for port, client in plan:
            ctx = judge.tls_context(self.trusted, self.client_certificates[client]
                                    if client else None)
            out = judge.eventually(address, port, case, tls=ctx) if succeeds else \
                judge.fails_eventually(address, port, case, ctx)
            if not out.passed:
                return judge.Outcome(False, f"port {port}, client certificate "
                                     f"{client or '(none)'}: {out.detail}")
        return judge.Outcome(True)

    def _change(self, changes: list[Change], after: list[Expect],
                result: TestResult) -> None:
        """Change objects' specs, as the upstream test does, and check status follows."""
        docs = []
        done = set()
        for d in yaml.safe_load_all((self.manifests / "50-test.yaml").read_text()):
            for kind, name, change in changes:
                if d.get("kind") == kind and d["metadata"]["name"] == name:
                    change(d)
                    done.add((kind, name))
            docs.append(d)
        for kind, name, change in changes:
            if (kind, name) not in done:  # a new object (ConfigMaps only, so far)
                new: dict[str, Any] = {"apiVersion": "v1", "kind": kind,
                                       "metadata": {"name": name, "namespace": INFRA_NS}}
                change(new)
                docs.append(new)
        for d in docs:
            if d.get("kind") == "ConfigMap" and (d.get("data") or {}).get("ca.crt") == \
                    "COPY_OF:tls-checks-ca-certificate":
                d["data"]["ca.crt"] = self.backend_ca_pem
        self._write("50-test.yaml", docs)
        for e in after:
            problem = self._eventually_status(e)
            result.cases.append(("after the change: " + e.describe(),
                                 "PASS" if problem is None else "FAIL", problem or ""))

    def _distribution(self, test: ConformanceTest,
                      case: dict[str, Any]) -> tuple[str, str, str]:
        """Send REQUESTS requests; each backend's share must be within TOLERANCE of the total
        of what its weight says, and a weight of 0 gets nothing. As upstream, a sample that
        misses may be drawn again, DISTRIBUTION_ATTEMPTS samples in all."""
        docs = [d for m in test.manifests for d in self.suite.documents(m)]
        route = next(d for d in docs if d.get("kind") in ("HTTPRoute", "GRPCRoute"))
        refs = route["spec"]["rules"][0]["backendRefs"]
        total_weight = sum(r.get("weight", 1) for r in refs)
        expected = {r["name"]: REQUESTS * r.get("weight", 1) / total_weight for r in refs}
        target = self.gateway_address(INFRA_NS, case["gateway"])
        assert target is not None
        name = f"weighted distribution over {REQUESTS} requests"
        problem = ""
        for attempt in range(1, DISTRIBUTION_ATTEMPTS + 1):
            seen = self._sample(target, case)
            problem = next((f"{backend}: {seen.get(backend, 0)} requests, expected {want:.0f}"
                            for backend, want in expected.items()
                            if (want == 0 and seen.get(backend, 0)) or
                            abs(seen.get(backend, 0) - want) > TOLERANCE * REQUESTS), "")
            if not problem:
                return name, "PASS", f"sample {attempt}" if attempt > 1 else ""
        return name, "FAIL", f"{DISTRIBUTION_ATTEMPTS} samples; the last: {problem}"

    def _sample(self, target: tuple[str, int], case: dict[str, Any]) -> dict[str, int]:
        """REQUESTS requests: how many each backend answered."""
        seen: dict[str, int] = {}
        for _ in range(REQUESTS):
            if case.get("kind") == "grpc":
                from mesh import grpcecho

                _, resp = grpcecho.call(f"{target[0]}:{target[1]}", "Echo")
                pod = resp.assertions.context.pod if resp is not None else ""
            else:
                _, _, body = judge.roundtrip(target[0], target[1], case)
                pod = json.loads(body).get("pod", "")
            backend = pod.rsplit("-", 2)[0]
            seen[backend] = seen.get(backend, 0) + 1
        return seen

    def _delete_grants(self, case: dict[str, Any], result: TestResult) -> None:
        """Delete the ReferenceGrants: the cross-namespace backend must then answer 500."""
        docs = [d for d in yaml.safe_load_all((self.manifests / "50-test.yaml").read_text())
                if d.get("kind") != "ReferenceGrant"]
        self._write("50-test.yaml", docs)
        denied = {**case, "Response": {"StatusCode": 500}}
        target = self.gateway_address(INFRA_NS, case["gateway"])
        out = judge.eventually(*target, denied) if target else judge.Outcome(False, "no address")
        result.cases.append(("after deleting the ReferenceGrant: 500",
                             "PASS" if out.passed else "FAIL", out.detail))

    def _eventually_status(self, e: Expect, timeout: float = judge.MAX_TIME) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            problem = e.check(self.status().get((e.kind, e.namespace, e.name)))
            if problem is None or time.monotonic() > deadline:
                return problem
            time.sleep(0.1)

    def _mirrored(self, case: dict[str, Any], timeout: float = 30) -> judge.Outcome:
        """Every mirror backend logged the request (upstream reads the pods' logs too)."""
        expected = (case.get("ExpectedRequest") or {}).get("Request") or case.get("Request")
        path = (expected or {}).get("Path") or "/"
        needles = (f"path={path} ", f'path="{path}"')
        for mirror in case["MirroredTo"]:
            ref = mirror["BackendRef"]
            ns = ref.get("Namespace") or case.get("Namespace") or INFRA_NS
            deadline = time.monotonic() + timeout
            while not any(n in self.backends.pod_logs(ns, ref["Name"]) for n in needles):
                if time.monotonic() > deadline:
                    return judge.Outcome(False, f"{ns}/{ref['Name']} never saw the mirrored "
                                         f"request for {path}")
                time.sleep(0.2)
        return judge.Outcome(True)


def run(patterns: list[str], log: Callable[[str], None] = print,
        data: Path | None = None) -> list[TestResult]:
    suite = Suite(data, DEFAULT_CONTROLLER) if data else Suite(controller=DEFAULT_CONTROLLER)
    tests = [t for t in suite.tests() if not patterns or any(p in t.name for p in patterns)]
    runner = Runner(suite, log)
    results = []
    try:
        runner.start()
        for test in tests:
            started = time.monotonic()
            r = runner.run_test(test)
            results.append(r)
            log(f"{r.outcome:4} {test.name} ({time.monotonic() - started:.1f}s)"
                + (f": {r.detail}" if r.detail else ""))
    finally:
        runner.stop()
        if all(r.outcome != "FAIL" for r in results):
            runner.cleanup()
        else:
            log(f"logs kept in {runner.dir}")
    return results


def report(results: list[TestResult]) -> str:
    lines = []
    by_feature: dict[str, list[str]] = {}
    for r in results:
        for f in r.test.features:
            by_feature.setdefault(f, []).append(r.outcome)
    total = {k: sum(1 for r in results if r.outcome == k) for k in ("PASS", "FAIL", "SKIP")}
    lines.append(f"tests: {total['PASS']} passed, {total['FAIL']} failed, "
                 f"{total['SKIP']} skipped")
    cases = [c for r in results for c in r.cases]
    lines.append(f"cases: {sum(c[1] == 'PASS' for c in cases)} passed, "
                 f"{sum(c[1] == 'FAIL' for c in cases)} failed")
    lines.append("features:")
    for f, outs in sorted(by_feature.items()):
        lines.append(f"  {f}: {outs.count('PASS')} passed, {outs.count('FAIL')} failed, "
                     f"{outs.count('SKIP')} skipped")
    return "\n".join(lines)
