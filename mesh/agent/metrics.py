"""The agent's Prometheus metrics, and the endpoint that serves them with Envoy's beside them.

Names are Hubble's where it has one (`hubble_flows_processed_total`, `hubble_drop_total`,
`hubble_policy_verdicts_total`, `hubble_http_requests_total`,
`hubble_http_request_duration_seconds`, `hubble_lost_events_total`), so dashboards made for
Hubble read them; the rest are the agent's own (`mesh_*`): xDS responses, ACKs and NACKs,
translation time, the datapath's map fill and flow events.

The endpoint: `/metrics` (the agent's) and `/metrics/envoy` (the node Envoy's own
`/stats/prometheus`, read from its admin socket), on loopback by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.flows.model import DROPPED, L7, SOCK, Flow
from mesh.flows.store import FOLLOWER_LOST, RING_LOST, FlowStore

log = logging.getLogger(__name__)
# No `_created` series beside each counter (Hubble exports none; they double the series).
# The library's switch is process-wide: the agent's process has this registry alone.
disable_created_metrics()  # type: ignore[no-untyped-call]
_SUBTYPES = {"TO_ENDPOINT": "to-endpoint", "TO_STACK": "to-stack", "TO_PROXY": "to-proxy",
             "TO_CRYPTO": "to-crypto"}
# Request durations: 1 ms to 10 s (Hubble's buckets are Prometheus's defaults; these fit a
# mesh's requests better and keep the count of series small).
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
MAP_COUNT_EVERY = 30.0  # seconds between counts of the datapath maps' entries


def _workload(e: Any) -> str:
    return e.workload or e.pod or ""


class AgentMetrics:
    """The metrics of one agent, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.flows = Counter("hubble_flows_processed", "Flows processed, by type, subtype "
                             "(where the datapath sent the packet) and verdict",
                             ["type", "subtype", "verdict"], registry=r)
        self.drops = Counter("hubble_drop", "Dropped flows by reason and protocol",
                             ["reason", "protocol"], registry=r)
        self.policy = Counter("hubble_policy_verdicts", "Policy verdicts of new connections "
                              "(the datapath's) and of requests (the node Envoy's)",
                              ["direction", "action"], registry=r)
        workloads = ["source_namespace", "source_workload", "destination_namespace",
                     "destination_workload"]
        self.http = Counter("hubble_http_requests", "HTTP requests the node's Envoy served",
                            ["method", "protocol", "status", "reporter", *workloads],
                            registry=r)
        self.http_duration = Histogram(
            "hubble_http_request_duration_seconds", "HTTP request duration (to the last "
            "byte of the response)", ["method", "reporter", *workloads],
            buckets=_DURATION_BUCKETS, registry=r)
        self.translation = Histogram(
            "mesh_translation_seconds", "Time to translate the cluster's objects into the IR",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r)
        self.sinks = Histogram(
            "mesh_sinks_apply_seconds", "Time to hand a new IR to the sinks (Envoy's "
            "snapshot, BPF maps, ...)", buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r)

    def flow(self, f: Flow) -> None:
        """Count one flow (the flow store's listener)."""
        conn = f.connection
        if f.kind == L7:
            kind, subtype = "L7", "HTTP"
        elif f.kind == SOCK:
            kind, subtype = "Sock", "post-xlate-fwd"
        else:
            kind = "Drop" if f.verdict == DROPPED else "Trace"
            subtype = _SUBTYPES.get(conn.point, "") if conn is not None else ""
        self.flows.labels(kind, subtype, f.verdict).inc()
        if f.verdict == DROPPED:
            self.drops.labels(f.drop_reason or "UNKNOWN", f.protocol).inc()
        direction = f.direction.lower() or "unknown"
        if f.kind == L7 and f.http is not None:
            h = f.http
            ends = (f.source.namespace, _workload(f.source), f.destination.namespace,
                    _workload(f.destination))
            self.http.labels(h.method, h.protocol, str(h.status), "server", *ends).inc()
            self.http_duration.labels(h.method, "server", *ends).observe(h.latency_ms / 1000)
            if f.verdict == DROPPED:
                self.policy.labels(direction, "dropped").inc()
        elif conn is not None and (conn.event == "NEW" or f.verdict == DROPPED):
            self.policy.labels(direction, f.verdict.lower()).inc()

    def translated(self, translate_seconds: float, sinks_seconds: float) -> None:
        self.translation.observe(translate_seconds)
        self.sinks.observe(sinks_seconds)


class StoreCollector(Collector):
    """The flow store's counters: lost flows by where they were lost, flows kept."""

    def __init__(self, store: FlowStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        lost = CounterMetricFamily("hubble_lost_events", "Flows lost, by where",
                                   labels=["source"])
        lost.add_metric([RING_LOST], self.store.lost_at_source)
        lost.add_metric([FOLLOWER_LOST], self.store.lost)
        yield lost
        kept = GaugeMetricFamily("mesh_flows_stored", "Flows in the node's ring")
        kept.add_metric([], len(self.store))
        yield kept
        seen = CounterMetricFamily("mesh_flows_seen", "Flows added to the node's ring")
        seen.add_metric([], self.store.seen)
        yield seen


class XdsCollector(Collector):
    """What the xDS server sent the node's Envoy and what it answered, by resource type."""

    def __init__(self, node: Callable[[], Any]) -> None:
        self.node = node  # the node's meshxds NodeState

    def collect(self) -> Iterator[Any]:
        state = self.node()
        for name, help_, values in (
                ("mesh_xds_responses", "xDS responses sent to the node's Envoy",
                 state.responses_sent),
                ("mesh_xds_acks", "xDS responses the node's Envoy accepted",
                 state.acks_received),
                ("mesh_xds_nacks", "xDS responses the node's Envoy rejected",
                 state.nacks_received)):
            family = CounterMetricFamily(name, help_, labels=["type"])
            for type_url, n in sorted(values.items()):
                family.add_metric([type_url.rsplit(".", 1)[-1]], n)
            yield family
        sent = CounterMetricFamily("mesh_xds_sent_bytes", "xDS bytes sent to the node's Envoy")
        sent.add_metric([], state.bytes_sent)
        yield sent


class DatapathCollector(Collector):
    """The datapath's maps (entries and capacity, counted every MAP_COUNT_EVERY seconds: an
    LRU map's count is a walk over it) and its flow events (sent, lost)."""

    def __init__(self, tables: Mapping[str, Any], events: Callable[[], dict[str, int]]
                 ) -> None:
        self.tables = dict(tables)
        self.events = events
        self._counted: dict[str, int] = {}
        self._counted_at = 0.0
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Any]:
        # without it, registering would collect: a walk over every map at the agent's start
        return iter(())

    def _count(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._counted_at >= MAP_COUNT_EVERY:
                counted = {}
                for name, table in self.tables.items():
                    with contextlib.suppress(Exception):  # a map gone with its program
                        counted[name] = sum(1 for _ in table.keys())
                self._counted, self._counted_at = counted, time.monotonic()
            return self._counted

    def collect(self) -> Iterator[Any]:
        entries = GaugeMetricFamily("mesh_bpf_map_entries", "Entries in a datapath map",
                                    labels=["map"])
        capacity = GaugeMetricFamily("mesh_bpf_map_max_entries", "A datapath map's capacity",
                                     labels=["map"])
        for name, n in sorted(self._count().items()):
            entries.add_metric([name], n)
            capacity.add_metric([name], int(self.tables[name].max_entries))
        yield entries
        yield capacity
        events = CounterMetricFamily("mesh_flow_events", "The datapath's flow events, sent "
                                     "to the agent or lost (its ring was full)",
                                     labels=["result"])
        for result, n in sorted(self.events().items()):
            events.add_metric([result], n)
        yield events


class MetricsServer:
    """The endpoint, on `host:port` (loopback by default), served by a thread of its own:
    `/metrics` the agent's, `/metrics/envoy` the node Envoy's."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 envoy: Callable[[], str] | None = None) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.envoy = envoy  # Envoy's /stats/prometheus, read on demand
        self.ready = asyncio.Event()

    def _server(self) -> socketserver.TCPServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body = generate_latest(outer.registry)
                    elif path == "/metrics/envoy" and outer.envoy is not None:
                        body = outer.envoy().encode()
                    else:
                        self.send_error(404, "/metrics or /metrics/envoy")
                        return
                except OSError as e:  # Envoy not up (yet)
                    self.send_error(503, str(e))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes are not news

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        return Server((self.host, self.port), Handler)

    async def run(self) -> None:
        try:
            server = self._server()
        except OSError as e:
            # the address taken (another agent on this host): the node goes on without
            # metrics rather than not at all; said once, loudly
            log.error("cannot serve metrics", extra={
                "address": f"{self.host}:{self.port}", "error": str(e)})
            await asyncio.Event().wait()
            return
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        self.ready.set()
        log.info("metrics", extra={"address": f"{self.host}:{self.port}"})
        try:
            await asyncio.Event().wait()
        finally:
            server.shutdown()
            server.server_close()
