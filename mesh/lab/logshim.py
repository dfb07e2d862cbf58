"""A container's log, as a container runtime keeps it: `python -m mesh.lab.logshim LOG --
COMMAND...` runs COMMAND with its stdout and stderr on a pipe and appends each line to LOG in
the CRI log format (`2026-12-06T07:12:42.123456789Z stdout F text`), so that the lab's kubelet
can serve a pod's logs with `sinceTime`, `tailLines` and `timestamps` as a kubelet does.

It is the container's first process (the kubelet starts it in its own session): it leaves
SIGTERM to the command and exits as the command did, with its code or by its signal, so the
kubelet reads the container's exit as its own. A shim apart from the kubelet, as conmon is:
a stopped kubelet never fills the pipe and stalls the container.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINE = 16 << 10  # a longer line is split, as the CRI marks with P (partial)


def cri_time(t: datetime.datetime) -> str:
    """A time as a CRI log line writes it (nanoseconds, UTC): such strings sort as times."""
    t = t.astimezone(datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}000Z"


def stamp() -> str:
    return cri_time(datetime.datetime.now(datetime.UTC))


def parse(line: str) -> tuple[str, str] | None:
    """(timestamp, text) of a CRI log line, or None for one that is not."""
    parts = line.rstrip("\n").split(" ", 3)
    if len(parts) != 4 or parts[1] not in ("stdout", "stderr"):
        return None
    return parts[0], parts[3]


def lines(path: Path) -> Iterator[tuple[str, str]]:
    try:
        with path.open(errors="replace") as f:
            for line in f:
                got = parse(line)
                if got is not None:
                    yield got
    except OSError:
        return


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: logshim LOG -- COMMAND...")
    log, command = Path(argv[0]), argv[2:]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        try:
            os.execvp(command[0], command)
        except OSError as e:
            os.write(2, f"exec {command[0]}: {e}\n".encode())
            os._exit(127)
    os.close(write)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is the command's
    with open(log, "ab", buffering=0) as out, os.fdopen(read, "rb") as pipe:
        for raw in pipe:
            for i in range(0, len(raw), MAX_LINE):
                piece = raw[i:i + MAX_LINE]
                tag = b"F" if piece.endswith(b"\n") else b"P"
                out.write(f"{stamp()} stdout ".encode() + tag + b" " + piece.rstrip(b"\n")
                          + b"\n")
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main(sys.argv[1:])
