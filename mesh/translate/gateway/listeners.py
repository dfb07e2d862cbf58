"""Phase 2: listeners, the Gateways' own and those ListenerSets add. Which ListenerSets a
Gateway takes, and for each listener whether it is valid (protocol, route kinds, TLS
certificates, client certificate validation, conflicts with the listeners before it on its
port) and what it serves TLS with. What made a listener invalid is kept as conditions for
the status phase."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh import ir
from mesh.store import kinds
from mesh.store.kinds import GATEWAY_GROUP, GroupKind
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model
from mesh.translate.gateway.gateways import Gateways
from mesh.translate.gateway.references import References, certificate_secret
from mesh.translate.route_builder import RouteBuilder
from mesh.translate.status import Condition, Conditions, Reason, Type, condition

# Route kinds a listener protocol accepts, in the order status lists them.
KINDS_FOR_PROTOCOL: dict[str, tuple[str, ...]] = {
    "HTTP": ("HTTPRoute", "GRPCRoute"),
    "HTTPS": ("HTTPRoute", "GRPCRoute"),
    "TLS": ("TLSRoute",),
    "TCP": ("TCPRoute",),
    "UDP": ("UDPRoute",),
}
# Protocols that may share a port (they are told apart by SNI).
_PORT_FAMILY = {"HTTP": "http", "HTTPS": "tls", "TLS": "tls", "TCP": "tcp", "UDP": "udp"}


@dataclass(frozen=True)
class Listener:
    """A Gateway's or a ListenerSet's listener, validated."""

    spec: model.Listener
    gateway: model.Gateway
    owner: KubeObject  # the Gateway or the ListenerSet that declares it
    supported_kinds: tuple[str, ...]
    valid: bool
    conditions: tuple[Condition, ...]  # what validation found; the status phase adds the rest
    certificates: tuple[str, ...] = ()
    client_validation: ir.ClientValidation | None = None
    # Accepted (routes attach and are counted) but not served: a reference it needs does not
    # resolve (a certificate Secret missing or not granted).
    unresolved: bool = False

    @property
    def key(self) -> str:
        return f"{self.owner.kind}/{self.owner.namespace}/{self.owner.name}/{self.spec.name}"


@dataclass(frozen=True)
class ListenerSet:
    """A ListenerSet whose parent is one of our Gateways, or that does not parse."""

    obj: KubeObject
    parent: ObjectKey | None  # the Gateway that takes it; None: refused
    refused: tuple[Condition, ...] = ()  # why it is refused


@dataclass(frozen=True)
class Listeners:
    # The Gateways' own, in their order, then the ListenerSets' (oldest set first).
    listeners: tuple[Listener, ...]
    listener_sets: tuple[ListenerSet, ...]  # oldest first
    trust_bundles: Mapping[str, bytes]  # name -> CA certificates (PEM) to validate clients


@dataclass
class _Draft:
    """A listener while it is being validated (within this phase only)."""

    spec: model.Listener
    gateway: model.Gateway
    owner: KubeObject
    supported_kinds: tuple[str, ...]
    conditions: Conditions = field(default_factory=Conditions)
    valid: bool = True
    certificates: tuple[str, ...] = ()
    client_validation: ir.ClientValidation | None = None
    unresolved: bool = False

    def done(self) -> Listener:
        return Listener(self.spec, self.gateway, self.owner, self.supported_kinds, self.valid,
                        tuple(self.conditions), self.certificates, self.client_validation,
                        self.unresolved)


def validate_listeners(snapshot: StoreSnapshot, refs: References, routes: RouteBuilder,
                       gws: Gateways) -> Listeners:
    """`routes` is given the certificates the listeners serve (they go into the IR)."""
    trust_bundles: dict[str, bytes] = {}
    by_gateway = {(g.obj.namespace, g.obj.name): g.spec for g in gws.gateways}
    drafts: list[_Draft] = []
    for gw in gws.gateways:
        drafts += [_listener(refs, routes, trust_bundles, x, gw.spec, gw.obj)
                   for x in gw.spec.listeners]
    # ListenerSets join their parent's listeners, after them and oldest first.
    sets = []
    for obj in sorted(snapshot.of_kind(kinds.LISTENER_SET, kinds.X_LISTENER_SET),
                      key=lambda o: (o.created, o.namespace, o.name)):
        found = _listener_set(refs, obj, by_gateway)
        if found is None:
            continue
        ls, parsed = found
        sets.append(ls)
        if parsed is not None:
            g = by_gateway[(parsed.parent.namespace, parsed.parent.name)]
            drafts += [_listener(refs, routes, trust_bundles, x, g, obj)
                       for x in parsed.listeners]
    _conflicts(drafts)
    return Listeners(tuple(d.done() for d in drafts), tuple(sets), trust_bundles)


def _listener_set(refs: References, obj: KubeObject,
                  gateways: dict[tuple[str, str], model.Gateway]
                  ) -> tuple[ListenerSet, model.ListenerSet | None] | None:
    """The ListenerSet's standing (None: its parent is not ours, not ours to report on),
    and its listeners when its Gateway takes it."""
    try:
        ls = model.parse_listener_set(obj)
    except model.Invalid as e:
        return ListenerSet(obj, None, (condition(Type.ACCEPTED, False, Reason.INVALID, str(e),
                                                 obj.generation),)), None
    g = gateways.get((ls.parent.namespace, ls.parent.name))
    if g is None:
        return None
    if not refs.namespace_allowed(g.allowed_listener_sets_from,
                                  g.allowed_listener_sets_selector, g.obj.namespace,
                                  obj.namespace):
        msg = f"Gateway {g.obj.namespace}/{g.obj.name} does not allow ListenerSets from " \
              f"namespace {obj.namespace}"
        return ListenerSet(obj, None, (
            condition(Type.ACCEPTED, False, Reason.NOT_ALLOWED, msg, obj.generation),
            condition(Type.PROGRAMMED, False, Reason.NOT_ALLOWED, msg, obj.generation))), None
    return ListenerSet(obj, g.obj.key), ls


def _listener(refs: References, routes: RouteBuilder, trust_bundles: dict[str, bytes],
              spec: model.Listener, g: model.Gateway, owner: KubeObject) -> _Draft:
    default = KINDS_FOR_PROTOCOL.get(spec.protocol, ())
    if spec.allowed_kinds is None:
        route_kinds = default
    else:
        route_kinds = tuple(k.kind for k in spec.allowed_kinds
                            if k.group == GATEWAY_GROUP and k.kind in default)
    li = _Draft(spec, g, owner, route_kinds)
    conds = li.conditions
    gen = owner.generation
    if spec.protocol not in KINDS_FOR_PROTOCOL:
        li.valid = False
        conds.append(condition(Type.ACCEPTED, False, Reason.UNSUPPORTED_PROTOCOL,
                               f"protocol {spec.protocol} is not supported", gen))
    if spec.allowed_kinds is not None and len(route_kinds) != len(spec.allowed_kinds):
        bad = [f"{k.group}/{k.kind}" for k in spec.allowed_kinds
               if k.kind not in route_kinds]
        # The supported kinds still attach; only a listener left with none is invalid.
        li.valid = bool(route_kinds)
        conds.append(condition(Type.RESOLVED_REFS, False, Reason.INVALID_ROUTE_KINDS,
                               f"route kinds not supported here: {', '.join(bad)}", gen))
    if spec.protocol in ("HTTPS", "TLS"):
        _tls(refs, routes, trust_bundles, li)
    return li


def _tls(refs: References, routes: RouteBuilder, trust_bundles: dict[str, bytes],
         li: _Draft) -> None:
    spec, gen = li.spec, li.owner.generation
    if spec.protocol == "HTTPS" and spec.tls_mode == "Passthrough":
        li.valid = False
        li.conditions.append(condition(
            Type.ACCEPTED, False, Reason.UNSUPPORTED_VALUE,
            "HTTPS listeners terminate TLS; use a TLS listener for passthrough", gen))
        return
    if spec.tls_mode == "Passthrough":
        return
    if not spec.certificate_refs:
        li.valid = False
        li.conditions.append(condition(
            Type.RESOLVED_REFS, False, Reason.INVALID_CERTIFICATE_REF,
            "a listener that terminates TLS needs certificateRefs", gen))
        return
    certs = []
    for ref in spec.certificate_refs:
        found = certificate_secret(refs, routes, ref, li.owner, "certificateRef",
                                   Reason.INVALID_CERTIFICATE_REF)
        if isinstance(found, tuple):
            # Still accepted (its routes attach, as the specification counts them), but
            # not served without its certificate.
            li.unresolved = True
            li.conditions.append(condition(Type.RESOLVED_REFS, False, found[0], found[1], gen))
            li.conditions.append(condition(Type.PROGRAMMED, False, Reason.INVALID,
                                           f"not served: {found[1]}", gen))
            return
        certs.append(found)
    li.certificates = tuple(certs)
    if spec.protocol == "HTTPS":
        _client_validation(refs, trust_bundles, li)


def _client_validation(refs: References, trust_bundles: dict[str, bytes], li: _Draft) -> None:
    """Client certificate validation for an HTTPS listener, from its Gateway's
    spec.tls.frontend (its port's entry, or the default). References that do not
    resolve are reported; with none usable the listener is not served at all rather
    than served without the validation it asks for."""
    g, gen = li.gateway, li.owner.generation
    validation = g.validation_for(li.spec.port)
    if validation is None:
        return
    bundle = b""
    problems: list[tuple[str, str]] = []
    for ref in validation.ca_refs:
        where = f"{ref.kind} {ref.namespace}/{ref.name}"
        if ref.group != "" or ref.kind not in ("ConfigMap", "Secret"):
            problems.append((Reason.INVALID_CA_CERTIFICATE_KIND, f"caCertificateRef {where}: "
                             "only ConfigMaps and Secrets can hold CA certificates"))
            continue
        if ref.namespace != g.obj.namespace and not refs.granted(
                "Gateway", g.obj.namespace, "", ref.kind, ref.namespace, ref.name):
            problems.append((Reason.REF_NOT_PERMITTED, f"caCertificateRef {where}: no "
                             f"ReferenceGrant in {ref.namespace} allows it"))
            continue
        obj = refs.snapshot.get(GroupKind("", ref.kind), ref.namespace, ref.name)
        data = model.ca_certificates(obj)
        if obj is None:
            problems.append((Reason.INVALID_CA_CERTIFICATE_REF,
                             f"caCertificateRef {where} does not exist"))
        elif data is None:
            problems.append((Reason.INVALID_CA_CERTIFICATE_REF,
                             f"caCertificateRef {where} holds no CA certificate in ca.crt"))
        else:
            bundle += data
    conds = li.conditions
    if problems:
        conds.append(condition(Type.RESOLVED_REFS, False, problems[0][0],
                               "; ".join(p[1] for p in problems), gen))
    if not bundle:
        li.valid = False
        conds.append(condition(Type.ACCEPTED, False, Reason.NO_VALID_CA_CERTIFICATE,
                               "no usable CA certificate to validate clients with"
                               if validation.ca_refs else "caCertificateRefs is empty",
                               gen))
        return
    name = f"ca/{g.obj.namespace}/{g.obj.name}/{li.spec.port}"
    trust_bundles[name] = bundle
    li.client_validation = ir.ClientValidation(
        name, allow_insecure=validation.mode == "AllowInsecureFallback")


def _conflicts(listeners: list[_Draft]) -> None:
    """Conflicts between listeners of one Gateway: the earlier listener wins."""
    seen: dict[tuple[str, str, int], list[_Draft]] = {}  # by Gateway, transport, port
    for li in listeners:
        gkey = f"{li.gateway.obj.namespace}/{li.gateway.obj.name}"
        seen.setdefault((gkey, li.spec.transport, li.spec.port), []).append(li)
    for group in seen.values():
        first_family = None
        hostnames_seen: set[tuple[str, str | None]] = set()
        for li in group:
            family = _PORT_FAMILY.get(li.spec.protocol)
            if family is None:
                continue
            if first_family is None and li.spec.protocol in KINDS_FOR_PROTOCOL:
                first_family = family  # a protocol not served claims no port
            if first_family is not None and family != first_family:
                _conflicted(li, Reason.PROTOCOL_CONFLICT,
                            f"port {li.spec.port} is already used with another protocol")
                continue
            if li.spec.protocol not in KINDS_FOR_PROTOCOL:
                continue
            # TCP and UDP listeners have no hostname to tell them apart (one is ignored).
            host_key = (family, None if family in ("tcp", "udp") else li.spec.hostname)
            if host_key in hostnames_seen:
                _conflicted(li, Reason.HOSTNAME_CONFLICT, (
                    f"another {li.spec.protocol} listener has port {li.spec.port}: nothing "
                    "tells their traffic apart") if family in ("tcp", "udp") else (
                    f"another listener on port {li.spec.port} has hostname "
                    f"{li.spec.hostname or '(none)'}"))
                continue
            hostnames_seen.add(host_key)


def _conflicted(li: _Draft, reason: str, message: str) -> None:
    """A listener that loses a conflict: not accepted, conflicted, not programmed."""
    gen = li.owner.generation
    li.valid = False
    li.conditions[:] = [c for c in li.conditions if c.type != Type.ACCEPTED]
    li.conditions += [condition(Type.ACCEPTED, False, reason, message, gen),
                      condition(Type.CONFLICTED, True, reason, message, gen),
                      condition(Type.PROGRAMMED, False, reason, message, gen)]
