"""IPsec where the kernel has no ESP (these machines'): `mesh lab up --encryption ipsec`
refuses with the kernel's words and sets nothing up; an agent running IPsec anyway (its sink,
tests/ipsec_node.py, in a node namespace) says why in its status, configures nothing,
announces nothing, and fails closed: its peers' pod CIDRs are blackholed for the node's own
traffic (the pods' packets are dropped by the datapath: tests/test_datapath.py). A keys file
that does not parse is refused and the previous keys stay. Where the kernel has ESP, the
same sink runs under qemu: tests/test_ipsec_vm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.lab import cluster
from mesh.sinks.ipsec import probe_esp

MISSING = probe_esp()
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(MISSING is None, reason="this kernel has ESP: what the "
                                 "agent does without it cannot be shown here (with it: "
                                 "tests/test_ipsec_vm.py)")]
NODES = [
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "na"},
     "spec": {"podCIDRs": ["10.1.0.0/24"]},
     "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}},
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "nb", "annotations": {"mesh.dev/ipsec-spis": "1"}},
     "spec": {"podCIDRs": ["10.2.0.0/24"]},
     "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}]}}]


def test_the_lab_refuses_ipsec_without_esp_and_sets_nothing_up() -> None:
    name = f"ipsec{os.getpid() % 10000}"
    result = CliRunner().invoke(main, ["lab", "up", "--encryption", "ipsec", "--name", name])
    assert result.exit_code == 1
    assert f"--encryption ipsec: {MISSING}; nothing was set up" in result.output
    assert cluster.read_state(name) is None and not cluster.lab_dir(name).exists()


@pytest.fixture
def node_ns() -> Iterator[str]:
    name = f"mesh-ipsec-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_an_agent_without_esp_says_why_announces_nothing_and_fails_closed(
        node_ns: str, tmp_path: Path) -> None:
    (tmp_path / "nodes.json").write_text(json.dumps(NODES))
    keys = tmp_path / "na.keys"
    secret = os.urandom(20).hex()
    keys.write_text(f"1 rfc4106(gcm(aes)) {secret} 128\n")
    keys.chmod(0o600)
    agent = subprocess.Popen(
        ["ip", "netns", "exec", node_ns, sys.executable, "-m", "tests.ipsec_node",
         str(tmp_path), "na"], stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).parent.parent)
    status_file = tmp_path / "na" / "encryption.json"

    def status() -> dict:  # type: ignore[type-arg]
        try:
            return dict(json.loads(status_file.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    try:
        end = time.monotonic() + 20
        while not status().get("peers") and time.monotonic() < end:
            time.sleep(0.1)
        found = status()
        assert found["error"] == MISSING and found["announced"] is None
        (peer,) = found["peers"]
        assert (peer["node"], peer["state"], peer["problem"]) == (
            "nb", "down", "this kernel has no ESP")
        table = subprocess.run(["ip", "-n", node_ns, "route", "show", "table", "2005"],
                               capture_output=True, text=True, check=True).stdout
        assert "blackhole 10.2.0.0/24" in table
        assert subprocess.run(["ip", "-n", node_ns, "xfrm", "policy"], capture_output=True,
                              text=True, check=True).stdout == ""
        # a keys file that does not parse: refused, the previous keys stay
        keys.write_text("1 rfc4106(gcm(aes)) not-hex 128\n")
        end = time.monotonic() + 10
        while "refused" not in status().get("error", "") and time.monotonic() < end:
            time.sleep(0.1)
        assert status()["error"] == (f"{MISSING}; keys file {keys} refused: line 1: the SPI "
                                     "is not a number or the key not hex; the previous keys "
                                     "stay")
        assert status()["keySPIs"] == [1]
        assert not (tmp_path / "na.announce").exists()  # nothing ever announced
    finally:
        (tmp_path / "stop").touch()
        _, log = agent.communicate(timeout=20)
    assert agent.returncode == 0, log
    assert secret not in log and secret not in status_file.read_text()
    assert status_file.stat().st_mode & 0o777 == 0o600
