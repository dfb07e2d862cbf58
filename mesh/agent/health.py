"""The agent's health endpoint: HTTP on a unix socket in the state directory (mode 0600),
never on a port: with host networking a port would be open on the node's addresses.

`GET /healthz`: 200 while the agent's event loop answers (liveness). `GET /readyz`: 200 once
the first build is served and Envoy is ready, else 503 (readiness). Both answer with the
same JSON: what is synced, whether Envoy is ready, and the leader election's state (whether
this agent leads and so writes status). `mesh health` is the client the chart's exec probes
run.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, UnixConnector, web

SOCKET = "agent.sock"


class HealthServer:
    def __init__(self, path: Path, report: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.report = report  # -> {"ready": bool, ...}

    async def _health(self, request: web.Request) -> web.Response:
        body = self.report()
        ok = request.path == "/healthz" or bool(body.get("ready"))
        return web.json_response(body, status=200 if ok else 503)

    async def run(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/readyz", self._health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # before listen: nobody else can connect, ever
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            self.path.unlink(missing_ok=True)


async def probe(path: Path, ready: bool, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of the agent's health endpoint; (0, {error}) when it does not
    answer."""
    try:
        async with ClientSession(connector=UnixConnector(path=str(path)),
                                 timeout=ClientTimeout(total=timeout)) as session, \
                session.get("http://agent/readyz" if ready else "http://agent/healthz") as r:
            return r.status, json.loads(await r.text())
    except (OSError, TimeoutError, ValueError) as e:
        return 0, {"error": f"the agent does not answer on {path}: {e}"}
