"""Where a local server listens: the xDS server, Envoy's admin API, the rate limit service.

Its own module, apart from the xDS server, so that the agent's other servers and Envoy's
bootstrap name an address without importing gRPC and Envoy's protos.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ListenAddress:
    """A local-only address: `unix:/path` or a loopback `host:port`."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        if text.startswith("unix:"):
            path = text.removeprefix("unix:").removeprefix("//")
            if not path.startswith("/"):
                raise ValueError(f"unix socket path must be absolute: {text!r}")
            return cls(unix_path=Path(path))
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected unix:/path or HOST:PORT, got {text!r}")
        host = host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"refusing to listen on non-loopback address {host!r}")
        return cls(host=host, port=int(port))

    def grpc_target(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.grpc_target()
