"""The Envoy sink: the IR as xDS resources in the snapshot cache the node's Envoy reads, and
per object whether Envoy runs it (its ACKs) or refused it (the NACK's text)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

from mesh.ir import IR
from mesh.sinks.envoy.translate import EnvoyCache, EnvoyConfig, to_envoy
from mesh.sinks.sink import READY, Readiness, State
from mesh.store.objects import ObjectKey
from meshxds.acks import AckState, ResourceStatus
from meshxds.cache import SnapshotCache
from meshxds.types import SHORT_NAMES


def readiness_of(owned: set[tuple[str, str]],
                 acks: Mapping[tuple[str, str], ResourceStatus]) -> Readiness:
    """An object's readiness from the ACK state of every xDS resource that carries it."""
    nacked = []
    pending = []
    for key in sorted(owned):
        s = acks.get(key)
        if s is None or s.state is AckState.PENDING:
            pending.append(key)
        elif s.state is AckState.NACKED:
            nacked.append((key, s.ack.nack_message))
    if nacked:
        (type_url, name), message = nacked[0]
        return Readiness(State.FAILED, f"Envoy rejected {SHORT_NAMES.get(type_url, type_url)} "
                         f"{name}: {message}")
    if pending:
        type_url, name = pending[0]
        more = f" and {len(pending) - 1} more" if len(pending) > 1 else ""
        return Readiness(State.PENDING, f"waiting for Envoy to accept "
                         f"{SHORT_NAMES.get(type_url, type_url)} {name}{more}")
    return READY


class _Readiness(Mapping[ObjectKey, Readiness]):
    """Readiness computed per object when asked (on the status thread), from a copy of
    the ACK states taken on the event loop."""

    def __init__(self, config: EnvoyConfig,
                 acks: Mapping[tuple[str, str], ResourceStatus]) -> None:
        self._config = config
        self._acks = acks

    def __getitem__(self, key: ObjectKey) -> Readiness:
        owned = self._config.owned.get(key)
        if owned is None:
            raise KeyError(key)
        return readiness_of(owned, self._acks)

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(self._config.owned)

    def __len__(self) -> int:
        return len(self._config.owned)


class EnvoySink:
    name = "envoy"

    def __init__(self, cache: SnapshotCache, node_id: str) -> None:
        self.cache = cache
        self.node_id = node_id
        self._memo = EnvoyCache()
        self._config: EnvoyConfig | None = None

    def apply(self, ir: IR) -> None:
        """Convert and hand to the cache, which diffs by resource hash: Envoy is sent only
        what changed, clusters before endpoints before listeners before routes."""
        config = to_envoy(ir, self._memo)
        self.cache.set_snapshot(self.node_id, config.resources)
        self._config = config

    def readiness(self) -> Mapping[ObjectKey, Readiness]:
        if self._config is None:
            return {}
        # The ACK records change under the stream tasks: the reader gets copies.
        acks = {(s.type_url, s.name): replace(s, ack=replace(s.ack))
                for s in self.cache.status(self.node_id)}
        return _Readiness(self._config, acks)

    async def wait_progress(self) -> None:
        await self.cache.node(self.node_id).wait_progress()

    async def wait_settled(self) -> None:
        await self.cache.node(self.node_id).wait_settled()


__all__ = ["EnvoySink", "readiness_of"]
