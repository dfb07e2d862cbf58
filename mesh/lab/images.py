"""The images the lab runs: what its kubelet starts for a container that names no command.

The lab pulls no images. A container with a `command` runs it (with its `args`) as a
process, whatever its image. A container without one runs what this map gives for its
image, the tag and digest aside: the project's own implementation of what the image does,
reading the same environment, with the container's `args` after it. An image the map does not
hold cannot run: the container waits with `ErrImageNeverPull`, as a kubelet says for an
image it may not pull.

- registry.k8s.io/gateway-api/echo-basic (and its staging name): `mesh echo`, configured
  as echo-basic reads its environment: HTTP on `HTTP_PORT` (3000) and h2c on `H2C_PORT`
  (3001); HTTPS on `HTTPS_PORT` (8443) given `TLS_SERVER_CERT`, `TLS_SERVER_PRIVKEY` and
  `TLS_CLIENT_CACERTS`; the gRPC echo on `HTTP_PORT` given `GRPC_ECHO_SERVER`; the TCP echo
  (`mesh.tcpecho`) given `TCP_ECHO_SERVER`; the UDP echo (`mesh.udpecho`) given
  `UDP_ECHO_SERVER`.
- registry.k8s.io/e2e-test-images/agnhost: `mesh.lab.agnhost` (the subcommands the upstream
  NetworkPolicy tests use: serve-hostname, connect), given as the container's args.
- registry.k8s.io/coredns/coredns: `mesh.lab.coredns`, the Corefile's `whoami` zones (its
  `-conf` argument, as CoreDNS takes it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

# What runs the project's own commands in a pod: the Python of the lab's own venv.
MESH = (sys.executable, "-m", "mesh.cli")


def image_name(image: str) -> str:
    """The image without its tag or digest: `registry.k8s.io/x/y:v1@sha256:...` ->
    `registry.k8s.io/x/y` (a registry's port is kept)."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def _echo_basic(env: Mapping[str, str]) -> list[str]:
    if env.get("TCP_ECHO_SERVER"):
        return [sys.executable, "-m", "mesh.tcpecho"]  # it reads the same variables
    if env.get("UDP_ECHO_SERVER"):
        return [sys.executable, "-m", "mesh.udpecho"]
    http = env.get("HTTP_PORT") or "3000"
    if env.get("GRPC_ECHO_SERVER"):
        return [*MESH, "echo", "--grpc", "--listen", f"0.0.0.0:{http}"]
    out = [*MESH, "echo", "--listen", f"0.0.0.0:{http}",
           "--listen", f"0.0.0.0:{env.get('H2C_PORT') or '3001'}"]
    cert, key = env.get("TLS_SERVER_CERT"), env.get("TLS_SERVER_PRIVKEY")
    if cert and key:
        out += ["--tls-listen", f"0.0.0.0:{env.get('HTTPS_PORT') or '8443'}",
                "--cert", cert, "--key", key]
        if env.get("TLS_CLIENT_CACERTS"):
            out += ["--client-ca", env["TLS_CLIENT_CACERTS"]]
    return out


def _agnhost(env: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "mesh.lab.agnhost"]


def _coredns(env: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "mesh.lab.coredns"]


IMAGES: dict[str, Callable[[Mapping[str, str]], list[str]]] = {
    "registry.k8s.io/gateway-api/echo-basic": _echo_basic,
    "gcr.io/k8s-staging-gateway-api/echo-basic": _echo_basic,
    "registry.k8s.io/e2e-test-images/agnhost": _agnhost,
    "registry.k8s.io/coredns/coredns": _coredns}


def entrypoint(image: str, args: Sequence[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """The command line for a container of `image` without a command (its `args` after
    the image's own); KeyError for an image the lab has nothing for."""
    run = IMAGES.get(image_name(image))
    if run is None:
        raise KeyError(image)
    return (*run(env), *args)


def known() -> list[str]:
    return sorted(IMAGES)
