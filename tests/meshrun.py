"""`mesh run` as a user starts it, in a subprocess, and its status as users read it
(`status.json` in the state directory, `mesh health`)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.testbed import wait_until

ROOT = Path(__file__).resolve().parent.parent


class MeshRun:
    """One agent with its Envoy, ready unless `wait` is false. `fresh` removes the state
    directory first, so neither an address nor a status of an earlier run is read as this
    one's; without it only the status file goes (a restart test keeps the rest). The state
    directory must stay short: it holds unix sockets."""

    def __init__(self, manifests: Path | None, state: Path, *extra: str,
                 node_id: str | None = None, fresh: bool = False,
                 log: Path | None = None, wait: bool = True) -> None:
        self.state = state
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True, exist_ok=True)
        (state / "status.json").unlink(missing_ok=True)
        self.log = log or state.parent / f"{state.name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "run",
             *(["--manifests", str(manifests)] if manifests is not None else []),
             "--state-dir", str(state), "--node-id", node_id or state.name, *extra],
            stderr=self.log.open("wb"), cwd=ROOT)
        self.stopped_in: float | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> MeshRun:
        wait_until(lambda: b"node ready" in self.log.read_bytes(), timeout=timeout,
                   what="mesh run to be ready")
        return self

    def _doc(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.state / "status.json").read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or mid-replace
            return {"items": [], "fileErrors": {}}
        return doc

    def items(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every object in status.json by (kind, name)."""
        return {(i["kind"], i["metadata"]["name"]): i for i in self._doc()["items"]}

    def status(self, kind: str, name: str, namespace: str | None = None
               ) -> dict[str, Any] | None:
        """One object's .status, or None while it has none."""
        for item in self._doc()["items"]:
            meta = item["metadata"]
            if item["kind"] == kind and meta["name"] == name and \
                    (namespace is None or meta.get("namespace") == namespace):
                return dict(item["status"]) if "status" in item else None
        return None

    def ingress_address(self, name: str) -> str | None:
        """The address an Ingress's status gives (status.loadBalancer), once it has one."""
        item = self.items().get(("Ingress", name)) or {}
        lb = (item.get("status") or {}).get("loadBalancer", {}).get("ingress")
        return str(lb[0]["ip"]) if lb else None

    def file_errors(self) -> dict[str, str]:
        return dict(self._doc().get("fileErrors") or {})

    def health(self, ready: bool = False) -> str:
        """What `mesh health` prints (the chart's probes)."""
        return subprocess.run(
            [sys.executable, "-m", "mesh.cli", "health", "--state-dir", str(self.state),
             *(["--ready"] if ready else [])], capture_output=True, cwd=ROOT,
            timeout=20).stdout.decode()

    def stop(self, timeout: float = 15) -> str:
        """SIGTERM, and the agent's log; a SIGTERM not obeyed within `timeout` kills it and
        leaves `stopped_in` infinite, for the tests that assert how quickly it stops."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            self.stopped_in = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.stopped_in = float("inf")
        return self.log.read_text()


def condition(item: dict[str, Any], type_: str) -> dict[str, Any]:
    """A condition of an object's status, or of its first parent's (routes)."""
    status = item.get("status", item)
    conds = status.get("conditions") or status["parents"][0]["conditions"]
    return next(c for c in conds if c["type"] == type_)
