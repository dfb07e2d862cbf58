"""Ingress v1 to IR: the Ingresses of our IngressClass share one address, on ports 80 and
(when any has TLS) 443.

Paths: `Exact` matches exactly, `Prefix` by whole path segments, `ImplementationSpecific` as a
plain string prefix. Longest path first, Exact before Prefix on equal length, then the oldest
Ingress. The default backend answers what no rule matches, on every host.

ingress-nginx's annotations (`ingress_annotations`) shape the routes and backends; a canary
Ingress (`canary: "true"`) adds routes in front of its main Ingress's route for the same host
and path, and turns that route into a weighted split. When some route redirects plain HTTP
to HTTPS, port 443 gets a route table of its own, without the redirects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import ingress_annotations as nginx
from mesh.translate import ingress_auth, ingress_extras, model
from mesh.translate.ingress_annotations import IngressSettings
from mesh.translate.route_builder import Entry, Resolution, RouteBuilder
from mesh.translate.status import IngressStatus, ObjectStatus

_TABLE = "ingress"
_HTTPS_TABLE = "ingress-https"  # only when port 80 redirects somewhere


@dataclass
class IngressResult:
    listeners: tuple[ir.Listener, ...] = ()
    status: dict[ObjectKey, ObjectStatus] = field(default_factory=dict)
    used_address: str | None = None


@dataclass(frozen=True)
class _Canary:
    owner: ObjectKey
    rules: nginx.Canary
    backend: str


@dataclass
class _Slot:
    """One main Ingress path as it serves, and the canary that takes some of it."""

    route: ir.Route
    forward: ir.Forward | None  # the route's action with a backend (None: it never forwards)
    redirect: bool  # plain HTTP answers with a redirect to HTTPS
    owner: ObjectKey
    settings: IngressSettings
    canary: _Canary | None = None
    preflight: ir.Route | None = None  # CORS with origin `*`: OPTIONS answered first
    backend: str | None = None  # the backend the path goes to, before any copy of it

    def retarget(self, old: str | None, new: str | None) -> None:
        """Send what went to backend `old` to `new`."""
        def swap(a: ir.Forward) -> ir.Forward:
            return replace(a, backends=tuple(replace(w, backend=new) if w.backend == old
                                             else w for w in a.backends))
        if isinstance(self.route.action, ir.Forward):
            self.route = replace(self.route, action=swap(self.route.action))
        if self.forward is not None:
            self.forward = swap(self.forward)

    def routes(self, https: bool, host: str = "*") -> list[ir.Route]:
        first = [self.preflight] if self.preflight is not None else []
        serve = self._serving()
        if https:  # a session cookie set over HTTPS is Secure
            serve = [replace(x, session=replace(x.session, secure=True))
                     if x.session is not None else x for x in serve]
        if not self.redirect or https:
            return first + serve
        # Before anything else, as ingress-nginx redirects before limits and access.
        r = self.route
        owners = frozenset(o for x in serve for o in x.owners)
        redirect = ir.Redirect(nginx.REDIRECT_STATUS, scheme="https")
        out = [ir.Route(name=r.name, path=r.path, owners=owners, action=redirect)]
        if not self.settings.preserve_trailing_slash:
            # nginx drops the last character of the request URI when it is a slash: a path
            # that ends with one, when there is no query.
            out.insert(0, replace(out[0], name=f"{r.name}/trailing-slash", headers=(
                ir.StringMatch("RegularExpression", "[^?]*/", ":path"),),
                action=replace(redirect, strip_trailing_slash=True)))
            if "*" not in host and r.path in (ir.StringMatch("Prefix", "/"),
                                               ir.StringMatch("Exact", "/")):
                # `/` alone becomes no path at all (https://host), which a redirect cannot
                # say (an empty path is `/`): the host is known, the whole URL is given.
                out.insert(0, ir.Route(
                    name=f"{r.name}/root", path=ir.StringMatch("Exact", "/"),
                    headers=(ir.StringMatch("Exact", "/", ":path"),), owners=owners,
                    action=ir.DirectResponse(nginx.REDIRECT_STATUS),
                    response_headers=ir.HeaderOps(set=(("location", f"https://{host}"),))))
        if self.settings.forwarded_headers:
            # A load balancer in front said the request came in another way than http
            # (X-Forwarded-Proto): served, not redirected.
            other = ir.StringMatch("RegularExpression", nginx.NOT_HTTP, "x-forwarded-proto")
            out = [replace(x, name=f"{x.name}/forwarded-proto", headers=(*x.headers, other))
                   for x in serve] + out
        return first + out

    def _serving(self) -> list[ir.Route]:
        if self.canary is None:
            return [self.route]
        c = self.canary
        return nginx.canary_routes(self.route, self.forward, c.rules, c.backend, c.owner)


class _Variants:
    """Copies of backends with an Ingress's backend settings, named after it. Routes name
    them as they are built; the copies are made once every route is (from the backends
    as the route builder has them, with their TLS, protocol and policies)."""

    def __init__(self) -> None:
        self.wanted: dict[str, tuple[str, IngressSettings, str | None]] = {}

    def of(self, name: str | None, s: IngressSettings, owner: ObjectKey,
           sticky: str | None = None) -> str | None:
        """`sticky`: another backend whose endpoints a session may stick to through this
        one (a canary's and its main backend's, each other's)."""
        if name is None or not (s.shapes_backend or sticky):
            return name
        # "|policy=" marks a backend copy: the route builder counts its routes' owners.
        variant = f"{name}|policy=ingress/{owner.namespace}/{owner.name}" + (
            f"|sticky={sticky}" if sticky else "")
        self.wanted[variant] = (name, s, sticky)
        return variant

    def register(self, routes: RouteBuilder, used: list[ir.Route]) -> dict[str, str]:
        """Make and register the copies; returns the ones that could not be made (copy ->
        the backend itself)."""
        if not self.wanted:
            return {}
        bases = {b.name: b for b in routes.backends()}
        made, missing = [], {}
        # Routes that never forward (a redirect, a refused allow list) need no copy.
        sent_to = {w.backend for r in used if isinstance(r.action, ir.Forward)
                   for w in r.action.backends}
        for variant, (name, s, sticky) in sorted(self.wanted.items()):
            if variant not in sent_to:
                continue
            base = bases.get(name)
            if base is None:
                missing[variant] = name
                continue
            other = bases.get(sticky) if sticky else None
            made.append(replace(nginx.shape_backend(s, base), name=variant, owners=frozenset(),
                                sticky_endpoints=tuple(e for e in other.endpoints
                                                       if e not in base.endpoints)
                                if other is not None else ()))
        # No host: this entry only registers the copies and who uses them.
        routes.put(_TABLE, (), Entry(http=tuple(((), r) for r in used), variants=tuple(made)))
        return missing


def _our_classes(snapshot: StoreSnapshot, controller: str) -> tuple[set[str], str | None]:
    ours, default = set(), None
    for obj in snapshot.of_kind(kinds.INGRESS_CLASS):
        if obj.spec.get("controller") == controller:
            ours.add(obj.name)
            if obj.annotations.get("ingressclass.kubernetes.io/is-default-class") == "true":
                default = obj.name
    return ours, default


def translate_ingresses(snapshot: StoreSnapshot, cfg: Any, routes: RouteBuilder,
                        allocate: Callable[[], str | None]) -> IngressResult:
    classes, default = _our_classes(snapshot, cfg.ingress_controller)
    ingresses: list[tuple[model.Ingress, IngressSettings]] = []
    result = IngressResult()
    for obj in sorted(snapshot.of_kind(kinds.INGRESS), key=lambda o: (o.created, o.namespace,
                                                                  o.name)):
        try:
            ing = model.parse_ingress(obj)
        except model.Invalid:
            continue
        if (ing.class_name or default) in classes:
            settings = nginx.parse(obj)
            if cfg.use_forwarded_headers:
                settings = replace(settings, forwarded_headers=True)
            ingresses.append((ing, settings))
    if not ingresses:
        return result
    address = allocate()
    if address is None:
        return result
    result.used_address = address
    warnings = {ing.obj.key: list(s.warnings) for ing, s in ingresses}
    # Certificates first: ssl-redirect depends on whether a host has one.
    tls: list[tuple[tuple[str, ...], str, ObjectKey]] = []
    for ing, _ in ingresses:
        for tls_hosts, secret_name in ing.tls:
            secret = snapshot.get(kinds.SECRET, ing.obj.namespace, secret_name)
            cert = routes.certificate(secret) if secret is not None else None
            if cert is not None:
                tls.append((tls_hosts, cert, ing.obj.key))
    tls_names = {h for hosts, _, _ in tls for h in hosts}
    variants = _Variants()
    hosts: dict[str, list[tuple[tuple[Any, ...], _Slot]]] = {}
    defaults: list[_Slot] = []
    by_path: dict[tuple[str, str, bool], list[tuple[tuple[Any, ...], _Slot]]] = {}
    for ing, s in ingresses:
        if s.canary is not None:
            continue
        obj = ing.obj
        for i, rule in enumerate(ing.rules):
            host = rule.host or "*"
            for j, p in enumerate(rule.paths):
                slot = _main(routes, variants, ing, s, p.backend, p.path, p.path_type,
                             f"{obj.namespace}/{obj.name}/rule{i}/path{j}",
                             _has_tls(host, tls_names), warnings[obj.key])
                exact = p.path_type == "Exact"
                key = (-len(p.path), not exact, obj.created, obj.namespace, obj.name, i, j)
                hosts.setdefault(host, []).append((key, slot))
                by_path.setdefault((host, p.path, exact), []).append((key, slot))
        if ing.default_backend is not None:
            defaults.append(_main(routes, variants, ing, s, ing.default_backend, None,
                                  "Prefix", f"{obj.namespace}/{obj.name}/default", False,
                                  warnings[obj.key]))
    # The route that serves a host and path is the one its canary joins.
    serving = {k: min(v, key=lambda kv: kv[0])[1] for k, v in by_path.items()}
    for ing, s in ingresses:
        if s.canary is not None:
            _attach_canary(routes, variants, ing, s.canary, serving,
                           defaults[0] if defaults else None, warnings[ing.obj.key])
    hosts.setdefault("*", [])
    aliases, www = _server_names(ingresses, set(hosts), warnings)
    app_roots = _app_roots(ingresses)
    owners = frozenset(i.obj.key for i, _ in ingresses)
    slots = [slot for v in hosts.values() for _, slot in v] + defaults[:1]
    # Port 443 has a table of its own when it serves differently: no redirects, session
    # cookies Secure (ingress-nginx's default on HTTPS).
    https_differs = any(slot.redirect or (slot.settings.session is not None and
                                          not slot.settings.session.secure) for slot in slots)
    tables = [(_TABLE, False)] + ([(_HTTPS_TABLE, True)] if https_differs and tls else [])
    built = []
    for table_name, https in tables:
        vhosts = []
        for host in sorted(hosts, key=lambda h: (h == "*", h.startswith("*"), h)):
            ordered = [r for _, slot in sorted(hosts[host], key=lambda ks: ks[0])
                       for r in slot.routes(https, host)]
            fallback = [r for slot in defaults[:1] for r in slot.routes(https, host)]
            # app-root is the server's, before any of its locations.
            first = [app_roots[host]] if host in app_roots else []
            vhosts.append(ir.VirtualHost(f"{table_name}/{host}", (host, *aliases.get(host, ())),
                                         tuple(first + ordered + fallback)))
        for name, (to, by) in sorted(www.items()):
            vhosts.append(_www_redirect(table_name, name, to, by))
        built.append(ir.RouteTable(table_name, tuple(vhosts), owners))
    missing = variants.register(routes, [r for t in built for vh in t.virtual_hosts
                                         for r in vh.routes])
    for table in built:
        routes.put_table(_without(table, missing) if missing else table)
    for ing, _ in ingresses:
        result.status[ing.obj.key] = IngressStatus((address,), tuple(warnings[ing.obj.key]))
    # use-forwarded-headers: one load balancer in front, whose X-Forwarded-For is believed.
    hops = 1 if cfg.use_forwarded_headers else 0
    listeners = [ir.Listener(f"{address}:80", address, 80, "HTTP",
                             (ir.FilterChain("ingress-http", route_table=_TABLE,
                                             owners=owners),), owners, trusted_proxy_hops=hops)]
    if tls:
        https_table = tables[-1][0]
        chains = tuple(ir.FilterChain(f"ingress-tls/{n}", server_names=tuple(h),
                                      certificates=(cert,), route_table=https_table,
                                      owners=frozenset({key}))
                       for n, (h, cert, key) in enumerate(tls))
        listeners.append(ir.Listener(f"{address}:443", address, 443, "HTTPS", chains, owners,
                                     trusted_proxy_hops=hops))
    result.listeners = tuple(listeners)
    return result


_Redirects = dict[str, tuple[str, frozenset[ObjectKey]]]  # name -> (host, owners)


def _server_names(ingresses: list[tuple[model.Ingress, IngressSettings]], hosts: set[str],
                  warnings: dict[ObjectKey, list[str]]
                  ) -> tuple[dict[str, tuple[str, ...]], _Redirects]:
    """More names for the hosts, as ingress-nginx gives them: server-alias (the first
    Ingress of a host with aliases names them) and from-to-www-redirect (the name with or
    without `www.` redirects to the host). A name that is a host of its own, or already
    another's, is not taken, with a warning."""
    used = set(hosts)
    aliases: dict[str, tuple[str, ...]] = {}
    for ing, s in ingresses:
        if s.canary is not None or not s.aliases:
            continue
        said = warnings[ing.obj.key]
        for host in dict.fromkeys(r.host for r in ing.rules if r.host):
            if host in aliases:
                said.append(f"server-alias: host {host} has its aliases from an older Ingress: "
                            "ignored there")
                continue
            names = []
            for name in s.aliases:
                if name in used:
                    if name != host:
                        said.append(f"server-alias: {name} is a host of its own or another's "
                                    f"alias: not an alias of {host}")
                    continue
                names.append(name)
                used.add(name)
            aliases[host] = tuple(names)
    www: _Redirects = {}
    for ing, s in ingresses:
        if s.canary is not None or not s.from_to_www:
            continue
        for host in dict.fromkeys(r.host for r in ing.rules if r.host and "*" not in r.host):
            other = host[4:] if host.startswith("www.") else f"www.{host}"
            if other in www and www[other][0] == host:
                www[other] = (host, www[other][1] | {ing.obj.key})
            elif other in used:
                warnings[ing.obj.key].append(
                    f"from-to-www-redirect: {other} is served already (a host or an alias): "
                    f"no redirect from it to {host}")
            else:
                www[other] = (host, frozenset({ing.obj.key}))
                used.add(other)
    return aliases, www


def _www_redirect(table: str, name: str, to: str, owners: frozenset[ObjectKey]) -> ir.VirtualHost:
    """from-to-www-redirect's other name: every request redirected (308) to the host, the
    scheme and path kept, a trailing `/` dropped, as ingress-nginx's redirect server."""
    redirect = ir.Redirect(nginx.REDIRECT_STATUS, host=to)
    everything = ir.StringMatch("Prefix", "/")
    return ir.VirtualHost(f"{table}/{name}", (name,), (
        ir.Route(name=f"from-to-www/{name}/trailing-slash", path=everything, headers=(
            ir.StringMatch("RegularExpression", "[^?]*/", ":path"),),
            action=replace(redirect, strip_trailing_slash=True), owners=owners),
        ir.Route(name=f"from-to-www/{name}", path=everything, action=redirect, owners=owners)))


def _app_roots(ingresses: list[tuple[model.Ingress, IngressSettings]]) -> dict[str, ir.Route]:
    """app-root: `/` alone (any query) answers 302 to the application's root, on the
    Ingress's hosts, before any path (nginx's `if ($uri = /)` in the server); the first
    Ingress of a host with one decides."""
    out: dict[str, ir.Route] = {}
    for ing, s in ingresses:
        if s.canary is not None or s.app_root is None:
            continue
        obj = ing.obj
        for host in dict.fromkeys(r.host or "*" for r in ing.rules):
            out.setdefault(host, ir.Route(
                name=f"{obj.namespace}/{obj.name}/app-root", path=ir.StringMatch("Exact", "/"),
                action=ir.Redirect(302, full_path=s.app_root, strip_query=True),
                owners=frozenset({obj.key})))
    return out


def _has_tls(host: str, names: set[str]) -> bool:
    if host in names:
        return True
    parent = host.split(".", 1)[1] if "." in host and not host.startswith("*") else None
    return parent is not None and f"*.{parent}" in names


def _main(routes: RouteBuilder, variants: _Variants, ing: model.Ingress, s: IngressSettings,
          backend: model.IngressBackend, path: str | None, path_type: str, name: str,
          tls: bool, warnings: list[str]) -> _Slot:
    """A main Ingress's path (`path` None: its default backend), its annotations applied."""
    obj = ing.obj
    match = _path(path or "/", path_type)
    regex = None
    if s.regex and path is not None:
        problem = nginx.regex_problem(path)
        if problem is None:
            match, regex = nginx.regex_path(path), path
        else:
            warnings.append(f'{s.regex_by}: path "{path}" is refused as a regular expression '
                            f"({problem}): it is matched as a plain path, without rewrite")
    base = _fallback(routes, ing, backend, s, warnings)
    target = variants.of(base, s, obj.key)
    vhost = nginx.expand_vhost(s.host_rewrite, {
        "namespace": obj.namespace, "ingress_name": obj.name, "service_name": backend.service,
        "service_port": str(backend.port_number or backend.port_name or "")})
    route = nginx.shape_route(replace(s, host_rewrite=vhost), ir.Route(
        name=name, path=match, action=ir.Forward((ir.WeightedBackend(target, 1),)),
        owners=frozenset({obj.key})), regex)
    route = ingress_extras.apply(s.max_request_bytes, s.extras, ingress_auth.apply(
        s.auth, route, lambda ns, svc, port: _service(routes, obj, ns, svc, port), warnings),
        lambda ns, svc, port: _service(routes, obj, ns, svc, port), warnings)
    forward = route.action if isinstance(route.action, ir.Forward) else None
    if target is None and forward is not None:
        route = replace(route, action=ir.DirectResponse(503, ""))
    # A redirect to a URL (permanent-redirect...) comes before the one to HTTPS, as nginx's
    # `return` before its rewrite_by_lua.
    redirect = (s.force_ssl_redirect or (s.ssl_redirect and tls)) and s.url_redirect is None
    return _Slot(route, forward, redirect, obj.key, s,
                 preflight=nginx.cors_preflight(s, route), backend=base)


def _attach_canary(routes: RouteBuilder, variants: _Variants, ing: model.Ingress,
                   canary: nginx.Canary, serving: dict[tuple[str, str, bool], _Slot],
                   default: _Slot | None, warnings: list[str]) -> None:
    """Join a canary Ingress's paths to the main routes for the same host and path (as
    ingress-nginx: one canary per host and path, the oldest)."""
    places: list[tuple[str, _Slot | None, model.IngressBackend]] = []
    for i, rule in enumerate(ing.rules):
        host = rule.host or "*"
        for j, p in enumerate(rule.paths):
            places.append((f"rule {i} path {j} ({host} {p.path})",
                           serving.get((host, p.path, p.path_type == "Exact")), p.backend))
    if ing.default_backend is not None:
        places.append(("the default backend", default, ing.default_backend))
    if not places:
        warnings.append("a canary Ingress without rules or a default backend serves nothing")
    for where, slot, backend in places:
        if slot is None:
            warnings.append(f"{where}: no main Ingress serves this host and path: the canary "
                            "serves nothing there")
        elif slot.canary is not None:
            other = slot.canary.owner
            warnings.append(f"{where}: Ingress {other.namespace}/{other.name} is already the "
                            "canary there (one canary per host and path): ignored")
        else:
            name = _target(routes, ing, backend)
            if name is None:
                warnings.append(f"{where}: the canary's backend (Service {backend.service}) "
                                "cannot be used: the canary serves nothing there")
                continue
            # The canary's backend is spoken to as the main Ingress says (protocol, TLS,
            # timeouts), as ingress-nginx does within the same location.
            # With the main Ingress's cookie affinity, as ingress-nginx: a client stuck to
            # the main backend stays there whatever the canary's rules say, and (sticky)
            # one the canary served stays on the canary: each backend knows the other's
            # endpoints as sticky ones.
            sessions = slot.settings.session is not None and slot.backend is not None
            if sessions and canary.sticky:
                slot.retarget(variants.of(slot.backend, slot.settings, slot.owner),
                              variants.of(slot.backend, slot.settings, slot.owner, sticky=name))
            slot.canary = _Canary(ing.obj.key, canary, variants.of(
                name, slot.settings, slot.owner, sticky=slot.backend if sessions else None)
                or name)


def _without(table: ir.RouteTable, missing: dict[str, str]) -> ir.RouteTable:
    """The table with the backend copies that could not be made replaced by the backends."""
    def fix(r: ir.Route) -> ir.Route:
        a = r.action
        if not isinstance(a, ir.Forward):
            return r
        return replace(r, action=replace(a, backends=tuple(
            replace(w, backend=missing.get(w.backend or "", w.backend)) for w in a.backends)))
    return replace(table, virtual_hosts=tuple(
        replace(vh, routes=tuple(fix(r) for r in vh.routes)) for vh in table.virtual_hosts))


def _path(path: str, path_type: str) -> ir.StringMatch:
    if path_type == "Exact":
        return ir.StringMatch("Exact", path)
    if path_type == "Prefix" and path != "/" and not path.endswith("/"):
        return ir.StringMatch("PathSeparatedPrefix", path)
    return ir.StringMatch("Prefix", path)


def _target(routes: RouteBuilder, ing: model.Ingress,
            backend: model.IngressBackend) -> str | None:
    obj = ing.obj
    port = backend.port_number
    svc = routes.service(obj.namespace, backend.service)
    if port is None and svc is not None:
        port = next((p.port for p in svc.ports if p.name == backend.port_name), None)
    return routes.backend(model.BackendObjectRef("", "Service", obj.namespace,
                                                 backend.service, port), obj, Resolution())


def _fallback(routes: RouteBuilder, ing: model.Ingress, backend: model.IngressBackend,
              s: IngressSettings, warnings: list[str]) -> str | None:
    """The path's backend, or the default-backend annotation's Service (its first port)
    when the path's Service has no endpoints (as ingress-nginx)."""
    name = _target(routes, ing, backend)
    other = s.extras.default_backend
    if other is None:
        return name
    ns = ing.obj.namespace
    svc = routes.service(ns, backend.service)
    port = next((p for p in svc.ports if p.port == backend.port_number or (
        backend.port_name is not None and p.name == backend.port_name)), None) if svc else None
    if name is not None and svc is not None and port is not None and \
            routes.endpoints(svc, port):
        return name
    fallback = routes.service(ns, other)
    used = _service(routes, ing.obj, ns, other, fallback.ports[0].port) \
        if fallback is not None and fallback.ports else None
    if used is None:
        msg = (f"default-backend: Service {ns}/{other} cannot be used (missing, or without "
               "ports)")
        if msg not in warnings:
            warnings.append(msg)
        return name
    return used


def _service(routes: RouteBuilder, obj: KubeObject, namespace: str, name: str,
             port: int) -> str | None:
    """The IR backend of a Service port an annotation names (auth-url), or None."""
    return routes.backend(model.BackendObjectRef("", "Service", namespace, name, port), obj,
                          Resolution())
