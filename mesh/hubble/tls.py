"""Mutual TLS between the relay and the agents' Observer APIs on the network (as Hubble's
peers have it): each side shows a certificate of the cluster's CA and checks the other's.

A directory holds `ca.crt`, `tls.crt` and `tls.key` (the layout of a Kubernetes TLS Secret
with its CA, as the chart mounts them). The agents share one server certificate for the name
`*.hubble.mesh.dev`; the relay asks for `NODE.hubble.mesh.dev` (a Node's name with its dots
made dashes, so that the wildcard covers it), so a certificate from another CA, or one made
for another purpose, is refused. The server's files are read again when they change (kubelet
replaces a mounted Secret's files in place): a renewed certificate needs no restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DOMAIN = "hubble.mesh.dev"
SERVER_NAME = f"*.{DOMAIN}"  # the agents' certificate's name
CLIENT_NAME = f"relay.{DOMAIN}"  # the relay's certificate's name


class TLSError(Exception):
    """The directory's files are missing or unreadable."""


@dataclass(frozen=True)
class TLSFiles:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate chain, private key), as bytes."""
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as e:
            raise TLSError(f"{self.directory}: needs ca.crt, tls.crt and tls.key: "
                           f"{e.strerror}: {e.filename}") from None


def peer_name(node: str) -> str:
    """The name the relay asks a node's agent to prove: NODE.hubble.mesh.dev, one DNS label
    for the node (the wildcard covers one)."""
    label = re.sub(r"[^a-z0-9-]", "-", node.lower()).strip("-")[:63] or "node"
    return f"{label}.{DOMAIN}"


def server_credentials(files: TLSFiles) -> Any:
    """An agent's (or the relay's) server credentials: a client certificate of the CA
    required; the files read again whenever their content changes."""
    import grpc

    ca, cert, key = files.read()
    current = [(ca, cert, key)]

    def config(ca: bytes, cert: bytes, key: bytes) -> Any:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> Any:
        # Called by gRPC at each new connection: None keeps the configuration it has.
        try:
            now = files.read()
        except TLSError as e:
            log.warning("TLS files unreadable: keeping the last ones", extra={"error": str(e)})
            return None
        if now == current[0]:
            return None
        current[0] = now
        log.info("TLS files changed: new connections use them",
                 extra={"directory": str(files.directory)})
        return config(*now)

    return grpc.dynamic_ssl_server_credentials(config(ca, cert, key), fetch,
                                               require_client_authentication=True)


def channel_credentials(files: TLSFiles) -> Any:
    """The relay's credentials towards the agents: its certificate, their CA."""
    import grpc

    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
