"""Status as the translator says it: typed conditions and object statuses.

Condition types and reasons carry the names the Gateway API specification gives them (its Go
constants: `RouteReasonNotAllowedByListeners` is `Reason.NOT_ALLOWED_BY_LISTENERS` here). The
translator is pure, so it leaves `lastTransitionTime` out, and `Programmed` too where it
depends on what the sinks did: the status sink adds both. `to_kubernetes()` gives the
`.status` object as the API has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mesh.translate.model import ParentRef, is_ip


class Type:
    ACCEPTED = "Accepted"
    PROGRAMMED = "Programmed"
    RESOLVED_REFS = "ResolvedRefs"
    CONFLICTED = "Conflicted"
    SUPPORTED_VERSION = "SupportedVersion"
    INSECURE_FRONTEND_VALIDATION_MODE = "InsecureFrontendValidationMode"


class Reason:
    # Shared by several kinds
    ACCEPTED = "Accepted"
    PROGRAMMED = "Programmed"
    RESOLVED_REFS = "ResolvedRefs"
    INVALID = "Invalid"
    PENDING = "Pending"
    NO_CONFLICTS = "NoConflicts"
    UNSUPPORTED_VALUE = "UnsupportedValue"
    # GatewayClass
    SUPPORTED_VERSION = "SupportedVersion"
    # Gateway
    LISTENERS_NOT_VALID = "ListenersNotValid"
    INVALID_PARAMETERS = "InvalidParameters"
    UNSUPPORTED_ADDRESS = "UnsupportedAddress"
    ADDRESS_NOT_ASSIGNED = "AddressNotAssigned"
    ADDRESS_NOT_USABLE = "AddressNotUsable"
    INVALID_CLIENT_CERTIFICATE_REF = "InvalidClientCertificateRef"
    CONFIGURATION_CHANGED = "ConfigurationChanged"
    # Listener
    UNSUPPORTED_PROTOCOL = "UnsupportedProtocol"
    PROTOCOL_CONFLICT = "ProtocolConflict"
    HOSTNAME_CONFLICT = "HostnameConflict"
    PORT_UNAVAILABLE = "PortUnavailable"
    INVALID_CERTIFICATE_REF = "InvalidCertificateRef"
    INVALID_ROUTE_KINDS = "InvalidRouteKinds"
    INVALID_CA_CERTIFICATE_REF = "InvalidCACertificateRef"
    INVALID_CA_CERTIFICATE_KIND = "InvalidCACertificateKind"
    NOT_ALLOWED = "NotAllowed"  # ListenerSet not allowed by its Gateway
    # Route
    NOT_ALLOWED_BY_LISTENERS = "NotAllowedByListeners"
    NO_MATCHING_LISTENER_HOSTNAME = "NoMatchingListenerHostname"
    NO_MATCHING_PARENT = "NoMatchingParent"
    REF_NOT_PERMITTED = "RefNotPermitted"
    INVALID_KIND = "InvalidKind"
    BACKEND_NOT_FOUND = "BackendNotFound"
    # Policy
    CONFLICTED = "Conflicted"
    TARGET_NOT_FOUND = "TargetNotFound"
    NO_VALID_CA_CERTIFICATE = "NoValidCACertificate"


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str
    observed_generation: int

    def to_kubernetes(self) -> dict[str, Any]:
        return {"type": self.type, "status": "True" if self.status else "False",
                "reason": self.reason, "message": self.message,
                "observedGeneration": self.observed_generation}


def condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Condition:
    return Condition(type_, ok, reason, message, generation)


def policy_accepted(generation: int, refused: str | None, problems: tuple[str, ...],
                    accepted: str) -> ClassStatus:
    """A network policy's status: Accepted False/Invalid when refused (`refused`: why and what
    is done instead), False/UnsupportedValue when parts of it fail closed (`problems`), else
    True with `accepted`."""
    if refused is not None:
        c = condition(Type.ACCEPTED, False, Reason.INVALID, refused, generation)
    elif problems:
        c = condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE,
                      "; ".join(problems)[:1024], generation)
    else:
        c = condition(Type.ACCEPTED, True, Reason.ACCEPTED, accepted, generation)
    return ClassStatus(Conditions([c]))


class Conditions(list[Condition]):
    """A condition list, at most one condition per type."""

    def find(self, type_: str) -> Condition | None:
        return next((c for c in self if c.type == type_), None)

    def has(self, type_: str) -> bool:
        return any(c.type == type_ for c in self)

    def true(self, type_: str) -> bool:
        c = self.find(type_)
        return c is not None and c.status

    def put(self, new: Condition) -> None:
        """Set a condition, replacing one of the same type."""
        for i, c in enumerate(self):
            if c.type == new.type:
                self[i] = new
                return
        self.append(new)

    def to_kubernetes(self) -> list[dict[str, Any]]:
        return [c.to_kubernetes() for c in self]


def _conditions(items: Any = ()) -> Conditions:
    return Conditions(items)


@dataclass
class ClassStatus:
    """A GatewayClass's or an IngressClass's status."""

    conditions: Conditions = field(default_factory=_conditions)

    def to_kubernetes(self) -> dict[str, Any]:
        return {"conditions": self.conditions.to_kubernetes()}


@dataclass
class ListenerStatus:
    name: str
    supported_kinds: tuple[tuple[str, str], ...]  # (group, kind)
    attached_routes: int = 0
    conditions: Conditions = field(default_factory=_conditions)

    def to_kubernetes(self) -> dict[str, Any]:
        return {"name": self.name,
                "supportedKinds": [{"group": g, "kind": k} for g, k in self.supported_kinds],
                "attachedRoutes": self.attached_routes,
                "conditions": self.conditions.to_kubernetes()}


@dataclass
class GatewayStatus:
    """A Gateway's or a ListenerSet's status (a ListenerSet has no addresses and no count
    of ListenerSets)."""

    conditions: Conditions = field(default_factory=_conditions)
    # None: refused before its listeners were looked at (the status lists none)
    listeners: list[ListenerStatus] | None = field(default_factory=list)
    addresses: tuple[str, ...] | None = None  # IP addresses; None: not a Gateway's status
    attached_listener_sets: int | None = None

    def to_kubernetes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.addresses is not None:
            out["addresses"] = [{"type": "IPAddress" if is_ip(a) else "Hostname", "value": a}
                                for a in self.addresses]
        out["conditions"] = self.conditions.to_kubernetes()
        if self.listeners is not None:
            out["listeners"] = [li.to_kubernetes() for li in self.listeners]
        if self.attached_listener_sets is not None:
            out["attachedListenerSets"] = self.attached_listener_sets
        return out


@dataclass
class ParentStatus:
    """One parent's (or ancestor's) part of a route's or a policy's status."""

    ref: ParentRef  # the parentRef / ancestorRef
    controller_name: str
    conditions: Conditions = field(default_factory=_conditions)

    def to_kubernetes(self, ref_field: str) -> dict[str, Any]:
        return {ref_field: self.ref.describe(), "controllerName": self.controller_name,
                "conditions": self.conditions.to_kubernetes()}


@dataclass
class RouteStatus:
    parents: list[ParentStatus] = field(default_factory=list)

    def to_kubernetes(self) -> dict[str, Any]:
        return {"parents": [p.to_kubernetes("parentRef") for p in self.parents]}


@dataclass
class PolicyStatus:
    ancestors: list[ParentStatus] = field(default_factory=list)

    def to_kubernetes(self) -> dict[str, Any]:
        return {"ancestors": [p.to_kubernetes("ancestorRef") for p in self.ancestors]}


@dataclass
class IngressStatus:
    addresses: tuple[str, ...] = ()
    # What was refused or ignored: annotations not supported, bad values, a canary with no
    # main Ingress. The API's Ingress status has no conditions (ingress-nginx says these
    # in Events), so they stay out of `to_kubernetes()`: see `events()`.
    warnings: tuple[str, ...] = ()

    def to_kubernetes(self) -> dict[str, Any]:
        return {"loadBalancer": {"ingress": [{"ip": a} for a in self.addresses]}}

    def events(self) -> list[dict[str, Any]]:
        """The warnings in the shape of core Events (type, reason, message), for the status
        file to show beside the Ingress."""
        return [{"type": "Warning", "reason": "NotApplied", "message": w}
                for w in self.warnings]


ObjectStatus = ClassStatus | GatewayStatus | RouteStatus | PolicyStatus | IngressStatus


def with_programmed(status: ObjectStatus, ok: bool, reason: str, message: str,
                    generation: int) -> ObjectStatus:
    """A copy of `status` with Programmed as the sinks say: on a Gateway (unless the
    translator said why it cannot be programmed) and its listeners (the same), on each parent
    that accepted a route. Other kinds have no Programmed condition."""
    programmed = Condition(Type.PROGRAMMED, ok, reason, message, generation)
    if isinstance(status, GatewayStatus):
        conds = Conditions(status.conditions)
        if not conds.has(Type.PROGRAMMED):
            conds.put(programmed)
        if status.listeners is None:
            return replace(status, conditions=conds)
        listeners = []
        for li in status.listeners:
            lconds = Conditions(li.conditions)
            valid = lconds.true(Type.ACCEPTED)
            # The translator's Programmed stands: it says why the listener is not served
            # (not accepted, or accepted with a reference that does not resolve).
            if not lconds.has(Type.PROGRAMMED):
                lconds.put(programmed if valid else Condition(
                    Type.PROGRAMMED, False, Reason.INVALID, "listener not accepted",
                    generation))
            listeners.append(replace(li, conditions=lconds))
        return replace(status, conditions=conds, listeners=listeners)
    if isinstance(status, RouteStatus):
        parents = []
        for p in status.parents:
            pconds = Conditions(p.conditions)
            if pconds.true(Type.ACCEPTED):
                pconds.put(programmed)
            parents.append(replace(p, conditions=pconds))
        return replace(status, parents=parents)
    return status
