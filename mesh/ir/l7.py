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
    verify: bool = True  # False: encrypt without checking the backend's certificate


@dataclass(frozen=True)
class CircuitBreaker:
    """Limits on what the node's proxy sends to one backend at a time (None: the default,
    100,000, far above Envoy's 1,024: one node proxy serves every pod of the node)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    max_requests_per_connection: int | None = None
    max_connections_per_endpoint: int | None = None
    retry_budget_percent: float | None = None  # retries as a share of active requests
    retry_budget_min_concurrency: int | None = None


@dataclass(frozen=True)
class OutlierDetection:
    """Passive health checking: endpoints that fail are ejected for a while."""

    consecutive_5xx: int | None = 5
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True)
class HealthCheck:
    """Active health checking of every endpoint."""

    type: str  # HTTP | TCP | GRPC
    interval: float = 3.0
    timeout: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1
    path: str = "/"
    method: str = "GET"
    expected_statuses: tuple[int, ...] = (200,)
    host: str | None = None
    send: bytes | None = None  # TCP: payload sent
    receive: bytes | None = None  # TCP: payload expected back
    grpc_service: str = ""


@dataclass(frozen=True)
class LoadBalancer:
    type: str = "RoundRobin"  # RoundRobin | LeastRequest | Random | ConsistentHash
    hash_algorithm: str = "Maglev"  # ConsistentHash: Maglev | RingHash
    table_size: int | None = None
    slow_start_window: float | None = None


@dataclass(frozen=True)
class BackendSettings:
    """How the proxy talks to a backend, from traffic policies (None: the defaults)."""

    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    load_balancer: LoadBalancer | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None  # upstream connections
    max_connection_duration: float | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f) is not None for f in self.__dataclass_fields__)


@dataclass(frozen=True)
class Backend:
    """A set of endpoints Envoy forwards to: one Service port (an Envoy cluster)."""

    name: str
    endpoints: tuple[Endpoint, ...]
    # http1 | h2c | tcp (bytes: TLS passthrough, TCPRoute) | udp (datagrams: UDPRoute)
    protocol: str = "http1"
    tls: UpstreamTLS | None = None
    owners: Owners = frozenset()
    settings: BackendSettings = BackendSettings()
    # Endpoints new requests never go to, but a session stuck to one (its cookie names it)
    # keeps going there: an ingress-nginx canary's, in its main backend, and the reverse.
    sticky_endpoints: tuple[Endpoint, ...] = ()


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
    codes: tuple[int, ...]  # retriable status codes
    backoff: float | None = None  # base interval
    # Envoy's retry_on conditions (5xx, gateway-error, reset, connect-failure, ...); empty:
    # connection failures and resets, and the codes (or any 5xx without codes).
    triggers: tuple[str, ...] = ()
    max_backoff: float | None = None


@dataclass(frozen=True)
class Mirror:
    backend: str
    percent: float | None = None
    host: str | None = None  # the copy's Host header (None: the request's, marked as a copy)


@dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...]
    allow_headers: tuple[str, ...]
    expose_headers: tuple[str, ...]
    allow_credentials: bool
    max_age: int
    # How an origin with `*` matches: "Any" characters (the Gateway API's), or "Label": one
    # DNS label, and origins compared case-insensitively (ingress-nginx's)
    origin_wildcard: str = "Any"


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
    idle_timeout: float | None = None  # the stream's, while no byte moves
    regex_rewrite: tuple[str, str] | None = None  # (pattern, substitution with \\1 groups)


@dataclass(frozen=True)
class Redirect:
    status: int
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    full_path: str | None = None
    prefix: tuple[str, str] | None = None  # (matched prefix, replacement)
    strip_trailing_slash: bool = False  # a path ending with `/` loses it (`/` becomes empty)
    strip_query: bool = False  # the request's query is not kept


@dataclass(frozen=True)
class DirectResponse:
    status: int
    body: str = ""


Action = Forward | Redirect | DirectResponse


@dataclass(frozen=True)
class RateLimitSelector:
    """What a limit counts by, besides the route: a header or the client's address.

    `match`: Distinct (a counter per value), Exact or RegularExpression (one counter for the
    requests that match `value`); for the source address `value` is a CIDR (Exact: one
    counter for the range, Distinct: one per address in it)."""

    source: str  # Header | SourceIP
    match: str = "Distinct"
    name: str = ""  # the header
    value: str = ""
    invert: bool = False


@dataclass(frozen=True)
class RateLimit:
    id: str  # stable across nodes: the counter's identity (policy namespace/name/rule)
    requests: int
    unit: str  # Second | Minute | Hour | Day
    selectors: tuple[RateLimitSelector, ...] = ()
    scope: str = "Local"  # Local: this node's proxy alone; Global: every node's, shared
    shadow: bool = False  # count and report, never refuse
    fail_closed: bool = False  # Global: refuse when the rate limit service cannot decide
    burst: int | None = None  # Local: the bucket's size (None: `requests`)

    @property
    def seconds(self) -> int:
        return UNIT_SECONDS[self.unit]


UNIT_SECONDS = {"Second": 1, "Minute": 60, "Hour": 3600, "Day": 86400}


@dataclass(frozen=True)
class HashPolicy:
    """Consistent hashing key for a route's requests (with a ConsistentHash backend)."""

    source: str  # Header | Cookie | SourceIP | Path (the request's path and query)
    name: str = ""
    ttl: float | None = None  # Cookie: Envoy sets it when missing, with this lifetime
    path: str | None = None


@dataclass(frozen=True)
class SessionPersistence:
    """Sticky sessions: the endpoint a client was sent to is named in a cookie or header."""

    type: str  # Cookie | Header
    name: str
    ttl: float | None = None  # Cookie: max age (None: a session cookie)
    path: str = "/"
    # Cookie attributes: Expires this many seconds after the cookie is set, Domain, Secure,
    # SameSite (Strict | Lax | None, as written); the cookie is always HttpOnly.
    expires: float | None = None
    domain: str | None = None
    secure: bool = False
    same_site: str | None = None


@dataclass(frozen=True)
class ExtAuth:
    """An external HTTP authorization service asked before each request of a route
    (ingress-nginx's auth-url): a 200 lets the request on, with `upstream_headers` of the
    answer copied onto it (the client's own are removed first); any other answer is sent to
    the client, except a 401 when `signin` is set: a redirect to `signin`, the request's URL
    in its `signin_param` query parameter. The check carries the client's headers (no body)
    and ingress-nginx's X-Original-URL, X-Original-Method, X-Auth-Request-Redirect.
    `signin` may hold nginx variables of the request, filled in when redirecting: $scheme,
    $pass_access_scheme, $host, $http_host, $best_http_host, $request_uri,
    $escaped_request_uri (the URL put in `signin_param` is
    `$pass_access_scheme://$http_host$escaped_request_uri`)."""

    backend: str | None  # None: the service cannot be reached: every request answers 500
    path: str  # the service's path, with its query (the request's path follows in the query)
    upstream_headers: tuple[str, ...] = ()
    signin: str | None = None
    signin_param: str = "rd"
    redirect: str | None = None  # X-Auth-Request-Redirect (None: the request's path)
    timeout: float = 10.0


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
    rule: str | None = None  # the name of the route rule it comes from (policies target it)
    rate_limits: tuple[RateLimit, ...] = ()
    hash_policy: HashPolicy | None = None
    session: SessionPersistence | None = None
    allowed_sources: tuple[str, ...] = ()  # client CIDRs let in (empty: every client); 403
    denied_sources: tuple[str, ...] = ()  # client CIDRs refused (403), whatever is allowed
    # The client's address for allowed_sources and denied_sources: the last address of
    # X-Forwarded-For (a load balancer in front wrote it) when the request has one, instead
    # of the connection's peer.
    sources_from_forwarded_for: bool = False
    ext_auth: ExtAuth | None = None
    max_request_bytes: int | None = None  # a larger request body answers 413


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
    # Proxying without HTTP: TCP (TLS passthrough, a TCPRoute) or, on a UDP listener, UDP
    tcp_backends: tuple[WeightedBackend, ...] = ()
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
    protocol: str  # HTTP | HTTPS | TLS | TCP | UDP
    chains: tuple[FilterChain, ...]
    owners: Owners = frozenset()
    # The mesh listener: connections the datapath hands over keep their original
    # destination (the Service's ClusterIP) as local address (IP_TRANSPARENT).
    transparent: bool = False
    # Proxies in front of this listener whose X-Forwarded-For entries are trusted: the
    # client is the entry before theirs (0: the connection's peer is the client, and what a
    # client writes in X-Forwarded-For decides nothing).
    trusted_proxy_hops: int = 0
