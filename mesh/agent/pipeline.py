"""The pipeline: store -> translate (pure) -> IR -> sinks, and status from the sinks.

Task ownership: `Pipeline.run` owns its status task and ends it when cancelled. The
translation runs on a worker thread (it is pure and reads an immutable snapshot), so the
event loop keeps serving xDS and answering signals during a big build; the sinks apply on
the loop. A change is built at once when the pipeline is idle; changes that arrive during a
build wait for it plus `min_interval`, or three times as long as the build took if that is
longer, and are built together: a burst costs a few builds, and during one the agent spends
at most a quarter of its time building (the API server and Envoy share the node's cores).
A change after a quiet while does not wait for the build before it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence

from mesh.addresses import AddressBook
from mesh.sinks.sink import Sink
from mesh.sinks.status.report import Readinesses, ReadinessSource, ReadinessView, StatusReport
from mesh.sinks.status.writer import StatusWriter
from mesh.store.store import Store, StoreSnapshot
from mesh.translate import Translation, TranslationMemo, TranslatorConfig, translate

log = logging.getLogger(__name__)
FREEZE_AFTER = 1000  # routes translated anew in one go
STATUS_INTERVAL = 0.1  # seconds: lets a burst of ACKs land before status is recomputed
BUSY_RATIO = 3.0  # during a burst, seconds waited per second of build


class Pipeline:
    def __init__(self, store: Store, config: TranslatorConfig, sinks: Sequence[Sink],
                 writer: StatusWriter, addresses: AddressBook,
                 synced: Sequence[asyncio.Event] = (), min_interval: float = 0.1,
                 sources: Sequence[ReadinessSource] = (),
                 on_built: Callable[[float, float], None] | None = None) -> None:
        """`on_built`: told each build's translation and sink times, in seconds."""
        self.store = store
        self.config = config
        self.sinks = list(sinks)
        self.writer = writer
        self.addresses = addresses
        self.synced = list(synced)
        self.min_interval = min_interval
        # Readiness besides the sinks' (Kubernetes: every node's), read by the status report.
        self.sources = list(sources)
        self.on_built = on_built
        self.report = StatusReport()
        self.built = asyncio.Event()  # set after the first build reached the sinks
        self._memo = TranslationMemo()
        self._last: tuple[StoreSnapshot, Translation] | None = None
        self._status_due = asyncio.Event()
        self._unwritten = False  # the last status could not be written

    async def run(self) -> None:
        for event in self.synced:
            await event.wait()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_status(), name="status")
            seen = -1
            while True:
                seen = await self.store.wait_change(seen)
                await asyncio.sleep(0)  # changes made in the same tick join this build
                started = time.monotonic()
                snapshot = self.store.snapshot()
                seen = snapshot.revision
                await self._build(snapshot)
                took = time.monotonic() - started
                if self.store.revision != seen:  # a burst: more came during the build
                    await asyncio.sleep(max(self.min_interval - took, BUSY_RATIO * took))

    async def _build(self, snapshot: StoreSnapshot) -> None:
        t0 = time.perf_counter()
        previous = self.addresses.current
        try:
            translation = await asyncio.to_thread(
                translate, snapshot, self.config, previous, self._memo)
            t1 = time.perf_counter()
            for sink in self.sinks:
                sink.apply(translation.ir)
        except Exception:
            # A bug, never bad input (that gets a status): the sinks keep the last good.
            log.exception("translation failed, keeping the last good config")
            return
        t2 = time.perf_counter()
        log.info("translated", extra={
            "objects": len(snapshot), "translate_ms": round((t1 - t0) * 1000, 1),
            "sinks_ms": round((t2 - t1) * 1000, 1)})
        if self.on_built is not None:
            self.on_built(t1 - t0, t2 - t1)
        self._last = (snapshot, translation)
        if translation.addresses != previous:
            try:
                await asyncio.to_thread(self.addresses.save, translation.addresses)
            except OSError as e:  # a full disk must not stop the node: tried again next build
                log.error("cannot save the address allocations", extra={"error": str(e)})
        self._status_due.set()
        self.built.set()
        if self._memo.misses >= FREEZE_AFTER:
            # Many new long-lived objects: without this, every later full collection
            # rescans them all (0.3 s at 10,000 routes) in the middle of some change. They
            # are still freed by reference counting when replaced.
            gc.collect()
            gc.freeze()

    async def _follow_status(self) -> None:
        """Recompute status after a build or any sink's progress, at most every
        STATUS_INTERVAL, on a thread: at 10,000 routes the first status after a full build
        takes about half a second, and a change arriving meanwhile must not wait for it."""
        watched: list[Sink | ReadinessSource] = [*self.sinks, *self.sources]
        progress = [asyncio.create_task(s.wait_progress()) for s in watched]
        try:
            while True:
                due = asyncio.create_task(self._status_due.wait())
                await asyncio.wait({due, *progress}, return_when=asyncio.FIRST_COMPLETED)
                due.cancel()
                progress = [asyncio.create_task(s.wait_progress()) if t.done() else t
                            for s, t in zip(watched, progress, strict=True)]
                self._status_due.clear()
                started = time.perf_counter()
                await asyncio.sleep(STATUS_INTERVAL)
                if self._last is None:
                    continue
                snapshot, translation = self._last
                readiness = [s.readiness() for s in self.sinks]  # on the loop: a copy
                views = [s.view() for s in self.sources]  # likewise
                await asyncio.to_thread(self._report, snapshot, translation, readiness, views)
                # A big status file takes a while to write; do not rewrite it back to back
                # while routes keep changing.
                await asyncio.sleep(min(1.0, (time.perf_counter() - started) * 2))
        finally:
            for t in progress:
                t.cancel()

    def _report(self, snapshot: StoreSnapshot, translation: Translation,
                readiness: Readinesses, views: Sequence[ReadinessView]) -> None:
        """On the status thread: the report is only ever used from here."""
        if self.report.update(snapshot, translation.status, readiness, views) or \
                self._unwritten:
            try:
                self.writer.write(self.report.objects, self.report.current, self.report.errors)
                self._unwritten = False
            except OSError as e:  # tried again at the next status round
                self._unwritten = True
                log.error("cannot write status", extra={"error": str(e)})
