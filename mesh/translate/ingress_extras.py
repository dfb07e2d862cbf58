"""ingress-nginx annotations beyond the first table's, parsed into typed settings: request
body size (proxy-body-size). The auth family is `ingress_auth`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from mesh import ir
from mesh.translate.annotation_values import Refused

NAMES = frozenset({"proxy-body-size"})
# A body is held whole in the node's proxy while it is checked: no more than this.
MAX_BODY = 64 * 1024 * 1024
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = r.get("proxy-body-size", _size)
    if size is not None and size > MAX_BODY:
        r.warnings.append(f'{r.key("proxy-body-size")}: "{r.text("proxy-body-size")}" is not '
                          f"enforced: limits above {MAX_BODY // 1024 ** 2}m are not (the body "
                          "would be held in memory); bodies of any size pass")
    elif size:  # 0: no limit, as nginx's client_max_body_size 0
        out["max_request_bytes"] = size
    return out


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d{1,12})([kKmMgG]?)", text)
    if m is None:
        raise _no("not a size (a number, with k, m or g)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def apply(max_request_bytes: int | None, route: ir.Route) -> ir.Route:
    if max_request_bytes is None or not isinstance(route.action, ir.Forward):
        return route
    return replace(route, max_request_bytes=max_request_bytes)


def _no(why: str) -> ValueError:
    """A refused value, as the annotation reader reports it."""
    return Refused(why)

