"""The service map: the observed graph of who talks to whom, from flows (Hubble's messages),
as a self-contained HTML page (an inline SVG, no script or style fetched from anywhere) and,
through headless Chromium, a PNG.

Nodes are workloads (a pod's Deployment or other controller; an address outside the cluster
by itself). An edge joins a client to a server: its HTTP requests (rate, error rate, p50
latency, from the node Envoys' flows), its connections (the datapath's new ones) and its
drops (with their reasons), drawn red when anything was dropped.
"""

from __future__ import annotations

import html
import math
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 1200, 800


@dataclass
class Edge:
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    connections: int = 0
    dropped: int = 0
    reasons: set[str] = field(default_factory=set)

    def label(self, seconds: float) -> str:
        parts = []
        if self.requests:
            rate = self.requests / seconds if seconds > 0 else float(self.requests)
            parts.append(f"{rate:.1f} req/s")
            parts.append(f"{100 * self.errors / self.requests:.0f}% errors")
            parts.append(f"p50 {statistics.median(self.latencies_ms):.0f} ms")
        elif self.connections:
            parts.append(f"{self.connections} connections")
        if self.dropped:
            parts.append(f"{self.dropped} dropped ({', '.join(sorted(self.reasons))})")
        return " · ".join(parts)


@dataclass
class Graph:
    nodes: dict[str, str] = field(default_factory=dict)  # name -> kind (workload, world)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.last - self.first, 0.0)


def _name(endpoint: Any, ip: str) -> tuple[str, str]:
    if endpoint.workloads:
        return f"{endpoint.namespace}/{endpoint.workloads[0].name}", "workload"
    if endpoint.pod_name:
        return f"{endpoint.namespace}/{endpoint.pod_name}", "workload"
    if {"reserved:host", "reserved:remote-node"} & set(endpoint.labels):
        return f"node {ip}", "node"  # a node's own address (its kubelet's probes, say)
    return ip or "unknown", "world"


def graph(flows: Iterable[Any]) -> Graph:
    """The graph of Hubble `flow.Flow` messages."""
    g = Graph()
    for f in flows:
        if f.Type == 3:  # SOCK: a socket's translation, its connection's flow counts
            continue
        src, src_kind = _name(f.source, f.IP.source)
        dst, dst_kind = _name(f.destination, f.IP.destination)
        if f.HasField("is_reply") and f.is_reply.value:
            (src, src_kind), (dst, dst_kind) = (dst, dst_kind), (src, src_kind)
        t = f.time.ToNanoseconds() / 1e9
        g.first = t if not g.first else min(g.first, t)
        g.last = max(g.last, t)
        is_http = f.l7.WhichOneof("record") == "http"
        proto = f.l4.WhichOneof("protocol")
        # a connection's first packet: a SYN without ACK (TCP), any UDP flow (UDP flows
        # report their first packet only)
        is_new = proto == "UDP" or (proto == "TCP" and f.l4.TCP.flags.SYN and
                                     not f.l4.TCP.flags.ACK)
        dropped = f.verdict == 2  # DROPPED
        if not (is_http or dropped or is_new):
            continue  # a connection's end: already counted at its start
        if f.destination_service.name and not is_http and dst_kind == "world":
            dst, dst_kind = f"{f.destination_service.namespace}/" \
                f"{f.destination_service.name}", "service"
        g.nodes.setdefault(src, src_kind)
        g.nodes.setdefault(dst, dst_kind)
        e = g.edges.setdefault((src, dst), Edge())
        if is_http:
            e.requests += 1
            e.latencies_ms.append(f.l7.latency_ns / 1e6)
            if f.l7.http.code >= 500 or f.l7.http.code == 0 or f.verdict == 3:
                e.errors += 1
        if dropped:
            e.dropped += 1
            from mesh.hubble.api.flow import flow_pb2

            e.reasons.add(flow_pb2.DropReason.Name(f.drop_reason_desc))
        elif not is_http:
            e.connections += 1
    return g


def _layout(names: list[str]) -> dict[str, tuple[float, float]]:
    """On a circle, in name order: stable from one run to the next."""
    cx, cy = WIDTH / 2, HEIGHT / 2
    r = min(WIDTH, HEIGHT) / 2 - 120
    if len(names) == 1:
        return {names[0]: (cx, cy)}
    return {n: (cx + r * math.cos(2 * math.pi * i / len(names) - math.pi / 2),
                cy + r * math.sin(2 * math.pi * i / len(names) - math.pi / 2))
            for i, n in enumerate(names)}


def render_html(g: Graph, title: str = "Service map") -> str:
    pos = _layout(sorted(g.nodes))
    out = []
    for (a, b), e in sorted(g.edges.items()):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        color = "#c62828" if e.dropped else "#455a64"
        ends = f'data-from="{html.escape(a)}" data-to="{html.escape(b)}"'
        dash = ' stroke-dasharray="8 5"' if e.dropped and not e.requests else ""
        if a == b:
            out.append(f'<path class="edge" {ends} d="M {x1 - 20:.0f} {y1 - 30:.0f} '
                       f'c -60 -80 100 -80 40 0" fill="none" stroke="{color}" '
                       f'stroke-width="2"{dash} marker-end="url(#arrow)"/>')
            lx, ly = x1, y1 - 100
        else:
            dx, dy = x2 - x1, y2 - y1
            length = math.hypot(dx, dy) or 1
            ux, uy = dx / length, dy / length
            # stop at the circles' edges; a pair talking both ways gets two parallel lines
            ox, oy = -uy * 6, ux * 6
            out.append(f'<line class="edge" {ends} x1="{x1 + ux * 42 + ox:.0f}" '
                       f'y1="{y1 + uy * 42 + oy:.0f}" x2="{x2 - ux * 48 + ox:.0f}" '
                       f'y2="{y2 - uy * 48 + oy:.0f}" stroke="{color}" stroke-width="2"{dash} '
                       f'marker-end="url(#arrow)"/>')
            lx, ly = (x1 + x2) / 2 + ox * 3, (y1 + y2) / 2 + oy * 3
        out.append(f'<text class="edge-label" {ends} x="{lx:.0f}" y="{ly:.0f}" fill="{color}" '
                   f'text-anchor="middle">{html.escape(e.label(g.seconds))}</text>')
    for name, kind in sorted(g.nodes.items()):
        x, y = pos[name]
        fill = {"workload": "#e3f2fd", "service": "#f3e5f5"}.get(kind, "#eeeeee")
        out.append(f'<g class="node" data-name="{html.escape(name)}">'
                   f'<circle cx="{x:.0f}" cy="{y:.0f}" r="40" fill="{fill}" '
                   f'stroke="#1565c0" stroke-width="2"/>'
                   f'<text x="{x:.0f}" y="{y + 60:.0f}" text-anchor="middle" '
                   f'class="node-label">{html.escape(name)}</text></g>')
    window = f"{g.seconds:.0f} s of flows" if g.edges else "no flows"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #fff; }}
.node-label {{ font-size: 14px; font-weight: bold; fill: #0d47a1; paint-order: stroke;
  stroke: #fff; stroke-width: 4px; }}
.edge-label {{ font-size: 12px; paint-order: stroke; stroke: #fff; stroke-width: 4px; }}
</style></head>
<body data-ready="0">
<h1 style="font-size: 18px">{html.escape(title)}: {len(g.nodes)} workloads,
{len(g.edges)} edges, {window}</h1>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"
 viewBox="0 0 {WIDTH} {HEIGHT}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8"
 markerHeight="8" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"
 fill="context-stroke"/></marker></defs>
{chr(10).join(out)}
</svg>
<script>
// Hovering a workload dims the edges that do not touch it.
const edges = document.querySelectorAll(".edge, .edge-label");
for (const node of document.querySelectorAll(".node")) {{
  const name = node.dataset.name;
  node.addEventListener("mouseenter", () => {{
    for (const e of edges) {{
      const touches = e.dataset.from === name || e.dataset.to === name;
      e.style.opacity = touches ? "1" : "0.15";
    }}
  }});
  node.addEventListener("mouseleave", () => {{
    for (const e of edges) e.style.opacity = "1";
  }});
}}
document.body.dataset.ready = "1";
</script>
</body></html>
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def browse(page: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local page (no network: every background connection off)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("Chromium is not installed (Debian's package chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([binary, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                               page.resolve().as_uri()], capture_output=True, text=True,
                              timeout=timeout)


def render_png(page: Path, png: Path) -> None:
    out = browse(page, f"--screenshot={png.resolve()}", f"--window-size={WIDTH + 40},"
                 f"{HEIGHT + 100}")
    if out.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium could not take the picture: {out.stderr[-1000:]}")
