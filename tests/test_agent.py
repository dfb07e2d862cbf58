"""The agent's own parts: bootstrap, local-only endpoints, the supervisor, the `mesh` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mesh.echo import EchoServer
from mesh.envoy.bootstrap import BootstrapConfig, bootstrap
from mesh.envoy.supervisor import Backoff, EnvoySupervisor, proc_start_time
from meshxds.address import ListenAddress
from tests.test_xds_envoy import config, pod
from tests.testbed import Harness, http_get, wait_until

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"


def test_bootstrap_matches_golden_file() -> None:
    cfg = BootstrapConfig(
        node_id="node-a",
        xds=ListenAddress.parse("unix:/run/mesh/xds.sock"),
        admin=ListenAddress.parse("unix:/run/mesh/envoy-admin.sock"),
        max_downstream_connections=1000,
        ratelimit=ListenAddress.parse("unix:/run/mesh/ratelimit.sock"),
    )
    got = yaml.safe_dump(bootstrap(cfg), sort_keys=False)
    path = GOLDEN / "bootstrap.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


@pytest.mark.parametrize("address", ["0.0.0.0:18000", "10.1.2.3:18000", "[::]:18000",
                                     "example.com:80", "unix:relative/path", "18000"])
def test_only_local_addresses_are_accepted(address: str) -> None:
    with pytest.raises(ValueError):
        ListenAddress.parse(address)


@pytest.mark.parametrize("address", ["127.0.0.1:18000", "[::1]:18000", "localhost:1",
                                     "unix:/run/mesh/xds.sock", "unix:///run/mesh/xds.sock"])
def test_local_addresses_parse(address: str) -> None:
    assert ListenAddress.parse(address)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.e2e
def test_sockets_and_files_are_private(harness: Harness, echo_v1: EchoServer,
                                       free_port: int) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
    sup = harness.start_envoy()
    assert harness.address.unix_path is not None
    assert _mode(harness.address.unix_path) == 0o600
    assert _mode(harness.address.unix_path.parent) == 0o700
    assert sup.cfg.admin.unix_path is not None
    assert _mode(sup.cfg.admin.unix_path) == 0o600
    assert _mode(sup.bootstrap_path) == 0o600
    assert _mode(sup.state_dir) == 0o700


@pytest.mark.e2e
def test_xds_over_loopback_tcp(echo_v1: EchoServer, free_port: int) -> None:
    h = Harness()
    h.address = ListenAddress.parse("127.0.0.1:0")
    try:
        server = h.start_server()
        assert server.address.port != 0
        h.address = server.address
        h.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
        h.start_envoy(protocol="sotw")
        h.wait_settled()
        assert pod(free_port) == "echo-v1"
    finally:
        h.close()


@pytest.mark.e2e
def test_global_downstream_connection_limit(harness: Harness, echo_v1: EchoServer,
                                            free_port: int) -> None:
    harness.set_snapshot("node1", config(free_port, {"/": "v1"}, {"v1": echo_v1.port}))
    d = harness.dir / "limited"
    sup = EnvoySupervisor(
        BootstrapConfig(node_id="node1", xds=harness.address, max_downstream_connections=2,
                        admin=ListenAddress.parse(f"unix:{d}/admin.sock")), d)
    harness.sync(sup.start)
    harness.envoys.append(sup)
    harness.call(sup.wait_ready(timeout=15))
    held = [socket.create_connection(("127.0.0.1", free_port)) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        third = socket.create_connection(("127.0.0.1", free_port))
        third.settimeout(3)
        third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert third.recv(4096) == b""  # closed without an answer
        except ConnectionResetError:
            pass
        third.close()
        overflow = f"listener.127.0.0.1_{free_port}.downstream_global_cx_overflow"
        assert sup.admin.stats().get(overflow, 0) >= 1
    finally:
        for s in held:
            s.close()


def test_supervisor_backs_off_when_envoy_keeps_dying(tmp_path: Path) -> None:
    async def run() -> int:
        sup = EnvoySupervisor(
            BootstrapConfig(node_id="x", xds=ListenAddress.parse("unix:/nonexistent/x.sock"),
                            admin=ListenAddress.parse(f"unix:{tmp_path}/admin.sock")),
            tmp_path, backoff=Backoff(initial=0.05, maximum=0.4), binary=Path("/bin/false"))
        sup.start()
        await asyncio.sleep(1.0)
        await sup.stop()
        return sup.starts

    starts = asyncio.run(run())
    # Delays 0.05, 0.1, 0.2, 0.4, 0.4...: about 5 starts in a second, not hundreds.
    assert 3 <= starts <= 8, starts


def test_supervisor_stop_ends_envoy(harness: Harness) -> None:
    harness.set_snapshot("node1", [])
    sup = harness.start_envoy()
    pid = sup.pid
    assert pid is not None
    harness.call(sup.stop())
    assert sup.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    time.sleep(0.3)
    assert sup.starts == 1  # a requested stop is not a crash


@pytest.mark.parametrize(("on_purpose", "keep", "survives"), [
    (False, False, True),  # a cancellation alone (a crash elsewhere in the agent): detached
    (True, False, False),  # a stop on purpose: Envoy ends with the agent
    (True, True, True),  # a stop on purpose with --keep-envoy: left serving
])
def test_supervisor_component_detaches_unless_stopped_on_purpose(
        tmp_path: Path, on_purpose: bool, keep: bool, survives: bool) -> None:
    fake = tmp_path / "envoy"  # stands for Envoy: runs until signalled
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)

    async def run() -> int:
        stopping = asyncio.Event()
        sup = EnvoySupervisor(
            BootstrapConfig(node_id="x", xds=ListenAddress.parse("unix:/nonexistent/x.sock"),
                            admin=ListenAddress.parse(f"unix:{tmp_path}/admin.sock")),
            tmp_path / "state", binary=fake, stopping=stopping, keep=keep)
        task = asyncio.create_task(sup.run())
        async with asyncio.timeout(10):
            while sup.pid is None:
                await asyncio.sleep(0.01)
        pid = sup.pid
        if on_purpose:
            stopping.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return pid

    pid = asyncio.run(run())
    try:
        assert (proc_start_time(pid) is not None) == survives
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_mesh_run_serves_follows_and_survives_a_broken_file(tmp_path: Path) -> None:
    listen, backend = _free_port(), _free_port()
    demo = (ROOT / "examples/envoy/demo.yaml").read_text()
    demo = demo.replace("port_value: 10080", f"port_value: {listen}")
    demo = demo.replace("port_value: 18080", f"port_value: {backend}")
    resources = tmp_path / "resources.yaml"
    resources.write_text(demo)
    state = Path(f"/tmp/mesh-cli-{os.getpid()}")
    mesh = [sys.executable, "-m", "mesh.cli"]
    proc = subprocess.Popen(
        [*mesh, "run", "--resources", str(resources), "--state-dir", str(state),
         "--node-id", "cli-node", "--echo", f"127.0.0.1:{backend}"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # on a thread: a silent agent fails the test with what it said
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "node ready" in line:
                ready.set()
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(90), "no 'node ready' in 90 s:\n" + "".join(lines)
        reader.join(5)
        assert http_get(listen, "/hello").body == "hello from the node Envoy\n"
        assert http_get(listen, "/echo").json()["path"] == "/echo"

        out = subprocess.run([*mesh, "xds-status", "--state-dir", str(state), "-o", "json"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        entries = json.loads(out)["config"][0]["generic_xds_configs"]
        assert len(entries) == 4
        assert {e["config_status"] for e in entries} == {"SYNCED"}

        resources.write_text(demo.replace("hello from the node Envoy", "hello again"))
        wait_until(lambda: http_get(listen, "/hello").body == "hello again\n",
                   what="the edited file served")

        resources.write_text("resources: [ {not yaml")
        time.sleep(0.5)
        assert http_get(listen, "/hello").body == "hello again\n"  # last good config kept

        table = subprocess.run([*mesh, "xds-status", "--state-dir", str(state)],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout
        assert re.search(r"RouteConfiguration\s*│\s*http\s*│\s*2\s*│\s*SYNCED", table), table
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        lines.append(err)
        shutil.rmtree(state, ignore_errors=True)
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "resource file rejected, keeping the last good config" in log
    assert "agent stopped" in log
    envoy_pids = re.findall(r"envoy started pid=(\d+)", log)
    assert len(envoy_pids) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(int(envoy_pids[0]), 0)


@pytest.mark.e2e
@pytest.mark.parametrize("node_id", ["n", "on", "yes", "0x10", "null"])
def test_node_ids_that_look_like_other_types(harness: Harness, node_id: str) -> None:
    harness.set_snapshot(node_id, [])
    sup = harness.start_envoy(node_id)
    assert sup.starts == 1
    assert json.loads(sup.admin.get("/server_info"))["node"]["id"] == node_id
