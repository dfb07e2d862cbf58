"""The UDP echo backend, as the Gateway API's echo-basic serves with UDP_ECHO_SERVER set:
`python -m mesh.udpecho`, configured by the same variables.

Each datagram on UDP_PORT (8080) is answered to its sender with JSON: the datagram as
`request` and the pod's context (namespace, ingress, service, pod) from NAMESPACE,
INGRESS_NAME, SERVICE_NAME and POD_NAME.
"""

from __future__ import annotations

import json
import logging
import os
import socket

log = logging.getLogger("mesh.udpecho")
MAX_DATAGRAM = 1024  # what echo-basic reads of a datagram


def answer(datagram: bytes, env: dict[str, str]) -> bytes:
    return json.dumps({"request": datagram.decode("utf-8", "replace"),
                       "namespace": env.get("NAMESPACE", ""),
                       "ingress": env.get("INGRESS_NAME", ""),
                       "service": env.get("SERVICE_NAME", ""),
                       "pod": env.get("POD_NAME", "")}).encode()


def serve(sock: socket.socket, env: dict[str, str]) -> None:
    while True:
        data, peer = sock.recvfrom(MAX_DATAGRAM)
        log.info("Received UDP %r from %s:%d", data[:64], *peer[:2])
        try:
            sock.sendto(answer(data, env), peer)
        except OSError as e:  # the sender is gone: keep serving the others
            log.warning("could not answer %s: %s", peer, e)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = dict(os.environ)
    port = int(env.get("UDP_PORT") or "8080")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    log.info("UDP server listening on :%d", port)
    serve(sock, env)


if __name__ == "__main__":
    main()
