"""ingress-nginx's Ingress annotations, parsed into typed settings and applied to IR routes.

Users of ingress-nginx (retired) bring their Ingresses as they are: the annotations under
`nginx.ingress.kubernetes.io/` keep ingress-nginx's meaning where the IR can say it. The same
names under `mesh.dev/` are ours; when both are set, `mesh.dev/` wins. An annotation under
either prefix that we do not support, or whose value we refuse, is never silently dropped:
it becomes a warning on the Ingress's status (`IngressStatus.warnings`).

The README (Traffic policies, Canary) lists each annotation and where we differ.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mesh import ir
from mesh.store.objects import KubeObject, ObjectKey
from mesh.translate import ingress_auth, ingress_extras
from mesh.translate import ingress_nginx_compat as compat
from mesh.translate.annotation_values import Refused

NGINX = "nginx.ingress.kubernetes.io/"
MESH = "mesh.dev/"
PREFIXES = (MESH, NGINX)  # the first one set wins

CANARY_NAMES = frozenset({
    "canary", "canary-by-header", "canary-by-header-value", "canary-by-header-pattern",
    "canary-by-cookie", "canary-weight", "canary-weight-total", "affinity-canary-behavior"})
# What the parser reads (Supported or Partly), and why the others are ignored: from the one
# table of every ingress-nginx annotation (ingress_nginx_compat).
SUPPORTED = compat.supported() | ingress_auth.NAMES | ingress_extras.NAMES
WHY_NOT = compat.why_not()

_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}$")  # a header or cookie name
# One origin of cors-allow-origin, as ingress-nginx takes it (corsOriginRegex): a lowercase
# scheme, an optional `*.` for one label, a host, a port; or null.
_ORIGIN = re.compile(r"^([a-z]+://(\*\.)?[A-Za-z0-9.-]*(:\d+)?|null)$")
_METHOD = re.compile(r"^[A-Za-z]{1,32}$")
_COOKIE_DOMAIN = re.compile(r"^\.?[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){0,126}$")
_HEADER_LIST_ITEM = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# Regular expression syntax Python accepts and RE2 (Envoy's engine) refuses: lookaround,
# backreferences, atomic groups, possessive quantifiers, \Z.
_NOT_RE2 = re.compile(r"\(\?[=!]|\(\?<[=!]|\(\?>|\(\?P=|\\[1-9]|[*+?}]\+|\\Z")
_NUMBERED_GROUP = re.compile(r"\$(\d)|\$\{(\d)\}")

DEFAULT_COOKIE = "INGRESSCOOKIE"
DEFAULT_BURST_MULTIPLIER = 5
DEFAULT_TRIES = 3  # ingress-nginx's proxy-next-upstream-tries
UNLIMITED_RETRIES = 10  # tries "0" (no limit in nginx); the most a TrafficPolicy allows
REDIRECT_STATUS = 308  # ingress-nginx's ssl-redirect code
# An X-Forwarded-Proto that is not exactly `http` (RE2 has no lookahead): nginx with
# use-forwarded-headers then takes the request for an HTTPS one.
NOT_HTTP = "|[^h].*|h|h[^t].*|ht|ht[^t].*|htt|htt[^p].*|http.+"
# ingress-nginx's CORS defaults
CORS_METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS")
CORS_HEADERS = ("DNT", "Keep-Alive", "User-Agent", "X-Requested-With", "If-Modified-Since",
                "Cache-Control", "Content-Type", "Range", "Authorization")
CORS_MAX_AGE = 1728000
# proxy-next-upstream conditions -> Envoy retry_on triggers; http_NNN are status codes.
NEXT_UPSTREAM = {
    "error": ("connect-failure", "refused-stream", "reset"),
    "timeout": ("connect-failure",),
    "invalid_header": ("reset",),
    "non_idempotent": (),
}
NEXT_UPSTREAM_CODES = {f"http_{c}": c for c in (500, 502, 503, 504, 403, 404, 429)}


@dataclass(frozen=True)
class Canary:
    """How a canary Ingress takes requests from the main one: header, then cookie, then
    weight (ingress-nginx's precedence)."""

    header: str | None = None  # lowercase; `always`/`never` unless value or pattern is set
    header_value: str | None = None  # exact: overrides the pattern
    header_pattern: str | None = None  # RE2, matched anywhere in the value (as nginx does)
    # The pattern cannot be run (nginx: it errors, and a request with the header goes to
    # the main Ingress, cookie and weight unread); requests without the header go on.
    header_unmatchable: bool = False
    cookie: str | None = None
    weight: int = 0
    weight_total: int = 100
    # affinity-canary-behavior: with the main Ingress's cookie affinity, a client the canary
    # served stays on it (sticky, the default), or goes by the rules again (legacy).
    sticky: bool = True


@dataclass(frozen=True)
class Session:
    name: str
    ttl: float | None  # Max-Age
    path: str | None  # None: the Ingress path (ingress-nginx's default)
    expires: float | None = None  # Expires, this many seconds after the cookie is set
    domain: str | None = None
    secure: bool = False  # always Secure (otherwise: on HTTPS only, as ingress-nginx)
    same_site: str | None = None


@dataclass(frozen=True)
class IngressSettings:
    """One Ingress's annotations, as the IR can carry them."""

    canary: Canary | None = None  # this Ingress is a canary of another
    regex: bool = False  # paths are case-insensitive regular expressions (use-regex)
    regex_by: str = ""  # the annotation that makes them so
    rewrite: str | None = None  # rewrite-target, as an Envoy substitution (\\1 groups)
    ssl_redirect: bool = False
    force_ssl_redirect: bool = False
    preserve_trailing_slash: bool = False  # the redirects to HTTPS keep a trailing `/`
    rate_limits: tuple[ir.RateLimit, ...] = ()
    allowed_sources: tuple[str, ...] = ()
    denied_sources: tuple[str, ...] = ()
    deny_all: bool = False  # the allow or deny list was refused: no client is let in
    # The controller's use-forwarded-headers (TranslatorConfig), not an annotation: the
    # client's address from X-Forwarded-For, X-Forwarded-Proto trusted by the redirects.
    forwarded_headers: bool = False
    cors: ir.Cors | None = None
    session: Session | None = None
    retry: ir.Retry | None = None
    idle_timeout: float | None = None
    host_rewrite: str | None = None
    # The backend's (a copy of it, for this Ingress's routes)
    connect_timeout: float | None = None
    protocol: str | None = None  # h2c
    upstream_tls: bool = False  # HTTPS to the backend, not verified (as ingress-nginx)
    auth: ingress_auth.Auth | None = None  # auth-url and its family (ingress_auth)
    max_request_bytes: int | None = None  # proxy-body-size (ingress_extras)
    extras: ingress_extras.Extras = ingress_extras.NOTHING  # the rest of ingress_extras
    # Redirects and hosts (ingress-nginx's rewrite, redirect and alias annotations)
    app_root: str | None = None  # `/` alone answers 302 to this path on the same host
    url_redirect: tuple[int, str] | None = None  # permanent- or temporal-redirect: code, URL
    from_to_www: bool = False  # the host with or without `www.` redirects to this one
    aliases: tuple[str, ...] = ()  # server-alias: more names for the Ingress's hosts
    # Request headers to the backend
    forwarded_prefix: str | None = None  # X-Forwarded-Prefix, with rewrite-target
    connection_header: str | None = None  # Connection: close | keep-alive
    warnings: tuple[str, ...] = ()

    @property
    def shapes_backend(self) -> bool:
        return self.connect_timeout is not None or self.protocol is not None or \
            self.upstream_tls or self.extras.hash_policy is not None


_Refused = Refused  # the name the parsers below use


class _Reader:
    """Annotation values by name, under either prefix (mesh.dev/ first), with the warnings
    the parsing gives."""

    def __init__(self, annotations: Mapping[str, Any]) -> None:
        self.values: dict[str, tuple[str, Any]] = {}  # name -> (full key, value)
        self.warnings: list[str] = []
        for prefix in reversed(PREFIXES):  # mesh.dev/ last: it overwrites
            for key, value in annotations.items():
                if isinstance(key, str) and key.startswith(prefix) and len(key) > len(prefix):
                    self.values[key[len(prefix):]] = (key, value)
        self.unknown = sorted(key for key, _ in self.values.values()
                              if key.split("/", 1)[1] not in SUPPORTED)
        # A name set under both prefixes: the nginx one is ignored, and said so only when
        # the two differ (a copy made for the migration is no news).
        for name, (key, value) in self.values.items():
            other = NGINX + name
            if key.startswith(MESH) and other in annotations and annotations[other] != value:
                self.warnings.append(f"{other} is ignored: {key} is set and wins")

    def has(self, name: str) -> bool:
        return name in self.values

    def key(self, name: str) -> str:
        return self.values[name][0] if name in self.values else NGINX + name

    def text(self, name: str) -> str | None:
        if name not in self.values:
            return None
        value = self.values[name][1]
        if not isinstance(value, str):
            raise _Refused("annotation values are strings")
        return value.strip()

    def refuse(self, name: str, why: str) -> None:
        key, value = self.values[name]
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        self.warnings.append(f"{key}: {shown} is refused: {why}")

    def get(self, name: str, conv: Any, default: Any = None) -> Any:
        """The converted value; a value `conv` refuses is reported and `default` used."""
        try:
            text = self.text(name)
            return default if text is None else conv(text)
        except _Refused as e:
            self.refuse(name, str(e))
            return default

    def ignore(self, names: Any, why: str) -> None:
        for name in sorted(names):
            if name in self.values:
                self.warnings.append(f"{self.key(name)} is ignored: {why}")


# -- value parsers -----------------------------------------------------------------------------

def _bool(text: str) -> bool:
    b = _BOOLS.get(text.lower())
    if b is None:
        raise _Refused('not a boolean ("true" or "false")')
    return b


def _int_between(lo: int, hi: int) -> Any:
    def conv(text: str) -> int:
        if not re.fullmatch(r"[+-]?\d{1,12}", text):
            raise _Refused("not a whole number")
        n = int(text)
        if not lo <= n <= hi:
            raise _Refused(f"must be between {lo} and {hi}")
        return n
    return conv


def _seconds(text: str) -> float:
    """nginx's seconds ("60"); a unit "s" is taken too."""
    m = re.fullmatch(r"(\d{1,9}(?:\.\d{1,9})?)s?", text)
    if m is None:
        raise _Refused("not a number of seconds")
    return float(m.group(1))


def _token(text: str) -> str:
    if not _TOKEN.match(text):
        raise _Refused("not a valid header or cookie name")
    return text


def _cidrs(text: str) -> tuple[str, ...]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise _Refused(f"{item} is not an IP address or CIDR") from None
    if not out:
        raise _Refused("no CIDR given")
    return tuple(out)


def regex_problem(pattern: str) -> str | None:
    """Why Envoy (RE2) cannot use `pattern`, or None."""
    try:
        re.compile(pattern)
    except re.error as e:
        return f"not a valid regular expression: {e}"
    if _NOT_RE2.search(pattern):
        return "uses syntax RE2 does not have (lookaround, backreferences, atomic groups, " \
            "possessive quantifiers)"
    return None


def _regex(text: str) -> str:
    problem = regex_problem(text)
    if problem is not None:
        raise _Refused(problem)
    return text


def _substitution(text: str) -> str:
    """nginx's rewrite replacement ($1 groups) as an Envoy substitution (\\1 groups)."""
    if not text.startswith("/"):
        raise _Refused("must be a path starting with /")
    if "?" in text:
        raise _Refused("a query in the target is not supported")
    rest = _NUMBERED_GROUP.sub("", text)
    if "$" in rest:
        raise _Refused("nginx variables other than $1..$9 are not supported")
    escaped = text.replace("\\", "\\\\")
    return _NUMBERED_GROUP.sub(lambda m: "\\" + (m.group(1) or m.group(2)), escaped)


def _list(text: str, item: re.Pattern[str], what: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in out if not item.match(t)]
    if bad:
        raise _Refused(f"{', '.join(bad)}: not {what}")
    return out


# -- parsing -----------------------------------------------------------------------------------

def parse(obj: KubeObject) -> IngressSettings:
    """An Ingress's annotations as typed settings, with a warning for each one refused or
    ignored."""
    r = _Reader(obj.annotations)
    canary = _canary(r)
    if canary is not None:
        # As in ingress-nginx: a canary inherits everything else from its main Ingress.
        r.ignore([n for n in r.values if n not in CANARY_NAMES and n in SUPPORTED],
                 "a canary Ingress takes its main Ingress's settings")
        for key in r.unknown:
            r.warnings.append(f"{key} is not supported: ignored")
        return IngressSettings(canary=canary, warnings=tuple(r.warnings))
    r.ignore([n for n in r.values if n in CANARY_NAMES and n != "canary"],
             f'only for a canary Ingress ({r.key("canary")}: "true")')
    fields: dict[str, Any] = {
        "regex": r.get("use-regex", _bool, False), "regex_by": r.key("use-regex"),
        # ingress-nginx redirects to HTTPS by default where the host has TLS. So do we for
        # an Ingress written for it (with annotations of ours); a plain Ingress keeps being
        # served on both ports, as before.
        "ssl_redirect": r.get("ssl-redirect", _bool, bool(r.values)),
        "force_ssl_redirect": r.get("force-ssl-redirect", _bool, False),
        "preserve_trailing_slash": r.get("preserve-trailing-slash", _bool, False),
        "host_rewrite": r.get("upstream-vhost", _host),
        "cors": _cors(r), "retry": _retry(r), **_redirects(r), **_backend_headers(r),
        "aliases": r.get("server-alias", _aliases, ())}
    for part in (_rewrite(r), _rate_limits(r, obj.key), _sources(r), _timeouts(r),
                 _session(r), _protocol(r), ingress_auth.parse(r, obj.namespace),
                 ingress_extras.parse(r, obj.namespace)):
        fields.update(part)
    for key in r.unknown:
        why = WHY_NOT.get(key.split("/", 1)[1])
        r.warnings.append(f"{key} is not supported" + (f" ({why})" if why else "") +
                          ": ignored")
    return IngressSettings(**fields, warnings=tuple(r.warnings))


# What ingress-nginx's validation lets through in a redirect URL (URLIsValidRegex): no
# nginx variable can get in.
_URL = re.compile(r"^[-\w.~/:,?&=]*$", re.ASCII)
PERMANENT_CODE, TEMPORAL_CODE = 301, 302


def _redirects(r: _Reader) -> dict[str, Any]:
    out: dict[str, Any] = {
        "app_root": r.get("app-root", lambda t: t if re.fullmatch(r"/[-\w.~/:]*", t, re.ASCII)
                          else _fail("a path from / (no nginx variable, no query)")),
        "from_to_www": r.get("from-to-www-redirect", _bool, False)}
    # ingress-nginx: temporal-redirect first, then permanent-redirect; a code out of range
    # is the default one.
    for name, lo, hi, default, check in (
            ("temporal-redirect", 300, 307, TEMPORAL_CODE, _http_url),
            ("permanent-redirect", 300, 308, PERMANENT_CODE, _redirect_url)):
        url = r.get(name, check)
        if url is None:
            r.ignore({f"{name}-code"} & r.values.keys(), f"it needs {r.key(name)}")
            continue
        code = r.get(f"{name}-code", _int_between(lo, hi), default)
        out["url_redirect"] = (code, url)
        r.ignore({"permanent-redirect", "permanent-redirect-code"} & r.values.keys()
                 if name == "temporal-redirect" else set(),
                 f"{r.key('temporal-redirect')} is set and wins")
        break
    return out


def _redirect_url(text: str) -> str:
    if not text or not _URL.match(text):
        raise _Refused("not a URL (letters, digits and -._~/:,?&= only)")
    if not re.match(r"(https?://[^/?]+|/)", text):
        raise _Refused("not an http:// or https:// URL, nor a path from /")
    return text


def _http_url(text: str) -> str:
    if not re.match(r"https?://", text):
        raise _Refused("only http:// and https:// URLs")
    return _redirect_url(text)


_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_ALIAS = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def _aliases(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item or item in out:
            continue
        if not _ALIAS.fullmatch(item):
            raise _Refused(f"{item}: not a host name or *.domain (nginx's regular expression "
                           "and suffix names are not supported)")
        out.append(item)
    return tuple(out)


def _backend_headers(r: _Reader) -> dict[str, Any]:
    def prefix(text: str) -> str | None:
        if _NUMBERED_GROUP.search(text) or "$" in text:
            raise _Refused("capture groups ($1) and nginx variables are not supported")
        if not re.fullmatch(r"[-\w.~/:]*", text, re.ASCII):
            raise _Refused("not a path prefix")
        return text or None  # empty: no header, as ingress-nginx
    forwarded_prefix = r.get("x-forwarded-prefix", prefix)
    if forwarded_prefix is not None and not r.has("rewrite-target"):
        # ingress-nginx sets it where the path is rewritten only.
        r.ignore(["x-forwarded-prefix"], f"it needs {r.key('rewrite-target')}")
        forwarded_prefix = None
    return {"forwarded_prefix": forwarded_prefix,
            "connection_header": r.get("connection-proxy-header", lambda t: t if t in (
                "close", "keep-alive") else _fail('"close" or "keep-alive"'))}


# The variables ingress-nginx sets in every location, which upstream-vhost may use: known
# here for each path (VHOST_VARIABLES), so they are filled in when the routes are made.
_VHOST_VARIABLE = re.compile(r"\$(?:(namespace|ingress_name|service_name|service_port)\b|"
                             r"\{(namespace|ingress_name|service_name|service_port)\})")


def _host(text: str) -> str:
    plain = _VHOST_VARIABLE.sub(lambda m: "1" if "port" in m.group(0) else "a", text)
    if "$" in plain:
        raise _Refused("nginx variables other than $namespace, $ingress_name, $service_name "
                       "and $service_port are not supported")
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}(:\d{1,5})?", plain):
        raise _Refused("not a host name")
    return text


def expand_vhost(text: str | None, values: Mapping[str, str]) -> str | None:
    """upstream-vhost with its variables filled in (namespace, ingress_name, service_name,
    service_port)."""
    if text is None or "$" not in text:
        return text
    return _VHOST_VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _canary(r: _Reader) -> Canary | None:
    if not r.get("canary", _bool, False):
        return None
    header = r.get("canary-by-header", _token)
    value = r.get("canary-by-header-value", lambda t: t if t else None)
    pattern, unmatchable = _header_pattern(r)
    if header is None:
        r.ignore({"canary-by-header-value", "canary-by-header-pattern"} & r.values.keys(),
                 f"it needs {r.key('canary-by-header')}")
        value = pattern = None
        unmatchable = False
    elif value is not None and (pattern is not None or unmatchable):
        r.ignore(["canary-by-header-pattern"],
                 f"{r.key('canary-by-header-value')} is set and wins")
        pattern, unmatchable = None, False
    total = r.get("canary-weight-total", _int_between(1, 1_000_000), 100)
    weight = r.get("canary-weight", _int_between(0, total), 0)
    if total < 100:
        # ingress-nginx's balancer takes a total under 100 for 100 (its documentation
        # does not): the split changes on the way over, say so.
        r.warnings.append(f'{r.key("canary-weight-total")}: "{total}": the canary gets '
                          f"{weight} of {total} requests; ingress-nginx's balancer used 100 "
                          f"for a total under 100 ({weight} of 100)")
    return Canary(header=header.lower() if header else None, header_value=value,
                  header_pattern=pattern, header_unmatchable=unmatchable,
                  cookie=r.get("canary-by-cookie", _token), weight=weight, weight_total=total,
                  sticky=r.get("affinity-canary-behavior", lambda t: t.lower() == "sticky" if
                               t.lower() in ("sticky", "legacy") else _fail(
                                   'one of "sticky", "legacy"'), True))


# The characters ingress-nginx's annotation validation lets through in a pattern
# (parser.IsValidRegex); a pattern with others is dropped there.
_NGINX_PATTERN = re.compile(r"^[-/.\w~:^$\[\](){}*+?|&=\\]*$", re.ASCII)


def _header_pattern(r: _Reader) -> tuple[str | None, bool]:
    """canary-by-header-pattern: (the pattern, or None; whether it cannot be run)."""
    text = r.get("canary-by-header-pattern", lambda t: t)
    if not text:
        return None, False
    if not _NGINX_PATTERN.match(text):
        r.refuse("canary-by-header-pattern", "characters ingress-nginx's validation refuses "
                 "(it drops the pattern too): the header's always and never apply")
        return None, False
    problem = regex_problem(text)
    if problem is not None:
        # nginx compiles the pattern per request; one that fails matches nothing and ends
        # the canary's rules there. Safe either way: such a request goes to the main Ingress.
        r.refuse("canary-by-header-pattern", f"{problem}; a request with the header goes "
                 "to the main Ingress")
        return None, True
    return text, False


def _rewrite(r: _Reader) -> dict[str, Any]:
    target = r.get("rewrite-target", _substitution)
    if target is None:
        return {}
    # As in ingress-nginx, a rewrite makes the paths regular expressions.
    return {"rewrite": target, "regex": True, "regex_by": r.key("rewrite-target")}


def _rate_limits(r: _Reader, key: ObjectKey) -> dict[str, Any]:
    multiplier = r.get("limit-burst-multiplier", _int_between(1, 1000), DEFAULT_BURST_MULTIPLIER)
    # limit-whitelist / limit-allowlist: not supported (WHY_NOT says why), so a warning.
    limits = []
    for name, unit in (("limit-rps", "Second"), ("limit-rpm", "Minute")):
        n = r.get(name, _int_between(0, 1_000_000), 0)
        if n:  # 0: no limit, as in ingress-nginx
            # One counter per client address, as nginx's limit_req zone on $remote_addr.
            limits.append(ir.RateLimit(
                id=f"{key.namespace}/{key.name}/{name}", requests=n, unit=unit,
                selectors=(ir.RateLimitSelector("SourceIP", "Distinct", value="0.0.0.0/0"),),
                scope="Local", burst=n * multiplier))
    if not limits:
        r.ignore({"limit-burst-multiplier"} & r.values.keys(), "it needs limit-rps or limit-rpm")
    return {"rate_limits": tuple(limits)}


def _sources(r: _Reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # nginx's `deny` lines, then `allow` lines and `deny all`: a denied client is refused
    # whatever the allow list says.
    for field, names in (("allowed_sources", ("allowlist-source-range",
                                              "whitelist-source-range")),
                         ("denied_sources", ("denylist-source-range",))):
        name = next((n for n in names if r.has(n)), None)
        if name is None:
            continue
        try:
            out[field] = _cidrs(r.text(name) or "")
        except _Refused as e:
            # Fail closed: a list we cannot read lets nobody in, not everybody.
            r.refuse(name, f"{e}; the paths answer 403 until it is fixed")
            out["deny_all"] = True
    return out


def _timeouts(r: _Reader) -> dict[str, Any]:
    read = r.get("proxy-read-timeout", _seconds)
    send = r.get("proxy-send-timeout", _seconds)
    idle = max((t for t in (read, send) if t is not None), default=None)
    return {"connect_timeout": r.get("proxy-connect-timeout", _seconds), "idle_timeout": idle}


def _session(r: _Reader) -> dict[str, Any]:
    affinity = r.get("affinity", lambda t: t if t == "cookie" else _fail(
        'the only affinity is "cookie"'))
    names = {"affinity-mode", "session-cookie-name", "session-cookie-max-age",
             "session-cookie-expires", "session-cookie-path", "session-cookie-domain",
             "session-cookie-secure", "session-cookie-samesite"}
    if affinity is None:
        r.ignore(names & r.values.keys(), f'it needs {r.key("affinity")}: "cookie"')
        return {}
    r.get("affinity-mode", lambda t: t if t in ("balanced", "persistent") else _fail(
        'affinity-mode is "balanced" or "persistent"'))
    # Both, as ingress-nginx: max-age gives Max-Age, expires an Expires date.
    ttl = r.get("session-cookie-max-age", _int_between(0, 10 ** 9))
    expires = r.get("session-cookie-expires", _int_between(0, 10 ** 9))
    path = r.get("session-cookie-path", lambda t: t if t.startswith("/") else _fail(
        "a cookie path starts with /"))
    return {"session": Session(
        r.get("session-cookie-name", _token, DEFAULT_COOKIE), float(ttl) if ttl else None,
        path, expires=float(expires) if expires else None,
        domain=r.get("session-cookie-domain", lambda t: t if _COOKIE_DOMAIN.match(t) else
                     _fail("not a cookie domain")),
        secure=r.get("session-cookie-secure", _bool, False),
        same_site=r.get("session-cookie-samesite", lambda t: t if t.lower() in (
            "none", "lax", "strict") else _fail('one of "None", "Lax", "Strict"')))}


def _fail(why: str) -> Any:
    raise _Refused(why)


def _protocol(r: _Reader) -> dict[str, Any]:
    p = r.get("backend-protocol", lambda t: t.upper())
    if p is None or p == "HTTP":
        return {}
    if p == "HTTPS":
        return {"upstream_tls": True}
    if p in ("GRPC", "H2C"):
        return {"protocol": "h2c"}
    if p == "GRPCS":  # HTTP/2 over TLS, not verified (as HTTPS)
        return {"protocol": "h2c", "upstream_tls": True}
    if p in ("AUTO_HTTP", "FCGI"):
        r.warnings.append(f'{r.key("backend-protocol")}: "{p}" is not supported: the '
                          "backend is spoken to in HTTP/1.1")
    else:
        r.refuse("backend-protocol", "one of HTTP, HTTPS, GRPC, GRPCS, H2C, AUTO_HTTP, FCGI")
    return {}


def _cors(r: _Reader) -> ir.Cors | None:
    names = {"cors-allow-origin", "cors-allow-methods", "cors-allow-headers",
             "cors-expose-headers", "cors-allow-credentials", "cors-max-age"}
    if not r.get("enable-cors", _bool, False):
        r.ignore(names & r.values.keys(), f'it needs {r.key("enable-cors")}: "true"')
        return None
    return ir.Cors(
        allow_origins=_origins(r),
        allow_methods=r.get("cors-allow-methods", lambda t: _list(
            t, _METHOD, "a method") or CORS_METHODS, CORS_METHODS),
        allow_headers=r.get("cors-allow-headers",
                            lambda t: _list(t, _HEADER_LIST_ITEM, "a header name") or
                            CORS_HEADERS, CORS_HEADERS),
        expose_headers=r.get("cors-expose-headers", lambda t: _list(
            t, re.compile(r"^(\*|[A-Za-z0-9_-]{1,256})$"), "a header name"), ()),
        allow_credentials=r.get("cors-allow-credentials", _bool, True),
        max_age=r.get("cors-max-age", _int_between(0, 10 ** 9), CORS_MAX_AGE),
        origin_wildcard="Label")


def _origins(r: _Reader) -> tuple[str, ...]:
    """cors-allow-origin as ingress-nginx reads it: blank or absent is `*`, and so is a list
    with `*` in it; an entry that is no origin is skipped (with a warning), the others
    kept; none left allows no origin."""
    try:
        text = r.text("cors-allow-origin")
    except _Refused as e:
        r.refuse("cors-allow-origin", f"{e}; no origin is allowed")
        return ()
    out: list[str] = []
    for item in (t.strip() for t in (text or "").split(",")):
        if item == "*":
            return ("*",)
        if not item:
            continue
        if _ORIGIN.match(item):
            out.append(item)
        else:
            r.warnings.append(f'{r.key("cors-allow-origin")}: "{item}" is skipped: not an '
                              "origin (scheme://host[:port], scheme://*.host[:port], null or "
                              "*)")
    return tuple(out) if out or (text or "").strip() else ("*",)


def _retry(r: _Reader) -> ir.Retry | None:
    if not r.has("proxy-next-upstream") and not r.has("proxy-next-upstream-tries"):
        return None
    conditions = r.get("proxy-next-upstream", _next_upstream, ("error", "timeout"))
    tries = r.get("proxy-next-upstream-tries", _int_between(0, 100), DEFAULT_TRIES)
    if "off" in conditions:
        r.ignore({"proxy-next-upstream-tries"} & r.values.keys(),
                 f'{r.key("proxy-next-upstream")} is "off"')
        return None
    triggers: list[str] = []
    for c in conditions:
        triggers += [t for t in NEXT_UPSTREAM.get(c, ()) if t not in triggers]
    codes = tuple(sorted({NEXT_UPSTREAM_CODES[c] for c in conditions
                          if c in NEXT_UPSTREAM_CODES}))
    if codes:
        triggers.append("retriable-status-codes")
    if not triggers:  # non_idempotent alone: nginx then retries on nothing either
        return None
    attempts = UNLIMITED_RETRIES if tries == 0 else tries - 1
    return ir.Retry(attempts, codes, triggers=tuple(triggers))


def _next_upstream(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    bad = [w for w in words if w not in NEXT_UPSTREAM and w not in NEXT_UPSTREAM_CODES and
           w != "off"]
    if bad or not words:
        raise _Refused(f"{' '.join(bad) or 'nothing'}: not among error, timeout, "
                       "invalid_header, http_500, http_502, http_503, http_504, http_403, "
                       "http_404, http_429, non_idempotent, off")
    return words


# -- applying settings to IR routes and backends ------------------------------------------------

def regex_path(path: str) -> ir.StringMatch:
    """An ingress-nginx regex location (`~* "^path"`): case-insensitive, from the start of
    the path, whatever follows (Envoy matches the whole path)."""
    return ir.StringMatch("RegularExpression", f"(?i)(?:{path}).*")


def shape_route(s: IngressSettings, route: ir.Route, path: str | None) -> ir.Route:
    """The route with the Ingress's route settings; `path` is the Ingress path when it is
    matched as a regular expression (rewrite-target's groups refer to it)."""
    a = route.action
    if s.deny_all:
        a = ir.DirectResponse(403, "")
    elif isinstance(a, ir.Forward):
        a = replace(a, retry=s.retry, idle_timeout=s.idle_timeout, host_rewrite=s.host_rewrite,
                    # nginx's `rewrite` replaces the whole path when the location matches.
                    regex_rewrite=(f"(?i)^(?:{path}).*", s.rewrite)
                    if s.rewrite is not None and path is not None else None)
    request_headers = route.request_headers
    if isinstance(a, ir.Forward):
        extra = [("x-forwarded-prefix", s.forwarded_prefix)] \
            if s.forwarded_prefix is not None and s.rewrite is not None else []
        if s.connection_header is not None:
            extra.append(("connection", s.connection_header))
        if extra:
            request_headers = replace(request_headers, set=(*request_headers.set, *extra))
    session = None
    if s.session is not None:
        # ingress-nginx's default is the location's path; a regular expression is no
        # cookie path (ingress-nginx asks for session-cookie-path then): "/".
        cookie_path = s.session.path or ("/" if path is not None else _plain(route.path))
        x = s.session
        session = ir.SessionPersistence("Cookie", x.name, x.ttl, cookie_path, expires=x.expires,
                                        domain=x.domain, secure=x.secure,
                                        same_site=x.same_site)
    cors, headers = s.cors, route.response_headers
    if cors is not None and cors.allow_origins == ("*",):
        # nginx's `*`: every response says so, Origin or not (Envoy's CORS filter answers
        # only requests with an Origin, and with the origin itself).
        headers = ir.HeaderOps(set=(*headers.set, *cors_headers(cors)), add=headers.add,
                               remove=headers.remove)
        cors = None
    out = replace(route, action=a, rate_limits=s.rate_limits, cors=cors, session=session,
                  response_headers=headers, request_headers=request_headers,
                  allowed_sources=s.allowed_sources, denied_sources=s.denied_sources,
                  sources_from_forwarded_for=s.forwarded_headers and bool(
                      s.allowed_sources or s.denied_sources))
    if s.url_redirect is not None:
        # nginx's `return`, in the rewrite phase: before allow lists, limits, sessions and
        # the redirect to HTTPS; the Location as written.
        code, url = s.url_redirect
        out = replace(out, action=ir.DirectResponse(code), rate_limits=(), session=None,
                      allowed_sources=(), denied_sources=(), sources_from_forwarded_for=False,
                      request_headers=ir.HeaderOps(),
                      response_headers=replace(headers, set=(*headers.set, ("location", url))))
    return out


def cors_headers(c: ir.Cors) -> tuple[tuple[str, str], ...]:
    """The headers nginx sets on every response of a location with CORS and origin `*`."""
    out = [("access-control-allow-origin", "*")]
    if c.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    out += [("access-control-allow-methods", ", ".join(c.allow_methods)),
            ("access-control-allow-headers", ", ".join(c.allow_headers))]
    if c.expose_headers:
        out.append(("access-control-expose-headers", ", ".join(c.expose_headers)))
    out.append(("access-control-max-age", str(c.max_age)))
    return tuple(out)


def cors_preflight(s: IngressSettings, route: ir.Route) -> ir.Route | None:
    """With CORS and origin `*`, nginx answers every OPTIONS request itself (204), before
    its allow lists, limits and authentication: a route before the path's others."""
    c = s.cors
    if c is None or c.allow_origins != ("*",):
        return None
    return ir.Route(name=f"{route.name}/cors-preflight", path=route.path, headers=route.headers,
                    query=route.query, method="OPTIONS", action=ir.DirectResponse(204),
                    response_headers=ir.HeaderOps(set=cors_headers(c)),
                    owners=route.owners)


def _plain(m: ir.StringMatch) -> str:
    return m.value if m.type in ("Exact", "Prefix", "PathSeparatedPrefix") and m.value else "/"


def shape_backend(s: IngressSettings, b: ir.Backend) -> ir.Backend:
    """A copy of the backend with the Ingress's backend settings."""
    out = b
    if s.connect_timeout is not None:
        out = replace(out, settings=replace(out.settings, connect_timeout=s.connect_timeout))
    if s.protocol is not None:
        out = replace(out, protocol=s.protocol)
    # A BackendTLSPolicy on the Service wins: it verifies, ingress-nginx's HTTPS does not.
    if s.upstream_tls and out.tls is None:
        # ingress-nginx sends no SNI by default (proxy-ssl-server-name off).
        out = replace(out, tls=ir.UpstreamTLS(sni="", ca_pem=None, verify=False))
    if s.extras.hash_policy is not None:  # upstream-hash-by: consistent hashing
        out = replace(out, settings=replace(out.settings, load_balancer=ir.LoadBalancer(
            "ConsistentHash")))
    return out


def cookie_regex(name: str, value: str) -> str:
    """A whole cookie `name=value` in a Cookie header (Envoy matches the whole header)."""
    return rf"(.*;\s*)?{re.escape(name)}={re.escape(value)}(\s*;.*)?"


def canary_routes(main: ir.Route, forward: ir.Forward | None, c: Canary, canary: str,
                  owner: ObjectKey) -> list[ir.Route]:
    """The routes a canary adds in front of its main route, then the main route as a
    weighted split: header (always / never, or the value, or the pattern), cookie (always /
    never), weight. `forward` is what the main route's action would be with a backend (its
    settings; None: the main route answers on its own, and so does the canary)."""
    owners = main.owners | {owner}

    def to(backend: str | None, label: str, match: ir.StringMatch) -> ir.Route:
        a = main.action
        if forward is not None and backend is not None:
            # Even when the main backend is missing: the canary's is not.
            a = replace(forward, backends=(ir.WeightedBackend(backend, 1),))
        return replace(main, name=f"{main.name}/canary-{label}", headers=(*main.headers, match),
                       action=a, owners=owners)

    main_backend = None  # `never` goes where the main route goes
    out = []
    if c.header is not None:
        if c.header_value is not None:
            out.append(to(canary, "header", ir.StringMatch("Exact", c.header_value, c.header)))
        elif c.header_pattern is not None:
            # nginx looks for the pattern anywhere in the value; Envoy matches the whole.
            out.append(to(canary, "header", ir.StringMatch(
                "RegularExpression", f".*(?:{c.header_pattern}).*", c.header)))
        elif c.header_unmatchable:
            out.append(to(main_backend, "header-never", ir.StringMatch("Present", "",
                                                                     c.header)))
        else:
            out.append(to(canary, "header", ir.StringMatch("Exact", "always", c.header)))
            out.append(to(main_backend, "header-never",
                          ir.StringMatch("Exact", "never", c.header)))
    if c.cookie is not None:
        out.append(to(canary, "cookie", ir.StringMatch(
            "RegularExpression", cookie_regex(c.cookie, "always"), "cookie")))
        out.append(to(main_backend, "cookie-never", ir.StringMatch(
            "RegularExpression", cookie_regex(c.cookie, "never"), "cookie")))
    a = main.action
    if isinstance(a, ir.Forward) and c.weight > 0:
        a = replace(a, backends=(*(replace(w, weight=w.weight * (c.weight_total - c.weight))
                                   for w in a.backends),
                                 ir.WeightedBackend(canary, c.weight)))
    out.append(replace(main, action=a, owners=owners))
    return out
