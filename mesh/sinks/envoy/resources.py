"""Builders for the Envoy resources this project serves, on Envoy's generated protobuf classes.

Every dynamic reference goes through ADS with `initial_fetch_timeout: 0s`, so Envoy waits for
the control plane instead of starting with a hole in its config.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
        initial_fetch_timeout=duration(0),
    )


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def typed(message: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(message)
    return a


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def eds_cluster(name: str, connect_timeout: float = 1.0) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration(connect_timeout),
    )


def lb_endpoint(host: str, port: int,
                status: int = health_check_pb2.UNKNOWN) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port)),
        health_status=status)


def load_assignment(
    cluster: str, endpoints: Iterable[tuple[str, int]],
    draining: Iterable[tuple[str, int]] = (),
) -> endpoint_pb2.ClusterLoadAssignment:
    """`draining`: endpoints the load balancer never picks, that a request may still be
    sent to by name (a session's override host)."""
    lb_endpoints = [lb_endpoint(host, port) for host, port in endpoints] + [
        lb_endpoint(host, port, health_check_pb2.DRAINING) for host, port in draining]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)],
    )


def http_listener(name: str, host: str, port: int, route_config: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_config),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=typed(router_pb2.Router()))
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=socket_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=typed(hcm))]
            )
        ],
    )


def prefix_route(
    prefix: str, cluster: str, timeout: float = 15.0, name: str = ""
) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(cluster=cluster, timeout=duration(timeout)),
    )


def regex_route(regex: str, cluster: str, timeout: float = 15.0) -> route_components_pb2.Route:
    from envoy.type.matcher.v3 import regex_pb2

    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(
            safe_regex=regex_pb2.RegexMatcher(regex=regex)
        ),
        route=route_components_pb2.RouteAction(cluster=cluster, timeout=duration(timeout)),
    )


def direct_response_route(prefix: str, status: int, body: str) -> route_components_pb2.Route:
    from envoy.config.core.v3 import base_pb2

    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        direct_response=route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body)
        ),
    )


def virtual_host(
    name: str, domains: Sequence[str], routes: Sequence[route_components_pb2.Route]
) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))


def route_configuration(
    name: str, virtual_hosts: Sequence[route_components_pb2.VirtualHost]
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(virtual_hosts))
