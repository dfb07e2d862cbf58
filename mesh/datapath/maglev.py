"""Maglev lookup tables (Eisenbud et al., NSDI 2016, section 3.4), computed by the agent for
bpf/lib/lb.h's `mesh_maglev` map.

Each backend's preference list is a permutation of the table's slots drawn from two hashes
of its address and port; backends take turns claiming their next free preferred slot until
the table is full. The table depends only on the set of backends, so every node computes
the same one, and a flow hashed to slot i reaches the same backend whichever node it
enters; adding or removing one backend moves about 1/N of the slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache


def _offset_skip(name: bytes, m: int) -> tuple[int, int]:
    digest = hashlib.blake2b(name, digest_size=16).digest()
    return (int.from_bytes(digest[:8], "little") % m,
            int.from_bytes(digest[8:], "little") % (m - 1) + 1)


@lru_cache(maxsize=256)
def table(names: tuple[bytes, ...], m: int) -> tuple[int, ...]:
    """Entry i: the index in `names` of slot i's backend. `names` must be sorted and
    distinct (the same set gives the same table), `m` a prime larger than their number."""
    n = len(names)
    if n == 0:
        return ()
    if n >= m:
        raise ValueError(f"a Maglev table of {m} entries takes fewer than {m} backends")
    prefs = [_offset_skip(name, m) for name in names]
    nexts = [0] * n
    out = [-1] * m
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(prefs):
            c = (offset + nexts[i] * skip) % m
            while out[c] >= 0:
                nexts[i] += 1
                c = (offset + nexts[i] * skip) % m
            out[c] = i
            nexts[i] += 1
            filled += 1
            if filled == m:
                return tuple(out)


def backend_name(address: str, port: int) -> bytes:
    return f"{address}:{port}".encode()


def ordered(names: Sequence[bytes]) -> tuple[bytes, ...]:
    return tuple(sorted(set(names)))
