"""The TCP echo backend, as the Gateway API's echo-basic serves with TCP_ECHO_SERVER set:
`python -m mesh.tcpecho`, configured by the same variables.

Plain TCP on TCP_PORT (3000) and, given TLS_SERVER_CERT and TLS_SERVER_PRIV_KEY, TLS on
TLS_PORT (8443). A connection is greeted with a line, then each line is answered: `TEST` with
the pod's context as JSON (namespace, pod, ports, whether it came over TLS, and the TLS
version, server name and cipher it got), `IS_TLS` with true or false, `PING` with PONG.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from typing import Any

WELCOME = b"Gateway API Test TCP Server\n"
TLS_NAMES = {"TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}  # as Go's tls.VersionName says


def context(env: dict[str, str], tcp_port: str, tls_port: str) -> dict[str, Any]:
    out: dict[str, Any] = {"namespace": env.get("NAMESPACE", ""),
                           "ingress": env.get("INGRESS_NAME", ""),
                           "service": env.get("SERVICE_NAME", ""),
                           "pod": env.get("POD_NAME", ""), "tcpport": tcp_port}
    if tls_port:
        out["tlsport"] = tls_port
    return out


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           pod: dict[str, Any]) -> None:
    tls = writer.get_extra_info("ssl_object")
    answer: dict[str, Any] = {**pod, "isTLS": tls is not None}
    if tls is not None:
        cipher = tls.cipher()
        answer["tls"] = {"version": TLS_NAMES.get(str(tls.version()), str(tls.version())),
                         "serverName": tls.server_hostname or getattr(tls, "sni", "") or "",
                         "cipherSuite": cipher[0] if cipher else ""}
    try:
        writer.write(WELCOME)
        while line := await reader.readline():
            text = line.strip()
            if text == b"TEST":
                writer.write(json.dumps(answer).encode() + b"\n")
            elif text == b"IS_TLS":
                writer.write(b"true\n" if tls is not None else b"false\n")
            elif text == b"PING":
                writer.write(b"PONG\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)

    def remember(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.sni = name or ""  # type: ignore[attr-defined]  # the server side's SNI

    ctx.sni_callback = remember
    return ctx


async def main(env: dict[str, str]) -> None:
    tcp_port = env.get("TCP_PORT") or "3000"
    tls_port = env.get("TLS_PORT") or "8443"
    cert, key = env.get("TLS_SERVER_CERT"), env.get("TLS_SERVER_PRIV_KEY")
    pod = context(env, tcp_port, tls_port if cert and key else "")
    servers = [await asyncio.start_server(
        lambda r, w: serve_connection(r, w, pod), "0.0.0.0", int(tcp_port))]
    if cert and key:
        servers.append(await asyncio.start_server(
            lambda r, w: serve_connection(r, w, pod), "0.0.0.0", int(tls_port),
            ssl=_tls_context(cert, key)))
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(dict(os.environ)))
