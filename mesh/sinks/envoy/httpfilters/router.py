"""The router (`envoy.filters.http.router`): always last; it forwards by the route's action,
so it has no per-route config of its own."""

from __future__ import annotations

from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from mesh import ir


class _Router:
    name = "envoy.filters.http.router"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(router_pb2.Router())
        return f

    def route_config(self, route: ir.Route) -> Message | None:
        return None


ROUTER = _Router()
