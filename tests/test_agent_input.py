"""Input that must not hurt the agent, end to end: a real `mesh run` (with the demo echo
backend in the same process) and a real Envoy, fed pathological manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.manifests import docs, local_service
from tests.meshrun import ROOT, MeshRun
from tests.test_gateway_agent import ADDRESS, GATEWAY, route
from tests.test_manifest_input import billion_laughs
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ECHO_PORT = 18591


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def service() -> str:
    return docs(*local_service("echo", [ECHO_PORT], target_port=ECHO_PORT))


def start(manifests: Path, state: Path, log: Path) -> MeshRun:
    return MeshRun(manifests, state, "--echo", f"127.0.0.1:{ECHO_PORT}", node_id="input",
                   log=log, wait=False)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    state = Path(f"/tmp/mesh-input-{os.getpid()}")
    state.mkdir(exist_ok=True)
    yield manifests, state, tmp_path / "agent.log"
    subprocess.run(["pkill", "-f", f"--config-path {state}/"], check=False)


def test_an_alias_bomb_is_refused_and_everything_else_keeps_working(
        dirs: tuple[Path, Path, Path]) -> None:
    manifests, state, log = dirs
    (manifests / "gateway.yaml").write_text(GATEWAY)
    (manifests / "service.yaml").write_text(service())
    (manifests / "a.yaml").write_text(route("a", "a.example"))
    agent = start(manifests, state, log)
    try:
        agent.wait_ready()
        wait_until(lambda: http_get(8080, "/", host="a.example", address=ADDRESS).status == 200,
                   what="route a")
        (manifests / "bomb.yaml").write_text(billion_laughs())
        (manifests / "deep.yaml").write_text("a: " + "[" * 500 + "]" * 500 + "\n")
        (manifests / "blob.yaml").write_bytes(os.urandom(4096).replace(b"\n", b"") + b"\x00")
        (manifests / "b.yaml").write_text(route("b", "b.example"))
        # The route added with them goes live: the agent is not wedged.
        wait_until(lambda: http_get(8080, "/", host="b.example", address=ADDRESS).status == 200,
                   what="route b")
        def status() -> str:
            return subprocess.run(
                [sys.executable, "-m", "mesh.cli", "status", "--state-dir", str(state)],
                capture_output=True, text=True, check=True, cwd=ROOT).stdout

        # Status follows the build that made route b live (it is written after it).
        def rejected() -> str:
            table = status()
            return table if all(f in table for f in ("bomb.yaml", "deep.yaml", "blob.yaml")) \
                else ""

        table = wait_until(rejected, what="the rejected files in mesh status")
        assert "bomb.yaml" in table and "expands to more than" in table
        assert "deep.yaml" in table and "nests deeper" in table
        assert "blob.yaml" in table and "binary" in table
        assert "expands to more than" in log.read_text()
        assert http_get(8080, "/", host="a.example", address=ADDRESS).status == 200
        # The echo backend in the same process still answers, and memory stayed bounded.
        assert http_get(ECHO_PORT, "/", address="127.0.0.1").status == 200
        assert rss_mib(agent.proc.pid) < 400
    finally:
        agent.stop(timeout=30)
    took = agent.stopped_in
    assert took is not None and took < 5, f"SIGTERM took {took:.1f}s"
    assert "Traceback" not in log.read_text()


def test_sigterm_during_a_big_first_build_stops_within_seconds(
        dirs: tuple[Path, Path, Path]) -> None:
    manifests, state, log = dirs
    (manifests / "gateway.yaml").write_text(GATEWAY)
    (manifests / "service.yaml").write_text(service())
    (manifests / "routes.yaml").write_text("---\n".join(
        route(f"r{i}", f"r{i}.example") for i in range(5000)))
    agent = start(manifests, state, log)
    wait_until(lambda: b"xds server listening" in log.read_bytes(), timeout=30,
               what="the agent to start")
    agent.stop(timeout=30)
    took = agent.stopped_in
    assert took is not None and took < 6, f"SIGTERM took {took:.1f}s"
    assert agent.proc.returncode is not None
