"""A small client for Envoy's admin interface on a unix socket or loopback address."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from meshxds.address import ListenAddress


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class EnvoyAdmin:
    def __init__(self, address: ListenAddress, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.unix_path is not None:
            return _UnixHTTPConnection(str(self.address.unix_path), self.timeout)
        host, port = self.address.host, self.address.port
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def request(self, method: str, path: str) -> tuple[int, str]:
        conn = self._connection()
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def get(self, path: str) -> str:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"envoy admin {path}: HTTP {status}: {body[:200]}")
        return body

    def ready(self) -> bool:
        try:
            return self.request("GET", "/ready")[0] == 200
        except OSError:
            return False

    def server_info(self) -> dict[str, Any]:
        """Envoy's /server_info: its state, node, command line options."""
        result: dict[str, Any] = json.loads(self.get("/server_info"))
        return result

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges by name (histograms and text readouts left out)."""
        body = self.get("/stats?format=json" + (f"&filter={prefix}" if prefix else ""))
        out = {}
        for s in json.loads(body).get("stats", []):
            if isinstance(s.get("value"), int):
                out[s["name"]] = s["value"]
        return out

    def config_dump(self, resource: str = "") -> dict[str, Any]:
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        result: dict[str, Any] = json.loads(self.get(path))
        return result
