"""A session cookie's Expires attribute (`envoy.filters.http.lua`): a date some seconds after
the response, which no static configuration can hold. Envoy's session cookie
(`stateful_session`) carries Max-Age only; on a route whose session cookie has an expiry, a
few lines of Lua append `Expires=<date>` to that cookie as the response leaves, in nginx's
cookie_time format (`Thu, 18-Nov-10 11:27:35 GMT`). Per route (RDS); the listener's instance
has no code and does nothing. It comes before `stateful_session` in the filter list, so that
it sees the response after that filter has added the cookie.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh import ir

# The session cookie is the last Set-Cookie of its name (Envoy appends it after the
# backend's); %s: the cookie name (a token: no quote or backslash), %d: seconds.
_SCRIPT = """\
function envoy_on_response(handle)
  local headers = handle:headers()
  local n = headers:getNumValues("set-cookie")
  if n == 0 then return end
  local prefix = "%s="
  local values, last = {}, nil
  for i = 0, n - 1 do
    values[i + 1] = headers:getAtIndex("set-cookie", i)
    if string.sub(values[i + 1], 1, #prefix) == prefix then last = i + 1 end
  end
  if last == nil then return end
  values[last] = values[last] .. "; Expires=" ..
    os.date("!%%a, %%d-%%b-%%y %%H:%%M:%%S GMT", os.time() + %d)
  headers:remove("set-cookie")
  for _, v in ipairs(values) do headers:add("set-cookie", v) end
end
"""


class _CookieExpires:
    name = "mesh.cookie_expires"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(lua_pb2.Lua())  # no code: does nothing unless a route says
        return f

    def route_config(self, route: ir.Route) -> lua_pb2.LuaPerRoute | None:
        s = route.session
        if s is None or s.type != "Cookie" or s.expires is None:
            return None
        return lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(
            inline_string=_SCRIPT % (s.name, int(s.expires))))


COOKIE_EXPIRES = _CookieExpires()
