"""The Kubernetes API client: `kubernetes_asyncio` (asyncio, on aiohttp, like the agent) for
configuration (in cluster or a kubeconfig), authentication and TLS; requests go through its
`ApiClient.call_api` unparsed, so one client serves every kind, core and custom, without a
generated model per kind."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

READ_TIMEOUT = 90  # a watch silent this long (no event, no bookmark) is dead: reconnect

# One JSON request: (method, path, body) -> (status code, the decoded body or None).
Call = Callable[[str, str, Any], Awaitable[tuple[int, Any]]]

# What a request to the API server may end in besides an answer: the network's errors, and a
# body of the wrong shape (a proxy's error page, a truncated object). The writers' loops log
# these and try again; nothing the server says may end the agent.
API_ERRORS = (OSError, TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError,
              TypeError, AttributeError)


def api_message(answer: Any, limit: int = 300) -> str:
    """The message of an API server's error answer (a Status), cut to `limit` characters."""
    return str((answer if isinstance(answer, dict) else {}).get("message", ""))[:limit]


class Gone(Exception):
    """410: the version to resume from is too old: list again."""


class NotInstalled(Exception):
    """404 on the collection: the server has no such resource (its CRD is missing)."""


class HTTP:
    """The API server's HTTP, through kubernetes_asyncio's client (auth, TLS)."""

    def __init__(self, api: Any) -> None:
        self.api = api  # kubernetes_asyncio.client.ApiClient

    async def _call(self, path: str, query: dict[str, str], read_timeout: float) -> Any:
        resp = await self._request(path, query, read_timeout)
        if resp.status < 400:
            return resp
        text = (await resp.read())[:500].decode(errors="replace")
        resp.release()
        if resp.status == 404:
            raise NotInstalled()
        if resp.status == 410:
            raise Gone()
        raise ValueError(f"{path}: {resp.status} {text}")

    async def _request(self, path: str, query: dict[str, str], read_timeout: float) -> Any:
        # Unparsed (_preload_content=False): the client hands the response back whatever
        # its status; `_call` reads the status.
        return await self.api.call_api(
            path, "GET", query_params=list(query.items()), auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=read_timeout))

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/json") -> tuple[int, Any]:
        """One JSON request: (status code, the decoded body or None). For the writers (status,
        MeshNode, the Lease), which decide per code what to do."""
        resp = await self.api.call_api(
            path, method, auth_settings=["BearerToken"], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=30))
        try:
            text = await resp.read()
        finally:
            resp.release()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, None

    async def apply(self, path: str, body: Any) -> tuple[int, Any]:
        """A server-side apply (a PATCH whose query names the field manager; JSON is YAML)."""
        return await self.call("PATCH", path, body, "application/apply-patch+yaml")

    async def get_json(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        resp = await self._call(path, query, 60)
        try:
            data = json.loads(await resp.read())
        finally:
            resp.release()
        if not isinstance(data, dict):
            raise ValueError("not a list")
        return data

    async def stream(self, path: str, query: dict[str, str]) -> Any:
        resp = await self._call(path, query, READ_TIMEOUT)
        try:
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.release()


@contextlib.asynccontextmanager
async def connect(kubeconfig: str | None) -> AsyncIterator[HTTP]:
    """The API server's HTTP for the block: configured from a kubeconfig, or in-cluster (the
    pod's service account) when None."""
    # Imported here: the client's generated models take a while to import, and most `mesh`
    # commands never talk to an API server.
    from kubernetes_asyncio import config
    from kubernetes_asyncio.client import ApiClient, Configuration

    cfg = Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    async with ApiClient(cfg) as api:
        yield HTTP(api)


def aiohttp_call(session: Any, base: str) -> Call:
    """A `Call` over a plain aiohttp session, without authentication (tests, against the API
    test double)."""
    async def call(method: str, path: str, body: Any) -> tuple[int, Any]:
        async with session.request(method, base + path,
                                   data=None if body is None else json.dumps(body),
                                   headers={"Content-Type": "application/json"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None
    return call
