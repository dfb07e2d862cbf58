"""Providers turn the outside world into Kubernetes objects in the store; nothing else reads
input. Each is a component (`async run()`, cancelled to stop) with a `synced` event set once
its first full read is in the store: the first translation waits for every provider's."""

from __future__ import annotations

import asyncio
from typing import Protocol

from mesh.component import Component


class Provider(Component, Protocol):
    synced: asyncio.Event
