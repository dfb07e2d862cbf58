"""The service maps' reconciler: desired frontends (from the IR) against what the pinned maps
hold; only the difference is written.

One service change is O(its backends) map writes, whatever the number of services. Writes
go make-before-break: a frontend's backends first, then its backend slots (and its Maglev
table, replaced whole in one write), then slot 0 (the count and flags readers go by) last;
shrinking lowers the count first and removes slots after. At
start the reconciler reads the pinned maps back (frontends, slots, backend ids, reverse-NAT
indexes) and goes on from there: an agent restart rewrites nothing that is right already.
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mesh import ir
from mesh.datapath import maglev
from mesh.datapath.layout import (
    IPPROTO,
    MAGLEV_M,
    SVC_EXTERNAL,
    SVC_L7,
    SVC_MAGLEV,
    Lb4Backend,
    Lb4Key,
    Lb4Maglev,
    Lb4ReverseNat,
    Lb4Service,
    address_of,
    be16,
    be32,
)

log = logging.getLogger(__name__)
FrontendKey = tuple[str, int, str]  # (address, port, protocol)
BackendKey = tuple[str, int, int]  # (address, port, IP protocol number)
_PROTO_NAME = {v: k for k, v in IPPROTO.items()}


class Table(Protocol):
    """What the reconciler needs of a map (a bcc table, or a dict in tests)."""

    def __setitem__(self, key: Any, value: Any) -> None: ...

    def __delitem__(self, key: Any) -> None: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...


@dataclass(frozen=True)
class Installed:
    rev_nat_index: int
    backends: tuple[int, ...]  # backend ids, slot order
    flags: int = 0  # MESH_SVC_*
    proxy_port: int = 0


def _flags(f: ir.ServiceFrontend) -> int:
    return (SVC_MAGLEV if f.algorithm == "maglev" else 0) | \
        (SVC_EXTERNAL if f.external else 0) | (SVC_L7 if f.proxy_port else 0)


class ServiceReconciler:
    def __init__(self, services: Table, backends: Table, rev_nat: Table,
                 maglev_tables: Table | None = None) -> None:
        """`maglev_tables`: the Maglev map; without it, Maglev frontends are refused."""
        self.services = services
        self.backends = backends
        self.rev_nat = rev_nat
        self.maglev = maglev_tables
        self.installed: dict[FrontendKey, Installed] = {}
        self.backend_ids: dict[BackendKey, int] = {}
        self.errors: dict[FrontendKey, str] = {}
        self.writes = 0  # map writes and deletes, over the reconciler's life
        self._load()
        self._backend_pool = _Ids(self.backend_ids.values(), 2**32 - 1)
        # How many slots name each backend: one change releases what it alone used, with
        # no scan over every service.
        self._refs: Counter[int] = Counter(i for inst in self.installed.values()
                                           for i in inst.backends)
        self._orphans = set(self.backend_ids.values()) - set(self._refs)
        self._backend_keys = {i: bk for bk, i in self.backend_ids.items()}
        self._rev_nat_pool = _Ids((i.rev_nat_index for i in self.installed.values()), 65535)

    # -- reading the pinned maps back ----------------------------------------------------

    def _load(self) -> None:
        for key, value in self.backends.items():
            proto = int(value.proto)
            self.backend_ids[(address_of(value.address), _port(value.port), proto)] = \
                int(key.value if hasattr(key, "value") else key)
        slots: dict[FrontendKey, dict[int, int]] = {}
        fronts: dict[FrontendKey, tuple[int, int, int, int]] = {}
        for key, value in self.services.items():
            fk = (address_of(key.address), _port(key.dport), _PROTO_NAME.get(int(key.proto),
                                                                               "TCP"))
            if key.backend_slot == 0:
                fronts[fk] = (int(value.count), int(value.rev_nat_index), int(value.flags),
                              _port(value.proxy_port))
            else:
                slots.setdefault(fk, {})[int(key.backend_slot)] = int(value.backend_id)
        for fk, (count, rev, flags, proxy) in fronts.items():
            got = slots.get(fk, {})
            self.installed[fk] = Installed(rev, tuple(got.get(i, 0) for i in range(1, count + 1)),
                                           flags, proxy)
        if self.installed:
            log.info("service maps adopted", extra={"frontends": len(self.installed),
                                                   "backends": len(self.backend_ids)})

    # -- the diff --------------------------------------------------------------------------

    def apply(self, frontends: Iterable[ir.ServiceFrontend]) -> None:
        desired = {f.key: f for f in frontends}
        for key in [k for k in self.installed if k not in desired]:
            self._remove(key)
        for key, f in desired.items():
            try:
                self._upsert(f)
                self.errors.pop(key, None)
            except Exception as e:  # bcc raises plain Exception for a failed map write
                self.errors[key] = f"cannot write the service maps: {e}"
                log.error("service map write failed",
                          extra={"frontend": "{}:{}/{}".format(*key), "error": str(e)})
        self._release_unused_backends()

    def update(self, f: ir.ServiceFrontend) -> None:
        """One frontend changed (an event path, no diff over the others): its writes only."""
        self._upsert(f)
        self._release_unused_backends()

    def _upsert(self, f: ir.ServiceFrontend) -> None:
        proto = IPPROTO[f.protocol]
        flags = _flags(f)
        if flags & SVC_MAGLEV and self.maglev is None:
            raise ValueError("Maglev is not available in this datapath")
        ids = tuple(self._backend_id(b, proto) for b in f.backends)
        old = self.installed.get(f.key)
        proxy = f.proxy_port or 0
        if old is not None and old.backends == ids and old.flags == flags and \
                old.proxy_port == proxy:
            return
        rev = old.rev_nat_index if old is not None else self._new_rev_nat(f)
        # Counted before any write: a write failing half way must not let the release
        # below free ids that slots may name by then.
        self._refs.update(ids)
        try:
            for slot, backend_id in enumerate(ids, start=1):
                if old is None or slot > len(old.backends) or \
                        old.backends[slot - 1] != backend_id:
                    self._write(self.services, _key(f, slot), Lb4Service(backend_id=backend_id))
            if flags & SVC_MAGLEV and ids and (old is None or not old.flags & SVC_MAGLEV or
                                               old.backends != ids):
                self._write_maglev(rev, f, ids)
            self._write(self.services, _key(f, 0),
                        Lb4Service(count=len(ids), rev_nat_index=rev, flags=flags,
                                   proxy_port=be16(proxy)))
            if old is not None:
                for slot in range(len(ids) + 1, len(old.backends) + 1):
                    self._delete(self.services, _key(f, slot))
            if old is not None and old.flags & SVC_MAGLEV and \
                    (not flags & SVC_MAGLEV or not ids):
                self._delete_maglev(rev)
        except Exception:
            # What the slots hold is unknown now: every id either side named stays
            # referenced (new ones counted above, old ones still), and the next apply
            # rewrites the frontend whole, since its slots compare unequal.
            self.installed[f.key] = Installed(rev, ids + (old.backends if old else ()), flags,
                                              proxy)
            raise
        if old is not None:
            self._unref(old.backends)
        self.installed[f.key] = Installed(rev, ids, flags, proxy)

    def _write_maglev(self, rev: int, f: ir.ServiceFrontend, ids: tuple[int, ...]) -> None:
        """The frontend's whole Maglev table in one write. Slot i names a backend by the
        table's order of backend names, so every node builds the same table from the same
        backends (their ids are this node's own)."""
        assert self.maglev is not None
        by_name = {maglev.backend_name(b.address, b.port): i
                   for b, i in zip(f.backends, ids, strict=True)}
        names = maglev.ordered(list(by_name))
        value = Lb4Maglev()
        value.backend_ids[:] = [by_name[names[j]] for j in maglev.table(names, MAGLEV_M)]
        self._write(self.maglev, ctypes.c_uint16(rev), value)

    def _delete_maglev(self, rev: int) -> None:
        if self.maglev is not None:
            self._delete(self.maglev, ctypes.c_uint16(rev))

    def _remove(self, key: FrontendKey) -> None:
        old = self.installed.pop(key)
        address, port, protocol = key
        f = ir.ServiceFrontend(address, port, protocol, ())
        self._delete(self.services, _key(f, 0))  # readers stop here first
        for slot in range(1, len(old.backends) + 1):
            self._delete(self.services, _key(f, slot))
        if old.flags & SVC_MAGLEV:
            self._delete_maglev(old.rev_nat_index)
        self._delete(self.rev_nat, ctypes.c_uint16(old.rev_nat_index))
        self._rev_nat_pool.give(old.rev_nat_index)
        self._unref(old.backends)
        self.errors.pop(key, None)

    def _backend_id(self, b: ir.L4Backend, proto: int) -> int:
        bk = (b.address, b.port, proto)
        found = self.backend_ids.get(bk)
        if found is not None:
            return found
        new = self._backend_pool.take()
        try:
            self._write(self.backends, ctypes.c_uint32(new),
                        Lb4Backend(address=be32(b.address), port=be16(b.port), proto=proto))
        except Exception:
            self._backend_pool.give(new)
            raise
        self._orphans.add(new)  # until a slot names it
        self.backend_ids[bk] = new
        self._backend_keys[new] = bk
        return new

    def _new_rev_nat(self, f: ir.ServiceFrontend) -> int:
        new = self._rev_nat_pool.take()
        self._write(self.rev_nat, ctypes.c_uint16(new),
                    Lb4ReverseNat(address=be32(f.address), port=be16(f.port)))
        return new

    def _unref(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._refs[i] -= 1
            if self._refs[i] <= 0:
                del self._refs[i]
                self._orphans.add(i)

    def _release_unused_backends(self) -> None:
        """A backend no slot names any more leaves the backends map. Connections already
        made to it go on: a socket-level rewrite happened once, at connect."""
        orphans = {i for i in self._orphans if i not in self._refs}
        self._orphans.clear()
        if not orphans:
            return
        for backend_id in orphans:
            bk = self._backend_keys.pop(backend_id, None)
            if bk is not None:
                self.backend_ids.pop(bk, None)
            self._delete(self.backends, ctypes.c_uint32(backend_id))
            self._backend_pool.give(backend_id)

    def _write(self, table: Table, key: Any, value: Any) -> None:
        table[key] = value
        self.writes += 1

    def _delete(self, table: Table, key: Any) -> None:
        try:
            del table[key]
        except KeyError:
            pass  # already gone: what we want
        self.writes += 1

    def readiness_errors(self) -> Mapping[FrontendKey, str]:
        return dict(self.errors)


class _Ids:
    """Small integer ids from 1: freed ones first, then the next new one."""

    def __init__(self, used: Iterable[int], maximum: int) -> None:
        taken = set(used)
        self._next = max(taken, default=0) + 1
        self._free = sorted(set(range(1, self._next)) - taken, reverse=True)
        self._maximum = maximum

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next > self._maximum:
            raise ValueError("no id left")
        self._next += 1
        return self._next - 1

    def give(self, i: int) -> None:
        self._free.append(i)


def _key(f: ir.ServiceFrontend, slot: int) -> Lb4Key:
    return Lb4Key(address=be32(f.address), dport=be16(f.port), backend_slot=slot,
                  proto=IPPROTO[f.protocol])


def _port(value: int) -> int:
    return int.from_bytes(int(value).to_bytes(2, "little"), "big")
