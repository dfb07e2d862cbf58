"""`mesh encryption`: the node's tunnels as its agent last wrote them (mode, peers, handshakes,
bytes, strict mode's drops), and rotating the node's key."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from mesh.encryption import STATUS_FILE, keys

DEFAULT_STATE_DIR = Path("/run/mesh")


def read_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATUS_FILE
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"no {path}: is the agent running with --encryption "
                                   "there?") from None
    except ValueError as e:
        raise click.ClickException(f"{path}: {e}") from None
    return found


def _ago(seconds: float, now: float) -> str:
    if not seconds:
        return "never"
    delta = max(0.0, now - seconds)
    return f"{delta:.0f}s ago" if delta < 120 else f"{delta / 60:.0f}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def summary(found: dict[str, Any]) -> str:
    """One line, for `mesh lab status`."""
    up = sum(1 for p in found.get("peers", []) if p["state"] == "up")
    drops = found.get("datapath", {})
    how = f"{found['device']} mtu {found['mtu']}" if found["mode"] == "wireguard" else \
        f"key SPIs {','.join(map(str, found.get('keySPIs', []))) or 'none'}"
    error = f", error: {found['error']}" if found.get("error") else ""
    return (f"{found['mode']} ({found['backend']}, {how}), "
            f"{up}/{len(found.get('peers', []))} peers up{error}, strict "
            f"{'on' if found.get('strict') else 'off'}, dropped "
            f"{drops.get('dropped_ipv4', 0)} IPv4 / {drops.get('dropped_ipv6', 0)} IPv6")


@click.group()
def encryption() -> None:
    """Transparent encryption between nodes: this node's tunnels, its key."""


@encryption.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="The agent's state directory.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(state_dir: Path, output: str) -> None:
    """Mode, peers (endpoint, pod CIDRs, last handshake and bytes, or IPsec's SPIs and
    packets), strict mode's drops."""
    found = read_status(state_dir)
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    console = Console(width=140)
    strict = "on" if found["strict"] else "off"
    if found["mode"] == "ipsec":
        console.print(f"mode ipsec ({found['backend']}, {found['algorithm']}), strict {strict}; "
                      f"key SPIs {', '.join(map(str, found['keySPIs'])) or 'none'}, "
                      f"announced {found['announced'] or 'nothing yet'}")
        if found.get("error"):
            console.print(f"error: {found['error']}")
        peers = Table("NODE", "ENDPOINT", "POD CIDRS", "STATE", "SENDS WITH", "ANNOUNCED",
                      "RECEIVED", "SENT", "PROBLEM")
        for p in found["peers"]:
            peers.add_row(p["node"], p["endpoint"], ", ".join(p["allowedIPs"]), p["state"],
                          f"SPI {p['sendSPI']}" if p["sendSPI"] else "-",
                          ",".join(map(str, p["announcedSPIs"])) or "-",
                          f"{p['rxPackets']} pkts, {_bytes(p['rxBytes'])}",
                          f"{p['txPackets']} pkts, {_bytes(p['txBytes'])}", p["problem"] or "-")
    else:
        console.print(f"mode {found['mode']} ({found['backend']}), device {found['device']} "
                      f"mtu {found['mtu']}, port {found['port']}, strict {strict}; "
                      f"public key {found['publicKey']}")
        peers = Table("NODE", "ENDPOINT", "ALLOWED IPS", "STATE", "HANDSHAKE", "RECEIVED",
                      "SENT", "PROBLEM")
        for p in found["peers"]:
            peers.add_row(p["node"], p["endpoint"], ", ".join(p["allowedIPs"]), p["state"],
                          _ago(p["lastHandshake"], now), _bytes(p["rxBytes"]),
                          _bytes(p["txBytes"]), p["problem"] or "-")
    console.print(peers)
    d = found.get("datapath", {})
    console.print(f"datapath: {d.get('sent', 0)} packets sent into the tunnel; strict mode "
                  f"dropped {d.get('dropped_ipv4', 0)} IPv4 and {d.get('dropped_ipv6', 0)} "
                  "IPv6 packets")


@encryption.command("rotate-key")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="The agent's state directory.")
def rotate_key(state_dir: Path) -> None:
    """A new WireGuard key pair for this node: the agent sets it and publishes its public
    key; the other nodes follow. The private key is written 0600 and never printed."""
    path = state_dir / keys.KEY_FILE
    if not path.exists():
        raise click.ClickException(f"no {path}: is the agent running with --encryption "
                                   "wireguard there? (IPsec's keys are the cluster's secret: "
                                   "rotate them there)")
    pair = keys.generate()
    keys.save(path, pair)
    click.echo(f"new public key {pair.public_text}")
