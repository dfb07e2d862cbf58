"""Route tables (RDS): virtual hosts, matches, actions (forward, redirect, direct response),
header changes, retries, timeouts, mirrors; per-route filter config from `httpfilters`."""

from __future__ import annotations

import re
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from mesh import ir
from mesh.sinks.envoy import httpfilters
from mesh.sinks.envoy import resources as r

INVALID_BACKEND = "mesh-invalid-backend"  # never defined: its share answers 500
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_DEFAULT_PORT = {"http": 80, "https": 443}


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
            on = list(a.retry.triggers) or ["connect-failure", "refused-stream", "reset"]
            if a.retry.codes:
                if "retriable-status-codes" not in on:
                    on.append("retriable-status-codes")
                policy.retriable_status_codes.extend(a.retry.codes)
            elif not a.retry.triggers:
                on.append("5xx")
            policy.retry_on = ",".join(on)
            policy.num_retries.value = a.retry.attempts
            if a.retry.backoff or a.retry.max_backoff:
                base = a.retry.backoff or 0.025  # Envoy's default base interval
                policy.retry_back_off.base_interval.CopyFrom(r.duration(base))
                if a.retry.max_backoff:
                    policy.retry_back_off.max_interval.CopyFrom(
                        r.duration(max(base, a.retry.max_backoff)))
        else:
            policy.num_retries.value = 0
        if a.per_try_timeout is not None:
            policy.per_try_timeout.CopyFrom(r.duration(a.per_try_timeout))
    for m in a.mirrors:
        mp = act.request_mirror_policies.add(cluster=m.backend)
        if m.host is not None:
            mp.host_rewrite_literal = m.host
            mp.disable_shadow_host_suffix_append = True
        if m.percent is not None:
            mp.runtime_fraction.default_value.CopyFrom(percent_pb2.FractionalPercent(
                numerator=int(m.percent * 10_000),
                denominator=percent_pb2.FractionalPercent.MILLION))
    if a.host_rewrite:
        act.host_rewrite_literal = a.host_rewrite
    _path_rewrite(act.regex_rewrite, a.full_path_rewrite, a.prefix_rewrite)
    if a.regex_rewrite is not None:
        act.regex_rewrite.pattern.regex, act.regex_rewrite.substitution = a.regex_rewrite
    if a.websocket:
        act.upgrade_configs.add(upgrade_type="websocket")
    if a.idle_timeout is not None:
        act.idle_timeout.CopyFrom(r.duration(a.idle_timeout))
    h = route.hash_policy
    if h is not None:
        hp = act.hash_policy.add()
        if h.source == "Header":
            hp.header.header_name = h.name
        elif h.source == "Path":
            hp.header.header_name = ":path"
        elif h.source == "Cookie":
            hp.cookie.name = h.name
            if h.ttl is not None:  # Envoy then sets the cookie when the client has none
                hp.cookie.ttl.CopyFrom(r.duration(h.ttl))
            if h.path:
                hp.cookie.path = h.path
        else:
            hp.connection_properties.source_ip = True
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
    red.strip_query = a.strip_query
    if a.strip_trailing_slash:
        red.regex_rewrite.pattern.regex, red.regex_rewrite.substitution = "^(.*)/$", r"\1"
    return red


def route(route: ir.Route) -> rc.Route:
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
    for name, cfg in httpfilters.route_configs(route):
        out.typed_per_filter_config[name].Pack(cfg)
    return out


def route_configuration(table: ir.RouteTable,
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
