"""The translator: a pure function from a store snapshot to the IR and every object's status.

No I/O, no clocks, no globals. It follows the Gateway API specification (v1.6): which
Gateways are ours, which listeners are valid, which routes attach where, which references
resolve, and what each object's conditions say. `Programmed` is left for the status sink,
which knows what the node's Envoy ACKed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.kinds import GATEWAY_GROUP, GroupKind
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.config import Translation, TranslatorConfig
from mesh.translate.gateway import gamma, hostnames
from mesh.translate.policy_attachment import (
    PolicyIndex,
    affected,
    scope_for_gateway,
    scope_for_service,
)
from mesh.translate.route_builder import Entry, Resolution, RouteBuilder, VhostCache
from mesh.translate.status import (
    ClassStatus,
    Conditions,
    GatewayStatus,
    ListenerStatus,
    ObjectStatus,
    ParentStatus,
    PolicyStatus,
    Reason,
    RouteStatus,
    Type,
    condition,
)

# Route kinds a listener protocol accepts, in the order status lists them.
_KINDS_FOR_PROTOCOL: dict[str, tuple[str, ...]] = {
    "HTTP": ("HTTPRoute", "GRPCRoute"),
    "HTTPS": ("HTTPRoute", "GRPCRoute"),
    "TLS": ("TLSRoute",),
}
# Protocols that may share a port (they are told apart by SNI).
_PORT_FAMILY = {"HTTP": "http", "HTTPS": "tls", "TLS": "tls", "TCP": "tcp", "UDP": "udp"}


@dataclass
class _RouteOutcome:
    """What one route came to: reusable while the route and its world stay the same."""

    obj: KubeObject
    route: model.Route
    status: RouteStatus | None
    # (listener key, hostnames, what the route adds to that listener's table)
    attachments: list[tuple[str, tuple[str, ...], Entry]]
    resolved: Resolution | None


class TranslationMemo:
    """Route outcomes kept between translations by the caller (the pipeline).

    With 10,000 routes one changed route should not cost 10,000 re-translations. An outcome
    is reused only when the route's content version is the same and nothing it can depend on
    changed: the fingerprint holds the content version of every object except routes,
    Ingresses and EndpointSlices (endpoints are joined to backends afresh each time). The
    result is the same as a translation from scratch; the tests check that."""

    def __init__(self) -> None:
        self.routes: dict[ObjectKey, _RouteOutcome] = {}
        self.vhosts: VhostCache = {}
        self.world: tuple[Any, ...] = ()
        self.hits = 0  # routes reused, over all translations
        self.misses = 0  # routes translated anew by the last translation


_PARENT_KINDS = frozenset({kinds.GATEWAY, kinds.LISTENER_SET, kinds.X_LISTENER_SET})
# Pods: only the mesh listener's consumer chains read them, assembled afresh each time.
_NOT_IN_WORLD = frozenset({kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE,
                           kinds.ENDPOINT_SLICE, kinds.INGRESS, kinds.POD})


def _world(snapshot: StoreSnapshot, cfg: TranslatorConfig) -> tuple[Any, ...]:
    parts = sorted((o.key, o.version) for o in snapshot if o.group_kind not in _NOT_IN_WORLD)
    return (cfg, *parts)


@dataclass
class _Listener:
    """A Gateway or ListenerSet listener while it is being validated and routes attach."""

    spec: model.Listener
    gateway: model.Gateway
    owner: KubeObject  # the Gateway or the ListenerSet that declares it
    status: ListenerStatus
    supported_kinds: tuple[str, ...]
    valid: bool = True
    attached: int = 0
    certificates: tuple[str, ...] = ()
    client_validation: ir.ClientValidation | None = None
    addresses: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.owner.kind}/{self.owner.namespace}/{self.owner.name}/{self.spec.name}"


def translate(snapshot: StoreSnapshot, cfg: TranslatorConfig | None = None,
              previous_addresses: Mapping[str, str] | None = None,
              memo: TranslationMemo | None = None) -> Translation:
    """The IR and status for `snapshot`. With `memo`, unchanged routes' outcomes from the
    previous call are reused, and the memo is refilled for the next call."""
    return _Translator(snapshot, cfg or TranslatorConfig(), dict(previous_addresses or {}),
                       memo).run()


class _Translator:
    def __init__(self, snapshot: StoreSnapshot, cfg: TranslatorConfig,
                 previous: dict[str, str], cache: TranslationMemo | None = None) -> None:
        self.s = snapshot
        self.cfg = cfg
        self.cache = cache
        self.world = _world(snapshot, cfg) if cache is not None else ()
        self.outcomes: dict[ObjectKey, _RouteOutcome] = {}
        self.previous_addresses = previous
        self.status: dict[ObjectKey, ObjectStatus] = {}
        self.namespaces = {o.name: o.labels for o in snapshot.of_kind(kinds.NAMESPACE)}
        self.grants = [model.parse_reference_grant(o)
                       for o in snapshot.of_kind(kinds.REFERENCE_GRANT)]
        self.local_addresses = _node_addresses(snapshot, cfg.node_name)
        self.policies = PolicyIndex(snapshot, cfg.global_rate_limits)
        self.routes = RouteBuilder(snapshot, self.grants,
                                   cache.vhosts if cache is not None else None, self.policies)
        self.mesh_parents: set[gamma.MeshParent] = set()  # GAMMA routes' Service ports
        self.addresses: dict[str, str] = {}
        self.trust_bundles: dict[str, bytes] = {}  # name -> CA certificates (PEM)
        self._listener_set_parents: dict[ObjectKey, ObjectKey] = {}  # allowed ones
        # Gateway -> the certificate it presents to TLS backends
        self.backend_certificates: dict[tuple[str, str], str] = {}

    # -- entry ----------------------------------------------------------------------------

    def run(self) -> Translation:
        classes = self._gateway_classes()
        gateways = self._gateways(classes)
        listeners = self._listeners(gateways)
        self._attach_routes(gateways, listeners)
        self._gateway_status(gateways, listeners)
        self._policy_status()
        self._traffic_policy_status()
        out_listeners = self._ir_listeners(listeners)
        mesh_listener, redirects = gamma.listener(self.s, self.routes, self.mesh_parents)
        if mesh_listener is not None:
            out_listeners.append(mesh_listener)
        from mesh.translate.ingress import translate_ingresses
        from mesh.translate.services import translate_services

        ingress = translate_ingresses(self.s, self.cfg, self.routes,
                                      lambda: self._allocate("ingress"))
        self.status.update(ingress.status)
        if ingress.used_address:
            self.addresses["ingress"] = ingress.used_address
        if self.cache is not None:
            self.cache.vhosts = self.routes.vhosts
        return Translation(
            ir=ir.IR(
                listeners=tuple(out_listeners) + ingress.listeners,
                route_tables=tuple(self.routes.tables()),
                backends=tuple(self.routes.backends()),
                certificates=tuple(self.routes.certificates()),
                trust_bundles=tuple(ir.TrustBundle(k, v)
                                    for k, v in sorted(self.trust_bundles.items())),
                services=translate_services(self.s, self.routes, self.local_addresses,
                                            redirects),
            ),
            status=self.status,
            addresses=self.addresses,
        )

    # -- GatewayClass -----------------------------------------------------------------------

    def _gateway_classes(self) -> set[str]:
        ours = set()
        for gc in self.s.of_kind(kinds.GATEWAY_CLASS):
            if gc.spec.get("controllerName") != self.cfg.controller_name:
                continue
            ours.add(gc.name)
            self.status[gc.key] = ClassStatus(Conditions([
                condition(Type.ACCEPTED, True, Reason.ACCEPTED,
                          "accepted by " + self.cfg.controller_name, gc.generation),
                condition(Type.SUPPORTED_VERSION, True, Reason.SUPPORTED_VERSION,
                          "Gateway API v1.6", gc.generation),
            ]))
        return ours

    # -- Gateways and their listeners ------------------------------------------------------

    def _gateways(self, classes: set[str]) -> list[model.Gateway]:
        out = []
        for obj in self.s.of_kind(kinds.GATEWAY):
            class_name = obj.spec.get("gatewayClassName")
            if not isinstance(class_name, str) or class_name not in classes:
                continue
            try:
                out.append(model.parse_gateway(obj))
            except model.Invalid as e:
                self.status[obj.key] = GatewayStatus(Conditions([
                    condition(Type.ACCEPTED, False, Reason.INVALID, str(e), obj.generation),
                    condition(Type.PROGRAMMED, False, Reason.INVALID, str(e), obj.generation),
                ]), listeners=None)
        return out

    def _listeners(self, gateways: list[model.Gateway]) -> list[_Listener]:
        by_gateway = {(g.obj.namespace, g.obj.name): g for g in gateways}
        listeners: list[_Listener] = []
        for g in gateways:
            listeners += [self._new_listener(x, g, g.obj) for x in g.listeners]
        # ListenerSets join their parent's listeners, after them and oldest first.
        sets = sorted(self.s.of_kind(kinds.LISTENER_SET, kinds.X_LISTENER_SET),
                      key=lambda o: (o.created, o.namespace, o.name))
        for obj in sets:
            self._listener_set(obj, by_gateway, listeners)
        self._validate(listeners)
        return listeners

    def _listener_set(self, obj: KubeObject, gateways: dict[tuple[str, str], model.Gateway],
                      listeners: list[_Listener]) -> None:
        try:
            ls = model.parse_listener_set(obj)
        except model.Invalid as e:
            self.status[obj.key] = GatewayStatus(Conditions([
                condition(Type.ACCEPTED, False, Reason.INVALID, str(e), obj.generation)]),
                listeners=None)
            return
        g = gateways.get((ls.parent.namespace, ls.parent.name))
        if g is None:
            return  # not one of our Gateways: not ours to report on
        allowed = self._namespace_allowed(g.allowed_listener_sets_from,
                                          g.allowed_listener_sets_selector,
                                          g.obj.namespace, obj.namespace)
        if not allowed:
            msg = f"Gateway {g.obj.namespace}/{g.obj.name} does not allow ListenerSets from " \
                  f"namespace {obj.namespace}"
            self.status[obj.key] = GatewayStatus(Conditions([
                condition(Type.ACCEPTED, False, Reason.NOT_ALLOWED, msg, obj.generation),
                condition(Type.PROGRAMMED, False, Reason.NOT_ALLOWED, msg, obj.generation)]),
                listeners=None)
            return
        self.status[obj.key] = GatewayStatus()
        self._listener_set_parents[obj.key] = g.obj.key
        listeners += [self._new_listener(x, g, obj) for x in ls.listeners]

    def _new_listener(self, spec: model.Listener, g: model.Gateway,
                      owner: KubeObject) -> _Listener:
        default = _KINDS_FOR_PROTOCOL.get(spec.protocol, ())
        if spec.allowed_kinds is None:
            route_kinds = default
        else:
            route_kinds = tuple(k.kind for k in spec.allowed_kinds
                                if k.group == GATEWAY_GROUP and k.kind in default)
        status = ListenerStatus(spec.name, tuple((GATEWAY_GROUP, k) for k in route_kinds))
        conds = status.conditions
        li = _Listener(spec, g, owner, status, route_kinds)
        gen = owner.generation
        if spec.protocol not in _KINDS_FOR_PROTOCOL:
            li.valid = False
            conds.append(condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_PROTOCOL,
                                   f"protocol {spec.protocol} is not supported", gen))
        if spec.allowed_kinds is not None and len(route_kinds) != len(spec.allowed_kinds):
            bad = [f"{k.group}/{k.kind}" for k in spec.allowed_kinds
                   if k.kind not in route_kinds]
            # The supported kinds still attach; only a listener left with none is invalid.
            li.valid = bool(route_kinds)
            conds.append(condition(Type.RESOLVED_REFS, False, Reason.INVALID_ROUTE_KINDS,
                                   f"route kinds not supported here: {', '.join(bad)}", gen))
        if spec.protocol in ("HTTPS", "TLS"):
            self._listener_tls(li)
        return li

    def _listener_tls(self, li: _Listener) -> None:
        spec, gen = li.spec, li.owner.generation
        if spec.protocol == "HTTPS" and spec.tls_mode == "Passthrough":
            li.valid = False
            li.status.conditions.append(condition(
                Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE,
                "HTTPS listeners terminate TLS; use a TLS listener for passthrough", gen))
            return
        if spec.tls_mode == "Passthrough":
            return
        if not spec.certificate_refs:
            li.valid = False
            li.status.conditions.append(condition(
                Type.RESOLVED_REFS, False, Reason.INVALID_CERTIFICATE_REF,
                "a listener that terminates TLS needs certificateRefs", gen))
            return
        certs = []
        for ref in spec.certificate_refs:
            found = self._certificate_secret(ref, li.owner, "certificateRef",
                                             Reason.INVALID_CERTIFICATE_REF)
            if isinstance(found, tuple):
                li.valid = False
                li.status.conditions.append(
                    condition(Type.RESOLVED_REFS, False, found[0], found[1], gen))
                return
            certs.append(found)
        li.certificates = tuple(certs)
        if spec.protocol == "HTTPS":
            self._client_validation(li)

    def _client_validation(self, li: _Listener) -> None:
        """Client certificate validation for an HTTPS listener, from its Gateway's
        spec.tls.frontend (its port's entry, or the default). References that do not
        resolve are reported; with none usable the listener is not served at all rather
        than served without the validation it asks for."""
        g, gen = li.gateway, li.owner.generation
        validation = g.validation_for(li.spec.port)
        if validation is None:
            return
        bundle = b""
        problems: list[tuple[str, str]] = []
        for ref in validation.ca_refs:
            where = f"{ref.kind} {ref.namespace}/{ref.name}"
            if ref.group != "" or ref.kind not in ("ConfigMap", "Secret"):
                problems.append((Reason.INVALID_CA_CERTIFICATE_KIND, f"caCertificateRef {where}: "
                                 "only ConfigMaps and Secrets can hold CA certificates"))
                continue
            if ref.namespace != g.obj.namespace and not self._granted(
                    "Gateway", g.obj.namespace, "", ref.kind, ref.namespace, ref.name):
                problems.append((Reason.REF_NOT_PERMITTED, f"caCertificateRef {where}: no "
                                 f"ReferenceGrant in {ref.namespace} allows it"))
                continue
            obj = self.s.get(GroupKind("", ref.kind), ref.namespace, ref.name)
            data = model.ca_certificates(obj)
            if obj is None:
                problems.append((Reason.INVALID_CA_CERTIFICATE_REF,
                                 f"caCertificateRef {where} does not exist"))
            elif data is None:
                problems.append((Reason.INVALID_CA_CERTIFICATE_REF,
                                 f"caCertificateRef {where} holds no CA certificate in ca.crt"))
            else:
                bundle += data
        conds = li.status.conditions
        if problems:
            conds.append(condition(Type.RESOLVED_REFS, False, problems[0][0],
                                   "; ".join(p[1] for p in problems), gen))
        if not bundle:
            li.valid = False
            conds.append(condition(Type.ACCEPTED, False, Reason.NO_VALID_CA_CERTIFICATE,
                                   "no usable CA certificate to validate clients with"
                                   if validation.ca_refs else "caCertificateRefs is empty",
                                   gen))
            return
        name = f"ca/{g.obj.namespace}/{g.obj.name}/{li.spec.port}"
        self.trust_bundles[name] = bundle
        li.client_validation = ir.ClientValidation(
            name, allow_insecure=validation.mode == "AllowInsecureFallback")

    def _validate(self, listeners: list[_Listener]) -> None:
        """Conflicts between listeners of one Gateway: the earlier listener wins."""
        seen: dict[tuple[str, str, int], list[_Listener]] = {}
        for li in listeners:
            gkey = f"{li.gateway.obj.namespace}/{li.gateway.obj.name}"
            seen.setdefault((gkey, "", li.spec.port), []).append(li)
        for group in seen.values():
            first_family = None
            hostnames_seen: set[tuple[str, str | None]] = set()
            for li in group:
                gen = li.owner.generation
                family = _PORT_FAMILY.get(li.spec.protocol)
                if family is None:
                    continue
                if first_family is None and li.spec.protocol in _KINDS_FOR_PROTOCOL:
                    first_family = family  # a protocol not served claims no port
                if first_family is not None and family != first_family:
                    li.valid = False
                    msg = f"port {li.spec.port} is already used with another protocol"
                    conds = li.status.conditions
                    conds[:] = [c for c in conds if c.type != Type.ACCEPTED]
                    conds += [
                        condition(Type.ACCEPTED, False, Reason.PROTOCOL_CONFLICT, msg, gen),
                        condition(Type.CONFLICTED, True, Reason.PROTOCOL_CONFLICT, msg, gen),
                        condition(Type.PROGRAMMED, False, Reason.PROTOCOL_CONFLICT, msg, gen)]
                    continue
                if li.spec.protocol not in _KINDS_FOR_PROTOCOL:
                    continue
                host_key = (family, li.spec.hostname)
                if host_key in hostnames_seen:
                    li.valid = False
                    li.status.conditions.append(condition(
                        Type.CONFLICTED, True, Reason.HOSTNAME_CONFLICT,
                        f"another listener on port {li.spec.port} has hostname "
                        f"{li.spec.hostname or '(none)'}", gen))
                    continue
                hostnames_seen.add(host_key)

    # -- references ----------------------------------------------------------------------

    def _granted(self, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str,
                 to_name: str) -> bool:
        return any(g.namespace == to_ns and g.permits(GATEWAY_GROUP, from_kind, from_ns,
                                                      to_group, to_kind, to_name)
                   for g in self.grants)

    def _namespace_allowed(self, from_: str, selector: Mapping[str, Any], own_ns: str,
                           route_ns: str) -> bool:
        if from_ == "All":
            return True
        if from_ == "Same":
            return route_ns == own_ns
        if from_ == "Selector":
            # The API server labels every namespace with its own name.
            labels = {**self.namespaces.get(route_ns, {}),
                      "kubernetes.io/metadata.name": route_ns}
            return _selects(selector, labels)
        return False

    # -- routes ---------------------------------------------------------------------------

    def _attach_routes(self, gateways: list[model.Gateway], listeners: list[_Listener]) -> None:
        ours = {(g.obj.namespace, g.obj.name) for g in gateways}
        by_owner: dict[ObjectKey, list[_Listener]] = {}
        for li in listeners:
            by_owner.setdefault(li.owner.key, []).append(li)
        parsers = {"HTTPRoute": model.parse_http_route, "GRPCRoute": model.parse_grpc_route,
                   "TLSRoute": model.parse_tls_route}
        by_key = {li.key: li for li in listeners}
        if self.cache is not None:
            self.cache.misses = 0
        # Outcomes are reusable only if nothing a route can depend on changed.
        previous = self.cache.routes if self.cache is not None and \
            self.cache.world == self.world else {}
        objs = sorted(self.s.of_kind(kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE),
                      key=lambda o: (o.created, o.namespace, o.name))
        for obj in objs:
            old = previous.get(obj.key)
            if old is not None and old.obj.version == obj.version:
                self._reuse(old, by_key)
                continue
            if self.cache is not None:
                self.cache.misses += 1
            try:
                route = parsers[obj.kind](obj)
            except model.Invalid as e:
                self._invalid_route(obj, str(e), ours)
                continue
            self._attach(route, ours, by_owner)
        if self.cache is not None:
            self.cache.routes, self.cache.world = self.outcomes, self.world

    def _invalid_route(self, obj: KubeObject, message: str,
                       ours: set[tuple[str, str]]) -> None:
        """A route the API's schema would refuse: each of our parents says why."""
        parents = []
        for raw in model.as_list(obj.spec.get("parentRefs")):
            try:
                ref = model.parse_parent_ref(raw, obj.namespace)
            except model.Invalid:
                continue
            if ref.kind == "Gateway" and (ref.namespace, ref.name) not in ours:
                continue
            parents.append(ParentStatus(ref, self.cfg.controller_name, Conditions([
                condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE, message,
                          obj.generation)])))
        if parents:
            self.status[obj.key] = RouteStatus(parents)

    def _reuse(self, old: _RouteOutcome, by_key: dict[str, _Listener]) -> None:
        assert self.cache is not None
        self.cache.hits += 1
        if old.resolved is not None:
            self.routes.replay(old.obj, old.resolved)
            for key, names, entry in old.attachments:
                if key.startswith(gamma.KEY_PREFIX):
                    self.mesh_parents.add(gamma.parse_key(key))
                else:
                    by_key[key].attached += 1
                self.routes.put(key, names, entry)
        if old.status is not None:
            self.status[old.obj.key] = old.status
        self.outcomes[old.obj.key] = old

    def _attach(self, route: model.Route, ours: set[tuple[str, str]],
                by_owner: dict[ObjectKey, list[_Listener]]) -> None:
        parents = []
        resolved = None
        attachments: list[tuple[str, tuple[str, ...], Entry]] = []
        gen = route.obj.generation
        for ref in route.parent_refs:
            if GroupKind(ref.group, ref.kind) == kinds.SERVICE and route.kind != "TLSRoute":
                if resolved is None:
                    resolved = self.routes.resolve(route)
                parents.append(self._attach_mesh(route, ref, resolved, attachments))
                continue
            if GroupKind(ref.group, ref.kind) not in _PARENT_KINDS:
                continue
            # Parents by group and kind: an XListenerSet is not a ListenerSet of that name.
            candidates = by_owner.get(ObjectKey(ref.group, ref.kind, ref.namespace, ref.name))
            if ref.kind == "Gateway" and (ref.namespace, ref.name) not in ours:
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
            for li, names in attached:
                li.attached += 1
                scope = partial(scope_for_gateway, route.obj, gateway=(
                    li.gateway.obj.namespace, li.gateway.obj.name), listener=li.spec.name,
                    owner=li.owner.key)
                attachments.append((li.key, names, self.routes.add(
                    route, li.key, names, resolved, li.spec.port, scope)))
        status = RouteStatus(parents) if parents else None
        if status is not None:
            self.status[route.obj.key] = status
        self.outcomes[route.obj.key] = _RouteOutcome(
            route.obj, route, status, attachments, resolved)

    def _attach_mesh(self, route: model.Route, ref: model.ParentRef, resolved: Resolution,
                     attachments: list[tuple[str, tuple[str, ...], Entry]]) -> ParentStatus:
        """GAMMA: a route whose parent is a Service applies to traffic sent to that Service
        (its ClusterIP, every port or the one named). In the Service's namespace it is a
        producer route, for every client; in another namespace a consumer route, for that
        namespace's clients only. Hostnames do not select mesh traffic: the Service does."""
        gen = route.obj.generation
        svc = self.routes.service(ref.namespace, ref.name)
        ports = [p for p in svc.ports if ref.port is None or p.port == ref.port] if svc else []
        if svc is None or not ports:
            what = f"Service {ref.namespace}/{ref.name}"
            message = f"{what} does not exist" if svc is None else \
                f"{what} has no port {ref.port}"
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
                          candidates: list[_Listener],
                          ) -> tuple[bool, str, str, list[tuple[_Listener, tuple[str, ...]]]]:
        lis = [li for li in candidates
               if (ref.section_name is None or li.spec.name == ref.section_name)
               and (ref.port is None or li.spec.port == ref.port)]
        if not lis:
            return False, Reason.NO_MATCHING_PARENT, "no listener matches the parentRef's " \
                "sectionName and port", []
        lis = [li for li in lis if li.valid]
        kind_ok = [li for li in lis if route.kind in li.supported_kinds]
        # "Same" is the namespace of what declares the listener: a ListenerSet's own, not
        # its parent Gateway's.
        ns_ok = [li for li in kind_ok if self._namespace_allowed(
            li.spec.allowed_from, li.spec.allowed_selector, li.owner.namespace,
            route.obj.namespace)]
        if not ns_ok:
            return False, Reason.NOT_ALLOWED_BY_LISTENERS, \
                f"no listener allows a {route.kind} from namespace {route.obj.namespace}", []
        attached = []
        for li in ns_ok:
            names = hostnames.intersect(li.spec.hostname, route.hostnames)
            if names:
                attached.append((li, names))
        if not attached:
            return False, Reason.NO_MATCHING_LISTENER_HOSTNAME, \
                "no listener hostname matches the route's hostnames", []
        return True, Reason.ACCEPTED, "attached to " + ", ".join(
            li.spec.name for li, _ in attached), attached

    # -- status of Gateways and their listeners -------------------------------------------

    def _gateway_status(self, gateways: list[model.Gateway], listeners: list[_Listener]) -> None:
        for g in gateways:
            gen = g.obj.generation
            conds = Conditions()
            addresses, unusable = self._gateway_addresses(g)
            shown, unassigned = self._status_addresses(g, addresses)
            own = [li for li in listeners if li.owner is g.obj]
            for li in listeners:
                lconds = li.status.conditions
                if not lconds.has(Type.ACCEPTED):
                    lconds.append(condition(
                        Type.ACCEPTED, li.valid, Reason.ACCEPTED if li.valid else Reason.INVALID,
                        "listener accepted" if li.valid else "listener not accepted",
                        li.owner.generation))
                if not lconds.has(Type.RESOLVED_REFS):
                    lconds.append(condition(
                        Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS, "references resolved",
                        li.owner.generation))
                if not lconds.has(Type.CONFLICTED):
                    lconds.append(condition(
                        Type.CONFLICTED, False, Reason.NO_CONFLICTS, "no conflicts",
                        li.owner.generation))
                li.status.attached_routes = li.attached
            conds.append(condition(Type.ACCEPTED, True, Reason.ACCEPTED, "accepted", gen))
            if own and not any(li.valid for li in own):
                conds[-1] = condition(Type.ACCEPTED, False, Reason.LISTENERS_NOT_VALID,
                                      "no listener is valid", gen)
            if unusable:
                # Served on the usable ones, if any; not Programmed until all are usable.
                msg = f"address {', '.join(unusable)} cannot be used on this node: it is " \
                    "not one of its addresses (or not an IP address)"
                conds.append(condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_USABLE, msg,
                                       gen))
            elif not addresses:
                conds.append(condition(
                    Type.PROGRAMMED, False, Reason.ADDRESS_NOT_USABLE,
                    "no address left in the pool" if self.cfg.gateway_addresses == "pool"
                    else f"this node ({self.cfg.node_name}) has no Node object with an IP "
                    "address to serve the Gateway on", gen))
            elif unassigned:
                conds.append(condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_ASSIGNED,
                                       unassigned, gen))
            unsupported = sorted({t for t, _ in g.addresses if t != "IPAddress"})
            if unsupported:
                msg = f"address types {', '.join(unsupported)} are not supported " \
                    "(IPAddress is)"
                conds[:] = [
                    condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_ADDRESS, msg, gen),
                    condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_ASSIGNED, msg, gen)]
            cert, problem = self._backend_client_certificate(g)
            if problem is None:
                conds.append(condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                                       "references resolved", gen))
            else:
                conds.append(condition(Type.RESOLVED_REFS, False, problem[0], problem[1], gen))
            if cert is not None:
                self.backend_certificates[(g.obj.namespace, g.obj.name)] = cert
            modes = [v.mode for v in (g.client_validation,
                                      *g.client_validation_per_port.values()) if v]
            if "AllowInsecureFallback" in modes:
                conds.append(condition(
                    Type.INSECURE_FRONTEND_VALIDATION_MODE, True, Reason.CONFIGURATION_CHANGED,
                    "client certificate validation lets clients without a valid certificate "
                    "in on some ports (AllowInsecureFallback)", gen))
            params = (g.obj.spec.get("infrastructure") or {}).get("parametersRef") \
                if isinstance(g.obj.spec.get("infrastructure"), dict) else None
            if params is not None:
                # No parameters kind is supported: a Gateway that asks for some is rejected
                # rather than run without what it asked for.
                msg = f"parametersRef {params!r} cannot be resolved: no parameters are supported"
                conds[:] = [condition(Type.ACCEPTED, False, Reason.INVALID_PARAMETERS, msg, gen),
                            condition(Type.PROGRAMMED, False, Reason.INVALID, msg, gen)]
                for li in own:
                    li.valid = False
            self.status[g.obj.key] = GatewayStatus(
                conds, [li.status for li in own], tuple(shown),
                attached_listener_sets=0)  # counted below
            for li in listeners:
                if li.owner is not g.obj and li.gateway is g:
                    st = self.status.setdefault(li.owner.key, GatewayStatus())
                    assert isinstance(st, GatewayStatus) and st.listeners is not None
                    st.listeners.append(li.status)
            for li in listeners:
                if li.gateway is g:
                    li.addresses = tuple(addresses)
        for obj in self.s.of_kind(kinds.LISTENER_SET, kinds.X_LISTENER_SET):
            ls_status = self.status.get(obj.key)
            if not isinstance(ls_status, GatewayStatus) or ls_status.conditions:
                continue
            ok = any(x.conditions.true(Type.ACCEPTED) for x in ls_status.listeners or ())
            ls_status.conditions = Conditions([condition(
                Type.ACCEPTED, ok, Reason.ACCEPTED if ok else Reason.LISTENERS_NOT_VALID,
                "accepted" if ok else "no listener is valid", obj.generation)])
            if not ok:
                ls_status.conditions.append(condition(
                    Type.PROGRAMMED, False, Reason.LISTENERS_NOT_VALID, "no listener is valid",
                    obj.generation))
            parent = self._listener_set_parents.get(obj.key)
            parent_status = self.status.get(parent) if parent is not None else None
            if ok and isinstance(parent_status, GatewayStatus) and \
                    parent_status.attached_listener_sets is not None:
                parent_status.attached_listener_sets += 1

    def _backend_client_certificate(self, g: model.Gateway
                                    ) -> tuple[str | None, tuple[str, str] | None]:
        """(the certificate the Gateway presents to TLS backends, or why it cannot):
        Gateway spec.tls.backend.clientCertificateRef."""
        ref = g.backend_client_certificate
        if ref is None:
            return None, None
        found = self._certificate_secret(ref, g.obj, "clientCertificateRef",
                                         Reason.INVALID_CLIENT_CERTIFICATE_REF)
        return (None, found) if isinstance(found, tuple) else (found, None)

    def _certificate_secret(self, ref: model.BackendObjectRef, referrer: KubeObject,
                            field: str, invalid: str) -> str | tuple[str, str]:
        """The certificate in the Secret `ref` names, or (reason, message) why it cannot be
        used: `invalid` for what is not a usable Secret, RefNotPermitted without a
        ReferenceGrant from `referrer`."""
        where = f"Secret {ref.namespace}/{ref.name}"
        if ref.group != "" or ref.kind != "Secret":
            return invalid, f"{field} {ref.group or 'core'}/{ref.kind} {ref.name} is not " \
                "a Secret"
        if ref.namespace != referrer.namespace and not self._granted(
                referrer.kind, referrer.namespace, "", "Secret", ref.namespace, ref.name):
            return Reason.REF_NOT_PERMITTED, f"{field} {where}: no ReferenceGrant in " \
                f"{ref.namespace} allows it"
        secret = self.s.get(kinds.SECRET, ref.namespace, ref.name)
        if secret is None:
            return invalid, f"{field} {where} does not exist"
        name = self.routes.certificate(secret)
        if name is None:
            return invalid, f"{field} {where} holds no valid tls.crt and tls.key"
        return name

    def _allocate(self, key: str) -> str | None:
        taken = set(self.addresses.values()) | {
            v for k, v in self.previous_addresses.items() if k != key}
        prev = self.previous_addresses.get(key)
        if prev is not None and prev not in set(self.addresses.values()):
            self.addresses[key] = prev
            return prev
        for host in ipaddress.ip_network(self.cfg.address_pool).hosts():
            if str(host) not in taken:
                self.addresses[key] = str(host)
                return str(host)
        return None

    def _usable(self, address: str) -> bool:
        """A static address the node can serve: loopback, or one of the node's own."""
        ip = ipaddress.ip_address(address)
        return self.local_addresses is None or ip.is_loopback or str(ip) in self.local_addresses

    def _gateway_addresses(self, g: model.Gateway) -> tuple[list[str], list[str]]:
        """(the addresses to serve the Gateway on, the static ones this node cannot use)."""
        key = f"gateway/{g.obj.namespace}/{g.obj.name}"
        if any(t != "IPAddress" for t, _ in g.addresses):
            return [], []  # not accepted (UnsupportedAddress): nothing to serve
        usable: list[str] = []
        unusable: list[str] = []
        for _, value in g.addresses:
            if not value:
                continue  # an IPAddress without a value asks for one to be assigned
            try:
                ok = self._usable(value)
            except ValueError:
                ok = False
            (usable if ok else unusable).append(value)
        if not usable and not unusable:
            if self.cfg.gateway_addresses != "pool":
                return _ips(self.local_addresses or ()), []  # the node's: not allocated
            assigned = self._allocate(key)
            usable = [assigned] if assigned else []
        for i, address in enumerate(usable):
            self.addresses[key if i == 0 else f"{key}/{i}"] = address
        return usable, unusable

    def _status_addresses(self, g: model.Gateway, served: list[str]) -> tuple[list[str], str]:
        """(the addresses the Gateway's status lists, why there are none yet or ""). Where
        clients reach it: what this node serves, unless the Gateway asked for nothing in
        particular and the addresses come from the nodes or a LoadBalancer Service."""
        mode = self.cfg.gateway_addresses
        if mode == "pool" or any(value for _, value in g.addresses) or not served:
            return served, ""
        if mode == "node":
            every = sorted({a for node in self.s.of_kind(kinds.NODE)
                            for a in _ips(_node_address_list(node))}, key=_address_order)
            return every or served, ""
        services = sorted(
            (svc for svc in self.s.of_kind(kinds.SERVICE)
             if svc.namespace == g.obj.namespace and
             svc.labels.get(GATEWAY_SERVICE_LABEL) == g.obj.name),
            key=lambda svc: svc.name)
        if not services:
            return [], f"no LoadBalancer Service labelled {GATEWAY_SERVICE_LABEL}=" \
                f"{g.obj.name} in {g.obj.namespace}"
        out: list[str] = []
        for svc in services:
            if svc.spec.get("type") != "LoadBalancer":
                continue
            status = svc.body.get("status")
            lb = status.get("loadBalancer") if isinstance(status, Mapping) else None
            for entry in (lb.get("ingress") or []) if isinstance(lb, Mapping) else []:
                if isinstance(entry, Mapping):
                    value = entry.get("ip") or entry.get("hostname")
                    if isinstance(value, str) and value and value not in out:
                        out.append(value)
        balancers = [svc for svc in services if svc.spec.get("type") == "LoadBalancer"]
        if not balancers:
            return [], f"Service {g.obj.namespace}/{services[0].name} (labelled " \
                f"{GATEWAY_SERVICE_LABEL}={g.obj.name}) is not of type LoadBalancer"
        if not out:
            return [], f"waiting for Service {g.obj.namespace}/{balancers[0].name} " \
                "(type LoadBalancer) to be given an address"
        return out, ""

    # -- BackendTLSPolicy --------------------------------------------------------------------

    def _policy_status(self) -> None:
        """A policy's status has an entry per Gateway whose routes use the Services it
        targets: Accepted (or Conflicted, or no valid CA) and ResolvedRefs."""
        for key, users in sorted(self.routes.policy_users.items()):
            policy = self.routes.policies_by_key[key]
            gen = policy.obj.generation
            gateways: set[tuple[str, str]] = set()
            for user in users:
                user_status = self.status.get(user)
                parents = user_status.parents if isinstance(user_status, RouteStatus) else []
                for parent in parents:
                    ref = parent.ref
                    if parent.conditions.true(Type.ACCEPTED) and ref.kind == "Gateway":
                        gateways.add((ref.namespace, ref.name))
            if not gateways:
                continue
            _, problem = self.routes.policy_check(policy)
            if problem is not None:
                conds = [condition(Type.ACCEPTED, False, Reason.NO_VALID_CA_CERTIFICATE,
                                   problem[1], gen),
                         condition(Type.RESOLVED_REFS, False, problem[0], problem[1], gen)]
            elif not self.routes.policy_applies(key):
                msg = "an older or more specific policy targets the same Service port"
                conds = [condition(Type.ACCEPTED, False, Reason.CONFLICTED, msg, gen),
                         condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                                   "references resolved", gen)]
            else:
                conds = [condition(Type.ACCEPTED, True, Reason.ACCEPTED, "policy applied", gen),
                         condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                                   "references resolved", gen)]
            self.status[key] = PolicyStatus([
                ParentStatus(model.ParentRef(GATEWAY_GROUP, "Gateway", ns, name),
                             self.cfg.controller_name, Conditions(conds))
                for ns, name in sorted(gateways)])

    # -- TrafficPolicy -----------------------------------------------------------------------

    def _traffic_policy_status(self) -> None:
        """Each policy's status, and on each target it applies to (a Gateway, or a route's
        parents) the condition that says so."""
        if not self.policies and not self.policies.invalid and \
                not self.policies.backend_invalid:
            return
        statuses = self.policies.status(self.cfg.controller_name)
        self.status.update(statuses)
        by_target: dict[ObjectKey, list[str]] = {}
        for p in self.policies.policies:
            st = statuses[p.obj.key]
            if not any(a.conditions.true(Type.ACCEPTED) for a in st.ancestors):
                continue
            for t in p.targets:
                key = ObjectKey(t.group, t.kind, p.obj.namespace, t.name)
                by_target.setdefault(key, []).append(f"{p.obj.namespace}/{p.obj.name}")
        for key, names in by_target.items():
            target = self.status.get(key)
            obj = self.s.get(GroupKind(key.group, key.kind), key.namespace, key.name)
            gen = obj.generation if obj is not None else 0
            if isinstance(target, GatewayStatus):
                affected(target.conditions, names, gen)
            elif isinstance(target, RouteStatus):
                for parent in target.parents:
                    if parent.conditions.true(Type.ACCEPTED):
                        affected(parent.conditions, names, gen)

    # -- IR listeners ------------------------------------------------------------------------

    def _ir_listeners(self, listeners: list[_Listener]) -> list[ir.Listener]:
        by_port: dict[tuple[str, int], list[_Listener]] = {}
        for li in listeners:
            if li.valid:
                for address in li.addresses:
                    by_port.setdefault((address, li.spec.port), []).append(li)
        out = []
        for (address, port), lis in sorted(by_port.items()):
            protocol = lis[0].spec.protocol
            owners = frozenset(li.owner.key for li in lis)
            chains: list[ir.FilterChain] = []
            if protocol == "HTTP":
                table = self.routes.http_table(f"{address}:{port}",
                                               [(li.key, li.spec.hostname) for li in lis], port)
                self._present_client_certificate(table, lis[0].gateway)
                chains.append(ir.FilterChain(name="http", route_table=table, owners=owners))
            else:
                for li in _most_specific_first(lis):
                    chains += self._tls_chains(li)
            out.append(ir.Listener(name=f"{address}:{port}", address=address, port=port,
                                   protocol=protocol, chains=tuple(chains), owners=owners))
        return out

    def _tls_chains(self, li: _Listener) -> list[ir.FilterChain]:
        sni = (li.spec.hostname,) if li.spec.hostname else ()
        owner = frozenset({li.owner.key})
        if li.spec.protocol == "HTTPS":
            table = self.routes.http_table(li.key, [(li.key, li.spec.hostname)], li.spec.port,
                                           misdirected=li.spec.hostname is not None)
            self._present_client_certificate(table, li.gateway)
            return [ir.FilterChain(name=li.key, server_names=sni,
                                   certificates=li.certificates, route_table=table,
                                   client_validation=li.client_validation, owners=owner)]
        chains = []
        for names, backends, owners in self.routes.tls_routes(li.key):
            chains.append(ir.FilterChain(
                name=f"{li.key}/{names[0]}", server_names=tuple(n for n in names if n != "*"),
                certificates=li.certificates if li.spec.tls_mode != "Passthrough" else (),
                tcp_backends=backends, owners=owners | owner))
        return chains


    def _present_client_certificate(self, table: str, g: model.Gateway) -> None:
        cert = self.backend_certificates.get((g.obj.namespace, g.obj.name))
        if cert is not None:
            self.routes.present_client_certificate(table, cert)


def _most_specific_first(lis: Iterable[_Listener]) -> list[_Listener]:
    return sorted(lis, key=lambda li: (li.spec.hostname is None,
                                       (li.spec.hostname or "").startswith("*"),
                                       -len(li.spec.hostname or "")))


GATEWAY_SERVICE_LABEL = "mesh.dev/gateway"


def _ips(values: Any) -> list[str]:
    """The IP addresses among `values` (a Node also lists its Hostname), in a stable order."""
    return sorted({str(v) for v in values if model.is_ip(str(v))}, key=_address_order)


def _address_order(a: str) -> tuple[int, Any]:
    ip = ipaddress.ip_address(a)
    return ip.version, ip


def _node_address_entries(node: KubeObject) -> list[tuple[Any, str]]:
    """A Node's status.addresses as (type, address), entries of the wrong shape left out."""
    status = node.body.get("status")
    entries = status.get("addresses") if isinstance(status, Mapping) else None
    return [(a.get("type"), str(a.get("address"))) for a in entries or ()
            if isinstance(a, Mapping) and a.get("address")] if isinstance(entries, list) else []


def _node_address_list(node: KubeObject) -> list[str]:
    """The addresses a Node is reached at (InternalIP, ExternalIP: not its Hostname)."""
    return [a for t, a in _node_address_entries(node) if t in ("InternalIP", "ExternalIP")]


def _node_addresses(snapshot: StoreSnapshot, node_name: str | None) -> frozenset[str] | None:
    """The addresses of this node's Node object (status.addresses), or None when there is
    none to go by."""
    node = snapshot.get(kinds.NODE, "", node_name) if node_name else None
    if node is None:
        return None
    return frozenset(a for _, a in _node_address_entries(node))


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions). A selector of the
    wrong shape selects nothing: it fails closed."""
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not isinstance(match_labels, Mapping) or not isinstance(expressions, list):
        return False
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    for expr in expressions:
        if not isinstance(expr, Mapping):
            return False
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list):
            return False
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
