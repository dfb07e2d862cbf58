"""`python -m mesh.ratelimit`: the node's rate limit service."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import click

from mesh import logs


def _default_listen() -> str:
    # The agent's state directory (as `mesh run` chooses it), where Envoy looks.
    if os.geteuid() == 0:
        state = Path("/run/mesh")
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        state = Path(runtime) / "mesh" if runtime else Path(f"/tmp/mesh-{os.getuid()}")
    return f"unix://{state / 'ratelimit.sock'}"


@click.command("ratelimit")
@click.option("--listen", default=_default_listen, show_default="STATE_DIR/ratelimit.sock",
              help="unix:///path (made mode 0600) or a loopback HOST:PORT.")
@click.option("--redis", "redis_url", required=True, metavar="URL",
              help="redis://host:port[/db], rediss://..., unix:///path/redis.sock, "
              "redis-sentinel://host:port[,host:port...]/MASTER[/db] or "
              "redis-cluster://host:port[,host:port...] (user:password@ before the host).")
@click.option("--redis-timeout-ms", default=20, show_default=True, type=click.IntRange(1),
              help="A decision's wait for Redis; beyond it the call fails UNAVAILABLE "
              "(Envoy's failure mode decides) and Redis counts as down for 250 ms.")
@click.option("--redis-connect-timeout-ms", default=250, show_default=True,
              type=click.IntRange(1),
              help="Connecting, in the background (decisions never wait for it).")
@click.option("--transport", type=click.Choice(["h2", "grpcio"]), default="h2",
              show_default=True,
              help="The gRPC server: the service's own HTTP/2 (fast), or grpcio's.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
@click.option("--parent-pid", type=int, metavar="PID",
              help="End when this process (the agent that started us) ends, even by SIGKILL.")
def main(listen: str, redis_url: str, redis_timeout_ms: int, redis_connect_timeout_ms: int,
         transport: str, log_level: str, log_format: str, parent_pid: int | None) -> None:
    """Serve Envoy's global rate limits (ShouldRateLimit), counters in Redis."""
    from mesh.ratelimit.service import run
    from mesh.ratelimit.store import RedisAddress
    from meshxds.address import ListenAddress

    logs.setup(log_level, log_format)
    if parent_pid is not None:
        _die_with(parent_pid)
    # hpack logs every header it decodes at debug: a line per header of every decision.
    logging.getLogger("hpack").setLevel(logging.INFO)
    try:
        ListenAddress.parse(listen)
        RedisAddress.parse(redis_url)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    # Everything imported so far lives as long as the process: out of the collector's sight,
    # a full collection takes microseconds instead of ~10 ms of stalled decisions (and a
    # stall longer than the Redis timeout would look like Redis failing).
    gc.collect()
    gc.freeze()
    run(listen, redis_url, redis_timeout=redis_timeout_ms / 1000,
        redis_connect_timeout=redis_connect_timeout_ms / 1000,
        transport="grpcio" if transport == "grpcio" else "h2")


def _die_with(parent: int) -> None:
    """SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG), so that a killed agent
    leaves no service behind; if it died before we got here, end now."""
    import ctypes
    import signal
    import sys

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        logging.getLogger(__name__).warning("cannot follow the parent's death", extra={
            "errno": ctypes.get_errno()})
    if os.getppid() != parent:
        sys.exit(0)


if __name__ == "__main__":
    main()
