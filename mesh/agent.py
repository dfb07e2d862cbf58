"""The node agent: the xDS server, the node's Envoy, and the input that configures it.

Task ownership: `Agent.run` owns every task it starts (server, supervisor, file watcher) and
stops them all, in reverse order, when it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import watchfiles
from pyroute2 import IPRoute

from mesh.bootstrap import BootstrapConfig, Protocol
from mesh.envoy_supervisor import EnvoySupervisor
from mesh.gateway.translate import (
    Translation,
    TranslationCache,
    TranslatorConfig,
    translate,
)
from mesh.providers.files import DirectoryState, FileProvider
from mesh.status import StatusSink
from meshxds import types
from meshxds.cache import SnapshotCache
from meshxds.loader import ResourceFileError, load_resources
from meshxds.server import ListenAddress, XdsServer
from meshxds.translate import EnvoyCache, EnvoyConfig, to_envoy

log = logging.getLogger(__name__)
STATUS_INTERVAL = 0.1  # seconds
FREEZE_AFTER = 1000  # routes translated anew in one go
NODE_ADDRESSES_INTERVAL = 5.0  # seconds


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    state_dir: Path
    xds_address: ListenAddress
    admin_address: ListenAddress
    protocol: Protocol = "delta"
    resources_file: Path | None = None  # Envoy resources as they are
    manifests: Path | None = None  # Kubernetes manifests, translated
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    envoy_log_level: str = "warning"
    max_downstream_connections: int = 50_000
    keep_envoy: bool = False  # a stop on purpose leaves Envoy serving, for the next agent


def node_addresses() -> frozenset[str] | None:
    """The IP addresses of this node's interfaces (netlink), or None if they cannot be read
    (then any address a Gateway asks for is tried, and Envoy says if it cannot bind)."""
    try:
        with IPRoute() as ip:
            return frozenset(str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
                             for a in ip.get_addr() if a.get_attr("IFA_ADDRESS"))
    except (OSError, ValueError) as e:
        log.warning("cannot list the node's addresses", extra={"error": str(e)})
        return None


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.cache = SnapshotCache()
        self.server = XdsServer(self.cache, cfg.xds_address)
        self.supervisor: EnvoySupervisor | None = None
        self.ready = asyncio.Event()
        self.provider = FileProvider(cfg.manifests) if cfg.manifests is not None else None
        self.status = StatusSink(cfg.state_dir / "status.json")
        # Addresses given to Gateways from the pool, kept across restarts: a restart must
        # not move a Gateway to another address.
        self._addresses_file = cfg.state_dir / "addresses.json"
        self._addresses: dict[str, str] = self._load_addresses()
        self._input: DirectoryState | None = None
        self._translation: Translation | None = None
        self._envoy: EnvoyConfig | None = None
        self._status_due = asyncio.Event()
        self._translation_cache = TranslationCache()
        self._envoy_cache = EnvoyCache()
        self._node_addresses = node_addresses()

    async def _follow_node_addresses(self) -> None:
        """A Gateway's static address may be added to the node after the Gateway: look
        again every few seconds and translate again when the node's addresses change."""
        while True:
            await asyncio.sleep(NODE_ADDRESSES_INTERVAL)
            now = await asyncio.to_thread(node_addresses)
            if now != self._node_addresses:
                log.info("node addresses changed", extra={"addresses": sorted(now or ())})
                self._node_addresses = now
                if self._input is not None:
                    self.apply(self._input)

    def apply(self, state: DirectoryState) -> bool:
        """Translate the store and serve it. On any failure the last good config stays.

        Status is computed afterwards, off this path: the push to Envoy does not wait."""
        t0 = time.perf_counter()
        try:
            translator = replace(self.cfg.translator, local_addresses=self._node_addresses)
            translation = translate(state.snapshot, translator, self._addresses,
                                    self._translation_cache)
            t1 = time.perf_counter()
            envoy = to_envoy(translation.ir, self._envoy_cache)
            t2 = time.perf_counter()
            self.cache.set_snapshot(self.cfg.node_id, envoy.resources)
        except Exception:
            log.exception("translation failed, keeping the last good config")
            return False
        log.info("translated", extra={
            "objects": len(state.snapshot), "translate_ms": round((t1 - t0) * 1000, 1),
            "envoy_ms": round((t2 - t1) * 1000, 1),
            "snapshot_ms": round((time.perf_counter() - t2) * 1000, 1)})
        self._input, self._translation, self._envoy = state, translation, envoy
        if translation.addresses != self._addresses:
            self._addresses = translation.addresses
            self._save_addresses()
        self._status_due.set()
        if self._translation_cache.misses >= FREEZE_AFTER:
            # Many new long-lived objects: without this, every later full collection
            # rescans them all (0.3 s at 10,000 routes) in the middle of some change. They
            # are still freed by reference counting when replaced.
            gc.collect()
            gc.freeze()
        return True

    def _load_addresses(self) -> dict[str, str]:
        try:
            data = json.loads(self._addresses_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("address file unreadable, starting afresh",
                        extra={"file": str(self._addresses_file)})
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save_addresses(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._addresses_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._addresses, f, sort_keys=True)
        tmp.replace(self._addresses_file)

    async def refresh_status(self) -> str | None:
        """Recompute every object's status; the text to write if anything changed.

        The work runs on a thread: at 10,000 routes the first status after a full build
        takes about half a second, and a change arriving meanwhile must not wait for it.
        What it reads is this translation's (never changed once made) and a copy of the
        ACK states; the status sink is only ever used from here."""
        if self._input is None or self._translation is None or self._envoy is None:
            return None
        # The ACK records change under the stream tasks: the thread gets copies.
        acks = {(s.type_url, s.name): replace(s, ack=replace(s.ack))
                for s in self.cache.status(self.cfg.node_id)}
        state, translation, envoy = self._input, self._translation, self._envoy

        def work() -> str | None:
            changed = self.status.update(state.snapshot, translation.status, envoy.owned,
                                         acks, state.errors, write=False)
            return self.status.serialize() if changed else None

        return await asyncio.to_thread(work)

    async def _write_status(self) -> None:
        """Recompute status after a change or an ACK, at most every STATUS_INTERVAL."""
        node = self.cache.node(self.cfg.node_id)
        progress = asyncio.create_task(node.wait_progress())
        try:
            while True:
                due = asyncio.create_task(self._status_due.wait())
                await asyncio.wait({due, progress}, return_when=asyncio.FIRST_COMPLETED)
                due.cancel()
                if progress.done():
                    progress = asyncio.create_task(node.wait_progress())
                self._status_due.clear()
                started = time.perf_counter()
                await asyncio.sleep(STATUS_INTERVAL)  # let a burst of ACKs land first
                text = await self.refresh_status()
                if text is not None:
                    await asyncio.to_thread(self.status.write_text, text)
                    # A big status file takes a while to write; do not rewrite it back to
                    # back while routes keep changing.
                    await asyncio.sleep(min(1.0, (time.perf_counter() - started) * 2))
        finally:
            progress.cancel()

    def reload(self) -> bool:
        """Serve the configured input. A bad file is logged and changes nothing."""
        if self.provider is not None:
            return self.apply(self.provider.load())
        path = self.cfg.resources_file
        if path is None:
            self.cache.set_snapshot(self.cfg.node_id, [])
            return True
        try:
            resources = load_resources(path)
            self.cache.set_snapshot(self.cfg.node_id, resources)
        except (ResourceFileError, ValueError) as e:
            log.error("resource file rejected, keeping the last good config",
                      extra={"file": str(path), "error": str(e)})
            return False
        return True

    async def run(self) -> None:
        started = time.monotonic()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.server.start()
        on_purpose = True
        try:
            # The first full build comes before Envoy starts: it never sees a partial config.
            self.reload()
            self.supervisor = EnvoySupervisor(
                BootstrapConfig(
                    node_id=self.cfg.node_id,
                    xds=self.server.address,
                    admin=self.cfg.admin_address,
                    protocol=self.cfg.protocol,
                    max_downstream_connections=self.cfg.max_downstream_connections,
                ),
                self.cfg.state_dir,
                log_level=self.cfg.envoy_log_level,
            )
            self.supervisor.start()
            async with asyncio.TaskGroup() as tg:
                if self.provider is not None:
                    tg.create_task(self.provider.watch(self.apply), name="watch-manifests")
                    tg.create_task(self._write_status(), name="status")
                    tg.create_task(self._follow_node_addresses(), name="node-addresses")
                elif self.cfg.resources_file is not None:
                    target = self.cfg.resources_file.resolve()
                    tg.create_task(self._watch(target), name="watch-resources")
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
        listeners = []
        for s in self.cache.status(self.cfg.node_id):
            if s.type_url == types.LISTENER:
                listeners.append(s.name)
        log.info(
            "node ready",
            extra={
                "node": self.cfg.node_id,
                "envoy_pid": self.supervisor.pid,
                "listeners": listeners,
                "admin": str(self.cfg.admin_address),
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        self.ready.set()

    async def _watch(self, target: Path) -> None:
        # Watch the directory: editors replace a file rather than write it in place.
        # watchfiles gives full paths; the filter drops the directory's other files.
        only_target = lambda _change, path: path == str(target)  # noqa: E731
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        async for _ in watchfiles.awatch(target.parent, watch_filter=only_target,
                                         debounce=100, step=20, recursive=False):
            log.info("resource file changed", extra={"file": str(target)})
            self.reload()


async def run_until_signalled(agent: Agent) -> None:
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run()
    log.info("agent stopped")
