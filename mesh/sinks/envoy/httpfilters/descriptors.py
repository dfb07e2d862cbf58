"""Rate limit descriptors: how a limit's selectors become Envoy's rate limit actions.

One contract for the local filter and the rate limit service (mesh/ratelimit): a descriptor
starts with `mesh.dev/policy` = the limit's id, then one entry per selector; a global one
then carries its limit (`mesh.dev/limit` = requests/unit) and, in shadow mode,
`mesh.dev/shadow` = true, so that the service needs no configuration and every node agrees.
The keys are the service's (mesh/ratelimit/descriptors.py), which reads them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from mesh import ir
from mesh.ratelimit.descriptors import LIMIT_KEY, POLICY_KEY, SHADOW_KEY

Entry = common_pb2.RateLimitDescriptor.Entry
EntryT = Any  # Envoy's generated classes are untyped


def _generic(key: str, value: str) -> rc.RateLimit.Action:
    return rc.RateLimit.Action(generic_key=rc.RateLimit.Action.GenericKey(
        descriptor_key=key, descriptor_value=value))


def _selector(s: ir.RateLimitSelector) -> list[tuple[Any, EntryT]]:
    """The actions for one selector, each with the entry the local filter's descriptor
    holds for it (an empty value: any value, a bucket per value)."""
    A = rc.RateLimit.Action
    if s.source == "Header":
        if s.match == "Distinct":
            key = f"header:{s.name}"
            return [(A(request_headers=A.RequestHeaders(header_name=s.name,
                                                        descriptor_key=key)),
                     Entry(key=key, value=""))]
        matcher = string_pb2.StringMatcher(exact=s.value) if s.match == "Exact" else \
            string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=s.value))
        key = f"header-match:{s.name}"
        action = A(header_value_match=A.HeaderValueMatch(
            descriptor_key=key, descriptor_value="matched"))
        action.header_value_match.expect_match.value = not s.invert
        action.header_value_match.headers.add(name=s.name, string_match=matcher)
        return [(action, Entry(key=key, value="matched"))]
    net = ipaddress.ip_network(s.value or "0.0.0.0/0", strict=False)
    out: list[tuple[Any, EntryT]] = []
    if net.prefixlen:
        # Only clients in the range: their address masked to the range's length is the
        # range itself (others give another value, which no descriptor holds).
        masked = A(masked_remote_address=A.MaskedRemoteAddress())
        if net.version == 4:
            masked.masked_remote_address.v4_prefix_mask_len.value = net.prefixlen
        else:
            masked.masked_remote_address.v6_prefix_mask_len.value = net.prefixlen
        out.append((masked, Entry(key="masked_remote_address", value=str(net))))
    if s.match == "Distinct":
        out.append((A(remote_address=A.RemoteAddress()), Entry(key="remote_address", value="")))
    return out


def local(limit: ir.RateLimit) -> tuple[list[Any], list[EntryT]]:
    actions = [_generic(POLICY_KEY, limit.id)]
    entries = [Entry(key=POLICY_KEY, value=limit.id)]
    for s in limit.selectors:
        for action, entry in _selector(s):
            actions.append(action)
            entries.append(entry)
    return actions, entries


def global_(limit: ir.RateLimit) -> list[Any]:
    actions, _ = local(limit)
    actions.append(_generic(LIMIT_KEY, f"{limit.requests}/{limit.unit}"))
    if limit.shadow:
        actions.append(_generic(SHADOW_KEY, "true"))
    return actions
