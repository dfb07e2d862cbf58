"""What the ingress-nginx annotation parsers share (`ingress_annotations` and the families it
delegates to), so that none of them imports another for it: the error for a value they refuse,
and the Service an `http://name.namespace.svc` URL names (auth-url, mirror-target)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

# A Service's DNS name: name.namespace, optionally .svc and the cluster domain.
SERVICE_HOST = re.compile(
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)\.([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)"
    r"(\.svc(\.[a-z0-9.-]{1,200})?)?$")


class Refused(ValueError):
    """A value that is refused: the message says why, and becomes a status warning."""


@dataclass(frozen=True)
class ServiceURL:
    """An `http://name.namespace.svc...[:port]` URL naming a Service (auth-url, mirror-target)."""

    url: SplitResult
    namespace: str
    name: str
    port: int
    host: str  # as written, lowercase


def service_url(text: str, namespace: str, noun: str, after: str = "") -> ServiceURL:
    """The Service an http:// URL names (its namespace `namespace` when the host has none);
    refused otherwise, the message naming `noun` and ending with `after` (what follows)."""
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise Refused(f"not a URL: {e}") from None
    if u.scheme != "http":
        raise Refused(f"only http:// {noun} are supported{after}")
    host = (u.hostname or "").lower()
    m = SERVICE_HOST.match(host)
    if m is None:
        raise Refused(f"the host must be a Service's DNS name (name.namespace.svc...){after}")
    return ServiceURL(u, m.group(3) or namespace, m.group(1), port or 80, host)
