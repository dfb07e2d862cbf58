"""The L7 part of the IR: listeners, route tables, routes, backends, certificates.

Envoy details stay out: this says what the node's proxy must do, not how Envoy spells it.
Every listener, route and backend records the objects it comes from (`owners`), so
`Programmed` can follow the sinks' readiness back to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.store.objects import ObjectKey

Owners = frozenset[ObjectKey]


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True)
class UpstreamTLS:
    sni: str
    ca_pem: bytes | None  # None: the system's trusted CAs
    subject_alt_names: tuple[tuple[str, str], ...] = ()  # (Hostname | URI, value)
    client_cert: str | None = None  # secret name, for backend client certificates
    unusable: bool = False  # the policy is invalid: refuse to connect at all


@dataclass(frozen=True)
class Backend:
    """A set of endpoints Envoy forwards to: one Service port (an Envoy cluster)."""

    name: str
    endpoints: tuple[Endpoint, ...]
    protocol: str = "http1"  # http1 | h2c | tcp
    tls: UpstreamTLS | None = None
    owners: Owners = frozenset()


@dataclass(frozen=True)
class StringMatch:
    type: str  # Exact | RegularExpression | Prefix | PathSeparatedPrefix | Present
    value: str = ""
    name: str = ""


@dataclass(frozen=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class WeightedBackend:
    backend: str | None  # None: the reference is invalid and its share answers 500
    weight: int
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@dataclass(frozen=True)
class Retry:
    attempts: int
    codes: tuple[int, ...]
    backoff: float | None = None


@dataclass(frozen=True)
class Mirror:
    backend: str
    percent: float | None = None


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...]
    allow_headers: tuple[str, ...]
    expose_headers: tuple[str, ...]
    allow_credentials: bool
    max_age: int


@dataclass(frozen=True)
class Forward:
    backends: tuple[WeightedBackend, ...]
    timeout: float = 0.0  # 0: no timeout
    per_try_timeout: float | None = None
    retry: Retry | None = None
    mirrors: tuple[Mirror, ...] = ()
    host_rewrite: str | None = None
    full_path_rewrite: str | None = None
    prefix_rewrite: tuple[str, str] | None = None  # (matched prefix, replacement)
    websocket: bool = False


@dataclass(frozen=True)
class Redirect:
    status: int
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    full_path: str | None = None
    prefix: tuple[str, str] | None = None  # (matched prefix, replacement)


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str = ""


Action = Forward | Redirect | DirectResponse


@dataclass(frozen=True)
class Route:
    name: str
    path: StringMatch
    action: Action
    headers: tuple[StringMatch, ...] = ()
    query: tuple[StringMatch, ...] = ()
    method: str | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    cors: Cors | None = None
    owners: Owners = frozenset()


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class RouteTable:
    """Virtual hosts served together (one Envoy RouteConfiguration)."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    owners: Owners = frozenset()


@dataclass(frozen=True)
class Certificate:
    name: str
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class TrustBundle:
    """CA certificates that client certificates must chain to."""

    name: str
    ca_pem: bytes


@dataclass(frozen=True)
class ClientValidation:
    trust_bundle: str  # a TrustBundle's name
    allow_insecure: bool = False  # accept clients without a valid certificate too


@dataclass(frozen=True)
class FilterChain:
    """One way of handling connections on a port: by SNI when TLS, plain otherwise."""

    name: str
    server_names: tuple[str, ...] = ()  # empty: any
    certificates: tuple[str, ...] = ()  # TLS termination with these certificates
    client_validation: ClientValidation | None = None
    route_table: str | None = None  # HTTP: the route table that serves it
    tcp_backends: tuple[WeightedBackend, ...] = ()  # TCP proxying (TLS passthrough)
    owners: Owners = frozenset()
    # The mesh listener's chains: the Service frontend (ClusterIP, port) the connection was
    # sent to, and for a consumer route's chain the client pods' addresses (/32 each).
    destination: tuple[str, int] | None = None
    source_ranges: tuple[str, ...] = ()


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    protocol: str  # HTTP | HTTPS | TLS
    chains: tuple[FilterChain, ...]
    owners: Owners = frozenset()
    # The mesh listener: connections the datapath hands over keep their original
    # destination (the Service's ClusterIP) as local address (IP_TRANSPARENT).
    transparent: bool = False
