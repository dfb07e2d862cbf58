"""The route builder: routes to IR route tables and backends, for every translator that
serves HTTP or TLS routes (Gateway API, GAMMA, Ingress) and the Services' frontends.

`RouteBuilder` is part of the pure translator, one per translation. It resolves each route's
backends (with ReferenceGrants and BackendTLSPolicies), turns rules into IR routes, collects
them per listener and assembles route tables with the Gateway API's precedence order. It
accumulates what the IR gets (route tables, backends, certificates); what the status needs
of it is handed out as data (`backend_tls_use`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.kinds import GATEWAY_GROUP, GroupKind
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.durations import parse_duration
from mesh.translate.policy_attachment import (
    Decision,
    PolicyIndex,
    Scope,
    apply_route,
    backend_settings,
    shapes_backend,
)
from mesh.translate.status import Reason
from mesh.translate.traffic_policy import parse_session_persistence

_H2C = "kubernetes.io/h2c"
_WS = "kubernetes.io/ws"
# HTTPS ports carry HTTP/1.1 too; TLS to them is a BackendTLSPolicy's to set up.
_KNOWN_APP_PROTOCOLS = {None, "http", "HTTP", "kubernetes.io/http", "https", "HTTPS",
                        "kubernetes.io/https", _H2C, _WS, "grpc"}
_DEFAULT_RETRY_ATTEMPTS = 2
# Routes that carry bytes, not requests: their backends are picked per connection (UDP:
# per session), whatever protocol the Service port declares.
STREAM_KINDS = frozenset({"TLSRoute", "TCPRoute", "UDPRoute"})


@dataclass
class Resolution:
    """What a route's references resolve to: the ResolvedRefs condition and the IR."""

    ok: bool = True
    reason: str = Reason.RESOLVED_REFS
    message: str = "all references resolved"
    routes: list[tuple[tuple[Any, ...], ir.Route]] = field(default_factory=list)
    stream: list[ir.WeightedBackend] = field(default_factory=list)  # TLS/TCP/UDPRoute
    # Every backend reference made (memo key, reference, gRPC), to register the backends
    # again when this resolution is reused by a later translation.
    refs: list[tuple[str, model.BackendObjectRef, bool]] = field(default_factory=list)

    def fail(self, reason: str, message: str) -> None:
        if self.ok:  # the first problem is the one reported
            self.ok, self.reason, self.message = False, reason, message


@dataclass(frozen=True)
class BackendTLSUse:
    """Which BackendTLSPolicies the resolved backends fall under: each with the routes whose
    backends it targets (by policy key), and the ones that apply (the most specific, then
    oldest, for a Service port); the others are Conflicted."""

    users: tuple[tuple[model.BackendTLSPolicy, frozenset[ObjectKey]], ...]
    applied: frozenset[ObjectKey]


def backend_tls_ca(snapshot: StoreSnapshot, policy: model.BackendTLSPolicy
                   ) -> tuple[bytes | None, tuple[str, str] | None]:
    """(a BackendTLSPolicy's CA certificates, or why the policy cannot be used)."""
    ca: bytes | None = None
    for group, kind, name in policy.ca_refs:
        if group != "" or kind not in ("ConfigMap", "Secret"):
            return None, (Reason.INVALID_KIND, f"caCertificateRef {group}/{kind} {name} is not "
                          "a ConfigMap or Secret")
        data = model.ca_certificates(snapshot.get(GroupKind("", kind), policy.obj.namespace,
                                                  name))
        if data is None:
            return None, (Reason.INVALID_CA_CERTIFICATE_REF,
                          f"{kind} {name} holds no CA certificate in ca.crt")
        ca = (ca or b"") + data
    if ca is None and policy.well_known_ca != "System":
        return None, (Reason.INVALID_CA_CERTIFICATE_REF, "no CA certificate given")
    return ca, None


@dataclass(frozen=True)
class Entry:
    """What one route adds to one listener's table, kept to be added again as it is."""

    http: tuple[tuple[tuple[Any, ...], ir.Route], ...] = ()  # (precedence key, route)
    # A TLSRoute's, TCPRoute's or UDPRoute's: (backends, owners)
    stream: tuple[tuple[ir.WeightedBackend, ...], frozenset[ObjectKey]] | None = None
    # Copies of backends with a policy's settings, that the routes send to.
    variants: tuple[ir.Backend, ...] = ()


# A table's virtual host from the previous translation, by (table, host, port): its routes
# as they came in, and the virtual host they made with its owners.
VhostCache = dict[tuple[str, str, int | None],
                  tuple[list[tuple[tuple[Any, ...], ir.Route]], ir.VirtualHost,
                        frozenset[ObjectKey]]]


@dataclass
class _TableEntries:
    by_host: dict[str, list[tuple[tuple[Any, ...], ir.Route]]] = field(default_factory=dict)
    stream: list[tuple[tuple[str, ...], tuple[ir.WeightedBackend, ...],
                       frozenset[ObjectKey]]] = \
        field(default_factory=list)


class RouteBuilder:
    def __init__(self, snapshot: StoreSnapshot, grants: Sequence[model.ReferenceGrant],
                 vhosts: VhostCache | None = None, policies: PolicyIndex | None = None) -> None:
        self.s = snapshot
        self.grants = grants
        self.policies = policies
        self._backends: dict[str, ir.Backend] = {}
        self._certs: dict[str, ir.Certificate] = {}
        self._tables: dict[str, ir.RouteTable] = {}
        self._entries: dict[str, _TableEntries] = {}
        # memo key -> (backend name, its resolution, the BackendTLSPolicies that target it)
        self._memo: dict[str, tuple[str | None, Resolution, tuple[ObjectKey, ...]]] = {}
        self._previous_vhosts = vhosts or {}
        self._varied: set[str] = set()  # backends with client-certificate variants
        self.vhosts: VhostCache = {}  # this translation's, for the next one
        self._owners: dict[str, set[ObjectKey]] = {}  # backend -> routes that use it
        # BackendTLSPolicy -> routes whose backends it targets; the policies that apply.
        self._policy_users: dict[ObjectKey, set[ObjectKey]] = {}
        self._policy_winners: set[ObjectKey] = set()
        # Indexes built once per translation: routes refer to the same few Services often.
        self._services: dict[tuple[str, str], model.Service] = {
            (o.namespace, o.name): model.parse_service(o) for o in snapshot.of_kind(kinds.SERVICE)}
        self._slices: dict[tuple[str, str], list[model.EndpointSlice]] = {}
        for o in snapshot.of_kind(kinds.ENDPOINT_SLICE):
            es = model.parse_endpoint_slice(o)
            self._slices.setdefault((es.namespace, es.service), []).append(es)
        self._policies: dict[tuple[str, str], list[model.BackendTLSPolicy]] = {}
        for o in sorted(snapshot.of_kind(kinds.BACKEND_TLS_POLICY),
                        key=lambda o: (o.created, o.namespace, o.name)):
            policy = model.parse_backend_tls_policy(o)
            for group, kind, name, _ in policy.targets:
                if group == "" and kind == "Service":
                    self._policies.setdefault((o.namespace, name), []).append(policy)
        self._policies_by_key = {p.obj.key: p for ps in self._policies.values() for p in ps}

    # -- outputs ------------------------------------------------------------------------------

    def backends(self) -> list[ir.Backend]:
        unused = self._unused_originals()
        return [replace(self._backends[k], owners=frozenset(self._owners[k]))
                for k in sorted(self._backends) if k not in unused]

    def _unused_originals(self) -> set[str]:
        """Backends that routes reach only through their client-certificate variants: no
        cluster for them. (Only looked for when some Gateway presents a certificate.)"""
        if not self._varied:
            return set()
        used: set[str | None] = set()
        for table in self._tables.values():
            for vh in table.virtual_hosts:
                for r in vh.routes:
                    if isinstance(r.action, ir.Forward):
                        used.update(w.backend for w in r.action.backends)
                        used.update(m.backend for m in r.action.mirrors)
        for entries in self._entries.values():
            for _, tcp, _ in entries.stream:
                used.update(w.backend for w in tcp)
        return self._varied - used

    def certificates(self) -> list[ir.Certificate]:
        return [self._certs[k] for k in sorted(self._certs)]

    def tables(self) -> list[ir.RouteTable]:
        return [self._tables[k] for k in sorted(self._tables)]

    # -- certificates -------------------------------------------------------------------------

    def certificate(self, secret: KubeObject) -> str | None:
        cert = model.secret_data(secret, "tls.crt")
        key = model.secret_data(secret, "tls.key")
        if not cert or not key or b"-----BEGIN" not in cert or b"PRIVATE KEY" not in key:
            return None
        name = f"{secret.namespace}/{secret.name}"
        self._certs[name] = ir.Certificate(name, cert, key)
        return name

    # -- resolution ---------------------------------------------------------------------------

    def _granted(self, from_kind: str, from_ns: str, to_kind: str, to_ns: str,
                 name: str) -> bool:
        return any(g.namespace == to_ns and g.permits(GATEWAY_GROUP, from_kind, from_ns, "",
                                                      to_kind, name) for g in self.grants)

    def backend(self, ref: model.BackendObjectRef, route: KubeObject, res: Resolution,
                grpc: bool = False) -> str | None:
        """The IR backend for a reference, or None (and the reason in `res`)."""
        # Many routes use the same few Services: resolve each reference once per translation.
        # The key is a string: its hash is computed once, however often it is looked up.
        memo_key = f"{ref.group}|{ref.kind}|{ref.namespace}|{ref.name}|{ref.port}|" \
            f"{route.kind}|{route.namespace}|{grpc}|{_mesh_parent(route, ref)}"
        res.refs.append((memo_key, ref, grpc))
        name, probe = self._register(memo_key, ref, route, grpc)
        if not probe.ok:
            res.fail(probe.reason, probe.message)
        return name

    def _register(self, memo_key: str, ref: model.BackendObjectRef, route: KubeObject,
                  grpc: bool) -> tuple[str | None, Resolution]:
        """Resolve a reference (once per translation) and count `route` among the users of
        the backend and of the policies that target it."""
        memo = self._memo.get(memo_key)
        if memo is None:
            probe = Resolution()
            name = self._backend(ref, route, probe, grpc)
            svc = self._services.get((ref.namespace, ref.name))
            port = _service_port(svc, ref.port, route.kind) if svc else None
            policies = tuple(p.obj.key for p in self._policy_candidates(svc, port)) \
                if svc is not None and port is not None and route.kind not in STREAM_KINDS \
                else ()
            memo = self._memo[memo_key] = (name, probe, policies)
        name, probe, policies = memo
        for policy in policies:
            self._policy_users.setdefault(policy, set()).add(route.key)
        if probe.ok and name is not None:
            self._owners[name].add(route.key)
        return name, probe

    def _backend(self, ref: model.BackendObjectRef, route: KubeObject, res: Resolution,
                 grpc: bool) -> str | None:
        where = f"{ref.kind} {ref.namespace}/{ref.name}"
        if ref.group != "" or ref.kind != "Service":
            res.fail(Reason.INVALID_KIND, f"backendRef {ref.group or 'core'}/{ref.kind} is not "
                     "supported (only Services)")
            return None
        # A consumer route (GAMMA) may send to the Service it is attached to without a
        # grant: it only shapes its own namespace's traffic to that Service.
        if ref.namespace != route.namespace and not _mesh_parent(route, ref) and \
                not self._granted(route.kind, route.namespace, "Service", ref.namespace,
                                  ref.name):
            res.fail(Reason.REF_NOT_PERMITTED, f"no ReferenceGrant in {ref.namespace} allows "
                     f"{route.kind}s from {route.namespace} to use {where}")
            return None
        svc = self._services.get((ref.namespace, ref.name))
        if svc is None:
            res.fail(Reason.BACKEND_NOT_FOUND, f"{where} does not exist")
            return None
        port = _service_port(svc, ref.port, route.kind)
        udp = route.kind == "UDPRoute"
        if ref.port is None or port is None:
            res.fail(Reason.BACKEND_NOT_FOUND,
                     f"{where} has no {'UDP ' if udp else ''}port {ref.port}")
            return None
        if route.kind not in STREAM_KINDS and port.app_protocol not in _KNOWN_APP_PROTOCOLS:
            res.fail(Reason.UNSUPPORTED_PROTOCOL, f"{where} port {port.port} has appProtocol "
                     f"{port.app_protocol}, which is not supported")
            return None
        name = f"{ref.namespace}/{ref.name}/{port.port}"
        tls: ir.UpstreamTLS | None = None
        if route.kind in STREAM_KINDS:
            # Bytes as the client sent them (TLS passthrough included): never TLS of ours,
            # so a cluster of their own, apart from the HTTP routes' to the same port.
            protocol = "udp" if udp else "tcp"
            name += "/" + protocol
        else:
            tls = self._backend_tls(svc, port, res)
            if tls is not None and tls.unusable:
                return None  # answers 500: see the BackendTLSPolicy's status
            protocol = "h2c" if grpc or port.app_protocol in (_H2C, "grpc") else "http1"
        settings = self.policies.service_settings(ref.namespace, ref.name, port.name) \
            if self.policies else ir.BackendSettings()
        self._backends[name] = ir.Backend(
            name=name, endpoints=self.endpoints(svc, port), protocol=protocol, tls=tls,
            settings=settings)
        self._owners.setdefault(name, set())
        return name

    def websocket(self, ref: model.BackendObjectRef) -> bool:
        svc = self._services.get((ref.namespace, ref.name))
        return svc is not None and any(p.port == ref.port and p.app_protocol == _WS
                                       for p in svc.ports)

    def service(self, namespace: str, name: str) -> model.Service | None:
        return self._services.get((namespace, name))

    def endpoints(self, svc: model.Service, port: model.ServicePort) -> tuple[ir.Endpoint, ...]:
        out: set[ir.Endpoint] = set()
        for es in self._slices.get((svc.obj.namespace, svc.obj.name), ()):
            numbers = [p for n, p in es.ports if n == port.name]
            if not numbers and not es.ports and isinstance(port.target_port, int):
                numbers = [port.target_port]
            for number in numbers:
                out.update(ir.Endpoint(a, number) for a in es.addresses)
        return tuple(sorted(out, key=lambda e: (e.address, e.port)))

    def _policy_candidates(self, svc: model.Service,
                           port: model.ServicePort) -> list[model.BackendTLSPolicy]:
        """Policies that target this Service port: by sectionName first, then the whole
        Service; among equals the oldest first (the first one applies)."""
        scored = []
        for policy in self._policies.get((svc.obj.namespace, svc.obj.name), ()):
            for group, kind, name, section in policy.targets:
                if group == "" and kind == "Service" and name == svc.obj.name and (
                        section is None or section == port.name):
                    scored.append((section is None, policy.obj.created, policy.obj.namespace,
                                   policy.obj.name, policy))
                    break
        return [t[-1] for t in sorted(scored, key=lambda t: t[:-1])]

    def backend_tls_use(self) -> BackendTLSUse:
        """The BackendTLSPolicies of the backends resolved so far, for their status."""
        return BackendTLSUse(
            tuple((self._policies_by_key[k], frozenset(users))
                  for k, users in sorted(self._policy_users.items())),
            frozenset(self._policy_winners))

    def _backend_tls(self, svc: model.Service, port: model.ServicePort,
                     res: Resolution) -> ir.UpstreamTLS | None:
        candidates = self._policy_candidates(svc, port)
        if not candidates:
            return None
        winner = candidates[0]
        self._policy_winners.add(winner.obj.key)
        ca, problem = backend_tls_ca(self.s, winner)
        if problem is not None:
            # Fail closed: never fall back to plaintext. The share of this backend answers
            # 500 until the policy is fixed; the policy's status says why.
            return ir.UpstreamTLS(sni=winner.hostname, ca_pem=None, unusable=True)
        return ir.UpstreamTLS(sni=winner.hostname, ca_pem=ca,
                              subject_alt_names=winner.subject_alt_names)

    def replay(self, route: KubeObject, res: Resolution) -> None:
        """Register the backends of a resolution computed by an earlier translation."""
        for memo_key, ref, grpc in res.refs:
            self._register(memo_key, ref, route, grpc)

    # -- rules to IR routes -------------------------------------------------------------------

    def resolve(self, route: model.Route) -> Resolution:
        res = Resolution()
        obj = route.obj
        if route.kind in STREAM_KINDS:
            for refs in route.stream_backends:
                for b in refs:
                    res.stream.append(ir.WeightedBackend(self.backend(b.ref, obj, res),
                                                         b.weight))
            return res
        if route.kind == "GRPCRoute":
            for i, grule in enumerate(route.grpc_rules):
                self._grpc_rule(route, i, grule, res)
            return res
        for i, rule in enumerate(route.http_rules):
            self._http_rule(route, i, rule, res)
        return res

    def _key(self, route: model.Route, path: ir.StringMatch, method: str | None,
             headers: int, query: int, rule: int, match: int) -> tuple[Any, ...]:
        """Gateway API precedence: exact path, longest prefix, method, most header matches,
        most query matches, oldest route, name, rule and match order."""
        rank = {"Exact": 0, "RegularExpression": 1}.get(path.type, 2)
        return (rank, -len(path.value), method is None, -headers, -query, route.obj.created,
                route.obj.namespace, route.obj.name, rule, match)

    def _http_rule(self, route: model.Route, i: int, rule: model.HTTPRule,
                   res: Resolution) -> None:
        obj = route.obj
        req, resp = _header_filters(rule.filters)
        redirect: model.Redirect | None = None
        rewrite: model.Rewrite | None = None
        mirrors: list[ir.Mirror] = []
        cors: ir.Cors | None = None
        broken = False
        for f in rule.filters:
            if f.request_headers is not None or f.response_headers is not None:
                continue  # taken above
            if f.redirect is not None:
                redirect = f.redirect
            elif f.rewrite is not None:
                rewrite = f.rewrite
            elif f.mirror is not None:
                name = self.backend(f.mirror.backend, obj, res)
                if name is not None:
                    mirrors.append(ir.Mirror(name, f.mirror.percent))
            elif f.cors is not None:
                c = f.cors
                cors = ir.Cors(c.allow_origins, c.allow_methods, c.allow_headers,
                               c.expose_headers, c.allow_credentials, c.max_age)
            else:
                broken = True
                res.fail(Reason.UNSUPPORTED_VALUE, f"filter {f.type} is not supported")
        backends = []
        websocket = False
        for b in rule.backends:
            name = self.backend(b.ref, obj, res)
            websocket = websocket or self.websocket(b.ref)
            backends.append(ir.WeightedBackend(name, b.weight, *_header_filters(b.filters)))
        timeout, per_try = 0.0, None
        try:
            if rule.timeouts.request is not None:
                timeout = parse_duration(rule.timeouts.request)
            if rule.timeouts.backend_request is not None:
                per_try = parse_duration(rule.timeouts.backend_request)
        except ValueError as e:
            res.fail(Reason.UNSUPPORTED_VALUE, str(e))
        retry = None
        if rule.retry is not None:
            backoff = None
            if rule.retry.backoff:
                try:
                    backoff = parse_duration(rule.retry.backoff)
                except ValueError as e:
                    res.fail(Reason.UNSUPPORTED_VALUE, str(e))
            attempts = rule.retry.attempts
            retry = ir.Retry(_DEFAULT_RETRY_ATTEMPTS if attempts is None else attempts,
                             rule.retry.codes, backoff)
        session = None
        if rule.session_persistence is not None:
            try:
                session = parse_session_persistence(rule.session_persistence,
                                                    f"rules[{i}].sessionPersistence")
            except model.Invalid as e:
                res.fail(Reason.UNSUPPORTED_VALUE, str(e))
        label = rule.name or f"rule{i}"
        for j, m in enumerate(rule.matches):
            path = _path_match(m.path)
            action: ir.Action
            if broken:
                action = ir.DirectResponse(500, "")
            elif redirect is not None:
                action = _redirect(redirect, m.path)
            elif not backends or all(b.weight == 0 for b in backends):
                action = ir.DirectResponse(500, "")
            else:
                action = ir.Forward(
                    backends=tuple(backends), timeout=timeout, per_try_timeout=per_try,
                    retry=retry, mirrors=tuple(mirrors), websocket=websocket,
                    host_rewrite=rewrite.hostname if rewrite else None,
                    full_path_rewrite=rewrite.path.value if rewrite and rewrite.path and
                    rewrite.path.type == "ReplaceFullPath" else None,
                    # ReplacePrefixMatch only means something for a prefix match (the API's
                    # validation refuses it with any other).
                    prefix_rewrite=(m.path.value, rewrite.path.value)
                    if rewrite and rewrite.path and rewrite.path.type == "ReplacePrefixMatch"
                    and m.path.type == "PathPrefix" else None)
            r = ir.Route(
                name=f"{obj.namespace}/{obj.name}/{label}/match{j}",
                path=path,
                headers=tuple(_header(h) for h in m.headers),
                query=tuple(ir.StringMatch(q.type, q.value, q.name) for q in m.query),
                method=m.method, action=action, request_headers=req, response_headers=resp,
                cors=cors, owners=frozenset({obj.key}), rule=rule.name, session=session)
            res.routes.append((self._key(route, path, m.method, len(m.headers),
                                         len(m.query), i, j), r))

    def _grpc_rule(self, route: model.Route, i: int, rule: model.GRPCRule,
                   res: Resolution) -> None:
        obj = route.obj
        req, resp = _header_filters(rule.filters)
        mirrors = []
        for f in rule.filters:
            if f.mirror is not None:
                name = self.backend(f.mirror.backend, obj, res, grpc=True)
                if name is not None:
                    mirrors.append(ir.Mirror(name, f.mirror.percent))
        backends = []
        for b in rule.backends:
            backends.append(ir.WeightedBackend(self.backend(b.ref, obj, res, grpc=True),
                                               b.weight, *_header_filters(b.filters)))
        label = rule.name or f"rule{i}"
        for j, m in enumerate(rule.matches):
            path = _grpc_path(m)
            action: ir.Action = ir.Forward(tuple(backends), mirrors=tuple(mirrors)) if (
                backends and any(b.weight for b in backends)) else ir.DirectResponse(500)
            r = ir.Route(
                name=f"{obj.namespace}/{obj.name}/{label}/match{j}", path=path,
                headers=tuple(_header(h) for h in m.headers),
                action=action, request_headers=req, response_headers=resp,
                owners=frozenset({obj.key}), rule=rule.name)
            # gRPC precedence: exact method first, then service-wide, then headers.
            has_method = m.method is not None and m.method_type == "Exact"
            has_service = m.service is not None
            res.routes.append(((0 if has_method else 1, 0 if has_service else 1,
                                -len(m.headers), obj.created, obj.namespace, obj.name, i, j),
                               r))

    # -- assembly -----------------------------------------------------------------------------

    def add(self, route: model.Route, listener: str, names: tuple[str, ...],
            res: Resolution, port: int | None = None,
            scope: Callable[[str | None], Scope] | None = None) -> Entry:
        """Add a route to a listener's table under `names`, with the traffic policies that
        apply where `scope` (of a rule's name) says; the entry can be put again."""
        if route.kind in STREAM_KINDS:
            entry = Entry(stream=(tuple(res.stream), frozenset({route.obj.key})))
        else:
            http = tuple(res.routes)
            if port is not None:
                http = tuple((k, with_listener_port(r, port)) for k, r in http)
            variants: dict[str, ir.Backend] = {}
            if scope is not None and self.policies:
                http = tuple((k, self._with_policies(r, scope(r.rule), variants))
                             for k, r in http)
            entry = Entry(http=http, variants=tuple(variants[k] for k in sorted(variants)))
        self.put(listener, names, entry)
        return entry

    def _with_policies(self, route: ir.Route, scope: Scope,
                       variants: dict[str, ir.Backend]) -> ir.Route:
        assert self.policies is not None
        decision = self.policies.decide(scope)
        out = route
        if out.session is None and isinstance(out.action, ir.Forward):
            # The Gateway API's own XBackendTrafficPolicy comes before a TrafficPolicy.
            session = next((s for w in out.action.backends
                            if (s := self.policies.backend_session(w.backend)) is not None),
                           None)
            if session is not None:
                out = replace(out, session=session)
        out = apply_route(out, decision)
        a = out.action
        backend_decision = Decision({f: p for f, p in decision.by_feature.items()
                                     if shapes_backend(f, p)})
        if not isinstance(a, ir.Forward) or not backend_decision.by_feature:
            return out
        suffix = "|policy=" + ",".join(sorted({f"{p.obj.namespace}/{p.obj.name}"
                                               for p in backend_decision.by_feature.values()}))

        def variant(name: str | None) -> str | None:
            base = self._backends.get(name) if name is not None else None
            if base is None:
                return name
            settings = backend_settings(backend_decision, base.settings)
            if settings == base.settings:
                return name
            new = base.name + suffix
            variants[new] = replace(base, name=new, settings=settings)
            return new

        backends = tuple(replace(w, backend=variant(w.backend)) for w in a.backends)
        return replace(out, action=replace(a, backends=backends))

    def put(self, listener: str, names: tuple[str, ...], entry: Entry) -> None:
        for v in entry.variants:
            self._backends[v.name] = v
            self._owners.setdefault(v.name, set())
        for _, r in entry.http:
            if isinstance(r.action, ir.Forward):
                for w in r.action.backends:
                    if w.backend is not None and "|policy=" in w.backend:
                        self._owners.setdefault(w.backend, set()).update(r.owners)
        entries = self._entries.setdefault(listener, _TableEntries())
        if entry.stream is not None:
            entries.stream.append((names, *entry.stream))
            return
        for name in names:
            entries.by_host.setdefault(name, []).extend(entry.http)

    def http_table(self, name: str, listeners: Iterable[tuple[str, str | None]],
                   port: int | None = None, misdirected: bool = False,
                   elsewhere: Iterable[str] = ()) -> str:
        """Assemble a route table. With `misdirected`, a Host the table does not serve gets
        421: on HTTPS, the connection was set up (by SNI) for another listener. Hosts in
        `elsewhere` (the hostnames of more specific HTTPS listeners on the port) get 421
        too: their requests belong on a connection set up for them."""
        hosts: dict[str, list[tuple[tuple[Any, ...], ir.Route]]] = {}
        for key, hostname in listeners:
            hosts.setdefault(hostname or "*", [])
            for host, entries in self._entries.get(key, _TableEntries()).by_host.items():
                hosts.setdefault(host, []).extend(entries)
        vhosts = []
        owners: set[ObjectKey] = set()
        for host in sorted(hosts, key=_host_order):
            entries = hosts[host]
            vkey = (name, host, port)
            previous = self._previous_vhosts.get(vkey)
            if previous is not None and previous[0] == entries:
                # The same routes as last time: the same virtual host. At 10,000 routes one
                # change then costs one host's sort, not every host's.
                _, vh, vh_owners = previous
            else:
                ordered = [r for _, r in sorted(entries, key=lambda kr: kr[0])]
                vh_owners = frozenset(o for r in ordered for o in r.owners)
                # Clients may send a port in Host ("foo.com:1234"): Envoy matches hostnames
                # without it (ignore_port_in_host_matching on every route table), and the
                # Host reaches the backend as sent.
                vh = ir.VirtualHost(name=f"{name}/{host}", domains=(host,),
                                    routes=tuple(ordered))
            self.vhosts[vkey] = (entries, vh, vh_owners)
            owners |= vh_owners
            vhosts.append(vh)
        for host in sorted(set(elsewhere) - set(hosts), key=_host_order):
            vhosts.append(_misdirected(f"{name}/misdirected/{host}", host))
        if misdirected and "*" not in hosts:
            vhosts.append(_misdirected(f"{name}/misdirected", "*"))
        self._tables[name] = ir.RouteTable(name, tuple(vhosts), frozenset(owners))
        return name

    def passthrough_table(self, name: str, backend: str | None,
                          owners: frozenset[ObjectKey]) -> str:
        """A table of one route, every request to `backend`: a Service port whose HTTP is
        only to be seen (L7 visibility), not routed."""
        route = ir.Route(name=f"{name}/all", path=ir.StringMatch("Prefix", "/"),
                         action=ir.Forward((ir.WeightedBackend(backend, 1),)), owners=owners)
        vhost = ir.VirtualHost(name=f"{name}/*", domains=("*",), routes=(route,))
        self._tables[name] = ir.RouteTable(name, (vhost,), owners)
        return name

    def present_client_certificate(self, table: str, cert: str) -> None:
        """Make the table's routes to TLS backends present `cert` (a Gateway's backend
        client certificate): they go to variants of those backends that do. Backends are
        shared by every Gateway; the certificate is one Gateway's."""
        variants: dict[str, str] = {}

        def variant(name: str | None) -> str | None:
            b = self._backends.get(name) if name is not None else None
            if b is None or b.tls is None or b.tls.unusable:
                return name
            if name not in variants:
                self._varied.add(b.name)
                new = variants[b.name] = f"{b.name}|client-certificate={cert}"
                self._backends[new] = replace(b, name=new, tls=replace(b.tls, client_cert=cert))
                self._owners.setdefault(new, set())
            return variants[b.name]

        def with_variants(r: ir.Route) -> ir.Route:
            a = r.action
            if not isinstance(a, ir.Forward):
                return r
            backends = tuple(replace(w, backend=variant(w.backend)) for w in a.backends)
            mirrors = tuple(replace(m, backend=variant(m.backend) or m.backend)
                            for m in a.mirrors)
            if backends == a.backends and mirrors == a.mirrors:
                return r
            for name in {w.backend for w in backends} | {m.backend for m in mirrors}:
                if name in self._owners:
                    self._owners[name] |= r.owners
            return replace(r, action=replace(a, backends=backends, mirrors=mirrors))

        old = self._tables[table]
        vhosts = []
        for vh in old.virtual_hosts:
            routes = tuple(with_variants(r) for r in vh.routes)
            vhosts.append(vh if routes == vh.routes else replace(vh, routes=routes))
        self._tables[table] = replace(old, virtual_hosts=tuple(vhosts))

    def put_table(self, table: ir.RouteTable) -> None:
        """Register a route table assembled elsewhere (Ingress)."""
        self._tables[table.name] = table

    def has_http(self, listener: str) -> bool:
        """Whether HTTP or gRPC routes were added under the listener key."""
        entries = self._entries.get(listener)
        return entries is not None and any(entries.by_host.values())

    def stream_routes(self, listener: str) -> list[
            tuple[tuple[str, ...], tuple[ir.WeightedBackend, ...], frozenset[ObjectKey]]]:
        """The TLSRoutes, TCPRoutes or UDPRoutes on a listener, oldest first: (hostnames,
        backends, owners)."""
        return self._entries.get(listener, _TableEntries()).stream


def _service_port(svc: model.Service, number: int | None,
                  route_kind: str) -> model.ServicePort | None:
    """The Service port a route's backendRef names: by number, and for a UDPRoute the UDP
    one (a DNS Service has port 53 twice)."""
    transport = "UDP" if route_kind == "UDPRoute" else "TCP"
    return next((p for p in svc.ports if p.port == number and p.protocol == transport), None)


def _mesh_parent(route: KubeObject, ref: model.BackendObjectRef) -> bool:
    """Whether the route's parentRefs name the Service `ref` refers to (read as the
    translator reads parents: a parentRef without a group is not a core Service)."""
    for raw in model.as_list(route.spec.get("parentRefs")):
        try:
            p = model.parse_parent_ref(raw, route.namespace)
        except model.Invalid:
            continue
        if GroupKind(p.group, p.kind) == kinds.SERVICE and \
                (p.namespace, p.name) == (ref.namespace, ref.name):
            return True
    return False


def _misdirected(name: str, domain: str) -> ir.VirtualHost:
    return ir.VirtualHost(name=name, domains=(domain,), routes=(
        ir.Route(name=name, path=ir.StringMatch("Prefix", "/"),
                 action=ir.DirectResponse(421, "")),))


def _host_order(host: str) -> tuple[int, int, str]:
    return (host == "*", host.startswith("*"), host)


def _header_filters(filters: Iterable[model.Filter]) -> tuple[ir.HeaderOps, ir.HeaderOps]:
    """The request and response header changes among filters (of a rule or a backend)."""
    req, resp = ir.HeaderOps(), ir.HeaderOps()
    for f in filters:
        if f.request_headers is not None:
            req = _merge(req, f.request_headers)
        elif f.response_headers is not None:
            resp = _merge(resp, f.response_headers)
    return req, resp


def _merge(ops: ir.HeaderOps, mod: model.HeaderModifier) -> ir.HeaderOps:
    return ir.HeaderOps(ops.set + mod.set, ops.add + mod.add, ops.remove + mod.remove)


def _header(h: model.StringMatch) -> ir.StringMatch:
    return ir.StringMatch(h.type, h.value, h.name)


def _path_match(p: model.StringMatch) -> ir.StringMatch:
    if p.type == "Exact":
        return ir.StringMatch("Exact", p.value)
    if p.type == "RegularExpression":
        return ir.StringMatch("RegularExpression", p.value)
    # A path prefix matches whole segments: /foo matches /foo and /foo/bar, not /foobar.
    if p.value == "/" or p.value.endswith("/"):
        return ir.StringMatch("Prefix", p.value)
    return ir.StringMatch("PathSeparatedPrefix", p.value)


def _grpc_path(m: model.GRPCMatch) -> ir.StringMatch:
    if m.method_type == "RegularExpression":
        service = m.service or r"[^/]+"
        method = m.method or r"[^/]+"
        return ir.StringMatch("RegularExpression", f"/{service}/{method}")
    if m.service and m.method:
        return ir.StringMatch("Exact", f"/{m.service}/{m.method}")
    if m.service:
        return ir.StringMatch("Prefix", f"/{m.service}/")
    if m.method:
        return ir.StringMatch("RegularExpression", rf"/[^/]+/{re.escape(m.method)}")
    return ir.StringMatch("Prefix", "/")


def _redirect(r: model.Redirect, match: model.StringMatch) -> ir.Redirect:
    full = prefix = None
    if r.path is not None:
        if r.path.type == "ReplaceFullPath":
            full = r.path.value
        else:
            prefix = (match.value, r.path.value)
    return ir.Redirect(status=r.status_code, scheme=r.scheme, host=r.hostname, port=r.port,
                       full_path=full, prefix=prefix)


def with_listener_port(route: ir.Route, port: int) -> ir.Route:
    """A redirect with neither port nor scheme keeps the listener's port."""
    a = route.action
    if isinstance(a, ir.Redirect) and a.port is None and a.scheme is None:
        return replace(route, action=replace(a, port=port))
    return route


