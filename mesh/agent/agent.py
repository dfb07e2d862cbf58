"""The composition root: which components run in which mode, and who owns what.

Task ownership: `Agent.run` starts the xDS server, then every component of its mode in one
task group (providers, the pipeline, the Envoy supervisor), and stops them all when it is
cancelled or one of them fails. Envoy starts only after the first full build, so it never
sees a partial configuration. A stop on purpose (cancellation) stops Envoy unless
`keep_envoy`; a crash (any other exception) leaves it serving for the next agent to adopt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from mesh.addresses import AddressBook
from mesh.agent.config import AgentConfig
from mesh.agent.pipeline import Pipeline
from mesh.envoy.bootstrap import BootstrapConfig
from mesh.envoy.supervisor import EnvoySupervisor
from mesh.providers.files import FileProvider
from mesh.providers.kubernetes import KubernetesSource
from mesh.providers.node import NodeProvider
from mesh.sinks.envoy.raw import RawResources
from mesh.sinks.envoy.sink import EnvoySink
from mesh.sinks.sink import Sink
from mesh.sinks.status.writer import FileStatusWriter
from mesh.store.store import Store
from meshxds import types
from meshxds.cache import SnapshotCache
from meshxds.server import ListenAddress, XdsServer

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, cfg.xds_address)
        self.supervisor: EnvoySupervisor | None = None
        self.ready = asyncio.Event()

    def _components(self) -> tuple[list[object], asyncio.Event]:
        """The components of this mode, and the event set once the first build is served."""
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
        source: FileProvider | KubernetesSource
        if cfg.kubernetes:
            source = KubernetesSource(store, cfg.node_id, cfg.kubeconfig)
        else:
            assert cfg.manifests is not None
            source = FileProvider(cfg.manifests, store)
        node = NodeProvider(cfg.node_id, store)
        sinks: list[Sink] = [EnvoySink(self.cache, cfg.node_id)]
        extra: list[object] = []
        if cfg.datapath_cgroup is not None:
            from mesh.datapath.sink import DatapathSink

            datapath = DatapathSink(cfg.state_dir / "bpffs", cfg.datapath_cgroup,
                                    forwarding=True, underlay=cfg.datapath_underlay,
                                    redirect=cfg.datapath_redirect)
            sinks.append(datapath)
            extra.append(datapath)  # it also follows the node's pods
        if cfg.ratelimit_redis is not None:
            from mesh.agent.ratelimit import RateLimitService

            extra.append(RateLimitService(cfg.ratelimit_socket, cfg.ratelimit_redis,
                                          cfg.state_dir / "ratelimit.log"))
        pipeline = Pipeline(
            store, replace(cfg.translator, node_name=cfg.node_id,
                           global_rate_limits=cfg.ratelimit_redis is not None), sinks,
            FileStatusWriter(cfg.state_dir / "status.json"),
            AddressBook(cfg.state_dir / "addresses.json"),
            synced=[source.synced, node.synced])
        return [source, node, pipeline, *extra], pipeline.built

    async def run(self) -> None:
        started = time.monotonic()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.server.start()
        on_purpose = True
        try:
            components, built = self._components()
            async with asyncio.TaskGroup() as tg:
                for c in components:
                    tg.create_task(c.run(), name=type(c).__name__)  # type: ignore[attr-defined]
                await built.wait()
                self.supervisor = EnvoySupervisor(
                    BootstrapConfig(
                        node_id=self.cfg.node_id,
                        xds=self.server.address,
                        admin=self.cfg.admin_address,
                        protocol=self.cfg.protocol,
                        max_downstream_connections=self.cfg.max_downstream_connections,
                        ratelimit=ListenAddress(unix_path=self.cfg.ratelimit_socket),
                    ),
                    self.cfg.state_dir,
                    log_level=self.cfg.envoy_log_level,
                )
                self.supervisor.start()
                tg.create_task(self._announce_ready(started), name="announce-ready")
        except BaseException as e:
            # A signal cancels the agent: a stop on purpose. Anything else is a crash, and a
            # crash never takes Envoy along (the next agent adopts it).
            on_purpose = isinstance(e, asyncio.CancelledError)
            raise
        finally:
            if self.supervisor is not None:
                if on_purpose and not self.cfg.keep_envoy:
                    await self.supervisor.stop()
                else:
                    await self.supervisor.detach()
            await self.server.stop(grace=1.0)

    async def _announce_ready(self, started: float) -> None:
        assert self.supervisor is not None
        await self.supervisor.wait_ready(timeout=60)
        await self.cache.node(self.cfg.node_id).wait_settled()
        listeners = [s.name for s in self.cache.status(self.cfg.node_id)
                     if s.type_url == types.LISTENER]
        log.info("node ready", extra={
            "node": self.cfg.node_id, "envoy_pid": self.supervisor.pid, "listeners": listeners,
            "admin": str(self.cfg.admin_address),
            "seconds": round(time.monotonic() - started, 2)})
        self.ready.set()
