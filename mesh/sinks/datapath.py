"""The datapath sink: the IR's L4 service frontends into the pinned BPF maps, the socket-level
load balancer attached to the pods' cgroup, network policy (where this process forwards: the
node's own namespace), and per-object readiness for status (a Service
whose maps could not be written says so, with the error)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh.datapath.forwarding import Forwarding
from mesh.datapath.programs import Loaded, compile_program
from mesh.datapath.services import ServiceReconciler
from mesh.ir import IR
from mesh.sinks.sink import Readiness, State
from mesh.store.objects import ObjectKey

log = logging.getLogger(__name__)
# (program, attach type) of bpf/sock_lb.c, by bcc's BPFAttachType numbers.
_SOCK_LB = (("mesh_connect4", 10), ("mesh_sendmsg4", 14), ("mesh_recvmsg4", 19),
            ("mesh_getpeername4", 29))
_CGROUP_SOCK_ADDR = 18
# bpf/sock_lb.c's sock_ops program (BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS): the
# translations of TCP connections, told to the flow tracking by tuple.
_SOCK_OPS = ("mesh_sockops", 13, 3)
FOLLOW = 2.0  # seconds between looks at the node's pods


class DatapathSink:
    name = "datapath"

    def __init__(self, pin_dir: Path, cgroup: Path | None = None, forwarding: bool = False,
                 underlay: str | None = None, redirect: str = "sk-assign",
                 dns_cache: Path | None = None) -> None:
        """`forwarding`: attach bpf/fwd.c to this namespace's pod veths (and `underlay`):
        only where this process runs in the node's own namespace. `dns_cache`: where the
        toFQDNs rules' DNS cache is kept."""
        self.pin_dir = pin_dir
        self.loaded: Loaded = compile_program("sock_lb.c", pin_dir)
        self.forwarding = Forwarding(pin_dir, underlay, redirect, dns_cache) \
            if forwarding else None
        self.reconciler = ServiceReconciler(self.loaded.table("mesh_services"),
                                            self.loaded.table("mesh_backends"),
                                            self.loaded.table("mesh_rev_nat"),
                                            self.loaded.table("mesh_maglev"))
        self._owners: dict[tuple[str, int, str], frozenset[ObjectKey]] = {}
        self._problems: dict[tuple[str, int, str], str] = {}
        self._progress = asyncio.Event()
        self._sync_due = asyncio.Event()
        if cgroup is not None:
            self.attach(cgroup)

    def attach(self, cgroup: Path) -> None:
        """Attach the socket load balancer to a cgroup (v2): every socket its processes
        open is balanced. An agent's earlier programs there are replaced in place."""
        from bcc import BPF

        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, attach_type in _SOCK_LB:
                fn = self.loaded.function(name, _CGROUP_SOCK_ADDR, attach_type)
                BPF.attach_func(fn, fd, attach_type)
            name, prog_type, attach_type = _SOCK_OPS
            BPF.attach_func(self.loaded.function(name, prog_type, attach_type), fd,
                            attach_type)
        finally:
            os.close(fd)

    def apply(self, ir: IR) -> None:
        self._owners = {f.key: f.owners for f in ir.services}
        problems = {f.key: f.problem for f in ir.services if f.problem}
        for key, problem in problems.items():
            if self._problems.get(key) != problem:  # said once, not at every apply
                log.warning("service frontend", extra={
                    "frontend": "{}:{}/{}".format(*key), "problem": problem})
        self._problems = problems
        self.reconciler.apply(ir.services)
        if self.forwarding is not None:
            # toFQDNs entries first: one that goes is then covered by the revision bump
            removed = self.forwarding.fqdn.set_rules(ir.network_policies.endpoints)
            if not self.forwarding.policy.apply(ir.network_policies) and removed:
                self.forwarding.policy.bump()
        self._sync_due.set()  # run() looks at the node's pods now (netlink, on a thread)
        self._progress.set()
        self._progress = asyncio.Event()

    def metered_tables(self) -> dict[str, Any]:
        """The maps whose fill the metrics report."""
        return {name: self.loaded.table(name) for name in (
            "mesh_services", "mesh_backends", "mesh_sock_rev")}

    def readiness(self) -> Mapping[ObjectKey, Readiness]:
        out: dict[ObjectKey, Readiness] = {}
        for key, error in self.reconciler.readiness_errors().items():
            for owner in self._owners.get(key, ()):
                out[owner] = Readiness(State.FAILED, error)
        return out  # written frontends are ready the moment apply() returns

    async def wait_progress(self) -> None:
        await self._progress.wait()

    async def run(self) -> None:
        """Follow the node's pods for forwarding: a pod the CNI plugin wired since the last
        look is attached within FOLLOW seconds (an EndpointSlice change does it at once)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_due.wait(), FOLLOW)
            self._sync_due.clear()
            if self.forwarding is not None:
                await asyncio.to_thread(self.forwarding.sync)

    def close(self) -> None:
        """Let go of the programs' file descriptors; the pinned maps and the attached
        programs stay, and keep balancing while no agent runs."""
        with contextlib.suppress(Exception):
            self.loaded.close()
        if self.forwarding is not None:
            self.forwarding.close()
