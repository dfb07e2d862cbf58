"""Addresses given to Gateways from the pool, kept across agent restarts (a restart must not
move a Gateway to another address). The translator allocates, given the last allocation as
input; this module only loads and saves it (a JSON file, mode 0600, in the state dir)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


class AddressBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("address file unreadable, starting afresh", extra={"file": str(self.path)})
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def save(self, addresses: Mapping[str, str]) -> None:
        """Write the allocations; `current` follows only once they are on disk, so a failed
        write is tried again after the next build."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(addresses), f, sort_keys=True)
        tmp.replace(self.path)
        self.current = dict(addresses)
