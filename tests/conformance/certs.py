"""The certificates the upstream conformance suite creates at setup, as Secrets."""

from __future__ import annotations

import base64
import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def self_signed(hosts: list[str], common_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) valid for `hosts`, for a year. Each certificate
    needs its own `common_name`: a client trusting several finds issuers by subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(h) if "://" in h else x509.DNSName(h)
             for h in hosts]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def client_certificate(common_name: str, ca_pair: tuple[bytes, bytes] | None = None,
                       ) -> tuple[bytes, bytes, bytes]:
    """(CA certificate PEM, client certificate PEM, client key PEM): a client certificate
    signed by `ca_pair` (certificate, key) or by a CA of its own."""
    ca_pem, ca_key_pem = ca_pair or self_signed([], f"{common_name} CA"[-64:])
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        common_name[-64:])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca_pem, cert.public_bytes(serialization.Encoding.PEM), key_pem


def secret(namespace: str, name: str, cert: bytes, key: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"tls.crt": base64.b64encode(cert).decode(),
                     "tls.key": base64.b64encode(key).decode()}}


def tls_secret(namespace: str, name: str, hosts: list[str]) -> dict[str, Any]:
    cert, key = self_signed(hosts, f"{namespace}/{name}"[-64:])  # CN: 64 characters at most
    return secret(namespace, name, cert, key)


def client_validation_objects() -> list[dict[str, Any]]:
    """The client certificates of the frontend validation tests and ConfigMaps with their
    CAs: each CA signs one client certificate, so each ConfigMap trusts one of them."""
    infra = "gateway-conformance-infra"
    out = []
    for secret_name, config_map in (
            ("tls-validity-checks-client-certificate", "tls-validity-checks-ca-certificate"),
            ("tls-validity-checks-per-port-client-certificate",
             "tls-validity-checks-per-port-ca-certificate")):
        ca, cert, key = client_certificate(f"{infra}/{secret_name}")
        out += [secret(infra, secret_name, cert, key), _ca_config_map(infra, config_map, ca)]
    return out


def suite_secrets() -> list[dict[str, Any]]:
    infra = "gateway-conformance-infra"
    return [
        tls_secret("gateway-conformance-web-backend", "certificate", ["*"]),
        # Upstream's Go client accepts "*.org" for example.org; Python's does not, so the
        # names the tests use are listed too.
        tls_secret(infra, "tls-validity-checks-certificate",
                   ["*", "*.org", "example.org", "second-example.org", "unknown-example.org",
                    "https-listener.org", "*.wildcard.org"]),
        tls_secret(infra, "tls-passthrough-checks-certificate", ["abc.example.com"]),
        tls_secret("gateway-conformance-app-backend", "tls-passthrough-checks-certificate",
                   ["abc.example.com"]),
        tls_secret(infra, "tls-terminate-checks-certificate", ["*", "*.example.com"]),
        # Served by the TLS backends themselves (TLSRoute passthrough, BackendTLSPolicy).
        tls_secret(infra, "tls-checks-certificate",
                   ["abc.example.com", "other.example.com",
                    "spiffe://abc.example.com/test-identity"]),
    ]


def mismatch_ca_config_map() -> dict[str, Any]:
    """A valid CA that signed none of the backends' certificates."""
    cert, _ = self_signed([], "gateway-conformance-infra/mismatch-ca")
    return _ca_config_map("gateway-conformance-infra", "mismatch-ca-certificate", cert)


def backend_client_secret(ca_secret: dict[str, Any]) -> dict[str, Any]:
    """The certificate a Gateway presents to TLS backends, signed by `ca_secret`'s (the
    TLS backends' own certificate, which they trust for clients too)."""
    ca = (base64.b64decode(ca_secret["data"]["tls.crt"]),
          base64.b64decode(ca_secret["data"]["tls.key"]))
    _, cert, key = client_certificate("gateway-conformance-infra/tls-checks-client-certificate",
                                      ca)
    return secret("gateway-conformance-infra", "tls-checks-client-certificate", cert, key)


def ca_config_map(secret: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """A ConfigMap holding a secret's (self-signed) certificate as `ca.crt`."""
    return _ca_config_map(namespace, name, base64.b64decode(secret["data"]["tls.crt"]))


def _ca_config_map(namespace: str, name: str, ca_pem: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"ca.crt": ca_pem.decode()}}
