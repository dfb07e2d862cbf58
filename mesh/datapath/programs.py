"""Compiling and loading the programs of `bpf/` with bcc, their maps pinned in bpffs.

The C sources stay readable in the repository's `bpf/` (shared headers in `bpf/lib/`); bcc
compiles them once per agent start for the running kernel. Maps are pinned under the
agent's state directory (a bpffs mounted there), so a restarted agent finds them with their
contents, and the kernel keeps using them while no agent runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
BPFFS_MAGIC = 0xCAFE4A11


def _fs_type(path: Path) -> int | None:
    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    buf = _StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def ensure_bpffs(path: Path) -> Path:
    """A bpffs mounted at `path` (made mode 0700 if need be)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _fs_type(path) != BPFFS_MAGIC:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True,
                       capture_output=True)
    return path


def unmount_bpffs(path: Path) -> None:
    """Unpin everything (the maps go once nothing holds them) and unmount."""
    if _fs_type(path) == BPFFS_MAGIC:
        for entry in path.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        subprocess.run(["umount", str(path)], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        path.rmdir()


@dataclass
class Loaded:
    """A compiled program object: its functions and maps (bcc tables)."""

    bpf: Any

    def table(self, name: str) -> Any:
        return self.bpf.get_table(name.encode())

    def function(self, name: str, prog_type: int, attach_type: int = -1) -> Any:
        return self.bpf.load_func(name.encode(), prog_type, attach_type=attach_type)

    def close(self) -> None:
        self.bpf.cleanup()


def compile_program(source: str, pin_dir: Path, defines: tuple[str, ...] = ()) -> Loaded:
    """Compile `bpf/<source>` with the shared headers, its maps pinned in `pin_dir`;
    `defines`: more -D macros (a build variant)."""
    from bcc import BPF

    ensure_bpffs(pin_dir)
    cflags = [f"-I{BPF_DIR}", f'-DMESH_PIN_DIR="{pin_dir}"', "-Wno-unused-function",
              *(f"-D{d}" for d in defines)]
    # bcc prints compiler warnings to stderr; the C is ours and kept warning-free.
    return Loaded(BPF(src_file=str(BPF_DIR / source).encode(), cflags=cflags))


def cgroup_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
