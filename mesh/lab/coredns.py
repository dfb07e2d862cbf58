"""What the lab runs for CoreDNS's image: the part of a Corefile the Gateway API's
conformance fixtures use, served with dnslib.

`coredns -conf FILE` reads server blocks (`ZONE[:PORT] { plugins }`); for each zone whose block
holds `whoami` it answers as CoreDNS's whoami plugin does (an A or AAAA record of the asking
client's address, and an SRV record of its port, in the additional section). Other zones get
SERVFAIL: the lab has no way out to forward to.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver

from mesh.lab import dns

BLOCK = re.compile(r"([^\s{]+)\s*\{([^}]*)\}", re.S)


@dataclass(frozen=True)
class Block:
    zone: str  # "foo.bar.com." ("." for the root)
    port: int
    plugins: tuple[str, ...]


def parse(text: str) -> list[Block]:
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for head, body in BLOCK.findall(text):
        zone, _, port = head.rpartition(":") if ":" in head else (head, "", "53")
        zone = zone.rstrip(".").lower() + "." if zone not in (".", "") else "."
        plugins = tuple(line.split()[0] for line in body.splitlines() if line.split())
        out.append(Block(zone, int(port or 53), plugins))
    return out


class Whoami(BaseResolver):  # type: ignore[misc]
    def __init__(self, blocks: list[Block]) -> None:
        # The most specific zone first, as CoreDNS picks a server block.
        self.blocks = sorted(blocks, key=lambda b: -len(b.zone))

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        block = next((b for b in self.blocks if b.zone == "." or qname == b.zone
                      or qname.endswith("." + b.zone)), None)
        if block is None or "whoami" not in block.plugins:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        address, port = handler.client_address[:2]
        v6 = ":" in address
        reply.add_ar(RR(qname, QTYPE.AAAA if v6 else QTYPE.A,
                        rdata=AAAA(address) if v6 else A(address), ttl=0))
        reply.add_ar(RR(f"_{handler.protocol}.{qname}", QTYPE.SRV,
                        rdata=SRV(0, 0, int(port), qname), ttl=0))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-conf", default="Corefile", type=Path)
    args = parser.parse_args()
    blocks = parse(args.conf.read_text())
    dns.serve(Whoami(blocks), "0.0.0.0", sorted({b.port for b in blocks}))


if __name__ == "__main__":
    main()
