"""Global rate limits (`envoy.filters.http.ratelimit`): limits shared by every node's proxy,
decided by the node's rate limit service (mesh/ratelimit) over gRPC, counters in Redis.

Two instances of the filter, one per failure mode: when the service cannot decide in time
(`TIMEOUT`), a fail-open limit lets the request through and a fail-closed one refuses it with
503, Envoy deciding by itself within that timeout, whatever Redis does. A route's limits go
to the instance of their mode through per-route config (RDS), so the listener never changes.
The service is a static cluster of the bootstrap (`mesh.envoy.bootstrap.RATELIMIT_CLUSTER`):
Envoy checks at config time that a gRPC service's cluster is static.
"""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.config.ratelimit.v3 import rls_pb2 as rls_config_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as rl_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2

from mesh import ir
from mesh.envoy.bootstrap import RATELIMIT_CLUSTER
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.httpfilters import descriptors

DOMAIN = "mesh"
TIMEOUT = 0.05  # seconds: the decision, Redis included, or the failure mode applies


class _RateLimit:
    def __init__(self, name: str, fail_closed: bool) -> None:
        self.name = name
        self.fail_closed = fail_closed

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        cfg = rl_pb2.RateLimit(
            domain=DOMAIN, timeout=r.duration(TIMEOUT), failure_mode_deny=self.fail_closed,
            enable_x_ratelimit_headers=rl_pb2.RateLimit.DRAFT_VERSION_03,
            rate_limited_as_resource_exhausted=True,
            stat_prefix="fail_closed" if self.fail_closed else "fail_open",
            rate_limit_service=rls_config_pb2.RateLimitServiceConfig(
                transport_api_version=config_source_pb2.V3,
                grpc_service=grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                        cluster_name=RATELIMIT_CLUSTER))))
        if self.fail_closed:
            cfg.status_on_error.code = http_status_pb2.ServiceUnavailable
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(cfg)
        return f

    def route_config(self, route: ir.Route) -> rl_pb2.RateLimitPerRoute | None:
        limits = [x for x in route.rate_limits
                  if x.scope == "Global" and x.fail_closed == self.fail_closed]
        if not limits:
            return None
        out = rl_pb2.RateLimitPerRoute(domain=DOMAIN)
        for limit in limits:
            out.rate_limits.add(actions=descriptors.global_(limit))
        return out


GLOBAL_FAIL_OPEN = _RateLimit("mesh.ratelimit.fail_open", fail_closed=False)
GLOBAL_FAIL_CLOSED = _RateLimit("mesh.ratelimit.fail_closed", fail_closed=True)
