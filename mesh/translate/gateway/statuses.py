"""Phase 5: the status of every Gateway API object the translator answers for:
GatewayClasses, Gateways and their listeners, ListenerSets, routes, BackendTLSPolicies and
TrafficPolicies (and, on what a TrafficPolicy targets, that it is affected). It only reads
what the earlier phases decided; `Programmed` is left to the status sink, which knows what
the node's Envoy ACKed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from mesh.store.kinds import GATEWAY_GROUP, GroupKind
from mesh.store.objects import ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.config import TranslatorConfig
from mesh.translate.gateway.attachment import Attachment
from mesh.translate.gateway.gateways import Gateway, Gateways
from mesh.translate.gateway.listeners import Listener, Listeners
from mesh.translate.policy_attachment import PolicyIndex, affected
from mesh.translate.route_builder import BackendTLSUse, backend_tls_ca
from mesh.translate.status import (
    ClassStatus,
    Conditions,
    GatewayStatus,
    ListenerStatus,
    ObjectStatus,
    ParentStatus,
    PolicyStatus,
    Reason,
    RouteStatus,
    Type,
    condition,
)


def build_statuses(snapshot: StoreSnapshot, cfg: TranslatorConfig, policies: PolicyIndex,
                   gws: Gateways, lis: Listeners, att: Attachment
                   ) -> dict[ObjectKey, ObjectStatus]:
    out: dict[ObjectKey, ObjectStatus] = {}
    for gc in gws.classes:
        out[gc.key] = ClassStatus(Conditions([
            condition(Type.ACCEPTED, True, Reason.ACCEPTED,
                      "accepted by " + cfg.controller_name, gc.generation),
            condition(Type.SUPPORTED_VERSION, True, Reason.SUPPORTED_VERSION,
                      "Gateway API v1.6", gc.generation),
        ]))
    for obj, message in gws.invalid:
        out[obj.key] = GatewayStatus(Conditions([
            condition(Type.ACCEPTED, False, Reason.INVALID, message, obj.generation),
            condition(Type.PROGRAMMED, False, Reason.INVALID, message, obj.generation),
        ]), listeners=None)
    # Each owner's (Gateway's or ListenerSet's) listeners, in their order.
    declared: dict[ObjectKey, list[tuple[Listener, ListenerStatus]]] = {}
    for li, attached in zip(lis.listeners, att.attached, strict=True):
        declared.setdefault(li.owner.key, []).append((li, _listener_status(li, attached)))
    accepted_sets: dict[ObjectKey, int] = {}  # Gateway -> its ListenerSets that are accepted
    for ls in lis.listener_sets:
        if ls.parent is None:
            out[ls.obj.key] = GatewayStatus(Conditions(ls.refused), listeners=None)
            continue
        own = [st for _, st in declared.get(ls.obj.key, ())]
        # Accepted when one of its listeners is served (a listener whose certificate does
        # not resolve is accepted into its Gateway, and serves nothing).
        ok = any(st.conditions.true(Type.ACCEPTED) and not li.unresolved
                 for li, st in declared.get(ls.obj.key, ()))
        conds = Conditions([condition(
            Type.ACCEPTED, ok, Reason.ACCEPTED if ok else Reason.LISTENERS_NOT_VALID,
            "accepted" if ok else "no listener is valid", ls.obj.generation)])
        if not ok:
            conds.append(condition(Type.PROGRAMMED, False, Reason.LISTENERS_NOT_VALID,
                                   "no listener is valid", ls.obj.generation))
        out[ls.obj.key] = GatewayStatus(conds, own)
        if ok:
            accepted_sets[ls.parent] = accepted_sets.get(ls.parent, 0) + 1
    out.update(att.statuses)
    for g in gws.gateways:
        out[g.obj.key] = _gateway_status(cfg, g, declared.get(g.obj.key, []),
                                         accepted_sets.get(g.obj.key, 0))
    out.update(_backend_tls_statuses(snapshot, cfg, att.backend_tls, out))
    out.update(_traffic_policy_statuses(snapshot, cfg, policies, out))
    return out


def _listener_status(li: Listener, attached: int) -> ListenerStatus:
    """What validation found, and the conditions it found nothing wrong with."""
    conds = Conditions(li.conditions)
    gen = li.owner.generation
    if not conds.has(Type.ACCEPTED):
        conds.append(condition(
            Type.ACCEPTED, li.valid, Reason.ACCEPTED if li.valid else Reason.INVALID,
            "listener accepted" if li.valid else "listener not accepted", gen))
    if not conds.has(Type.RESOLVED_REFS):
        conds.append(condition(
            Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS, "references resolved", gen))
    if not conds.has(Type.CONFLICTED):
        conds.append(condition(Type.CONFLICTED, False, Reason.NO_CONFLICTS, "no conflicts", gen))
    return ListenerStatus(li.spec.name, tuple((GATEWAY_GROUP, k) for k in li.supported_kinds),
                          attached, conds)


def _gateway_status(cfg: TranslatorConfig, g: Gateway,
                    own: list[tuple[Listener, ListenerStatus]], sets: int) -> GatewayStatus:
    gen = g.obj.generation
    conds = Conditions([condition(Type.ACCEPTED, True, Reason.ACCEPTED, "accepted", gen)])
    if own and not any(li.valid for li, _ in own):
        conds[-1] = condition(Type.ACCEPTED, False, Reason.LISTENERS_NOT_VALID,
                              "no listener is valid", gen)
    elif any(not li.valid for li, _ in own):
        # Accepted, and served on its valid listeners: the reason says not all are.
        invalid = ", ".join(li.spec.name for li, _ in own if not li.valid)
        conds[-1] = condition(Type.ACCEPTED, True, Reason.LISTENERS_NOT_VALID,
                              f"accepted; listeners not valid: {invalid}", gen)
    if g.unusable:
        # Served on the usable ones, if any; not Programmed until all are usable.
        msg = f"address {', '.join(g.unusable)} cannot be used on this node: it is " \
            "not one of its addresses (or not an IP address)"
        conds.append(condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_USABLE, msg, gen))
    elif not g.addresses:
        conds.append(condition(
            Type.PROGRAMMED, False, Reason.ADDRESS_NOT_USABLE,
            "no address left in the pool" if cfg.gateway_addresses == "pool"
            else f"this node ({cfg.node_name}) has no Node object with an IP "
            "address to serve the Gateway on", gen))
    elif g.unassigned:
        conds.append(condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_ASSIGNED,
                               g.unassigned, gen))
    unsupported = g.unsupported_address_types
    if unsupported:
        msg = f"address types {', '.join(unsupported)} are not supported (IPAddress is)"
        conds[:] = [
            condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_ADDRESS, msg, gen),
            condition(Type.PROGRAMMED, False, Reason.ADDRESS_NOT_ASSIGNED, msg, gen)]
    problem = g.backend_certificate_problem
    if problem is None:
        conds.append(condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                               "references resolved", gen))
    else:
        conds.append(condition(Type.RESOLVED_REFS, False, problem[0], problem[1], gen))
    modes = [v.mode for v in (g.spec.client_validation,
                              *g.spec.client_validation_per_port.values()) if v]
    if "AllowInsecureFallback" in modes:
        conds.append(condition(
            Type.INSECURE_FRONTEND_VALIDATION_MODE, True, Reason.CONFIGURATION_CHANGED,
            "client certificate validation lets clients without a valid certificate "
            "in on some ports (AllowInsecureFallback)", gen))
    if g.parameters_ref is not None:
        msg = f"parametersRef {g.parameters_ref!r} cannot be resolved: no parameters are " \
            "supported"
        conds[:] = [condition(Type.ACCEPTED, False, Reason.INVALID_PARAMETERS, msg, gen),
                    condition(Type.PROGRAMMED, False, Reason.INVALID, msg, gen)]
    return GatewayStatus(conds, [st for _, st in own], g.shown, attached_listener_sets=sets)


def _backend_tls_statuses(snapshot: StoreSnapshot, cfg: TranslatorConfig, use: BackendTLSUse,
                          statuses: dict[ObjectKey, ObjectStatus]
                          ) -> dict[ObjectKey, ObjectStatus]:
    """A BackendTLSPolicy's status has an entry per Gateway whose routes use the Services
    it targets (as the routes' `statuses` say): Accepted (or Conflicted, or no valid CA)
    and ResolvedRefs."""
    out: dict[ObjectKey, ObjectStatus] = {}
    for policy, users in use.users:
        gen = policy.obj.generation
        gateways: set[tuple[str, str]] = set()
        for user in users:
            user_status = statuses.get(user)
            parents = user_status.parents if isinstance(user_status, RouteStatus) else []
            for parent in parents:
                ref = parent.ref
                if parent.conditions.true(Type.ACCEPTED) and ref.kind == "Gateway":
                    gateways.add((ref.namespace, ref.name))
        if not gateways:
            continue
        _, problem = backend_tls_ca(snapshot, policy)
        if problem is not None:
            conds = [condition(Type.ACCEPTED, False, Reason.NO_VALID_CA_CERTIFICATE,
                               problem[1], gen),
                     condition(Type.RESOLVED_REFS, False, problem[0], problem[1], gen)]
        elif policy.obj.key not in use.applied:
            msg = "an older or more specific policy targets the same Service port"
            conds = [condition(Type.ACCEPTED, False, Reason.CONFLICTED, msg, gen),
                     condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                               "references resolved", gen)]
        else:
            conds = [condition(Type.ACCEPTED, True, Reason.ACCEPTED, "policy applied", gen),
                     condition(Type.RESOLVED_REFS, True, Reason.RESOLVED_REFS,
                               "references resolved", gen)]
        out[policy.obj.key] = PolicyStatus([
            ParentStatus(model.ParentRef(GATEWAY_GROUP, "Gateway", ns, name),
                         cfg.controller_name, Conditions(conds))
            for ns, name in sorted(gateways)])
    return out


def _traffic_policy_statuses(snapshot: StoreSnapshot, cfg: TranslatorConfig,
                             policies: PolicyIndex, statuses: Mapping[ObjectKey, ObjectStatus]
                             ) -> dict[ObjectKey, ObjectStatus]:
    """Each TrafficPolicy's status, and the `statuses` of the targets it applies to (a
    Gateway or ListenerSet, or a route's parents) with the condition that says so."""
    if not policies and not policies.invalid and not policies.backend_invalid:
        return {}
    own = policies.status(cfg.controller_name)
    out: dict[ObjectKey, ObjectStatus] = dict(own)
    by_target: dict[ObjectKey, list[str]] = {}
    for p in policies.policies:
        if not any(a.conditions.true(Type.ACCEPTED) for a in own[p.obj.key].ancestors):
            continue
        for t in p.targets:
            key = ObjectKey(t.group, t.kind, p.obj.namespace, t.name)
            by_target.setdefault(key, []).append(f"{p.obj.namespace}/{p.obj.name}")
    for key, names in by_target.items():
        target = statuses.get(key)
        obj = snapshot.get(GroupKind(key.group, key.kind), key.namespace, key.name)
        gen = obj.generation if obj is not None else 0
        # Copies: a route's status is also its outcome kept for the next translation.
        if isinstance(target, GatewayStatus):
            conds = Conditions(target.conditions)
            affected(conds, names, gen)
            out[key] = replace(target, conditions=conds)
        elif isinstance(target, RouteStatus):
            parents = []
            for parent in target.parents:
                if parent.conditions.true(Type.ACCEPTED):
                    pconds = Conditions(parent.conditions)
                    affected(pconds, names, gen)
                    parent = replace(parent, conditions=pconds)
                parents.append(parent)
            out[key] = replace(target, parents=parents)
    return out
