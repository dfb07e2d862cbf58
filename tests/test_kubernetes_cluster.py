"""Two nodes' agents against the API double, each with its own Envoy: once settled, nothing
is written again. The double is needed for that alone: it counts the status writes the agents
make, while a real API server shows no trace of an unchanged status written again (no new
resourceVersion). Everything else about the two nodes (one writer, the Gateway on the nodes'
addresses, Programmed merged with the lagging node named, the leader killed and the other
writing) runs against the real API server, on the same `Cluster`
(tests/test_kubernetes_cluster_real.py)."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kubeapi import BackgroundAPI
from tests.test_kubernetes_cluster_real import KINDS, Cluster, running
from tests.testbed import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NODES = {"node-a": "127.5.7.1", "node-b": "127.5.7.2"}


class DoubleBackend:
    """The API double on a thread of its own; it records every request."""

    def __init__(self, base: Path, namespace: str = "default") -> None:
        self.api = BackgroundAPI()
        self.namespace = namespace
        self.echo_address = "127.0.0.1"
        self.kubeconfig = self.api.kubeconfig(base / "kubeconfig")

    def apply(self, *objects: dict[str, Any]) -> None:
        for obj in objects:
            r = KINDS[obj["kind"]]
            self.api.put(r.group, r.plural, copy.deepcopy(obj))

    def node(self, name: str, address: str) -> None:
        self.api.put("", "nodes", {"metadata": {"name": name}, "status": {"addresses": [
            {"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]}})

    def get(self, kind: str, name: str) -> dict[str, Any]:
        r = KINDS[kind]
        found = self.api.api.resource(r.group, r.plural).objects.get(
            (self.namespace if r.namespaced else "", name))
        return copy.deepcopy(found) if found is not None else {}

    def status_puts(self) -> int:
        """Status writes of everything but the MeshNodes (whose heartbeats are written)."""
        return sum(1 for m, p in self.api.api.requests
                   if m == "PUT" and p.endswith("/status") and "/meshnodes/" not in p)

    def close(self) -> None:
        self.api.stop()


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster, DoubleBackend]]:
    base = Path(f"/tmp/mesh-kc-{os.getpid()}")  # short: it holds unix sockets
    base.mkdir(parents=True, exist_ok=True)
    backend = DoubleBackend(base)
    with running(backend, base, NODES) as c:
        yield c, backend


def test_settled_status_is_not_written_again(cluster: tuple[Cluster, DoubleBackend]) -> None:
    c, double = cluster
    c.start("node-a")
    wait_until(lambda: c.holder() == "node-a", timeout=10, what="node-a leading")
    c.start("node-b")
    wait_until(lambda: c.addresses() == list(NODES.values()), timeout=15,
               what="the Gateway's addresses")
    wait_until(c.reported, timeout=15, what="both nodes' MeshNodes")
    wait_until(lambda: (c.route_programmed() or {}).get("status") == "True",
               timeout=15, what="the route Programmed on both nodes")
    # Settled: nothing changes, nothing is written again.
    time.sleep(1.0)
    puts = double.status_puts()
    assert puts > 0  # what it wrote to get here
    time.sleep(2.0)
    assert double.status_puts() == puts
