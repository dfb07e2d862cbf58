"""Protocol state of one ADS stream, state-of-the-world or incremental (delta).

Kept apart from gRPC so the rules can be tested directly: feed requests in with
`handle_*_request`, take responses out with `*_responses`. The server only pumps messages.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2 as pb

from meshxds import types
from meshxds.cache import NodeState, Resource

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A response sent and not yet answered, kept to attribute the ACK or NACK."""

    version: str
    resources: list[Resource]
    removed: list[str] = field(default_factory=list)


@dataclass
class TypeState:
    requested: bool = False
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    # What Envoy has been sent, name -> hash; "" records that we told it the name is absent.
    sent: dict[str, str] = field(default_factory=dict)
    sent_version: int = -1
    acked: dict[str, str] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    resubscribed: bool = False
    force: set[str] = field(default_factory=set)  # resend these even if unchanged
    answered: bool = False  # delta: sent at least one response of this type


class Stream:
    def __init__(self, node: NodeState, delta: bool, peer: str = "") -> None:
        self.node = node
        self.delta = delta
        self.peer = peer
        self.wake = asyncio.Event()
        self.types: dict[str, TypeState] = {}
        self._nonces = itertools.count(1)
        self.nacks = 0

    # -- what the cache asks -------------------------------------------------------------

    def requested_types(self) -> Iterable[str]:
        return [t for t, st in self.types.items() if st.requested and t in types.PUSH_ORDER]

    def settled(self, type_url: str) -> bool:
        st = self.types.get(type_url)
        if st is None or not st.requested:
            return True
        served = self.node.served[type_url].resources
        names = served.keys() if st.wildcard else st.subscribed & served.keys()
        return all(st.acked.get(n) == served[n].hash for n in names)

    # -- requests ------------------------------------------------------------------------

    def handle_sotw_request(self, req: pb.DiscoveryRequest) -> None:
        st = self.types.setdefault(req.type_url, TypeState())
        if req.response_nonce:
            pending = st.pending.pop(req.response_nonce, None)
            if pending is None:
                # Stale: Envoy answers a response we have since replaced. Its resource names
                # may be out of date too; the answer to the newer response will follow.
                return
            self._answer(req.type_url, st, pending, req.error_detail.message
                         if req.HasField("error_detail") else None)
        names = set(req.resource_names)
        wildcard = req.type_url in types.FULL_STATE and (not names or "*" in names)
        names.discard("*")
        if not st.requested or names != st.subscribed or wildcard != st.wildcard:
            st.resubscribed = True
        st.requested, st.subscribed, st.wildcard = True, names, wildcard
        self.node.progressed()

    def handle_delta_request(self, req: pb.DeltaDiscoveryRequest) -> None:
        st = self.types.setdefault(req.type_url, TypeState())
        if req.response_nonce:
            pending = st.pending.pop(req.response_nonce, None)
            # An unknown nonce is stale; its subscription changes below still count, since
            # delta subscriptions are themselves deltas.
            if pending is not None:
                self._answer(req.type_url, st, pending, req.error_detail.message
                             if req.HasField("error_detail") else None)
        if not st.requested:
            st.requested = True
            if req.type_url in types.FULL_STATE and not req.resource_names_subscribe:
                st.wildcard = True  # legacy wildcard: the first request names nothing
        initial = dict(req.initial_resource_versions)
        for name in req.resource_names_subscribe:
            if name == "*":
                st.wildcard = True
                continue
            st.subscribed.add(name)
            if name not in initial:
                st.sent.pop(name, None)  # an explicit subscription is answered even if known
        snap = self.node.served.get(req.type_url)
        for name, version in initial.items():
            # After a reconnect Envoy says what it runs; our versions are content hashes, so
            # identical resources are not sent again and count as ACKed.
            st.sent[name] = version
            st.acked[name] = version
            current = snap is not None and name in snap.resources and (
                snap.resources[name].hash == version)
            label = str(snap.version) if snap is not None and current else ""
            self.node.acks.ack(req.type_url, name, label, version, time.time())
        for name in req.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = False
                continue
            st.subscribed.discard(name)
            st.sent.pop(name, None)
            st.acked.pop(name, None)
        self.node.progressed()

    def _answer(self, type_url: str, st: TypeState, pending: Pending, nack: str | None) -> None:
        now = time.time()
        acks = self.node.acks
        answers = self.node.acks_received if nack is None else self.node.nacks_received
        answers[type_url] = answers.get(type_url, 0) + 1
        if nack is None:
            for r in pending.resources:
                st.acked[r.name] = r.hash
                acks.ack(type_url, r.name, pending.version, r.hash, now)
            for name in pending.removed:
                st.acked.pop(name, None)
                if name not in self.node.served[type_url].resources:
                    acks.forget(type_url, name)
            if not self.delta:
                # A state-of-the-world ACK of a full-state type is the whole set Envoy runs.
                if type_url in types.FULL_STATE:
                    st.acked = {r.name: r.hash for r in pending.resources}
        else:
            self.nacks += 1
            named = [r for r in pending.resources if _names(nack, r.name)]
            # Envoy applies the good resources of a partly rejected update (listeners and
            # clusters are added one by one); those it names in the error are the rejected
            # ones. If it names none, count the whole response as rejected.
            rejected = named or pending.resources
            for r in pending.resources:
                if r in rejected:
                    acks.nack(type_url, r.name, pending.version, r.hash, nack, now)
                else:
                    st.acked[r.name] = r.hash
                    acks.ack(type_url, r.name, pending.version, r.hash, now)
            log.warning(
                "envoy rejected config",
                extra={
                    "node": self.node.node_id,
                    "type": types.SHORT_NAMES.get(type_url, type_url),
                    "version": pending.version,
                    "rejected": [r.name for r in rejected],
                    "error": nack,
                },
            )

    # -- responses -----------------------------------------------------------------------

    def _wait_for_clusters(self, type_url: str) -> bool:
        """Hold listeners and routes back while a cluster update is unanswered. Envoy ACKs
        clusters only once they are warm (endpoints received), so a route sent after that
        ACK never points at a cluster that is not ready yet."""
        if type_url not in (types.LISTENER, types.ROUTE):
            return False
        clusters = self.types.get(types.CLUSTER)
        return clusters is not None and bool(clusters.pending)

    def _nonce(self) -> str:
        return str(next(self._nonces))

    def _note_sent_clusters(self, st: TypeState, resources: list[Resource]) -> None:
        """After a changed EDS cluster, resend its endpoints: Envoy keeps the new cluster
        warming until it gets them, and withholds the CDS ACK meanwhile."""
        changed = [r.name for r in resources if r.uses_eds and st.sent.get(r.name) != r.hash]
        eds = self.types.get(types.ENDPOINT)
        if changed and eds is not None:
            eds.force.update(changed)

    def _types_to_answer(self) -> Iterator[tuple[str, TypeState]]:
        """The requested types in push order, stopping at listeners and routes while a
        cluster update is unanswered. Lazy: a cluster response sent during the walk counts."""
        if not self.node.ready:
            return
        for type_url in types.PUSH_ORDER:
            if self._wait_for_clusters(type_url):
                return
            st = self.types.get(type_url)
            if st is not None and st.requested:
                yield type_url, st

    def sotw_responses(self) -> list[pb.DiscoveryResponse]:
        out = []
        for type_url, st in self._types_to_answer():
            snap = self.node.served[type_url]
            if snap.version == st.sent_version and not st.resubscribed and not st.force:
                continue
            if st.wildcard:
                resources = list(snap.resources.values())
            else:
                resources = [snap.resources[n] for n in sorted(st.subscribed)
                             if n in snap.resources]
            if type_url == types.CLUSTER:
                self._note_sent_clusters(st, resources)
            nonce = self._nonce()
            version = str(snap.version)
            st.pending = {nonce: Pending(version, resources)}  # older nonces are now stale
            st.sent = {r.name: r.hash for r in resources}
            st.sent_version, st.resubscribed = snap.version, False
            st.force.clear()
            out.append(pb.DiscoveryResponse(
                version_info=version,
                resources=[r.body for r in resources],
                type_url=type_url,
                nonce=nonce,
            ))
        return out

    def delta_responses(self) -> list[pb.DeltaDiscoveryResponse]:
        out = []
        for type_url, st in self._types_to_answer():
            served = self.node.served[type_url].resources
            scope: Iterable[str] = served.keys() if st.wildcard else st.subscribed
            send = [served[n] for n in sorted(scope)
                    if n in served and (st.sent.get(n) != served[n].hash or n in st.force)]
            removed = sorted(
                n for n, h in st.sent.items()
                if n not in served and h != "" and (st.wildcard or n in st.subscribed)
            )
            # Tell Envoy once about subscribed names that do not exist, so it stops waiting.
            removed += sorted(n for n in st.subscribed if n not in served and n not in st.sent)
            st.force.clear()
            # A first wildcard request is answered even when there is nothing to send:
            # Envoy waits for it (initial_fetch_timeout is 0) before it calls itself ready.
            if not send and not removed and (st.answered or not st.wildcard):
                continue
            st.answered = True
            if type_url == types.CLUSTER:
                self._note_sent_clusters(st, send)
            for r in send:
                st.sent[r.name] = r.hash
            for n in removed:
                if n in st.subscribed:
                    st.sent[n] = ""
                else:
                    st.sent.pop(n, None)
            nonce = self._nonce()
            version = str(self.node.served[type_url].version)
            st.pending[nonce] = Pending(version, send, removed)
            out.append(pb.DeltaDiscoveryResponse(
                system_version_info=version,
                resources=[pb.Resource(name=r.name, version=r.hash, resource=r.body)
                           for r in send],
                removed_resources=removed,
                type_url=type_url,
                nonce=nonce,
            ))
        return out


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", message) is not None
