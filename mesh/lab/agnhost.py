"""What the lab runs for Kubernetes' e2e test image `agnhost` (its subcommands the upstream
NetworkPolicy tests use): `python -m mesh.lab.agnhost serve-hostname|connect ...`.

- `serve-hostname --tcp|--udp --port N [--http=false]`: answers every TCP connection (and
  every UDP datagram) with the pod's name (HOSTNAME, as the kubelet sets it).
- `connect HOST:PORT --protocol=tcp|udp --timeout=1s`: exit 0 when the connection is made (a
  UDP datagram answered) within the timeout, 1 otherwise; as agnhost prints its errors, this
  prints what failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading


def serve_tcp(port: int, name: bytes) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(name)
        except OSError:
            pass
        c.close()


def serve_udp(port: int, name: bytes) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        _, peer = s.recvfrom(2048)
        try:
            s.sendto(name, peer)
        except OSError:
            pass


def connect(target: str, protocol: str, timeout: float) -> str:
    """'' when connected (answered), else the error."""
    host, _, port = target.rpartition(":")
    try:
        if protocol == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((host, int(port)))
                s.send(b"hostname")
                s.recv(2048)
        else:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
    except OSError as e:
        return str(e) or type(e).__name__
    return ""


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agnhost")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve-hostname")
    serve.add_argument("--tcp", action="store_true")
    serve.add_argument("--udp", action="store_true")
    serve.add_argument("--http", default="true")
    serve.add_argument("--port", type=int, default=9376)
    conn = sub.add_parser("connect")
    conn.add_argument("target")
    conn.add_argument("--protocol", default="tcp", choices=["tcp", "udp", "sctp"])
    conn.add_argument("--timeout", default="1s")
    args = parser.parse_args(argv)
    if args.command == "connect":
        error = connect(args.target, args.protocol, _seconds(args.timeout))
        if error:
            print(f"connect {args.target}: {error}", file=sys.stderr)
            sys.exit(1)
        return
    if args.http not in ("false", "False", "0") and not (args.tcp or args.udp):
        raise SystemExit("serve-hostname: only --tcp and --udp are implemented here")
    name = (os.environ.get("HOSTNAME") or socket.gethostname()).encode()
    threads = []
    if args.tcp:
        threads.append(threading.Thread(target=serve_tcp, args=(args.port, name), daemon=True))
    if args.udp:
        threads.append(threading.Thread(target=serve_udp, args=(args.port, name), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
