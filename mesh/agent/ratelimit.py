"""The node's rate limit service (mesh/ratelimit) as a child process of the agent.

A process of its own, so that its decisions (the hot path of every globally limited request)
never wait behind a translation. Restarted with a growing backoff when it exits; stopped with
the agent, also when the agent is killed (it follows the agent's death). Envoy reaches it
on a unix socket in the state directory (mode 0600).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class RateLimitService:
    def __init__(self, socket: Path, redis_url: str, log_path: Path) -> None:
        self.socket = socket
        self.redis_url = redis_url
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def run(self) -> None:
        delay = 0.1
        while True:
            started = asyncio.get_running_loop().time()
            with self.log_path.open("ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "mesh.ratelimit", "--listen",
                    f"unix://{self.socket}", "--redis", self.redis_url,
                    # A killed agent (SIGKILL: no chance to stop it) takes it along.
                    "--parent-pid", str(os.getpid()),
                    stdout=out, stderr=out)
            log.info("rate limit service started", extra={"pid": self.proc.pid,
                                                           "socket": str(self.socket)})
            try:
                code = await self.proc.wait()
            except asyncio.CancelledError:
                await self._stop()
                raise
            log.warning("rate limit service exited; restarting",
                        extra={"code": code, "log": str(self.log_path)})
            if asyncio.get_running_loop().time() - started > 10:
                delay = 0.1  # it ran for a while: a new failure starts the backoff anew
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
