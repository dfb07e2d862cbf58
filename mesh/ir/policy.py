"""The network policy part of the IR: which security identity each pod has."""

from __future__ import annotations

from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class IdentityMap:
    """Pod address -> security identity, for the pods whose identity is known (sorted by
    address); and the label sets seen on pods that have no identity yet, for a sink to
    create (until it exists, such a pod counts as unmanaged: policy allows it nothing a
    label selects)."""

    endpoints: tuple[tuple[str, int], ...] = ()
    missing: tuple[Labels, ...] = ()
