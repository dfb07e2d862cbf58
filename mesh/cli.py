"""The `mesh` command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from mesh import logs
from mesh.translate.config import DEFAULT_CONTROLLER


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/mesh")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mesh" if runtime else Path(f"/tmp/mesh-{os.getuid()}")


def _host_port(value: str, option: str) -> tuple[str, int] | None:
    if value == "none":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.UsageError(f"{option} {value}: HOST:PORT or none")
    return host.strip("[]") or "127.0.0.1", int(port)


def _hubble_listen(value: str | None, tls: Path | None) -> str | None:
    from mesh.hubble.observer import check_listen
    from mesh.hubble.tls import TLSError, TLSFiles

    if value is None:
        if tls is not None:
            raise click.UsageError("--hubble-tls-dir goes with --hubble-listen-address")
        return None
    parsed = _host_port(value, "--hubble-listen-address")
    if parsed is None:
        raise click.UsageError("--hubble-listen-address: HOST:PORT")
    host, port = parsed
    value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 bracketed
    files = TLSFiles(tls) if tls is not None else None
    try:
        check_listen(value, files)
        if files is not None:
            files.read()
    except ValueError as e:
        raise click.UsageError(f"--hubble-listen-address {e}") from None
    except TLSError as e:
        raise click.UsageError(f"--hubble-tls-dir {e}") from None
    return value


def _address(value: str | None, state_dir: Path, sock: str) -> str:
    return value or f"unix:{state_dir / sock}"


@click.group()
@click.version_option(package_name="mesh", message="%(prog)s %(version)s")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
def main(log_level: str, log_format: str) -> None:
    """Sidecarless service mesh: the node agent and its tools."""
    logs.setup(log_level, log_format)


_state_dir_option = click.option(
    "--state-dir", type=click.Path(path_type=Path), default=_default_state_dir,
    show_default="/run/mesh as root", help="Sockets, bootstrap and keys (made mode 0700).")


@main.command()
@click.option("--manifests", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Directory of Kubernetes YAML/JSON: Gateway API, Ingress, Services, "
              "EndpointSlices... (watched for changes).")
@click.option("--resources", "resources_file", type=click.Path(path_type=Path, exists=True),
              help="Instead of manifests: a YAML file of Envoy resources to serve as they are.")
@click.option("--address-pool", default="127.0.100.0/24", show_default=True, metavar="CIDR",
              help="Addresses for Gateways that do not ask for one.")
@click.option("--controller-name", default=DEFAULT_CONTROLLER, show_default=True,
              help="GatewayClasses with this controllerName are ours.")
@click.option("--node-id", "--node-name", "node_id", default=socket.gethostname,
              show_default="host name", help="This node (on Kubernetes: its Node's name).")
@_state_dir_option
@click.option("--xds-address",
              help="unix:/path (default: STATE_DIR/xds.sock) or loopback HOST:PORT.")
@click.option("--admin-address",
              help="Envoy admin: unix:/path (default: STATE_DIR/envoy-admin.sock) or loopback.")
@click.option("--protocol", type=click.Choice(["delta", "sotw"]), default="delta",
              show_default=True, help="ADS flavour Envoy uses: incremental or state-of-the-world.")
@click.option("--envoy-log-level", default="warning", show_default=True)
@click.option("--max-connections", default=50_000, show_default=True,
              help="Envoy's global limit on downstream connections.")
@click.option("--echo", "echo_address", metavar="HOST:PORT",
              help="Also run the project's echo backend there (for the demo).")
@click.option("--datapath-cgroup", type=click.Path(path_type=Path, exists=True,
                                                  file_okay=False),
              help="Balance Services in eBPF for the processes of this cgroup (v2): the "
              "socket load balancer, maps pinned under STATE_DIR/bpffs.")
@click.option("--datapath-underlay", metavar="DEVICE",
              help="With --datapath-cgroup: the node's device towards other nodes; packets "
              "for local pods arriving on it are redirected into them in eBPF.")
@click.option("--datapath-redirect", type=click.Choice(["sk-assign", "tproxy"]),
              default="sk-assign", show_default=True,
              help="How connections to Services with L7 routes reach Envoy: bpf_sk_assign "
              "at tc, or a mark and netfilter's TPROXY.")
@click.option("--encryption", type=click.Choice(["none", "wireguard", "ipsec"]),
              default="none", show_default=True,
              help="Encrypt pod traffic between nodes: wireguard (the kernel's, or "
                   "wireguard-go), its key pair in STATE_DIR and its public key on the Node; "
                   "or ipsec (the kernel's ESP), keys derived from --ipsec-keys. Needs "
                   "--datapath-cgroup and --datapath-underlay.")
@click.option("--ipsec-keys", type=click.Path(path_type=Path), metavar="FILE",
              default=Path("/etc/mesh/ipsec/keys"), show_default=True,
              help="With --encryption ipsec: the cluster's secret, lines `SPI "
                   "rfc4106(gcm(aes)) HEX 128`, the newest last; read again when it changes.")
@click.option("--encryption-strict/--no-encryption-strict", default=True, show_default=True,
              help="Drop pod traffic to other nodes' pods that would leave unencrypted "
                   "(a peer without a key yet), rather than send it in the clear.")
@click.option("--encryption-strict-cidr", "encryption_strict_cidrs", multiple=True,
              metavar="CIDR", help="Also never send traffic to this CIDR (IPv4 or IPv6) in "
                                   "the clear; repeatable.")
@click.option("--flows", "flow_capacity", default=4095, show_default=True, metavar="N",
              type=click.IntRange(1, 1_000_000),
              help="How many of the node's last flows the agent keeps (what `mesh observe` "
                   "and Hubble's API serve from).")
@click.option("--flow-events/--no-flow-events", default=True, show_default=True,
              help="With a datapath: track connections and report them as L3/L4 flows.")
@click.option("--metrics-address", default="127.0.0.1:9965", show_default=True,
              metavar="HOST:PORT|none",
              help="Where Prometheus scrapes the agent (/metrics) and its Envoy "
                   "(/metrics/envoy); loopback unless you say otherwise.")
@click.option("--hubble-listen-address", "hubble_listen", metavar="HOST:PORT",
              help="Also serve Hubble's Observer API here, for the cluster's relay (the "
                   "node's unix socket STATE_DIR/hubble.sock is always served). Off the "
                   "loopback only with --hubble-tls-dir.")
@click.option("--hubble-tls-dir", "hubble_tls", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Mutual TLS for --hubble-listen-address: ca.crt (the relay's "
                   "certificate must be of this CA), tls.crt and tls.key (this agent's).")
@click.option("--keep-envoy", is_flag=True,
              help="When stopped, leave Envoy serving its last configuration; the next "
                   "`mesh run` with this --state-dir adopts it.")
@click.option("--kubernetes", is_flag=True,
              help="Read the objects from the Kubernetes API server (list+watch) instead of "
                   "--manifests; in-cluster configuration unless --kubeconfig.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
              help="With --kubernetes: the kubeconfig to use.")
@click.option("--ratelimit-redis", metavar="URL",
              help="Run the node's rate limit service (global rate limits) with its counters "
                   "in this Redis: redis://HOST:PORT, unix:///PATH, "
                   "redis-sentinel://H:P[,H:P]/MASTER, redis-cluster://H:P[,H:P].")
@click.option("--envoy", "envoy_mode", type=click.Choice(["supervised", "external"]),
              default="supervised", show_default=True,
              help="external: Envoy is started beside the agent by someone else (the chart's "
                   "Envoy container, `mesh envoy`); the agent serves it and waits for it.")
@click.option("--gateway-addresses", type=click.Choice(["pool", "node", "loadbalancer"]),
              default="pool", show_default=True,
              help="Where a Gateway without spec.addresses gets its address: the pool "
                   "(--address-pool), the nodes' addresses, or a LoadBalancer Service "
                   "labelled mesh.dev/gateway=<name> in its namespace.")
@click.option("--use-forwarded-headers", is_flag=True,
              help="Ingresses: trust X-Forwarded-For (its last address is the client for "
                   "the allow and deny lists) and X-Forwarded-Proto (not \"http\": no redirect "
                   "to HTTPS), as ingress-nginx's use-forwarded-headers, behind a load "
                   "balancer that writes them.")
@click.option("--leader-elect", is_flag=True,
              help="With --kubernetes: elect the one agent that writes status on a Lease.")
@click.option("--leader-namespace", default="mesh-system", show_default=True)
@click.option("--leader-identity", help="This agent's name in the Lease (default: node id).")
@click.option("--lease-name", default="mesh-status-writer", show_default=True)
@click.option("--lease-duration", default=15.0, show_default=True, metavar="SECONDS")
@click.option("--lease-renew-deadline", default=10.0, show_default=True, metavar="SECONDS")
@click.option("--lease-retry", default=2.0, show_default=True, metavar="SECONDS")
def run(manifests: Path | None, resources_file: Path | None, address_pool: str,
        controller_name: str, node_id: str, state_dir: Path, xds_address: str | None,
        admin_address: str | None, protocol: str, envoy_log_level: str, max_connections: int,
        echo_address: str | None, datapath_cgroup: Path | None,
        datapath_underlay: str | None, datapath_redirect: str, encryption: str,
        ipsec_keys: Path, encryption_strict: bool, encryption_strict_cidrs: tuple[str, ...],
        flow_capacity: int, flow_events: bool, metrics_address: str,
        hubble_listen: str | None, hubble_tls: Path | None, keep_envoy: bool,
        kubernetes: bool, kubeconfig: str | None, ratelimit_redis: str | None,
        envoy_mode: str, gateway_addresses: str, use_forwarded_headers: bool,
        leader_elect: bool, leader_namespace: str,
        leader_identity: str | None, lease_name: str, lease_duration: float,
        lease_renew_deadline: float, lease_retry: float) -> None:
    """Run the node agent and the node's Envoy."""
    import ipaddress

    from mesh.agent.agent import Agent
    from mesh.agent.config import AgentConfig
    from mesh.agent.signals import run_until_signalled
    from mesh.echo import EchoServer
    from mesh.kube.leader import LeaseConfig
    from mesh.translate.config import TranslatorConfig
    from meshxds.address import ListenAddress

    if sum((manifests is not None, resources_file is not None, kubernetes)) > 1:
        raise click.UsageError("--manifests, --resources and --kubernetes exclude each other")
    if (kubeconfig is not None or leader_elect) and not kubernetes:
        raise click.UsageError("--kubeconfig and --leader-elect go with --kubernetes")
    if encryption != "none" and (datapath_cgroup is None or datapath_underlay is None):
        raise click.UsageError("--encryption needs --datapath-cgroup and --datapath-underlay")
    for cidr in encryption_strict_cidrs:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as e:
            raise click.UsageError(f"--encryption-strict-cidr {cidr}: {e}") from e
    try:
        ipaddress.ip_network(address_pool)
        lease = LeaseConfig(leader_namespace, leader_identity or node_id, lease_name,
                            lease_duration, lease_renew_deadline, lease_retry) \
            if leader_elect else None
        cfg = AgentConfig(
            manifests=manifests,
            translator=TranslatorConfig(controller_name=controller_name,
                                        address_pool=address_pool,
                                        gateway_addresses=gateway_addresses,
                                        use_forwarded_headers=use_forwarded_headers),
            node_id=node_id,
            state_dir=state_dir,
            xds_address=ListenAddress.parse(_address(xds_address, state_dir, "xds.sock")),
            admin_address=ListenAddress.parse(
                _address(admin_address, state_dir, "envoy-admin.sock")),
            protocol="delta" if protocol == "delta" else "sotw",
            resources_file=resources_file,
            envoy_log_level=envoy_log_level,
            max_downstream_connections=max_connections,
            keep_envoy=keep_envoy,
            datapath_cgroup=datapath_cgroup,
            datapath_underlay=datapath_underlay,
            datapath_redirect=datapath_redirect,
            encryption=encryption,
            ipsec_keys=ipsec_keys,
            encryption_strict=encryption_strict,
            encryption_strict_cidrs=tuple(str(ipaddress.ip_network(c))
                                          for c in encryption_strict_cidrs),
            ratelimit_redis=ratelimit_redis,
            flow_capacity=flow_capacity,
            flow_events=flow_events,
            metrics_address=_host_port(metrics_address, "--metrics-address"),
            hubble_listen=_hubble_listen(hubble_listen, hubble_tls),
            hubble_tls=hubble_tls,
            kubernetes=kubernetes,
            kubeconfig=kubeconfig,
            lease=lease,
            identity=leader_identity,
            external_envoy=envoy_mode == "external",
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    echo = None
    if echo_address:
        host, _, port = echo_address.rpartition(":")
        echo = EchoServer(host, int(port)).start()
    try:
        run_until_signalled(Agent(cfg))
    finally:
        if echo is not None:
            echo.stop()


@main.command("xds-status")
@_state_dir_option
@click.option("--xds-address", help="The agent's xDS address (default: STATE_DIR/xds.sock).")
@click.option("--node-id", default="", help="Only this node.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
def xds_status(state_dir: Path, xds_address: str | None, node_id: str, output: str) -> None:
    """What each node's Envoy ACKed or NACKed, per resource (from the agent's CSDS)."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
    from google.protobuf import json_format
    from rich.console import Console
    from rich.table import Table

    from meshxds.address import ListenAddress

    target = ListenAddress.parse(_address(xds_address, state_dir, "xds.sock")).grpc_target()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
            resp = stub.FetchClientStatus(
                csds_pb2.ClientStatusRequest(node=base_pb2.Node(id=node_id)), timeout=5)
    except grpc.RpcError as e:
        raise click.ClickException(f"cannot reach the agent at {target}: {e.details()}") from e
    if output != "table":
        doc = json_format.MessageToDict(resp, preserving_proto_field_name=True)
        click.echo(json.dumps(doc, indent=2) if output == "json" else yaml.safe_dump(doc))
        return
    table = Table("NODE", "TYPE", "NAME", "ACKED VERSION", "STATUS", "LAST NACK")
    for config in resp.config:
        for x in config.generic_xds_configs:
            table.add_row(
                config.node.id,
                x.type_url.rsplit(".", 1)[-1],
                x.name,
                x.version_info or "-",
                csds_pb2.ConfigStatus.Name(x.config_status),
                x.error_state.details,
            )
    Console(width=200).print(table)


@main.command("status")
@_state_dir_option
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table")
def status_cmd(state_dir: Path, output: str) -> None:
    """Every object the agent read, with its status (as `kubectl get -o yaml` shows it)."""
    from rich.console import Console
    from rich.table import Table

    path = state_dir / "status.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise click.ClickException(f"no status at {path}: is `mesh run --manifests` "
                                   "running with this --state-dir?") from e
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    if output == "yaml":
        click.echo(yaml.safe_dump(doc, sort_keys=False))
        return
    console = Console(width=200)
    for file, error in sorted(doc.get("fileErrors", {}).items()):
        console.print(f"[red]file rejected[/red] {file}: {error}")
    table = Table("KIND", "NAMESPACE", "NAME", "ACCEPTED", "PROGRAMMED", "DETAIL")
    for item in doc["items"]:
        st = item.get("status")
        if not st:
            continue
        meta = item["metadata"]
        accepted, programmed, detail = _summary(st)
        events = item.get("events") or []
        if events:  # what was refused or ignored (an Ingress's annotations)
            detail = f"{detail}; {len(events)} warning(s): {events[0]['message']}"
        table.add_row(item["kind"], meta.get("namespace", ""), meta["name"], accepted,
                      programmed, detail)
    console.print(table)


def _summary(status: dict[str, Any]) -> tuple[str, str, str]:
    """ACCEPTED, PROGRAMMED and the first message that explains a False."""
    conds = list(status.get("conditions", []))
    for parent in status.get("parents", []):
        conds += parent.get("conditions", [])
    for li in status.get("listeners", []):
        conds += li.get("conditions", [])
    for ancestor in status.get("ancestors", []):
        conds += ancestor.get("conditions", [])

    def state(type_: str) -> str:
        found = [c for c in conds if c["type"] == type_]
        if not found:
            return "-"
        return "True" if all(c["status"] == "True" for c in found) else "False"

    problems = [f"{c['type']}: {c['reason']}: {c['message']}" for c in conds
                if (c["status"] == "False") != (c["type"] == "Conflicted")]
    if "loadBalancer" in status:
        ips = [i.get("ip") for i in status["loadBalancer"].get("ingress", [])]
        return "-", "-", "address " + ", ".join(ip for ip in ips if ip)
    if "addresses" in status and not problems:
        return state("Accepted"), state("Programmed"), "address " + ", ".join(
            a["value"] for a in status["addresses"])
    return state("Accepted"), state("Programmed"), problems[0] if problems else ""


@main.command("bootstrap")
@click.option("--node-id", default=socket.gethostname, show_default="host name")
@_state_dir_option
@click.option("--protocol", type=click.Choice(["delta", "sotw"]), default="delta")
def bootstrap_cmd(node_id: str, state_dir: Path, protocol: str) -> None:
    """Print the bootstrap the agent gives its Envoy."""
    from mesh.envoy.bootstrap import BootstrapConfig, bootstrap
    from meshxds.address import ListenAddress

    cfg = BootstrapConfig(
        node_id=node_id,
        xds=ListenAddress.parse(f"unix:{state_dir / 'xds.sock'}"),
        admin=ListenAddress.parse(f"unix:{state_dir / 'envoy-admin.sock'}"),
        protocol="delta" if protocol == "delta" else "sotw",
    )
    yaml.safe_dump(bootstrap(cfg), sys.stdout, sort_keys=False)


@main.command("envoy")
@click.option("--node-id", default=socket.gethostname, show_default="host name")
@_state_dir_option
@click.option("--protocol", type=click.Choice(["delta", "sotw"]), default="delta")
@click.option("--envoy-log-level", default="warning", show_default=True)
@click.option("--max-connections", default=50_000, show_default=True)
def envoy_cmd(node_id: str, state_dir: Path, protocol: str, envoy_log_level: str,
              max_connections: int) -> None:
    """Write the node's Envoy bootstrap and exec Envoy (the chart's Envoy container, beside
    `mesh run --envoy external`, sharing the state directory)."""
    from mesh.agent.agent import bootstrap_config
    from mesh.agent.config import AgentConfig
    from mesh.envoy.supervisor import EnvoySupervisor
    from meshxds.address import ListenAddress

    cfg = AgentConfig(
        node_id=node_id, state_dir=state_dir,
        xds_address=ListenAddress.parse(_address(None, state_dir, "xds.sock")),
        admin_address=ListenAddress.parse(_address(None, state_dir, "envoy-admin.sock")),
        protocol="delta" if protocol == "delta" else "sotw",
        max_downstream_connections=max_connections)
    supervisor = EnvoySupervisor(bootstrap_config(cfg), state_dir, log_level=envoy_log_level)
    supervisor.write_bootstrap()
    args = supervisor.args()
    os.execv(args[0], args)


@main.command("health")
@_state_dir_option
@click.option("--ready", is_flag=True, help="Readiness (synced, built, Envoy ready), not "
              "liveness.")
@click.option("--envoy", "envoy", is_flag=True, help="Ask the node's Envoy instead (its admin "
              "socket in the state directory): alive if it answers, ready once it serves.")
@click.option("--hubble", "hubble", metavar="ADDRESS", help="Ask a Hubble Observer API "
              "instead (the relay's: HOST:PORT on the loopback, or unix:///PATH): its gRPC "
              "health service.")
def health_cmd(state_dir: Path, ready: bool, envoy: bool, hubble: str | None) -> None:
    """Ask the agent how it is (its unix socket): exit 0 if healthy (or ready), else 1.
    The chart's liveness and readiness probes; with --envoy, the Envoy container's; with
    --hubble, the relay's."""
    if hubble is not None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(hubble) as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="hubble.server.Observer"), timeout=3)
            except grpc.RpcError as e:
                click.echo(json.dumps({"hubble": "unreachable", "error": e.details()}))
                sys.exit(1)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        click.echo(json.dumps({"hubble": status}))
        sys.exit(0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1)
    if envoy:
        from mesh.envoy.admin import EnvoyAdmin
        from meshxds.address import ListenAddress

        admin = EnvoyAdmin(ListenAddress.parse(_address(None, state_dir, "envoy-admin.sock")),
                           timeout=2.0)
        try:
            # /ready: 200 once Envoy is LIVE (initialized, not draining); any answer at all
            # means the process is alive.
            status, text = admin.request("GET", "/ready")
        except OSError as e:
            click.echo(json.dumps({"envoy": "unreachable", "error": str(e)}, indent=2))
            sys.exit(1)
        click.echo(json.dumps({"envoy": text.strip(), "status": status}, indent=2))
        sys.exit(0 if status == 200 or not ready else 1)
    from mesh.agent.health import SOCKET, probe

    code, body = asyncio.run(probe(state_dir / SOCKET, ready))
    click.echo(json.dumps(body, indent=2))
    sys.exit(0 if code == 200 else 1)


@main.command()
@click.option("--listen", multiple=True, default=["127.0.0.1:18080"], show_default=True,
              metavar="HOST:PORT", help="Plain HTTP/1.1 and h2c (repeatable).")
@click.option("--tls-listen", multiple=True, metavar="HOST:PORT", help="HTTPS (repeatable).")
@click.option("--cert", envvar="TLS_SERVER_CERT", type=click.Path(exists=True),
              help="Certificate for --tls-listen (default: $TLS_SERVER_CERT).")
@click.option("--key", envvar="TLS_SERVER_PRIVKEY", type=click.Path(exists=True),
              help="Its private key (default: $TLS_SERVER_PRIVKEY).")
@click.option("--client-ca", type=click.Path(exists=True),
              help="Require TLS clients to present a certificate these CAs signed.")
@click.option("--grpc", "grpc_mode", is_flag=True, envvar="GRPC_ECHO_SERVER",
              help="Serve the conformance gRPC echo service instead (default: "
              "$GRPC_ECHO_SERVER).")
def echo(listen: tuple[str, ...], tls_listen: tuple[str, ...], cert: str | None,
         key: str | None, client_ca: str | None, grpc_mode: bool) -> None:
    """Run the echo backend (pod and namespace from POD_NAME and NAMESPACE)."""
    from mesh.echo import EchoIdentity, serve

    if grpc_mode:
        from mesh import grpcecho

        ident = EchoIdentity()
        asyncio.run(grpcecho.serve(list(listen), ident.pod, ident.namespace))
        return
    if tls_listen and not (cert and key):
        raise click.UsageError("--tls-listen needs --cert and --key")
    try:
        asyncio.run(serve(list(listen), list(tls_listen), EchoIdentity(), cert, key,
                          client_ca))
    except KeyboardInterrupt:
        pass


def _add_commands() -> None:
    from mesh.cni.install import cni_install
    from mesh.encryption.cli import encryption
    from mesh.hubble.cli import observe, relay, service_map
    from mesh.ingress_nginx_check import ingress_nginx
    from mesh.install import install
    from mesh.lab.cli import lab
    from mesh.policy.cli import policy
    from mesh.ratelimit.__main__ import main as ratelimit

    main.add_command(lab)
    main.add_command(policy)  # `mesh policy status|trace`
    main.add_command(encryption)  # `mesh encryption status|rotate-key`
    main.add_command(observe)  # the flows, through Hubble's API (an agent's or the relay's)
    main.add_command(relay)  # the cluster's flows: the nodes' Observer APIs joined
    main.add_command(service_map)  # `mesh map`: the observed graph, HTML and PNG
    main.add_command(ratelimit)  # the node's rate limit service (mesh run starts it)
    main.add_command(install)  # the Helm chart rendered (charts/mesh)
    main.add_command(cni_install)  # the chart's init container: the CNI plugin on the node
    main.add_command(ingress_nginx)  # `mesh ingress-nginx check`: Ingresses before a move


_add_commands()

if __name__ == "__main__":
    main()
