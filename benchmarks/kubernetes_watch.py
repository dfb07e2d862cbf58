"""A burst of watch events into the store: N HTTPRoutes applied to the API double while the
Kubernetes provider watches, time until all are in the store, with the provider's
coalescing (events within 20 ms reach the store together) and without it (one store
publish per event, each a pass over the kind's objects: quadratic in a burst), side by side.

    python benchmarks/kubernetes_watch.py [--quick]

Prints, last, one JSON line: routes, coalesced_s, per_event_s, speedup, store_revisions
(coalesced) and store_revisions_per_event. The double runs in the same process and event
loop as the provider, as a stand-in for an API server sending events as fast as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes_asyncio.client import ApiClient, Configuration

from mesh.kube.client import HTTP
from mesh.kube.watch import KindWatch
from mesh.providers.kubernetes import KubernetesProvider
from mesh.store import kinds
from mesh.store.store import Store
from tests.kubeapi import FakeAPIServer

GW = "gateway.networking.k8s.io"


async def burst(n: int, coalesce: bool) -> tuple[float, int]:
    """(seconds until every route is in the store, store revisions meanwhile)."""
    api = FakeAPIServer()
    base = await api.start()
    store = Store()
    original = KindWatch._publish_soon
    if not coalesce:
        KindWatch._publish_soon = KindWatch._publish  # type: ignore[method-assign]
    try:
        async with ApiClient(Configuration(host=base)) as client:
            provider = KubernetesProvider(HTTP(client), store, "n1")
            task = asyncio.create_task(provider.run())
            await provider.synced.wait()
            before = store.revision
            started = time.perf_counter()
            for i in range(n):
                if i % 10 == 0:
                    await asyncio.sleep(0.001)  # events spread out, as a real apply sends them
                await api.put_object(GW, "httproutes", {
                    "metadata": {"name": f"r{i}", "namespace": "default"},
                    "spec": {"parentRefs": [{"name": "gw"}]}})
            while len(store.snapshot().of_kind(kinds.HTTP_ROUTE)) < n:
                await asyncio.sleep(0.005)
            took = time.perf_counter() - started
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return took, store.revision - before
    finally:
        KindWatch._publish_soon = original  # type: ignore[method-assign]
        await api.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2,000 routes instead of 10,000")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the double serves no TLSRoutes etc.: said once each
    n = 2000 if args.quick else 10_000
    out: dict[str, Any] = {"routes": n}
    coalesced, revisions = asyncio.run(burst(n, coalesce=True))
    per_event, revisions_per_event = asyncio.run(burst(n, coalesce=False))
    out.update(coalesced_s=round(coalesced, 2), per_event_s=round(per_event, 2),
               speedup=round(per_event / coalesced, 1), store_revisions=revisions,
               store_revisions_per_event=revisions_per_event)
    print(f"{n} routes: coalesced {coalesced:.2f} s ({revisions} store revisions), "
          f"one publish per event {per_event:.2f} s ({revisions_per_event})", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
