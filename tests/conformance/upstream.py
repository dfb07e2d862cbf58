"""The Gateway API's own conformance suite against a lab: `python -m tests.conformance.upstream`.

The suite is `sigs.k8s.io/gateway-api/conformance` at the version `hack/kube/go.mod` pins,
unmodified: its test binary is built from the module (`make conformance` builds it into
.kube/bin), and run as every implementation runs it, against a cluster: here a lab (its real
API server, the lab's kubelets, the agents, the nodes' Envoys), its client on this host
reaching the Gateways on the lab's routed address pool. It deploys its fixtures itself; the
lab's image map runs them (mesh/lab/images.py). The ConformanceReport it writes goes to
conformance/reports/<version>/mesh-<our version>.yaml.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from mesh.lab import cluster

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / ".kube" / "bin" / "gateway-api-conformance.test"
GATEWAY_API = "v1.6.1"
PROFILES = ("GATEWAY-HTTP", "GATEWAY-GRPC", "GATEWAY-TLS", "GATEWAY-TCP", "GATEWAY-UDP")
# The extended features claimed (the profiles' core features are implied).
SUPPORTED = (
    "BackendTLSPolicy", "BackendTLSPolicySANValidation", "GRPCRouteNamedRouteRule",
    "GatewayAddressEmpty", "GatewayFrontendClientCertificateValidation",
    "GatewayFrontendClientCertificateValidationInsecureFallback",
    "GatewayHTTPListenerIsolation", "GatewayPort8080", "GatewayStaticAddresses",
    "HTTPRoute303RedirectStatusCode", "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode", "HTTPRouteBackendProtocolH2C",
    "HTTPRouteBackendProtocolWebSocket", "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteBackendTimeout", "HTTPRouteCORS", "HTTPRouteDestinationPortMatching",
    "HTTPRouteHostRewrite", "HTTPRouteMethodMatching", "HTTPRouteNamedRouteRule",
    "HTTPRouteParentRefPort", "HTTPRoutePathRedirect", "HTTPRoutePathRewrite",
    "HTTPRoutePortRedirect", "HTTPRouteQueryParamMatching", "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors", "HTTPRouteRequestPercentageMirror",
    "HTTPRouteRequestTimeout", "HTTPRouteResponseHeaderModification", "HTTPRouteRetry",
    "HTTPRouteRetryBackendTimeout", "HTTPRouteRetryConnectionError",
    "HTTPRouteSchemeRedirect", "ListenerSet", "TLSRouteModeMixed", "TLSRouteModeTerminate",
    "GatewayBackendClientCertificate", "GatewayInfrastructurePropagation",
    "GatewayHTTPSListenerDetectMisdirectedRequests", "TCPRoute", "UDPRoute")
RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestConformance/([^/\s]+) \(([\d.]+)s\)")
STARTED = re.compile(r"^=== RUN\s+TestConformance/([^/\s]+)$")


@dataclass
class Outcome:
    results: dict[str, str] = field(default_factory=dict)  # test -> PASS | FAIL | SKIP
    seconds: float = 0.0
    code: int = 0

    def count(self, kind: str) -> int:
        return sum(v == kind for v in self.results.values())


def report_path() -> Path:
    return ROOT / "conformance" / "reports" / GATEWAY_API / f"mesh-{version('mesh')}.yaml"


def lab_up(name: str) -> dict[str, object]:
    state = cluster.read_state(name)
    if state is None:
        up = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "up", "--nodes", "2",
                             "--name", name, "--timeout", "240"], cwd=ROOT, text=True,
                            capture_output=True)
        if up.returncode != 0:
            raise SystemExit(f"the lab did not come up: {up.stderr.strip()}")
        state = cluster.read_state(name)
    assert state is not None
    return state


def run(state: dict[str, object], *, profiles: list[str], run_test: str | None,
        skip: list[str], report: Path | None, log: Path, timeout: str,
        only: list[str] | None = None) -> Outcome:
    """`run_test`: one test (the suite's --run-test); `only`: several, in one run of the
    suite (Go's subtest filter), so that its base resources are applied once: applied again
    by a second run while the agents write the status of the first run's objects, the
    suite's get-then-update of a Gateway can meet a 409 it does not retry."""
    pool = ipaddress.ip_network(str(state["pool"]))
    flags = [
        "--gateway-class=mesh", f"--conformance-profiles={','.join(profiles)}",
        f"--supported-features={','.join(SUPPORTED)}",
        "--organization=mesh", "--project=mesh",
        "--url=https://github.com/mesh-dev/mesh", f"--version=v{version('mesh')}",
        "--contact=@mesh-dev/maintainers", "--cleanup-base-resources=false",
        # A pool address no Gateway was given (the lab's pool is served by every node), and
        # one of the documentation's (no node has it).
        f"--usable-address={pool[-2]}", "--unusable-address=192.0.2.77"]
    if run_test:
        flags.append(f"--run-test={run_test}")
    if skip:
        flags.append(f"--skip-tests={','.join(skip)}")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        flags.append(f"--report-output={report}")
    env = {**os.environ, "KUBECONFIG": str(state["kubeconfig"])}
    out = Outcome()
    began = time.monotonic()
    with log.open("w") as f:
        pattern = "^TestConformance$" + (f"/^({'|'.join(only)})$" if only else "")
        proc = subprocess.Popen([str(BINARY), "-test.run", pattern, "-test.v",
                                 f"-test.timeout={timeout}", "-test.count=1", *flags],
                                cwd=ROOT / "hack" / "kube", env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            m = RESULT.match(line)
            if m:
                out.results[m.group(2)] = m.group(1)
                print(f"{m.group(1)} {m.group(2)} ({m.group(3)} s)", flush=True)
            elif (started := STARTED.match(line)) is not None:
                # Go prints the verdicts at the end: say where the suite is meanwhile.
                print(f"RUN {started.group(1)} ({time.monotonic() - began:.0f} s)", flush=True)
        out.code = proc.wait()
    out.seconds = time.monotonic() - began
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", default="gwconf", help="the lab to run it against "
                        "(brought up if it does not run)")
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    parser.add_argument("--profile", action="append", choices=PROFILES,
                        help="a profile to run (repeatable; default: all five)")
    parser.add_argument("--run-test", help="one test (its ShortName) instead of the suite")
    parser.add_argument("--skip", action="append", default=[], help="a test to skip")
    parser.add_argument("--report", type=Path, help=f"where the ConformanceReport goes "
                        f"(default: {report_path().relative_to(ROOT)}; none with --run-test)")
    parser.add_argument("--timeout", default="80m")
    args = parser.parse_args()
    if not BINARY.exists():
        raise SystemExit(f"{BINARY} is missing: `make conformance` builds it")
    report = args.report or (None if args.run_test else report_path())
    log = Path(f"/tmp/mesh-gateway-conformance-{args.lab}.log")
    state = lab_up(args.lab)
    try:
        out = run(state, profiles=args.profile or list(PROFILES), run_test=args.run_test,
                  skip=args.skip, report=report, log=log, timeout=args.timeout)
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name",
                            args.lab], cwd=ROOT, capture_output=True)
    print(f"{out.count('PASS')} passed, {out.count('FAIL')} failed, {out.count('SKIP')} "
          f"skipped in {out.seconds:.0f} s (exit {out.code}); the suite's output: {log}"
          + (f"; the report: {report}" if report else ""))
    sys.exit(1 if out.code or out.count("FAIL") else 0)


if __name__ == "__main__":
    main()
