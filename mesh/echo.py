"""The project's echo backend: answers every request with a JSON description of it.

Used as the demo backend, in tests and by the conformance runner. It reads its pod name and
namespace from `POD_NAME` and `NAMESPACE`. `?delay=1s` waits before answering,
`/status/NNN` answers that status, `X-Echo-Set-Header: A:1,B:2` sets response headers, and
`?responseCode=500&succeedAfter=2&uuid=U` fails the first 2 requests carrying uuid U with
500 (to see a gateway's retries), as upstream's echo does for the retry test.

Two servers share the same description:
- `EchoServer`, HTTP/1.1 on a thread (stdlib), for in-process tests;
- `serve()`, for `mesh echo`: an ASGI app on hypercorn, HTTP/1.1 and h2c (prior knowledge)
  and WebSocket echo on every plain port; `TLSEchoServer` (HTTP/1.1 over TLS, reporting the
  SNI and the client certificate) on the TLS ports. Every request is logged (the mirror
  tests look for mirrored requests in the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
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


def _canonical(name: str) -> str:
    return "-".join(p.capitalize() for p in name.split("-"))


@dataclass
class Answer:
    status: int
    body: bytes
    headers: list[tuple[str, str]]
    delay: float = 0.0


class Attempts:
    """Requests seen per retry-simulation uuid (the most recent 10,000 uuids)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def count(self, uuid: str) -> int:
        """This request's number among those with `uuid`, from 1."""
        with self._lock:
            n = self._seen.pop(uuid, 0) + 1
            self._seen[uuid] = n
            if len(self._seen) > self._keep:
                self._seen.popitem(last=False)
            return n


def describe(identity: EchoIdentity, method: str, target: str, proto: str,
             headers: Iterable[tuple[str, str]], tls: dict[str, Any] | None = None,
             attempts: Attempts | None = None, client: str = "") -> Answer:
    """The echo's answer to a request: its JSON description and what the request asked for.
    `client`: the peer's address as the backend sees it ("ip:port")."""
    url = urlsplit(target)
    query = parse_qs(url.query)
    delay = 0.0
    if "delay" in query:
        try:
            delay = min(_duration(query["delay"][0]), 30.0)
        except ValueError:
            pass
    status = 200
    m = re.fullmatch(r"/status/(\d{3})", url.path)
    if m:
        status = int(m.group(1))
    simulated = [query.get(k, [""])[0] for k in ("responseCode", "succeedAfter", "uuid")]
    if attempts is not None and all(simulated) and simulated[0].isdigit() and \
            simulated[1].isdigit() and attempts.count(simulated[2]) <= int(simulated[1]):
        status = int(simulated[0])
    by_name: dict[str, list[str]] = {}
    host = ""
    for k, v in headers:
        if k.lower() in ("host", ":authority"):
            host = host or v
            if k.startswith(":"):
                continue
        by_name.setdefault(_canonical(k), []).append(v)
    doc: dict[str, Any] = {
        "path": target, "host": host, "method": method, "proto": proto, "headers": by_name,
        "namespace": identity.namespace, "pod": identity.pod, "service": identity.service,
        "ingress": "", "client": client,
    }
    if tls is not None:
        doc["tls"] = tls
    extra = []
    for pair in ",".join(by_name.get("X-Echo-Set-Header", [])).split(","):
        name, sep, value = pair.partition(":")
        if sep and name.strip():
            extra.append((name.strip(), value.strip()))
    body = json.dumps(doc).encode()
    # echo-basic's own line (the upstream mirror tests look for it in the pod's log).
    log.info("Echoing back request made to %s to client (%s)", target, client,
             extra={"method": method, "path": target, "host": host, "proto": proto,
                    "pod": identity.pod})
    return Answer(status, body, [("Content-Type", "application/json"),
                                 ("Content-Length", str(len(body))), *extra], delay)


# -- HTTP/1.1 on a thread, for tests ---------------------------------------------------------

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
        answer = describe(self.server.identity, self.command, self.path, self.request_version,
                          self.headers.items(), _tls_state(self.connection),
                          attempts=self.server.attempts,
                          client="{}:{}".format(*self.client_address[:2]))
        if answer.delay:
            time.sleep(answer.delay)
        self.send_response(answer.status)
        for k, v in answer.headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(answer.body)
        self.server.requests += 1

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are logged through `logging` in describe()


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, identity: EchoIdentity | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.identity = identity or EchoIdentity()
        self.attempts = Attempts()
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


class TLSEchoServer(EchoServer):
    """The echo over TLS (HTTP/1.1). It reports the SNI it was asked for and the client's
    certificate, which an ASGI server does not expose: BackendTLSPolicy tests check both."""

    def __init__(self, host: str, port: int, identity: EchoIdentity, certfile: str,
                 keyfile: str, client_ca: str | None = None) -> None:
        super().__init__(host, port, identity)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.context.set_alpn_protocols(["http/1.1"])
        if client_ca is not None:
            # Stricter than upstream's echo (which only reports what it got): the request
            # fails unless a certificate these CAs signed came.
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

        def remember_sni(sock: ssl.SSLSocket | ssl.SSLObject, name: str | None,
                         _ctx: ssl.SSLContext) -> None:
            sock.sni = name or ""  # type: ignore[union-attr]

        self.context.sni_callback = remember_sni

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs on the request's own thread, not on the accepting one.
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(conn, client_address)


def _tls_state(conn: Any) -> dict[str, Any] | None:
    if not isinstance(conn, ssl.SSLSocket):
        return None
    peer = conn.getpeercert(binary_form=True)
    return {"version": conn.version() or "", "serverName": getattr(conn, "sni", ""),
            "negotiatedProtocol": conn.selected_alpn_protocol() or "",
            "peerCertificates": [ssl.DER_cert_to_PEM_cert(peer)] if peer else []}


# -- ASGI on hypercorn, for `mesh echo` ------------------------------------------------------

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def asgi_app(identity: EchoIdentity) -> Callable[[dict[str, Any], Receive, Send],
                                                 Awaitable[None]]:
    attempts = Attempts()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await _websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        while True:  # drain the body
            message = await receive()
            if not message.get("more_body"):
                break
        target = scope.get("raw_path", scope["path"].encode()).decode(errors="replace")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode(errors="replace")
        headers = [(k.decode(), v.decode(errors="replace")) for k, v in scope["headers"]]
        peer = scope.get("client") or ("", 0)
        answer = describe(identity, scope["method"], target, f"HTTP/{scope['http_version']}",
                          headers, None, attempts, f"{peer[0]}:{peer[1]}")
        if answer.delay:
            await asyncio.sleep(answer.delay)
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in answer.headers]})
        await send({"type": "http.response.body", "body": answer.body})

    return app


async def _websocket(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        elif message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def serve(plain: list[str], tls: list[str], identity: EchoIdentity,
                certfile: str | None = None, keyfile: str | None = None,
                client_ca: str | None = None) -> None:
    """Serve the echo on `plain` (HTTP/1.1 and h2c) and `tls` (HTTPS) HOST:PORT addresses.
    With `client_ca`, TLS clients must present a certificate one of those CAs signed
    (stricter than upstream's echo, which only reports what it got: here the request fails
    unless the right certificate came)."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    tls_servers = []
    for address in tls:
        assert certfile is not None and keyfile is not None
        host, _, port = address.rpartition(":")
        tls_servers.append(TLSEchoServer(host.strip("[]"), int(port), identity, certfile,
                                         keyfile, client_ca).start())
    config = Config()
    config.bind = plain
    logging.getLogger("hpack").setLevel(logging.WARNING)  # logs every header at debug
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 60
    try:
        if plain:
            await hypercorn_serve(asgi_app(identity), config)  # type: ignore[arg-type]
        else:
            await asyncio.Event().wait()
    finally:
        for server in tls_servers:
            server.stop()
