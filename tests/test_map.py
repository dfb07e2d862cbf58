"""`mesh map`: the graph built from flows (Hubble's messages), and the page it renders
loaded in a real headless Chromium (Debian's, installed by make): its script runs to the
end, it shows the workloads and edges, and it makes a picture. (The lab's demo graph:
tests/test_lab_demo.py.)"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from mesh.flows.model import DROPPED, Endpoint
from mesh.hubble.convert import to_proto
from mesh.hubble.servicemap import browse, graph, render_html, render_png
from tests.test_hubble import CLIENT, ECHO, http, l4

OTHER = Endpoint("10.1.2.9", 5432, "demo", "db-0", ("app=db",), 1003, workload="db",
                 workload_kind="StatefulSet")


def flows() -> list[object]:
    client = replace(CLIENT, workload="client", workload_kind="Pod")
    echo = replace(ECHO, workload="echo-v1", workload_kind="Deployment")
    out = [l4(1, src=client, dst=echo)]
    for i in range(8):
        out.append(http(2 + i, 200))
    out.append(http(10, 503))
    out.append(l4(11, src=client, dst=OTHER, verdict=DROPPED, reason="POLICY_DENIED"))
    return [to_proto(replace(f, source=replace(f.source, workload="client"),
                             destination=replace(f.destination, workload="echo-v1"))
                     if f.http else f) for f in out]


def test_the_graph_joins_requests_connections_and_drops() -> None:
    g = graph(flows())
    assert g.nodes == {"demo/client": "workload", "demo/echo-v1": "workload",
                       "demo/db": "workload"}
    echo = g.edges[("demo/client", "demo/echo-v1")]
    assert (echo.requests, echo.errors, echo.connections) == (9, 1, 1)
    assert echo.label(g.seconds) == "0.9 req/s · 11% errors · p50 2 ms"
    db = g.edges[("demo/client", "demo/db")]
    assert (db.dropped, db.reasons) == (1, {"POLICY_DENIED"})
    assert db.label(g.seconds) == "1 dropped (POLICY_DENIED)"
    assert len(g.edges) == 2  # the responses' direction folded onto their requests'


def test_the_page_loads_in_chromium_and_pictures(tmp_path: Path) -> None:
    page = tmp_path / "map.html"
    page.write_text(render_html(graph(flows()), "demo"))
    dom = browse(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # its script ran to the end, no error before
    for name in ("demo/client", "demo/echo-v1", "demo/db"):
        assert f'data-name="{name}"' in dom.stdout
    assert "1 dropped (POLICY_DENIED)" in dom.stdout
    assert "Uncaught" not in dom.stderr
    png = tmp_path / "map.png"
    render_png(page, png)
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (1240, 900)
    assert png.stat().st_size > 20_000  # a drawing, not a blank page
