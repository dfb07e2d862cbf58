"""The composition root: which components run in which mode, and who owns what.

Task ownership: `Agent.run` starts the xDS server, then every component of its mode in one
task group (providers, the pipeline, the health endpoint, the Envoy supervisor), and stops
them all when it is cancelled or one of them fails. Envoy starts only after the first full
build, so it never sees a partial configuration. A stop on purpose (`stop()`, on SIGINT or
SIGTERM) stops Envoy unless `keep_envoy`; a crash (any other exception) leaves it serving for
the next agent to adopt: the supervisor detaches when cancelled, unless the agent said first
that it stops on purpose (mesh/envoy/supervisor.py). With `external_envoy` (the chart: Envoy
in a container of its own) the agent never starts or stops Envoy; it serves xDS and waits for
Envoy to be ready.

In Kubernetes mode the API client is opened before the components start and closed after
they have all ended: the leader's last request, releasing its Lease, comes after its
cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from mesh.addresses import AddressBook
from mesh.agent.config import AgentConfig
from mesh.agent.health import SOCKET, HealthServer
from mesh.agent.metrics import (
    AgentMetrics,
    DatapathCollector,
    MetricsServer,
    StoreCollector,
    XdsCollector,
)
from mesh.agent.pipeline import Pipeline
from mesh.component import Component
from mesh.envoy.admin import EnvoyAdmin
from mesh.envoy.bootstrap import BootstrapConfig
from mesh.envoy.supervisor import EnvoySupervisor
from mesh.flows.accesslog import AccessLogServer
from mesh.flows.connections import Connections
from mesh.flows.directory import FlowDirectory
from mesh.flows.store import FlowStore
from mesh.hubble.observer import Observer, ObserverServer
from mesh.hubble.tls import TLSFiles
from mesh.kube.client import connect
from mesh.kube.events import PolicyEvents
from mesh.kube.identities import IdentityAllocator, IdentityCollector
from mesh.kube.infrastructure import GatewayServiceWriter
from mesh.kube.leader import LeaderElection
from mesh.kube.meshnodes import MeshNodes
from mesh.kube.status import KubernetesStatusWriter, StatusPublisher
from mesh.providers import Provider
from mesh.providers.files import FileProvider
from mesh.providers.kubernetes import KubernetesProvider
from mesh.providers.node import NodeProvider
from mesh.sinks.envoy.raw import RawResources
from mesh.sinks.envoy.sink import EnvoySink
from mesh.sinks.sink import Sink
from mesh.sinks.status.report import ReadinessSource
from mesh.sinks.status.writer import FileStatusWriter, StatusWriter, Writers
from mesh.store.store import Store
from mesh.translate.gateway.infrastructure import managed_by
from meshxds import types
from meshxds.address import ListenAddress
from meshxds.cache import SnapshotCache
from meshxds.server import XdsServer

log = logging.getLogger(__name__)


def bootstrap_config(cfg: AgentConfig) -> BootstrapConfig:
    """The bootstrap of this agent's Envoy (also what `mesh envoy` starts Envoy with)."""
    return BootstrapConfig(
        node_id=cfg.node_id,
        xds=cfg.xds_address,
        admin=cfg.admin_address,
        protocol=cfg.protocol,
        max_downstream_connections=cfg.max_downstream_connections,
        ratelimit=ListenAddress(unix_path=cfg.ratelimit_socket),
        accesslog=ListenAddress(unix_path=cfg.accesslog_socket),
    )


@dataclass(frozen=True)
class _Kubernetes:
    """The Kubernetes components the health endpoint reports on."""

    provider: KubernetesProvider
    election: LeaderElection | None
    meshnodes: MeshNodes

    def health(self) -> dict[str, Any]:
        return {"synced": self.provider.status(),
                "leader": self.election.status() if self.election is not None else None,
                "meshNodeWrites": self.meshnodes.reporter.writes}


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, cfg.xds_address)
        self.metrics = AgentMetrics()
        self.flows = FlowStore(cfg.flow_capacity, listener=self.metrics.flow)  # the last flows
        self.metrics.registry.register(StoreCollector(self.flows))
        self.metrics.registry.register(XdsCollector(lambda: self.cache.node(cfg.node_id)))
        self.supervisor: EnvoySupervisor | None = None
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()  # a stop on purpose: see stop()
        self._built: asyncio.Event | None = None
        self._kubernetes: _Kubernetes | None = None
        self._task: asyncio.Task[Any] | None = None

    def stop(self) -> None:
        """A stop on purpose (on the loop): said to the components that tell it from a crash
        (the Envoy supervisor), then the agent is cancelled."""
        self.stopping.set()
        if self._task is not None:
            self._task.cancel()

    async def _components(self, opened: contextlib.AsyncExitStack
                          ) -> tuple[list[Component], asyncio.Event]:
        """The components of this mode, and the event set once the first build is served;
        what they share and must outlive them (the Kubernetes client) goes on `opened`."""
        cfg = self.cfg
        if cfg.manifests is None and not cfg.kubernetes:
            raw = RawResources(cfg.resources_file, self.cache, cfg.node_id) \
                if cfg.resources_file is not None else None
            if raw is None:
                self.cache.set_snapshot(cfg.node_id, [])
                done = asyncio.Event()
                done.set()
                return [], done
            return [raw], raw.built
        store = Store()
        writers: list[StatusWriter] = [FileStatusWriter(cfg.state_dir / "status.json")]
        readiness: list[ReadinessSource] = []  # besides the sinks'
        components: list[Component] = []
        generated: GatewayServiceWriter | None = None  # Kubernetes: what Gateways generate
        identities: IdentityAllocator | None = None  # Kubernetes: identities made
        events: PolicyEvents | None = None  # Kubernetes: Events on policies not enforced
        collector: IdentityCollector | None = None  # Kubernetes: unused identities deleted
        source: Provider
        kube = None
        if cfg.kubernetes:
            kube = await opened.enter_async_context(connect(cfg.kubeconfig))
            election = LeaderElection(kube.call, cfg.lease) if cfg.lease is not None else None
            provider = KubernetesProvider(kube, store, cfg.node_id)
            meshnodes = MeshNodes(kube, cfg.node_id, cfg.identity or cfg.node_id, election)
            status = KubernetesStatusWriter(StatusPublisher(
                kube.call, controller=cfg.translator.controller_name,
                allowed=meshnodes.may_write), provider.server_status, election)
            identities = IdentityAllocator(kube.call)
            generated = GatewayServiceWriter(
                kube.call, kube.apply, meshnodes.may_write, election,
                managed_by(cfg.translator.controller_name))
            events = PolicyEvents(kube.call, cfg.node_id, meshnodes.may_write, election,
                                  node_keys=cfg.encryption != "none")
            collector = IdentityCollector(kube.call, meshnodes.may_write, election)
            source = provider
            writers.append(status)
            readiness.append(meshnodes)
            components += [meshnodes, status, generated, identities, events, collector,
                           *([election] if election is not None else [])]
            self._kubernetes = _Kubernetes(provider, election, meshnodes)
        else:
            assert cfg.manifests is not None
            source = FileProvider(cfg.manifests, store)
        node = NodeProvider(cfg.node_id, store)
        sinks: list[Sink] = [EnvoySink(self.cache, cfg.node_id)]
        # The node's flows: Envoy's requests through its access log service, their ends
        # named from the IR's directory
        names = FlowDirectory(cfg.node_id)
        sinks.append(names)
        connections = Connections()  # the datapath's connections, joined to their requests
        components.append(AccessLogServer(cfg.accesslog_socket, self.flows, cfg.node_id,
                                          names, connections))
        observer = Observer(self.flows, cfg.node_id, names.namespaces)
        components.append(ObserverServer(cfg.hubble_socket, observer))  # the node's flows
        if cfg.hubble_listen is not None:  # for the cluster's relay
            components.append(ObserverServer(
                cfg.hubble_socket, observer, cfg.hubble_listen,
                TLSFiles(cfg.hubble_tls) if cfg.hubble_tls is not None else None))
        if generated is not None:
            sinks.append(generated)
        if identities is not None:
            sinks.append(identities)
        if events is not None:
            sinks.append(events)
        if collector is not None:
            sinks.append(collector)
        if cfg.datapath_cgroup is not None:
            # Imported only with a datapath: it needs bcc and the kernel's BPF.
            from mesh.dnsproxy import DnsProxy
            from mesh.sinks.datapath import DatapathSink
            from mesh.translate.network_policy import DNS_PROXY_PORT

            datapath = DatapathSink(cfg.state_dir / "bpffs", cfg.datapath_cgroup,
                                    forwarding=True, underlay=cfg.datapath_underlay,
                                    redirect=cfg.datapath_redirect,
                                    dns_cache=cfg.state_dir / "dns-cache.json")
            sinks.append(datapath)
            components.append(datapath)  # it also follows the node's pods
            assert datapath.forwarding is not None
            from mesh.flows.datapath import DatapathFlows

            forwarding = datapath.forwarding
            flow_events = forwarding.flow_events()
            components.append(DatapathFlows(  # the datapath's connections, as L3/L4 flows
                flow_events, self.flows, cfg.node_id, names, forwarding.is_local,
                enabled=cfg.flow_events, connections=connections))
            self.metrics.registry.register(DatapathCollector(
                {**forwarding.metered_tables(), **datapath.metered_tables()},
                flow_events.counters))
            fqdn = datapath.forwarding.fqdn
            # toFQDNs: the pods' DNS, learned into the datapath
            components.append(DnsProxy(DNS_PROXY_PORT, fqdn.learn, fqdn.expire))
            if cfg.encryption == "none":
                from mesh.sinks.encryption import disable

                # in a thread: pyroute2 wants no running loop in its own
                await asyncio.to_thread(disable, datapath.forwarding.encryption_tables())
            if cfg.encryption in ("wireguard", "ipsec"):
                from mesh.sinks.encryption import EncryptionSettings, EncryptionSink
                from mesh.sinks.ipsec import IpsecSettings, IpsecSink

                tables = datapath.forwarding.encryption_tables()
                encryption: EncryptionSink | IpsecSink
                if cfg.encryption == "wireguard":
                    from mesh.encryption.keys import ANNOTATION

                    assert cfg.datapath_underlay is not None
                    encryption = EncryptionSink(EncryptionSettings(
                        cfg.state_dir, cfg.datapath_underlay, cfg.encryption_strict,
                        cfg.encryption_strict_cidrs), tables)
                    # what the other nodes read on this one's Node
                    told = (ANNOTATION, encryption.public_key, encryption.key_changed)
                else:
                    from mesh.encryption.ipsec import SPIS_ANNOTATION

                    encryption = IpsecSink(IpsecSettings(
                        cfg.state_dir, cfg.ipsec_keys, cfg.node_id, cfg.encryption_strict,
                        cfg.encryption_strict_cidrs), tables)
                    told = (SPIS_ANNOTATION, encryption.announcement,
                            encryption.announcement_changed)
                sinks.append(encryption)
                components.append(encryption)
                if kube is not None:
                    from mesh.kube.nodekey import NodeAnnotationPublisher

                    components.append(NodeAnnotationPublisher(kube.call, cfg.node_id, *told))
        if cfg.ratelimit_redis is not None:
            from mesh.agent.ratelimit import RateLimitService

            components.append(RateLimitService(cfg.ratelimit_socket, cfg.ratelimit_redis,
                                               cfg.state_dir / "ratelimit.log"))
        if cfg.metrics_address is not None:
            admin = EnvoyAdmin(cfg.admin_address)
            components.append(MetricsServer(
                *cfg.metrics_address, self.metrics.registry,
                lambda: admin.get("/stats/prometheus")))
        pipeline = Pipeline(
            store, replace(cfg.translator, node_name=cfg.node_id,
                           global_rate_limits=cfg.ratelimit_redis is not None), sinks,
            Writers(*writers), AddressBook(cfg.state_dir / "addresses.json"),
            synced=[source.synced, node.synced], sources=readiness,
            on_built=self.metrics.translated)
        return [source, node, pipeline, *components], pipeline.built

    async def run(self) -> None:
        started = time.monotonic()
        self._task = asyncio.current_task()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.server.start()
        try:
            async with contextlib.AsyncExitStack() as opened:
                components, built = await self._components(opened)
                self._built = built
                if not self.cfg.external_envoy:
                    self.supervisor = EnvoySupervisor(
                        replace(bootstrap_config(self.cfg), xds=self.server.address),
                        self.cfg.state_dir, log_level=self.cfg.envoy_log_level,
                        stopping=self.stopping, keep=self.cfg.keep_envoy)
                health = HealthServer(self.cfg.state_dir / SOCKET, self.health)
                async with asyncio.TaskGroup() as tg:
                    for c in [*components, health]:
                        tg.create_task(c.run(), name=type(c).__name__)
                    await built.wait()
                    if self.supervisor is not None:
                        tg.create_task(self.supervisor.run(), name="EnvoySupervisor")
                    tg.create_task(self._announce_ready(started), name="announce-ready")
        finally:
            await self.server.stop(grace=1.0)

    def health(self) -> dict[str, Any]:
        """What the health endpoint answers (on the loop)."""
        out: dict[str, Any] = {
            "ready": self.ready.is_set(), "node": self.cfg.node_id,
            "built": self._built is not None and self._built.is_set(),
            "envoy": "ready" if self.ready.is_set() else "starting",
            "externalEnvoy": self.cfg.external_envoy}
        if self._kubernetes is not None:
            out["kubernetes"] = self._kubernetes.health()
        return out

    async def _wait_external_envoy(self) -> None:
        admin = EnvoyAdmin(self.cfg.admin_address, timeout=2.0)
        while True:
            try:
                if await asyncio.to_thread(admin.ready):
                    return
            except OSError:
                pass  # not started yet, or restarting: its container's business
            await asyncio.sleep(0.5)

    async def _announce_ready(self, started: float) -> None:
        if self.supervisor is not None:
            await self.supervisor.wait_ready(timeout=60)
        else:
            log.info("waiting for the external Envoy", extra={
                "admin": str(self.cfg.admin_address)})
            await self._wait_external_envoy()
        await self.cache.node(self.cfg.node_id).wait_settled()
        listeners = [s.name for s in self.cache.status(self.cfg.node_id)
                     if s.type_url == types.LISTENER]
        log.info("node ready", extra={
            "node": self.cfg.node_id, "listeners": listeners,
            "envoy_pid": self.supervisor.pid if self.supervisor is not None else "external",
            "admin": str(self.cfg.admin_address),
            "seconds": round(time.monotonic() - started, 2)})
        self.ready.set()
