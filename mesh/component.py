"""What the agent runs: every long-running part of it, as one protocol."""

from __future__ import annotations

from typing import Protocol


class Component(Protocol):
    async def run(self) -> None:
        """Run until cancelled (the agent stopping) or failed; whatever it started, it ends
        or lets go of on its way out."""
