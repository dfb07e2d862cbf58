"""Listeners (LDS): one per address and port; filter chains by SNI for TLS; the HTTP
connection manager (routes by RDS, the fixed HTTP filter list) or a TCP proxy."""

from __future__ import annotations

import re

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from mesh import ir
from mesh.envoy.bootstrap import ACCESSLOG_CLUSTER
from mesh.sinks.envoy import httpfilters
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.routes import INVALID_BACKEND
from mesh.sinks.envoy.secrets import sds

# The mesh listener's access log (Envoy's stdout, which the agent keeps in envoy.log): who
# called which Service, as Envoy saw it.
MESH_ACCESS_LOG = (
    '{"mesh": "%FILTER_CHAIN_NAME%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%", '
    '"destination": "%DOWNSTREAM_LOCAL_ADDRESS%", "method": "%REQ(:METHOD)%", '
    '"path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "status": "%RESPONSE_CODE%", '
    '"upstream": "%UPSTREAM_HOST%", "duration_ms": "%DURATION%"}\n')


def mesh_access_log() -> accesslog_pb2.AccessLog:
    out = stream_pb2.StdoutAccessLog(log_format=substitution_format_string_pb2.
                                     SubstitutionFormatString(
                                         text_format_source=base_pb2.DataSource(
                                             inline_string=MESH_ACCESS_LOG)))
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout")
    log.typed_config.Pack(out)
    return log


def flow_access_log() -> accesslog_pb2.AccessLog:
    """Every request, to the agent's access log service (mesh/flows/accesslog.py): the L7
    flows. Flushed every 100 ms, so a flow is at most that stale; while the agent is away,
    Envoy buffers up to 16 KiB of entries and drops the rest (counted in its stats)."""
    grpc_log = als_pb2.HttpGrpcAccessLogConfig(common_config=als_pb2.CommonGrpcAccessLogConfig(
        log_name="mesh-flows", transport_api_version=config_source_pb2.V3,
        buffer_flush_interval=duration_pb2.Duration(nanos=100_000_000)))
    grpc_log.common_config.grpc_service.envoy_grpc.cluster_name = ACCESSLOG_CLUSTER
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc")
    log.typed_config.Pack(grpc_log)
    return log


def _hcm(table: str, stat_prefix: str, access_log: bool = False,
         edge_hops: int | None = None) -> listener_components_pb2.Filter:
    """`edge_hops`: a listener clients reach from outside (a Gateway's, an Ingress's). Envoy
    then takes the client's address from the connection (or from X-Forwarded-For behind that
    many trusted proxies) and appends it to X-Forwarded-For for the backend; otherwise the
    client address that rate limits and hashing use would be the last X-Forwarded-For entry,
    which any client can write."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=r.ads_source(), route_config_name=table),
        http_filters=httpfilters.listener_filters(),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED,
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(
            upgrade_type="websocket", enabled=wrappers_pb2.BoolValue(value=False))],
    )
    if edge_hops is not None:
        hcm.use_remote_address.value = True
        hcm.xff_num_trusted_hops = edge_hops
    if access_log:
        hcm.access_log.append(mesh_access_log())
    hcm.access_log.append(flow_access_log())
    f = listener_components_pb2.Filter(name=r.HCM_FILTER)
    f.typed_config.Pack(hcm)
    return f


def _downstream_tls(certs: tuple[str, ...], alpn: list[str],
                    validation: ir.ClientValidation | None = None) -> base_pb2.TransportSocket:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        alpn_protocols=alpn, tls_certificate_sds_secret_configs=[sds(c) for c in certs]))
    if validation is not None:
        # The CAs come by SDS, so a CA change does not drain the listener.
        combined = ctx.common_tls_context.combined_validation_context
        combined.validation_context_sds_secret_config.CopyFrom(sds(validation.trust_bundle))
        combined.default_validation_context.SetInParent()
        if validation.allow_insecure:
            combined.default_validation_context.trust_chain_verification = \
                common_pb2.CertificateValidationContext.ACCEPT_UNTRUSTED
        else:
            ctx.require_client_certificate.value = True
    ts = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    ts.typed_config.Pack(ctx)
    return ts


def _tcp_proxy(chain: ir.FilterChain) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=_stat(chain.name))
    live = [b for b in chain.tcp_backends if b.weight > 0]
    if len(live) == 1:
        proxy.cluster = live[0].backend or INVALID_BACKEND
    else:
        for b in live:
            proxy.weighted_clusters.clusters.add(name=b.backend or INVALID_BACKEND,
                                                 weight=b.weight)
    f = listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy")
    f.typed_config.Pack(proxy)
    return f


def _stat(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _mesh_listener(li: ir.Listener) -> listener_pb2.Listener:
    """The transparent listener the datapath hands Service connections to: one chain per
    Service port by the connection's original destination (a consumer route's chain also
    by the client pods' addresses: the more specific match wins)."""
    out = listener_pb2.Listener(name=li.name, address=r.socket_address(li.address, li.port),
                                transparent=wrappers_pb2.BoolValue(value=True))
    for chain in li.chains:
        assert chain.destination is not None
        fc = out.filter_chains.add(name=chain.name)
        address, port = chain.destination
        match = fc.filter_chain_match
        match.destination_port.value = port
        match.prefix_ranges.add(address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(
            value=32))
        for source in chain.source_ranges:
            prefix, _, length = source.partition("/")
            match.source_prefix_ranges.add(address_prefix=prefix, prefix_len=wrappers_pb2.
                                           UInt32Value(value=int(length or 32)))
        if chain.route_table is not None:
            fc.filters.append(_hcm(chain.route_table, _stat(chain.name), access_log=True))
        else:
            fc.filters.append(_tcp_proxy(chain))
    return out


def listener(li: ir.Listener) -> listener_pb2.Listener:
    if li.transparent:
        return _mesh_listener(li)
    out = listener_pb2.Listener(name=li.name, address=r.socket_address(li.address, li.port))
    tls = li.protocol in ("HTTPS", "TLS")
    if tls:
        inspector = out.listener_filters.add(name="envoy.filters.listener.tls_inspector")
        inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    claimed: set[str] = set()
    catch_all = False
    for chain in li.chains:
        names = [n for n in chain.server_names if n not in claimed]
        if (chain.server_names and not names) or (not chain.server_names and catch_all):
            continue  # what it would match is served by an earlier chain
        claimed.update(names)
        catch_all = catch_all or not chain.server_names
        fc = out.filter_chains.add(name=chain.name)
        if tls:
            fc.filter_chain_match.server_names.extend(names)
        if chain.certificates:
            alpn = ["h2", "http/1.1"] if chain.route_table else []
            fc.transport_socket.CopyFrom(_downstream_tls(chain.certificates, alpn,
                                                         chain.client_validation))
        if chain.route_table is not None:
            fc.filters.append(_hcm(chain.route_table, _stat(chain.route_table),
                                   edge_hops=li.trusted_proxy_hops))
        else:
            fc.filters.append(_tcp_proxy(chain))
    if not out.filter_chains:
        # Nothing attached yet: close connections rather than leave the listener chainless.
        fc = out.filter_chains.add(name="empty")
        fc.filters.append(_tcp_proxy(ir.FilterChain(
            "empty", tcp_backends=(ir.WeightedBackend(None, 1),))))
    return out
