"""The lab's kubelet's HTTPS endpoint: what the API server proxies to a kubelet for
`kubectl logs` (`/containerLogs/{namespace}/{pod}/{container}`), on the node's address and
port 10250 like a kubelet's, inside the node's network namespace.

TLS both ways: a serving certificate for the node's address from the lab's CA, and only
clients with a certificate of that CA (the API server's kubelet client) are served. The log
is the container's CRI log (mesh.lab.logshim), read with the options `kubectl logs` sends:
`sinceTime`, `sinceSeconds`, `tailLines`, `timestamps`, `limitBytes`, `follow`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from mesh.lab import logshim
from mesh.lab.apirelay import listen_in

log = logging.getLogger(__name__)
PORT = 10250
FOLLOW_POLL = 0.2

# (namespace, pod, container) -> the container's log file and whether it still runs
Find = Callable[[str, str, str], tuple[Path, Callable[[], bool]] | None]


def _since(request: web.Request) -> str | None:
    """The earliest timestamp to show, in the log's own format (it sorts as text)."""
    q = request.query
    if q.get("sinceTime"):
        t = datetime.datetime.fromisoformat(q["sinceTime"].replace("Z", "+00:00"))
    elif q.get("sinceSeconds", "").isdigit():
        t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
            seconds=int(q["sinceSeconds"]))
    else:
        return None
    return logshim.cri_time(t)


def _line(ts: str, text: str, timestamps: bool) -> bytes:
    return ((f"{ts} " if timestamps else "") + text + "\n").encode()


def app(find: Find) -> web.Application:
    async def logs(request: web.Request) -> web.StreamResponse:
        m = request.match_info
        found = find(m["namespace"], m["pod"], m["container"])
        if found is None:
            raise web.HTTPNotFound(text=f"container {m['container']} of pod "
                                        f"{m['namespace']}/{m['pod']} is not on this node")
        path, running = found
        q = request.query
        since = _since(request)
        timestamps = q.get("timestamps") in ("true", "1")
        every = list(logshim.lines(path))
        entries = [(ts, text) for ts, text in every if since is None or ts >= since]
        if q.get("tailLines", "").isdigit():
            entries = entries[-int(q["tailLines"]):] if int(q["tailLines"]) else []
        body = b"".join(_line(ts, text, timestamps) for ts, text in entries)
        if q.get("limitBytes", "").isdigit():
            body = body[:int(q["limitBytes"])]
        if q.get("follow") not in ("true", "1"):
            return web.Response(body=body, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(body)
        seen = len(every)
        while running():
            await asyncio.sleep(FOLLOW_POLL)
            now = list(logshim.lines(path))
            for ts, text in now[seen:]:
                await resp.write(_line(ts, text, timestamps))
            seen = len(now)
        return resp

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_get("/containerLogs/{namespace}/{pod}/{container}", logs)
    application.router.add_get("/healthz", healthz)
    return application


async def serve(find: Find, netns: str, address: str, cert: Path, key: Path,
                client_ca: Path) -> web.AppRunner:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the API server's kubelet client, no one else
    runner = web.AppRunner(app(find), access_log=None)
    await runner.setup()
    sock = await asyncio.to_thread(listen_in, netns, PORT, address)
    await web.SockSite(runner, sock, ssl_context=ctx).start()
    log.info("kubelet endpoint serving", extra={"address": f"{address}:{PORT}"})
    return runner
