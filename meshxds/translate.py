"""IR to Envoy resources: clusters and endpoints, route configurations, listeners, secrets.

Per-route behaviour (header changes, timeouts, retries, mirrors, CORS) lives in RDS, and the
HTTP filter list of every connection manager is the same fixed list: a route change never
touches a listener, so it never drains connections.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from mesh import ir
from mesh.k8s import ObjectKey
from meshxds import resources as r
from meshxds import types

INVALID_BACKEND = "mesh-invalid-backend"  # never defined: its share answers 500
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
CORS_FILTER = "envoy.filters.http.cors"
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_DEFAULT_PORT = {"http": 80, "https": 443}


@dataclass
class EnvoyConfig:
    resources: list[Message]
    # The objects each xDS resource carries, as given; `owned` inverts it when asked (by the
    # status, off the push path: at 10,000 routes that is 10 ms).
    owners: list[tuple[Iterable[ObjectKey], str, str]] = field(default_factory=list)

    def own(self, owners: Iterable[ObjectKey], type_url: str, name: str) -> None:
        self.owners.append((owners, type_url, name))

    @functools.cached_property
    def owned(self) -> dict[ObjectKey, set[tuple[str, str]]]:
        """Which xDS resources carry each object: Programmed waits for all of them to be
        ACKed."""
        out: dict[ObjectKey, set[tuple[str, str]]] = {}
        for owners, type_url, name in self.owners:
            for o in owners:
                out.setdefault(o, set()).add((type_url, name))
        return out


class EnvoyCache:
    """Virtual host messages of the previous conversion, by name: the translator hands back
    the very same IR virtual host (or the same IR routes) for what did not change, so those
    convert once."""

    def __init__(self) -> None:
        self.vhosts: dict[str, tuple[ir.VirtualHost, rc.VirtualHost]] = {}


def to_envoy(model: ir.IR, cache: EnvoyCache | None = None) -> EnvoyConfig:
    out = EnvoyConfig([])
    previous = cache.vhosts if cache is not None else {}
    fresh: dict[str, tuple[ir.VirtualHost, rc.VirtualHost]] = {}

    def vhost(vh: ir.VirtualHost) -> rc.VirtualHost:
        hit = previous.get(vh.name)
        if hit is not None and hit[0] is vh:
            msg = hit[1]
        else:
            # Routes that were in this virtual host last time keep their messages.
            old = {id(x): (x, m) for x, m in zip(hit[0].routes, hit[1].routes, strict=True)} \
                if hit is not None else {}

            def route(x: ir.Route) -> rc.Route:
                was = old.get(id(x))
                return was[1] if was is not None and was[0] is x else _route(x)

            msg = rc.VirtualHost(name=vh.name, domains=list(vh.domains),
                                 routes=[route(x) for x in vh.routes])
        fresh[vh.name] = (vh, msg)
        return msg

    for b in model.backends:
        out.resources += [_cluster(b), r.load_assignment(
            b.name, [(e.address, e.port) for e in b.endpoints])]
        out.own(b.owners, types.CLUSTER, b.name)
    for cert in model.certificates:
        out.resources.append(secret_pb2.Secret(
            name=cert.name,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=cert.cert_pem),
                private_key=base_pb2.DataSource(inline_bytes=cert.key_pem))))
    for bundle in model.trust_bundles:
        out.resources.append(secret_pb2.Secret(
            name=bundle.name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=bundle.ca_pem))))
    for table in model.route_tables:
        out.resources.append(_route_configuration(table, vhost))
        out.own(table.owners, types.ROUTE, table.name)
    for listener in model.listeners:
        out.resources.append(_listener(listener))
        out.own(listener.owners, types.LISTENER, listener.name)
    if cache is not None:
        cache.vhosts = fresh
    return out


# -- clusters -------------------------------------------------------------------------------

def _cluster(b: ir.Backend) -> cluster_pb2.Cluster:
    c = r.eds_cluster(b.name, connect_timeout=2.0)
    # Above Envoy's default of 1024 pending/active requests per cluster: one node Envoy
    # serves every pod on the node.
    c.circuit_breakers.thresholds.add(
        max_connections=wrappers_pb2.UInt32Value(value=100_000),
        max_pending_requests=wrappers_pb2.UInt32Value(value=100_000),
        max_requests=wrappers_pb2.UInt32Value(value=100_000))
    if b.protocol == "h2c" or (b.tls is not None and b.protocol != "http1"):
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
        c.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(opts)
    if b.tls is not None:
        validation = common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=b.tls.ca_pem) if b.tls.ca_pem
            else base_pb2.DataSource(filename=SYSTEM_CA))
        sans = b.tls.subject_alt_names or (("Hostname", b.tls.sni),)
        for kind, value in sans:
            validation.match_typed_subject_alt_names.add(
                san_type=common_pb2.SubjectAltNameMatcher.URI if kind == "URI"
                else common_pb2.SubjectAltNameMatcher.DNS,
                matcher=string_pb2.StringMatcher(exact=value))
        ctx = tls_pb2.UpstreamTlsContext(
            sni=b.tls.sni,
            common_tls_context=tls_pb2.CommonTlsContext(validation_context=validation))
        if b.tls.client_cert is not None:
            ctx.common_tls_context.tls_certificate_sds_secret_configs.append(
                _sds(b.tls.client_cert))
        c.transport_socket.name = "envoy.transport_sockets.tls"
        c.transport_socket.typed_config.Pack(ctx)
    return c


# -- routes ---------------------------------------------------------------------------------

def _string_match(m: ir.StringMatch) -> string_pb2.StringMatcher:
    if m.type == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=m.value))
    return string_pb2.StringMatcher(exact=m.value)


def _match(route: ir.Route) -> rc.RouteMatch:
    m = rc.RouteMatch()
    p = route.path
    if p.type == "Exact":
        m.path = p.value
    elif p.type == "RegularExpression":
        m.safe_regex.regex = p.value
    elif p.type == "PathSeparatedPrefix":
        m.path_separated_prefix = p.value
    else:
        m.prefix = p.value
    for h in route.headers:
        hm = m.headers.add(name=h.name)
        if h.type == "Present":
            hm.present_match = True
        else:
            hm.string_match.CopyFrom(_string_match(h))
    if route.method:
        m.headers.add(name=":method", string_match=string_pb2.StringMatcher(exact=route.method))
    for q in route.query:
        m.query_parameters.add(name=q.name, string_match=_string_match(q))
    return m


def _header_options(ops: ir.HeaderOps) -> list[base_pb2.HeaderValueOption]:
    out = []
    for name, value in ops.set:
        out.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    for name, value in ops.add:
        out.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD))
    return out


def _prefix_regex(matched: str, replacement: str) -> tuple[str, str]:
    """Gateway API ReplacePrefixMatch as a regex rewrite: the matched prefix is replaced
    as whole path segments, so "/foo" -> "/" turns "/foo/bar" into "/bar", not "//bar"."""
    prefix = matched.rstrip("/")
    if replacement.endswith("/") and replacement != "/":
        replacement = replacement.rstrip("/")
    if replacement == "/":
        return rf"^{re.escape(prefix)}/*", "/"
    return rf"^{re.escape(prefix)}", replacement


def _path_rewrite(target: regex_pb2.RegexMatchAndSubstitute, full: str | None,
                  prefix: tuple[str, str] | None) -> None:
    """ReplaceFullPath or ReplacePrefixMatch, as a regex rewrite: it keeps the query."""
    if full is not None:
        target.pattern.regex, target.substitution = "^/.*$", full
    elif prefix is not None:
        target.pattern.regex, target.substitution = _prefix_regex(*prefix)


def _forward(route: ir.Route, a: ir.Forward) -> rc.RouteAction:
    act = rc.RouteAction(timeout=r.duration(a.timeout))
    live = [b for b in a.backends if b.weight > 0]
    if len(live) == 1 and not live[0].request_headers and not live[0].response_headers:
        act.cluster = live[0].backend or INVALID_BACKEND
    else:
        for b in live:
            act.weighted_clusters.clusters.add(
                name=b.backend or INVALID_BACKEND,
                weight=wrappers_pb2.UInt32Value(value=b.weight),
                request_headers_to_add=_header_options(b.request_headers),
                request_headers_to_remove=list(b.request_headers.remove),
                response_headers_to_add=_header_options(b.response_headers),
                response_headers_to_remove=list(b.response_headers.remove))
    act.cluster_not_found_response_code = rc.RouteAction.INTERNAL_SERVER_ERROR
    if a.retry is not None or a.per_try_timeout is not None:
        policy = act.retry_policy
        if a.retry is not None:
            on = ["connect-failure", "refused-stream", "reset"]
            if a.retry.codes:
                on.append("retriable-status-codes")
                policy.retriable_status_codes.extend(a.retry.codes)
            else:
                on.append("5xx")
            policy.retry_on = ",".join(on)
            policy.num_retries.value = a.retry.attempts
            if a.retry.backoff:
                policy.retry_back_off.base_interval.CopyFrom(r.duration(a.retry.backoff))
        else:
            policy.num_retries.value = 0
        if a.per_try_timeout is not None:
            policy.per_try_timeout.CopyFrom(r.duration(a.per_try_timeout))
    for m in a.mirrors:
        mp = act.request_mirror_policies.add(cluster=m.backend)
        if m.percent is not None:
            mp.runtime_fraction.default_value.CopyFrom(percent_pb2.FractionalPercent(
                numerator=int(m.percent * 10_000),
                denominator=percent_pb2.FractionalPercent.MILLION))
    if a.host_rewrite:
        act.host_rewrite_literal = a.host_rewrite
    _path_rewrite(act.regex_rewrite, a.full_path_rewrite, a.prefix_rewrite)
    if a.websocket:
        act.upgrade_configs.add(upgrade_type="websocket")
    return act


def _redirect(a: ir.Redirect) -> rc.RedirectAction:
    red = rc.RedirectAction(response_code=_REDIRECT_CODES.get(a.status, rc.RedirectAction.FOUND))
    if a.scheme:
        red.scheme_redirect = a.scheme
    if a.host:
        red.host_redirect = a.host
    port = a.port
    if port is None and a.scheme:
        port = _DEFAULT_PORT.get(a.scheme)
    if port is not None and port != _DEFAULT_PORT.get(a.scheme or "http"):
        red.port_redirect = port
    _path_rewrite(red.regex_rewrite, a.full_path, a.prefix)
    return red


def _cors(c: ir.Cors) -> cors_pb2.CorsPolicy:
    policy = cors_pb2.CorsPolicy(
        allow_methods=", ".join(c.allow_methods),
        allow_headers=", ".join(c.allow_headers),
        expose_headers=", ".join(c.expose_headers),
        max_age=str(c.max_age),
        allow_credentials=wrappers_pb2.BoolValue(value=c.allow_credentials),
        # A preflight from an origin the route does not allow is answered here, without
        # access-control-allow-origin, rather than passed on to the backend.
        forward_not_matching_preflights=wrappers_pb2.BoolValue(value=False))
    for origin in c.allow_origins:
        if "*" in origin:
            regex = "^" + re.escape(origin).replace(r"\*", ".*") + "$"
            policy.allow_origin_string_match.add(safe_regex=regex_pb2.RegexMatcher(regex=regex))
        else:
            policy.allow_origin_string_match.add(exact=origin)
    return policy


def _route(route: ir.Route) -> rc.Route:
    out = rc.Route(name=route.name, match=_match(route),
                   request_headers_to_add=_header_options(route.request_headers),
                   request_headers_to_remove=list(route.request_headers.remove),
                   response_headers_to_add=_header_options(route.response_headers),
                   response_headers_to_remove=list(route.response_headers.remove))
    a = route.action
    if isinstance(a, ir.Forward):
        out.route.CopyFrom(_forward(route, a))
    elif isinstance(a, ir.Redirect):
        out.redirect.CopyFrom(_redirect(a))
    else:
        out.direct_response.status = a.status
        if a.body:
            out.direct_response.body.inline_string = a.body
    if route.cors is not None:
        out.typed_per_filter_config[CORS_FILTER].Pack(_cors(route.cors))
    return out


def _route_configuration(table: ir.RouteTable,
                         vhost: Callable[[ir.VirtualHost], rc.VirtualHost],
                         ) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=table.name,
        virtual_hosts=[vhost(vh) for vh in table.virtual_hosts],
        # Gateway API hostnames match the Host header without its port (`Host: a.com:1234`
        # is a.com), on every listener port; the Host sent upstream keeps its port.
        ignore_port_in_host_matching=True,
        # A route to a cluster that is not there yet answers 500 rather than NACK the table.
        validate_clusters=wrappers_pb2.BoolValue(value=False))


# -- listeners ------------------------------------------------------------------------------

def _http_filters() -> list[hcm_pb2.HttpFilter]:
    # Fixed order, the same on every connection manager (see the module docstring).
    cors = hcm_pb2.HttpFilter(name=CORS_FILTER)
    cors.typed_config.Pack(cors_pb2.Cors())
    router = hcm_pb2.HttpFilter(name=r.ROUTER_FILTER)
    router.typed_config.Pack(router_pb2.Router())
    return [cors, router]


def _hcm(table: str, stat_prefix: str) -> listener_components_pb2.Filter:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=r.ads_source(), route_config_name=table),
        http_filters=_http_filters(),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED,
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(
            upgrade_type="websocket", enabled=wrappers_pb2.BoolValue(value=False))],
    )
    f = listener_components_pb2.Filter(name=r.HCM_FILTER)
    f.typed_config.Pack(hcm)
    return f


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3))


def _downstream_tls(certs: tuple[str, ...], alpn: list[str],
                    validation: ir.ClientValidation | None = None) -> base_pb2.TransportSocket:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        alpn_protocols=alpn, tls_certificate_sds_secret_configs=[_sds(c) for c in certs]))
    if validation is not None:
        # The CAs come by SDS, so a CA change does not drain the listener.
        combined = ctx.common_tls_context.combined_validation_context
        combined.validation_context_sds_secret_config.CopyFrom(_sds(validation.trust_bundle))
        combined.default_validation_context.SetInParent()
        if validation.allow_insecure:
            combined.default_validation_context.trust_chain_verification = \
                common_pb2.CertificateValidationContext.ACCEPT_UNTRUSTED
        else:
            ctx.require_client_certificate.value = True
    ts = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    ts.typed_config.Pack(ctx)
    return ts


def _tcp_proxy(chain: ir.FilterChain) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=_stat(chain.name))
    live = [b for b in chain.tcp_backends if b.weight > 0]
    if len(live) == 1:
        proxy.cluster = live[0].backend or INVALID_BACKEND
    else:
        for b in live:
            proxy.weighted_clusters.clusters.add(name=b.backend or INVALID_BACKEND,
                                                 weight=b.weight)
    f = listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy")
    f.typed_config.Pack(proxy)
    return f


def _stat(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _listener(li: ir.Listener) -> listener_pb2.Listener:
    out = listener_pb2.Listener(name=li.name, address=r.socket_address(li.address, li.port))
    tls = li.protocol in ("HTTPS", "TLS")
    if tls:
        inspector = out.listener_filters.add(name="envoy.filters.listener.tls_inspector")
        inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    claimed: set[str] = set()
    catch_all = False
    for chain in li.chains:
        names = [n for n in chain.server_names if n not in claimed]
        if (chain.server_names and not names) or (not chain.server_names and catch_all):
            continue  # what it would match is served by an earlier chain
        claimed.update(names)
        catch_all = catch_all or not chain.server_names
        fc = out.filter_chains.add(name=chain.name)
        if tls:
            fc.filter_chain_match.server_names.extend(names)
        if chain.certificates:
            alpn = ["h2", "http/1.1"] if chain.route_table else []
            fc.transport_socket.CopyFrom(_downstream_tls(chain.certificates, alpn,
                                                         chain.client_validation))
        if chain.route_table is not None:
            fc.filters.append(_hcm(chain.route_table, _stat(chain.route_table)))
        else:
            fc.filters.append(_tcp_proxy(chain))
    if not out.filter_chains:
        # Nothing attached yet: close connections rather than leave the listener chainless.
        fc = out.filter_chains.add(name="empty")
        fc.filters.append(_tcp_proxy(ir.FilterChain(
            "empty", tcp_backends=(ir.WeightedBackend(None, 1),))))
    return out
