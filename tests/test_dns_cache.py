"""The toFQDNs DNS cache and the DNS proxy's wire handling, without a kernel: what an answer
teaches (the question, its CNAME chain, the A records' TTL), expiry, bounds, the file a
restarted agent reads back, and the packet the proxy answers a pod with. The datapath and the
proxy run for real in the lab (tests/test_netpol_lab.py)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from mesh import ir
from mesh.datapath.fqdn import MAX_ADDRESSES, MIN_TTL, DnsCache, fqdn_keys
from mesh.dnsproxy import _checksum, answer_addresses, truncated, udp_packet


def test_an_answer_teaches_its_names_and_addresses_for_their_ttl() -> None:
    query = DNSRecord.question("www.Example.com.")
    answer = query.reply()
    answer.add_answer(RR("www.example.com.", QTYPE.CNAME, rdata=CNAME("edge.cdn.net."), ttl=300))
    answer.add_answer(RR("edge.cdn.net.", QTYPE.A, rdata=A("198.51.100.7"), ttl=20))
    answer.add_answer(RR("edge.cdn.net.", QTYPE.A, rdata=A("198.51.100.8"), ttl=0))
    names, addresses = answer_addresses(DNSRecord.parse(answer.pack()))
    assert names == ["www.example.com", "edge.cdn.net"]
    assert addresses == {"198.51.100.7": 20.0, "198.51.100.8": 0.0}
    cache = DnsCache()
    assert cache.learn(names, addresses, now=1000.0) == names
    assert cache.names["www.example.com"] == {"198.51.100.7": 1020.0,
                                              "198.51.100.8": 1000.0 + MIN_TTL}
    assert cache.learn(names, addresses, now=1000.0) == []  # nothing new
    assert not cache.expire(1004.0)
    assert cache.expire(1005.0)  # the TTL 0 record, after MIN_TTL
    assert cache.names["edge.cdn.net"] == {"198.51.100.7": 1020.0}
    assert cache.expire(1020.0) and cache.names == {}


def test_the_cache_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    cache = DnsCache()
    many = {f"10.0.{i // 256}.{i % 256}": 60.0 for i in range(MAX_ADDRESSES + 10)}
    cache.learn(["big.example.com"], many, now=0.0)
    assert len(cache.names["big.example.com"]) == MAX_ADDRESSES
    path = tmp_path / "dns-cache.json"
    cache.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = DnsCache()
    again.load(path, now=30.0)
    assert again.names == cache.names
    again.load(path, now=61.0)  # expired meanwhile: gone
    assert again.names == {}
    path.write_text("{not json")
    again.load(path, now=0.0)
    assert again.names == {}


def test_fqdn_entries_are_exact_prefixes() -> None:
    assert fqdn_keys("10.244.1.5", "198.51.100.7", ir.FqdnAllow("a.com")) == [
        ("10.244.1.5", "198.51.100.7", 0, 0, 64)]
    assert fqdn_keys("10.244.1.5", "198.51.100.7", ir.FqdnAllow("a.com", "UDP")) == [
        ("10.244.1.5", "198.51.100.7", 17, 0, 80)]
    assert fqdn_keys("10.244.1.5", "198.51.100.7", ir.FqdnAllow("a.com", "TCP", 8000, 8003)) \
        == [("10.244.1.5", "198.51.100.7", 6, 8000, 94)]


def test_the_answer_packet_comes_from_the_server_the_pod_asked() -> None:
    payload = b"\x12\x34" + bytes(30)
    packet = udp_packet(("10.96.0.10", 53), ("10.244.1.5", 40000), payload)
    ip = struct.unpack("!BBHHHBBH4s4s", packet[:20])
    assert ip[0] == 0x45 and ip[2] == len(packet) and ip[6] == socket.IPPROTO_UDP
    assert socket.inet_ntoa(ip[8]) == "10.96.0.10" and socket.inet_ntoa(ip[9]) == "10.244.1.5"
    sport, dport, length, _ = struct.unpack("!HHHH", packet[20:28])
    assert (sport, dport, length) == (53, 40000, 8 + len(payload))
    pseudo = struct.pack("!4s4sBBH", ip[8], ip[9], 0, socket.IPPROTO_UDP, length)
    assert _checksum(pseudo + packet[20:]) == 0  # a valid checksum sums to zero


def test_an_answer_too_big_for_udp_goes_back_truncated() -> None:
    query = DNSRecord.question("big.example.com.")
    answer = query.reply()
    for i in range(200):
        answer.add_answer(RR("big.example.com.", QTYPE.A, rdata=A(f"10.1.0.{i}"), ttl=60))
    small = DNSRecord.parse(truncated(bytes(query.pack()), bytes(answer.pack())))
    assert small.header.tc == 1 and small.rr == [] and small.header.id == query.header.id
