"""`mesh policy`: what the datapath enforces on this node (read from the pinned maps) and why a
flow would be allowed or denied (computed from the cluster's objects, as the agents compute it,
like `cilium policy trace`)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import click

from mesh.datapath import layout

DEFAULT_STATE_DIR = Path("/run/mesh")


def read_maps(pin_dir: Path) -> dict[str, Any]:
    """The policy maps a node's agent pinned in `pin_dir`: the revision, the drop counters,
    the pods' isolation and allowed entries, the ipcache."""
    from mesh.datapath.programs import BPFFS_MAGIC, _fs_type, compile_program

    if _fs_type(pin_dir) != BPFFS_MAGIC or not (pin_dir / "mesh_policy").exists():
        raise click.ClickException(f"no policy maps pinned in {pin_dir} (is the agent's "
                                   "datapath running with forwarding there?)")
    loaded = compile_program("policy_maps.c", pin_dir)
    try:
        stats = loaded.table("mesh_policy_stats")
        counters = {name: sum(stats[ctypes.c_uint32(i)])
                    for i, name in enumerate(layout.POLICY_STATS)}
        revision = int(loaded.table("mesh_policy_revision")[ctypes.c_uint32(0)].value)
        endpoints: dict[str, dict[str, Any]] = {}
        for k, v in loaded.table("mesh_policy_endpoints").items():
            endpoints[layout.address_of(int(k.value))] = {
                "identity": int(v.identity),
                "ingress": "isolated" if v.flags & layout.EP_INGRESS_ISOLATED else "open",
                "egress": "isolated" if v.flags & layout.EP_EGRESS_ISOLATED else "open",
                "entries": 0}
        entries = 0
        for k, _ in loaded.table("mesh_policy").items():
            entries += 1
            e = endpoints.get(layout.address_of(int(k.endpoint)))
            if e is not None:
                e["entries"] += 1
        tiers = {t: sum(1 for _ in loaded.table(f"mesh_policy_{t}").items())
                 for t in ("admin", "baseline")}
        fqdn: dict[str, set[str]] = {}
        for k, _ in loaded.table("mesh_policy_fqdn").items():
            fqdn.setdefault(layout.address_of(int(k.endpoint)), set()).add(
                layout.address_of(int(k.address)))
        for address, reached in fqdn.items():
            if address in endpoints:
                endpoints[address]["fqdn_addresses"] = sorted(reached)
        ipcache = sum(1 for _ in loaded.table("mesh_ipcache").items())
        flows = sum(1 for _ in loaded.table("mesh_policy_ct").items())
    finally:
        loaded.close()
    return {"revision": revision, "counters": counters, "endpoints": endpoints,
            "policy_entries": entries, "admin_entries": tiers["admin"],
            "baseline_entries": tiers["baseline"], "ipcache_entries": ipcache,
            "tracked_flows": flows}


@click.group()
def policy() -> None:
    """Network policy: what this node enforces, and why a flow passes or not."""


@policy.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="The agent's state directory (its maps are pinned in "
              "STATE_DIR/bpffs).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(state_dir: Path, output: str) -> None:
    """The node's policy maps: drops by reason, the pods' isolation, map fill."""
    found = read_maps(state_dir / "bpffs")
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    counters = Table("COUNTER", "PACKETS / FLOWS")
    for name, n in found["counters"].items():
        counters.add_row(name.replace("_", " "), str(n))
    pods = Table("POD ADDRESS", "IDENTITY", "INGRESS", "EGRESS", "ALLOWED ENTRIES")
    for address, e in sorted(found["endpoints"].items()):
        pods.add_row(address, str(e["identity"]), e["ingress"], e["egress"], str(e["entries"]))
    console = Console(width=120)
    console.print(counters, pods)
    names = _dns_names(state_dir)
    fqdn = Table("POD ADDRESS", "MAY REACH (toFQDNs)", "AS ANSWERED FOR")
    for address, e in sorted(found["endpoints"].items()):
        for reached in e.get("fqdn_addresses", []):
            fqdn.add_row(address, reached, ", ".join(names.get(reached, [])) or "-")
    if fqdn.row_count:
        console.print(fqdn)
    console.print(f"policy revision {found['revision']}; {found['policy_entries']} allowed "
                  f"entries, {found['admin_entries']} Admin and {found['baseline_entries']} "
                  f"Baseline tier entries, {found['ipcache_entries']} ipcache entries, "
                  f"{found['tracked_flows']} tracked flows")


def _dns_names(state_dir: Path) -> dict[str, list[str]]:
    """Address -> the names the node's DNS proxy saw answered with it (its saved cache)."""
    from mesh.datapath.fqdn import DnsCache

    cache = DnsCache()
    cache.load(state_dir / "dns-cache.json", time.time())
    out: dict[str, list[str]] = {}
    for name, held in sorted(cache.names.items()):
        for address in held:
            out.setdefault(address, []).append(name)
    return out


async def _snapshot(kubeconfig: str | None) -> Any:
    from mesh.kube.client import connect
    from mesh.kube.resources import resources
    from mesh.store import kinds
    from mesh.store.objects import parse_object
    from mesh.store.store import Store

    wanted = {kinds.NAMESPACE, kinds.POD, kinds.NODE, kinds.NETWORK_POLICY, kinds.MESH_IDENTITY,
              kinds.CLUSTER_NETWORK_POLICY, kinds.MESH_NETWORK_POLICY}
    objects = []
    async with connect(kubeconfig) as http:
        for r in resources(None):
            if r.group_kind not in wanted:
                continue
            listed = await http.get_json(r.path, {})
            for item in listed.get("items") or []:
                item.setdefault("apiVersion", r.api_version)
                item.setdefault("kind", r.kind)
                objects.append(parse_object(item))
    store = Store()
    store.replace("trace", objects)
    return store.snapshot()


def _model(snap: Any, src: str, dst: str, protocol: str, port: int) -> Any:
    """The NetworkPolicy semantics' verdict (mesh/policy/networkpolicy.py), for the names of
    the policies that decide."""
    from mesh.policy import networkpolicy as netpol
    from mesh.store import kinds
    from mesh.translate.network_policy import container_ports

    policies = []
    for obj in snap.of_kind(kinds.NETWORK_POLICY):
        try:
            policies.append(netpol.parse(obj))
        except netpol.Invalid:
            continue
    namespaces = {o.name: o.labels for o in snap.of_kind(kinds.NAMESPACE)}

    def endpoint(address: str) -> netpol.Endpoint:
        for pod in snap.of_kind(kinds.POD):
            if (pod.body.get("status") or {}).get("podIP") == address:
                return netpol.Endpoint(address, pod.namespace, pod.labels,
                                       container_ports(pod))
        return netpol.Endpoint(address)

    return netpol.Decision(policies, namespaces).verdict(endpoint(src), endpoint(dst), port,
                                                         protocol)


@policy.command()
@click.argument("source")
@click.argument("destination")
@click.option("--port", type=int, required=True)
@click.option("--protocol", type=click.Choice(["TCP", "UDP", "SCTP"]), default="TCP",
              show_default=True)
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False),
              default=lambda: os.environ.get("KUBECONFIG"), help="Default: $KUBECONFIG.")
def trace(source: str, destination: str, port: int, protocol: str,
          kubeconfig: str | None) -> None:
    """Would SOURCE reach DESTINATION on PORT, and which policies decide? Each is a pod
    (NAMESPACE/NAME) or an IPv4 address."""
    from mesh.policy import datapath_verdict as dv
    from mesh.store import kinds
    from mesh.translate.identities import identity_table
    from mesh.translate.network_policy import translate_network_policies

    snap = asyncio.run(_snapshot(kubeconfig))

    def where(text: str) -> tuple[str, str | None]:
        if "/" not in text:
            return text, None
        ns, name = text.split("/", 1)
        pod = snap.get(kinds.POD, ns, name)
        if pod is None:
            raise click.ClickException(f"no pod {text}")
        ip = (pod.body.get("status") or {}).get("podIP")
        if not ip:
            raise click.ClickException(f"pod {text} has no address yet")
        return str(ip), pod.spec.get("nodeName")

    src, src_node = where(source)
    dst, dst_node = where(destination)
    table = identity_table(snap)
    at_src = translate_network_policies(snap, src_node or "", table)
    at_dst = translate_network_policies(snap, dst_node or "", table)
    peer_src, peer_dst = dv.peer_of(at_dst, src), dv.peer_of(at_src, dst)
    click.echo(f"{source} ({src}, identity {peer_src.identity}) -> {destination} ({dst}, "
               f"identity {peer_dst.identity}) {protocol}/{port}")
    out = dv.decide(dv.endpoint(at_src, src), "egress", peer_dst, protocol, port)
    click.echo(f"  egress of the source on {src_node or '(not a pod)'}: "
               f"{'ALLOWED' if out.allowed else 'DENIED'}: {out.reason}")
    into = dv.decide(dv.endpoint(at_dst, dst), "ingress", peer_src, protocol, port)
    click.echo(f"  ingress of the destination on {dst_node or '(not a pod)'}: "
               f"{'ALLOWED' if into.allowed else 'DENIED'}: {into.reason}")
    verdict = out.allowed and into.allowed
    tiers = [side.reason for side in (out, into) if " tier: " in side.reason]
    if tiers:  # a ClusterNetworkPolicy rule decided (its name is in the line above)
        click.echo(f"verdict: {'ALLOWED' if verdict else 'DENIED'}")
    else:
        decided = _model(snap, src, dst, protocol, port)
        click.echo(f"verdict: {'ALLOWED' if verdict else 'DENIED'}" + (
            f" (decided by {', '.join(decided.policies)})" if decided.policies else ""))
    if not verdict:
        raise SystemExit(1)
