"""Client address allow and deny lists (`envoy.filters.http.rbac`): a route that lets in only
some client ranges, or keeps some out, answers 403 to the others. Per route (RDS); the
listener's instance allows all.
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
        if not route.allowed_sources and not route.denied_sources:
            return None
        policy = rbac_config_pb2.Policy()
        policy.permissions.add(any=True)
        allowed = [_source(c, route.sources_from_forwarded_for) for c in route.allowed_sources]
        if not route.denied_sources:
            policy.principals.extend(allowed)
        else:
            denied = rbac_config_pb2.Principal(not_id=rbac_config_pb2.Principal(
                or_ids=rbac_config_pb2.Principal.Set(ids=[
                    _source(c, route.sources_from_forwarded_for)
                    for c in route.denied_sources])))
            if allowed:
                policy.principals.add(and_ids=rbac_config_pb2.Principal.Set(ids=[
                    rbac_config_pb2.Principal(or_ids=rbac_config_pb2.Principal.Set(
                        ids=allowed)), denied]))
            else:
                policy.principals.append(denied)
        rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW,
                                     policies={"allowed-sources": policy})
        return rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules))


def _source(cidr: str, forwarded_for: bool) -> rbac_config_pb2.Principal:
    """The client in a range: by default the connection's peer (direct_remote_ip), not
    X-Forwarded-For, which a client can write; `forwarded_for`: the address the connection
    manager takes from X-Forwarded-For (its last one, the load balancer's word), or the peer
    when there is none (remote_ip)."""
    net = ipaddress.ip_network(cidr, strict=False)
    block = address_pb2.CidrRange(address_prefix=str(net.network_address),
                                  prefix_len=wrappers_pb2.UInt32Value(value=net.prefixlen))
    if forwarded_for:
        return rbac_config_pb2.Principal(remote_ip=block)
    return rbac_config_pb2.Principal(direct_remote_ip=block)


RBAC = _RBAC()
