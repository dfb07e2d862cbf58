"""Session persistence (`envoy.filters.http.stateful_session`): a client sent to an endpoint
is sent to it again, by a cookie Envoy sets (or a header the client echoes), as long as the
endpoint is healthy. Per route (RDS); the listener's instance does nothing by itself.
"""

from __future__ import annotations

from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.stateful_session.v3 import stateful_session_pb2 as ss_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.stateful_session.cookie.v3 import cookie_pb2
from envoy.extensions.http.stateful_session.header.v3 import header_pb2
from envoy.type.http.v3 import cookie_pb2 as http_cookie_pb2

from mesh import ir
from mesh.sinks.envoy import resources as r


class _StatefulSession:
    name = "envoy.filters.http.stateful_session"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(ss_pb2.StatefulSession())
        return f

    def route_config(self, route: ir.Route) -> ss_pb2.StatefulSessionPerRoute | None:
        s = route.session
        if s is None:
            return None
        state = extension_pb2.TypedExtensionConfig()
        if s.type == "Cookie":
            cookie = http_cookie_pb2.Cookie(name=s.name, path=s.path)
            if s.ttl is not None:
                cookie.ttl.CopyFrom(r.duration(s.ttl))
            # HttpOnly Envoy adds by itself; Expires is the cookie_expires filter's.
            for name, value in (("Domain", s.domain), ("SameSite", s.same_site)):
                if value:
                    cookie.attributes.add(name=name, value=value)
            if s.secure:
                cookie.attributes.add(name="Secure")
            state.name = "envoy.http.stateful_session.cookie"
            state.typed_config.Pack(cookie_pb2.CookieBasedSessionState(cookie=cookie))
        else:
            state.name = "envoy.http.stateful_session.header"
            state.typed_config.Pack(header_pb2.HeaderBasedSessionState(name=s.name))
        return ss_pb2.StatefulSessionPerRoute(
            stateful_session=ss_pb2.StatefulSession(session_state=state))


STATEFUL_SESSION = _StatefulSession()
