"""Every ingress-nginx Ingress annotation, and how far the mesh honours it: the one table the
parser (`ingress_annotations`: which names it reads, why the others are ignored), the
reference page (docs/reference/ingress-annotations.md, rendered by docs/hooks/reference.py)
and `mesh ingress-nginx check` all read.

The names are those ingress-nginx documents (docs/user-guide/nginx-configuration/
annotations.md upstream, controller v1.15), plus the few its controller reads without
documenting them (`allowlist-source-range`, `limit-allowlist`, ...). Each has a level:

- Supported: the same behaviour.
- Partly: it works, with the differences told in `difference`.
- Not supported: ignored, with a warning on the Ingress's status; `difference` says why.

`here` says what the annotation does in the mesh (what it maps to in the IR). The texts are
Markdown (code spans), shown as they are by the CLI. No I/O here: plain data.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Level(enum.Enum):
    SUPPORTED = "Supported"
    PARTLY = "Partly"
    NOT_SUPPORTED = "Not supported"


@dataclass(frozen=True)
class Annotation:
    name: str  # without the prefix: `canary-weight`
    level: Level
    family: str  # the group it belongs to (the reference page's sections)
    here: str  # what it does in the mesh ("" when not supported)
    difference: str  # where it differs from ingress-nginx ("" when it does not), or why not
    # Not supported, and read all the same to fail closed: the Ingress's paths answer 500
    # rather than serve without the protection the annotation asks for.
    closes: bool = False

    @property
    def supported(self) -> bool:
        """Read by the parser: Supported or Partly."""
        return self.level is not Level.NOT_SUPPORTED


_Row = tuple[str, Level, str, str, bool]


def yes(name: str, here: str, difference: str = "") -> _Row:
    return (name, Level.SUPPORTED, here, difference, False)


def partly(name: str, here: str, difference: str) -> _Row:
    return (name, Level.PARTLY, here, difference, False)


def no(name: str, why: str, closes: bool = False) -> _Row:
    return (name, Level.NOT_SUPPORTED, "", why, closes)


def family(title: str, *rows: _Row) -> tuple[Annotation, ...]:
    return tuple(Annotation(name, level, title, here, diff, closes)
                 for name, level, here, diff, closes in rows)


SNIPPET = "nginx configuration snippets have no meaning here"
BUFFERS = "nginx's buffers have no counterpart: Envoy streams requests and responses"
EXT_AUTH = "external authentication (`auth-url`) is not supported"
BASIC_AUTH = ("the IR has no HTTP basic or digest authentication: the paths answer 500 "
              "(closed) until it is removed")
CLIENT_CERTS = "the IR has no client certificate authentication on Ingress hosts"
BACKEND_TLS = ("backend TLS settings beyond `backend-protocol: HTTPS` are not supported: a "
               "BackendTLSPolicy on the Service verifies the backend")
WAF = "the mesh has no web application firewall (ModSecurity)"
ACCESS_LOG = "the node's proxy logs every request the same way; no per-Ingress switch"
TRACING = "the IR has no per-Ingress tracing settings"

ANNOTATIONS: tuple[Annotation, ...] = (
    # -- canaries: `canary: "true"` makes an Ingress the canary of the main one ------------
    *family(
        "Canary",
        yes("canary", '`"true"`: this Ingress is the canary of the main Ingress with the same '
            "host and path",
            "An invalid value is refused and the Ingress is a plain one (as ingress-nginx "
            "does)."),
        yes("canary-by-header", "A route before the main one: header `= always` → canary; "
            "`= never` → main; any other value falls through to the cookie, then the weight",
            "Header names are matched case-insensitively, values exactly."),
        yes("canary-by-header-value", "Instead of `always`/`never`: header `=` the value → "
            "canary (Exact match)",
            "With a value, `always` and `never` are values like any other (as in "
            "ingress-nginx). It wins over the pattern (the pattern gets a warning)."),
        partly("canary-by-header-pattern", "Header matching the pattern → canary "
               "(RegularExpression `.*(?:pattern).*`)",
            "RE2, not PCRE: a pattern with lookaround or backreferences is refused with a "
            "warning, and a request with the header then goes to the main Ingress (as with a "
            "pattern that does not compile, where nginx does the same). The pattern is found "
            "anywhere in the value, as nginx's `ngx.re.match`."),
        yes("canary-by-cookie", "Cookie `name=always` → canary; `name=never` → main",
            "If a request carries the same cookie twice, `always` wins; nginx reads the "
            "first."),
        yes("canary-weight", "The main route becomes a weighted split: main `total - w`, "
            "canary `w`; 0 and `total` are exact", "Refused outside 0..total."),
        yes("canary-weight-total", "The total of the weights (default 100)",
            "A total under 100 is honoured as documented, with a warning: ingress-nginx's "
            "balancer took it for 100."),
    ),
    # -- paths, rewrites and redirects -------------------------------------------------------
    *family(
        "Paths, rewrites and redirects",
        partly("rewrite-target", "`Forward.regex_rewrite`: the whole path replaced, `$1`..`$9` "
               "as `\\1`..`\\9`; makes the paths regular expressions",
               "Only `$N` groups: other nginx variables, and a query in the target, are "
               "refused. The path is rewritten as the client sent it (nginx: decoded and "
               "normalised)."),
        partly("use-regex", "Paths as case-insensitive regular expressions from the start of "
               "the path (nginx's `~* \"^path\"`)",
               "Only this Ingress's paths (ingress-nginx: every path of the host, from any "
               "Ingress). A path RE2 cannot run is matched as a plain path, with a warning."),
        yes("app-root", "`/` alone (whatever the query) on the Ingress's hosts → `Redirect` 302 "
            "to that path, scheme and host kept, before any path of the host (the first "
            "Ingress of a host with one decides)",
            "A path with nginx variables (`$`) is refused with a warning."),
        yes("permanent-redirect", "The paths answer 301 (`DirectResponse`) with `Location` as "
            "written, before allow lists, limits and the redirect to HTTPS",
            "The answer has no body (nginx: its HTML page). A URL that is neither `http(s)://` "
            "nor a path from `/` is refused with a warning."),
        yes("permanent-redirect-code", "The code instead of 301 (300 to 308; another is 301)",
            "A code out of range is said in a warning (ingress-nginx: silently 301)."),
        yes("temporal-redirect", "As `permanent-redirect`, with 302; it wins over "
            "`permanent-redirect` (as ingress-nginx); `http(s)://` URLs only"),
        yes("temporal-redirect-code", "The code instead of 302 (300 to 307; another is 302)",
            "A code out of range is said in a warning (ingress-nginx: silently 302)."),
        partly("from-to-www-redirect", "The host with `www.` (or without, when the rule's host "
               "has it) redirects every request (308) to the rule's host, scheme and path kept, "
               "a trailing `/` dropped; not when that name is served by an Ingress or an alias "
               "(a warning)",
               "The `Location` has no port (nginx writes the server's: `http://host:80/p`). "
               "Over HTTPS, only when a TLS host of our Ingresses covers that name (nginx: when "
               "the certificate does)."),
        yes("preserve-trailing-slash", "The redirects to HTTPS keep a trailing `/` (by "
            "default they drop it, as ingress-nginx: `/a/` → `https://host/a`)"),
        no("use-port-in-redirects", "nginx's own redirects (`port_in_redirect`) have no "
           "counterpart"),
        no("relative-redirects", "nginx's own redirects (`absolute_redirect`) have no "
           "counterpart"),
        partly("x-forwarded-prefix", "With `rewrite-target`: the request header "
               "`X-Forwarded-Prefix` to the backend (`Route.request_headers`); empty: none",
               "A value with capture groups (`$1`) or nginx variables is refused with a "
               "warning (no header)."),
        partly("server-alias", "More names for the Ingress's hosts (`VirtualHost.domains`): host "
               "names and `*.domain`; the first Ingress of a host with aliases names them; a "
               "name that is a host of its own or another's alias is left out with a warning",
               "nginx's regular expression (`~^...`) and suffix (`www.example.*`) names are "
               "refused with a warning. Over HTTPS, an alias is served only when a TLS host of "
               "our Ingresses covers it."),
        no("enable-rewrite-log", "nginx's rewrite log has no counterpart"),
    ),
    # -- HTTPS ------------------------------------------------------------------------------
    *family(
        "HTTPS",
        partly("ssl-redirect", "Plain HTTP → `Redirect` 308 to `https`, where the host has a "
               "TLS certificate from one of our Ingresses (a trailing `/` dropped and "
               "`X-Forwarded-Proto` read as for `force-ssl-redirect`)",
               "The default (`true`) applies to Ingresses with at least one annotation under "
               "our prefixes; a plain Ingress is served on both ports, as before. No "
               "exception for `/.well-known/acme-challenge`."),
        yes("force-ssl-redirect", "The same redirect, with or without TLS here; a path "
            "ending with `/` (and no query) loses it, as ingress-nginx; with "
            "`--use-forwarded-headers`, a request whose `X-Forwarded-Proto` is not `http` is "
            "served",
            "`X-Forwarded-Host` and `X-Forwarded-Port` are not looked at. On a host with a "
            "wildcard or none, `/` keeps its slash (`https://host/`)."),
        no("ssl-passthrough", "an Ingress host's TLS is ended by the node's proxy; TLS "
           "passthrough is a Gateway API TLSRoute's"),
        no("ssl-ciphers", "the listeners' TLS settings are the mesh's, not an Ingress's"),
        no("ssl-prefer-server-ciphers", "the listeners' TLS settings are the mesh's, not an "
           "Ingress's"),
    ),
    # -- authentication: basic and digest ---------------------------------------------------
    *family(
        "Authentication",
        no("auth-type", BASIC_AUTH, closes=True),
        no("auth-secret", BASIC_AUTH, closes=True),
        no("auth-secret-type", BASIC_AUTH),
        no("auth-realm", BASIC_AUTH),
        no("satisfy", "no authentication to combine with the allow lists"),
    ),
    # -- client certificates (mTLS from the client) -----------------------------------------
    *family(
        "Client certificates",
        no("auth-tls-secret", CLIENT_CERTS),
        no("auth-tls-verify-client", CLIENT_CERTS),
        no("auth-tls-verify-depth", CLIENT_CERTS),
        no("auth-tls-error-page", CLIENT_CERTS),
        no("auth-tls-pass-certificate-to-upstream", CLIENT_CERTS),
        no("auth-tls-match-cn", CLIENT_CERTS),
    ),
    # -- external authentication (auth_request) ---------------------------------------------
    *family(
        "External authentication",
        partly("auth-url", "`Route.ext_auth`: Envoy's `ext_authz` asks the Service "
               "(`http://name.namespace.svc...`) at its path and query before each request; "
               "200 lets it on, another answer goes to the client, an unreachable service or "
               "a 5xx gives 500",
               "Only `http://` to a Service of the Ingress's namespace (or one a "
               "ReferenceGrant opens); anything else answers 500 (closed), with a warning. "
               "The check keeps the request's method and Host (nginx: the auth URL's host) "
               "and has `mesh-original-path=<path>` appended to its query. Only 200 lets a "
               "request on (nginx: any 2xx); a 3xx or 4xx other than 401/403 goes to the "
               "client (nginx: 500)."),
        no("auth-method", "the check is made with the request's method (Envoy cannot "
           "change it)"),
        partly("auth-signin", "`ExtAuth.signin`: a 401 of the auth service becomes a 302 to "
               "the URL, with `rd=<scheme>://<Host><escaped path and query>` added to its "
               "query (unless the query has the parameter already), as nginx",
               "An `http(s)://` URL or a path, with the request's `$scheme`, "
               "`$pass_access_scheme`, `$host`, `$http_host`, `$best_http_host`, "
               "`$request_uri`, `$escaped_request_uri` only; another variable or value is "
               "refused with a warning, and the 401 reaches the client. A path stays relative "
               "in Location (nginx: made absolute). `$pass_access_scheme` is the request's "
               "scheme as the node's proxy sees it. The redirect keeps the auth service's "
               "other headers, with no body (nginx: its 302 page)."),
        yes("auth-signin-redirect-param", "`ExtAuth.signin_param` (default `rd`); a name "
            "other than letters, digits and `._~-` is refused (`rd` is used), with a warning"),
        yes("auth-response-headers", "`ExtAuth.upstream_headers`: copied from the service's "
            "answer onto the request; the client's own copies are removed first"),
        no("auth-proxy-set-headers", "the check carries the client's headers, not a "
           "ConfigMap's"),
        yes("auth-request-redirect", "`ExtAuth.redirect`: the check's "
            "`X-Auth-Request-Redirect` (default: the request's path)"),
        no("auth-cache-key", "every request is checked: answers are not cached"),
        no("auth-cache-duration", "every request is checked: answers are not cached"),
        no("auth-keepalive", "the node's proxy pools its connections to the service itself"),
        no("auth-keepalive-requests", "the node's proxy pools its connections to the "
           "service itself"),
        no("auth-keepalive-timeout", "the node's proxy pools its connections to the service "
           "itself"),
        no("auth-keepalive-share-vars", "the node's proxy pools its connections to the "
           "service itself"),
        no("auth-always-set-cookie", "the service's Set-Cookie reaches the client only with "
           "a refusal"),
        no("auth-snippet", SNIPPET + "; with `auth-url` the paths answer 500 (closed)"),
        no("enable-global-auth", "there is no global external authentication to opt out of"),
    ),
    # -- rate limits ------------------------------------------------------------------------
    *family(
        "Rate limits",
        partly("limit-rps", "`RateLimit` Local, per client address (SourceIP Distinct "
               "`0.0.0.0/0`), per second; `0`: no limit",
               "Refused requests get 429 (ingress-nginx: 503, `limit-req-status-code`). IPv4 "
               "clients only are counted. The counter is the node's proxy's, per route "
               "(nginx: per nginx instance, per Ingress): a canary's extra routes (header, "
               "cookie) count on their own."),
        partly("limit-rpm", "The same, per minute", "As `limit-rps`."),
        yes("limit-burst-multiplier", "`RateLimit.burst = requests * multiplier` (default 5)"),
        no("limit-connections", "the IR has no limit on concurrent connections per client"),
        no("limit-whitelist", "Envoy's local rate limit matches a client's address or range, "
           "never \"all but a range\": the limit holds for every client"),
        no("limit-allowlist", "Envoy's local rate limit matches a client's address or range, "
           "never \"all but a range\": the limit holds for every client"),
        no("limit-rate", "the IR has no bandwidth limit on responses"),
        no("limit-rate-after", "the IR has no bandwidth limit on responses"),
    ),
    # -- access by client address -----------------------------------------------------------
    *family(
        "Client addresses",
        yes("whitelist-source-range", "`Route.allowed_sources` (comma-separated CIDRs or "
            "addresses); others get 403; with `--use-forwarded-headers` the client is "
            "X-Forwarded-For's last address",
            "A list that does not parse lets nobody in: the paths answer 403 until it is "
            "fixed."),
        yes("allowlist-source-range", "The same as `whitelist-source-range` (its newer name)",
            "As `whitelist-source-range`."),
        yes("denylist-source-range", "`Route.denied_sources` (comma-separated CIDRs or "
            "addresses) get 403, before the allow list; with `--use-forwarded-headers` the "
            "client is X-Forwarded-For's last address",
            "A list that does not parse lets nobody in: the paths answer 403 until it is "
            "fixed (ingress-nginx: 503)."),
    ),
    # -- CORS -------------------------------------------------------------------------------
    *family(
        "CORS",
        yes("enable-cors", "With origin `*` (the default): every response gets "
            "`Access-Control-Allow-Origin: *` and the other headers, Origin or not "
            "(`Route.response_headers`), and every `OPTIONS` request is answered 204 first "
            "(before allow lists, limits and authentication), as nginx; with a list of "
            "origins: `Route.cors` (Envoy's CORS filter)"),
        yes("cors-allow-origin", "`Cors.allow_origins`: comma-separated `scheme://host[:port]`, "
            "`scheme://*.host` (one label), `null`, `*`; blank or absent: `*`; compared "
            "case-insensitively",
            "An entry that is no origin is skipped with a warning, the others kept (as "
            "ingress-nginx; where its validation refuses the whole value, an `_` or `/` in a "
            "host, it allows every origin). With a list: a preflight needs "
            "`Access-Control-Request-Method` and is answered 200 (nginx: any `OPTIONS`, 204), "
            "one from an origin not listed is answered without CORS headers (nginx passes it "
            "on); other responses carry `Allow-Origin`, `-Credentials`, `Expose-Headers` only "
            "(nginx adds `Allow-Methods`, `-Headers`, `Max-Age`, which browsers ignore there); "
            "the origin is matched whole (nginx's regex is not anchored at the start)."),
        yes("cors-allow-methods", "`Cors.allow_methods` (default `GET, PUT, POST, DELETE, "
            "PATCH, OPTIONS`)"),
        yes("cors-allow-headers", "`Cors.allow_headers` (default `DNT, Keep-Alive, "
            "User-Agent, X-Requested-With, If-Modified-Since, Cache-Control, Content-Type, "
            "Range, Authorization`)"),
        yes("cors-expose-headers", "`Cors.expose_headers` (default none)"),
        yes("cors-allow-credentials", "`Cors.allow_credentials` (default `true`)"),
        yes("cors-max-age", "`Cors.max_age` (default 1728000)"),
    ),
    # -- session affinity -------------------------------------------------------------------
    *family(
        "Session affinity",
        partly("affinity", '`"cookie"` → `SessionPersistence` Cookie',
               "Only `cookie` (as ingress-nginx)."),
        partly("affinity-mode", "`balanced` and `persistent` are accepted",
               "Sessions stick until their endpoint goes (nginx `balanced` moves some when "
               "the backend scales)."),
        yes("affinity-canary-behavior", "On the canary Ingress, with the main Ingress's cookie "
            "affinity: `sticky` (default): a client the canary served keeps going to its "
            "endpoint (the main and canary backends each know the other's endpoints as "
            "`Backend.sticky_endpoints`), and one stuck to the main Ingress's stays there "
            "whatever the canary rules say; `legacy`: the canary's clients go by the rules "
            "again",
            "`legacy`: the canary's responses set the cookie too (ingress-nginx sets none); "
            "the next request goes by the rules all the same."),
        yes("session-cookie-name", "`SessionPersistence.name` (default `INGRESSCOOKIE`)"),
        yes("session-cookie-path", "`SessionPersistence.path` (default: the Ingress path; `/` "
            "for a regex path)"),
        yes("session-cookie-max-age", "`SessionPersistence.ttl` (seconds)"),
        yes("session-cookie-expires", "`SessionPersistence.expires`: an `Expires` date that many "
            "seconds after the response (nginx's format), with `Max-Age` beside it when "
            "`max-age` is set too, as ingress-nginx"),
        yes("session-cookie-domain", "`SessionPersistence.domain`: the cookie's `Domain`"),
        yes("session-cookie-secure", "`\"true\"`: the cookie is always `Secure`; otherwise it is "
            "`Secure` over HTTPS only (`SessionPersistence.secure`), as ingress-nginx"),
        yes("session-cookie-samesite", "`SessionPersistence.same_site`: `SameSite=None`, `Lax` "
            "or `Strict`, as written"),
        no("session-cookie-conditional-samesite-none", "the session cookie is the same for "
           "every browser: `SameSite=None` is not left out for the User-Agents that "
           "mishandle it"),
        no("session-cookie-change-on-failure", "a session keeps its endpoint until the "
           "endpoint goes"),
    ),
    # -- backends and load balancing --------------------------------------------------------
    *family(
        "Backends",
        partly("backend-protocol", "`HTTP`: nothing; `HTTPS`: `UpstreamTLS` without "
               "verification and without SNI (as ingress-nginx); `GRPC`, `H2C`: backend "
               "protocol h2c; `GRPCS`: HTTP/2 over TLS, not verified",
               "`AUTO_HTTP`, `FCGI`: not supported (warning; HTTP/1.1 is used). A "
               "BackendTLSPolicy on the Service wins over `HTTPS` and `GRPCS` (it "
               "verifies)."),
        yes("upstream-vhost", "`Forward.host_rewrite`; `$namespace`, `$ingress_name`, "
            "`$service_name`, `$service_port` filled in per path",
            "Other nginx variables (`$host`...) are refused with a warning: the Host is then "
            "the client's."),
        no("load-balance", "the backends' load balancing is a TrafficPolicy's, not an "
           "Ingress's"),
        partly("upstream-hash-by", "`Route.hash_policy` and a copy of the backend with a "
               "ConsistentHash (Maglev) load balancer: `$request_uri` → the path and query, "
               "`$remote_addr` → the client's address, `$http_<name>` → the header "
               "(`_` as `-`), `$cookie_<name>` → the cookie",
               "One of these variables alone (`$x` or `${x}`): other variables, text and "
               "combinations (`$request_uri$host`) are refused with a warning, and the "
               "requests are then balanced without hashing. A request without the header or "
               "cookie goes to any endpoint (nginx hashes the empty value: always the same "
               "one). Which endpoint a key maps to differs from nginx's (Maglev, not nginx's "
               "ring); it is as stable. Ignored on a canary Ingress (ingress-nginx honours "
               "it there). It wins over a TrafficPolicy's load balancer for the Ingress's "
               "routes; cookie affinity (`affinity`) wins over it, as in ingress-nginx."),
        no("upstream-hash-by-subset", "Envoy's consistent hashing sends a key to one "
           "endpoint, not to a subset of them: with `upstream-hash-by`, each key goes to one "
           "endpoint"),
        no("upstream-hash-by-subset-size", "`upstream-hash-by-subset` is not supported"),
        no("service-upstream", "the mesh balances over the Service's endpoints itself"),
        partly("default-backend", "A Service of the Ingress's namespace (its first port) "
               "that the Ingress's paths are sent to while their Service has no endpoints, "
               "or is missing",
               "Decided when the configuration is built, from the EndpointSlices (as "
               "ingress-nginx): endpoints that exist but fail are not replaced. Errors are "
               "not sent to it (`custom-http-errors` is not supported)."),
        no("custom-http-errors", "error responses are not replaced by another backend's: "
           "Envoy's custom_response filter could send them there, but only as an internal "
           "redirect through the route table (a route per Ingress for it, and the headers "
           "nginx adds, X-Code and the like, cannot be set); not done yet"),
        no("disable-proxy-intercept-errors", "`custom-http-errors` is not supported"),
        no("fastcgi-index", "the IR has no FastCGI backends"),
        no("fastcgi-params-configmap", "the IR has no FastCGI backends"),
    ),
    # -- timeouts and retries ---------------------------------------------------------------
    *family(
        "Timeouts and retries",
        yes("proxy-connect-timeout", "A copy of the backend with "
            "`BackendSettings.connect_timeout` (seconds; `5` or `5s`)"),
        partly("proxy-read-timeout", "`Forward.idle_timeout`: the larger of "
               "`proxy-read-timeout` and `proxy-send-timeout`",
               "One timeout for both directions; nginx's 60 s defaults are not applied."),
        partly("proxy-send-timeout", "As `proxy-read-timeout`", "As `proxy-read-timeout`."),
        partly("proxy-next-upstream", "`Retry` triggers: `error` → connect-failure, "
               "refused-stream, reset; `timeout` → connect-failure; `invalid_header` → reset; "
               "`http_500/502/503/504/403/404/429` → retriable-status-codes with those codes; "
               "`off` → no retries",
               "A response timeout is not retried (only connection timeouts). Non-idempotent "
               "requests (POST, PATCH, LOCK) are retried too, `non_idempotent` or not. A retry "
               "may go to the same endpoint (nginx: the next one). Without the annotation "
               "there are no retries (ingress-nginx: `error timeout`, 3 tries)."),
        yes("proxy-next-upstream-tries", "`Retry.attempts = tries - 1` (default 3 tries); `0` "
            "(no limit) → 10 retries"),
        no("proxy-next-upstream-timeout", "the IR has no time limit on retries alone"),
    ),
    # -- TLS to the backend -----------------------------------------------------------------
    *family(
        "TLS to the backend",
        no("proxy-ssl-secret", BACKEND_TLS),
        no("proxy-ssl-verify", BACKEND_TLS),
        no("proxy-ssl-verify-depth", BACKEND_TLS),
        no("proxy-ssl-name", BACKEND_TLS),
        no("proxy-ssl-server-name", BACKEND_TLS),
        no("proxy-ssl-ciphers", BACKEND_TLS),
        no("proxy-ssl-protocols", BACKEND_TLS),
    ),
    # -- requests, responses and buffers ----------------------------------------------------
    *family(
        "Requests and responses",
        partly("proxy-body-size", "`Route.max_request_bytes` (`k`, `m`, `g`; `0`: no "
               "limit): Envoy's buffer filter reads the body whole, a larger one answers 413",
               "No limit by default (nginx: 1m). Limits above 64m are not enforced (the "
               "body would be held in memory), with a warning."),
        no("client-body-buffer-size", BUFFERS),
        no("proxy-buffering", BUFFERS),
        no("proxy-buffers-number", BUFFERS),
        no("proxy-buffer-size", BUFFERS),
        no("proxy-busy-buffers-size", BUFFERS),
        no("proxy-max-temp-file-size", BUFFERS),
        no("proxy-request-buffering", BUFFERS),
        no("proxy-http-version", "the backend protocol is `backend-protocol`'s (HTTP/1.1 by "
           "default)"),
        no("proxy-cookie-domain", "the IR does not rewrite the backend's Set-Cookie headers"),
        no("proxy-cookie-path", "the IR does not rewrite the backend's Set-Cookie headers"),
        no("proxy-redirect-from", "the IR does not rewrite the backend's Location headers"),
        no("proxy-redirect-to", "the IR does not rewrite the backend's Location headers"),
        yes("connection-proxy-header", "`close` or `keep-alive`: the `Connection` header to the "
            "backend (`Route.request_headers`)"),
        no("custom-headers", "response headers from a ConfigMap are not supported"),
        no("http2-push-preload", "HTTP/2 server push is gone from browsers and from Envoy"),
    ),
    # -- mirroring --------------------------------------------------------------------------
    *family(
        "Mirroring",
        partly("mirror-target", "`Forward.mirrors`: every request of the Ingress's paths is "
               "copied to the Service (`http://name.namespace.svc...[:port]$request_uri`), "
               "its answer ignored; the copy's Host is the URL's host",
               "Only `http://` to a Service of the Ingress's namespace (or one a "
               "ReferenceGrant opens), ending in `$request_uri`: anything else is refused "
               "with a warning, and nothing is mirrored. The request does not wait for the "
               "copy (nginx: a slow mirror slows the request down)."),
        yes("mirror-host", "`Mirror.host`: the copy's Host header (default: the target's "
            "host)"),
        partly("mirror-request-body", "`on` (the default): the copy carries the body",
               "`off` is not supported (warning): the copy always carries the body."),
    ),
    # -- logs and traces --------------------------------------------------------------------
    *family(
        "Logs and traces",
        no("enable-access-log", ACCESS_LOG),
        no("enable-opentelemetry", TRACING),
        no("opentelemetry-trust-incoming-span", TRACING),
        no("opentelemetry-operation-name", TRACING),
    ),
    # -- web application firewall -----------------------------------------------------------
    *family(
        "ModSecurity",
        no("enable-modsecurity", WAF),
        no("enable-owasp-core-rules", WAF),
        no("modsecurity-transaction-id", WAF),
        no("modsecurity-snippet", WAF),
    ),
    # -- nginx configuration ----------------------------------------------------------------
    *family(
        "nginx snippets",
        no("configuration-snippet", SNIPPET),
        no("server-snippet", SNIPPET),
        no("stream-snippet", SNIPPET),
    ),
)

BY_NAME: dict[str, Annotation] = {a.name: a for a in ANNOTATIONS}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(a.family for a in ANNOTATIONS))


def supported() -> frozenset[str]:
    """The names the parser reads: Supported or Partly."""
    return frozenset(a.name for a in ANNOTATIONS if a.supported)


def why_not() -> dict[str, str]:
    """Why each annotation that is not supported is not."""
    return {a.name: a.difference for a in ANNOTATIONS if not a.supported}


def of_family(name: str) -> Iterable[Annotation]:
    return (a for a in ANNOTATIONS if a.family == name)
