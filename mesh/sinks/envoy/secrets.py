"""Secrets (SDS): certificates Envoy presents, CA bundles it validates clients with."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from mesh import ir


def certificate(cert: ir.Certificate) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=cert.name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=cert.key_pem)))


def trust_bundle(bundle: ir.TrustBundle) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=bundle.name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.ca_pem)))


def sds(name: str) -> secret_pb2.SdsSecretConfig:
    """A reference to a secret served over ADS."""
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3))
