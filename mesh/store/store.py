"""The store: every provider's objects, merged into immutable snapshots.

A provider only ever replaces its own objects (`replace(source, objects, errors)`); the
translator only ever reads a snapshot. When two sources define the same object the first
source (in name order) keeps it and the other is told so in its errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.store.kinds import CLUSTER_SCOPED, GroupKind
from mesh.store.objects import KubeObject, ObjectKey


class StoreSnapshot:
    """An immutable view of the store, what the translator gets."""

    def __init__(self, objects: Mapping[ObjectKey, KubeObject],
                 errors: Mapping[str, str] | None = None, revision: int = 0) -> None:
        self._objects = MappingProxyType(dict(objects))
        self.errors: Mapping[str, str] = MappingProxyType(dict(errors or {}))
        self.revision = revision
        by_kind: dict[GroupKind, list[KubeObject]] = {}
        for obj in self._objects.values():
            by_kind.setdefault(obj.group_kind, []).append(obj)
        for objs in by_kind.values():
            objs.sort(key=lambda o: (o.namespace, o.name))
        self._by_kind = by_kind

    def __iter__(self) -> Iterator[KubeObject]:
        return iter(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, gk: GroupKind, namespace: str, name: str) -> KubeObject | None:
        ns = "" if gk in CLUSTER_SCOPED else namespace
        return self._objects.get(ObjectKey(gk.group, gk.kind, ns, name))

    def of_kind(self, *kinds: GroupKind) -> list[KubeObject]:
        out: list[KubeObject] = []
        for gk in kinds:
            out.extend(self._by_kind.get(gk, ()))
        return out

    @classmethod
    def of(cls, objects: Iterable[KubeObject]) -> StoreSnapshot:
        return cls({o.key: o for o in objects})


@dataclass
class _Source:
    objects: dict[ObjectKey, KubeObject] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Store:
    """Objects by source. Synchronous and loop-free to write; `wait_change` for readers."""

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}
        self._revision = 0
        self._snapshot: StoreSnapshot | None = None
        self._changed = asyncio.Event()

    @property
    def revision(self) -> int:
        return self._revision

    def replace(self, source: str, objects: Iterable[KubeObject],
                errors: Mapping[str, str] | None = None) -> bool:
        """Make `objects` the whole of what `source` holds, with the errors it met (where
        -> message). Returns whether anything the translator reads changed."""
        new = _Source({o.key: o for o in objects}, dict(errors or {}))
        old = self._sources.get(source)
        if old is not None and old.errors == new.errors and old.objects.keys() == \
                new.objects.keys() and all(o.version == old.objects[k].version
                                           for k, o in new.objects.items()):
            return False
        self._sources[source] = new
        self._bump()
        return True

    def remove(self, source: str) -> bool:
        if self._sources.pop(source, None) is None:
            return False
        self._bump()
        return True

    def _bump(self) -> None:
        self._revision += 1
        self._snapshot = None
        self._changed.set()
        self._changed = asyncio.Event()

    def snapshot(self) -> StoreSnapshot:
        if self._snapshot is None:
            objects: dict[ObjectKey, KubeObject] = {}
            errors: dict[str, str] = {}
            for name, src in sorted(self._sources.items()):
                errors.update(src.errors)
                for key, obj in src.objects.items():
                    first = objects.get(key)
                    if first is not None:
                        msg = f"{key} is also defined in {first.source}"
                        errors[name] = f"{errors[name]}; {msg}" if name in errors else msg
                        continue
                    objects[key] = obj
            self._snapshot = StoreSnapshot(objects, errors, self._revision)
        return self._snapshot

    async def wait_change(self, seen: int) -> int:
        """Wait until the store's revision is past `seen`; return the new revision."""
        while self._revision == seen:
            await self._changed.wait()
        return self._revision
