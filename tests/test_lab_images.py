"""The lab's map of images to commands (mesh.lab.images): echo-basic's environment read as
echo-basic reads it; an image the lab has nothing for refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.lab import coredns, images

ECHO = "registry.k8s.io/gateway-api/echo-basic:v1.5.1"


def test_image_names_lose_tag_and_digest_but_keep_a_registry_port() -> None:
    assert images.image_name(ECHO) == "registry.k8s.io/gateway-api/echo-basic"
    assert images.image_name("registry.k8s.io/gateway-api/echo-basic@sha256:ab12") == \
        "registry.k8s.io/gateway-api/echo-basic"
    assert images.image_name("localhost:5000/echo:v1") == "localhost:5000/echo"
    assert images.image_name("busybox") == "busybox"


def test_echo_basic_defaults_and_ports_from_its_environment() -> None:
    argv = images.entrypoint(ECHO, (), {})
    assert argv[-5:] == ("echo", "--listen", "0.0.0.0:3000", "--listen", "0.0.0.0:3001")
    argv = images.entrypoint(ECHO, (), {"HTTP_PORT": "8080", "H2C_PORT": "8081"})
    assert "0.0.0.0:8080" in argv and "0.0.0.0:8081" in argv and "0.0.0.0:3000" not in argv


def test_echo_basic_tls_and_grpc() -> None:
    argv = images.entrypoint(ECHO, (), {"TLS_SERVER_CERT": "/s/crt",
                                        "TLS_SERVER_PRIVKEY": "/s/key",
                                        "TLS_CLIENT_CACERTS": "/s/ca"})
    i = argv.index("--tls-listen")
    assert argv[i:i + 8] == ("--tls-listen", "0.0.0.0:8443", "--cert", "/s/crt", "--key",
                             "/s/key", "--client-ca", "/s/ca")
    assert "--tls-listen" not in images.entrypoint(ECHO, (), {"TLS_SERVER_CERT": "/s/crt"})
    grpc = images.entrypoint(ECHO, (), {"GRPC_ECHO_SERVER": "1", "HTTP_PORT": "9000"})
    assert grpc[-4:] == ("echo", "--grpc", "--listen", "0.0.0.0:9000")


def test_args_follow_the_entrypoint_and_unknown_images_are_refused() -> None:
    assert images.entrypoint(ECHO, ("--extra",), {})[-1] == "--extra"
    with pytest.raises(KeyError):
        images.entrypoint("example.com/app:1.0", (), {})
    assert images.entrypoint(ECHO, (), {"UDP_ECHO_SERVER": "1"})[-1] == "mesh.udpecho"
    assert images.entrypoint(ECHO, (), {"TCP_ECHO_SERVER": "1"})[-1] == "mesh.tcpecho"


def test_coredns_runs_the_labs_whoami_server_with_its_arguments() -> None:
    argv = images.entrypoint("registry.k8s.io/coredns/coredns:v1.12.2", ("-conf", "/c/F"), {})
    assert argv[-3:] == ("mesh.lab.coredns", "-conf", "/c/F")


def test_a_corefile_read_as_coredns_reads_its_server_blocks() -> None:
    blocks = coredns.parse(""".:53 {
        forward . 8.8.8.8 9.9.9.9
        log
    }
    foo.bar.com:5353 {   # a comment
      whoami
    }""")
    assert blocks == [coredns.Block(".", 53, ("forward", "log")),
                      coredns.Block("foo.bar.com.", 5353, ("whoami",))]


def test_the_whoami_zone_answers_the_clients_address_and_others_fail() -> None:
    from dnslib import QTYPE, RCODE, DNSRecord
    from dnslib.server import DNSServer

    resolver = coredns.Whoami(coredns.parse("foo.bar.com:53 {\n whoami\n}\n"))
    server = DNSServer(resolver, address="127.0.0.1", port=0)
    server.start_thread()
    try:
        port = server.server.server_address[1]
        reply = DNSRecord.parse(DNSRecord.question("foo.bar.com").send(
            "127.0.0.1", port, timeout=5))
        assert {(QTYPE[r.rtype], str(r.rdata)) for r in reply.ar if r.rtype == QTYPE.A} == \
            {("A", "127.0.0.1")}
        assert any(r.rtype == QTYPE.SRV for r in reply.ar)
        other = DNSRecord.parse(DNSRecord.question("example.com").send(
            "127.0.0.1", port, timeout=5))
        assert other.header.rcode == RCODE.SERVFAIL
    finally:
        server.stop()


def test_the_tcp_echo_answers_as_echo_basic_does(tmp_path: Path) -> None:
    """Plain and TLS: the greeting, TEST's JSON (the pod, and the TLS the client got), IS_TLS,
    PING."""
    import asyncio
    import json
    import ssl
    import subprocess

    from mesh import tcpecho

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "key"),
                    "-out", str(tmp_path / "crt"), "-subj", "/CN=tcp.example", "-days", "1"],
                   check=True, capture_output=True)

    async def talk(port: int, tls: ssl.SSLContext | None) -> list[bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                             server_hostname="tcp.example" if tls else None)
        out = [await r.readline()]
        for line in (b"TEST\n", b"IS_TLS\n", b"PING\n"):
            w.write(line)
            out.append(await r.readline())
        w.close()
        return out

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        env = {"POD_NAME": "tcp-1", "NAMESPACE": "ns", "TCP_PORT": "0"}
        pod = tcpecho.context(env, "3000", "8443")
        plain = await asyncio.start_server(
            lambda r, w: tcpecho.serve_connection(r, w, pod), "127.0.0.1", 0)
        secure = await asyncio.start_server(
            lambda r, w: tcpecho.serve_connection(r, w, pod), "127.0.0.1", 0,
            ssl=tcpecho._tls_context(str(tmp_path / "crt"), str(tmp_path / "key")))
        client = ssl.create_default_context(cafile=str(tmp_path / "crt"))
        client.check_hostname = False
        async with plain, secure:
            return (await talk(plain.sockets[0].getsockname()[1], None),
                    await talk(secure.sockets[0].getsockname()[1], client))

    plain, secure = asyncio.run(scenario())
    assert plain[0] == b"Gateway API Test TCP Server\n"
    doc = json.loads(plain[1])
    assert doc["pod"] == "tcp-1" and doc["namespace"] == "ns" and doc["isTLS"] is False
    assert plain[2:] == [b"false\n", b"PONG\n"]
    tls = json.loads(secure[1])
    assert tls["isTLS"] is True and tls["tls"]["serverName"] == "tcp.example"
    assert tls["tls"]["version"] in ("TLS 1.2", "TLS 1.3") and secure[2] == b"true\n"


def test_the_udp_echo_answers_each_datagram_with_the_pods_context() -> None:
    import json
    import socket
    import threading

    from mesh import udpecho

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    env = {"NAMESPACE": "ns", "SERVICE_NAME": "svc", "POD_NAME": "pod-1"}
    threading.Thread(target=udpecho.serve, args=(server, env), daemon=True).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.sendto(b"ping", server.getsockname())
    reply = json.loads(client.recv(2048))
    assert reply == {"request": "ping", "namespace": "ns", "ingress": "", "service": "svc",
                     "pod": "pod-1"}
