"""One conformance case: make the request, judge the answer the way the upstream suite does.

A case passes when it passes three times in a row within 30 seconds. For a 200 the echoed
request is compared (path with query, method, headers joined with ",", absent headers, the
namespace, the pod name's prefix); for a redirect the Location header is parsed and compared.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

CONSECUTIVE = 3
MAX_TIME = 30.0


@dataclass
class Outcome:
    passed: bool
    detail: str = ""


def _host_header(address: str, port: int, scheme: str = "http") -> str:
    if (scheme, port) in (("http", 80), ("https", 443)):
        return address
    return f"{address}:{port}"


class _SNIConnection(http.client.HTTPSConnection):
    """HTTPS to an address, with the server name (SNI, verification) of the case."""

    def __init__(self, address: str, port: int, server_name: str, context: ssl.SSLContext,
                 timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name, self._ctx = server_name, context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


def tls_context(trusted_pem: bytes, client: tuple[Path, Path] | None = None,
                ) -> ssl.SSLContext:
    """Trusting `trusted_pem`; with `client` (certificate file, key file) presenting
    that client certificate."""
    ctx = ssl.create_default_context(cadata=trusted_pem.decode())
    ctx.set_alpn_protocols(["http/1.1"])
    if client is not None:
        ctx.load_cert_chain(*client)
    return ctx


def roundtrip(address: str, port: int, case: dict[str, Any], timeout: float = 10.0,
              tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    req = case.get("Request") or {}
    conn: http.client.HTTPConnection
    if tls is not None:
        server_name = str(case.get("tlsServerName") or req.get("Host") or address).strip('"')
        conn = _SNIConnection(address, port, server_name, tls, timeout)
    else:
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
    scheme = "https" if tls is not None else "http"
    headers = {"Host": req.get("Host") or _host_header(address, port, scheme)}
    for name, value in (req.get("Headers") or {}).items():
        headers[name] = value
    set_headers = case.get("BackendSetResponseHeaders") or {}
    headers["X-Echo-Set-Header"] = ",".join(f"{k}:{v}" for k, v in set_headers.items())
    try:
        conn.request(req.get("Method") or "GET", req.get("Path") or "/", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        got: dict[str, list[str]] = {}
        for k, v in resp.getheaders():
            got.setdefault(k.lower(), []).append(v)
        return resp.status, got, body
    finally:
        conn.close()


def compare(case: dict[str, Any], status: int, headers: dict[str, list[str]], body: bytes,
            scheme: str = "http") -> str | None:
    """None when the answer is what the case expects, else why not."""
    req = case.get("Request") or {}
    expected_resp = case.get("Response") or {}
    if case.get("ExpectFailure"):
        # Upstream's expected failures: any answer but 200, 408 and 504.
        return f"expected a failure, got {status}" if status in (200, 408, 504) else None
    codes = expected_resp.get("StatusCodes") or [expected_resp.get("StatusCode") or 200]
    if status not in codes:
        return f"expected status {codes}, got {status}"
    for name, allowed in (expected_resp.get("ValidHeaderValues") or {}).items():
        actual = ",".join(headers.get(name.lower(), []))
        if expected_resp.get("IgnoreWhitespace"):
            actual = " ".join(actual.split())
            allowed = [" ".join(a.split()) for a in allowed]
        if actual not in allowed:
            return f"expected response header {name} in {allowed}, got {actual!r}"
    # A case that names no namespace is answered by the gateway itself (a CORS preflight):
    # there is no echo to compare.
    answered_by_gateway = not case.get("Namespace") and not case.get("Backend")
    if status == 200:
        for name in expected_resp.get("AbsentHeaders") or []:
            if name.lower() in headers:
                return f"response header {name} should be absent"
    if status == 200 and answered_by_gateway:
        for name, value in (expected_resp.get("Headers") or {}).items():
            if ",".join(headers.get(name.lower(), [])) != value:
                return f"expected response header {name}={value}"
    elif status == 200:
        try:
            echo = json.loads(body)
        except ValueError:
            return f"the answer is not the echo's JSON: {body[:100]!r}"
        exp = case.get("ExpectedRequest") or {"Request": req}
        ereq = exp.get("Request") or {}
        echoed = {k.lower(): v for k, v in (echo.get("headers") or {}).items()}
        if ereq.get("Host") and ereq["Host"] != echo.get("host"):
            return f"expected host {ereq['Host']}, got {echo.get('host')}"
        if (ereq.get("Path") or "") != echo.get("path"):
            return f"expected path {ereq.get('Path')!r}, got {echo.get('path')!r}"
        if (ereq.get("Method") or "GET") != echo.get("method"):
            return f"expected method {ereq.get('Method') or 'GET'}, got {echo.get('method')}"
        sni = ereq.get("SNI")
        if sni and (echo.get("tls") or {}).get("serverName") != sni:
            return f"expected the backend to see SNI {sni}, it saw " \
                f"{(echo.get('tls') or {}).get('serverName')!r}"
        if case.get("Namespace", "") != echo.get("namespace"):
            return f"expected namespace {case.get('Namespace')}, got {echo.get('namespace')}"
        problem = headers_problem("request", ereq.get("Headers") or {}, echoed) or \
            headers_problem("response", expected_resp.get("Headers") or {}, headers)
        if problem:
            return problem
        for name in exp.get("AbsentHeaders") or []:
            if name.lower() in echoed:
                return f"request header {name} should be absent"
        backend = case.get("Backend") or ""
        if not str(echo.get("pod", "")).startswith(backend):
            return f"expected a pod of {backend}, got {echo.get('pod')}"
    elif status in (301, 302, 303, 307, 308):
        redirect = case.get("RedirectRequest")
        if redirect is None:
            return None
        location = (headers.get("location") or [""])[0]
        u = urlsplit(location)
        host, port = u.hostname or "", str(u.port or "")
        want_host = redirect.get("Host") or host
        if want_host != host:
            return f"expected redirect host {want_host!r}, got {host!r} ({location})"
        want_port = redirect.get("Port") or ""
        got_scheme = u.scheme
        if want_port:
            if want_port != port:
                return f"expected redirect port {want_port!r}, got {port!r} ({location})"
        elif (got_scheme == "http" and port not in ("", "80")) or (
                got_scheme == "https" and port not in ("", "443")):
            return f"expected no or the scheme's default port, got {port!r} ({location})"
        want_scheme = redirect.get("Scheme") or scheme
        if want_scheme != got_scheme:
            return f"expected redirect scheme {want_scheme!r}, got {got_scheme!r} ({location})"
        want_path = redirect.get("Path") or (req.get("Path") or "/").split("?")[0]
        if want_path != u.path:
            return f"expected redirect path {want_path!r}, got {u.path!r} ({location})"
    return None


def headers_problem(what: str, expected: dict[str, str],
                     actual: dict[str, list[str]]) -> str | None:
    """Each expected header present with that value (repeated values joined with ",")."""
    for name, value in expected.items():
        got = actual.get(name.lower())
        if got is None:
            return f"expected {what} header {name}"
        if ",".join(got) != value:
            return f"expected {what} header {name}={value}, got {','.join(got)}"
    return None


def consistently(attempt: Callable[[], str | None], max_time: float = MAX_TIME) -> Outcome:
    """Run `attempt` (None: passed, else why not) until it passes CONSECUTIVE times in a
    row, within `max_time`: the upstream suite's rule for eventually consistent answers."""
    deadline = time.monotonic() + max_time
    successes = 0
    last = "no attempt"
    while time.monotonic() < deadline:
        problem = attempt()
        if problem is None:
            successes += 1
            if successes >= CONSECUTIVE:
                return Outcome(True)
            continue
        successes = 0
        last = problem
        time.sleep(0.2)
    return Outcome(False, last)


def eventually(address: str, port: int, case: dict[str, Any], max_time: float = MAX_TIME,
               tls: ssl.SSLContext | None = None) -> Outcome:
    def attempt() -> str | None:
        try:
            status, headers, body = roundtrip(address, port, case, tls=tls)
            return compare(case, status, headers, body,
                           scheme="https" if tls is not None else "http")
        except (OSError, http.client.HTTPException) as e:
            return f"request failed: {e!r}"

    return consistently(attempt, max_time)


def fails_eventually(address: str, port: int, case: dict[str, Any], tls: ssl.SSLContext,
                     max_time: float = MAX_TIME) -> Outcome:
    """The request must fail without an HTTP answer (the handshake or the connection is
    refused), CONSECUTIVE times in a row: upstream's MakeTLSRequestAndExpectFailureResponse."""
    def attempt() -> str | None:
        try:
            status, _, _ = roundtrip(address, port, case, tls=tls, timeout=5)
        except (OSError, http.client.HTTPException):
            return None
        return f"answered {status}"

    return consistently(attempt, max_time)


def retry_eventually(address: str, port: int, case: dict[str, Any], response_code: int,
                     succeed_after: int, max_time: float = MAX_TIME) -> Outcome:
    """A retry case: the backend fails the first `succeed_after` requests of a uuid with
    `response_code`; a fresh uuid each attempt, as upstream's test does."""
    def attempt() -> str | None:
        query = urlencode({"responseCode": response_code, "succeedAfter": succeed_after,
                           "uuid": uuid.uuid4().hex})
        probe = {**case, "Request": {**case["Request"],
                                     "Path": f"{case['Request']['Path']}?{query}"}}
        try:
            status, headers, body = roundtrip(address, port, probe)
            return compare(probe, status, headers, body)
        except (OSError, http.client.HTTPException) as e:
            return f"request failed: {e!r}"

    return consistently(attempt, max_time)


def grpc_eventually(address: str, port: int, case: dict[str, Any],
                    max_time: float = MAX_TIME) -> Outcome:
    """A gRPC case: the status code (default OK), and for OK who answered."""
    from mesh import grpcecho

    method = next((m for m in ("EchoTwo", "EchoThree", "Echo") if f"{m}Request" in case),
                  "Echo")
    authority = (case.get("RequestMetadata") or {}).get("Authority")
    want = int((case.get("Response") or {}).get("Code") or 0)

    def attempt() -> str | None:
        code, resp = grpcecho.call(f"{address}:{port}", method, authority)
        if code.value[0] != want:
            return f"expected gRPC code {want}, got {code.name}"
        if resp is not None:
            ctx = resp.assertions.context
            if case.get("Namespace") and ctx.namespace != case["Namespace"]:
                return f"expected namespace {case['Namespace']}, got {ctx.namespace}"
            if not ctx.pod.startswith(case.get("Backend") or ""):
                return f"expected a pod of {case.get('Backend')}, got {ctx.pod}"
        return None

    return consistently(attempt, max_time)


def rejected_eventually(address: str, port: int, case: dict[str, Any],
                        tls: ssl.SSLContext, max_time: float = MAX_TIME) -> Outcome:
    """The TLS handshake with the case's SNI must fail, three times in a row."""
    server_name = str(case.get("tlsServerName") or "").strip('"')
    deadline = time.monotonic() + max_time
    failures = 0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=5) as sock, \
                    tls.wrap_socket(sock, server_hostname=server_name):
                failures = 0
                time.sleep(0.2)
        except OSError:
            failures += 1
            if failures >= CONSECUTIVE:
                return Outcome(True)
    return Outcome(False, f"a TLS connection for {server_name} was accepted")


def websocket_echo(address: str, port: int, host: str, path: str = "/",
                   max_time: float = MAX_TIME) -> Outcome:
    """Upgrade to WebSocket through the gateway; a text message must come back."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

    deadline = time.monotonic() + max_time
    last = "no attempt"
    while time.monotonic() < deadline:
        ws = WSConnection(ConnectionType.CLIENT)
        try:
            with socket.create_connection((address, port), timeout=5) as sock:
                sock.sendall(ws.send(Request(host=host, target=path)))
                got: list[str] = []
                accepted = False
                while not got:
                    data = sock.recv(65536)
                    if not data:
                        break
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, AcceptConnection):
                            accepted = True
                            sock.sendall(ws.send(TextMessage(data="conformance")))
                        elif isinstance(event, Message) and isinstance(event.data, str):
                            got.append(event.data)
                        elif isinstance(event, CloseConnection):
                            break
                if accepted and got == ["conformance"]:
                    return Outcome(True)
                last = "upgrade refused" if not accepted else f"echoed {got!r}"
        except (OSError, ValueError) as e:
            last = f"websocket failed: {e!r}"
        time.sleep(0.2)
    return Outcome(False, last)

