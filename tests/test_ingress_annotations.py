"""ingress-nginx annotations on Ingresses, translated: the IR routes and backends each one
gives, canaries and their precedence, bad values and unsupported annotations reported."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest

from mesh import ir
from mesh.store.objects import ObjectKey, parse_object
from mesh.store.store import StoreSnapshot
from mesh.translate import Translation, TranslatorConfig, translate
from mesh.translate import ingress_annotations as nginx
from mesh.translate.status import IngressStatus

NGINX = "nginx.ingress.kubernetes.io/"
HOST = "shop.example"
CLASS = {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": "mesh"}, "spec": {"controller": "mesh.dev/ingress-controller"}}
CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def ingress(name: str, annotations: dict[str, Any] | None = None,
            paths: list[tuple[str, str, str]] | None = None, host: str | None = HOST,
            tls: bool = False, default_backend: str | None = None) -> dict[str, Any]:
    """An Ingress of our class; `paths`: (path, pathType, Service) on port 80."""
    spec: dict[str, Any] = {"ingressClassName": "mesh"}
    rule: dict[str, Any] = {"http": {"paths": [
        {"path": p, "pathType": t, "backend": {"service": {"name": s, "port": {"number": 80}}}}
        for p, t, s in (paths if paths is not None else [("/", "Prefix", "main")])]}}
    if host is not None:
        rule["host"] = host
    spec["rules"] = [rule]
    if tls:
        spec["tls"] = [{"hosts": [HOST], "secretName": "shop-tls"}]
    if default_backend:
        spec["defaultBackend"] = {"service": {"name": default_backend, "port": {"number": 80}}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": "default",
                         "annotations": annotations or {}}, "spec": spec}


def canary(name: str, annotations: dict[str, str], backend: str = "canary",
           paths: list[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    return ingress(name, {NGINX + "canary": "true", **annotations},
                   paths or [("/", "Prefix", backend)])


def run(*docs: dict[str, Any], cfg: TranslatorConfig | None = None) -> Translation:
    objects = [parse_object(CLASS)]
    for n, d in enumerate(docs):  # created in the order given
        objects.append(replace(parse_object(d), created=float(n + 1)))
    for name in ("main", "canary", "other", "fallback", "fallback-canary"):
        objects.append(parse_object({"apiVersion": "v1", "kind": "Service",
                                     "metadata": {"name": name, "namespace": "default"},
                                     "spec": {"ports": [{"name": "http", "port": 80}]}}))
    objects.append(parse_object({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "shop-tls", "namespace": "default"},
        "stringData": {"tls.crt": CERT.decode(), "tls.key": KEY.decode()}}))
    return translate(StoreSnapshot.of(objects), cfg)


def routes(t: Translation, host: str = HOST, table: str = "ingress") -> list[ir.Route]:
    tables = {rt.name: rt for rt in t.ir.route_tables}
    vh = next(v for v in tables[table].virtual_hosts if v.domains == (host,))
    return list(vh.routes)


def route(t: Translation, name: str = "default/shop/rule0/path0", **kw: Any) -> ir.Route:
    return next(r for r in routes(t, **kw) if r.name == name)


def forward(r: ir.Route) -> ir.Forward:
    assert isinstance(r.action, ir.Forward), r.action
    return r.action


def backend(t: Translation, name: str) -> ir.Backend:
    return next(b for b in t.ir.backends if b.name == name)


def warnings(t: Translation, name: str = "shop") -> tuple[str, ...]:
    status = t.status[ObjectKey("networking.k8s.io", "Ingress", "default", name)]
    assert isinstance(status, IngressStatus)
    return status.warnings


def targets(r: ir.Route) -> list[tuple[str | None, int]]:
    return [(w.backend.split("|")[0] if w.backend else None, w.weight)
            for w in forward(r).backends if w.weight]


# -- canaries ----------------------------------------------------------------------------------

def test_canary_by_header_always_never_then_weight() -> None:
    t = run(ingress("shop"), canary("shop-canary", {
        NGINX + "canary-by-header": "X-Canary", NGINX + "canary-weight": "30"}))
    rs = routes(t)
    assert [r.name for r in rs] == ["default/shop/rule0/path0/canary-header",
                                    "default/shop/rule0/path0/canary-header-never",
                                    "default/shop/rule0/path0"]
    always, never, main = rs
    assert always.headers == (ir.StringMatch("Exact", "always", "x-canary"),)
    assert targets(always) == [("default/canary/80", 1)]
    assert never.headers == (ir.StringMatch("Exact", "never", "x-canary"),)
    assert targets(never) == [("default/main/80", 1)]
    assert not main.headers and targets(main) == [("default/main/80", 70),
                                                  ("default/canary/80", 30)]
    # Both Ingresses own what the canary changed.
    assert {o.name for o in main.owners} == {"shop", "shop-canary"}
    assert warnings(t) == () and warnings(t, "shop-canary") == ()


def test_canary_header_value_wins_over_the_pattern_and_has_no_never() -> None:
    t = run(ingress("shop"), canary("c", {
        NGINX + "canary-by-header": "X-Version", NGINX + "canary-by-header-value": "v2",
        NGINX + "canary-by-header-pattern": "^v"}))
    header, main = routes(t)
    assert header.headers == (ir.StringMatch("Exact", "v2", "x-version"),)
    assert targets(main) == [("default/main/80", 1)]  # no weight: all to main
    assert any("canary-by-header-pattern is ignored" in w for w in warnings(t, "c"))


def test_canary_header_pattern_is_found_anywhere_in_the_value() -> None:
    t = run(ingress("shop"), canary("c", {
        NGINX + "canary-by-header": "x-track", NGINX + "canary-by-header-pattern": "beta|rc"}))
    header, _ = routes(t)
    m = header.headers[0]
    assert m.type == "RegularExpression" and m.name == "x-track"
    assert re.fullmatch(m.value, "1.0-beta") and re.fullmatch(m.value, "rc")
    assert not re.fullmatch(m.value, "stable")


def test_canary_by_cookie_matches_whole_cookies() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-by-cookie": "canary"}))
    always, never, main = routes(t)
    assert always.headers[0].name == never.headers[0].name == "cookie"
    assert targets(always) == [("default/canary/80", 1)]
    assert targets(never) == [("default/main/80", 1)]
    yes, no = always.headers[0].value, never.headers[0].value
    for cookie in ("canary=always", "a=1; canary=always", "canary=always; b=2",
                   "a=1;canary=always;b=2"):
        assert re.fullmatch(yes, cookie), cookie
    for cookie in ("canary=alwaysx", "xcanary=always", "a=canary=always", "canary=never"):
        assert not re.fullmatch(yes, cookie), cookie
    assert re.fullmatch(no, "a=1; canary=never")
    assert targets(main) == [("default/main/80", 1)]


def test_canary_precedence_header_then_cookie_then_weight() -> None:
    t = run(ingress("shop"), canary("c", {
        NGINX + "canary-by-header": "x-canary", NGINX + "canary-by-cookie": "canary",
        NGINX + "canary-weight": "10"}))
    names = [r.name.rsplit("/", 1)[-1] for r in routes(t)]
    assert names == ["canary-header", "canary-header-never", "canary-cookie",
                     "canary-cookie-never", "path0"]


@pytest.mark.parametrize("weight, total, expected", [
    ("0", None, [("default/main/80", 1)]),
    ("100", None, [("default/canary/80", 100)]),
    ("1", "1000", [("default/main/80", 999), ("default/canary/80", 1)]),
    ("1000", "1000", [("default/canary/80", 1000)]),
])
def test_canary_weight_and_total(weight: str, total: str | None,
                                 expected: list[tuple[str, int]]) -> None:
    ann = {NGINX + "canary-weight": weight}
    if total:
        ann[NGINX + "canary-weight-total"] = total
    t = run(ingress("shop"), canary("c", ann))
    assert targets(route(t)) == expected


def test_canary_weight_total_under_100_is_said_to_differ() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "1",
                                          NGINX + "canary-weight-total": "4"}))
    assert targets(route(t)) == [("default/main/80", 3), ("default/canary/80", 1)]
    assert any("canary gets 1 of 4 requests; ingress-nginx's balancer used 100" in w
               for w in warnings(t, "c"))
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "1",
                                          NGINX + "canary-weight-total": "200"}))
    assert not warnings(t, "c")


def test_canary_weight_above_the_total_is_refused() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "150"}))
    assert targets(route(t)) == [("default/main/80", 1)]
    assert any('canary-weight: "150" is refused' in w for w in warnings(t, "c"))


def test_mesh_dev_prefix_works_and_wins() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "5",
                                          "mesh.dev/canary-weight": "40"}))
    assert targets(route(t)) == [("default/main/80", 60), ("default/canary/80", 40)]
    assert any("nginx.ingress.kubernetes.io/canary-weight is ignored: mesh.dev/canary-weight"
               in w for w in warnings(t, "c"))
    only_mesh = run(ingress("shop"), ingress("c", {"mesh.dev/canary": "true",
                                                   "mesh.dev/canary-weight": "50"},
                                             [("/", "Prefix", "canary")]))
    assert targets(route(only_mesh)) == [("default/main/80", 50), ("default/canary/80", 50)]


def test_one_canary_per_host_and_path_the_oldest() -> None:
    t = run(ingress("shop"), canary("first", {NGINX + "canary-weight": "10"}),
            canary("second", {NGINX + "canary-weight": "90"}, backend="other"))
    assert targets(route(t)) == [("default/main/80", 90), ("default/canary/80", 10)]
    assert any("Ingress default/first is already the canary there" in w
               for w in warnings(t, "second"))


def test_canary_without_a_main_ingress_serves_nothing_and_says_so() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "100"},
                                    paths=[("/new", "Prefix", "canary")]))
    assert [r.name for r in routes(t)] == ["default/shop/rule0/path0"]
    assert all("canary" not in (w.backend or "") for r in routes(t)
               for w in forward(r).backends)
    assert any("no main Ingress serves this host and path" in w for w in warnings(t, "c"))
    # Exact and Prefix on the same path are different places, as in ingress-nginx.
    t = run(ingress("shop"), canary("c", {NGINX + "canary-weight": "100"},
                                    paths=[("/", "Exact", "canary")]))
    assert any("no main Ingress" in w for w in warnings(t, "c"))


def test_canary_inherits_the_main_ingress_settings() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": "5", NGINX + "proxy-connect-timeout": "3",
                             NGINX + "proxy-read-timeout": "90"}),
            canary("c", {NGINX + "canary-by-header": "x-canary", NGINX + "limit-rps": "500",
                         NGINX + "proxy-read-timeout": "5", NGINX + "made-up": "1"}))
    for r in routes(t):
        assert [rl.requests for rl in r.rate_limits] == [5]
        assert forward(r).idle_timeout == 90
    header = routes(t)[0]
    b = backend(t, forward(header).backends[0].backend or "")
    assert b.name.startswith("default/canary/80|") and b.settings.connect_timeout == 3
    ws = warnings(t, "c")
    assert any("limit-rps is ignored: a canary Ingress takes its main" in w for w in ws)
    assert any("made-up is not supported" in w for w in ws)


def test_canary_of_the_default_backend() -> None:
    t = run(ingress("shop", default_backend="fallback"),
            ingress("c", {NGINX + "canary": "true", NGINX + "canary-weight": "50"},
                    paths=[], default_backend="fallback-canary"))
    fallback = routes(t)[-1]
    assert targets(fallback) == [("default/fallback/80", 50),
                                 ("default/fallback-canary/80", 50)]


def test_canary_annotations_without_canary_true_are_ignored() -> None:
    t = run(ingress("shop", {NGINX + "canary-weight": "50"}))
    assert targets(route(t)) == [("default/main/80", 1)]
    assert any("canary-weight is ignored: only for a canary Ingress" in w for w in warnings(t))


def test_bad_canary_header_name_is_refused() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-by-header": "bad header",
                                          NGINX + "canary-weight": "10"}))
    assert [r.name for r in routes(t)] == ["default/shop/rule0/path0"]
    assert any('canary-by-header: "bad header" is refused' in w for w in warnings(t, "c"))


@pytest.mark.parametrize("pattern", ["(unclosed", "[][**da?$&*", "^v(?=2)"])
def test_canary_pattern_that_cannot_run_sends_the_header_to_main(pattern: str) -> None:
    """As nginx, where a pattern that errors ends the canary's rules for requests with the
    header (the cookie is not read); one RE2 cannot run is treated the same (safe)."""
    t = run(ingress("shop"), canary("c", {NGINX + "canary-by-header": "x",
                                          NGINX + "canary-by-header-pattern": pattern,
                                          NGINX + "canary-by-cookie": "k"}))
    rs = routes(t)
    assert rs[0].headers == (ir.StringMatch("Present", "", "x"),)
    assert forward(rs[0]).backends == forward(rs[-1]).backends  # main
    assert [r.name.rsplit("/", 1)[1] for r in rs] == [
        "canary-header-never", "canary-cookie", "canary-cookie-never", "path0"]
    assert any(f'canary-by-header-pattern: "{pattern}" is refused' in w and
               "goes to the main Ingress" in w for w in warnings(t, "c"))


def test_canary_pattern_ingress_nginx_drops_leaves_always_and_never() -> None:
    t = run(ingress("shop"), canary("c", {NGINX + "canary-by-header": "x",
                                          NGINX + "canary-by-header-pattern": "a{1,2}"}))
    # ingress-nginx's validation refuses the comma: the header's always / never apply.
    assert [r.headers[0].value for r in routes(t)[:2]] == ["always", "never"]
    assert any('canary-by-header-pattern: "a{1,2}" is refused: characters' in w
               for w in warnings(t, "c"))


# -- rate limits ---------------------------------------------------------------------------

def test_limit_rps_and_rpm_per_client_with_burst() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": "10", NGINX + "limit-rpm": "300",
                             NGINX + "limit-burst-multiplier": "2",
                             NGINX + "limit-whitelist": "10.0.0.0/8, 192.0.2.7"}))
    rps, rpm = route(t).rate_limits
    per_client = (ir.RateLimitSelector("SourceIP", "Distinct", value="0.0.0.0/0"),)
    assert (rps.requests, rps.unit, rps.burst, rps.scope, rps.selectors) == \
        (10, "Second", 20, "Local", per_client)
    assert (rpm.requests, rpm.unit, rpm.burst) == (300, "Minute", 600)
    assert rps.id != rpm.id
    # No exemptions: the limit holds for every client, and a warning says so.
    assert any("limit-whitelist" in w and "not supported" in w for w in warnings(t))


def test_limit_default_burst_multiplier_is_five() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": "4"}))
    assert route(t).rate_limits[0].burst == 20


@pytest.mark.parametrize("name, value", [("limit-rps", "ten"), ("limit-rps", "-1"),
                                         ("limit-burst-multiplier", "x")])
def test_bad_limits_are_refused(name: str, value: str) -> None:
    ann = {NGINX + "limit-rps": "4", NGINX + name: value}
    t = run(ingress("shop", ann))
    assert any(f'{NGINX}{name}: "{value}" is refused' in w for w in warnings(t))


def test_limit_connections_is_not_supported() -> None:
    t = run(ingress("shop", {NGINX + "limit-connections": "10"}))
    assert route(t).rate_limits == ()
    assert any("limit-connections is not supported" in w for w in warnings(t))


# -- paths, rewrites, redirects ---------------------------------------------------------------

def test_rewrite_target_with_capture_groups() -> None:
    t = run(ingress("shop", {NGINX + "rewrite-target": "/$2"},
                    [("/api(/|$)(.*)", "ImplementationSpecific", "main")]))
    r = route(t)
    assert r.path.type == "RegularExpression"
    assert re.fullmatch(r.path.value, "/API/users") and re.fullmatch(r.path.value, "/api")
    assert not re.fullmatch(r.path.value, "/other/api")
    rewrite = forward(r).regex_rewrite
    assert rewrite is not None
    pattern, substitution = rewrite
    assert substitution == r"/\2"
    # What Envoy does with it (RE2 and Python agree on this syntax).
    py_sub = substitution.replace("\\2", "\\g<2>")
    assert re.sub(pattern, py_sub, "/api/users/7") == "/users/7"
    assert re.sub(pattern, py_sub, "/api") == "/"


def test_rewrite_target_without_groups_replaces_the_whole_path() -> None:
    t = run(ingress("shop", {NGINX + "rewrite-target": "/"}, [("/app", "Prefix", "main")]))
    pattern, substitution = forward(route(t)).regex_rewrite or ("", "")
    assert re.sub(pattern, substitution, "/app/a/b") == "/"


def test_use_regex_without_rewrite() -> None:
    t = run(ingress("shop", {NGINX + "use-regex": "true"},
                    [("/items/[0-9]+", "Prefix", "main")]))
    r = route(t)
    assert r.path.type == "RegularExpression" and forward(r).regex_rewrite is None
    assert re.fullmatch(r.path.value, "/items/42/x") and not re.fullmatch(r.path.value,
                                                                          "/items/x")


@pytest.mark.parametrize("path", ["/(unclosed", "/a(?=b)", r"/(a)\1"])
def test_path_that_is_no_usable_regex_is_matched_plainly(path: str) -> None:
    t = run(ingress("shop", {NGINX + "rewrite-target": "/$1"},
                    [(path, "ImplementationSpecific", "main")]))
    r = route(t)
    assert r.path == ir.StringMatch("Prefix", path) and forward(r).regex_rewrite is None
    assert any(f'rewrite-target: path "{path}" is refused' in w for w in warnings(t))


@pytest.mark.parametrize("target", ["/$host", "/a?b=1", "relative"])
def test_bad_rewrite_target_is_refused(target: str) -> None:
    t = run(ingress("shop", {NGINX + "rewrite-target": target}, [("/a", "Prefix", "main")]))
    assert forward(route(t)).regex_rewrite is None
    assert route(t).path == ir.StringMatch("PathSeparatedPrefix", "/a")
    assert any("rewrite-target" in w and "refused" in w for w in warnings(t))


def test_ssl_redirect_by_default_where_the_host_has_tls() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": "100"}, tls=True))
    plain = route(t)
    assert plain.action == ir.Redirect(308, scheme="https")
    assert plain.rate_limits == ()  # redirected before any limit, as in ingress-nginx
    https = route(t, table="ingress-https")
    assert targets(https) == [("default/main/80", 1)]
    listener = next(li for li in t.ir.listeners if li.port == 443)
    assert {c.route_table for c in listener.chains} == {"ingress-https"}


def test_ssl_redirect_false_and_plain_ingresses_serve_http() -> None:
    t = run(ingress("shop", {NGINX + "ssl-redirect": "false"}, tls=True))
    assert isinstance(route(t).action, ir.Forward)
    assert {rt.name for rt in t.ir.route_tables} == {"ingress"}
    # No annotation of ours: served on both ports, as before ingress-nginx annotations.
    t = run(ingress("shop", tls=True))
    assert isinstance(route(t).action, ir.Forward)


def test_ssl_redirect_needs_tls_and_force_does_not() -> None:
    t = run(ingress("shop", {NGINX + "ssl-redirect": "true"}))
    assert isinstance(route(t).action, ir.Forward)
    t = run(ingress("shop", {NGINX + "force-ssl-redirect": "true"}))
    assert route(t).action == ir.Redirect(308, scheme="https")


def test_redirect_comes_before_the_canary() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": "100"}, tls=True),
            canary("c", {NGINX + "canary-by-header": "x-canary"}))
    assert [r.action for r in routes(t)] == [
        ir.DirectResponse(308), ir.Redirect(308, scheme="https", strip_trailing_slash=True),
        ir.Redirect(308, scheme="https")]
    assert len(routes(t, table="ingress-https")) == 3


def test_redirect_to_https_drops_a_trailing_slash_unless_preserved() -> None:
    """nginx drops the request URI's last character when it is `/`: a path ending with one
    and no query (`/a/` -> https://host/a, `/` -> https://host); not with
    preserve-trailing-slash."""
    t = run(ingress("shop", {NGINX + "force-ssl-redirect": "true"}))
    root, slash, other = routes(t)
    # `/` alone: no path at all, which only a whole URL can say (the host is known).
    assert (root.path, root.headers, root.action, root.response_headers) == (
        ir.StringMatch("Exact", "/"), (ir.StringMatch("Exact", "/", ":path"),),
        ir.DirectResponse(308), ir.HeaderOps(set=(("location", "https://shop.example"),)))
    assert slash.headers == (ir.StringMatch("RegularExpression", "[^?]*/", ":path"),)
    assert re.fullmatch(slash.headers[0].value, "/a/")
    assert not re.fullmatch(slash.headers[0].value, "/a/?b=/")
    assert slash.action == ir.Redirect(308, scheme="https", strip_trailing_slash=True)
    assert other.action == ir.Redirect(308, scheme="https") and not other.headers
    t = run(ingress("shop", {NGINX + "force-ssl-redirect": "true",
                             NGINX + "preserve-trailing-slash": "true"}))
    assert [r.action for r in routes(t)] == [ir.Redirect(308, scheme="https")]
    # A host with a wildcard, or none: the redirect keeps the `/`.
    t = run(ingress("shop", {NGINX + "force-ssl-redirect": "true"}, host=None))
    assert [r.action for r in routes(t, host="*")] == [
        ir.Redirect(308, scheme="https", strip_trailing_slash=True),
        ir.Redirect(308, scheme="https")]


def test_use_forwarded_headers_serves_what_came_in_as_https() -> None:
    """Behind a load balancer that ends TLS, X-Forwarded-Proto says how the request came
    in: anything but `http` is served, not redirected (ingress-nginx's
    use-forwarded-headers)."""
    docs = (ingress("shop", {NGINX + "force-ssl-redirect": "true"}),
            canary("c", {NGINX + "canary-by-header": "x-canary"}))
    rs = routes(run(*docs, cfg=TranslatorConfig(use_forwarded_headers=True)))
    proto = ir.StringMatch("RegularExpression", nginx.NOT_HTTP, "x-forwarded-proto")
    served = [r for r in rs if isinstance(r.action, ir.Forward)]
    assert len(served) == 3 and all(r.headers[-1] == proto for r in served)
    assert rs[:3] == served and len(rs) == 6
    assert not any(isinstance(r.action, ir.Forward) for r in rs[3:])
    for value, is_http in (("http", True), ("https", False), ("", False), ("HTTP", False),
                           ("htt", False), ("https2", False), ("wss", False)):
        assert (re.fullmatch(proto.value, value) is None) == is_http, value
    assert len(routes(run(*docs))) == 3  # without the option, X-Forwarded-Proto is not read


# -- timeouts, retries, backends ------------------------------------------------------------

def test_timeouts() -> None:
    t = run(ingress("shop", {NGINX + "proxy-connect-timeout": "7",
                             NGINX + "proxy-read-timeout": "30",
                             NGINX + "proxy-send-timeout": "120s"}))
    r = route(t)
    assert forward(r).idle_timeout == 120
    b = backend(t, forward(r).backends[0].backend or "")
    assert b.name == "default/main/80|policy=ingress/default/shop"
    assert b.settings.connect_timeout == 7 and owner_names(b) == {"shop"}
    assert backend(t, "default/main/80").settings.connect_timeout is None


def owner_names(b: ir.Backend) -> set[str]:
    return {o.name for o in b.owners}


def test_bad_timeout_is_refused() -> None:
    t = run(ingress("shop", {NGINX + "proxy-read-timeout": "soon"}))
    assert forward(route(t)).idle_timeout is None
    assert any('proxy-read-timeout: "soon" is refused: not a number of seconds' in w
               for w in warnings(t))


@pytest.mark.parametrize("value, tries, expected", [
    ("error timeout", None, ir.Retry(2, (), triggers=("connect-failure", "refused-stream",
                                                       "reset"))),
    ("http_502 http_503", "4", ir.Retry(3, (502, 503), triggers=("retriable-status-codes",))),
    ("timeout http_429 non_idempotent", "0",
     ir.Retry(10, (429,), triggers=("connect-failure", "retriable-status-codes"))),
    (None, "2", ir.Retry(1, (), triggers=("connect-failure", "refused-stream", "reset"))),
    ("off", None, None),
])
def test_proxy_next_upstream(value: str | None, tries: str | None,
                             expected: ir.Retry | None) -> None:
    ann = {}
    if value is not None:
        ann[NGINX + "proxy-next-upstream"] = value
    if tries is not None:
        ann[NGINX + "proxy-next-upstream-tries"] = tries
    t = run(ingress("shop", ann))
    assert forward(route(t)).retry == expected


def test_bad_proxy_next_upstream_is_refused() -> None:
    t = run(ingress("shop", {NGINX + "proxy-next-upstream": "error sometimes"}))
    assert any('proxy-next-upstream: "error sometimes" is refused: sometimes' in w
               for w in warnings(t))
    t = run(ingress("shop", {NGINX + "proxy-next-upstream-timeout": "5"}))
    assert any("proxy-next-upstream-timeout is not supported" in w for w in warnings(t))


@pytest.mark.parametrize("value, protocol, tls", [
    ("HTTP", "http1", None), ("https", "http1", ir.UpstreamTLS("", None, verify=False)),
    ("GRPC", "h2c", None), ("H2C", "h2c", None)])
def test_backend_protocol(value: str, protocol: str, tls: ir.UpstreamTLS | None) -> None:
    t = run(ingress("shop", {NGINX + "backend-protocol": value}))
    b = backend(t, forward(route(t)).backends[0].backend or "")
    assert (b.protocol, b.tls) == (protocol, tls)


@pytest.mark.parametrize("value", ["AUTO_HTTP", "FCGI", "SPDY"])
def test_backend_protocols_not_supported(value: str) -> None:
    t = run(ingress("shop", {NGINX + "backend-protocol": value}))
    assert forward(route(t)).backends[0].backend == "default/main/80"
    assert any(f'backend-protocol: "{value}"' in w for w in warnings(t))


def test_upstream_vhost() -> None:
    t = run(ingress("shop", {NGINX + "upstream-vhost": "internal.svc"}))
    assert forward(route(t)).host_rewrite == "internal.svc"
    # The variables ingress-nginx sets in every location, filled in per path.
    t = run(ingress("shop", {NGINX + "upstream-vhost":
                             "${service_name}.$namespace.$ingress_name:$service_port"}))
    assert forward(route(t)).host_rewrite == "main.default.shop:80"
    t = run(ingress("shop", {NGINX + "upstream-vhost": "$host"}))
    assert forward(route(t)).host_rewrite is None
    assert any('upstream-vhost: "$host" is refused: nginx variables other than' in w
               for w in warnings(t))


# -- redirects, more names, headers to the backend ------------------------------------------

def test_permanent_and_temporal_redirects() -> None:
    t = run(ingress("shop", {NGINX + "permanent-redirect": "https://new.example/a?b=c",
                             NGINX + "force-ssl-redirect": "true", NGINX + "limit-rps": "5",
                             NGINX + "affinity": "cookie"}),
            canary("c", {NGINX + "canary-weight": "50"}))
    for r in routes(t):  # before the redirect to HTTPS, limits, sessions and the canary
        assert r.action == ir.DirectResponse(301)
        assert r.response_headers == ir.HeaderOps(set=(("location", "https://new.example/a?b=c"),))
        assert (r.rate_limits, r.session) == ((), None)
    t = run(ingress("shop", {NGINX + "permanent-redirect": "/elsewhere",
                             NGINX + "permanent-redirect-code": "308"}))
    assert route(t).action == ir.DirectResponse(308)
    t = run(ingress("shop", {NGINX + "temporal-redirect": "http://t.example",
                             NGINX + "permanent-redirect": "http://p.example",
                             NGINX + "temporal-redirect-code": "399"}))
    assert route(t).action == ir.DirectResponse(302)
    assert route(t).response_headers.set == (("location", "http://t.example"),)
    assert any("permanent-redirect is ignored: " in w and "temporal-redirect is set" in w
               for w in warnings(t))
    assert any('temporal-redirect-code: "399" is refused' in w for w in warnings(t))


@pytest.mark.parametrize("name, value", [
    ("permanent-redirect", "ftp://x.example"), ("permanent-redirect", "https://$host/x"),
    ("temporal-redirect", "/relative"), ("app-root", "app"), ("app-root", "/$host"),
    ("app-root", "/a?b=c"), ("server-alias", "~^www\\d+\\.example\\.com$"),
    ("server-alias", "www.example.*"), ("connection-proxy-header", "upgrade"),
    ("x-forwarded-prefix", "/$1")])
def test_bad_redirect_alias_and_header_values_are_refused(name: str, value: str) -> None:
    t = run(ingress("shop", {NGINX + name: value, NGINX + "rewrite-target": "/"}))
    assert any(f'{name}: "{value}" is refused' in w for w in warnings(t))
    r = route(t)
    assert isinstance(r.action, ir.Forward) and not r.request_headers
    assert len(routes(t)) == 1
    assert {d for vh in t.ir.route_tables[0].virtual_hosts for d in vh.domains} == {HOST, "*"}


def test_app_root_comes_first_on_the_hosts() -> None:
    t = run(ingress("other", paths=[("/", "Prefix", "other")]),
            ingress("shop", {NGINX + "app-root": "/app"}, [("/api", "Prefix", "main")]))
    first, *rest = routes(t)
    assert first == ir.Route(name="default/shop/app-root", path=ir.StringMatch("Exact", "/"),
                             action=ir.Redirect(302, full_path="/app", strip_query=True),
                             owners=frozenset({ObjectKey("networking.k8s.io", "Ingress",
                                                         "default", "shop")}))
    assert len(rest) == 2 and all(isinstance(r.action, ir.Forward) for r in rest)


def test_server_alias() -> None:
    t = run(ingress("shop", {NGINX + "server-alias":
                             "Alias.example, *.wild.example, other.example"}),
            ingress("other", {NGINX + "server-alias": "alias.example, more.example"},
                    host="other.example"),
            ingress("late", {NGINX + "server-alias": "late.example"}))
    domains = {vh.domains[0]: vh.domains for vh in t.ir.route_tables[0].virtual_hosts}
    assert domains[HOST] == (HOST, "alias.example", "*.wild.example")
    assert domains["other.example"] == ("other.example", "more.example")
    assert any("other.example is a host of its own or another's alias" in w
               for w in warnings(t))
    assert any("alias.example is a host of its own or another's alias" in w
               for w in warnings(t, "other"))
    assert any(f"host {HOST} has its aliases from an older Ingress" in w
               for w in warnings(t, "late"))


def test_from_to_www_redirect() -> None:
    t = run(ingress("shop", {NGINX + "from-to-www-redirect": "true"}),
            ingress("www", {NGINX + "from-to-www-redirect": "true"}, host="www.b.example"),
            ingress("c", {NGINX + "from-to-www-redirect": "true"}, host="c.example"),
            ingress("c-www", host="www.c.example"))
    vhosts = {vh.domains: vh for vh in t.ir.route_tables[0].virtual_hosts}
    slash, rest = vhosts[("www.shop.example",)].routes
    assert slash.action == ir.Redirect(308, host=HOST, strip_trailing_slash=True)
    assert rest.action == ir.Redirect(308, host=HOST) and rest.path.value == "/"
    assert vhosts[("b.example",)].routes[1].action == ir.Redirect(308, host="www.b.example")
    assert ("www.c.example",) in vhosts  # served: no redirect from it
    assert isinstance(vhosts[("www.c.example",)].routes[0].action, ir.Forward)
    assert any("www.c.example is served already" in w for w in warnings(t, "c"))


def test_x_forwarded_prefix_and_connection_header() -> None:
    t = run(ingress("shop", {NGINX + "rewrite-target": "/x", NGINX + "x-forwarded-prefix": "/api",
                             NGINX + "connection-proxy-header": "close"}))
    assert route(t).request_headers == ir.HeaderOps(set=(
        ("x-forwarded-prefix", "/api"), ("connection", "close")))
    t = run(ingress("shop", {NGINX + "x-forwarded-prefix": "/api"}))
    assert not route(t).request_headers
    assert any("x-forwarded-prefix is ignored: it needs" in w for w in warnings(t))
    t = run(ingress("shop", {NGINX + "rewrite-target": "/x", NGINX + "x-forwarded-prefix": ""}))
    assert not route(t).request_headers and not warnings(t)


# -- affinity, CORS, allow lists -------------------------------------------------------------

def test_cookie_affinity() -> None:
    t = run(ingress("shop", {NGINX + "affinity": "cookie",
                             NGINX + "session-cookie-max-age": "600"},
                    [("/cart", "Prefix", "main")]))
    assert route(t).session == ir.SessionPersistence("Cookie", "INGRESSCOOKIE", 600.0,
                                                     "/cart")
    t = run(ingress("shop", {NGINX + "affinity": "cookie", NGINX + "session-cookie-name": "s",
                             NGINX + "session-cookie-expires": "60",
                             NGINX + "session-cookie-path": "/", NGINX + "affinity-mode":
                             "persistent", NGINX + "session-cookie-samesite": "Lax"},
                    [("/cart", "Prefix", "main")]))
    assert route(t).session == ir.SessionPersistence("Cookie", "s", None, "/", expires=60.0,
                                                     same_site="Lax")
    assert not warnings(t)
    # Both max-age and expires: Max-Age and Expires, as ingress-nginx; Domain, Secure.
    t = run(ingress("shop", {NGINX + "affinity": "cookie", NGINX + "session-cookie-expires": "60",
                             NGINX + "session-cookie-max-age": "30",
                             NGINX + "session-cookie-domain": ".foo.bar",
                             NGINX + "session-cookie-secure": "true"}))
    assert route(t).session == ir.SessionPersistence(
        "Cookie", "INGRESSCOOKIE", 30.0, "/", expires=60.0, domain=".foo.bar", secure=True)
    assert not warnings(t)
    t = run(ingress("shop", {NGINX + "affinity": "cookie",
                             NGINX + "session-cookie-domain": "foo.bar; Secure",
                             NGINX + "session-cookie-samesite": "sometimes"}))
    assert route(t).session == ir.SessionPersistence("Cookie", "INGRESSCOOKIE", None, "/")
    assert len([w for w in warnings(t) if "is refused" in w]) == 2
    t = run(ingress("shop", {NGINX + "session-cookie-name": "s"}))
    assert route(t).session is None
    assert any("session-cookie-name is ignored: it needs" in w for w in warnings(t))


CORS_STAR = (("access-control-allow-origin", "*"), ("access-control-allow-credentials", "true"),
             ("access-control-allow-methods", "GET, PUT, POST, DELETE, PATCH, OPTIONS"),
             ("access-control-allow-headers", "DNT, Keep-Alive, User-Agent, X-Requested-With, "
              "If-Modified-Since, Cache-Control, Content-Type, Range, Authorization"),
             ("access-control-max-age", "1728000"))


@pytest.mark.parametrize("origin", [None, "*", "", "  ", "*, foo.bar.com", "https://a.example, *"])
def test_cors_any_origin_as_nginx_sends_it(origin: str | None) -> None:
    """Origin `*` (the default; blank; or a list with `*`): every response carries
    `Access-Control-Allow-Origin: *` and the rest, Origin or not, and every OPTIONS request
    is answered 204 before the allow lists and limits, as nginx's CORS block does."""
    ann = {NGINX + "enable-cors": "true", NGINX + "limit-rps": "5",
           NGINX + "allowlist-source-range": "10.0.0.0/8"}
    if origin is not None:
        ann[NGINX + "cors-allow-origin"] = origin
    t = run(ingress("shop", ann))
    preflight, main = routes(t)
    assert main.cors is None and main.response_headers == ir.HeaderOps(set=CORS_STAR)
    assert main.allowed_sources and main.rate_limits
    assert preflight == ir.Route(
        name="default/shop/rule0/path0/cors-preflight", path=main.path, method="OPTIONS",
        action=ir.DirectResponse(204), owners=main.owners,
        response_headers=ir.HeaderOps(set=CORS_STAR))
    assert not [w for w in warnings(t) if "cors" in w]


def test_cors_settings() -> None:
    t = run(ingress("shop", {
        NGINX + "enable-cors": "true",
        NGINX + "cors-allow-origin": "https://a.example, https://*.b.example",
        NGINX + "cors-allow-methods": "get, POST", NGINX + "cors-allow-headers": "X-A,X-B",
        NGINX + "cors-expose-headers": "X-C", NGINX + "cors-allow-credentials": "false",
        NGINX + "cors-max-age": "60"}))
    assert route(t).cors == ir.Cors(("https://a.example", "https://*.b.example"),
                                    ("get", "POST"), ("X-A", "X-B"), ("X-C",), False, 60,
                                    origin_wildcard="Label")
    assert len(routes(t)) == 1  # Envoy's CORS filter answers the preflights of listed origins


def test_a_bad_cors_origin_is_skipped_the_others_kept() -> None:
    t = run(ingress("shop", {NGINX + "enable-cors": "true", NGINX + "cors-allow-origin":
                             "https://ok.example, not an origin, origin.example:80, null, "
                             "test://localhost, tauri://localhost:3000"}))
    cors = route(t).cors
    assert cors is not None and cors.allow_origins == (
        "https://ok.example", "null", "test://localhost", "tauri://localhost:3000")
    assert [w for w in warnings(t) if "cors-allow-origin" in w] == [
        f'{NGINX}cors-allow-origin: "{o}" is skipped: not an origin (scheme://host[:port], '
        "scheme://*.host[:port], null or *)" for o in ("not an origin", "origin.example:80")]
    # None left: no origin is allowed (as ingress-nginx), not any.
    t = run(ingress("shop", {NGINX + "enable-cors": "true",
                             NGINX + "cors-allow-origin": "HTTPS://upper.example"}))
    cors = route(t).cors
    assert cors is not None and cors.allow_origins == ()
    t = run(ingress("shop", {NGINX + "cors-allow-origin": "https://a.example"}))
    assert route(t).cors is None
    assert any("cors-allow-origin is ignored: it needs" in w for w in warnings(t))


def _slice(service: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": service, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [address]}]}


@pytest.mark.parametrize("behavior", [None, "sticky", "legacy"])
def test_canary_affinity_behavior(behavior: str | None) -> None:
    """With the main Ingress's cookie affinity, the canary's routes set the same cookie;
    each backend knows the other's endpoints as sticky ones: a client the canary served
    stays on it (sticky; legacy: the main backend does not know the canary's), and one
    stuck to the main backend stays there whatever the canary's rules say (both)."""
    ann = {NGINX + "canary-by-header": "x-canary", NGINX + "canary-weight": "1"}
    if behavior:
        ann[NGINX + "affinity-canary-behavior"] = behavior
    t = run(_slice("main", "10.0.0.1"), _slice("canary", "10.0.0.2"),
            ingress("shop", {NGINX + "affinity": "cookie", NGINX + "session-cookie-name": "aff"}),
            canary("c", ann))
    rs = routes(t)
    assert all(r.session is not None and r.session.name == "aff" for r in rs)
    main = forward(rs[-1]).backends
    to_canary = forward(rs[0]).backends[0].backend or ""
    assert [w.weight for w in main] == [99, 1] and main[1].backend == to_canary
    assert backend(t, to_canary).endpoints == (ir.Endpoint("10.0.0.2", 8080),)
    assert backend(t, to_canary).sticky_endpoints == (ir.Endpoint("10.0.0.1", 8080),)
    main_backend = backend(t, main[0].backend or "")
    assert main_backend.endpoints == (ir.Endpoint("10.0.0.1", 8080),)
    assert main_backend.sticky_endpoints == (
        () if behavior == "legacy" else (ir.Endpoint("10.0.0.2", 8080),))
    assert not warnings(t, "c")
    # Without affinity: nothing sticky, the backends as they are.
    t = run(_slice("main", "10.0.0.1"), _slice("canary", "10.0.0.2"), ingress("shop"),
            canary("c", ann))
    assert [w.backend for w in forward(routes(t)[-1]).backends] == [
        "default/main/80", "default/canary/80"]


def test_affinity_canary_behavior_belongs_on_the_canary() -> None:
    t = run(ingress("shop", {NGINX + "affinity-canary-behavior": "legacy"}))
    assert any("affinity-canary-behavior is ignored: only for a canary" in w
               for w in warnings(t))
    t = run(ingress("shop"), canary("c", {NGINX + "affinity-canary-behavior": "sometimes"}))
    assert any('affinity-canary-behavior: "sometimes" is refused' in w
               for w in warnings(t, "c"))


def test_session_cookie_is_secure_over_https() -> None:
    """ingress-nginx's cookie is Secure when the request came over HTTPS, or always with
    session-cookie-secure: port 443 gets a table of its own for it."""
    t = run(ingress("shop", {NGINX + "affinity": "cookie", NGINX + "ssl-redirect": "false",
                             NGINX + "session-cookie-secure": "false"}, tls=True))
    plain, https = route(t).session, route(t, table="ingress-https").session
    assert plain is not None and not plain.secure and https is not None and https.secure
    t = run(ingress("shop", {NGINX + "affinity": "cookie", NGINX + "ssl-redirect": "false",
                             NGINX + "session-cookie-secure": "true"}, tls=True))
    assert {rt.name for rt in t.ir.route_tables} == {"ingress"}
    session = route(t).session
    assert session is not None and session.secure


def test_whitelist_source_range() -> None:
    t = run(ingress("shop", {NGINX + "whitelist-source-range": "10.0.0.0/8, 192.0.2.1"}))
    assert route(t).allowed_sources == ("10.0.0.0/8", "192.0.2.1/32")
    t = run(ingress("shop", {NGINX + "allowlist-source-range": "10.1.0.0/16"}))
    assert route(t).allowed_sources == ("10.1.0.0/16",)


def test_bad_whitelist_source_range_lets_nobody_in() -> None:
    t = run(ingress("shop", {NGINX + "whitelist-source-range": "10.0.0.0/8,nope"}),
            canary("c", {NGINX + "canary-by-header": "x"}))
    assert all(r.action == ir.DirectResponse(403, "") for r in routes(t))
    assert any('whitelist-source-range: "10.0.0.0/8,nope" is refused: nope is not' in w
               for w in warnings(t))


def test_denylist_source_range_before_the_allow_list() -> None:
    t = run(ingress("shop", {NGINX + "denylist-source-range": "18.0.0.0/8, 56.0.0.1"}))
    r = route(t)
    assert (r.denied_sources, r.allowed_sources) == (("18.0.0.0/8", "56.0.0.1/32"), ())
    assert not r.sources_from_forwarded_for and not warnings(t)
    t = run(ingress("shop", {NGINX + "denylist-source-range": "10.1.0.0/16",
                             NGINX + "allowlist-source-range": "10.0.0.0/8"}))
    assert (route(t).denied_sources, route(t).allowed_sources) == (("10.1.0.0/16",),
                                                                   ("10.0.0.0/8",))
    # A deny list that does not parse: closed, as a bad allow list.
    t = run(ingress("shop", {NGINX + "denylist-source-range": "10.0.0.0/8, 300.1.1.1"}))
    assert route(t).action == ir.DirectResponse(403, "")
    assert any('denylist-source-range: "10.0.0.0/8, 300.1.1.1" is refused' in w
               for w in warnings(t))


def test_use_forwarded_headers_takes_the_client_from_x_forwarded_for() -> None:
    docs = [ingress("shop", {NGINX + "denylist-source-range": "18.0.0.0/8"}),
            ingress("other", {NGINX + "allowlist-source-range": "10.0.0.0/8"},
                    host="other.example"),
            ingress("plain", {NGINX + "enable-cors": "true"}, host="plain.example")]
    t = run(*docs, cfg=TranslatorConfig(use_forwarded_headers=True))
    assert route(t).sources_from_forwarded_for
    assert route(t, "default/other/rule0/path0", host="other.example").sources_from_forwarded_for
    assert not route(t, "default/plain/rule0/path0",
                     host="plain.example").sources_from_forwarded_for
    assert not any(r.sources_from_forwarded_for for r in routes(run(*docs)))


# -- values and unsupported annotations ------------------------------------------------------

@pytest.mark.parametrize("name", ["enable-cors", "use-regex", "canary"])
def test_bad_booleans_are_refused(name: str) -> None:
    t = run(ingress("shop", {NGINX + name: "yes please"}))
    assert any(f'{NGINX}{name}: "yes please" is refused: not a boolean' in w
               for w in warnings(t))


def test_values_that_are_not_strings_are_refused() -> None:
    t = run(ingress("shop", {NGINX + "limit-rps": 5, NGINX + "enable-cors": None}))
    ws = warnings(t)
    assert any(f"{NGINX}limit-rps: 5 is refused: annotation values are strings" in w
               for w in ws)
    assert route(t).rate_limits == ()


def test_unsupported_annotations_are_named_and_the_rest_works() -> None:
    t = run(ingress("shop", {NGINX + "configuration-snippet": "x", NGINX + "made-up": "y",
                             "mesh.dev/whatever": "z", NGINX + "limit-rps": "3",
                             "other.io/ignored": "not ours"}))
    ws = warnings(t)
    assert any("configuration-snippet is not supported (nginx configuration snippets" in w
               for w in ws)
    assert any(f"{NGINX}made-up is not supported: ignored" == w for w in ws)
    assert any("mesh.dev/whatever is not supported" in w for w in ws)
    assert not any("other.io" in w for w in ws)
    assert route(t).rate_limits[0].requests == 3


def test_warnings_stay_out_of_the_api_status_and_come_as_events() -> None:
    t = run(ingress("shop", {NGINX + "made-up": "y"}))
    status = t.status[ObjectKey("networking.k8s.io", "Ingress", "default", "shop")]
    assert isinstance(status, IngressStatus)
    assert set(status.to_kubernetes()) == {"loadBalancer"}
    assert status.events() == [{"type": "Warning", "reason": "NotApplied",
                                "message": f"{NGINX}made-up is not supported: ignored"}]


def test_plain_ingress_is_unchanged() -> None:
    t = run(ingress("shop", paths=[("/a", "Prefix", "main"), ("/b", "Exact", "other")]))
    # Exact before Prefix on equal length.
    assert [r.path for r in routes(t)] == [ir.StringMatch("Exact", "/b"),
                                           ir.StringMatch("PathSeparatedPrefix", "/a")]
    assert all(r.rate_limits == () and r.cors is None and r.session is None
               for r in routes(t))
    assert warnings(t) == ()
