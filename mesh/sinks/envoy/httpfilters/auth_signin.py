"""The redirect to sign in (`envoy.filters.http.lua`): ingress-nginx's auth-signin. When the
external authorization service refuses a request with 401, the client gets a 302 to the
route's `ExtAuth.signin` instead, the request's URL in its `signin_param` query parameter.

The filter comes before `ext_authz` in the list: the refusal is a local reply of that
filter, and a local reply goes back through the filters before the one that made it. Only a
401 of a request that `ext_authz` did not let on is turned into the redirect: `PASSED`, just
after `ext_authz`, marks the requests it lets on (dynamic metadata), so that a 401 of the
backend, or any other answer, goes on as it is.

The listener's instance is disabled and has no code; a route enables it with its script
(`LuaPerRoute.source_code`), the Location to answer in it: a template of literal text and
nginx variables (`$scheme`, `$pass_access_scheme`, `$host`, `$http_host`, `$best_http_host`,
`$request_uri`, `$escaped_request_uri`) that the script fills from the request, so a new
sign-in URL changes only the route table.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from mesh import ir

# What ingress-nginx puts in the parameter: the request's URL, its path and query escaped as
# set-misc's set_escape_uri does (all but letters, digits and !$'()*,-.@_`|~).
_REQUEST_URL = "$pass_access_scheme://$http_host$escaped_request_uri"
_METADATA = "mesh.auth_signin"

_SCRIPT = """\
local function escape(s)
  return (string.gsub(s, "[^0-9A-Za-z!$'()*,%-.@_`|~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

function envoy_on_request(handle)
  local template = TEMPLATE
  local headers = handle:headers()
  local uri = headers:get(":path") or "/"
  local http_host = headers:get(":authority") or ""
  local host = string.lower(http_host)
  if string.sub(host, 1, 1) == "[" then
    host = string.match(host, "^%[[^%]]*%]") or host
  else
    host = (string.gsub(host, ":[0-9]*$", ""))
  end
  local scheme = headers:get(":scheme") or "http"
  local best = http_host
  if best == "" then best = host end
  local vars = {scheme = scheme, pass_access_scheme = scheme, host = host,
                http_host = http_host, best_http_host = best, request_uri = uri,
                escaped_request_uri = escape(uri)}
  local location = (string.gsub(template, "%$([0-9A-Za-z_]+)", function(name)
    return vars[name] or ""
  end))
  handle:streamInfo():dynamicMetadata():set("METADATA", "location", location)
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(":status") ~= "401" then return end
  local md = handle:streamInfo():dynamicMetadata():get("METADATA")
  local location = md and md["location"]
  if type(location) ~= "string" or md["passed"] ~= nil then return end
  headers:replace(":status", "302")
  headers:replace("location", location)
  headers:remove("content-type")
  local body = handle:body()
  if body ~= nil and body:length() > 0 then body:setBytes("") end
end
"""

_PASSED_SCRIPT = """\
function envoy_on_request(handle)
  handle:streamInfo():dynamicMetadata():set("METADATA", "passed", "yes")
end
""".replace("METADATA", _METADATA)


def location(a: ir.ExtAuth) -> str | None:
    """The Location template of a route's refusals (None: no redirect), as ingress-nginx
    builds it: the request's URL added in the parameter, unless the sign-in URL's query has
    the parameter with a value already."""
    if a.signin is None:
        return None
    query = a.signin.split("#", 1)[0].partition("?")[2]
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        return f"{a.signin}?{a.signin_param}={_REQUEST_URL}"
    if next((v for k, v in pairs if k == a.signin_param), ""):
        return a.signin
    return f"{a.signin}&{a.signin_param}={_REQUEST_URL}"


def _lua_string(text: str) -> str:
    """A Lua string literal of `text`: printable ASCII as it is, but for quote and backslash,
    every other byte as a decimal escape."""
    out = []
    for b in text.encode():
        out.append(chr(b) if 0x20 <= b < 0x7f and chr(b) not in "\\\"" else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


class _AuthSignin:
    name = "mesh.auth_signin"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name, disabled=True)
        f.typed_config.Pack(lua_pb2.Lua())
        return f

    def route_config(self, route: ir.Route) -> rc.FilterConfig | None:
        a = route.ext_auth
        if a is None or a.backend is None:
            return None
        template = location(a)
        if template is None:
            return None
        script = _SCRIPT.replace("METADATA", _METADATA).replace("TEMPLATE",
                                                                  _lua_string(template))
        per_route = lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=script))
        out = rc.FilterConfig()
        out.config.Pack(per_route)
        return out


class _Passed:
    name = "mesh.auth_signin/passed"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name, disabled=True)
        f.typed_config.Pack(lua_pb2.Lua(default_source_code=base_pb2.DataSource(
            inline_string=_PASSED_SCRIPT)))
        return f

    def route_config(self, route: ir.Route) -> rc.FilterConfig | None:
        if AUTH_SIGNIN.route_config(route) is None:
            return None
        out = rc.FilterConfig()
        out.config.Pack(lua_pb2.LuaPerRoute())
        return out


AUTH_SIGNIN = _AuthSignin()
PASSED = _Passed()
