"""Clusters: one per IR backend (an EDS cluster), with upstream HTTP/2 and TLS as asked."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2, socket_option_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_pb2
from google.protobuf import wrappers_pb2

from mesh import ir
from mesh.sinks.envoy import resources as r
from mesh.sinks.envoy.secrets import sds

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
# Envoy's upstream sockets carry this mark (SO_MARK), so that nothing of the datapath takes
# Envoy's own connections for a pod's and hands them to Envoy again (bpf/lib/common.h's
# MESH_MARK_FROM_PROXY; the redirect's policy route matches MESH_MARK_TO_PROXY only).
MARK_FROM_PROXY = 0xB00
_SOL_SOCKET, _SO_MARK = 1, 36


# Above Envoy's default of 1,024 connections / pending / active requests per cluster: one
# node Envoy serves every pod on the node.
DEFAULT_LIMIT = 100_000
_LB = {"RoundRobin": cluster_pb2.Cluster.ROUND_ROBIN,
       "LeastRequest": cluster_pb2.Cluster.LEAST_REQUEST,
       "Random": cluster_pb2.Cluster.RANDOM}


def _u32(n: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=n)


def cluster(b: ir.Backend) -> cluster_pb2.Cluster:
    s = b.settings
    c = r.eds_cluster(b.name, connect_timeout=s.connect_timeout or 2.0)
    bind = c.upstream_bind_config
    bind.source_address.address, bind.source_address.port_value = "0.0.0.0", 0
    bind.socket_options.add(level=_SOL_SOCKET, name=_SO_MARK, int_value=MARK_FROM_PROXY,
                            state=socket_option_pb2.SocketOption.STATE_PREBIND)
    _circuit_breakers(c, s.circuit_breaker or ir.CircuitBreaker())
    if s.outlier_detection is not None:
        _outlier_detection(c, s.outlier_detection)
    if s.health_check is not None:
        _health_check(c, s.health_check, b.protocol)
    _load_balancer(c, s.load_balancer or ir.LoadBalancer())
    if b.sticky_endpoints:
        # They come as DRAINING (resources.load_assignment): never picked by the load
        # balancer, nor counted towards its panic threshold, but a session's override host
        # (stateful_session) may name them.
        c.common_lb_config.override_host_status.statuses.extend([
            health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED,
            health_check_pb2.DRAINING])
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    if b.protocol == "h2c" or (b.tls is not None and b.protocol != "http1"):
        opts.explicit_http_config.http2_protocol_options.SetInParent()
    common = opts.common_http_protocol_options
    if s.idle_timeout is not None:
        common.idle_timeout.CopyFrom(r.duration(s.idle_timeout))
    if s.max_connection_duration is not None:
        common.max_connection_duration.CopyFrom(r.duration(s.max_connection_duration))
    cb = s.circuit_breaker
    if cb is not None and cb.max_requests_per_connection is not None:
        common.max_requests_per_connection.value = cb.max_requests_per_connection
    if opts.ByteSize():
        c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    if b.tls is not None:
        c.transport_socket.name = "envoy.transport_sockets.tls"
        c.transport_socket.typed_config.Pack(_upstream_tls(b.tls))
    return c


def _circuit_breakers(c: cluster_pb2.Cluster, cb: ir.CircuitBreaker) -> None:
    t = c.circuit_breakers.thresholds.add(
        max_connections=_u32(cb.max_connections or DEFAULT_LIMIT),
        max_pending_requests=_u32(DEFAULT_LIMIT if cb.max_pending_requests is None
                                  else cb.max_pending_requests),
        max_requests=_u32(cb.max_requests or DEFAULT_LIMIT))
    if cb.max_retries is not None:
        t.max_retries.value = cb.max_retries
    if cb.retry_budget_percent is not None:
        t.retry_budget.budget_percent.value = cb.retry_budget_percent
        if cb.retry_budget_min_concurrency is not None:
            t.retry_budget.min_retry_concurrency.value = cb.retry_budget_min_concurrency
    if cb.max_connections_per_endpoint is not None:
        c.circuit_breakers.per_host_thresholds.add(
            max_connections=_u32(cb.max_connections_per_endpoint))


def _outlier_detection(c: cluster_pb2.Cluster, o: ir.OutlierDetection) -> None:
    od = c.outlier_detection
    od.interval.CopyFrom(r.duration(o.interval))
    od.base_ejection_time.CopyFrom(r.duration(o.base_ejection_time))
    od.max_ejection_percent.value = o.max_ejection_percent
    # Each detector is on only where asked (Envoy's defaults turn them all on at 100%).
    od.enforcing_consecutive_5xx.value = 100 if o.consecutive_5xx else 0
    if o.consecutive_5xx:
        od.consecutive_5xx.value = o.consecutive_5xx
    od.enforcing_consecutive_gateway_failure.value = 100 if o.consecutive_gateway_errors else 0
    if o.consecutive_gateway_errors:
        od.consecutive_gateway_failure.value = o.consecutive_gateway_errors
    od.enforcing_success_rate.value = 0
    od.split_external_local_origin_errors = o.split_local_origin_errors
    if o.consecutive_local_origin_failures:
        od.consecutive_local_origin_failure.value = o.consecutive_local_origin_failures
        od.enforcing_consecutive_local_origin_failure.value = 100


def _health_check(c: cluster_pb2.Cluster, h: ir.HealthCheck, protocol: str) -> None:
    hc = c.health_checks.add(timeout=r.duration(h.timeout), interval=r.duration(h.interval),
                             unhealthy_threshold=_u32(h.unhealthy_threshold),
                             healthy_threshold=_u32(h.healthy_threshold))
    # A new endpoint is checked before it takes traffic, but not left waiting a full interval.
    hc.no_traffic_interval.CopyFrom(r.duration(min(h.interval, 1.0)))
    if h.type == "HTTP":
        http = hc.http_health_check
        http.path = h.path
        http.host = h.host or ""
        http.method = getattr(base_pb2.RequestMethod, h.method)
        if protocol == "h2c":
            http.codec_client_type = http_pb2.HTTP2
        for code in h.expected_statuses:
            http.expected_statuses.add(start=code, end=code + 1)
    elif h.type == "GRPC":
        hc.grpc_health_check.service_name = h.grpc_service
    else:
        tcp = hc.tcp_health_check
        if h.send:
            tcp.send.text = h.send.hex()
        if h.receive:
            tcp.receive.add(text=h.receive.hex())


def _load_balancer(c: cluster_pb2.Cluster, lb: ir.LoadBalancer) -> None:
    if lb.type == "ConsistentHash":
        if lb.hash_algorithm == "RingHash":
            c.lb_policy = cluster_pb2.Cluster.RING_HASH
            if lb.table_size:
                c.ring_hash_lb_config.minimum_ring_size.value = lb.table_size
        else:
            c.lb_policy = cluster_pb2.Cluster.MAGLEV
            if lb.table_size:
                c.maglev_lb_config.table_size.value = lb.table_size
        return
    c.lb_policy = _LB[lb.type]
    if lb.slow_start_window:
        window = r.duration(lb.slow_start_window)
        if lb.type == "RoundRobin":
            c.round_robin_lb_config.slow_start_config.slow_start_window.CopyFrom(window)
        elif lb.type == "LeastRequest":
            c.least_request_lb_config.slow_start_config.slow_start_window.CopyFrom(window)


def _upstream_tls(tls: ir.UpstreamTLS) -> tls_pb2.UpstreamTlsContext:
    if not tls.verify:
        # Encrypted, the backend's certificate not checked (ingress-nginx's backend-protocol
        # HTTPS): said so in the annotation table.
        ctx = tls_pb2.UpstreamTlsContext(sni=tls.sni)
        if tls.client_cert is not None:
            ctx.common_tls_context.tls_certificate_sds_secret_configs.append(sds(tls.client_cert))
        return ctx
    validation = common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=tls.ca_pem) if tls.ca_pem
        else base_pb2.DataSource(filename=SYSTEM_CA))
    sans = tls.subject_alt_names or (("Hostname", tls.sni),)
    for kind, value in sans:
        validation.match_typed_subject_alt_names.add(
            san_type=common_pb2.SubjectAltNameMatcher.URI if kind == "URI"
            else common_pb2.SubjectAltNameMatcher.DNS,
            matcher=string_pb2.StringMatcher(exact=value))
    ctx = tls_pb2.UpstreamTlsContext(
        sni=tls.sni, common_tls_context=tls_pb2.CommonTlsContext(validation_context=validation))
    if tls.client_cert is not None:
        ctx.common_tls_context.tls_certificate_sds_secret_configs.append(sds(tls.client_cert))
    return ctx
