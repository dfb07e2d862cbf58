"""The certificates the upstream conformance suite creates at setup, as Secrets."""

from __future__ import annotations

import base64
import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(hosts: list[str], common_name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) valid for `hosts`, for a year. Each certificate
    needs its own `common_name`: a client trusting several finds issuers by subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def tls_secret(namespace: str, name: str, hosts: list[str]) -> dict[str, Any]:
    cert, key = self_signed(hosts, f"{namespace}/{name}"[-64:])  # CN: 64 characters at most
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"tls.crt": base64.b64encode(cert).decode(),
                     "tls.key": base64.b64encode(key).decode()}}


def suite_secrets() -> list[dict[str, Any]]:
    infra = "gateway-conformance-infra"
    return [
        tls_secret("gateway-conformance-web-backend", "certificate", ["*"]),
        # Upstream's Go client accepts "*.org" for example.org; Python's does not, so the
        # names the tests use are listed too.
        tls_secret(infra, "tls-validity-checks-certificate",
                   ["*", "*.org", "example.org", "second-example.org", "unknown-example.org",
                    "*.wildcard.org"]),
        tls_secret(infra, "tls-passthrough-checks-certificate", ["abc.example.com"]),
        tls_secret("gateway-conformance-app-backend", "tls-passthrough-checks-certificate",
                   ["abc.example.com"]),
        tls_secret(infra, "tls-terminate-checks-certificate", ["*", "*.example.com"]),
        # Served by the TLS backends themselves (TLSRoute passthrough, BackendTLSPolicy).
        tls_secret(infra, "tls-checks-certificate",
                   ["abc.example.com", "other.example.com", "*.example.com"]),
    ]


def ca_config_map(secret: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """A ConfigMap holding a secret's (self-signed) certificate as `ca.crt`."""
    pem = base64.b64decode(secret["data"]["tls.crt"]).decode()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace}, "data": {"ca.crt": pem}}
