"""The project's traffic policies (`TrafficPolicy.mesh.dev`), parsed into typed settings.

A policy attaches the Gateway API way (GEP-713): `targetRefs` to a Gateway (or one listener
by `sectionName`), a ListenerSet, an HTTPRoute or GRPCRoute (or one rule by name), or a
Service (or one port by name). Its fields keep the shapes Envoy Gateway's
BackendTrafficPolicy users know (rateLimit, retry, timeout, circuitBreaker, healthCheck,
loadBalancer), plus sessionPersistence in the Gateway API's shape and l7Visibility (a
Service's HTTP seen by the node's Envoy, with no route or rule). The CRD's schema is
`gateway-api/trafficpolicy.yaml`; this parser holds the same bounds, so a policy that did not
go through an API server (a file) is refused the same way, with a message for its status.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh import ir
from mesh.store.kinds import MESH_GROUP, TRAFFIC_POLICY
from mesh.store.objects import KubeObject
from mesh.translate.durations import parse_duration
from mesh.translate.model import Invalid

__all__ = ["MESH_GROUP", "TRAFFIC_POLICY", "TrafficPolicy", "parse_traffic_policy"]
# Features merged independently: the most specific policy that sets one decides it.
FEATURES = ("rateLimit", "retry", "timeout", "circuitBreaker", "healthCheck", "loadBalancer",
            "sessionPersistence", "l7Visibility")
# The features a route's traffic takes from its policies (l7Visibility is a Service's alone).
ROUTE_FEATURES = FEATURES[:-1]
# l7Visibility's values: HTTP (the Service's HTTP ports go through the node's Envoy, whose
# access log makes their requests flows) or None (they stay in the kernel, whatever the
# Service's or its namespace's annotation says).
VISIBILITY_VALUES = ("HTTP", "None")
TARGET_KINDS = frozenset({("gateway.networking.k8s.io", "Gateway"),
                          ("gateway.networking.k8s.io", "ListenerSet"),
                          ("gateway.networking.x-k8s.io", "XListenerSet"),
                          ("gateway.networking.k8s.io", "HTTPRoute"),
                          ("gateway.networking.k8s.io", "GRPCRoute"),
                          ("", "Service")})
MAX_TARGETS = 16
MAX_RULES = 16
MAX_SELECTORS = 8
MAX_REQUESTS = 1_000_000
RETRY_TRIGGERS = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$")


@dataclass(frozen=True)
class TargetRef:
    group: str
    kind: str
    name: str
    section_name: str | None = None


@dataclass(frozen=True)
class RateLimits:
    local: tuple[ir.RateLimit, ...] = ()
    global_: tuple[ir.RateLimit, ...] = ()


@dataclass(frozen=True)
class RetrySettings:
    retry: ir.Retry | None  # None: only the budget is set
    per_try_timeout: float | None = None
    budget_percent: float | None = None
    budget_min_concurrency: int | None = None


@dataclass(frozen=True)
class Timeouts:
    request: float | None = None
    stream_idle: float | None = None
    connect: float | None = None
    connection_idle: float | None = None
    max_connection_duration: float | None = None


@dataclass(frozen=True)
class HealthChecks:
    active: ir.HealthCheck | None = None
    passive: ir.OutlierDetection | None = None


@dataclass(frozen=True)
class Balancing:
    balancer: ir.LoadBalancer
    hash_policy: ir.HashPolicy | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    obj: KubeObject
    targets: tuple[TargetRef, ...]
    rate_limits: RateLimits | None = None
    retry: RetrySettings | None = None
    timeout: Timeouts | None = None
    circuit_breaker: ir.CircuitBreaker | None = None
    health_check: HealthChecks | None = None
    load_balancer: Balancing | None = None
    session: ir.SessionPersistence | None = None
    l7_visibility: str | None = None  # one of VISIBILITY_VALUES

    def sets(self, feature: str) -> bool:
        return self.feature(feature) is not None

    def feature(self, feature: str) -> Any:
        return {"rateLimit": self.rate_limits, "retry": self.retry, "timeout": self.timeout,
                "circuitBreaker": self.circuit_breaker, "healthCheck": self.health_check,
                "loadBalancer": self.load_balancer,
                "sessionPersistence": self.session,
                "l7Visibility": self.l7_visibility}[feature]


# -- helpers ---------------------------------------------------------------------------------

def _map(v: Any, where: str) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise Invalid(f"{where} must be an object")
    return v


def _list(v: Any, where: str, limit: int) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise Invalid(f"{where} must be a list")
    if len(v) > limit:
        raise Invalid(f"{where} has {len(v)} entries; at most {limit} are allowed")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise Invalid(f"{where} must be an integer from {lo} to {hi}")
    return v


def _duration(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise Invalid(f"{where} must be a duration like 10s or 500ms")
    try:
        return parse_duration(v)
    except ValueError:
        raise Invalid(f"{where}: {v!r} is not a duration like 10s, 1m30s or 500ms") from None


def _enum(v: Any, where: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    if v is None and default is not None:
        return default
    if v not in allowed:
        raise Invalid(f"{where} must be one of {', '.join(allowed)}")
    assert isinstance(v, str)
    return v


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _HEADER_NAME.match(v):
        raise Invalid(f"{where} must be a valid header or cookie name")
    return v


# -- parsing ---------------------------------------------------------------------------------

def parse_traffic_policy(obj: KubeObject) -> TrafficPolicy:
    spec = obj.spec
    targets = []
    raw_targets = _list(spec.get("targetRefs"), "spec.targetRefs", MAX_TARGETS)
    if not raw_targets:
        raise Invalid("spec.targetRefs needs at least one target")
    for i, raw in enumerate(raw_targets):
        m = _map(raw, f"spec.targetRefs[{i}]")
        group, kind, name = m.get("group", ""), m.get("kind"), m.get("name")
        if not isinstance(group, str) or not isinstance(kind, str) or \
                not isinstance(name, str) or not name:
            raise Invalid(f"spec.targetRefs[{i}] needs group, kind and name")
        if (group, kind) not in TARGET_KINDS:
            raise Invalid(f"spec.targetRefs[{i}]: {kind}.{group or 'core'} cannot be a target "
                          "(Gateway, ListenerSet, HTTPRoute, GRPCRoute or Service)")
        section = m.get("sectionName")
        if section is not None and not isinstance(section, str):
            raise Invalid(f"spec.targetRefs[{i}].sectionName must be a string")
        targets.append(TargetRef(group, kind, name, section))
    policy = TrafficPolicy(
        obj=obj, targets=tuple(targets),
        rate_limits=_rate_limits(obj, spec.get("rateLimit")),
        retry=_retry(spec.get("retry")),
        timeout=_timeouts(spec.get("timeout")),
        circuit_breaker=_circuit_breaker(spec.get("circuitBreaker")),
        health_check=_health_checks(spec.get("healthCheck")),
        load_balancer=_load_balancer(spec.get("loadBalancer")),
        session=_session(spec.get("sessionPersistence")),
        l7_visibility=None if spec.get("l7Visibility") is None else
        _enum(spec.get("l7Visibility"), "spec.l7Visibility", VISIBILITY_VALUES))
    if policy.l7_visibility is not None and any(t.kind != "Service" for t in targets):
        # A Gateway's or a route's requests go through Envoy already, and are flows.
        raise Invalid("spec.l7Visibility applies to Services only: a Gateway's or a route's "
                      "requests pass through Envoy and are seen already")
    if not any(policy.sets(f) for f in FEATURES):
        raise Invalid("the policy sets nothing: give at least one of " + ", ".join(FEATURES))
    return policy


def _rate_limits(obj: KubeObject, raw: Any) -> RateLimits | None:
    m = _map(raw, "spec.rateLimit")
    if not m:
        return None
    local = _map(m.get("local"), "spec.rateLimit.local")
    glob = _map(m.get("global"), "spec.rateLimit.global")
    mode = _enum(glob.get("failureMode"), "spec.rateLimit.global.failureMode",
                 ("Open", "Closed"), "Open")
    out = RateLimits(
        local=tuple(_rule(obj, r, i, "Local", False)
                    for i, r in enumerate(_list(local.get("rules"), "spec.rateLimit.local.rules",
                                                MAX_RULES))),
        global_=tuple(_rule(obj, r, i, "Global", mode == "Closed")
                      for i, r in enumerate(_list(glob.get("rules"),
                                                  "spec.rateLimit.global.rules", MAX_RULES))))
    if not out.local and not out.global_:
        raise Invalid("spec.rateLimit needs local.rules or global.rules")
    return out


def _rule(obj: KubeObject, raw: Any, index: int, scope: str, fail_closed: bool
          ) -> ir.RateLimit:
    where = f"spec.rateLimit.{scope.lower()}.rules[{index}]"
    m = _map(raw, where)
    limit = _map(m.get("limit"), f"{where}.limit")
    requests = _int(limit.get("requests"), f"{where}.limit.requests", 1, MAX_REQUESTS)
    if requests is None:
        raise Invalid(f"{where}.limit.requests is required")
    unit = _enum(limit.get("unit"), f"{where}.limit.unit", tuple(ir.UNIT_SECONDS))
    selectors: list[ir.RateLimitSelector] = []
    for j, cs in enumerate(_list(m.get("clientSelectors"), f"{where}.clientSelectors",
                                 MAX_SELECTORS)):
        sel = _map(cs, f"{where}.clientSelectors[{j}]")
        for k, h in enumerate(_list(sel.get("headers"), f"{where}.clientSelectors[{j}].headers",
                                    MAX_SELECTORS)):
            hw = f"{where}.clientSelectors[{j}].headers[{k}]"
            hm = _map(h, hw)
            match = _enum(hm.get("type"), f"{hw}.type", ("Exact", "RegularExpression", "Distinct"),
                          "Exact")
            value = hm.get("value", "")
            if not isinstance(value, str) or len(value) > 1024 or \
                    (match != "Distinct" and not value):
                raise Invalid(f"{hw}.value must be a string of 1 to 1024 characters")
            if match == "RegularExpression":
                _regex(value, f"{hw}.value")
            selectors.append(ir.RateLimitSelector(
                "Header", match, _name(hm.get("name"), f"{hw}.name").lower(),
                value if match != "Distinct" else "", bool(hm.get("invert", False))))
        cidr = sel.get("sourceCIDR")
        if cidr is not None:
            cw = f"{where}.clientSelectors[{j}].sourceCIDR"
            cm = _map(cidr, cw)
            match = _enum(cm.get("type"), f"{cw}.type", ("Exact", "Distinct"), "Exact")
            try:
                net = ipaddress.ip_network(str(cm.get("value")), strict=False)
            except ValueError:
                raise Invalid(f"{cw}.value must be a CIDR like 10.0.0.0/8") from None
            if scope == "Global" and net.prefixlen:
                # The rate limit service sees the client's address, not whether it is in a
                # range: a global limit counts over every client.
                raise Invalid(f"{cw}.value: global limits count by client address over "
                              "every client (0.0.0.0/0 or ::/0); a narrower range is for "
                              "local limits")
            selectors.append(ir.RateLimitSelector("SourceIP", match, value=str(net)))
    return ir.RateLimit(
        id=f"{obj.namespace}/{obj.name}/{scope.lower()}/{index}", requests=requests, unit=unit,
        selectors=tuple(selectors), scope=scope, shadow=bool(m.get("shadowMode", False)),
        fail_closed=fail_closed)


def _regex(value: str, where: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise Invalid(f"{where} is not a valid regular expression: {e}") from None


def _retry(raw: Any) -> RetrySettings | None:
    m = _map(raw, "spec.retry")
    if not m:
        return None
    on = _map(m.get("retryOn"), "spec.retry.retryOn")
    triggers = tuple(_list(on.get("triggers"), "spec.retry.retryOn.triggers", 16))
    bad = [t for t in triggers if not isinstance(t, str) or t not in RETRY_TRIGGERS]
    if bad:
        raise Invalid(f"spec.retry.retryOn.triggers: {', '.join(map(str, bad))} not supported "
                      f"(one of {', '.join(sorted(RETRY_TRIGGERS))})")
    codes = tuple(_int(c, "spec.retry.retryOn.httpStatusCodes[]", 100, 599) or 0
                  for c in _list(on.get("httpStatusCodes"), "spec.retry.retryOn.httpStatusCodes",
                                 32))
    per = _map(m.get("perRetry"), "spec.retry.perRetry")
    backoff = _map(per.get("backOff"), "spec.retry.perRetry.backOff")
    attempts = _int(m.get("numRetries"), "spec.retry.numRetries", 0, 10)
    budget = _map(m.get("budget"), "spec.retry.budget")
    percent = budget.get("percent")
    if percent is not None and (isinstance(percent, bool) or
                                not isinstance(percent, int | float) or not 0 < percent <= 100):
        raise Invalid("spec.retry.budget.percent must be a number above 0, at most 100")
    retry = None
    if attempts is not None or triggers or codes or per:
        retry = ir.Retry(attempts if attempts is not None else 2, codes,
                         _duration(backoff.get("baseInterval"),
                                   "spec.retry.perRetry.backOff.baseInterval"),
                         triggers=tuple(str(t) for t in triggers),
                         max_backoff=_duration(backoff.get("maxInterval"),
                                               "spec.retry.perRetry.backOff.maxInterval"))
    return RetrySettings(retry, _duration(per.get("timeout"), "spec.retry.perRetry.timeout"),
                         float(percent) if percent is not None else None,
                         _int(budget.get("minRetryConcurrency"),
                              "spec.retry.budget.minRetryConcurrency", 1, 100_000))


def _timeouts(raw: Any) -> Timeouts | None:
    m = _map(raw, "spec.timeout")
    if not m:
        return None
    http = _map(m.get("http"), "spec.timeout.http")
    tcp = _map(m.get("tcp"), "spec.timeout.tcp")
    return Timeouts(
        request=_duration(http.get("requestTimeout"), "spec.timeout.http.requestTimeout"),
        stream_idle=_duration(http.get("streamIdleTimeout"),
                              "spec.timeout.http.streamIdleTimeout"),
        connection_idle=_duration(http.get("connectionIdleTimeout"),
                                  "spec.timeout.http.connectionIdleTimeout"),
        max_connection_duration=_duration(http.get("maxConnectionDuration"),
                                          "spec.timeout.http.maxConnectionDuration"),
        connect=_duration(tcp.get("connectTimeout"), "spec.timeout.tcp.connectTimeout"))


_BIG = 10_000_000


def _circuit_breaker(raw: Any) -> ir.CircuitBreaker | None:
    m = _map(raw, "spec.circuitBreaker")
    if not m:
        return None
    w = "spec.circuitBreaker."
    per = _map(m.get("perEndpoint"), w + "perEndpoint")
    return ir.CircuitBreaker(
        max_connections=_int(m.get("maxConnections"), w + "maxConnections", 1, _BIG),
        max_pending_requests=_int(m.get("maxPendingRequests"), w + "maxPendingRequests", 0,
                                  _BIG),
        max_requests=_int(m.get("maxParallelRequests"), w + "maxParallelRequests", 1, _BIG),
        max_retries=_int(m.get("maxParallelRetries"), w + "maxParallelRetries", 0, _BIG),
        max_requests_per_connection=_int(m.get("maxRequestsPerConnection"),
                                         w + "maxRequestsPerConnection", 1, _BIG),
        max_connections_per_endpoint=_int(per.get("maxConnections"),
                                          w + "perEndpoint.maxConnections", 1, _BIG))


def _health_checks(raw: Any) -> HealthChecks | None:
    m = _map(raw, "spec.healthCheck")
    if not m:
        return None
    active = None
    a = _map(m.get("active"), "spec.healthCheck.active")
    if a:
        w = "spec.healthCheck.active."
        kind = _enum(a.get("type"), w + "type", ("HTTP", "TCP", "GRPC"))
        http = _map(a.get("http"), w + "http")
        tcp = _map(a.get("tcp"), w + "tcp")
        grpc = _map(a.get("grpc"), w + "grpc")
        path = http.get("path", "/")
        if kind == "HTTP" and (not isinstance(path, str) or not path.startswith("/")):
            raise Invalid(w + "http.path must start with /")
        statuses = tuple(_int(s, w + "http.expectedStatuses[]", 100, 599) or 200
                         for s in _list(http.get("expectedStatuses"),
                                        w + "http.expectedStatuses", 32)) or (200,)
        send, receive = tcp.get("send"), tcp.get("receive")
        active = ir.HealthCheck(
            type=kind,
            interval=_duration(a.get("interval"), w + "interval") or 3.0,
            timeout=_duration(a.get("timeout"), w + "timeout") or 1.0,
            unhealthy_threshold=_int(a.get("unhealthyThreshold"), w + "unhealthyThreshold", 1,
                                     100) or 3,
            healthy_threshold=_int(a.get("healthyThreshold"), w + "healthyThreshold", 1,
                                   100) or 1,
            path=str(path), method=_enum(http.get("method"), w + "http.method",
                                         ("GET", "HEAD", "POST", "OPTIONS"), "GET"),
            expected_statuses=statuses,
            host=http.get("host") if isinstance(http.get("host"), str) else None,
            send=send.encode() if isinstance(send, str) else None,
            receive=receive.encode() if isinstance(receive, str) else None,
            grpc_service=str(grpc.get("service", "")))
    passive = None
    p = _map(m.get("passive"), "spec.healthCheck.passive")
    if p:
        w = "spec.healthCheck.passive."
        percent = _int(p.get("maxEjectionPercent"), w + "maxEjectionPercent", 0, 100)
        passive = ir.OutlierDetection(
            consecutive_5xx=_int(p.get("consecutive5XxErrors"), w + "consecutive5XxErrors", 1,
                                 1000) or (None if "consecutiveGatewayErrors" in p else 5),
            consecutive_gateway_errors=_int(p.get("consecutiveGatewayErrors"),
                                            w + "consecutiveGatewayErrors", 1, 1000),
            consecutive_local_origin_failures=_int(p.get("consecutiveLocalOriginFailures"),
                                                   w + "consecutiveLocalOriginFailures", 1,
                                                   1000),
            split_local_origin_errors=bool(p.get("splitExternalLocalOriginErrors", False)),
            interval=_duration(p.get("interval"), w + "interval") or 3.0,
            base_ejection_time=_duration(p.get("baseEjectionTime"), w + "baseEjectionTime")
            or 30.0,
            max_ejection_percent=10 if percent is None else percent)
    if active is None and passive is None:
        raise Invalid("spec.healthCheck needs active or passive")
    return HealthChecks(active, passive)


def _load_balancer(raw: Any) -> Balancing | None:
    m = _map(raw, "spec.loadBalancer")
    if not m:
        return None
    w = "spec.loadBalancer."
    kind = _enum(m.get("type"), w + "type",
                 ("RoundRobin", "LeastRequest", "Random", "ConsistentHash"))
    slow = _map(m.get("slowStart"), w + "slowStart")
    window = _duration(slow.get("window"), w + "slowStart.window")
    hash_policy = None
    algorithm, table = "Maglev", None
    if kind == "ConsistentHash":
        ch = _map(m.get("consistentHash"), w + "consistentHash")
        source = _enum(ch.get("type"), w + "consistentHash.type",
                       ("SourceIP", "Header", "Cookie"))
        algorithm = _enum(ch.get("algorithm"), w + "consistentHash.algorithm",
                          ("Maglev", "RingHash"), "Maglev")
        table = _int(ch.get("tableSize"), w + "consistentHash.tableSize", 1, 5_000_011)
        if source == "Header":
            hash_policy = ir.HashPolicy("Header", _name(
                _map(ch.get("header"), w + "consistentHash.header").get("name"),
                w + "consistentHash.header.name").lower())
        elif source == "Cookie":
            cookie = _map(ch.get("cookie"), w + "consistentHash.cookie")
            hash_policy = ir.HashPolicy("Cookie", _name(cookie.get("name"),
                                                        w + "consistentHash.cookie.name"),
                                        ttl=_duration(cookie.get("ttl"),
                                                      w + "consistentHash.cookie.ttl"))
        else:
            hash_policy = ir.HashPolicy("SourceIP")
    elif m.get("consistentHash") is not None:
        raise Invalid(w + "consistentHash is only for type ConsistentHash")
    return Balancing(ir.LoadBalancer(kind, algorithm, table, window), hash_policy)


def parse_session_persistence(raw: Any, where: str) -> ir.SessionPersistence | None:
    """The Gateway API's SessionPersistence (an HTTPRoute rule's, or a policy's)."""
    return _session(raw, where)


def _session(raw: Any, where: str = "spec.sessionPersistence") -> ir.SessionPersistence | None:
    m = _map(raw, where)
    if not m:
        return None
    w = where + "."
    kind = _enum(m.get("type"), w + "type", ("Cookie", "Header"), "Cookie")
    name = _name(m.get("sessionName", "mesh-session"), w + "sessionName")
    ttl = _duration(m.get("absoluteTimeout"), w + "absoluteTimeout")
    cookie = _map(m.get("cookieConfig"), w + "cookieConfig")
    if cookie.get("lifetimeType") == "Session":
        ttl = None
    return ir.SessionPersistence(kind, name if kind == "Cookie" else name.lower(), ttl)
