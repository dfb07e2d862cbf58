"""The agent's Prometheus metrics for real: a real Envoy's requests (through the access log
service) counted under Hubble's names, the xDS counters of a real stream, the datapath's
maps compiled by bcc, the endpoint scraped over HTTP with Envoy's own stats beside; and the
Grafana dashboard, whose every query must name a metric the agent or Envoy exports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mesh.agent.metrics import (
    AgentMetrics,
    DatapathCollector,
    MetricsServer,
    StoreCollector,
    XdsCollector,
)
from mesh.datapath.flowevents import FlowEvents
from mesh.datapath.programs import compile_program, unmount_bpffs
from mesh.echo import EchoServer
from mesh.envoy.admin import EnvoyAdmin
from mesh.flows.accesslog import AccessLogServer
from mesh.flows.store import FlowStore
from meshxds.address import ListenAddress
from tests.test_flows import serve_two_routes
from tests.testbed import Harness, http_get, wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "mesh.json"
FWD_TABLES = ("mesh_endpoints", "mesh_ct4", "mesh_policy_ct", "mesh_flows")


def exported(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's families can have (a labelled family with no
    sample yet still names its series)."""
    names = set()
    for family in registry.collect():
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def exposition_names(text: str) -> set[str]:
    return {re.split(r"[{\s]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


_FUNCTIONS_AND_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
                        "bool", "and", "or", "unless", "offset"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # groupings
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group() in _FUNCTIONS_AND_WORDS:
            continue  # a function or an aggregation
        names.add(m.group())
    return names


def dashboard_metrics() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            names |= promql_metrics(target["expr"])
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert m, query
            names.add(m.group(1))
    return names


def test_promql_names_are_read_right() -> None:
    assert promql_metrics('histogram_quantile(0.5, sum by (le, w) (rate(a_bucket{x="y(z)"}'
                          '[$__rate_interval])))') == {"a_bucket"}
    assert promql_metrics("max by (map) (b / c{i=~\".*\"})") == {"b", "c"}


@pytest.fixture
def pins(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bpffs"
    yield path
    unmount_bpffs(path)


def scrape(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def test_metrics_and_the_dashboard(harness: Harness, echo_v1: EchoServer, free_port: int,
                                   pins: Path) -> None:
    metrics = AgentMetrics()
    store = FlowStore(listener=metrics.flow)
    metrics.registry.register(StoreCollector(store))
    metrics.registry.register(XdsCollector(lambda: harness.cache.node("node1")))
    loaded = compile_program("fwd.c", pins)  # the datapath's maps, as the agent has them
    try:
        metrics.registry.register(DatapathCollector(
            {name: loaded.table(name) for name in FWD_TABLES}, FlowEvents(loaded).counters))
        socket = harness.dir / "accesslog.sock"
        accesslog = AccessLogServer(socket, store, "node1")
        admin = EnvoyAdmin(ListenAddress.parse(f"unix:{harness.dir / 'node1' / 'admin.sock'}"))
        server = MetricsServer("127.0.0.1", 0, metrics.registry,
                               lambda: admin.get("/stats/prometheus"))
        tasks = harness.sync(lambda: [asyncio.ensure_future(accesslog.run()),
                                      asyncio.ensure_future(server.run())])
        harness.call(accesslog.ready.wait())
        harness.call(server.ready.wait())
        serve_two_routes(harness, echo_v1.port, free_port, socket)
        try:
            for _ in range(3):
                assert http_get(free_port, "/").status == 200
            assert http_get(free_port, "/gone").status == 503
            wait_until(lambda: len(store) >= 4, timeout=10)
            agent = scrape(server.port, "/metrics")
            assert re.search(r'hubble_http_requests_total\{[^}]*method="GET",protocol="HTTP/1.1"'
                             r',reporter="server"[^}]*status="200"\} 3.0', agent), agent
            assert "_created" not in agent  # no creation-time series beside each
            assert 'status="503"' in agent
            assert re.search(r'hubble_flows_processed_total\{subtype="HTTP",type="L7",'
                             r'verdict="ERROR"\} 1.0', agent)
            assert re.search(r"hubble_http_request_duration_seconds_count\{[^}]*\} 4.0", agent)
            assert re.search(r'mesh_xds_acks_total\{type="Listener"\} [1-9]', agent), agent
            assert re.search(r'mesh_bpf_map_max_entries\{map="mesh_flows"\} 131072', agent)
            assert 'hubble_lost_events_total{source="PERF_EVENT_RING_BUFFER"} 0.0' in agent
            envoy = scrape(server.port, "/metrics/envoy")
            assert re.search(r'envoy_cluster_upstream_rq_total\{envoy_cluster_name="v1"\} 3',
                             envoy), envoy[:2000]
            with pytest.raises(urllib.error.HTTPError) as e:
                scrape(server.port, "/other")
            assert e.value.code == 404
            # The dashboard: every query reads a metric the agent or Envoy exports.
            names = exported(metrics.registry) | exposition_names(envoy)
            missing = dashboard_metrics() - names
            assert not missing, f"the dashboard reads what nothing exports: {missing}"
        finally:
            async def stop() -> None:
                for t in tasks:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t

            harness.call(stop)
    finally:
        loaded.close()
