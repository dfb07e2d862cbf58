"""`mesh observe`: the flows of a node (its agent) or of the whole cluster (the relay), through
Hubble's Observer API, with the filters Hubble's users know.

Filters combine as Hubble's CLI combines them: different filters must all match; a filter
given twice matches either value; a filter on either end (`--pod`, `--namespace`, `--ip`,
`--port`, `--label`, `--service`) matches flows from it or to it; `--not` puts the next
filter on the exclusion list.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

# Filter flags: name -> (which end: "from", "to", "either" or "" (none), the FlowFilter field
# stem or field, how the value is read).
_FROM_TO = {"pod": "pod", "ip": "ip", "label": "label", "service": "service",
            "port": "port", "identity": "identity"}
_PLAIN = {"protocol": "protocol", "verdict": "verdict", "drop-reason": "drop_reason_desc",
          "http-status": "http_status_code", "http-method": "http_method",
          "http-path": "http_path", "node": "node_name", "traffic-direction":
          "traffic_direction"}
FILTER_HELP = """Filters (each may be repeated; --not before one excludes what it matches):

\b
  --from-pod, --to-pod, --pod [NAMESPACE/]POD-PREFIX   (no namespace: default)
  --namespace NAMESPACE                                flows from or to its pods
  --from-label, --to-label, --label SELECTOR           app=web, k8s:app in (a,b), !canary
  --from-ip, --to-ip, --ip ADDRESS|CIDR
  --from-service, --to-service, --service NAMESPACE/NAME-PREFIX
  --from-port, --to-port, --port PORT
  --from-identity, --to-identity, --identity NUMBER
  --protocol tcp|udp|icmp|http|dns
  --verdict FORWARDED|DROPPED|REDIRECTED|ERROR
  --drop-reason POLICY_DENIED|UNENCRYPTED_TRAFFIC|...
  --http-status 200|5+    --http-method GET    --http-path REGEX
  --node NODE    --traffic-direction ingress|egress
"""


class FilterUsage(click.UsageError):
    pass


@dataclass
class Filters:
    """What the filter flags built: the whitelist and the blacklist, as Hubble's CLI builds
    them (a list of filters each flag is applied to; an either-end flag doubles it)."""

    whitelist: list[dict[str, list[Any]]] = field(default_factory=lambda: [{}])
    blacklist: list[dict[str, list[Any]]] = field(default_factory=lambda: [{}])
    _either_seen: dict[tuple[bool, str], int] = field(default_factory=dict)

    def add(self, negate: bool, fields: list[str], value: Any) -> None:
        """`fields`: one (this filter's field) or two (from, to: either end)."""
        target = self.blacklist if negate else self.whitelist
        if len(fields) == 1:
            for f in target:
                f.setdefault(fields[0], []).append(value)
            return
        # either end: the first such flag doubles the filters (one for each end); a later
        # value of the same flag joins those it already made
        key = (negate, fields[0])
        if key in self._either_seen:
            for f in target:
                for name in fields:
                    if name in f:
                        f[name].append(value)
            return
        self._either_seen[key] = 1
        doubled = []
        for f in target:
            for name in fields:
                doubled.append({**{k: list(v) for k, v in f.items()}, name: [value]})
        target[:] = doubled

    def protos(self) -> tuple[list[Any], list[Any]]:
        from mesh.hubble.api.flow import flow_pb2

        def build(filters: list[dict[str, list[Any]]]) -> list[Any]:
            out = []
            for f in filters:
                if f:
                    message = flow_pb2.FlowFilter()
                    for name, values in f.items():
                        getattr(message, name).extend(values)
                    out.append(message)
            return out
        return build(self.whitelist), build(self.blacklist)


def _value(flag: str, value: str) -> Any:
    from mesh.hubble.api.flow import flow_pb2

    try:
        if flag == "verdict":
            return flow_pb2.Verdict.Value(value.upper())
        if flag == "drop-reason":
            return flow_pb2.DropReason.Value(value.upper())
        if flag == "traffic-direction":
            return flow_pb2.TrafficDirection.Value(value.upper())
        if flag.endswith("identity"):
            return int(value)
    except ValueError as e:
        raise FilterUsage(f"--{flag} {value}: {e}") from e
    return value


def parse_filters(args: tuple[str, ...] | list[str]) -> Filters:
    """The filter flags, in order (`--not` applies to the next one)."""
    filters = Filters()
    negate = False
    items = list(args)
    while items:
        arg = items.pop(0)
        if arg == "--not":
            negate = True
            continue
        if not arg.startswith("--"):
            raise FilterUsage(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if not items:
                raise FilterUsage(f"--{name} needs a value")
            value = items.pop(0)
        if name == "namespace":
            filters.add(negate, ["source_pod", "destination_pod"], f"{value}/")
        elif name in _PLAIN:
            filters.add(negate, [_PLAIN[name]], _value(name, value))
        else:
            end, _, what = name.partition("-")
            stem = _FROM_TO.get(what) if end in ("from", "to") else _FROM_TO.get(name)
            if stem is None:
                raise FilterUsage(f"unknown filter --{name} (see mesh observe --help)")
            fields = {"from": [f"source_{stem}"], "to": [f"destination_{stem}"]}.get(
                end if what else "", [f"source_{stem}", f"destination_{stem}"])
            filters.add(negate, fields, _value(name, value))
        negate = False
    if negate:
        raise FilterUsage("--not must come before a filter")
    return filters


# -- output


_RESERVED = {1: "host", 6: "remote-node"}  # Hubble's reserved identities of nodes


def _end(ep: Any, ip: str, port: int) -> str:
    name = f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ip
    end = f"{name}:{port}" if port else name
    reserved = _RESERVED.get(ep.identity) if not ep.pod_name else None
    return f"{end} ({reserved})" if reserved else end


def _ports(flow: Any) -> tuple[int, int]:
    which = flow.l4.WhichOneof("protocol")
    if which in ("TCP", "UDP", "SCTP"):
        p = getattr(flow.l4, which)
        return p.source_port, p.destination_port
    return 0, 0


def _verdict(flow: Any) -> str:
    from mesh.hubble.api.flow import flow_pb2

    text: str = flow_pb2.Verdict.Name(flow.verdict)
    if flow.verdict == flow_pb2.DROPPED and flow.drop_reason_desc:
        text += f" {flow_pb2.DropReason.Name(flow.drop_reason_desc)}"
    return text


def _what(flow: Any) -> str:
    from mesh.hubble.api.flow import flow_pb2

    if flow.Type == flow_pb2.L7:
        return "http-response" if flow.l7.type == flow_pb2.RESPONSE else "http-request"
    if flow.verdict == flow_pb2.DROPPED:
        return "drop"
    if flow.Type == flow_pb2.SOCK:
        return "post-xlate-fwd"  # as Hubble prints a socket's translation
    point = flow.trace_observation_point
    return flow_pb2.TraceObservationPoint.Name(point).lower().replace("_", "-") \
        if point else "trace"


def row(response: Any) -> tuple[str, str, str, str, str, str, str] | None:
    """(time, node, source, direction arrow, destination, verdict, summary) of a flow; None
    for what is not a flow."""
    which = response.WhichOneof("response_types")
    if which != "flow":
        return None
    f = response.flow
    sport, dport = _ports(f)
    src, dst = _end(f.source, f.IP.source, sport), _end(f.destination, f.IP.destination, dport)
    arrow = "->"
    if f.HasField("is_reply") and f.is_reply.value:
        src, dst, arrow = dst, src, "<-"  # the client on the left, as Hubble prints it
    if f.destination_service.name and arrow == "->":
        dst += f" ({f.destination_service.namespace}/{f.destination_service.name})"
    stamp = datetime.fromtimestamp(f.time.ToNanoseconds() / 1e9).strftime("%b %d %H:%M:%S.%f")
    return (stamp[:-3], f.node_name, src, arrow, dst, _verdict(f),
            f"{_what(f)} {f.Summary}".strip())


def _note(response: Any) -> str | None:
    """A lost-events or node-status message, as a line for stderr."""
    from mesh.hubble.api.flow import flow_pb2
    from mesh.hubble.api.relay import relay_pb2

    which = response.WhichOneof("response_types")
    if which == "lost_events":
        lost = response.lost_events
        return f"{lost.num_events_lost} flows lost " \
               f"({flow_pb2.LostEventSource.Name(lost.source)}) on {response.node_name}"
    if which == "node_status":
        status = response.node_status
        return f"{relay_pb2.NodeState.Name(status.state_change)}: " \
               f"{', '.join(status.node_names)} {status.message}".strip()
    return None


def print_flows(responses: Iterator[Any], output: str, echo: Callable[[str], None]) -> int:
    """Print each response; returns how many flows were printed."""
    from google.protobuf import json_format

    count = 0
    for r in responses:
        note = _note(r)
        if note is not None:
            click.echo(note, err=True)
            continue
        if output == "json":
            # a flow's extensions (its connection's id) are a Struct: its type must be known
            from google.protobuf import struct_pb2  # noqa: F401

            echo(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True),
                            separators=(",", ":")))
            count += 1
            continue
        cells = row(r)
        if cells is None:
            continue
        count += 1
        if output == "compact":
            t, node, src, arrow, dst, verdict, summary = cells
            echo(f"{t} [{node}]: {src} {arrow} {dst} {verdict} ({summary})")
        else:  # table
            t, node, src, arrow, dst, verdict, summary = cells
            if count == 1:
                echo(f"{'TIME':<19} {'NODE':<12} {'SOURCE':<36}    {'DESTINATION':<48} "
                     f"{'VERDICT':<24} SUMMARY")
            echo(f"{t:<19} {node:<12} {src:<36} {arrow} {dst:<48} {verdict:<24} {summary}")
    return count


def default_server(lab: str | None, node: str | None) -> str:
    """The lab's relay (or one of its nodes' agents), else this host's agent."""
    from mesh.lab import cluster

    names = sorted(p.name for p in cluster.ROOT.glob("*") if (p / "lab.json").exists()) \
        if cluster.ROOT.exists() else []
    if lab is None and len(names) == 1:
        lab = names[0]
    if lab is not None:
        base = cluster.lab_dir(lab)
        return f"unix://{base / node / 'agent' / 'hubble.sock'}" if node else \
            f"unix://{base / 'hubble-relay.sock'}"
    if node is not None:
        raise click.UsageError("--node names a lab's node: no lab runs (give --server)")
    return "unix:///run/mesh/hubble.sock"


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": True}, epilog=FILTER_HELP)
@click.option("--server", help="The Observer API: unix:///PATH or HOST:PORT (default: the "
                               "lab's relay, else /run/mesh/hubble.sock).")
@click.option("--lab", "lab_name", help="The lab whose relay to ask (default: the one that "
                                        "runs).")
@click.option("--lab-node", "node", help="Ask this lab node's agent rather than the relay.")
@click.option("--last", "number", type=click.IntRange(0, 1_000_000), default=None,
              help="The last N flows (per node through the relay) [default: 20, or 0 with "
                   "-f].")
@click.option("--first", is_flag=True, help="The first N flows the ring holds instead.")
@click.option("-f", "--follow", is_flag=True, help="Then every new flow as it comes.")
@click.option("-o", "--output", type=click.Choice(["compact", "table", "json"]),
              default="compact", show_default=True,
              help="json: one GetFlowsResponse per line, Hubble's field names.")
@click.argument("filters", nargs=-1, type=click.UNPROCESSED)
def observe(server: str | None, lab_name: str | None, node: str | None, number: int | None,
            first: bool, follow: bool, output: str, filters: tuple[str, ...]) -> None:
    """The flows the agents saw: connections the datapath forwarded, dropped (and why),
    handed to Envoy; HTTP requests with their status and latency; both ends named."""
    import grpc

    from mesh.hubble.api.observer import observer_pb2, observer_pb2_grpc

    parsed = parse_filters(filters)
    whitelist, blacklist = parsed.protos()
    target = server or default_server(lab_name, node)
    request = observer_pb2.GetFlowsRequest(
        number=number if number is not None else (0 if follow else 20), first=first,
        follow=follow, whitelist=whitelist, blacklist=blacklist)
    if target.startswith("unix://") and not Path(target[len("unix://"):]).exists():
        raise click.ClickException(f"no Observer API at {target} (is the agent running?)")
    with grpc.insecure_channel(target) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
        try:
            print_flows(stub.GetFlows(request), output, click.echo)
        except grpc.RpcError as e:
            raise click.ClickException(f"{target}: {e.details()}") from e
        except KeyboardInterrupt:
            sys.exit(130)


def _peer(value: str) -> tuple[str, str]:
    name, sep, target = value.partition("=")
    if not sep or not name or not target:
        raise click.BadParameter(f"{value!r}: NODE=unix:///PATH or NODE=HOST:PORT")
    return name, target


@click.command()
@click.option("--listen", default="unix:///run/mesh/hubble-relay.sock", show_default=True,
              help="unix:///PATH (made 0600), or HOST:PORT (off the loopback with "
                   "--server-tls-dir only).")
@click.option("--peer", "peers", multiple=True, metavar="NODE=ADDRESS",
              help="A node's Observer API (its agent's hubble.sock, or HOST:PORT); repeat "
                   "for each node.")
@click.option("--peers-from-kubernetes", is_flag=True,
              help="Find the nodes in the API server instead: every Node, at its "
                   "InternalIP and --peer-port, followed as nodes join and leave (in-cluster "
                   "configuration unless --kubeconfig).")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
              help="With --peers-from-kubernetes: the kubeconfig to use.")
@click.option("--peer-port", default=4244, show_default=True, type=click.IntRange(1, 65535),
              help="With --peers-from-kubernetes: the agents' --hubble-listen-address port.")
@click.option("--tls-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Mutual TLS towards the agents on the network: ca.crt (theirs must be of "
                   "this CA), tls.crt and tls.key (the relay's).")
@click.option("--server-tls-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Mutual TLS for --listen off the loopback: ca.crt (the clients'), "
                   "tls.crt, tls.key (the relay's server certificate).")
def relay(listen: str, peers: tuple[str, ...], peers_from_kubernetes: bool,
          kubeconfig: str | None, peer_port: int, tls_dir: Path | None,
          server_tls_dir: Path | None) -> None:
    """The cluster's flows in one Observer API: every node's joined (as Hubble Relay)."""
    import asyncio
    import contextlib
    import signal

    from mesh.hubble.observer import check_listen
    from mesh.hubble.relay import NodePeers, Relay, RelayServer
    from mesh.hubble.tls import TLSError, TLSFiles
    from mesh.kube.client import connect

    if bool(peers) == peers_from_kubernetes:
        raise click.UsageError("give either --peer (one per node) or --peers-from-kubernetes")
    if kubeconfig is not None and not peers_from_kubernetes:
        raise click.UsageError("--kubeconfig goes with --peers-from-kubernetes")
    named = dict(_peer(p) for p in peers)
    client_tls = TLSFiles(tls_dir) if tls_dir is not None else None
    server_tls = TLSFiles(server_tls_dir) if server_tls_dir is not None else None
    try:
        check_listen(listen, server_tls)
        for files in (client_tls, server_tls):
            if files is not None:
                files.read()
    except (ValueError, TLSError) as e:
        raise click.UsageError(str(e)) from None

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        relay = Relay(named, client_tls)
        server = RelayServer(listen, relay, server_tls)
        if not peers_from_kubernetes:
            await server.run()
            return
        async with connect(kubeconfig) as http, asyncio.TaskGroup() as tg:
            tg.create_task(NodePeers(http, relay, peer_port).run())
            tg.create_task(server.run())

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve())


@click.command("map")
@click.option("--server", help="The Observer API (default: as mesh observe).")
@click.option("--lab", "lab_name", help="The lab whose relay to ask.")
@click.option("--last", "number", type=click.IntRange(1, 1_000_000), default=4095,
              show_default=True, help="The last N flows of each node.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("map.html"),
              show_default=True, help="The page (self-contained HTML).")
@click.option("--png", type=click.Path(path_type=Path),
              help="Also a picture of it (headless Chromium).")
@click.argument("filters", nargs=-1, type=click.UNPROCESSED)
def service_map(server: str | None, lab_name: str | None, number: int, output: Path,
                png: Path | None, filters: tuple[str, ...]) -> None:
    """The observed service map: workloads, and who calls whom with request rate, error rate
    and p50 latency; dropped connections in red. FILTERS as for mesh observe."""
    import grpc

    from mesh.hubble.api.observer import observer_pb2, observer_pb2_grpc
    from mesh.hubble.servicemap import graph, render_html, render_png

    parsed = parse_filters(filters)
    whitelist, blacklist = parsed.protos()
    target = server or default_server(lab_name, None)
    request = observer_pb2.GetFlowsRequest(number=number, whitelist=whitelist,
                                           blacklist=blacklist)
    with grpc.insecure_channel(target) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)  # type: ignore[no-untyped-call]
        try:
            flows = [r.flow for r in stub.GetFlows(request)
                     if r.WhichOneof("response_types") == "flow"]
        except grpc.RpcError as e:
            raise click.ClickException(f"{target}: {e.details()}") from e
    g = graph(flows)
    output.write_text(render_html(g))
    click.echo(f"{output}: {len(g.nodes)} workloads, {len(g.edges)} edges "
               f"from {len(flows)} flows")
    if png is not None:
        try:
            render_png(output, png)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"{png}: its picture")
