"""The directory provider: Kubernetes YAML or JSON files (multi-document, `kind: List`).

Like the API server it gives each object a generation that grows when its spec changes, and a
creation order. A file that does not parse, or holds an invalid object, is reported and its
previously loaded objects are kept: an edit in progress never deletes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import watchfiles
import yaml

from mesh.k8s import KINDS, KubeObject, ObjectError, ObjectKey, StoreSnapshot, parse_object

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's parser where PyYAML has it: 20 times faster on large manifests.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FileError(ValueError):
    pass


def parse_file(path: Path) -> list[KubeObject]:
    """Every object of a kind the agent handles, or FileError for the whole file."""
    try:
        text = path.read_text()
        if path.suffix == ".json":
            docs = [json.loads(text)]
        else:
            docs = list(yaml.load_all(text, Loader=_LOADER))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise FileError(f"{path}: {e}") from e
    out: list[KubeObject] = []
    for i, doc in enumerate(_flatten(docs)):
        if doc is None:
            continue
        try:
            obj = parse_object(doc, source=str(path))
        except ObjectError as e:
            raise FileError(f"{path}: document {i + 1}: {e}") from e
        if obj.kind in KINDS:
            out.append(obj)
    return out


def _flatten(docs: list[Any]) -> Iterator[Any]:
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(
                doc.get("items"), list):
            yield from doc["items"]
        else:
            yield doc


def _spec_hash(obj: KubeObject) -> str:
    # What the API server counts as a spec change: everything but metadata and status.
    body = {k: v for k, v in obj.body.items() if k not in ("metadata", "status")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


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
    body: Any = None  # the parsed body last hashed: the same object needs no new hash
    stamped: KubeObject | None = None  # handed out again while the body is the same


@dataclass
class DirectoryState:
    snapshot: StoreSnapshot
    errors: dict[str, str] = field(default_factory=dict)  # file -> message


class FileProvider:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        self._files: dict[Path, list[KubeObject]] = {}
        self._stats: dict[Path, tuple[int, int]] = {}  # (mtime_ns, size) when last parsed
        self._errors: dict[str, str] = {}
        self._tracked: dict[ObjectKey, _Tracked] = {}

    def _paths(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*")
                      if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."))

    def load(self) -> DirectoryState:
        """Read the directory again and return the resulting store."""
        paths = self._paths()
        for gone in set(self._files) - set(paths):
            del self._files[gone]
            self._stats.pop(gone, None)
            self._errors.pop(str(gone), None)
        for path in paths:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if self._stats.get(path) == stamp and path in self._files:
                    continue  # unchanged since it was last read
                self._files[path] = parse_file(path)
                self._stats[path] = stamp
                self._errors.pop(str(path), None)
            except FileNotFoundError:
                continue  # removed while we looked: the next event drops it
            except FileError as e:
                if str(path) not in self._errors:
                    log.error("manifest file rejected, keeping its last good objects",
                              extra={"file": str(path), "error": str(e)})
                self._errors[str(path)] = str(e)
        return DirectoryState(self._merge(), dict(self._errors))

    def _merge(self) -> StoreSnapshot:
        objects: dict[ObjectKey, KubeObject] = {}
        now = self._clock()
        for path, objs in sorted(self._files.items()):
            for obj in objs:
                if obj.key in objects:
                    msg = f"{path}: {obj.key} is also defined in {objects[obj.key].source}"
                    self._errors[str(path)] = msg
                    continue
                objects[obj.key] = self._stamp(obj, now)
        for key in set(self._tracked) - set(objects):
            del self._tracked[key]  # deleted: a new object of that name starts afresh
        return StoreSnapshot(objects)

    def _stamp(self, obj: KubeObject, now: float) -> KubeObject:
        t = self._tracked.get(obj.key)
        if t is not None and t.stamped is not None and (
                t.body is obj.body or (t.stamped.source == obj.source and t.body == obj.body)):
            # The same object as last time (also when its file was read again for another
            # object's change): consumers can tell "unchanged" by identity.
            return t.stamped
        h = _spec_hash(obj)
        if t is None:
            t = self._tracked[obj.key] = _Tracked(h, obj.generation, _created(obj, now))
        elif t.spec_hash != h:
            t.spec_hash, t.generation = h, max(t.generation + 1, obj.generation)
        t.body = obj.body
        t.stamped = replace(obj, generation=t.generation, created=t.created)
        return t.stamped

    async def watch(self, on_change: Callable[[DirectoryState], object]) -> None:
        """Call `on_change` after each burst of changes (debounced 100 ms)."""
        def relevant(_change: watchfiles.Change, path: str) -> bool:
            return path.endswith(SUFFIXES)

        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        async for changes in watchfiles.awatch(self.directory, watch_filter=relevant,
                                               debounce=100, step=20):
            start = time.perf_counter()
            state = self.load()
            log.info("manifests loaded", extra={
                "changes": len(changes), "objects": len(state.snapshot),
                "ms": round((time.perf_counter() - start) * 1000, 1)})
            on_change(state)
