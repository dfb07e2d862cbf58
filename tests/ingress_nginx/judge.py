"""One request of a case: sent as upstream's e2e client sends it (no redirects followed, TLS
with the Host as server name and no verification), and its answer compared with the case's
`expect`.

Response headers are compared with all their values joined with ", " (a header sent twice
is two values, not the first one). The backend's side (`backend`, `path_startswith`,
`backend_host`, `backend_header_*`) is read from the echo's JSON reply: which pod answered,
the request URI, the Host and the headers it received.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.ingress_nginx.cases import BACKENDS, Request

TIMEOUT = 10.0
PODS = {b: f"{b}-1" for b in BACKENDS}  # the echo servers' pod names
_NGINX_EXPIRES = "%a, %d-%b-%y %H:%M"  # Go's "Mon, 02-Jan-06 15:04", in GMT


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    sent_at: float  # time.time() before and after
    received_at: float

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def echo(self) -> dict[str, Any] | None:
        """The echo's description of what it received, or None: someone else answered."""
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and "pod" in doc else None

    def summary(self) -> str:
        echo = self.echo()
        if echo is not None:
            backend = next((b for b, p in PODS.items() if p == echo.get("pod")), echo.get("pod"))
            return f"status {self.status} from backend {backend}"
        body = self.body[:80].decode(errors="replace").strip()
        return f"status {self.status}" + (f" ({body!r})" if body else "")


class _SNIConnection(http.client.HTTPSConnection):
    def __init__(self, address: str, port: int, server_name: str | None) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # upstream's client: InsecureSkipVerify
        ctx.set_alpn_protocols(["http/1.1"])
        super().__init__(address, port, timeout=TIMEOUT, context=ctx)
        self._server_name, self._ctx = server_name, ctx

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


class MissingCookie(Exception):
    pass


def cookie_header(req: Request, captured: dict[str, str]) -> str:
    """The Cookie header as Go's client writes the request's cookies (httpexpect's
    WithCookie: a captured value is sent as Go parsed it, unquoted)."""
    parts = []
    for name, value in req.cookies.items():
        if value.startswith("${") and value.endswith("}"):
            ref = value[2:-1]
            if ref not in captured:
                raise MissingCookie(f"cookie {ref} was not captured by an earlier request")
            value = captured[ref]
        if " " in value or "," in value:  # Go's sanitizeCookieValue quotes these only
            value = f'"{value}"'
        parts.append(f"{name}={value}")
    return "; ".join(parts)


def send(address: str, req: Request, captured: dict[str, str]) -> Answer:
    host = req.host if req.host is not None else address
    conn: http.client.HTTPConnection
    if req.scheme == "https":
        is_ip = host.replace(".", "").isdigit() or ":" in host
        conn = _SNIConnection(address, 443, None if is_ip else host)
    else:
        conn = http.client.HTTPConnection(address, 80, timeout=TIMEOUT)
    headers = {"Host": host, "User-Agent": "ingress-nginx-e2e (mesh runner)", **req.headers}
    cookies = cookie_header(req, captured)
    if cookies:
        headers["Cookie"] = cookies
    sent = time.time()
    try:
        conn.request(req.method, req.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return Answer(resp.status, resp.getheaders(), body, sent, time.time())
    finally:
        conn.close()


def _joined(values: list[str]) -> str:
    return ", ".join(values)


def _items(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _echo_headers(echo: dict[str, Any]) -> dict[str, list[str]]:
    return {k.lower(): list(v) for k, v in (echo.get("headers") or {}).items()}


def _cookie_value(answer: Answer, name: str) -> str | None:
    for header in answer.values("Set-Cookie"):
        first = header.split(";", 1)[0]
        k, sep, v = first.partition("=")
        if sep and k.strip() == name:
            v = v.strip()
            # Go's parseCookieValue: the value without its double quotes.
            return v[1:-1] if len(v) > 1 and v[0] == v[-1] == '"' else v
    return None


def expires_strings(answer: Answer, seconds: float) -> list[str]:
    """`Expires=...` as nginx writes it for a cookie living `seconds`, for the moments the
    request was sent and answered (they may straddle a minute)."""
    out = []
    for t in (answer.sent_at, answer.received_at):
        when = datetime.datetime.fromtimestamp(t + seconds, datetime.UTC)
        text = "Expires=" + when.strftime(_NGINX_EXPIRES)
        if text not in out:
            out.append(text)
    return out


def judge(expect: dict[str, Any], answer: Answer) -> str | None:
    """None when the answer meets every expectation, else the first that it misses: what
    was expected and what came back."""
    got = answer.summary()
    if "status" in expect and answer.status != int(expect["status"]):
        return f"expected status {expect['status']}, got {got}"
    set_cookies = answer.values("Set-Cookie")
    echo = answer.echo()
    backend_keys = ("backend", "path_startswith", "backend_host", "backend_header_equal",
                    "backend_header_absent")
    if echo is None and any(k in expect for k in backend_keys):
        wanted = expect.get("backend") or "main"
        return f"expected an answer from backend {wanted}, got {got}"
    for key, want in expect.items():
        problem: str | None = None
        if key == "status":
            continue
        if key == "backend":
            assert echo is not None
            if echo.get("pod") != PODS.get(want):
                problem = f"expected backend {want}, got {got}"
        elif key == "path_startswith":
            assert echo is not None
            if not str(echo.get("path")).startswith(want):
                problem = (f"expected the backend to see a URI starting with {want!r}, it saw "
                           f"{echo.get('path')!r}")
        elif key == "headers_equal":
            for name, value in want.items():
                values = answer.values(name)
                if not values:
                    problem = f"expected response header {name}: {value!r}, it is absent ({got})"
                elif _joined(values) != str(value):
                    problem = (f"expected response header {name}: {value!r}, got "
                               f"{_joined(values)!r}")
                if problem:
                    break
        elif key == "headers_list_equal":
            for name, value in want.items():
                values = answer.values(name)
                if _items(_joined(values)) != _items(str(value)):
                    problem = (f"expected response header {name} to list {_items(str(value))}, "
                               f"got {_items(_joined(values)) if values else 'none'} ({got})")
                    break
        elif key == "headers_present":
            missing = [n for n in want if not answer.values(n)]
            if missing:
                problem = f"expected response headers {missing}, absent ({got})"
        elif key == "headers_absent":
            present = {n: _joined(answer.values(n)) for n in want if answer.values(n)}
            if present:
                problem = f"expected no response header {list(present)}, got {present}"
        elif key == "set_cookie_contains":
            missing = [s for s in want if not any(s in c for c in set_cookies)]
            if missing:
                problem = f"expected Set-Cookie containing {missing}, got {set_cookies} ({got})"
        elif key == "set_cookie_not_contains":
            found = [s for s in want if any(s in c for c in set_cookies)]
            if found:
                problem = f"expected no Set-Cookie containing {found}, got {set_cookies}"
        elif key == "set_cookie_empty":
            if bool(want) and set_cookies:
                problem = f"expected no Set-Cookie, got {set_cookies}"
            elif not want and not set_cookies:
                problem = f"expected a Set-Cookie, got none ({got})"
        elif key == "set_cookie_expires_in":
            candidates = expires_strings(answer, float(want))
            if not any(e in c for c in set_cookies for e in candidates):
                problem = (f"expected Set-Cookie with {' or '.join(candidates)} (in {want}s), "
                           f"got {set_cookies} ({got})")
        elif key == "backend_host":
            assert echo is not None
            if echo.get("host") != want:
                problem = f"expected the backend to see Host {want!r}, it saw {echo.get('host')!r}"
        elif key == "backend_header_equal":
            assert echo is not None
            seen = _echo_headers(echo)
            for name, value in want.items():
                received = seen.get(name.lower())
                if received is None:
                    problem = f"expected the backend to receive {name}: {value!r}, it got none"
                elif _joined(received) != str(value):
                    problem = (f"expected the backend to receive {name}: {value!r}, it got "
                               f"{_joined(received)!r}")
                if problem:
                    break
        elif key == "backend_header_absent":
            assert echo is not None
            seen = _echo_headers(echo)
            present = {n: _joined(seen[n.lower()]) for n in want if n.lower() in seen}
            if present:
                problem = f"expected the backend to receive no {list(present)}, it got {present}"
        else:
            problem = f"unknown expectation {key!r}"
        if problem:
            return problem
    return None


def capture(answer: Answer, name: str, captured: dict[str, str]) -> str | None:
    value = _cookie_value(answer, name)
    if value is None:
        return (f"expected a cookie {name} to capture, got Set-Cookie "
                f"{answer.values('Set-Cookie')} ({answer.summary()})")
    captured[name] = value
    return None


def distribution(address: str, req: Request, captured: dict[str, str]) -> str | None:
    """n requests, each answered 200 by one of the backends, and each backend at least
    min_each of them (upstream's TestMainlineCanaryDistribution)."""
    assert req.distribution is not None
    n, min_each = req.distribution["n"], req.distribution["min_each"]
    counts = dict.fromkeys(PODS, 0)
    for i in range(n):
        answer = send(address, req, captured)
        problem = judge({"status": 200, **req.expect}, answer)
        echo = answer.echo()
        if problem is None and echo is None:
            problem = f"expected an answer from a backend, got {answer.summary()}"
        if problem:
            return f"request {i + 1} of {n}: {problem}"
        assert echo is not None
        backend = next((b for b, p in PODS.items() if p == echo.get("pod")), None)
        if backend is None:
            return f"request {i + 1} of {n}: answered by an unknown pod {echo.get('pod')}"
        counts[backend] += 1
    if min(counts.values()) < min_each:
        split = ", ".join(f"{b} {c}" for b, c in counts.items())
        return f"expected each backend to answer at least {min_each} of {n}, got {split}"
    return None


def attempt(address: str, req: Request, captured: dict[str, str]) -> str | None:
    """Send the request once and judge it (capturing its cookie if it asks)."""
    try:
        if req.distribution is not None:
            return distribution(address, req, captured)
        answer = send(address, req, captured)
    except MissingCookie as e:
        return str(e)
    except (OSError, http.client.HTTPException) as e:
        return f"request failed: {e!r}"
    problem = judge(req.expect, answer)
    if problem is None and req.capture_cookie:
        problem = capture(answer, req.capture_cookie, captured)
    return problem


def eventually(fn: Callable[[], str | None], timeout: float) -> str | None:
    """Retry `fn` until it passes or `timeout` is over: the last problem, or None."""
    deadline = time.monotonic() + timeout
    while True:
        problem = fn()
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.2)
