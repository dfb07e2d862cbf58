"""One node's IPsec, as the agent runs it (mesh/sinks/ipsec.py fed by the encryption
translator), without an API server: for tests/test_ipsec_vm.py, which plays the API server
through files. Run in the node's network namespace:

    python -m tests.ipsec_node DIR NAME [UNDERLAY]

reads the cluster's Nodes from DIR/nodes.json whenever it changes, keeps its state in
DIR/NAME (the status file `mesh encryption status` reads), its keys in DIR/NAME.keys (the
mounted Secret), writes its announcement (what the agent patches on its Node) to
DIR/NAME.announce, and stops when DIR/stop appears. With UNDERLAY, the node's datapath too
(bpf/fwd.c on its pods' veths and on UNDERLAY, as the agent loads it), its counters written to
DIR/NAME.datapath.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path

from mesh import ir
from mesh.sinks.encryption import datapath_counters
from mesh.sinks.ipsec import IpsecSettings, IpsecSink
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.encryption import translate_encryption


async def main(work: Path, name: str, underlay: str | None) -> None:
    state = work / name
    state.mkdir(parents=True, exist_ok=True)
    fwd = None
    if underlay is not None:
        from mesh.datapath.forwarding import Forwarding
        from mesh.datapath.programs import ensure_bpffs

        # pyroute2 wants no running loop in its thread, and bcc takes its time: both in one
        fwd = await asyncio.to_thread(Forwarding, ensure_bpffs(state / "bpffs"), underlay)
        await asyncio.to_thread(fwd.sync)
    sink = IpsecSink(IpsecSettings(state, work / f"{name}.keys", name),
                     fwd.encryption_tables() if fwd is not None else None)
    task = asyncio.create_task(sink.run())
    store = Store()
    seen = b""
    announced: str | None = None
    rounds = 0
    try:
        while not (work / "stop").exists():
            with contextlib.suppress(FileNotFoundError):
                raw = (work / "nodes.json").read_bytes()
                if raw != seen:
                    seen = raw
                    store.replace("test", [parse_object(n) for n in json.loads(raw)])
                    sink.apply(ir.IR(encryption=translate_encryption(store.snapshot(), name)))
            if sink.announcement() != announced:
                announced = sink.announcement()
                tmp = work / f"{name}.announce.tmp"
                tmp.write_text(announced or "")
                tmp.replace(work / f"{name}.announce")
            if task.done():
                task.result()  # the sink ended: its error ends this
            rounds += 1
            if fwd is not None and rounds % 10 == 0:
                await asyncio.to_thread(fwd.sync)  # pods come and go
                local, kernel, _, _ = fwd.stats()
                tmp = work / f"{name}.datapath.tmp"
                tmp.write_text(json.dumps({"local": local, "kernel": kernel,
                                           **datapath_counters(sink.tables)}))
                tmp.replace(work / f"{name}.datapath")
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if fwd is not None:
            fwd.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{sys.argv[2]} %(levelname)s %(message)s")
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
