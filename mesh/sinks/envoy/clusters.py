"""Clusters: one per IR backend (an EDS cluster), with upstream HTTP/2 and TLS as asked."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2, socket_option_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
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


def cluster(b: ir.Backend) -> cluster_pb2.Cluster:
    c = r.eds_cluster(b.name, connect_timeout=2.0)
    bind = c.upstream_bind_config
    bind.source_address.address, bind.source_address.port_value = "0.0.0.0", 0
    bind.socket_options.add(level=_SOL_SOCKET, name=_SO_MARK, int_value=MARK_FROM_PROXY,
                            state=socket_option_pb2.SocketOption.STATE_PREBIND)
    # Above Envoy's default of 1024 pending/active requests per cluster: one node Envoy
    # serves every pod on the node.
    c.circuit_breakers.thresholds.add(
        max_connections=wrappers_pb2.UInt32Value(value=100_000),
        max_pending_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_requests=wrappers_pb2.UInt32Value(value=100_000))
    if b.protocol == "h2c" or (b.tls is not None and b.protocol != "http1"):
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
        c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    if b.tls is not None:
        c.transport_socket.name = "envoy.transport_sockets.tls"
        c.transport_socket.typed_config.Pack(_upstream_tls(b.tls))
    return c


def _upstream_tls(tls: ir.UpstreamTLS) -> tls_pb2.UpstreamTlsContext:
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
