"""CORS (`envoy.filters.http.cors`): the HTTPRoute CORS filter, per route."""

from __future__ import annotations

import re

from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import regex_pb2
from google.protobuf import wrappers_pb2

from mesh import ir


class _Cors:
    name = "envoy.filters.http.cors"

    def listener_filter(self) -> hcm_pb2.HttpFilter:
        f = hcm_pb2.HttpFilter(name=self.name)
        f.typed_config.Pack(cors_pb2.Cors())
        return f

    def route_config(self, route: ir.Route) -> cors_pb2.CorsPolicy | None:
        c = route.cors
        if c is None:
            return None
        policy = cors_pb2.CorsPolicy(
            allow_methods=", ".join(c.allow_methods),
            allow_headers=", ".join(c.allow_headers),
            expose_headers=", ".join(c.expose_headers),
            max_age=str(c.max_age),
            allow_credentials=wrappers_pb2.BoolValue(value=c.allow_credentials),
            # A preflight from an origin the route does not allow is answered here, without
            # access-control-allow-origin, rather than passed on to the backend.
            forward_not_matching_preflights=wrappers_pb2.BoolValue(value=False))
        label = c.origin_wildcard == "Label"
        for origin in c.allow_origins:
            if "*" in origin:
                # Anything (Gateway API), or one DNS label for the first `*`, the origin
                # case-insensitive (ingress-nginx).
                escaped = re.escape(origin)
                regex = "(?i)^" + escaped.replace(r"\*", "[A-Za-z0-9-]+", 1) + "$" \
                    if label else "^" + escaped.replace(r"\*", ".*") + "$"
                policy.allow_origin_string_match.add(
                    safe_regex=regex_pb2.RegexMatcher(regex=regex))
            else:
                policy.allow_origin_string_match.add(exact=origin, ignore_case=label)
        return policy


CORS = _Cors()
