"""`mesh lab`: up, down, status, kubeconfig, exec, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from mesh.lab import cluster
from mesh.lab.network import LabError


def _name(name: str | None) -> str:
    """The lab named, or the one lab that runs."""
    if name:
        return name
    labs = sorted(p.name for p in cluster.ROOT.glob("*") if (p / "lab.json").exists()) \
        if cluster.ROOT.exists() else []
    if not labs:
        raise click.ClickException("no lab runs: start one with `mesh lab up`")
    if len(labs) > 1:
        raise click.ClickException(f"several labs run ({', '.join(labs)}): say --name")
    return labs[0]


def _state(name: str) -> dict[str, Any]:
    try:
        state = cluster.read_state(name)
    except LabError as e:
        raise click.ClickException(str(e)) from e
    if state is None:
        raise click.ClickException(f"no lab {name!r}: start it with `mesh lab up --name {name}`")
    return state


_name_option = click.option("--name", help="The lab (default: the one that runs).")


@click.group()
def lab() -> None:
    """A Kubernetes cluster on this machine: a real control plane, nodes and pods in network
    namespaces, one agent and one Envoy per node, the eBPF datapath."""


@lab.command()
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 200))
@click.option("--manifests", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Deployments, Pods, Services, Gateway API objects... to deploy.")
@click.option("--name", default="lab", show_default=True)
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C takes the lab down.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for ready.")
@click.option("--redirect", type=click.Choice(["sk-assign", "tproxy"]), default="sk-assign",
              show_default=True, help="How the nodes' datapath hands L7 flows to Envoy.")
@click.option("--encryption", type=click.Choice(["none", "wireguard", "ipsec"]),
              default="none", show_default=True,
              help="Encrypt pod traffic between the nodes, strict mode (wireguard: "
              "wireguard-go on each node; ipsec: the kernel's ESP, which it must have).")
def up(nodes: int, manifests: Path | None, name: str, foreground: bool, timeout: float,
       redirect: str, encryption: str) -> None:
    """Build the lab and return once every node and pod is ready."""
    try:
        cluster.check_name(name)
    except LabError as e:
        raise click.ClickException(str(e)) from e
    if cluster.read_state(name) is not None:
        raise click.ClickException(f"lab {name!r} is already up (`mesh lab down --name "
                                   f"{name}` first)")
    if encryption == "ipsec":
        from mesh.sinks.ipsec import probe_esp

        missing = probe_esp()
        if missing is not None:
            raise click.ClickException(f"--encryption ipsec: {missing}; nothing was set up "
                                       "(--encryption wireguard runs on any kernel)")
    args = [sys.executable, "-m", "mesh.cli", "lab", "supervise", "--nodes", str(nodes),
            "--name", name, "--redirect", redirect, "--encryption", encryption] + (
                ["--manifests", str(manifests.resolve())] if manifests else [])
    if foreground:
        os.execv(sys.executable, args)
    cluster.ROOT.mkdir(parents=True, exist_ok=True, mode=0o700)
    logf = cluster.ROOT / f"{name}.log"
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=logf.open("wb"), start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.read_state(name)
        if state is not None and state.get("ready"):
            click.echo(f"lab {name} is up: {len(state['nodes'])} nodes, "
                       f"{len(state['pods'])} pods (supervisor pid {proc.pid})\n"
                       f"kubectl: export KUBECONFIG={state['kubeconfig']}")
            for error in state.get("errors", []):
                click.echo(f"manifest not applied: {error}", err=True)
            return
        if proc.poll() is not None:
            raise click.ClickException(f"the lab did not come up:\n{logf.read_text()[-3000:]}")
        time.sleep(0.3)
    state = cluster.read_state(name) or {}
    waiting = [f"{key} ({p['reason'] or p['phase'] or 'not ready'})"
               for key, p in sorted(state.get("pods", {}).items()) if not p["ready"]]
    raise click.ClickException(
        f"the lab was not ready after {timeout:.0f}s (still starting; see `mesh lab status`, "
        f"{logf})" + (f"; pods not ready: {', '.join(waiting)}" if waiting else "") +
        "".join(f"\n{e}" for e in state.get("errors", [])))


@lab.command(hidden=True)
@click.option("--nodes", default=2, type=int)
@click.option("--manifests", type=click.Path(path_type=Path))
@click.option("--name", default="lab")
@click.option("--redirect", default="sk-assign")
@click.option("--encryption", default="none")
def supervise(nodes: int, manifests: Path | None, name: str, redirect: str,
              encryption: str) -> None:
    """Run the lab in the foreground until SIGTERM or Ctrl-C, then take it down."""
    stop: list[bool] = []

    def on_signal(_sig: int, _frame: object) -> None:
        stop.append(True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.Lab(name, nodes, manifests, redirect, encryption).run_forever(stop)


@lab.command()
@_name_option
def down(name: str | None) -> None:
    """Take the lab down: every namespace, link, route, map and process it made."""
    name = _name(name)
    state = _state(name)
    pid = int(state.get("supervisor") or 0)
    if pid and cluster._alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while cluster._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = cluster.teardown(name)  # after a crash of the supervisor: from its records
    if left:
        raise click.ClickException("could not remove: " + "; ".join(left))
    click.echo(f"lab {name} is down")


@lab.command()
@_name_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(name: str | None, output: str) -> None:
    """Nodes, pods (with node and IP), services, as the API server has them."""
    from rich.console import Console
    from rich.table import Table

    state = _state(_name(name))
    if output == "json":
        click.echo(json.dumps(state, indent=2))
        return
    console = Console(width=160)
    nodes = Table("NODE", "READY", "UNDERLAY", "POD CIDR", "ENCRYPTION")
    for n in state.get("node_info", []):
        nodes.add_row(n["name"], str(n.get("ready", False)), n["underlay"], n["podCIDR"],
                      _encryption(cluster.lab_dir(state["name"]) / n["name"] / "agent"))
    pods = Table("NAMESPACE", "POD", "NODE", "IP", "READY", "STATUS", "RESTARTS")
    for key, p in sorted(state.get("pods", {}).items()):
        ns, pod = key.split("/", 1)
        pods.add_row(ns, pod, p["node"], p["ip"], "True" if p["ready"] else "False",
                     "Terminating" if p.get("deleting") else p.get("reason") or p["phase"],
                     str(p["restarts"]))
    services = Table("NAMESPACE", "SERVICE", "TYPE", "CLUSTER-IP", "PORTS", "ENDPOINTS")
    for s in state.get("services", []):
        ports = ",".join(f"{p.get('port')}" + (f":{p['nodePort']}" if "nodePort" in p else "")
                         + f"/{p.get('protocol', 'TCP')}" for p in s["ports"])
        services.add_row(s["namespace"], s["name"], s.get("type", ""), s["clusterIP"], ports,
                         ",".join(s["endpoints"]) or "-")
    console.print(nodes, pods, services)
    for e in state.get("errors", []):
        console.print(f"[red]manifest not applied:[/red] {e}", markup=True, highlight=False)
    if state.get("host_address"):
        console.print(f"The host is {state['host_address']} on the underlay: NodePorts and "
                      "Gateways answer on the nodes' addresses.")
    if state.get("pool"):
        console.print(f"Gateways without addresses get one of {state['pool']}, routed from "
                      "the host to the nodes.")


def _encryption(state_dir: Path) -> str:
    """A node's encryption in one line (`mesh encryption status` has the rest)."""
    from mesh.encryption.cli import read_status, summary

    try:
        return summary(read_status(state_dir))
    except (click.ClickException, KeyError):
        return "none"


@lab.command()
@_name_option
def kubeconfig(name: str | None) -> None:
    """The path of the lab's kubeconfig (the cluster's admin), for kubectl:
    `export KUBECONFIG=$(mesh lab kubeconfig)`."""
    click.echo(_state(_name(name))["kubeconfig"])


def _pod(state: dict[str, Any], pod: str, namespace: str) -> dict[str, Any]:
    found = state.get("pods", {}).get(f"{namespace}/{pod}")
    if found is None:
        raise click.ClickException(f"no pod {namespace}/{pod} in lab {state['name']}")
    if not found.get("netns"):
        raise click.ClickException(f"pod {namespace}/{pod} is not running on a node (yet)")
    result: dict[str, Any] = found
    return result


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@_name_option
@click.option("-n", "--namespace", default="default", show_default=True)
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(name: str | None, namespace: str, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD's network namespace (and its node's pod cgroup), like
    `kubectl exec POD -- COMMAND`."""
    state = _state(_name(name))
    p = _pod(state, pod, namespace)
    procs = cluster.CGROUP_ROOT / state["name"] / p["node"] / "cgroup.procs"
    with open(procs, "w") as f:  # this process, then what it execs: balanced as the pod is
        f.write(str(os.getpid()))
    os.execvpe("ip", ["ip", "netns", "exec", p["netns"], *command],
               {**os.environ, **p.get("env", {})})


@lab.command()
@_name_option
@click.option("-n", "--namespace", default="default", show_default=True)
@click.argument("pod")
def logs(name: str | None, namespace: str, pod: str) -> None:
    """What POD's (first) container printed, as `kubectl logs POD` shows it."""
    from mesh.lab.logshim import lines

    p = _pod(_state(_name(name)), pod, namespace)
    for _, text in lines(Path(p["log"])):
        click.echo(text)
