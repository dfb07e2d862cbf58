"""The lab's map of images to commands (mesh.lab.images): echo-basic's environment read as
echo-basic reads it; an image the lab has nothing for refused by name."""

from __future__ import annotations

import pytest

from mesh.lab import images

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
    with pytest.raises(images.CannotRun, match="TCP_ECHO_SERVER"):
        images.entrypoint(ECHO, (), {"TCP_ECHO_SERVER": "1"})
