"""Raw Envoy resources from a YAML file, served as they are (`mesh run --resources`): no
store and no translator, the file is the whole configuration. A file that does not load is
logged and changes nothing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import watchfiles

from mesh.sinks.envoy.resource_file import ResourceFileError, load_resources
from meshxds.cache import SnapshotCache

log = logging.getLogger(__name__)


class RawResources:
    def __init__(self, path: Path, cache: SnapshotCache, node_id: str) -> None:
        self.path = path
        self.cache = cache
        self.node_id = node_id
        self.built = asyncio.Event()

    def load(self) -> bool:
        try:
            resources = load_resources(self.path)
            self.cache.set_snapshot(self.node_id, resources)
        except (ResourceFileError, ValueError) as e:
            log.error("resource file rejected, keeping the last good config",
                      extra={"file": str(self.path), "error": str(e)})
            return False
        return True

    async def run(self) -> None:
        if not self.load():
            self.cache.set_snapshot(self.node_id, [])  # serve, if only nothing
        self.built.set()
        target = self.path.resolve()
        # Watch the directory: editors replace a file rather than write it in place.
        # watchfiles gives full paths; the filter drops the directory's other files.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        async for _ in watchfiles.awatch(
                target.parent, watch_filter=lambda _c, p: p == str(target),
                debounce=100, step=20, recursive=False):
            log.info("resource file changed", extra={"file": str(target)})
            self.load()
