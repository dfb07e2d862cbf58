"""The project's echo backend: answers every request with a JSON description of it.

Used as the demo backend, in tests and (later) by the conformance runner. It reads its pod
name and namespace from `POD_NAME` and `NAMESPACE`. `?delay=1s` waits before answering,
`/status/NNN` answers that status, `X-Echo-Set-Header: A:1,B:2` sets response headers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EchoIdentity:
    pod: str = field(default_factory=lambda: os.environ.get("POD_NAME", "echo"))
    namespace: str = field(default_factory=lambda: os.environ.get("NAMESPACE", "default"))
    service: str = ""


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", text)
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


class _Handler(BaseHTTPRequestHandler):
    server: EchoServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the peer's
    # delayed ACK (40 ms a request).
    disable_nagle_algorithm = True

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if "delay" in query:
            time.sleep(min(_duration(query["delay"][0]), 30.0))
        status = 200
        m = re.fullmatch(r"/status/(\d{3})", url.path)
        if m:
            status = int(m.group(1))
        headers: dict[str, list[str]] = {}
        for k, v in self.headers.items():
            headers.setdefault("-".join(p.capitalize() for p in k.split("-")), []).append(v)
        ident = self.server.identity
        doc = {
            "path": self.path,
            "host": self.headers.get("Host", ""),
            "method": self.command,
            "proto": self.request_version,
            "headers": headers,
            "namespace": ident.namespace,
            "pod": ident.pod,
            "service": ident.service,
            "ingress": "",
        }
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for pair in self.headers.get("X-Echo-Set-Header", "").split(","):
            name, sep, value = pair.partition(":")
            if sep and name.strip():
                self.send_header(name.strip(), value.strip())
        self.end_headers()
        self.wfile.write(body)
        self.server.requests += 1
        log.debug("echo", extra={"method": self.command, "path": self.path, "pod": ident.pod})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are logged through `logging` above


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, identity: EchoIdentity | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.identity = identity or EchoIdentity()
        self.requests = 0
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> EchoServer:
        self._thread = threading.Thread(target=self.serve_forever, name="echo", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
