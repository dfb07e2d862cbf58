"""Restarts: of the control server under load, and of Envoy itself."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mesh.echo import EchoServer
from mesh.envoy.bootstrap import Protocol
from meshxds.acks import AckState
from meshxds.cache import SnapshotCache
from tests.test_xds_envoy import config, pod
from tests.testbed import Harness, SteadyLoad, http_get, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.parametrize("protocol", ["sotw", "delta"])]


def test_server_restart_under_load_fails_no_request(
        harness: Harness, echo_v1: EchoServer, free_port: int, protocol: Protocol) -> None:
    resources = config(free_port, {"/": "v1"}, {"v1": echo_v1.port})
    harness.set_snapshot("node1", resources)
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    with SteadyLoad(free_port, threads=2) as load:
        wait_until(lambda: load.result.ok > 20, what="traffic")
        harness.stop_server()
        # The control plane is down: Envoy keeps serving its last configuration.
        n = load.result.ok
        wait_until(lambda: load.result.ok > n + 50, what="traffic with no control plane")
        # A new server process starts with an empty cache and rebuilds the same config.
        fresh = SnapshotCache()
        harness.start_server(fresh)
        harness.set_snapshot("node1", resources)
        harness.wait_settled(timeout=10)
        n = load.result.ok
        wait_until(lambda: load.result.ok > n + 20, what="traffic after the restart")
    assert load.result.failed == 0, load.result.errors[:5]
    assert {s.state for s in harness.status().values()} == {AckState.ACKED}
    assert sup.starts == 1  # Envoy itself never restarted


def test_server_restart_then_change_reaches_envoy(
        harness: Harness, echo_v1: EchoServer, echo_v2: EchoServer, free_port: int,
        protocol: Protocol) -> None:
    eps = {"v1": echo_v1.port, "v2": echo_v2.port}
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, eps))
    harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    harness.stop_server()
    harness.start_server(SnapshotCache())
    harness.set_snapshot("node1", config(free_port, {"/": "v2"}, eps))
    harness.wait_settled()
    assert pod(free_port) == "echo-v2"


def test_killed_envoy_is_back_with_full_config_within_2s(
        harness: Harness, echo_v1: EchoServer, free_port: int, protocol: Protocol) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
    sup = harness.start_envoy(protocol=protocol)
    harness.wait_settled()
    old_pid = sup.pid
    assert old_pid is not None
    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def answered() -> bool:
        return http_get(free_port, timeout=0.5).status == 200

    wait_until(answered, timeout=5, interval=0.01, what="Envoy back")
    back_in = time.monotonic() - killed
    assert back_in < 2.0, f"back after {back_in:.2f}s"
    assert sup.pid not in (None, old_pid)
    assert sup.starts == 2
    harness.wait_settled()
    assert pod(free_port) == "echo-v1"
