"""The lab's cluster DNS, one per node (as a node-local DNS cache would be): Services' names
to their ClusterIPs, from the lab's state, with dnslib doing the wire format.

`svc.ns.svc.cluster.local` answers A (the ClusterIP; a headless Service's ready pod IPs);
pods reach `svc` and `svc.ns` through the search path the lab writes into their resolv.conf
(`ns.svc.cluster.local svc.cluster.local cluster.local`). Names outside the cluster are the
lab's `hosts` file's (beside lab.json, as /etc/hosts: `ADDRESS NAME...`; absent: none), with
TTL HOSTS_TTL: the lab's stand-in for the world's DNS. Anything else is NXDOMAIN.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSError
from dnslib.server import BaseResolver, DNSHandler, DNSServer

DOMAIN = "cluster.local"
TTL = 5
HOSTS_TTL = 10


def read_hosts(path: Path) -> dict[str, list[str]]:
    """A hosts file: name (with its trailing dot, lower case) -> addresses."""
    out: dict[str, list[str]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            out.setdefault(name.lower().rstrip(".") + ".", []).append(fields[0])
    return out


class ClusterResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, state: Path, hosts: Path | None = None) -> None:
        self.state = state
        self.hosts = hosts
        self._mtime = 0.0
        self._records: dict[str, list[str]] = {}
        self._hosts_mtime = 0.0
        self._hosts: dict[str, list[str]] = {}

    def _load(self) -> None:
        try:
            mtime = self.state.stat().st_mtime
            if mtime == self._mtime:
                return
            data = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return
        records: dict[str, list[str]] = {}
        for s in data.get("services", []):
            name = f"{s['name']}.{s['namespace']}.svc.{DOMAIN}."
            ip = s.get("clusterIP")
            records[name] = s.get("endpoints", []) if ip in (None, "", "None") else [ip]
        self._records, self._mtime = records, mtime

    def _load_hosts(self) -> None:
        if self.hosts is None:
            return
        try:
            mtime = self.hosts.stat().st_mtime
        except OSError:
            self._hosts, self._hosts_mtime = {}, 0.0
            return
        if mtime != self._hosts_mtime:
            self._hosts, self._hosts_mtime = read_hosts(self.hosts), mtime

    def resolve(self, request: Any, handler: Any) -> Any:
        self._load()
        self._load_hosts()
        reply = request.reply()
        qname = str(request.q.qname).lower()
        addresses, ttl = self._records.get(qname), TTL
        if addresses is None:
            addresses, ttl = self._hosts.get(qname), HOSTS_TTL
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for address in addresses:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=ttl))
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    """A message that does not parse still gets an answer when its header does, as DNS
    servers (CoreDNS's among them) give one: the header back with FORMERR, or NOTIMP for an
    opcode other than a query. dnslib alone would stay silent."""

    def get_reply(self, data: bytes) -> bytes:
        try:
            return bytes(super().get_reply(data))
        except DNSError:
            if len(data) < 12:
                raise
            ident, flags = struct.unpack("!HH", data[:4])
            opcode = (flags >> 11) & 0xF
            rcode = RCODE.FORMERR if opcode == 0 else RCODE.NOTIMP
            return struct.pack("!HHHHHH", ident, 0x8000 | (opcode << 11) | rcode, 0, 0, 0, 0)


def serve(resolver: BaseResolver, address: str, ports: list[int]) -> None:
    """Answer on UDP and TCP at each port until one of the servers stops."""
    servers = [DNSServer(resolver, address=address, port=port, tcp=tcp, handler=_Handler)
               for port in ports for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    while all(s.isAlive() for s in servers):
        time.sleep(1)


def resolv_conf(nameserver: str, namespace: str) -> str:
    return (f"nameserver {nameserver}\n"
            f"search {namespace}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\noptions ndots:5\n")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the lab's cluster DNS for one node")
    parser.add_argument("--listen", required=True, help="ADDRESS (port 53, UDP and TCP)")
    parser.add_argument("--state", required=True, type=Path, help="the lab's lab.json")
    parser.add_argument("--hosts", type=Path, help="names outside the cluster (hosts format)")
    args = parser.parse_args()
    resolver = ClusterResolver(args.state, args.hosts)
    serve(resolver, args.listen, [53])


if __name__ == "__main__":
    main()
