"""ingress-nginx annotations beyond the first table's, parsed into typed settings: request
body size (proxy-body-size), consistent hashing (upstream-hash-by). The auth family is
`ingress_auth`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from mesh import ir
from mesh.translate.annotation_values import Refused

NAMES = frozenset({"proxy-body-size", "upstream-hash-by"})
# A body is held whole in the node's proxy while it is checked: no more than this.
MAX_BODY = 64 * 1024 * 1024
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
# upstream-hash-by: one nginx variable we can hash by, alone ("$x" or "${x}").
_HASH_VAR = re.compile(r"^\$(?:\{([A-Za-z0-9_]{1,128})\}|([A-Za-z0-9_]{1,128}))$")


@dataclass(frozen=True)
class Extras:
    """What this module's annotations ask of an Ingress's routes and backends."""

    hash_policy: ir.HashPolicy | None = None  # upstream-hash-by (the backend copy hashes)


NOTHING = Extras()


def parse(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = r.get("proxy-body-size", _size)
    if size is not None and size > MAX_BODY:
        r.warnings.append(f'{r.key("proxy-body-size")}: "{r.text("proxy-body-size")}" is not '
                          f"enforced: limits above {MAX_BODY // 1024 ** 2}m are not (the body "
                          "would be held in memory); bodies of any size pass")
    elif size:  # 0: no limit, as nginx's client_max_body_size 0
        out["max_request_bytes"] = size
    # A value we cannot hash by is refused: the requests are then balanced as without the
    # annotation (fail safe: hashing is about where a request goes, not whether it may).
    out["extras"] = Extras(hash_policy=r.get("upstream-hash-by", _hash_by))
    return out


def _hash_by(text: str) -> ir.HashPolicy:
    m = _HASH_VAR.match(text)
    var = (m.group(1) or m.group(2)) if m else ""
    low = var.lower()
    if low == "request_uri":
        return ir.HashPolicy("Path")
    if low == "remote_addr":
        return ir.HashPolicy("SourceIP")
    if low.startswith("http_") and len(low) > 5:
        return ir.HashPolicy("Header", low[5:].replace("_", "-"))
    if low.startswith("cookie_") and len(low) > 7:
        return ir.HashPolicy("Cookie", var[7:])
    raise _no("only one of $request_uri, $remote_addr, $http_<name>, $cookie_<name>, alone "
              "(no other variable, no text, no combination); requests are balanced without "
              "hashing")


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d{1,12})([kKmMgG]?)", text)
    if m is None:
        raise _no("not a size (a number, with k, m or g)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def apply(max_request_bytes: int | None, extras: Extras, route: ir.Route) -> ir.Route:
    if not isinstance(route.action, ir.Forward):
        return route
    if max_request_bytes is not None:
        route = replace(route, max_request_bytes=max_request_bytes)
    if extras.hash_policy is not None:
        route = replace(route, hash_policy=extras.hash_policy)
    return route


def _no(why: str) -> ValueError:
    """A refused value, as the annotation reader reports it."""
    return Refused(why)

