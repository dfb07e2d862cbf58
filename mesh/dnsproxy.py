"""The node's DNS proxy, for toFQDNs rules: the pods whose egress policy names DNS names send
their DNS here (the datapath hands their UDP and TCP port 53 traffic to this proxy on loopback,
unchanged, as bpf/fwd.c's to_dns_proxy says); the proxy asks the server the pod asked, learns
the addresses of the answer (mesh/datapath/fqdn.py writes what they open before the answer
goes on) and answers the pod from the server's address, as if it had answered itself.

UDP: the datagram arrives with its original destination (IP_ORIGDSTADDR); the answer is sent
from that address and port through a raw socket (the address is not this node's). An answer
too big for one packet goes back truncated, so the pod's resolver asks again over TCP. TCP: the
listening socket is transparent, so each connection's local address is the server the pod
connected to.

It listens on loopback only; a query that cannot be forwarded (no answer within TIMEOUT) gets
no answer, as from a server that lost it: the pod's resolver retries.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Mapping

from dnslib import QTYPE, DNSError, DNSRecord

log = logging.getLogger(__name__)
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
TIMEOUT = 5.0  # seconds to wait for the server
MAX_INFLIGHT = 1024  # UDP queries being forwarded; more are dropped (the resolver retries)
MAX_UDP_ANSWER = 1472  # what fits one packet of a 1,500-byte MTU
IDLE = 10.0  # seconds a pod's TCP connection may stay silent

Learn = Callable[[Iterable[str], Mapping[str, float]], int]


def answer_addresses(answer: DNSRecord) -> tuple[list[str], dict[str, float]]:
    """The names an answer is about (the question and its CNAME chain, lower case, no
    trailing dot) and the IPv4 addresses it gives them, with their TTL."""
    names = [str(answer.q.qname).lower().rstrip(".")]
    addresses: dict[str, float] = {}
    for rr in answer.rr:
        if rr.rtype == QTYPE.CNAME:
            names.append(str(rr.rdata.label).lower().rstrip("."))
        elif rr.rtype == QTYPE.A:
            address = str(rr.rdata)
            addresses[address] = min(addresses.get(address, float(rr.ttl)), float(rr.ttl))
    return names, addresses


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 UDP packet (the kernel fills the IP checksum and id of a raw socket's)."""
    length = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP,
                     0, socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src[0]), socket.inet_aton(dst[0]), 0,
                         socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", src[1], dst[1], length, 0)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF
    return ip + struct.pack("!HHHH", src[1], dst[1], length, checksum) + payload


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def truncated(query: bytes, answer: bytes) -> bytes:
    """The answer with its header's TC bit and no records: ask again over TCP."""
    try:
        record = DNSRecord.parse(answer)
    except DNSError:
        record = DNSRecord.parse(query).reply()
    record.header.tc = 1
    record.rr, record.auth, record.ar = [], [], []
    return bytes(record.pack())


class DnsProxy:
    """The component: UDP and TCP on 127.0.0.1:port; `learn` is told every answer first,
    `expire` runs every second (the fqdn reconciler's)."""

    def __init__(self, port: int, learn: Learn, expire: Callable[[], object] | None = None,
                 address: str = "127.0.0.1") -> None:
        self.port, self.address = port, address
        self.learn, self.expire = learn, expire
        self.queries = 0
        self.answers = 0
        self.failures = 0  # no answer from the server in time, or an error
        self._inflight: set[asyncio.Task[None]] = set()
        self._raw: socket.socket | None = None
        self.ready = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        udp.setblocking(False)
        udp.bind((self.address, self.port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        tcp.bind((self.address, self.port))
        tcp.setblocking(False)
        self._raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        server = await asyncio.start_server(self._tcp, sock=tcp, limit=1 << 17)
        loop.add_reader(udp.fileno(), self._readable, udp)
        log.info("DNS proxy listening", extra={"address": f"{self.address}:{self.port}"})
        self.ready.set()
        try:
            while True:
                await asyncio.sleep(1.0)
                if self.expire is not None:
                    self.expire()
        finally:
            loop.remove_reader(udp.fileno())
            server.close()
            for task in list(self._inflight):
                task.cancel()
            udp.close()
            self._raw.close()

    def _readable(self, udp: socket.socket) -> None:
        for _ in range(64):  # a burst, then let the loop breathe
            try:
                data, ancillary, _, client = udp.recvmsg(65535, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("DNS proxy receive", extra={"error": str(e)})
                return
            original = None
            for level, kind, value in ancillary:
                if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(value) >= 8:
                    port, = struct.unpack("!H", value[2:4])
                    original = (socket.inet_ntoa(value[4:8]), port)
            if original is None or len(self._inflight) >= MAX_INFLIGHT:
                self.failures += 1
                continue
            self.queries += 1
            task = asyncio.get_running_loop().create_task(self._udp(data, client, original))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _udp(self, query: bytes, client: tuple[str, int], server: tuple[str, int]
                   ) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            try:
                await loop.sock_connect(s, server)
                await loop.sock_sendall(s, query)
                answer = await asyncio.wait_for(self._matching(s, query), TIMEOUT)
            except (OSError, TimeoutError):
                self.failures += 1
                return
        self._learn(answer)
        if len(answer) > MAX_UDP_ANSWER:
            answer = truncated(query, answer)
        assert self._raw is not None
        try:
            self._raw.sendto(udp_packet(server, client, answer), (client[0], 0))
            self.answers += 1
        except OSError as e:
            self.failures += 1
            log.warning("DNS proxy answer", extra={"client": client[0], "error": str(e)})

    @staticmethod
    async def _matching(s: socket.socket, query: bytes) -> bytes:
        """The server's answer to this query (its id), skipping anything else."""
        loop = asyncio.get_running_loop()
        while True:
            answer = await loop.sock_recv(s, 65535)
            if len(answer) >= 12 and answer[:2] == query[:2]:
                return answer

    def _learn(self, answer: bytes) -> None:
        try:
            record = DNSRecord.parse(answer)
        except DNSError:
            return  # passed on as it is: the pod's resolver judges it
        names, addresses = answer_addresses(record)
        if addresses:
            self.learn(names, addresses)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = writer.get_extra_info("sockname")[:2]
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                query = await _read_message(reader, IDLE)
                if query is None:
                    return
                self.queries += 1
                if upstream is None:
                    upstream = await asyncio.wait_for(
                        asyncio.open_connection(*server), TIMEOUT)
                upstream[1].write(struct.pack("!H", len(query)) + query)
                answer = await _read_message(upstream[0], TIMEOUT)
                if answer is None:
                    self.failures += 1
                    return
                self._learn(answer)
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
                self.answers += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            self.failures += 1
        finally:
            if upstream is not None:
                upstream[1].close()
            writer.close()


async def _read_message(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """One length-prefixed DNS message; None at the end of the stream."""
    try:
        head = await asyncio.wait_for(reader.readexactly(2), timeout)
    except asyncio.IncompleteReadError:
        return None
    length, = struct.unpack("!H", head)
    return await asyncio.wait_for(reader.readexactly(length), timeout)

