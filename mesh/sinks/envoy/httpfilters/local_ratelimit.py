"""Local rate limits (`envoy.filters.http.local_ratelimit`): token buckets in this node's
proxy, per route, from the route's per-filter config (RDS): a limit changes without touching
a listener.

Each limit is one descriptor: the policy rule's id, then what it counts by (a header's value,
a header match, the client's address or range). A limit counted per value ("Distinct") is a
dynamic descriptor: Envoy keeps a bucket per value seen, up to `MAX_DYNAMIC` (least recently
used first out). Shadow limits go to a second instance of the filter that is never enforced:
it counts and reports (its stats), and lets every request through.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import wrappers_pb2

from mesh import ir
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.httpfilters import descriptors

MAX_DYNAMIC = 10_000  # buckets per route for limits counted per value
_UNLIMITED = 2**32 - 1


def _percent(n: int) -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(default_value=percent_pb2.FractionalPercent(
        numerator=n, denominator=percent_pb2.FractionalPercent.HUNDRED))


class _LocalRateLimit:
    def __init__(self, name: str, shadow: bool) -> None:
        self.name = name
        self.shadow = shadow

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        # No bucket here: only routes with a limit (their per-route config) are limited.
        f.typed_config.Pack(lrl_pb2.LocalRateLimit(stat_prefix=_stat(self.shadow)))
        return f

    def route_config(self, route: ir.Route) -> lrl_pb2.LocalRateLimit | None:
        limits = [x for x in route.rate_limits if x.scope == "Local" and x.shadow == self.shadow]
        if not limits:
            return None
        enforced = 0 if self.shadow else 100
        cfg = lrl_pb2.LocalRateLimit(
            stat_prefix=_stat(self.shadow),
            status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
            filter_enabled=_percent(100), filter_enforced=_percent(enforced),
            enable_x_ratelimit_headers=common_pb2.DRAFT_VERSION_03,
            rate_limited_as_resource_exhausted=True,
            # Envoy wants a default bucket: requests that match none of the limits' descriptors
            # draw from it, and it never runs dry.
            token_bucket=token_bucket_pb2.TokenBucket(
                max_tokens=_UNLIMITED, tokens_per_fill=wrappers_pb2.UInt32Value(value=_UNLIMITED),
                fill_interval=r.duration(1)))
        cfg.always_consume_default_token_bucket.value = False
        dynamic = False
        for limit in limits:
            actions, entries = descriptors.local(limit)
            dynamic = dynamic or any(not e.value for e in entries)
            cfg.rate_limits.append(rc.RateLimit(actions=actions))
            cfg.descriptors.append(common_pb2.LocalRateLimitDescriptor(
                entries=entries, token_bucket=token_bucket_pb2.TokenBucket(
                    max_tokens=limit.burst or limit.requests,
                    tokens_per_fill=wrappers_pb2.UInt32Value(value=limit.requests),
                    fill_interval=r.duration(limit.seconds))))
        if dynamic:
            cfg.max_dynamic_descriptors.value = MAX_DYNAMIC
        # A refused client may come back once a fill is due: at most the limit's unit.
        retry_after = min(x.seconds for x in limits)
        cfg.response_headers_to_add.add(
            header=base_pb2.HeaderValue(key="retry-after", value=str(retry_after)),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        return cfg


def _stat(shadow: bool) -> str:
    return "local_rate_limit_shadow" if shadow else "local_rate_limit"


LOCAL = _LocalRateLimit("mesh.local_ratelimit", shadow=False)
LOCAL_SHADOW = _LocalRateLimit("mesh.local_ratelimit.shadow", shadow=True)
