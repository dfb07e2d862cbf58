"""The directory provider: Kubernetes YAML or JSON files (multi-document, `kind: List`).

Each file is one source in the store. Like the API server it gives each object a generation
that grows when its spec changes, and a creation order. Input is bounded (see
`documents.Limits`): a document past a limit, or one that does not parse, is named with its
number and refused; the file's other documents are applied; and the objects the file held
before stay while any of its documents is bad, so an edit in progress never deletes anything.
A document's text is its cache key: one change in a file of 10,000 routes parses one document.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import watchfiles

from mesh import documents
from mesh.documents import DocumentError, Limits
from mesh.store.kinds import KINDS
from mesh.store.objects import KubeObject, ObjectError, ObjectKey, hashes, parse_object
from mesh.store.store import Store

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml", ".json")
RESYNC = 2.0  # seconds: the directory is looked at again this often, events or not


@dataclass(frozen=True)
class _Update:
    """One file's part of the store: its objects and errors, or None when it is gone."""

    source: str
    objects: list[KubeObject] | None
    errors: dict[str, str] | None


@dataclass(frozen=True)
class _Document:
    """What one document's text came to: its objects (with their hashes), or an error."""

    objects: tuple[tuple[KubeObject, str], ...] = ()  # (object, spec hash)
    error: str | None = None


def _parse_document(text: str, source: str, json_file: bool, limits: Limits,
                    previous: Mapping[ObjectKey, tuple[KubeObject, str]]) -> _Document:
    """One document's objects. An object equal to the one of that name the file held last
    time is that one again, hashes and all: a `kind: List` of 10,000 routes with one
    changed hashes one route."""
    try:
        docs = [documents.load_json(text, limits)] if json_file else documents.load_yaml(
            text, limits)
        out = []
        for doc in docs:
            for item in documents.flatten(doc):
                if item is None:
                    continue
                obj = parse_object(item, source=source)
                if obj.group_kind not in KINDS:
                    continue
                old = previous.get(obj.key)
                if old is not None and old[0].body == item:
                    out.append(old)
                else:
                    spec_hash, body_hash = hashes(item)
                    out.append((replace(obj, body_hash=body_hash), spec_hash))
        return _Document(tuple(out))
    except (DocumentError, ObjectError) as e:
        return _Document(error=str(e))
    except (TypeError, ValueError) as e:
        # What JSON cannot hold (a key that is not a string, say): no Kubernetes object.
        return _Document(error=f"not a Kubernetes object: {e}")


def _created(obj: KubeObject, first_seen: float) -> float:
    stamp = obj.metadata.get("creationTimestamp")
    if isinstance(stamp, datetime):  # PyYAML parses unquoted timestamps
        return stamp.timestamp()
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return first_seen


@dataclass
class _Tracked:
    spec_hash: str
    generation: int
    created: float
    stamped: KubeObject  # handed out again while the content is the same


class FileProvider:
    """Puts the objects of every manifest file under `directory` into `store`."""

    def __init__(self, directory: Path, store: Store, clock: Callable[[], float] = time.time,
                 limits: Limits = documents.DEFAULT_LIMITS) -> None:
        self.directory = directory
        self.store = store
        self.limits = limits
        self._clock = clock
        self._stats: dict[Path, tuple[int, int]] = {}  # (mtime_ns, size) when last read
        self._documents: dict[Path, dict[str, _Document]] = {}  # per file: text -> result
        self._objects: dict[Path, dict[ObjectKey, KubeObject]] = {}  # last applied
        self._tracked: dict[ObjectKey, _Tracked] = {}
        self.synced = asyncio.Event()  # set once the directory was read

    def _paths(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*")
                      if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."))

    def load(self) -> bool:
        """Read what changed in the directory into the store; whether the store changed."""
        return self.apply(self.collect())

    def collect(self) -> list[_Update]:
        """What changed in the directory, read and parsed; the store is not touched. Only
        this provider's own state changes, so it may run on a worker thread (one at a time):
        a big file parses without holding up the event loop."""
        paths = self._paths()
        updates = []
        for gone in set(self._stats) - set(paths):
            del self._stats[gone]
            self._documents.pop(gone, None)
            self._objects.pop(gone, None)
            updates.append(_Update(str(gone), None, None))
        for path in paths:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if self._stats.get(path) == stamp:
                    continue  # unchanged since it was last read
                updates.append(self._load_file(path, st.st_size))
                self._stats[path] = stamp
            except FileNotFoundError:
                continue  # removed while we looked: the next event drops it
        if updates:  # the 2-second resync of an unchanged directory costs its stat()s only
            self._forget_deleted()
        return updates

    def apply(self, updates: list[_Update]) -> bool:
        """Put what `collect` read into the store (on the event loop); whether it changed."""
        changed = False
        for u in updates:
            if u.objects is None:
                changed = self.store.remove(u.source) or changed
            else:
                changed = self.store.replace(u.source, u.objects, u.errors) or changed
        return changed

    def _load_file(self, path: Path, size: int) -> _Update:
        source = str(path)
        errors: list[str] = []
        objects: dict[ObjectKey, KubeObject] = {}
        try:
            if size > self.limits.file_bytes:  # not even read
                raise DocumentError(f"file is {size} bytes, over the limit of "
                                    f"{self.limits.file_bytes}")
            with path.open("rb") as f:  # a file growing since stat() is still bounded
                text = documents.check_text(f.read(self.limits.file_bytes + 1), self.limits)
            json_file = path.suffix == ".json"
            chunks = [text] if json_file else documents.split(text)
            cache = self._documents.get(path, {})
            previous: dict[ObjectKey, tuple[KubeObject, str]] | None = None
            fresh: dict[str, _Document] = {}
            now = self._clock()
            for i, chunk in enumerate(chunks):
                doc = fresh.get(chunk) or cache.get(chunk)
                if doc is None:
                    if previous is None:
                        # For the items of a List (one document, always parsed again); a
                        # YAML document whose text changed has most likely changed.
                        previous = {o.key: (o, h) for d in cache.values()
                                    for o, h in d.objects} if json_file or len(cache) < 2 \
                            else {}
                    doc = _parse_document(chunk, source, json_file, self.limits, previous)
                fresh[chunk] = doc
                if doc.error is not None:
                    errors.append(f"document {i + 1}: {doc.error}")
                for obj, spec_hash in doc.objects:
                    if obj.key in objects:
                        errors.append(f"document {i + 1}: {obj.key} is defined twice")
                        continue
                    objects[obj.key] = self._stamp(obj, spec_hash, now)
            self._documents[path] = fresh
        except (OSError, DocumentError) as e:
            errors = [str(e)]
            objects = {}
        if errors:
            # Keep what the file held before: the bad part may be an edit in progress of it.
            for key, obj in self._objects.get(path, {}).items():
                objects.setdefault(key, obj)
            log.error("manifest file has errors, keeping its last good objects",
                      extra={"file": source, "error": "; ".join(errors)})
        self._objects[path] = objects
        return _Update(source, list(objects.values()),
                       {source: "; ".join(errors)} if errors else None)

    def _forget_deleted(self) -> None:
        live = {k for objs in self._objects.values() for k in objs}
        for key in set(self._tracked) - live:
            del self._tracked[key]  # deleted: a new object of that name starts afresh

    def _stamp(self, obj: KubeObject, spec_hash: str, now: float) -> KubeObject:
        t = self._tracked.get(obj.key)
        if t is not None and t.stamped.body_hash == obj.body_hash and \
                t.stamped.source == obj.source:
            return t.stamped
        if t is None:
            t = self._tracked[obj.key] = _Tracked(spec_hash, obj.generation,
                                                  _created(obj, now), obj)
        elif t.spec_hash != spec_hash:
            t.spec_hash, t.generation = spec_hash, max(t.generation + 1, obj.generation)
        t.stamped = replace(obj, generation=t.generation, created=t.created)
        return t.stamped

    async def run(self) -> None:
        """Load the directory, then follow it (debounced 100 ms) until cancelled.

        A change made between the first read and the watch's start would be missed, so the
        watch also wakes every RESYNC seconds with no event, and the directory's files are
        looked at again then (by mtime and size: cheap when nothing changed)."""
        self.apply(await asyncio.to_thread(self.collect))
        self.synced.set()

        def relevant(_change: watchfiles.Change, path: str) -> bool:
            return path.endswith(SUFFIXES)

        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        async for changes in watchfiles.awatch(
                self.directory, watch_filter=relevant, debounce=100, step=20,
                yield_on_timeout=True, rust_timeout=int(RESYNC * 1000)):
            start = time.perf_counter()
            changed = self.apply(await asyncio.to_thread(self.collect))
            if changes or changed:
                log.info("manifests loaded", extra={
                    "changes": len(changes), "changed": changed,
                    "ms": round((time.perf_counter() - start) * 1000, 1)})
