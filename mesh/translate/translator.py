"""translate(): a store snapshot to the IR and every object's status, by the Gateway API,
Ingress and Service translators in turn.

They share one route builder (route tables, backends, certificates: what the IR is made
of) and one index of TrafficPolicies. The order is part of the result: Gateways take their
pool addresses before the Ingresses do, and the Services' frontends learn from the Gateway
API translator which of them GAMMA's mesh listener takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh import ir
from mesh.policy import clusternetworkpolicy as cnp
from mesh.store import kinds
from mesh.store.objects import ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import cluster_network_policy, model
from mesh.translate.addressing import allocate, node_addresses, published
from mesh.translate.config import Translation, TranslatorConfig
from mesh.translate.directory import translate_directory
from mesh.translate.encryption import translate_encryption
from mesh.translate.gateway.attachment import RouteOutcome
from mesh.translate.gateway.translator import translate_gateway_api
from mesh.translate.identities import identity_table, translate_identities
from mesh.translate.ingress import translate_ingresses
from mesh.translate.network_policy import (
    ParseMemo,
    mesh_network_policy_statuses,
    translate_network_policies,
)
from mesh.translate.policy_attachment import PolicyIndex
from mesh.translate.policy_listener import policy_listener
from mesh.translate.route_builder import RouteBuilder, VhostCache
from mesh.translate.services import translate_services

INGRESS_ADDRESS_KEY = "ingress"


class TranslationMemo:
    """Route outcomes kept between translations by the caller (the pipeline).

    With 10,000 routes one changed route should not cost 10,000 re-translations. An outcome
    is reused only when the route's content version is the same and nothing it can depend on
    changed: the fingerprint holds the content version of every object except routes,
    Ingresses and EndpointSlices (endpoints are joined to backends afresh each time). The
    result is the same as a translation from scratch; the tests check that."""

    def __init__(self) -> None:
        self.routes: dict[ObjectKey, RouteOutcome] = {}
        self.vhosts: VhostCache = {}
        self.world: tuple[Any, ...] = ()
        self.network_policies = ParseMemo()  # parsed policies and identities
        self.hits = 0  # routes reused, over all translations
        self.misses = 0  # routes translated anew by the last translation


# Pods: only the mesh listener's consumer chains read them, assembled afresh each time;
# network policies: no route depends on them.
_NOT_IN_WORLD = frozenset({kinds.HTTP_ROUTE, kinds.GRPC_ROUTE, kinds.TLS_ROUTE,
                           kinds.TCP_ROUTE, kinds.UDP_ROUTE, kinds.MESH_IDENTITY,
                           kinds.ENDPOINT_SLICE, kinds.INGRESS, kinds.POD,
                           kinds.NETWORK_POLICY, kinds.CLUSTER_NETWORK_POLICY,
                           kinds.MESH_NETWORK_POLICY})


def _world(snapshot: StoreSnapshot, cfg: TranslatorConfig) -> tuple[Any, ...]:
    parts = sorted((o.key, o.version) for o in snapshot if o.group_kind not in _NOT_IN_WORLD)
    return (cfg, *parts)


def translate(snapshot: StoreSnapshot, cfg: TranslatorConfig | None = None,
              previous_addresses: Mapping[str, str] | None = None,
              memo: TranslationMemo | None = None) -> Translation:
    """The IR and status for `snapshot`. With `memo`, unchanged routes' outcomes from the
    previous call are reused, and the memo is refilled for the next call."""
    cfg = cfg or TranslatorConfig()
    # What the status writer published wins over this node's own memory: every node
    # serves a Gateway on the same pool address.
    previous = {**(previous_addresses or {}), **published(snapshot, cfg.address_pool)}
    world = _world(snapshot, cfg) if memo is not None else ()
    # Outcomes are reusable only if nothing a route can depend on changed.
    reusable = memo.routes if memo is not None and memo.world == world else {}
    grants = tuple(model.parse_reference_grant(o)
                   for o in snapshot.of_kind(kinds.REFERENCE_GRANT))
    policies = PolicyIndex(snapshot, cfg.global_rate_limits)
    routes = RouteBuilder(snapshot, grants, memo.vhosts if memo is not None else None,
                          policies)
    local = node_addresses(snapshot, cfg.node_name)

    gateway_api = translate_gateway_api(snapshot, cfg, grants, routes, policies, previous,
                                        local, reusable)
    ingress = translate_ingresses(
        snapshot, cfg, routes,
        lambda: allocate(cfg.address_pool, previous, gateway_api.addresses,
                         INGRESS_ADDRESS_KEY))
    services = translate_services(snapshot, routes, local, gateway_api.redirects)
    identities = identity_table(snapshot)

    addresses = dict(gateway_api.addresses)
    if ingress.used_address:
        addresses[INGRESS_ADDRESS_KEY] = ingress.used_address
    if memo is not None:
        memo.routes, memo.world = dict(gateway_api.outcomes), world
        memo.hits += gateway_api.reused
        memo.misses = gateway_api.translated
        memo.vhosts = routes.vhosts
    # Parsed policies kept between translations; the statuses below read the same ones.
    parsed = memo.network_policies if memo is not None else ParseMemo()
    network_policies = translate_network_policies(snapshot, cfg.node_name, identities, parsed)
    l7_listener, l7_tables, l7_backends = policy_listener(network_policies)
    return Translation(
        ir=ir.IR(
            listeners=gateway_api.listeners + ingress.listeners +
            ((l7_listener,) if l7_listener is not None else ()),
            route_tables=tuple(routes.tables()) + tuple(l7_tables),
            backends=tuple(routes.backends()) + tuple(l7_backends),
            certificates=tuple(routes.certificates()),
            trust_bundles=tuple(ir.TrustBundle(k, v)
                                for k, v in sorted(gateway_api.trust_bundles.items())),
            services=services,
            gateway_services=gateway_api.gateway_services,
            identities=translate_identities(snapshot, identities),
            network_policies=network_policies,
            encryption=translate_encryption(snapshot, cfg.node_name),
            directory=translate_directory(snapshot),
        ),
        status={**gateway_api.status, **ingress.status,
                **cluster_network_policy.statuses(
                    snapshot, lambda obj: parsed.get(obj, cnp.parse)),
                **mesh_network_policy_statuses(snapshot, parsed)},
        addresses=addresses,
    )
