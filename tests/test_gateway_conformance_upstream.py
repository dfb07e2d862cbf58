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


@pytest.fixture(scope="module")
def suite(lab: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[upstream.Outcome, Path]:
    """The selection in one run of the suite, as implementations run it (its base resources
    applied once)."""
    log = tmp_path_factory.mktemp("upstream") / "suite.log"
    out = upstream.run(lab, profiles=list(upstream.PROFILES), run_test=None, skip=[],
                       report=None, log=log, timeout="15m", only=list(SELECTION))
    return out, log


@pytest.mark.parametrize("test", SELECTION)
def test_upstream_conformance(suite: tuple[upstream.Outcome, Path], test: str) -> None:
    out, log = suite
    assert out.results.get(test) == "PASS", (out.results.get(test), log.read_text()[-6000:])
