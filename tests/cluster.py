"""One real Kubernetes control plane (mesh.lab.controlplane) for the whole test run: the
session fixture `control_plane`, for every test that needs a cluster. Started on first use,
stopped (processes ended, certificates and etcd data removed) when the run ends; one that a
killed run left behind is removed by the next run."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from mesh.lab.controlplane import Binaries, ControlPlane

log = logging.getLogger(__name__)
T = TypeVar("T")
# Each run's control plane lives in PARENT/<pid of the test run>.
PARENT = Path(tempfile.gettempdir()) / f"mesh-test-control-plane-{os.getuid()}"


def _remove_leftovers() -> None:
    """Control planes of runs that are gone (killed before their teardown)."""
    if not PARENT.is_dir():
        return
    for state in PARENT.iterdir():
        if state.name.isdigit() and Path(f"/proc/{state.name}").exists():
            continue
        ControlPlane.cleanup(state)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    binaries = Binaries.at()
    missing = binaries.missing()
    if missing:
        pytest.skip(f"no {', '.join(p.name for p in missing)} in {missing[0].parent}: "
                    "run make kube-bin")
    _remove_leftovers()
    PARENT.mkdir(mode=0o700, exist_ok=True)
    cp = ControlPlane(PARENT / str(os.getpid()), binaries)
    try:
        seconds = cp.start()
        log.info("control plane ready in %.1fs", seconds)
        yield cp
    finally:
        cp.stop()
        with contextlib.suppress(OSError):  # another run's control plane may live there
            PARENT.rmdir()


def eventually(what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
    """The first truthy answer of `probe`, polled; fails the test after `timeout`. Unlike
    testbed.wait_until, an exception in `probe` is not retried: against the real API server
    an error is a failure, not a "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
