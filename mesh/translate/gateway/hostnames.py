"""Hostname matching and intersection as the Gateway API defines them.

A wildcard `*.example.com` matches any name with at least one more label in front
(`a.example.com`, `a.b.example.com`), never `example.com` itself.
"""

from __future__ import annotations

from collections.abc import Iterable


def matches(wildcard_or_name: str, name: str) -> bool:
    """Whether `name` (exact or wildcard) falls within `wildcard_or_name`."""
    if wildcard_or_name == name:
        return True
    if wildcard_or_name.startswith("*."):
        suffix = wildcard_or_name[1:]  # ".example.com"
        if name.startswith("*."):
            return name[1:].endswith(suffix) and len(name) > len(wildcard_or_name)
        return name.endswith(suffix) and len(name) > len(suffix)
    return False


def intersect(listener: str | None, route: tuple[str, ...]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener; empty when they share none.

    No listener hostname accepts every route hostname; a route without hostnames takes the
    listener's. Of two overlapping names the more specific one is kept."""
    if listener is None:
        return route or ("*",)
    if not route:
        return (listener,)
    out: list[str] = []
    for h in route:
        if matches(listener, h):
            out.append(h)
        elif matches(h, listener):
            out.append(listener)
    return tuple(dict.fromkeys(out))


def isolate(names: tuple[str, ...], listener: str | None,
            others: Iterable[str | None]) -> tuple[str, ...]:
    """Listener isolation: of the names a route serves on a listener, those no more
    specific listener on the same port takes. A request goes to the listener whose hostname
    matches it most specifically, and only that listener's routes may answer it; where a
    route's name only overlaps a more specific listener's, Envoy's choice of the most
    specific virtual host keeps the rest apart."""
    return tuple(n for n in names
                 if not any(matches(o, n) for o in narrower(listener, others)))


def narrower(listener: str | None, others: Iterable[str | None]) -> list[str]:
    """The hostnames among `others` (listeners on the same port) more specific than
    `listener`'s: every other hostname when it has none, the names under its wildcard."""
    return [o for o in others if o is not None and o != listener
            and (listener is None or matches(listener, o))]
