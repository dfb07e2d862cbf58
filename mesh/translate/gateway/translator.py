"""The Gateway API translator, phase by phase. Each phase is a function of the snapshot and
the earlier phases' results (frozen data), in one module each:

1. `gateways`     GatewayClasses and Gateways: ours, their addresses, what refuses them
2. `listeners`    listeners and ListenerSets: valid or not, TLS, conflicts
3. `attachment`   routes to listeners and (GAMMA) Services, and to IR routes
4. `ir_listeners` the IR listeners: Gateways' by address and port, the mesh listener
5. `statuses`     every object's status, from what 1-3 decided
6. `infrastructure` what is generated for each Gateway in the cluster (its Service)

The route builder is the one thing they share that changes: phases 1 and 2 give it
certificates, 3 routes, 4 assembles route tables from them. Nothing a later phase decides
goes back into an earlier phase's results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh import ir
from mesh.store.objects import ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.config import TranslatorConfig
from mesh.translate.gateway.attachment import RouteOutcome, attach_routes
from mesh.translate.gateway.gateways import decide_gateways
from mesh.translate.gateway.infrastructure import generated_services
from mesh.translate.gateway.ir_listeners import build_listeners
from mesh.translate.gateway.listeners import validate_listeners
from mesh.translate.gateway.references import References
from mesh.translate.gateway.statuses import build_statuses
from mesh.translate.policy_attachment import PolicyIndex
from mesh.translate.route_builder import RouteBuilder
from mesh.translate.status import ObjectStatus


@dataclass(frozen=True)
class GatewayAPI:
    """What the Gateway API objects come to, besides the route builder's tables."""

    listeners: tuple[ir.Listener, ...]
    trust_bundles: Mapping[str, bytes]  # name -> CA certificates (PEM)
    # (ClusterIP, port) -> the mesh listener's port: for the Services' frontends
    redirects: Mapping[tuple[str, int], int]
    status: Mapping[ObjectKey, ObjectStatus]
    addresses: Mapping[str, str]  # "gateway/ns/name[/i]" -> address
    outcomes: Mapping[ObjectKey, RouteOutcome]  # for the next translation's memo
    reused: int  # routes whose outcome was reused
    translated: int  # routes translated anew
    gateway_services: tuple[ir.GatewayService, ...] = ()


def translate_gateway_api(snapshot: StoreSnapshot, cfg: TranslatorConfig,
                          grants: tuple[model.ReferenceGrant, ...], routes: RouteBuilder,
                          policies: PolicyIndex, previous_addresses: Mapping[str, str],
                          node_addresses: frozenset[str] | None,
                          previous: Mapping[ObjectKey, RouteOutcome]) -> GatewayAPI:
    """`previous`: the last translation's route outcomes, if they can be reused (else
    empty)."""
    refs = References.of(snapshot, grants)
    gateways = decide_gateways(snapshot, cfg, refs, routes, previous_addresses,
                               node_addresses)
    listeners = validate_listeners(snapshot, refs, routes, gateways)
    attachment = attach_routes(snapshot, cfg, refs, routes, gateways, listeners, previous)
    served = build_listeners(snapshot, routes, gateways, listeners, attachment)
    status = build_statuses(snapshot, cfg, policies, gateways, listeners, attachment)
    generated = generated_services(snapshot, cfg, gateways, listeners)
    return GatewayAPI(
        listeners=served.listeners, trust_bundles=listeners.trust_bundles,
        redirects=served.redirects, status=status, addresses=gateways.addresses,
        outcomes=attachment.outcomes, reused=attachment.reused,
        translated=attachment.translated, gateway_services=generated)
