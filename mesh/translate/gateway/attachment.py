"""Phase 3: routes. Each HTTPRoute, GRPCRoute, TLSRoute, TCPRoute and UDPRoute attaches to
the valid listeners of its parents that allow it (kind, namespace, hostnames), or, for an
HTTPRoute, GRPCRoute or TCPRoute whose parent is a Service (GAMMA), to that Service's ports;
its rules become IR routes in the route builder's tables under the listeners it attached to.
A route unchanged since the last translation, in an unchanged world, is replayed from its
outcome rather than translated again (see `TranslationMemo`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from mesh.store import kinds
from mesh.store.kinds import GroupKind
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.config import TranslatorConfig
from mesh.translate.gateway import gamma, hostnames
from mesh.translate.gateway.gateways import Gateways
from mesh.translate.gateway.listeners import Listener, Listeners
from mesh.translate.gateway.references import References
from mesh.translate.policy_attachment import scope_for_gateway, scope_for_service
from mesh.translate.route_builder import BackendTLSUse, Entry, Resolution, RouteBuilder
from mesh.translate.status import Conditions, ParentStatus, Reason, RouteStatus, Type, condition

_PARENT_KINDS = frozenset({kinds.GATEWAY, kinds.LISTENER_SET, kinds.X_LISTENER_SET})
_PARSERS = {"HTTPRoute": model.parse_http_route, "GRPCRoute": model.parse_grpc_route,
            "TLSRoute": model.parse_stream_route, "TCPRoute": model.parse_stream_route,
            "UDPRoute": model.parse_stream_route}
# Route kinds a Service can be the parent of (GAMMA): what the mesh listener serves, which
# takes the TCP connections the datapath hands it.
_MESH_KINDS = frozenset({"HTTPRoute", "GRPCRoute", "TCPRoute"})


@dataclass(frozen=True)
class RouteOutcome:
    """What one route came to: reusable while the route and its world stay the same."""

    obj: KubeObject
    route: model.Route
    status: RouteStatus | None
    # (listener key, hostnames, what the route adds to that listener's table)
    attachments: tuple[tuple[str, tuple[str, ...], Entry], ...]
    resolved: Resolution | None
    # The listeners it attached to, by position (as in `Listeners.listeners`, the same while
    # the world is), once per attachment.
    listeners: tuple[int, ...] = ()


@dataclass(frozen=True)
class Attachment:
    statuses: Mapping[ObjectKey, RouteStatus]  # routes with a parent of ours, oldest first
    attached: tuple[int, ...]  # per listener (as in `Listeners.listeners`): routes attached
    mesh_parents: frozenset[gamma.MeshParent]  # the Service ports GAMMA routes attached to
    outcomes: Mapping[ObjectKey, RouteOutcome]  # for the next translation's memo
    reused: int  # routes replayed from `previous`
    translated: int  # routes translated anew
    # The BackendTLSPolicies of the routes' backends, once every route is resolved.
    backend_tls: BackendTLSUse


def attach_routes(snapshot: StoreSnapshot, cfg: TranslatorConfig, refs: References,
                  routes: RouteBuilder, gws: Gateways, lis: Listeners,
                  previous: Mapping[ObjectKey, RouteOutcome]) -> Attachment:
    """`previous`: the outcomes of the last translation, if nothing a route can depend on
    changed since (else empty)."""
    return _Attacher(snapshot, cfg, refs, routes, gws, lis).run(previous)


class _Attacher:
    """The phase's working state: what it has counted and collected so far."""

    def __init__(self, snapshot: StoreSnapshot, cfg: TranslatorConfig, refs: References,
                 routes: RouteBuilder, gws: Gateways, lis: Listeners) -> None:
        self.s = snapshot
        self.cfg = cfg
        self.refs = refs
        self.routes = routes
        self.ours = {(g.obj.namespace, g.obj.name) for g in gws.gateways}
        # A listener's position stands for it: two listeners of one owner may share a name.
        self.by_owner: dict[ObjectKey, list[tuple[int, Listener]]] = {}
        # The hostnames of the served listeners that share a port (a Gateway's and its
        # ListenerSets'), for listener isolation.
        self.port_hostnames: dict[tuple[ObjectKey, int], list[str | None]] = {}
        for i, li in enumerate(lis.listeners):
            self.by_owner.setdefault(li.owner.key, []).append((i, li))
            if li.valid:
                self.port_hostnames.setdefault((li.gateway.obj.key, li.spec.port), []).append(
                    li.spec.hostname)
        self.statuses: dict[ObjectKey, RouteStatus] = {}
        self.attached = [0] * len(lis.listeners)
        self.mesh_parents: set[gamma.MeshParent] = set()
        self.outcomes: dict[ObjectKey, RouteOutcome] = {}

    def run(self, previous: Mapping[ObjectKey, RouteOutcome]) -> Attachment:
        reused = translated = 0
        objs = sorted(self.s.of_kind(kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE,
                                     kinds.TCP_ROUTE, kinds.UDP_ROUTE),
                      key=lambda o: (o.created, o.namespace, o.name))
        for obj in objs:
            old = previous.get(obj.key)
            if old is not None and old.obj.version == obj.version:
                self._reuse(old)
                reused += 1
                continue
            translated += 1
            try:
                route = _PARSERS[obj.kind](obj)
            except model.Invalid as e:
                self._invalid_route(obj, str(e))
                continue
            self._attach(route)
        return Attachment(self.statuses, tuple(self.attached), frozenset(self.mesh_parents),
                          self.outcomes, reused, translated, self.routes.backend_tls_use())

    def _invalid_route(self, obj: KubeObject, message: str) -> None:
        """A route the API's schema would refuse: each of our parents says why."""
        parents = []
        for raw in model.as_list(obj.spec.get("parentRefs")):
            try:
                ref = model.parse_parent_ref(raw, obj.namespace)
            except model.Invalid:
                continue
            if ref.kind == "Gateway" and (ref.namespace, ref.name) not in self.ours:
                continue
            parents.append(ParentStatus(ref, self.cfg.controller_name, Conditions([
                condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE, message,
                          obj.generation)])))
        if parents:
            self.statuses[obj.key] = RouteStatus(parents)

    def _reuse(self, old: RouteOutcome) -> None:
        if old.resolved is not None:
            self.routes.replay(old.obj, old.resolved)
            for key, names, entry in old.attachments:
                if key.startswith(gamma.KEY_PREFIX):
                    self.mesh_parents.add(gamma.parse_key(key))
                self.routes.put(key, names, entry)
            for i in old.listeners:
                self.attached[i] += 1
        if old.status is not None:
            self.statuses[old.obj.key] = old.status
        self.outcomes[old.obj.key] = old

    def _attach(self, route: model.Route) -> None:
        parents = []
        resolved = None
        attachments: list[tuple[str, tuple[str, ...], Entry]] = []
        listeners: list[int] = []
        gen = route.obj.generation
        for ref in route.parent_refs:
            if GroupKind(ref.group, ref.kind) == kinds.SERVICE and route.kind != "TLSRoute":
                if resolved is None:
                    resolved = self.routes.resolve(route)
                if route.kind not in _MESH_KINDS:
                    parents.append(ParentStatus(ref, self.cfg.controller_name, Conditions([
                        condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE,
                                  f"a {route.kind} cannot have a Service as parent: UDP to a "
                                  "Service is balanced in the kernel, with no proxy", gen)])))
                    continue
                parents.append(self._attach_mesh(route, ref, resolved, attachments))
                continue
            if GroupKind(ref.group, ref.kind) not in _PARENT_KINDS:
                continue
            # Parents by group and kind: an XListenerSet is not a ListenerSet of that name.
            candidates = self.by_owner.get(
                ObjectKey(ref.group, ref.kind, ref.namespace, ref.name))
            if ref.kind == "Gateway" and (ref.namespace, ref.name) not in self.ours:
                continue
            if ref.kind != "Gateway" and candidates is None:
                continue
            accepted, reason, message, attached = self._select_listeners(
                route, ref, candidates or [])
            if resolved is None:
                resolved = self.routes.resolve(route)
            conds = Conditions([condition(Type.ACCEPTED, accepted, reason, message, gen),
                                condition(Type.RESOLVED_REFS, resolved.ok, resolved.reason,
                                          resolved.message, gen)])
            parents.append(ParentStatus(ref, self.cfg.controller_name, conds))
            for i, li, names in attached:
                self.attached[i] += 1
                listeners.append(i)
                scope = partial(scope_for_gateway, route.obj, gateway=(
                    li.gateway.obj.namespace, li.gateway.obj.name), listener=li.spec.name,
                    owner=li.owner.key)
                attachments.append((li.key, names, self.routes.add(
                    route, li.key, names, resolved, li.spec.port, scope)))
        status = RouteStatus(parents) if parents else None
        if status is not None:
            self.statuses[route.obj.key] = status
        self.outcomes[route.obj.key] = RouteOutcome(
            route.obj, route, status, tuple(attachments), resolved, tuple(listeners))

    def _attach_mesh(self, route: model.Route, ref: model.ParentRef, resolved: Resolution,
                     attachments: list[tuple[str, tuple[str, ...], Entry]]) -> ParentStatus:
        """GAMMA: a route whose parent is a Service applies to traffic sent to that Service
        (its ClusterIP, every port or the one named). In the Service's namespace it is a
        producer route, for every client; in another namespace a consumer route, for that
        namespace's clients only. Hostnames do not select mesh traffic: the Service does."""
        gen = route.obj.generation
        svc = self.routes.service(ref.namespace, ref.name)
        ports = [p for p in svc.ports if (ref.port is None or p.port == ref.port)
                 and p.protocol == "TCP"] if svc else []
        if svc is None or not ports:
            what = f"Service {ref.namespace}/{ref.name}"
            message = f"{what} does not exist" if svc is None else \
                f"{what} has no TCP port {ref.port}"
            return ParentStatus(ref, self.cfg.controller_name, Conditions([
                condition(Type.ACCEPTED, False, Reason.NO_MATCHING_PARENT, message, gen),
                condition(Type.RESOLVED_REFS, resolved.ok, resolved.reason, resolved.message,
                          gen)]))
        consumer = "" if route.obj.namespace == ref.namespace else route.obj.namespace
        for port in ports:
            parent = gamma.MeshParent(ref.namespace, ref.name, port.port, consumer)
            self.mesh_parents.add(parent)
            key = gamma.key(parent)
            scope = partial(scope_for_service, route.obj, namespace=ref.namespace,
                            name=ref.name, port_name=port.name)
            attachments.append((key, ("*",), self.routes.add(route, key, ("*",), resolved,
                                                              port.port, scope)))
        which = "every client" if not consumer else f"clients in namespace {consumer}"
        return ParentStatus(ref, self.cfg.controller_name, Conditions([
            condition(Type.ACCEPTED, True, Reason.ACCEPTED,
                      f"applies to traffic to Service {ref.namespace}/{ref.name} from {which}",
                      gen),
            condition(Type.RESOLVED_REFS, resolved.ok, resolved.reason, resolved.message,
                      gen)]))

    def _select_listeners(self, route: model.Route, ref: model.ParentRef,
                          candidates: list[tuple[int, Listener]],
                          ) -> tuple[bool, str, str, list[tuple[int, Listener, tuple[str, ...]]]]:
        lis = [(i, li) for i, li in candidates
               if (ref.section_name is None or li.spec.name == ref.section_name)
               and (ref.port is None or li.spec.port == ref.port)]
        if not lis:
            return False, Reason.NO_MATCHING_PARENT, "no listener matches the parentRef's " \
                "sectionName and port", []
        kind_ok = [(i, li) for i, li in lis if li.valid and route.kind in li.supported_kinds]
        if not kind_ok:
            return False, Reason.NOT_ALLOWED_BY_LISTENERS, \
                f"no valid listener of the parentRef takes {route.kind}s", []
        # "Same" is the namespace of what declares the listener: a ListenerSet's own, not
        # its parent Gateway's.
        ns_ok = [(i, li) for i, li in kind_ok if self.refs.namespace_allowed(
            li.spec.allowed_from, li.spec.allowed_selector, li.owner.namespace,
            route.obj.namespace)]
        if not ns_ok:
            return False, Reason.NOT_ALLOWED_BY_LISTENERS, \
                f"no listener allows a {route.kind} from namespace {route.obj.namespace}", []
        attached = []
        for i, li in ns_ok:
            # A TCP or UDP listener's hostname means nothing (the spec ignores it).
            names = ("*",) if li.spec.protocol in ("TCP", "UDP") else \
                hostnames.intersect(li.spec.hostname, route.hostnames)
            if names:
                # Attached, and served only for the names no more specific listener on
                # the port takes (listener isolation).
                others = self.port_hostnames.get((li.gateway.obj.key, li.spec.port), [])
                attached.append((i, li, hostnames.isolate(names, li.spec.hostname, others)))
        if not attached:
            return False, Reason.NO_MATCHING_LISTENER_HOSTNAME, \
                "no listener hostname matches the route's hostnames", []
        return True, Reason.ACCEPTED, "attached to " + ", ".join(
            li.spec.name for _, li, _ in attached), attached
