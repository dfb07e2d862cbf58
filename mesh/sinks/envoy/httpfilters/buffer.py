"""Request body size limits (`envoy.filters.http.buffer`): ingress-nginx's proxy-body-size.
A route with a limit has its request bodies read whole before they go on (nginx buffers
them too, by default); a larger body answers 413. The listener's instance is disabled.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh import ir


class _Buffer:
    name = "envoy.filters.http.buffer"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name, disabled=True)
        f.typed_config.Pack(buffer_pb2.Buffer(max_request_bytes={"value": 1}))
        return f

    def route_config(self, route: ir.Route) -> rc.FilterConfig | None:
        if route.max_request_bytes is None:
            return None
        cfg = buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(
            max_request_bytes={"value": route.max_request_bytes}))
        out = rc.FilterConfig()
        out.config.Pack(cfg)
        return out


BUFFER = _Buffer()
