"""A gRPC server's unix socket that no one but this user can connect to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def add_private_port(server: Any, path: Path) -> None:
    """Bind `server` (grpc.aio) to the unix socket `path`, born 0600 (a predecessor's socket
    replaced). The umask is changed around the bind alone, which does not yield to the event
    loop: changed across an `await`, it would leak into whatever runs meanwhile (another
    server's start restoring the wrong value leaves the process at 0177, and later
    directories unusable)."""
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
