"""The TrafficPolicy CRD (gateway-api/trafficpolicy.yaml) against the parser
(mesh/translate/traffic_policy.py): a structural schema with the parser's bounds, which
accepts the policies the parser accepts and refuses the ones it refuses.

jsonschema checks the OpenAPI part after what an API server does first: defaults filled in,
unknown fields refused (an API server prunes them; kubectl's strict field validation, its
default, refuses them). The CEL rules (x-kubernetes-validations) are evaluated with cel-python
(`celpy`, a dev dependency).
"""

from __future__ import annotations

import copy
import functools
import importlib
import ipaddress
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from mesh import ir
from mesh.sinks.status.report import stamp_transitions
from mesh.store.kinds import MESH_GROUP, TRAFFIC_POLICY
from mesh.store.objects import KubeObject, parse_object
from mesh.translate import traffic_policy as policies
from mesh.translate.durations import parse_duration
from mesh.translate.model import Invalid

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "gateway-api" / "trafficpolicy.yaml"
GOLDEN = ROOT / "tests" / "golden" / "translate" / "policies.yaml"
GOLDEN_STATUS = ROOT / "tests" / "golden" / "translate" / "expected" / "policies.status.yaml"
DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"  # GEP-2257
GW = "gateway.networking.k8s.io"

CRD: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
VERSION: dict[str, Any] = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]

celpy: Any = importlib.import_module("celpy")  # untyped: no stubs


# -- the schema as data ----------------------------------------------------------------------

def nodes(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema of a value under `schema`, by path: `.name` a property, `[]` the items."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from nodes(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from nodes(schema["additionalProperties"], path + "{}")


NODES = dict(nodes(SCHEMA))


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3.0 schema as JSON Schema 2020-12: no `x-kubernetes-*`, `nullable` or
    annotations, a numeric `exclusiveMinimum`, and no unknown fields."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in (
                "nullable", "default", "description", "format", "exclusiveMinimum",
                "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        else:
            out[key] = value
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:
            out[bound] = out.pop(limit)
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


Draft202012Validator.check_schema(to_json_schema(SCHEMA))
VALIDATOR = Draft202012Validator(to_json_schema(SCHEMA))


def with_defaults(value: Any, node: Mapping[str, Any]) -> Any:
    """`value` with the schema's defaults filled in, as an API server does before it
    validates."""
    if isinstance(value, dict):
        props = node.get("properties", {})
        out = {k: with_defaults(v, props[k]) if k in props else v for k, v in value.items()}
        for k, sub in props.items():
            if k not in out and "default" in sub:
                out[k] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list) and isinstance(node.get("items"), Mapping):
        return [with_defaults(v, node["items"]) for v in value]
    return value


@functools.cache
def cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_holds(rule: str, value: Any) -> bool:
    try:
        result = cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
    except Exception:  # an error fails the rule, as in an API server
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def cel_failures(value: Any, node: Mapping[str, Any], path: str = "") -> list[str]:
    out = [f"{path or '.'}: {v['message']}" for v in node.get("x-kubernetes-validations", [])
           if not cel_holds(v["rule"], value)]
    props = node.get("properties", {})
    if isinstance(value, dict):
        for k, v in value.items():
            if k in props:
                out += cel_failures(v, props[k], f"{path}.{k}")
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for i, v in enumerate(value):
            out += cel_failures(v, node["items"], f"{path}[{i}]")
    return out


def refusals(doc: Mapping[str, Any]) -> tuple[list[str], bool]:
    """What an API server would say of `doc`: its errors, and whether CEL was evaluated
    (rules run on values of the right shape: not when the OpenAPI schema refuses)."""
    defaulted = with_defaults(copy.deepcopy(dict(doc)), SCHEMA)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
              for e in VALIDATOR.iter_errors(defaulted)]
    if errors:
        return errors, True
    return cel_failures(defaulted, SCHEMA), True


def document(spec: Mapping[str, Any], name: str = "example") -> dict[str, Any]:
    return {"apiVersion": f"{MESH_GROUP}/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def parser_error(doc: Mapping[str, Any]) -> str | None:
    try:
        policies.parse_traffic_policy(parse_object(doc))
    except Invalid as e:
        return str(e)
    return None


# -- examples ------------------------------------------------------------------------------

ROUTE = {"group": GW, "kind": "HTTPRoute", "name": "shop"}


def spec(**features: Any) -> dict[str, Any]:
    return {"targetRefs": [dict(ROUTE)], **features}


def limit(requests: Any = 10, unit: Any = "Second", **rule: Any) -> dict[str, Any]:
    return {"limit": {"requests": requests, "unit": unit}, **rule}


def local(*rules: Any) -> dict[str, Any]:
    return {"rateLimit": {"local": {"rules": list(rules)}}}


def header(**h: Any) -> dict[str, Any]:
    return local(limit(clientSelectors=[{"headers": [h]}]))


def cidr(scope: str, **c: Any) -> dict[str, Any]:
    return {"rateLimit": {scope: {"rules": [limit(clientSelectors=[{"sourceCIDR": c}])]}}}


def request_timeout(value: Any) -> dict[str, Any]:
    return spec(timeout={"http": {"requestTimeout": value}})


def lb(**balancer: Any) -> dict[str, Any]:
    return spec(loadBalancer=balancer)


def hashed(**consistent: Any) -> dict[str, Any]:
    return lb(type="ConsistentHash", consistentHash=consistent)


SERVICE = {"group": "", "kind": "Service", "name": "echo"}

VALID: dict[str, dict[str, Any]] = {
    "retry-only": spec(retry={"numRetries": 1}),
    "l7-visibility": {"targetRefs": [SERVICE, {**SERVICE, "name": "api", "sectionName": "http"}],
                      "l7Visibility": "HTTP"},
    "l7-visibility-none": {"targetRefs": [SERVICE], "l7Visibility": "None"},
    "every-target-kind": {
        "targetRefs": [{"group": GW, "kind": "Gateway", "name": "gw", "sectionName": "api"},
                       {"group": GW, "kind": "ListenerSet", "name": "team"},
                       {"group": "gateway.networking.x-k8s.io", "kind": "XListenerSet",
                        "name": "team"},
                       {"group": GW, "kind": "HTTPRoute", "name": "shop",
                        "sectionName": "checkout"},
                       {"group": GW, "kind": "GRPCRoute", "name": "cart"},
                       {"group": "", "kind": "Service", "name": "cart"},
                       {"kind": "Service", "name": "cart", "sectionName": "http"}],
        "timeout": {"tcp": {"connectTimeout": "1s"}}},
    "most-of-everything": {
        "targetRefs": [{"group": GW, "kind": "HTTPRoute", "name": f"r{i}"}
                       for i in range(policies.MAX_TARGETS)],
        **local(*(limit(clientSelectors=[
            {"headers": [{"name": f"x-h{k}", "value": "v"}
                         for k in range(policies.MAX_SELECTORS)]}
            for _ in range(policies.MAX_SELECTORS)]) for _ in range(policies.MAX_RULES)))},
    "local-limits": spec(**local(
        limit(1, "Second"),
        limit(policies.MAX_REQUESTS, "Day", shadowMode=True, clientSelectors=[
            {"headers": [{"name": "x-user", "value": "alice"},
                         {"name": "x-tier", "type": "RegularExpression",
                          "value": "^(gold|silver)$", "invert": True},
                         {"name": "x-client", "type": "Distinct"}],
             "sourceCIDR": {"value": "10.0.0.0/8"}},
            {"sourceCIDR": {"type": "Distinct", "value": "2001:db8::/32"}},
            {"sourceCIDR": {"value": "192.168.1.7"}}]))),
    "global-limits": spec(rateLimit={
        "local": {"rules": []},
        "global": {"failureMode": "Closed", "rules": [
            limit(5, "Minute", clientSelectors=[
                {"sourceCIDR": {"type": "Distinct", "value": "0.0.0.0/0"}},
                {"sourceCIDR": {"value": "::/0"}},
                {"headers": [{"name": "x-user", "type": "Distinct"}]}]),
            limit(100, "Hour")]}}),
    "retry-everything": spec(retry={
        "numRetries": 10,
        "retryOn": {"triggers": sorted(policies.RETRY_TRIGGERS),
                    "httpStatusCodes": [100, 503, 599]},
        "perRetry": {"timeout": "1h30m15s500ms",
                     "backOff": {"baseInterval": "99999ms", "maxInterval": "1m"}},
        "budget": {"percent": 0.5, "minRetryConcurrency": 100_000}}),
    "retry-budget-only": spec(retry={"budget": {"percent": 100}}),
    "no-retries": spec(retry={"numRetries": 0}),
    "timeouts": spec(timeout={
        "http": {"requestTimeout": "30s", "streamIdleTimeout": "5m",
                 "connectionIdleTimeout": "1h", "maxConnectionDuration": "24h"},
        "tcp": {"connectTimeout": "250ms"}}),
    "circuit-breaker": spec(circuitBreaker={
        "maxConnections": 1, "maxPendingRequests": 0, "maxParallelRequests": 10_000_000,
        "maxParallelRetries": 0, "maxRequestsPerConnection": 1,
        "perEndpoint": {"maxConnections": 64}}),
    "active-http": spec(healthCheck={"active": {
        "type": "HTTP", "interval": "2s", "timeout": "500ms", "unhealthyThreshold": 100,
        "healthyThreshold": 1,
        "http": {"path": "/healthz", "method": "HEAD", "expectedStatuses": [200, 204],
                 "host": "cart.shop"}}}),
    "active-tcp-and-passive": spec(healthCheck={
        "active": {"type": "TCP", "tcp": {"send": "PING", "receive": "PONG"}},
        "passive": {"consecutive5XxErrors": 1000, "consecutiveGatewayErrors": 1,
                    "consecutiveLocalOriginFailures": 3,
                    "splitExternalLocalOriginErrors": True, "interval": "1s",
                    "baseEjectionTime": "10s", "maxEjectionPercent": 0}}),
    "active-grpc": spec(healthCheck={"active": {"type": "GRPC",
                                                "grpc": {"service": "cart.v1.Cart"}}}),
    "passive-gateway-errors": spec(healthCheck={"passive": {"consecutiveGatewayErrors": 2}}),
    "least-request-slow-start": lb(type="LeastRequest", slowStart={"window": "30s"}),
    "round-robin": lb(type="RoundRobin"),
    "random": lb(type="Random"),
    "hash-source-ip": hashed(type="SourceIP", algorithm="RingHash", tableSize=5_000_011),
    "hash-header": hashed(type="Header", header={"name": "X-User"}),
    "hash-cookie": hashed(type="Cookie", cookie={"name": "cart-id", "ttl": "1h"}),
    "session-cookie": spec(sessionPersistence={
        "sessionName": "sid", "absoluteTimeout": "12h",
        "cookieConfig": {"lifetimeType": "Permanent"}}),
    "session-cookie-for-the-session": spec(sessionPersistence={
        "type": "Cookie", "cookieConfig": {"lifetimeType": "Session"}}),
    "session-header": spec(sessionPersistence={"type": "Header", "sessionName": "X-Session"}),
}

# Refused by both: the spec, and a part of the parser's message (refused for that reason).
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "l7-visibility-on-a-route": (spec(l7Visibility="HTTP"), "applies to Services only"),
    "l7-visibility-with-a-route": ({"targetRefs": [SERVICE, ROUTE], "l7Visibility": "HTTP"},
                                   "applies to Services only"),
    "l7-visibility-value": ({"targetRefs": [SERVICE], "l7Visibility": "http"},
                            "must be one of HTTP, None"),
    "no-targets": ({"targetRefs": [], "retry": {"numRetries": 1}}, "at least one target"),
    "no-target-list": ({"retry": {"numRetries": 1}}, "at least one target"),
    "targets-not-a-list": ({"targetRefs": "shop", "retry": {"numRetries": 1}}, "a list"),
    "too-many-targets": ({"targetRefs": [{**ROUTE, "name": f"r{i}"} for i in range(17)],
                          "retry": {"numRetries": 1}}, "at most 16"),
    "target-kind": ({"targetRefs": [{"group": "apps", "kind": "Deployment", "name": "x"}],
                     "retry": {"numRetries": 1}}, "cannot be a target"),
    "target-group-for-kind": ({"targetRefs": [{"group": "", "kind": "Gateway", "name": "gw"}],
                               "retry": {"numRetries": 1}}, "cannot be a target"),
    "target-without-group": ({"targetRefs": [{"kind": "HTTPRoute", "name": "shop"}],
                              "retry": {"numRetries": 1}}, "cannot be a target"),
    "target-xlistenerset-group": (
        {"targetRefs": [{"group": GW, "kind": "XListenerSet", "name": "x"}],
         "retry": {"numRetries": 1}}, "cannot be a target"),
    "target-without-name": ({"targetRefs": [{"group": GW, "kind": "HTTPRoute"}],
                             "retry": {"numRetries": 1}}, "needs group, kind and name"),
    "target-empty-name": ({"targetRefs": [{**ROUTE, "name": ""}], "retry": {"numRetries": 1}},
                          "needs group, kind and name"),
    "sets-nothing": (spec(), "sets nothing"),
    "rate-limit-without-rules": (spec(**local()), "needs local.rules or global.rules"),
    "rate-limit-empty": (spec(rateLimit={}), "sets nothing"),
    "requests-0": (spec(**local(limit(0))), "limit.requests must be an integer"),
    "requests-too-many": (spec(**local(limit(1_000_001))), "limit.requests must be an integer"),
    "requests-text": (spec(**local(limit("10"))), "limit.requests must be an integer"),
    "requests-missing": (spec(**local({"limit": {"unit": "Second"}})), "requests is required"),
    "limit-missing": (spec(**local({})), "requests is required"),
    "unit-fortnight": (spec(**local(limit(10, "Fortnight"))), "limit.unit must be one of"),
    "too-many-rules": (spec(**local(*[limit()] * 17)), "at most 16"),
    "too-many-selectors": (spec(**local(limit(clientSelectors=[{}] * 9))), "at most 8"),
    "too-many-headers": (spec(**local(limit(clientSelectors=[{"headers": [
        {"name": f"x-{i}", "value": "v"} for i in range(9)]}]))), "at most 8"),
    "header-name": (spec(**header(name="x user", value="a")), "valid header or cookie name"),
    "header-without-name": (spec(**header(value="a")), "valid header or cookie name"),
    "header-without-value": (spec(**header(name="x-user")), "1 to 1024 characters"),
    "header-empty-value": (spec(**header(name="x-user", value="")), "1 to 1024 characters"),
    "header-long-value": (spec(**header(name="x-user", value="a" * 1025)),
                          "1 to 1024 characters"),
    "header-match-type": (spec(**header(name="x-user", type="Prefix", value="a")),
                          "type must be one of"),
    "cidr-prefix": (spec(**cidr("local", value="10.0.0.0/33")), "must be a CIDR"),
    "cidr-text": (spec(**cidr("local", value="ten")), "must be a CIDR"),
    "cidr-without-value": (spec(**cidr("local", type="Distinct")), "must be a CIDR"),
    "cidr-match-type": (spec(**cidr("local", type="Prefix", value="10.0.0.0/8")),
                        "type must be one of"),
    "global-narrow-cidr": (spec(**cidr("global", value="10.0.0.0/8")), "global limits count"),
    "global-address": (spec(**cidr("global", value="10.1.2.3")), "global limits count"),
    "failure-mode": (spec(rateLimit={"global": {"failureMode": "Half", "rules": [limit()]}}),
                     "failureMode must be one of"),
    "duration-without-unit": (request_timeout("10"), "is not a duration"),
    "duration-fraction": (request_timeout("1.5s"), "is not a duration"),
    "duration-word": (request_timeout("10sec"), "is not a duration"),
    "duration-days": (request_timeout("1d"), "is not a duration"),
    "duration-five-parts": (request_timeout("1h1m1s1ms1s"), "is not a duration"),
    "duration-six-digits": (request_timeout("123456s"), "is not a duration"),
    "duration-negative": (request_timeout("-1s"), "is not a duration"),
    "duration-number": (request_timeout(10), "must be a duration"),
    "retry-empty": (spec(retry={}), "sets nothing"),
    "retry-not-an-object": (spec(retry="fast"), "spec.retry must be an object"),
    "retries-11": (spec(retry={"numRetries": 11}), "numRetries must be an integer"),
    "retries-negative": (spec(retry={"numRetries": -1}), "numRetries must be an integer"),
    "retries-boolean": (spec(retry={"numRetries": True}), "numRetries must be an integer"),
    "retry-trigger": (spec(retry={"retryOn": {"triggers": ["teapot"]}}), "not supported"),
    "too-many-triggers": (spec(retry={"retryOn": {"triggers": ["5xx"] * 17}}), "at most 16"),
    "retry-status-600": (spec(retry={"retryOn": {"httpStatusCodes": [600]}}),
                         "httpStatusCodes[] must be"),
    "retry-status-99": (spec(retry={"retryOn": {"httpStatusCodes": [99]}}),
                        "httpStatusCodes[] must be"),
    "too-many-statuses": (spec(retry={"retryOn": {"httpStatusCodes": [503] * 33}}),
                          "at most 32"),
    "retry-backoff": (spec(retry={"perRetry": {"backOff": {"baseInterval": "soon"}}}),
                      "is not a duration"),
    "budget-0": (spec(retry={"budget": {"percent": 0}}), "budget.percent"),
    "budget-over-100": (spec(retry={"budget": {"percent": 100.5}}), "budget.percent"),
    "budget-boolean": (spec(retry={"budget": {"percent": True}}), "budget.percent"),
    "budget-concurrency-0": (spec(retry={"budget": {"minRetryConcurrency": 0}}),
                             "minRetryConcurrency must be"),
    "timeout-empty": (spec(timeout={}), "sets nothing"),
    "max-connections-0": (spec(circuitBreaker={"maxConnections": 0}), "maxConnections must"),
    "max-pending-negative": (spec(circuitBreaker={"maxPendingRequests": -1}),
                             "maxPendingRequests must"),
    "max-parallel-over": (spec(circuitBreaker={"maxParallelRequests": 10_000_001}),
                          "maxParallelRequests must"),
    "per-endpoint-0": (spec(circuitBreaker={"perEndpoint": {"maxConnections": 0}}),
                       "perEndpoint.maxConnections must"),
    "circuit-breaker-empty": (spec(circuitBreaker={}), "sets nothing"),
    "health-check-empty": (spec(healthCheck={}), "sets nothing"),
    "passive-empty": (spec(healthCheck={"passive": {}}), "needs active or passive"),
    "active-without-type": (spec(healthCheck={"active": {"interval": "1s"}}),
                            "active.type must be one of"),
    "active-udp": (spec(healthCheck={"active": {"type": "UDP"}}), "active.type must be one of"),
    "active-http-path": (spec(healthCheck={"active": {"type": "HTTP",
                                                      "http": {"path": "healthz"}}}),
                         "must start with /"),
    "active-method": (spec(healthCheck={"active": {"type": "HTTP", "http": {"method": "PUT"}}}),
                      "method must be one of"),
    "active-status-600": (spec(healthCheck={"active": {
        "type": "HTTP", "http": {"expectedStatuses": [600]}}}), "expectedStatuses[] must be"),
    "active-threshold-0": (spec(healthCheck={"active": {"type": "TCP",
                                                        "unhealthyThreshold": 0}}),
                           "unhealthyThreshold must be"),
    "active-threshold-101": (spec(healthCheck={"active": {"type": "TCP",
                                                          "healthyThreshold": 101}}),
                             "healthyThreshold must be"),
    "active-interval": (spec(healthCheck={"active": {"type": "TCP", "interval": "1 s"}}),
                        "is not a duration"),
    "passive-5xx-0": (spec(healthCheck={"passive": {"consecutive5XxErrors": 0}}),
                      "consecutive5XxErrors must be"),
    "passive-ejection-101": (spec(healthCheck={"passive": {"maxEjectionPercent": 101}}),
                             "maxEjectionPercent must be"),
    "lb-type": (lb(type="WeightedRandom"), "loadBalancer.type must be one of"),
    "lb-without-type": (lb(slowStart={"window": "1s"}), "loadBalancer.type must be one of"),
    "slow-start-window": (lb(type="RoundRobin", slowStart={"window": "soon"}),
                          "is not a duration"),
    "hash-on-round-robin": (lb(type="RoundRobin", consistentHash={"type": "SourceIP"}),
                            "only for type ConsistentHash"),
    "hash-missing": (lb(type="ConsistentHash"), "consistentHash.type must be one of"),
    "hash-without-type": (hashed(), "consistentHash.type must be one of"),
    "hash-type": (hashed(type="Query"), "consistentHash.type must be one of"),
    "hash-header-missing": (hashed(type="Header"), "header.name must be"),
    "hash-header-name": (hashed(type="Header", header={"name": "x user"}), "header.name must"),
    "hash-cookie-missing": (hashed(type="Cookie"), "cookie.name must be"),
    "hash-cookie-ttl": (hashed(type="Cookie", cookie={"name": "c", "ttl": "1 hour"}),
                        "is not a duration"),
    "hash-table-0": (hashed(type="SourceIP", tableSize=0), "tableSize must be"),
    "hash-table-over": (hashed(type="SourceIP", tableSize=5_000_012), "tableSize must be"),
    "hash-algorithm": (hashed(type="SourceIP", algorithm="Ketama"), "algorithm must be one of"),
    "session-empty": (spec(sessionPersistence={}), "sets nothing"),
    "session-type": (spec(sessionPersistence={"type": "URL"}), "type must be one of"),
    "session-name": (spec(sessionPersistence={"sessionName": "my session"}),
                     "sessionName must be"),
    "session-timeout": (spec(sessionPersistence={"absoluteTimeout": "1d"}),
                        "is not a duration"),
}

# The schema refuses these, the parser takes them: why. The parser does not read fields it
# does not know, and does not check what it does not use.
SCHEMA_ONLY: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-field-in-spec": ({**spec(retry={"numRetries": 1}), "retries": 3},
                              "the parser ignores fields it does not read"),
    "unknown-field-in-a-feature": (spec(retry={"numRetries": 1, "attempts": 3}),
                                   "the parser ignores fields it does not read"),
    "duplicate-targets": ({"targetRefs": [dict(ROUTE), dict(ROUTE)],
                           "retry": {"numRetries": 1}},
                          "the parser does not refuse a target given twice"),
    "distinct-header-with-value": (spec(**header(name="x-user", type="Distinct", value="a")),
                                   "the parser ignores a Distinct selector's value"),
    "empty-feature-beside-another": (spec(retry={"numRetries": 1}, timeout={}),
                                     "the parser takes an empty feature for an unset one"),
    "empty-active-beside-passive": (
        spec(healthCheck={"active": {}, "passive": {"maxEjectionPercent": 5}}),
        "the parser takes an empty active check for none"),
    "empty-section-name": ({"targetRefs": [{**ROUTE, "sectionName": ""}],
                            "retry": {"numRetries": 1}},
                           "the parser does not check sectionName (Gateway API SectionName)"),
    "section-name-format": ({"targetRefs": [{**ROUTE, "sectionName": "Not_A_Name"}],
                             "retry": {"numRetries": 1}},
                            "the parser does not check sectionName (Gateway API SectionName)"),
    "long-target-name": ({"targetRefs": [{**ROUTE, "name": "a" * 254}],
                          "retry": {"numRetries": 1}},
                         "the parser does not bound names (Kubernetes names: 253)"),
    "lifetime-type": (spec(sessionPersistence={"cookieConfig": {"lifetimeType": "Forever"}}),
                      "the parser reads only lifetimeType Session (Gateway API enum)"),
    "boolean-as-text": (spec(**local(limit(shadowMode="yes"))),
                        "the parser takes any value for a boolean (bool(value))"),
    "http-path-for-a-tcp-check": (
        spec(healthCheck={"active": {"type": "TCP", "http": {"path": "healthz"}}}),
        "the parser checks http.path only for type HTTP"),
    "header-of-another-hash-type": (hashed(type="SourceIP", header={"name": "x user"}),
                                    "the parser reads header only for type Header"),
    "cidr-prefix-with-zero": (spec(**cidr("local", value="10.0.0.0/08")),
                              "the parser (ipaddress) takes /08 for /8"),
    "cidr-netmask": (spec(**cidr("local", value="10.0.0.0/255.0.0.0")),
                     "the parser (ipaddress) takes a netmask for a prefix length"),
}

# The parser refuses these, the schema cannot tell.
PARSER_ONLY: dict[str, tuple[dict[str, Any], str]] = {
    "invalid-regular-expression": (
        spec(**header(name="x-user", type="RegularExpression", value="(")),
        "not a valid regular expression"),
    "integral-float": (spec(retry={"numRetries": 1.0}), "numRetries must be an integer"),
}


# -- the CRD -----------------------------------------------------------------------------------

def test_names_group_and_version() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["kind"] == "CustomResourceDefinition"
    spec_, names = CRD["spec"], CRD["spec"]["names"]
    assert spec_["group"] == MESH_GROUP == TRAFFIC_POLICY.group
    assert names["kind"] == TRAFFIC_POLICY.kind
    assert names["listKind"] == names["kind"] + "List"
    assert names["singular"] == names["kind"].lower()
    assert names["plural"] == "trafficpolicies"
    assert CRD["metadata"]["name"] == f"{names['plural']}.{spec_['group']}"
    assert names["shortNames"] == ["tp"]
    assert "mesh" in names["categories"]
    assert spec_["scope"] == "Namespaced"
    assert [v["name"] for v in spec_["versions"]] == ["v1alpha1"]
    assert VERSION["served"] is True and VERSION["storage"] is True
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert columns["Accepted"]["jsonPath"] == \
        '.status.ancestors[0].conditions[?(@.type=="Accepted")].status'
    assert columns["Age"] == {"name": "Age", "type": "date",
                              "jsonPath": ".metadata.creationTimestamp"}
    for c in columns.values():
        assert c["type"] in ("string", "integer", "number", "boolean", "date")
        assert c["jsonPath"].startswith(".")


# Keys a structural schema may hold (no $ref, uniqueItems, patternProperties, dependencies,
# additionalItems, nullable, x-kubernetes-preserve-unknown-fields, int-or-string...).
ALLOWED_KEYS = frozenset({
    "description", "type", "format", "properties", "required", "items", "enum", "default",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
    "maxLength", "pattern", "minItems", "maxItems", "minProperties", "maxProperties",
    "additionalProperties", "allOf", "anyOf", "oneOf", "not", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "title"})
SCALARS = ("string", "integer", "number", "boolean")
PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool}


def junctor_problems(node: Mapping[str, Any], path: str) -> Iterator[str]:
    """Inside allOf/anyOf/oneOf/not: no type, description, default, additionalProperties or
    nullable, and only properties the node itself has."""
    for junctor in ("allOf", "anyOf", "oneOf", "not"):
        subs = node.get(junctor)
        for sub in [subs] if isinstance(subs, Mapping) else subs or []:
            for bad in ("type", "description", "default", "additionalProperties", "nullable"):
                if bad in sub:
                    yield f"{path}: {bad} inside {junctor}"
            for name in sub.get("properties", {}):
                if name not in node.get("properties", {}):
                    yield f"{path}: {junctor} has property {name} the node lacks"


@pytest.mark.parametrize("path", sorted(NODES))
def test_schema_is_structural(path: str) -> None:
    node = NODES[path]
    assert set(node) <= ALLOWED_KEYS, set(node) - ALLOWED_KEYS
    kind = node.get("type")
    assert kind in ("object", "array", *SCALARS), f"{path} needs a type"
    assert not list(junctor_problems(node, path))
    if kind == "object":
        assert node.get("additionalProperties") is not True
        assert not ("properties" in node and "additionalProperties" in node)
        if path == ".metadata":  # the API server's own
            assert node == {"type": "object"}
        else:
            assert "properties" in node or isinstance(node.get("additionalProperties"),
                                                      Mapping), f"{path}: an open object"
        assert set(node.get("required", [])) <= set(node.get("properties", {}))
    else:
        assert not {"properties", "required", "minProperties"} & set(node)
    if kind == "array":
        assert isinstance(node.get("items"), Mapping)
        assert "maxItems" in node, f"{path}: unbounded list"  # and a bounded CEL cost
        list_type = node.get("x-kubernetes-list-type", "atomic")
        assert list_type in ("atomic", "set", "map")
        items = node["items"]
        if list_type == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert items["type"] == "object" and keys
            for key in keys:
                assert items["properties"][key]["type"] in SCALARS
                assert key in items.get("required", []) or "default" in items["properties"][key]
        else:
            assert "x-kubernetes-list-map-keys" not in node
        if list_type == "set":
            assert items["type"] in SCALARS
    else:
        assert not {"x-kubernetes-list-type", "x-kubernetes-list-map-keys"} & set(node)
    if kind == "string" and path not in (".apiVersion", ".kind"):  # the API server's own
        assert {"maxLength", "enum", "pattern", "format"} & set(node), f"{path}: unbounded"
    for lo, hi in (("minimum", "maximum"), ("minItems", "maxItems"),
                   ("minLength", "maxLength")):
        if lo in node and hi in node:
            assert node[lo] <= node[hi]
    if kind in PY_TYPES:
        for value in node.get("enum", []):
            assert isinstance(value, PY_TYPES[kind]), f"{path}: enum {value!r}"
    if "default" in node:
        assert Draft202012Validator(to_json_schema(node)).is_valid(node["default"])
    if "pattern" in node:
        re.compile(node["pattern"])
        assert node["pattern"].startswith("^")  # anchored: a pattern matches anywhere


def rules() -> list[tuple[str, dict[str, Any]]]:
    return [(path, v) for path, node in NODES.items()
            for v in node.get("x-kubernetes-validations", [])]


def test_cel_rules_look_like_cel() -> None:
    found = rules()
    assert len(found) >= 10
    for path, v in found:
        assert set(v) <= {"rule", "message", "messageExpression", "reason", "fieldPath"}
        rule, message = v["rule"], v["message"]
        assert isinstance(rule, str) and "self" in rule, path
        assert isinstance(message, str) and message.strip(), path
        assert "\n" not in message, path  # an API server refuses line breaks in a message
        code = re.sub(r"'[^']*'", "''", rule)  # string literals out
        assert '"' not in code and code.count("'") % 2 == 0, rule
        for opening, closing in ("()", "[]", "{}"):
            depth = 0
            for ch in code:
                depth += (ch == opening) - (ch == closing)
                assert depth >= 0, rule
            assert depth == 0, rule
        assert not re.search(r"\b(and|or|not|None|True|False|null)\b|===|&&\s*$", code), rule


def test_cel_rules_compile() -> None:
    for path, v in rules():
        try:
            cel_program(v["rule"])
        except Exception as e:  # a parse error
            pytest.fail(f"{path}: {v['rule']}: {e}")


# -- the schema and the parser agree ---------------------------------------------------------

def golden_policies() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(GOLDEN.read_text())
            if d and d.get("kind") == "TrafficPolicy"]


def test_golden_policies() -> None:
    found = golden_policies()
    assert "broken" in {d["metadata"]["name"] for d in found} and len(found) > 5
    for doc in found:
        name = doc["metadata"]["name"]
        errors, _ = refusals(doc)
        if name == "broken":
            assert errors, "the schema takes the broken policy"
            assert parser_error(doc) is not None
        else:
            assert errors == [], name
            assert parser_error(doc) is None, name


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid(name: str) -> None:
    doc = document(VALID[name], name)
    assert refusals(doc)[0] == []
    assert parser_error(doc) is None


@pytest.mark.parametrize("name", sorted(VALID))
def test_defaults_do_not_change_what_the_parser_makes(name: str) -> None:
    """An API server stores the schema's defaults: the policy must mean the same."""
    doc = document(VALID[name], name)
    defaulted = with_defaults(copy.deepcopy(doc), SCHEMA)
    raw = policies.parse_traffic_policy(parse_object(doc))
    assert policies.parse_traffic_policy(parse_object(defaulted)) == raw


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid(name: str) -> None:
    body, why = INVALID[name]
    doc = document(body, name)
    error = parser_error(doc)
    assert error is not None and why in error, error
    errors, _ = refusals(doc)
    assert errors, "the schema takes it"


@pytest.mark.parametrize("name", sorted(SCHEMA_ONLY))
def test_known_disagreements_schema_only(name: str) -> None:
    body, why = SCHEMA_ONLY[name]
    doc = document(body, name)
    errors, _ = refusals(doc)
    assert errors, "the schema takes it"
    assert parser_error(doc) is None, f"the parser refuses it now ({why}): move it to INVALID"


@pytest.mark.parametrize("name", sorted(PARSER_ONLY))
def test_known_disagreements_parser_only(name: str) -> None:
    body, why = PARSER_ONLY[name]
    doc = document(body, name)
    error = parser_error(doc)
    assert error is not None and why in error, error
    assert refusals(doc)[0] == []


class Reads(Mapping[str, Any]):
    """A mapping that notes the path of every key looked up in it (`[]` for list items)."""

    def __init__(self, data: Mapping[str, Any], path: str, seen: set[str]) -> None:
        self.data, self.path, self.seen = data, path, seen

    def __getitem__(self, key: str) -> Any:
        self.seen.add(f"{self.path}.{key}")
        return noted(self.data[key], f"{self.path}.{key}", self.seen)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def noted(value: Any, path: str, seen: set[str]) -> Any:
    if isinstance(value, Mapping):
        return Reads(value, path, seen)
    if isinstance(value, list):
        return [noted(v, path + "[]", seen) for v in value]
    return value


def test_the_schema_has_the_fields_the_parser_reads_and_no_other() -> None:
    seen: set[str] = set()
    for name, body in VALID.items():
        obj = KubeObject(group=MESH_GROUP, kind="TrafficPolicy", namespace="default",
                         name=name, body=Reads({"spec": body}, "", seen))
        policies.parse_traffic_policy(obj)
    fields = {p for p in NODES if p.startswith(".spec") and not p.endswith("[]")}
    assert seen - fields == set(), "read by the parser, not in the schema"
    assert fields - seen == set(), "in the schema, never read by the parser"


def test_bounds_and_enums_are_the_parsers() -> None:
    assert NODES[".spec.targetRefs"]["maxItems"] == policies.MAX_TARGETS
    target = NODES[".spec.targetRefs[]"]["properties"]
    assert set(target["group"]["enum"]) == {g for g, _ in policies.TARGET_KINDS}
    assert set(target["kind"]["enum"]) == {k for _, k in policies.TARGET_KINDS}
    assert set(NODES[".spec"]["properties"]) - {"targetRefs"} == set(policies.FEATURES)
    for scope in ("local", "global"):
        rule = f".spec.rateLimit.{scope}.rules"
        assert NODES[rule]["maxItems"] == policies.MAX_RULES
        assert NODES[rule + "[].clientSelectors"]["maxItems"] == policies.MAX_SELECTORS
        assert NODES[rule + "[].clientSelectors[].headers"]["maxItems"] == \
            policies.MAX_SELECTORS
        assert NODES[rule + "[].limit.requests"]["maximum"] == policies.MAX_REQUESTS
        assert NODES[rule + "[].limit.unit"]["enum"] == list(ir.UNIT_SECONDS)
    assert set(NODES[".spec.retry.retryOn.triggers[]"]["enum"]) == policies.RETRY_TRIGGERS
    assert tuple(NODES[".spec.l7Visibility"]["enum"]) == policies.VISIBILITY_VALUES
    names = [p for p, n in NODES.items() if p.startswith(".spec") and
             p.endswith((".name", "sessionName")) and "targetRefs" not in p]
    assert len(names) == 5
    for path in names:
        assert NODES[path]["pattern"] == policies._HEADER_NAME.pattern, path


DURATIONS_OK = ["0s", "10s", "500ms", "1m30s", "1h30m15s500ms", "99999h", "1ms1ms"]
DURATIONS_BAD = ["", "10", "s", "1.5s", "10sec", "1d", "-1s", "+1s", " 1s", "1s ", "1S",
                 "123456s", "1h1m1s1ms1s", "1h 30m", "1us", "1ns"]


def test_durations_are_gep_2257_as_the_parser_reads_them() -> None:
    paths = [p for p, n in NODES.items() if n.get("pattern") == DURATION]
    assert len(paths) == 15
    for text in DURATIONS_OK + DURATIONS_BAD:
        try:
            parse_duration(text)
            parsed = True
        except ValueError:
            parsed = False
        assert bool(re.search(DURATION, text)) is parsed is (text in DURATIONS_OK), text


def test_cidr_pattern_takes_only_what_the_parser_takes() -> None:
    pattern = re.compile(NODES[".spec.rateLimit.local.rules[].clientSelectors[]"
                               ".sourceCIDR.value"]["pattern"])
    rnd = random.Random(7)
    samples = ["::", "::1", "1::", "::/0", "0.0.0.0/0", "fe80::1/64", "1:2:3:4:5:6:7::"]
    for _ in range(300):
        v6 = ipaddress.IPv6Address(rnd.getrandbits(128) >> rnd.randrange(128) << 0)
        v4 = ipaddress.IPv4Address(rnd.getrandbits(32))
        samples += [str(v6), v6.exploded, f"{v6}/{rnd.randrange(129)}", str(v4),
                    f"{v4}/{rnd.randrange(33)}"]
    for text in samples:
        assert pattern.search(text), text
        ipaddress.ip_network(text, strict=False)
    for text in ["1:2:3:4:5:6:7:8:9", "1::2::3", "10.0.0.0/33", "256.0.0.1", "010.0.0.1",
                 ":1", "1:", "::/129", "1.2.3", "12345::", "", "10.0.0.0/"]:
        assert not pattern.search(text), text
    for _ in range(3000):  # whatever the pattern takes, the parser takes
        text = "".join(rnd.choice("0123456789abcdef::..//") for _ in range(rnd.randrange(1, 16)))
        if pattern.search(text):
            ipaddress.ip_network(text, strict=False)


def test_target_rule_is_the_parsers_list() -> None:
    target = NODES[".spec.targetRefs[]"]
    rule = target["x-kubernetes-validations"][0]["rule"]
    for group in target["properties"]["group"]["enum"]:
        for kind in target["properties"]["kind"]["enum"]:
            ref = {"group": group, "kind": kind, "name": "x"}
            assert cel_holds(rule, ref) is ((group, kind) in policies.TARGET_KINDS), ref


def test_golden_statuses_fit_the_status_schema() -> None:
    statuses = yaml.safe_load(GOLDEN_STATUS.read_text())
    found = {k: v for k, v in statuses.items() if k.startswith("TrafficPolicy.mesh.dev ")}
    assert len(found) == len(golden_policies())
    validator = Draft202012Validator(to_json_schema(NODES[".status"]))
    for key, status in found.items():
        stamped = copy.deepcopy(status)
        stamp_transitions(stamped, None, "2026-01-01T00:00:00Z")  # as the status writer does
        assert [e.message for e in validator.iter_errors(stamped)] == [], key
        assert any(c["type"] == "Accepted" for c in stamped["ancestors"][0]["conditions"])
    assert NODES[".status.ancestors"]["maxItems"] == 16
