"""Client address allow lists (`envoy.filters.http.rbac`): a route that lets in only some
client ranges answers 403 to the others. Per route (RDS); the listener's instance allows all.
"""

from __future__ import annotations

import ipaddress

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import wrappers_pb2

from mesh import ir


class _RBAC:
    name = "envoy.filters.http.rbac"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(rbac_pb2.RBAC())  # no rules: every request passes
        return f

    def route_config(self, route: ir.Route) -> rbac_pb2.RBACPerRoute | None:
        if not route.allowed_sources:
            return None
        policy = rbac_config_pb2.Policy()
        policy.permissions.add(any=True)
        for cidr in route.allowed_sources:
            net = ipaddress.ip_network(cidr, strict=False)
            # The connection's peer (direct_remote_ip), not X-Forwarded-For, which a client
            # can write.
            policy.principals.add(direct_remote_ip=address_pb2.CidrRange(
                address_prefix=str(net.network_address),
                prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen)))
        rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW,
                                     policies={"allowed-sources": policy})
        return rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules))


RBAC = _RBAC()
