"""References across objects as the Gateway API allows them: ReferenceGrants, namespace
selectors (which routes and ListenerSets a Gateway takes), and certificate Secrets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.store import kinds
from mesh.store.kinds import GATEWAY_GROUP
from mesh.store.objects import KubeObject
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.route_builder import RouteBuilder
from mesh.translate.status import Reason


@dataclass(frozen=True)
class References:
    """What the snapshot says about who may refer to what."""

    snapshot: StoreSnapshot
    grants: tuple[model.ReferenceGrant, ...]
    namespaces: Mapping[str, Mapping[str, str]]  # name -> labels

    @classmethod
    def of(cls, snapshot: StoreSnapshot, grants: tuple[model.ReferenceGrant, ...]
           ) -> References:
        return cls(snapshot, grants,
                   {o.name: o.labels for o in snapshot.of_kind(kinds.NAMESPACE)})

    def granted(self, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str,
                to_name: str) -> bool:
        return any(g.namespace == to_ns and g.permits(GATEWAY_GROUP, from_kind, from_ns,
                                                      to_group, to_kind, to_name)
                   for g in self.grants)

    def namespace_allowed(self, from_: str, selector: Mapping[str, Any], own_ns: str,
                          route_ns: str) -> bool:
        if from_ == "All":
            return True
        if from_ == "Same":
            return route_ns == own_ns
        if from_ == "Selector":
            # The API server labels every namespace with its own name.
            labels = {**self.namespaces.get(route_ns, {}),
                      "kubernetes.io/metadata.name": route_ns}
            return _selects(selector, labels)
        return False


def certificate_secret(refs: References, routes: RouteBuilder, ref: model.BackendObjectRef,
                       referrer: KubeObject, field: str, invalid: str) -> str | tuple[str, str]:
    """The certificate in the Secret `ref` names (registered with the route builder, which
    gives the IR its certificates), or (reason, message) why it cannot be used: `invalid`
    for what is not a usable Secret, RefNotPermitted without a ReferenceGrant from
    `referrer`."""
    where = f"Secret {ref.namespace}/{ref.name}"
    if ref.group != "" or ref.kind != "Secret":
        return invalid, f"{field} {ref.group or 'core'}/{ref.kind} {ref.name} is not " \
            "a Secret"
    if ref.namespace != referrer.namespace and not refs.granted(
            referrer.kind, referrer.namespace, "", "Secret", ref.namespace, ref.name):
        return Reason.REF_NOT_PERMITTED, f"{field} {where}: no ReferenceGrant in " \
            f"{ref.namespace} allows it"
    secret = refs.snapshot.get(kinds.SECRET, ref.namespace, ref.name)
    if secret is None:
        return invalid, f"{field} {where} does not exist"
    name = routes.certificate(secret)
    if name is None:
        return invalid, f"{field} {where} holds no valid tls.crt and tls.key"
    return name


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions). A selector of the
    wrong shape selects nothing: it fails closed."""
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not isinstance(match_labels, Mapping) or not isinstance(expressions, list):
        return False
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    for expr in expressions:
        if not isinstance(expr, Mapping):
            return False
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list):
            return False
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
