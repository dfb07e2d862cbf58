"""Hubble's flow filters (`flow.FlowFilter`) over `flow.Flow` messages, with Hubble's meaning:
within one filter every field set must match (and any of a field's values will do); a
request's flows are those some whitelist filter matches and no blacklist filter does.

Pods and services are `namespace/name-prefix` (a bare name: in `default`); IPs are addresses
or CIDRs; labels are Kubernetes label selectors whose keys may carry Cilium's source
(`k8s:app=web`; a bare key matches any source); HTTP status codes are `200` or a prefix such
as `5+`; HTTP paths are regular expressions. A field this server cannot evaluate is refused
with a clear error rather than silently matched or ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mesh.hubble.api.flow import flow_pb2

Predicate = Callable[[flow_pb2.Flow], bool]
MAX_FILTERS = 64  # per list: input size is bounded
MAX_VALUES = 256  # per field


class FilterError(ValueError):
    """A filter that cannot be used: its message says which field and why."""


# -- labels

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_.:/-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$")


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


_Labels = list[tuple[str, str, str]]


def _labels(flow_labels: Iterable[str]) -> _Labels:
    """(source, key, value) of each `source:key=value`."""
    out = []
    for label in flow_labels:
        key, _, value = label.partition("=")
        source, sep, name = key.partition(":")
        out.append((source, name, value) if sep else ("any", key, value))
    return out


def _requirement(source: str, key: str, m: re.Match[str]) -> Callable[[_Labels], bool]:
    def values(labels: _Labels) -> list[str]:
        return [v for s, k, v in labels if k == key and (source == "any" or s == source)]

    if m["neg"]:
        if m["op"] or m["setop"]:
            raise FilterError(f"label selector: '!' takes a key alone ({m.string.strip()!r})")
        return lambda ls: not values(ls)
    value = m["value"]
    if m["op"] in ("=", "=="):
        return lambda ls: value in values(ls)
    if m["op"] == "!=":
        return lambda ls: value not in values(ls)
    if m["setop"]:
        wanted = {v.strip() for v in m["values"].split(",") if v.strip()}
        if m["setop"] == "in":
            return lambda ls: bool(wanted & set(values(ls)))
        return lambda ls: not wanted & set(values(ls))
    return lambda ls: bool(values(ls))


def label_selector(selector: str) -> Callable[[Sequence[str]], bool]:
    tests: list[Callable[[_Labels], bool]] = []
    for part in _split_requirements(selector):
        if not part.strip():
            raise FilterError(f"label selector {selector!r}: an empty requirement")
        m = _REQUIREMENT.match(part)
        if m is None:
            raise FilterError(f"label selector {selector!r}: cannot read {part.strip()!r}")
        source, sep, key = m["key"].partition(":")
        if not sep:
            source, key = "any", m["key"]

        tests.append(_requirement(source, key, m))

    def match(flow_labels: Sequence[str]) -> bool:
        parsed = _labels(flow_labels)
        return all(t(parsed) for t in tests)
    return match


# -- one field each


def _any(values: Sequence[Any], name: str) -> list[Any]:
    if len(values) > MAX_VALUES:
        raise FilterError(f"{name}: at most {MAX_VALUES} values")
    return list(values)


def _namespaced(values: Sequence[str], name: str,
                get: Callable[[flow_pb2.Flow], tuple[str, str]]) -> Predicate:
    wanted = []
    for v in _any(values, name):
        if not v:
            raise FilterError(f"{name}: an empty name")
        ns, sep, prefix = v.partition("/")
        wanted.append((ns, prefix) if sep else ("default", ns))

    def match(f: flow_pb2.Flow) -> bool:
        ns, pod = get(f)
        if not ns and not pod:
            return False
        return any((not p or pod.startswith(p)) and (not n or n == ns) for n, p in wanted)
    return match


def _ips(values: Sequence[str], name: str, get: Callable[[flow_pb2.Flow], str]) -> Predicate:
    addresses, networks = set(), []
    for v in _any(values, name):
        try:
            if "/" in v:
                networks.append(ipaddress.ip_network(v, strict=False))
            else:
                addresses.add(str(ipaddress.ip_address(v)))
        except ValueError as e:
            raise FilterError(f"{name}: {e}") from e

    def match(f: flow_pb2.Flow) -> bool:
        ip = get(f)
        if not ip:
            return False
        if ip in addresses:
            return True
        if networks:
            addr = ipaddress.ip_address(ip)
            return any(addr in n for n in networks)
        return False
    return match


def _ports(values: Sequence[str], name: str, source: bool) -> Predicate:
    try:
        ports = {int(p) for p in _any(values, name)}
    except ValueError as e:
        raise FilterError(f"{name}: {e}") from e
    if any(not 0 <= p <= 65535 for p in ports):
        raise FilterError(f"{name}: ports are 0-65535")

    def match(f: flow_pb2.Flow) -> bool:
        l4 = f.l4
        which = l4.WhichOneof("protocol")
        if which not in ("TCP", "UDP", "SCTP"):
            return False
        proto = getattr(l4, which)
        return (proto.source_port if source else proto.destination_port) in ports
    return match


_L4 = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmpv4": "ICMPv4", "icmpv6": "ICMPv6",
       "vrrp": "VRRP", "igmp": "IGMP"}


def _protocols(values: Sequence[str]) -> Predicate:
    l4, l7 = set(), set()
    for p in _any(values, "protocol"):
        p = p.lower()
        if p == "icmp":
            l4 |= {"ICMPv4", "ICMPv6"}
        elif p in _L4:
            l4.add(_L4[p])
        elif p in ("http", "dns"):
            l7.add(p)
        else:
            raise FilterError(f"protocol: unknown protocol {p!r}")

    def match(f: flow_pb2.Flow) -> bool:
        return f.l4.WhichOneof("protocol") in l4 or f.l7.WhichOneof("record") in l7
    return match


_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")


def _http_status(values: Sequence[str]) -> Predicate:
    full, prefixes = set(), []
    for v in _any(values, "http_status_code"):
        if _STATUS_FULL.match(v):
            full.add(v)
        elif _STATUS_PREFIX.match(v):
            prefixes.append(v[:-1])
        else:
            raise FilterError(f"http_status_code: {v!r} is neither a code (200) nor a "
                              "prefix (5+)")

    def match(f: flow_pb2.Flow) -> bool:
        code = f.l7.http.code if f.l7.WhichOneof("record") == "http" else 0
        if not code:
            return False
        text = f"{code:03d}"
        return text in full or any(text.startswith(p) for p in prefixes)
    return match


def _regexps(values: Sequence[str], name: str) -> list[re.Pattern[str]]:
    out = []
    for v in _any(values, name):
        if len(v) > 1024:
            raise FilterError(f"{name}: a pattern of at most 1024 characters")
        try:
            out.append(re.compile(v))
        except re.error as e:
            raise FilterError(f"{name}: {v!r}: {e}") from e
    return out


def _tcp_flags(values: Sequence[flow_pb2.TCPFlags]) -> Predicate:
    wanted = [{fd.name for fd, on in v.ListFields() if on} for v in _any(values, "tcp_flags")]

    def match(f: flow_pb2.Flow) -> bool:
        if f.l4.WhichOneof("protocol") != "TCP":
            return False
        have = {fd.name for fd, on in f.l4.TCP.flags.ListFields() if on}
        return any(w <= have for w in wanted)
    return match


def _event_types(values: Sequence[flow_pb2.EventTypeFilter]) -> Predicate:
    wanted = [(v.type, v.match_sub_type, v.sub_type) for v in _any(values, "event_type")]

    def match(f: flow_pb2.Flow) -> bool:
        t, s = f.event_type.type, f.event_type.sub_type
        return any(t == wt and (not ms or s == ws) for wt, ms, ws in wanted)
    return match


def _node_names(values: Sequence[str]) -> Predicate:
    # Hubble's node patterns: `cluster/node` globs; a pattern without `/` names the node
    patterns = []
    for v in _any(values, "node_name"):
        node = v.rpartition("/")[2]
        patterns.append(re.compile("^" + ".*".join(map(re.escape, node.split("*"))) + "$"))
    return lambda f: any(p.match(f.node_name) for p in patterns)


# Fields this server does not evaluate (its flows never carry what they look at).
_UNSUPPORTED = ("uuid", "source_ip_xlated", "source_fqdn", "destination_fqdn",
                "source_workload", "destination_workload", "source_cluster_name",
                "destination_cluster_name", "interface", "dns_query", "http_url",
                "http_header", "node_labels", "trace_id", "ip_trace_id", "encrypted",
                "experimental")


def compile_filter(ff: flow_pb2.FlowFilter) -> Predicate:
    """One filter: all the fields it sets."""
    for name in _UNSUPPORTED:
        if name == "experimental":
            if ff.experimental.cel_expression:
                raise FilterError("experimental.cel_expression: CEL filters are not supported")
        elif len(getattr(ff, name)):
            raise FilterError(f"{name}: this filter is not supported by this server")
    tests: list[Predicate] = []
    if ff.source_ip:
        tests.append(_ips(ff.source_ip, "source_ip", lambda f: f.IP.source))
    if ff.destination_ip:
        tests.append(_ips(ff.destination_ip, "destination_ip", lambda f: f.IP.destination))
    if ff.source_pod:
        tests.append(_namespaced(ff.source_pod, "source_pod",
                                 lambda f: (f.source.namespace, f.source.pod_name)))
    if ff.destination_pod:
        tests.append(_namespaced(ff.destination_pod, "destination_pod",
                                 lambda f: (f.destination.namespace, f.destination.pod_name)))
    if ff.source_service:
        tests.append(_namespaced(ff.source_service, "source_service",
                                 lambda f: (f.source_service.namespace,
                                            f.source_service.name)))
    if ff.destination_service:
        tests.append(_namespaced(ff.destination_service, "destination_service",
                                 lambda f: (f.destination_service.namespace,
                                            f.destination_service.name)))
    if ff.source_label:
        sels = [label_selector(s) for s in _any(ff.source_label, "source_label")]
        tests.append(lambda f: any(s(f.source.labels) for s in sels))
    if ff.destination_label:
        dsels = [label_selector(s) for s in _any(ff.destination_label, "destination_label")]
        tests.append(lambda f: any(s(f.destination.labels) for s in dsels))
    if ff.source_identity:
        ids = set(_any(ff.source_identity, "source_identity"))
        tests.append(lambda f: f.source.identity in ids)
    if ff.destination_identity:
        dids = set(_any(ff.destination_identity, "destination_identity"))
        tests.append(lambda f: f.destination.identity in dids)
    if ff.traffic_direction:
        directions = set(_any(ff.traffic_direction, "traffic_direction"))
        tests.append(lambda f: f.traffic_direction in directions)
    if ff.verdict:
        verdicts = set(_any(ff.verdict, "verdict"))
        tests.append(lambda f: f.verdict in verdicts)
    if ff.drop_reason_desc:
        reasons = set(_any(ff.drop_reason_desc, "drop_reason_desc"))
        tests.append(lambda f: f.drop_reason_desc in reasons)
    if ff.event_type:
        tests.append(_event_types(ff.event_type))
    if ff.http_status_code:
        tests.append(_http_status(ff.http_status_code))
    if ff.protocol:
        tests.append(_protocols(ff.protocol))
    if ff.source_port:
        tests.append(_ports(ff.source_port, "source_port", source=True))
    if ff.destination_port:
        tests.append(_ports(ff.destination_port, "destination_port", source=False))
    if ff.reply:
        replies = set(_any(ff.reply, "reply"))
        tests.append(lambda f: f.HasField("is_reply") and f.is_reply.value in replies)
    if ff.http_method:
        methods = {m.upper() for m in _any(ff.http_method, "http_method")}
        tests.append(lambda f: f.l7.WhichOneof("record") == "http" and
                     f.l7.http.method.upper() in methods)
    if ff.http_path:
        paths = _regexps(ff.http_path, "http_path")

        def path_matches(f: flow_pb2.Flow) -> bool:
            if f.l7.WhichOneof("record") != "http":
                return False
            url = f.l7.http.url
            path = url.split("://", 1)[-1].partition("/")[1:]
            text = "".join(path) or "/"
            return any(p.search(text) for p in paths)
        tests.append(path_matches)
    if ff.tcp_flags:
        tests.append(_tcp_flags(ff.tcp_flags))
    if ff.node_name:
        tests.append(_node_names(ff.node_name))
    if ff.ip_version:
        versions = set(_any(ff.ip_version, "ip_version"))
        tests.append(lambda f: f.IP.ipVersion in versions)
    return lambda f: all(t(f) for t in tests)


def compile_filters(whitelist: Sequence[flow_pb2.FlowFilter],
                    blacklist: Sequence[flow_pb2.FlowFilter]) -> Predicate:
    """A request's filters: some whitelist filter matches (or there is none), no blacklist
    filter does."""
    if len(whitelist) > MAX_FILTERS or len(blacklist) > MAX_FILTERS:
        raise FilterError(f"at most {MAX_FILTERS} filters per list")
    allow = [compile_filter(f) for f in whitelist]
    deny = [compile_filter(f) for f in blacklist]

    def match(f: flow_pb2.Flow) -> bool:
        return (not allow or any(a(f) for a in allow)) and not any(d(f) for d in deny)
    return match
