"""The API server on each lab node's loopback.

The lab's API server listens on the host's loopback only (nothing else on the machine or the
underlay may reach it). A node's agent runs in the node's network namespace, whose loopback
is its own; so this relay listens on 127.0.0.1:PORT inside every node's namespace and copies
each connection, bytes as they are, to the host's 127.0.0.1:PORT: TLS stays end to end (the
API server's certificate names 127.0.0.1), and the agents' kubeconfigs name the same
address as on the host. It is how k3s agents reach their server (a client-side proxy on
loopback), and it opens nothing outside loopback.

One process for the lab: the listening sockets are made inside each namespace (setns, through
pyroute2) and then served from the host's namespace, where the upstream connections are made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket

from pyroute2 import netns as pyroute2_netns

log = logging.getLogger(__name__)
CHUNK = 65536


def listen_in(namespace: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on host:port inside `namespace` (this thread returns to its own
    namespace before it returns)."""
    pyroute2_netns.pushns(namespace)
    try:
        sock = socket.create_server((host, port), backlog=128)
    finally:
        pyroute2_netns.popns()
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _relay(port: int, down_r: asyncio.StreamReader,
                 down_w: asyncio.StreamWriter) -> None:
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        down_w.close()  # the API server is not up (yet): the client retries
        return
    try:
        await asyncio.gather(_pipe(down_r, up_w), _pipe(up_r, down_w))
    finally:
        for w in (up_w, down_w):
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


async def serve(namespaces: list[str], port: int) -> None:
    servers = []
    for ns in namespaces:
        sock = listen_in(ns, port)
        servers.append(await asyncio.start_server(
            lambda r, w: _relay(port, r, w), sock=sock))
        log.info("relaying", extra={"netns": ns, "port": port})
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True,
                        help="the API server's port on the host's 127.0.0.1")
    parser.add_argument("namespaces", nargs="+", help="the nodes' network namespaces")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.namespaces, args.port))


if __name__ == "__main__":
    main()
