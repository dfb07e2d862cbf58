"""Typed views of the Gateway API, Ingress and core objects the translator reads.

Each `parse_*` applies the defaults the CRDs (or the API server) would apply, so the
translator never looks at raw dictionaries. A value the schema would refuse raises
`Invalid` with a message for the object's status.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.store.kinds import GATEWAY_GROUP
from mesh.store.objects import KubeObject


class Invalid(ValueError):
    """The object breaks the API's schema; the message goes to its status."""


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> Sequence[Any]:
    return v if isinstance(v, list) else []


as_list = _list  # for the translator: a field that must be a list, or nothing


def is_ip(text: str) -> bool:
    """Whether `text` is an IP address (a status's address, not a hostname)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_ipv4(address: str) -> bool:
    """Whether `address` is an IPv4 address (the datapath's frontends and backends are)."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return True


def pod_ips(status: Any) -> list[str]:
    """A Pod's addresses from its status (status.podIPs, else status.podIP)."""
    if not isinstance(status, Mapping):
        return []
    found = [i.get("ip") for i in _list(status.get("podIPs")) if isinstance(i, Mapping)]
    if not found and status.get("podIP"):
        found = [status.get("podIP")]
    return [a for a in found if isinstance(a, str) and is_ip(a)]


def _str(v: Any, default: str = "") -> str:
    return v if isinstance(v, str) else default


def _int(v: Any, default: int | None = None) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _describe(v: Any) -> str:
    kind = {str: "the string", float: "the number", bool: "the boolean", list: "a list",
            dict: "a map"}.get(type(v), type(v).__name__)
    return f"{kind} {v!r}" if isinstance(v, str | float | bool) else kind


def _field_int(m: Mapping[str, Any], key: str, where: str, default: int | None = None,
               lo: int | None = None, hi: int | None = None) -> int | None:
    """An integer field, absent meaning `default`, within [lo, hi] as the CRD's schema
    says; any other type or value names the field (the API server would refuse the
    object, and the user needs to know where)."""
    v = m.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise Invalid(f"{where}.{key} must be an integer, not {_describe(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise Invalid(f"{where}.{key} must be between {lo} and {hi}, not {v}")
    return v


PORT = {"lo": 1, "hi": 65535}


# -- references ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParentRef:
    group: str
    kind: str
    namespace: str
    name: str
    section_name: str | None = None
    port: int | None = None

    def describe(self) -> dict[str, Any]:
        """As the route's status.parents[].parentRef shows it."""
        out: dict[str, Any] = {"group": self.group, "kind": self.kind,
                               "namespace": self.namespace, "name": self.name}
        if self.section_name is not None:
            out["sectionName"] = self.section_name
        if self.port is not None:
            out["port"] = self.port
        return out


def parse_parent_ref(raw: Any, default_ns: str) -> ParentRef:
    m = _map(raw)
    if not _str(m.get("name")):
        raise Invalid("parentRefs[].name is required")
    return ParentRef(
        group=_str(m.get("group"), GATEWAY_GROUP),
        kind=_str(m.get("kind"), "Gateway"),
        namespace=_str(m.get("namespace"), default_ns),
        name=m["name"],
        section_name=m.get("sectionName") if isinstance(m.get("sectionName"), str) else None,
        port=_field_int(m, "port", "parentRefs[]", **PORT),
    )


@dataclass(frozen=True)
class BackendObjectRef:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


def parse_header_modifier(raw: Any) -> HeaderModifier:
    m = _map(raw)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        return tuple((_str(h.get("name")), _str(h.get("value")))
                     for h in map(_map, _list(m.get(key))))

    return HeaderModifier(set=pairs("set"), add=pairs("add"),
                          remove=tuple(_str(x) for x in _list(m.get("remove"))))


@dataclass(frozen=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class PathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str


@dataclass(frozen=True)
class Rewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class Mirror:
    backend: BackendObjectRef
    percent: float | None = None  # None: every request


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int = 5


@dataclass(frozen=True)
class Filter:
    type: str
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirror: Mirror | None = None
    cors: Cors | None = None
    extension_ref: tuple[str, str, str] | None = None  # group, kind, name


def _path_modifier(raw: Any) -> PathModifier | None:
    m = _map(raw)
    if not m:
        return None
    kind = _str(m.get("type"))
    if kind == "ReplaceFullPath":
        return PathModifier(kind, _str(m.get("replaceFullPath"), "/"))
    if kind == "ReplacePrefixMatch":
        return PathModifier(kind, _str(m.get("replacePrefixMatch"), "/"))
    raise Invalid(f"unknown path modifier type {kind!r}")


def parse_backend_object_ref(raw: Any, default_ns: str) -> BackendObjectRef:
    m = _map(raw)
    return BackendObjectRef(
        group=_str(m.get("group"), ""),
        kind=_str(m.get("kind"), "Service"),
        namespace=_str(m.get("namespace"), default_ns),
        name=_str(m.get("name")),
        port=_field_int(m, "port", "backendRefs[]", **PORT),
    )


def parse_filter(raw: Any, default_ns: str) -> Filter:
    m = _map(raw)
    kind = _str(m.get("type"))
    if kind == "RequestHeaderModifier":
        return Filter(kind, request_headers=parse_header_modifier(m.get("requestHeaderModifier")))
    if kind == "ResponseHeaderModifier":
        return Filter(kind,
                      response_headers=parse_header_modifier(m.get("responseHeaderModifier")))
    if kind == "RequestRedirect":
        r = _map(m.get("requestRedirect"))
        return Filter(kind, redirect=Redirect(
            scheme=r.get("scheme") if isinstance(r.get("scheme"), str) else None,
            hostname=r.get("hostname") if isinstance(r.get("hostname"), str) else None,
            path=_path_modifier(r.get("path")),
            port=_field_int(r, "port", "requestRedirect", **PORT),
            status_code=_field_int(r, "statusCode", "requestRedirect", 302) or 302,
        ))
    if kind == "URLRewrite":
        r = _map(m.get("urlRewrite"))
        return Filter(kind, rewrite=Rewrite(
            hostname=r.get("hostname") if isinstance(r.get("hostname"), str) else None,
            path=_path_modifier(r.get("path")),
        ))
    if kind == "RequestMirror":
        r = _map(m.get("requestMirror"))
        percent: float | None = None
        if "percent" in r:
            percent = float(_field_int(r, "percent", "requestMirror", 100, lo=0, hi=100) or 0)
        elif "fraction" in r:
            f = _map(r["fraction"])
            denominator = _field_int(f, "denominator", "requestMirror.fraction", 100, lo=1)
            numerator = _field_int(f, "numerator", "requestMirror.fraction", 0, lo=0,
                                   hi=denominator)
            percent = 100.0 * float(numerator or 0) / float(denominator or 100)
        return Filter(kind, mirror=Mirror(
            parse_backend_object_ref(r.get("backendRef"), default_ns), percent))
    if kind == "CORS":
        c = _map(m.get("cors"))

        def strs(key: str) -> tuple[str, ...]:
            return tuple(_str(x) for x in _list(c.get(key)))

        return Filter(kind, cors=Cors(
            allow_origins=strs("allowOrigins"),
            allow_credentials=bool(c.get("allowCredentials", False)),
            allow_methods=strs("allowMethods"),
            allow_headers=strs("allowHeaders"),
            expose_headers=strs("exposeHeaders"),
            max_age=_int(c.get("maxAge"), 5) or 0,
        ))
    if kind == "ExtensionRef":
        e = _map(m.get("extensionRef"))
        return Filter(kind, extension_ref=(_str(e.get("group")), _str(e.get("kind")),
                                           _str(e.get("name"))))
    raise Invalid(f"unsupported filter type {kind!r}")


@dataclass(frozen=True)
class BackendRef:
    ref: BackendObjectRef
    weight: int = 1
    filters: tuple[Filter, ...] = ()


def parse_backend_ref(raw: Any, default_ns: str) -> BackendRef:
    m = _map(raw)
    weight = _field_int(m, "weight", "backendRefs[]", 1, lo=0, hi=1_000_000)
    if weight is None or weight < 0:
        raise Invalid("backendRefs[].weight must be 0 or more")
    return BackendRef(
        ref=parse_backend_object_ref(m, default_ns),
        weight=weight,
        filters=tuple(parse_filter(f, default_ns) for f in _list(m.get("filters"))),
    )


# -- HTTPRoute / GRPCRoute / TLSRoute / TCPRoute / UDPRoute ----------------------------------

@dataclass(frozen=True)
class StringMatch:
    type: str  # Exact | RegularExpression (| PathPrefix for paths)
    name: str
    value: str


@dataclass(frozen=True)
class HTTPMatch:
    path: StringMatch = StringMatch("PathPrefix", "", "/")
    headers: tuple[StringMatch, ...] = ()
    query: tuple[StringMatch, ...] = ()
    method: str | None = None


def parse_http_match(raw: Any) -> HTTPMatch:
    m = _map(raw)
    p = _map(m.get("path"))
    path = StringMatch(_str(p.get("type"), "PathPrefix"), "", _str(p.get("value"), "/"))
    if path.type not in ("Exact", "PathPrefix", "RegularExpression"):
        raise Invalid(f"unsupported path match type {path.type!r}")
    if path.type != "RegularExpression" and not path.value.startswith("/"):
        raise Invalid(f"path {path.value!r} must start with '/'")

    def matches(key: str) -> tuple[StringMatch, ...]:
        out = []
        for h in map(_map, _list(m.get(key))):
            out.append(StringMatch(_str(h.get("type"), "Exact"), _str(h.get("name")),
                                   _str(h.get("value"))))
        return tuple(out)

    return HTTPMatch(path=path, headers=matches("headers"), query=matches("queryParams"),
                     method=m.get("method") if isinstance(m.get("method"), str) else None)


@dataclass(frozen=True)
class Timeouts:
    request: str | None = None
    backend_request: str | None = None


@dataclass(frozen=True)
class Retry:
    codes: tuple[int, ...] = ()
    attempts: int | None = None
    backoff: str | None = None


@dataclass(frozen=True)
class HTTPRule:
    name: str | None
    matches: tuple[HTTPMatch, ...]
    filters: tuple[Filter, ...]
    backends: tuple[BackendRef, ...]
    timeouts: Timeouts = Timeouts()
    retry: Retry | None = None
    session_persistence: Mapping[str, Any] | None = None  # read by the route builder


@dataclass(frozen=True)
class Route:
    """An HTTPRoute, GRPCRoute, TLSRoute, TCPRoute or UDPRoute: what attachment and status
    need."""

    obj: KubeObject
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    http_rules: tuple[HTTPRule, ...] = ()
    grpc_rules: tuple[GRPCRule, ...] = ()
    # TLSRoute, TCPRoute, UDPRoute: each rule's backends (connections, or UDP sessions,
    # are spread over them by weight; there is nothing else to match on)
    stream_backends: tuple[tuple[BackendRef, ...], ...] = ()

    @property
    def kind(self) -> str:
        return self.obj.kind


def _parent_refs(obj: KubeObject) -> tuple[ParentRef, ...]:
    return tuple(parse_parent_ref(p, obj.namespace) for p in _list(obj.spec.get("parentRefs")))


def _hostnames(obj: KubeObject) -> tuple[str, ...]:
    return tuple(_str(h) for h in _list(obj.spec.get("hostnames")))


def parse_http_route(obj: KubeObject) -> Route:
    rules = []
    for raw in map(_map, _list(obj.spec.get("rules")) or [{}]):
        t = _map(raw.get("timeouts"))
        retry = None
        if "retry" in raw:
            r = _map(raw.get("retry"))
            codes = _list(r.get("codes"))
            for c in codes:
                _field_int({"codes": c}, "codes", "retry", lo=400, hi=599)
            retry = Retry(codes=tuple(codes),
                          attempts=_field_int(r, "attempts", "retry", lo=0),
                          backoff=r.get("backoff") if isinstance(r.get("backoff"), str) else None)
        rules.append(HTTPRule(
            name=raw.get("name") if isinstance(raw.get("name"), str) else None,
            matches=tuple(parse_http_match(x) for x in _list(raw.get("matches"))) or (
                HTTPMatch(),),
            filters=tuple(parse_filter(f, obj.namespace) for f in _list(raw.get("filters"))),
            backends=tuple(parse_backend_ref(b, obj.namespace)
                           for b in _list(raw.get("backendRefs"))),
            timeouts=Timeouts(
                request=t.get("request") if isinstance(t.get("request"), str) else None,
                backend_request=t.get("backendRequest")
                if isinstance(t.get("backendRequest"), str) else None),
            retry=retry,
            session_persistence=_map(raw.get("sessionPersistence")) or None,
        ))
    return Route(obj, _parent_refs(obj), _hostnames(obj), http_rules=tuple(rules))


@dataclass(frozen=True)
class GRPCMatch:
    method_type: str = "Exact"
    service: str | None = None
    method: str | None = None
    headers: tuple[StringMatch, ...] = ()


@dataclass(frozen=True)
class GRPCRule:
    name: str | None
    matches: tuple[GRPCMatch, ...]
    filters: tuple[Filter, ...]
    backends: tuple[BackendRef, ...]


def parse_grpc_route(obj: KubeObject) -> Route:
    rules = []
    for raw in map(_map, _list(obj.spec.get("rules")) or [{}]):
        matches = []
        for m in map(_map, _list(raw.get("matches"))):
            meth = _map(m.get("method"))
            matches.append(GRPCMatch(
                method_type=_str(meth.get("type"), "Exact"),
                service=meth.get("service") if isinstance(meth.get("service"), str) else None,
                method=meth.get("method") if isinstance(meth.get("method"), str) else None,
                headers=tuple(StringMatch(_str(h.get("type"), "Exact"), _str(h.get("name")),
                                          _str(h.get("value")))
                              for h in map(_map, _list(m.get("headers")))),
            ))
        rules.append(GRPCRule(
            name=raw.get("name") if isinstance(raw.get("name"), str) else None,
            matches=tuple(matches) or (GRPCMatch(),),
            filters=tuple(parse_filter(f, obj.namespace) for f in _list(raw.get("filters"))),
            backends=tuple(parse_backend_ref(b, obj.namespace)
                           for b in _list(raw.get("backendRefs"))),
        ))
    return Route(obj, _parent_refs(obj), _hostnames(obj), grpc_rules=tuple(rules))


def parse_stream_route(obj: KubeObject) -> Route:
    """A TLSRoute, TCPRoute or UDPRoute (the last two have no hostnames)."""
    rules = tuple(
        tuple(parse_backend_ref(b, obj.namespace) for b in _list(_map(raw).get("backendRefs")))
        for raw in _list(obj.spec.get("rules")))
    names = _hostnames(obj) if obj.kind == "TLSRoute" else ()
    return Route(obj, _parent_refs(obj), names, stream_backends=rules)


# -- Gateway, ListenerSet, GatewayClass ------------------------------------------------------

@dataclass(frozen=True)
class RouteGroupKind:
    group: str
    kind: str


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str | None
    tls_mode: str | None  # Terminate | Passthrough, for HTTPS and TLS
    certificate_refs: tuple[BackendObjectRef, ...]
    allowed_from: str  # Same | All | Selector | None
    allowed_selector: Mapping[str, Any]
    allowed_kinds: tuple[RouteGroupKind, ...] | None  # None: the protocol's defaults

    @property
    def transport(self) -> str:
        """UDP for a UDP listener, else TCP: a UDP listener's port is another socket than a
        TCP one of the same number."""
        return "UDP" if self.protocol == "UDP" else "TCP"


def parse_listener(raw: Any, default_ns: str) -> Listener:
    m = _map(raw)
    tls = _map(m.get("tls"))
    allowed = _map(m.get("allowedRoutes"))
    namespaces = _map(allowed.get("namespaces"))
    kinds = None
    if "kinds" in allowed:
        kinds = tuple(RouteGroupKind(_str(k.get("group"), GATEWAY_GROUP), _str(k.get("kind")))
                      for k in map(_map, _list(allowed.get("kinds"))))
    protocol = _str(m.get("protocol"))
    port = _field_int(m, "port", "listeners[]", **PORT)
    if not _str(m.get("name")) or port is None:
        raise Invalid("listeners[] need a name and a port")
    return Listener(
        name=m["name"],
        port=port,
        protocol=protocol,
        hostname=m.get("hostname") if isinstance(m.get("hostname"), str) else None,
        tls_mode=_str(tls.get("mode"), "Terminate") if tls or protocol in ("HTTPS", "TLS")
        else None,
        certificate_refs=tuple(_object_ref(c, default_ns, "Secret")
                               for c in map(_map, _list(tls.get("certificateRefs")))),
        allowed_from=_str(namespaces.get("from"), "Same"),
        allowed_selector=_map(namespaces.get("selector")),
        allowed_kinds=kinds,
    )


@dataclass(frozen=True)
class ClientValidation:
    """How an HTTPS port checks client certificates (Gateway spec.tls.frontend)."""

    ca_refs: tuple[BackendObjectRef, ...]
    mode: str  # AllowValidOnly | AllowInsecureFallback


@dataclass(frozen=True)
class Gateway:
    obj: KubeObject
    class_name: str
    listeners: tuple[Listener, ...]
    addresses: tuple[tuple[str, str], ...]  # (type, value)
    allowed_listener_sets_from: str  # None | Same | All | Selector
    allowed_listener_sets_selector: Mapping[str, Any] = field(default_factory=dict)
    client_validation: ClientValidation | None = None  # for ports without their own
    client_validation_per_port: Mapping[int, ClientValidation | None] = field(
        default_factory=dict)
    backend_client_certificate: BackendObjectRef | None = None  # spec.tls.backend

    def validation_for(self, port: int) -> ClientValidation | None:
        if port in self.client_validation_per_port:
            return self.client_validation_per_port[port]
        return self.client_validation


def _client_validation(raw: Any, default_ns: str) -> ClientValidation | None:
    m = _map(_map(raw).get("validation"))
    if not m:
        return None
    return ClientValidation(
        ca_refs=tuple(_object_ref(r, default_ns, "ConfigMap")
                      for r in map(_map, _list(m.get("caCertificateRefs")))),
        mode=_str(m.get("mode"), "AllowValidOnly"))


def _object_ref(m: Mapping[str, Any], default_ns: str, kind: str) -> BackendObjectRef:
    return BackendObjectRef(_str(m.get("group"), ""), _str(m.get("kind"), kind),
                            _str(m.get("namespace"), default_ns), _str(m.get("name")), None)


def parse_gateway(obj: KubeObject) -> Gateway:
    spec = obj.spec
    allowed = _map(_map(spec.get("allowedListeners")).get("namespaces"))
    tls = _map(spec.get("tls"))
    frontend = _map(tls.get("frontend"))
    per_port = {}
    for entry in map(_map, _list(frontend.get("perPort"))):
        port = _int(entry.get("port"))
        if port is not None:
            per_port[port] = _client_validation(entry.get("tls"), obj.namespace)
    backend_cert = _map(_map(tls.get("backend")).get("clientCertificateRef"))
    return Gateway(
        obj=obj,
        class_name=_str(spec.get("gatewayClassName")),
        listeners=tuple(parse_listener(x, obj.namespace) for x in _list(spec.get("listeners"))),
        addresses=tuple((_str(a.get("type"), "IPAddress"), _str(a.get("value")))
                        for a in map(_map, _list(spec.get("addresses")))),
        allowed_listener_sets_from=_str(allowed.get("from"), "None"),
        allowed_listener_sets_selector=_map(allowed.get("selector")),
        client_validation=_client_validation(frontend.get("default"), obj.namespace),
        client_validation_per_port=per_port,
        backend_client_certificate=_object_ref(backend_cert, obj.namespace, "Secret")
        if backend_cert else None,
    )


@dataclass(frozen=True)
class ListenerSet:
    obj: KubeObject
    parent: ParentRef
    listeners: tuple[Listener, ...]


def parse_listener_set(obj: KubeObject) -> ListenerSet:
    parent = parse_parent_ref(obj.spec.get("parentRef"), obj.namespace)
    return ListenerSet(obj, parent, tuple(parse_listener(x, obj.namespace)
                                          for x in _list(obj.spec.get("listeners"))))


# -- ReferenceGrant, BackendTLSPolicy --------------------------------------------------------

@dataclass(frozen=True)
class ReferenceGrant:
    namespace: str
    from_: tuple[tuple[str, str, str], ...]  # group, kind, namespace
    to: tuple[tuple[str, str, str | None], ...]  # group, kind, name

    def permits(self, from_group: str, from_kind: str, from_ns: str, to_group: str,
                to_kind: str, to_name: str) -> bool:
        return any(g == from_group and k == from_kind and n == from_ns
                   for g, k, n in self.from_) and any(
            g == to_group and k == to_kind and (n is None or n == to_name)
            for g, k, n in self.to)


def parse_reference_grant(obj: KubeObject) -> ReferenceGrant:
    return ReferenceGrant(
        namespace=obj.namespace,
        from_=tuple((_str(f.get("group")), _str(f.get("kind")), _str(f.get("namespace")))
                    for f in map(_map, _list(obj.spec.get("from")))),
        to=tuple((_str(t.get("group")), _str(t.get("kind")),
                  t.get("name") if isinstance(t.get("name"), str) else None)
                 for t in map(_map, _list(obj.spec.get("to")))),
    )


@dataclass(frozen=True)
class BackendTLSPolicy:
    obj: KubeObject
    targets: tuple[tuple[str, str, str, str | None], ...]  # group, kind, name, sectionName
    ca_refs: tuple[tuple[str, str, str], ...]  # group, kind, name
    well_known_ca: str | None
    hostname: str
    subject_alt_names: tuple[tuple[str, str], ...]  # (Hostname|URI, value)


def parse_backend_tls_policy(obj: KubeObject) -> BackendTLSPolicy:
    v = _map(obj.spec.get("validation"))
    return BackendTLSPolicy(
        obj=obj,
        targets=tuple((_str(t.get("group")), _str(t.get("kind")), _str(t.get("name")),
                       t.get("sectionName") if isinstance(t.get("sectionName"), str) else None)
                      for t in map(_map, _list(obj.spec.get("targetRefs")))),
        ca_refs=tuple((_str(c.get("group")), _str(c.get("kind")), _str(c.get("name")))
                      for c in map(_map, _list(v.get("caCertificateRefs")))),
        well_known_ca=v.get("wellKnownCACertificates")
        if isinstance(v.get("wellKnownCACertificates"), str) else None,
        hostname=_str(v.get("hostname")),
        subject_alt_names=tuple(
            (_str(s.get("type")), _str(s.get("hostname") or s.get("uri")))
            for s in map(_map, _list(v.get("subjectAltNames")))),
    )


# -- core: Service, EndpointSlice, Secret ----------------------------------------------------

@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    app_protocol: str | None
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    obj: KubeObject
    ports: tuple[ServicePort, ...]
    type: str
    external_name: str | None


def parse_service(obj: KubeObject) -> Service:
    ports = []
    for p in map(_map, _list(obj.spec.get("ports"))):
        port = _int(p.get("port"))
        if port is None:
            continue
        target = p.get("targetPort", port)
        ports.append(ServicePort(
            name=_str(p.get("name")), port=port,
            target_port=target if isinstance(target, int | str) else port,
            app_protocol=p.get("appProtocol") if isinstance(p.get("appProtocol"), str) else None,
            protocol=_str(p.get("protocol"), "TCP"),
        ))
    return Service(obj, tuple(ports), _str(obj.spec.get("type"), "ClusterIP"),
                   obj.spec.get("externalName")
                   if isinstance(obj.spec.get("externalName"), str) else None)


@dataclass(frozen=True)
class EndpointSlice:
    service: str
    namespace: str
    ports: tuple[tuple[str, int], ...]  # (name, port)
    addresses: tuple[str, ...]  # ready endpoints only


def parse_endpoint_slice(obj: KubeObject) -> EndpointSlice:
    addresses: list[str] = []
    for ep in map(_map, _list(obj.body.get("endpoints"))):
        ready = _map(ep.get("conditions")).get("ready", True)
        if ready is not False:
            addresses.extend(_str(a) for a in _list(ep.get("addresses")))
    return EndpointSlice(
        service=_str(obj.labels.get("kubernetes.io/service-name")),
        namespace=obj.namespace,
        ports=tuple((_str(p.get("name")), _int(p.get("port"), 0) or 0)
                    for p in map(_map, _list(obj.body.get("ports")))),
        addresses=tuple(addresses),
    )


def ca_certificates(obj: KubeObject | None) -> bytes | None:
    """The PEM CA certificates in a ConfigMap's or Secret's `ca.crt` (ending in a newline,
    so bundles concatenate), or None when there are none."""
    data = secret_data(obj, "ca.crt") if obj is not None else None
    if data is None or b"BEGIN CERTIFICATE" not in data:
        return None
    return data if data.endswith(b"\n") else data + b"\n"


def secret_data(obj: KubeObject, key: str) -> bytes | None:
    """A Secret's (or ConfigMap's) value: `data` is base64, `stringData` plain."""
    string_data = _map(obj.body.get("stringData"))
    if isinstance(string_data.get(key), str):
        return str(string_data[key]).encode()
    data = _map(obj.body.get("data"))
    value = data.get(key)
    if not isinstance(value, str):
        return None
    if obj.kind == "ConfigMap":
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


# -- Ingress ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class IngressBackend:
    service: str
    port_number: int | None
    port_name: str | None


@dataclass(frozen=True)
class IngressPath:
    path: str
    path_type: str
    backend: IngressBackend


@dataclass(frozen=True)
class IngressRule:
    host: str | None
    paths: tuple[IngressPath, ...]


@dataclass(frozen=True)
class Ingress:
    obj: KubeObject
    class_name: str | None
    default_backend: IngressBackend | None
    rules: tuple[IngressRule, ...]
    tls: tuple[tuple[tuple[str, ...], str], ...]  # (hosts, secretName)


def _ingress_backend(raw: Any) -> IngressBackend | None:
    svc = _map(_map(raw).get("service"))
    if not svc:
        return None
    port = _map(svc.get("port"))
    return IngressBackend(_str(svc.get("name")), _int(port.get("number")),
                          port.get("name") if isinstance(port.get("name"), str) else None)


def parse_ingress(obj: KubeObject) -> Ingress:
    spec = obj.spec
    rules = []
    for r in map(_map, _list(spec.get("rules"))):
        paths = []
        for p in map(_map, _list(_map(r.get("http")).get("paths"))):
            backend = _ingress_backend(p.get("backend"))
            if backend is None:
                raise Invalid("Ingress paths need a service backend")
            paths.append(IngressPath(_str(p.get("path"), "/"),
                                     _str(p.get("pathType"), "ImplementationSpecific"), backend))
        rules.append(IngressRule(r.get("host") if isinstance(r.get("host"), str) else None,
                                 tuple(paths)))
    class_name = spec.get("ingressClassName")
    if not isinstance(class_name, str):
        class_name = obj.annotations.get("kubernetes.io/ingress.class")
    if not isinstance(class_name, str):
        class_name = None
    return Ingress(
        obj=obj,
        class_name=class_name,
        default_backend=_ingress_backend(spec.get("defaultBackend")),
        rules=tuple(rules),
        tls=tuple((tuple(_str(h) for h in _list(t.get("hosts"))), _str(t.get("secretName")))
                  for t in map(_map, _list(spec.get("tls")))),
    )
