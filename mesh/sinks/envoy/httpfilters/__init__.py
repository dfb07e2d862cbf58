"""Envoy HTTP filters, one module each, behind one small interface (as Envoy Gateway's
`internal/xds/translator/httpfilters.go`).

Every connection manager carries the same filter list in the same order, each filter
present with an empty (pass-through) config: a route enables and configures a filter through
`typed_per_filter_config` in RDS. Adding a feature to a route then changes only its route
table, never a listener, and never drains connections. The router is always last.
"""

from __future__ import annotations

from typing import Protocol

from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from mesh import ir
from mesh.sinks.envoy.httpfilters import (
    auth_signin,
    buffer,
    cookie_expires,
    cors,
    ext_authz,
    local_ratelimit,
    ratelimit,
    rbac,
    router,
    stateful_session,
)


class HTTPFilter(Protocol):
    """One Envoy HTTP filter: what every connection manager lists, and what one route asks
    of it (None: nothing, the filter passes the request on)."""

    name: str

    def listener_filter(self) -> hcm_pb2.HttpFilter: ...

    def route_config(self, route: ir.Route) -> Message | None: ...


# The order requests go through them: CORS answers preflights first; the allow list refuses
# before a refused request counts against a limit; local limits (cheap) before global ones
# (a call to the rate limit service); then external authorization (after limits, as nginx's
# access phase; the redirect to sign in comes before it, to see its refusals on their way
# back), body size limits (no body is held for a request refused earlier); sessions
# pick the endpoint just before the router. Responses go through them the other way: the
# session cookie's Expires is added after the session filter has set the cookie.
ORDER: tuple[HTTPFilter, ...] = (
    cors.CORS, rbac.RBAC, local_ratelimit.LOCAL, local_ratelimit.LOCAL_SHADOW,
    ratelimit.GLOBAL_FAIL_OPEN, ratelimit.GLOBAL_FAIL_CLOSED,
    auth_signin.AUTH_SIGNIN, ext_authz.STRIP, ext_authz.EXT_AUTHZ, auth_signin.PASSED,
    buffer.BUFFER, cookie_expires.COOKIE_EXPIRES,
    stateful_session.STATEFUL_SESSION, router.ROUTER)


def listener_filters() -> list[hcm_pb2.HttpFilter]:
    return [f.listener_filter() for f in ORDER]


def route_configs(route: ir.Route) -> list[tuple[str, Message]]:
    """(filter name, per-route config) for every filter the route configures."""
    out = []
    for f in ORDER:
        cfg = f.route_config(route)
        if cfg is not None:
            out.append((f.name, cfg))
    return out
