"""One node's IPsec, as the agent runs it (mesh/sinks/ipsec.py fed by the encryption
translator), without an API server: for tests/test_ipsec_vm.py, which plays the API server
through files. Run in the node's network namespace:

    python -m tests.ipsec_node DIR NAME

reads the cluster's Nodes from DIR/nodes.json whenever it changes, keeps its state in
DIR/NAME (the status file `mesh encryption status` reads), its keys in DIR/NAME.keys (the
mounted Secret), writes its announcement (what the agent patches on its Node) to
DIR/NAME.announce, and stops when DIR/stop appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path

from mesh import ir
from mesh.sinks.ipsec import IpsecSettings, IpsecSink
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.encryption import translate_encryption


async def main(work: Path, name: str) -> None:
    state = work / name
    state.mkdir(parents=True, exist_ok=True)
    sink = IpsecSink(IpsecSettings(state, work / f"{name}.keys", name), None)
    task = asyncio.create_task(sink.run())
    store = Store()
    seen = b""
    announced: str | None = None
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
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{sys.argv[2]} %(levelname)s %(message)s")
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
