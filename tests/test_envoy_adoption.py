"""Envoy outlives the agent: real `mesh run` processes, a real Envoy, real requests.

An agent killed outright leaves its Envoy serving; the next agent with the same state
directory adopts it (same pid), serves it the same configuration without disturbing it, and
supervises it from then on. A stop on purpose stops Envoy, unless --keep-envoy.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh.echo import EchoIdentity, EchoServer
from mesh.envoy.admin import EnvoyAdmin
from mesh.envoy.supervisor import proc_start_time
from meshxds.address import ListenAddress
from tests.test_gateway_agent import GATEWAY, route, service
from tests.testbed import http_get, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "127.5.0.1"  # the Gateway's address in GATEWAY
PORT = 8080


def alive(pid: int) -> bool:
    return proc_start_time(pid) is not None  # a zombie counts as gone


@dataclass
class Load:
    """One client thread sending requests through the Gateway, one after the other, a new
    connection every few requests, until stopped."""

    host: str = "a.example"
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        conn = http.client.HTTPConnection(ADDRESS, PORT, timeout=5)
        n = 0
        while not self._stop.is_set():
            try:
                conn.request("GET", "/load", headers={"Host": self.host})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"HTTP {resp.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(repr(e))
                conn.close()
            n += 1
            if n % 10 == 0:
                conn.close()
            time.sleep(0.005)
        conn.close()

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.ok > 20 or self.failed, what="traffic")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def more(self, n: int, timeout: float = 10.0, what: str = "more traffic") -> None:
        start = self.ok
        wait_until(lambda: self.ok >= start + n, timeout=timeout, what=what)


class Node:
    """A state directory, its manifests and echo backend, and the agents run on them. Every
    agent and every Envoy it ever saw is killed at cleanup, whatever happened."""

    def __init__(self) -> None:
        # Short: unix socket paths are limited to 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-adopt-"))
        self.state = self.dir / "state"
        self.manifests = self.dir / "manifests"
        self.manifests.mkdir()
        self.echo = EchoServer("127.0.0.1", 0, EchoIdentity(pod="echo-1")).start()
        (self.manifests / "gateway.yaml").write_text(GATEWAY)
        (self.manifests / "service.yaml").write_text(service(self.echo.port))
        (self.manifests / "a.yaml").write_text(route("a", "a.example"))
        self.agents: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.envoy_pids: set[int] = set()
        self.admin = EnvoyAdmin(ListenAddress.parse(f"unix:{self.state}/envoy-admin.sock"))

    def start(self, *args: str, node_id: str = "adopt") -> subprocess.Popen[bytes]:
        log = self.dir / f"agent-{len(self.logs) + 1}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "run", "--manifests", str(self.manifests),
             "--state-dir", str(self.state), "--node-id", node_id, *args],
            stderr=log.open("wb"), cwd=ROOT)
        self.agents.append(proc)
        self.logs.append(log)
        wait_until(lambda: b"node ready" in log.read_bytes() or proc.poll() is not None,
                   timeout=30, what="mesh run to be ready")
        assert proc.poll() is None, log.read_text()
        self.envoy_pid()
        return proc

    @property
    def agent(self) -> subprocess.Popen[bytes]:
        return self.agents[-1]

    def log(self, i: int = -1) -> str:
        return self.logs[i].read_text()

    def envoy_pid(self) -> int:
        pid = int(json.loads((self.state / "envoy.pid").read_text())["pid"])
        self.envoy_pids.add(pid)
        return pid

    def kill_agent(self) -> None:
        self.agent.send_signal(signal.SIGKILL)
        self.agent.wait(10)

    def stop_agent(self) -> str:
        self.agent.send_signal(signal.SIGTERM)
        assert self.agent.wait(15) == 0, self.log()
        return self.log()

    def answers(self, host: str = "a.example") -> bool:
        return http_get(PORT, "/", host=host, address=ADDRESS, timeout=2).status == 200

    def counters(self) -> dict[str, int]:
        """Envoy's counters that move when a listener, cluster or route table is replaced."""
        keep = ("listener_manager.listener_modified", "listener_manager.listener_removed",
                "listener_manager.listener_in_place_updated",
                "listener_manager.total_listeners_draining",
                "cluster_manager.cluster_modified", "cluster_manager.cluster_removed")
        return {k: v for k, v in self.admin.stats().items()
                if k in keep or k.endswith(".config_reload")}

    def close(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                if "envoy started pid=" in line:
                    self.envoy_pids.add(int(line.split("envoy started pid=")[1].split()[0]))
        for pid in self.envoy_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.echo.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# gRPC's own report when the xDS server stops while Envoy is still connected to it (an
# agent stopped with --keep-envoy): the stream handler is cancelled. Not ours to hide here.
_GRPC_CANCELLED = ("Traceback (most recent call last):\n"
                   '  File "src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi", '
                   "line 812, in grpc._cython.cygrpc._schedule_rpc_coro\n"
                   "asyncio.exceptions.CancelledError\n")


def _known_noise(log: str) -> str:
    return log.replace(_GRPC_CANCELLED, "")


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    try:
        yield n
        for i in range(len(n.logs)):
            assert "Traceback" not in _known_noise(n.log(i)), n.log(i)
    finally:
        n.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["delta", "sotw"])
def test_agent_sigkill_under_load_fails_no_request(node: Node, protocol: str) -> None:
    node.start("--protocol", protocol)
    wait_until(node.answers, what="route a answering")
    pid = node.envoy_pid()
    wait_until(lambda: node.counters().get("listener_manager.total_listeners_draining") == 0,
               what="the first listeners in place")
    before = node.counters()
    with Load() as load:
        node.kill_agent()
        # No agent: Envoy keeps serving its last configuration.
        assert alive(pid)
        load.more(100, what="traffic with the agent dead")
        node.start("--protocol", protocol)
        load.more(100, what="traffic after the restart")
    assert load.failed == [], load.failed[:5]
    assert load.ok > 200
    assert node.envoy_pid() == pid
    log = node.log()
    assert "adopted the running envoy" in log and f"pid={pid}" in log
    assert "envoy started" not in log
    # Envoy's reconnect backoff is bounded at 1 s in the bootstrap: the new agent is ready soon.
    ready_s = float(log.split("node ready")[1].split("seconds=")[1].split()[0])
    assert ready_s < 3.0, log
    # The same configuration, nothing Envoy runs replaced: no listener drained, no cluster or
    # route table swapped (delta: nothing resent; SotW: resent, and Envoy sees it unchanged).
    assert node.counters() == before

    # A route change made after the restart goes live, on the adopted Envoy.
    (node.manifests / "b.yaml").write_text(route("b", "b.example"))
    wait_until(lambda: node.answers("b.example"), what="route b answering")
    node.stop_agent()
    assert not alive(pid)
    assert not (node.state / "envoy.pid").exists()


@pytest.mark.slow
def test_agent_killed_twice_in_a_row(node: Node) -> None:
    node.start()
    pid = node.envoy_pid()
    with Load() as load:
        for _ in range(2):
            node.kill_agent()
            load.more(50, what="traffic with the agent dead")
            node.start()
            assert node.envoy_pid() == pid
            load.more(50, what="traffic after the restart")
    assert load.failed == [], load.failed[:5]
    (node.manifests / "a.yaml").write_text(route("a", "a2.example"))
    wait_until(lambda: node.answers("a2.example"), what="the edited route")
    assert not node.answers("a.example")
    assert node.envoy_pid() == pid


@pytest.mark.slow
def test_adopted_envoy_that_dies_is_restarted(node: Node) -> None:
    node.start()
    pid = node.envoy_pid()
    node.kill_agent()
    node.start()
    assert node.envoy_pid() == pid
    os.kill(pid, signal.SIGKILL)  # not the agent's child: watched through its pidfd
    wait_until(lambda: node.envoy_pid() != pid, what="a new envoy")
    wait_until(node.answers, what="route a answering again")
    # said by the agent's supervisor; its log line may land after the new Envoy answers
    wait_until(lambda: "envoy exited, restarting" in node.log(), what="the restart logged")


@pytest.mark.slow
def test_envoy_killed_while_agent_down(node: Node) -> None:
    node.start()
    pid = node.envoy_pid()
    node.kill_agent()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), what="envoy gone")
    node.start()
    wait_until(node.answers, what="route a answering")
    assert node.envoy_pid() != pid
    log = node.log()
    assert "envoy from the pid file is gone, starting a new one" in log
    assert "envoy started" in log


def test_sigterm_stops_envoy_and_keep_envoy_keeps_it(node: Node) -> None:
    node.start()
    pid = node.envoy_pid()
    node.stop_agent()
    assert not alive(pid), "a stop on purpose stops envoy"
    assert not (node.state / "envoy.pid").exists()

    node.start("--keep-envoy")
    pid = node.envoy_pid()
    log = node.stop_agent()
    assert "leaving envoy running" in log
    assert alive(pid)
    assert node.answers()
    # The next agent adopts it; stopped without --keep-envoy, it takes Envoy along.
    node.start()
    assert node.envoy_pid() == pid
    node.stop_agent()
    assert not alive(pid)


def test_pid_file_of_another_process_is_left_alone(node: Node) -> None:
    node.state.mkdir(mode=0o700)
    other = subprocess.Popen(["sleep", "60"])
    try:
        start_time = proc_start_time(other.pid)
        (node.state / "envoy.pid").write_text(json.dumps({
            "pid": other.pid, "start_time": start_time, "binary": "/usr/bin/envoy",
            "bootstrap": str(node.state / "envoy-bootstrap.json"), "node_id": "adopt",
            "admin": "unix:x"}))
        node.start()
        assert "not our envoy, leaving it alone" in node.log()
        assert "not an envoy process" in node.log()
        assert other.poll() is None
        assert node.envoy_pid() != other.pid
        wait_until(node.answers, what="route a answering")
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_our_envoy_with_another_bootstrap_is_replaced(node: Node) -> None:
    node.start("--envoy-log-level", "info")
    pid = node.envoy_pid()
    # Envoy's own log reaches the agent's log, through the file in the state directory.
    wait_until(lambda: "starting main dispatch loop" in node.log(), what="envoy's log")
    assert (node.state / "envoy.log").exists()
    node.kill_agent()
    node.start(node_id="renamed")
    log = node.log()
    assert "found our envoy but cannot adopt it, replacing it" in log
    assert "started with another bootstrap" in log
    assert not alive(pid)
    assert node.envoy_pid() != pid
    wait_until(node.answers, what="route a answering")
