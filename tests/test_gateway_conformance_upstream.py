"""A CI-sized selection of the upstream Gateway API conformance suite (its own Go test
binary, unmodified) against a lab: `make conformance` runs all of it; these run in
`make test`, one test of each kind the suite checks (HTTP routing, listeners and status,
gRPC, TLS passthrough, a backend over TLS, TCP and UDP by weight)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance import upstream

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.e2e]

SELECTION = ("HTTPRouteSimpleSameNamespace", "GatewayWithAttachedRoutes",
             "HTTPRouteWeight", "GRPCExactMethodMatching", "TLSRouteSimpleSameNamespace",
             "BackendTLSPolicy", "TCPRouteWeightedRouting", "UDPRouteWeightedRouting")


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    if not upstream.BINARY.exists():
        pytest.fail(f"{upstream.BINARY} is missing: make test builds it")
    name = f"u{os.getpid() % 10000}"
    try:
        yield upstream.lab_up(name)
    finally:
        down = subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name", name],
                              cwd=upstream.ROOT, capture_output=True, text=True)
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("test", SELECTION)
def test_upstream_conformance(lab: dict[str, Any], test: str, tmp_path: Path) -> None:
    out = upstream.run(lab, profiles=list(upstream.PROFILES), run_test=test, skip=[],
                       report=None, log=tmp_path / "suite.log", timeout="10m")
    assert out.results.get(test) == "PASS", (out.results.get(test),
                                             (tmp_path / "suite.log").read_text()[-6000:])
