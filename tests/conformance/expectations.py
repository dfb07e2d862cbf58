"""Status expectations of the conformance tests that hold no request case.

The data has only their manifests; what their status must say comes from the Gateway API
specification (conditions and reasons of routes' parents and of Gateway listeners). Each
entry is checked against `mesh status` once the test's manifests are applied, within the
same 30 seconds as a case.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INFRA = "gateway-conformance-infra"


@dataclass(frozen=True)
class Expect:
    kind: str
    name: str
    namespace: str = INFRA
    parent: str | None = None  # routes: the parent Gateway's name
    listener: str | None = None  # Gateways: the listener's name
    condition: str | None = None
    status: str = "True"
    reason: str | None = None
    attached: int | None = None  # listeners: attachedRoutes
    supported: tuple[str, ...] | None = None  # listeners: supportedKinds
    generation: int | None = None  # the object's metadata.generation
    addresses_as_spec: bool = False  # Gateways: status.addresses are the spec's, in order
    listener_sets: int | None = None  # Gateways: status.attachedListenerSets

    def describe(self) -> str:
        where = f" parent {self.parent}" if self.parent else (
            f" listener {self.listener}" if self.listener else "")
        what = f"{self.condition}={self.status}" + (f" ({self.reason})" if self.reason else "")
        if self.attached is not None:
            what = f"attachedRoutes={self.attached}"
        if self.supported is not None:
            what = f"supportedKinds={list(self.supported)}"
        if self.addresses_as_spec:
            what = "status.addresses as in spec" + (f", {what}" if self.condition else "")
        if self.listener_sets is not None:
            what = f"attachedListenerSets={self.listener_sets}"
        return f"{self.kind} {self.namespace}/{self.name}{where}: {what}"

    def check(self, item: dict[str, Any] | None) -> str | None:
        """None when `item` (an object from `mesh status -o json`) meets it, else why not."""
        if item is None or not item.get("status"):
            return "no status"
        if self.generation is not None and item["metadata"].get("generation") != \
                self.generation:
            return f"generation is {item['metadata'].get('generation')}"
        st = item["status"]
        if self.listener_sets is not None and \
                st.get("attachedListenerSets") != self.listener_sets:
            return f"attachedListenerSets is {st.get('attachedListenerSets')}"
        if self.addresses_as_spec:
            want = [a.get("value") for a in item["spec"].get("addresses") or []]
            got = [a.get("value") for a in st.get("addresses") or []]
            if got != want or any(a.get("type") != "IPAddress" for a in st["addresses"]):
                return f"status.addresses are {st.get('addresses')}, not {want}"
        conds: list[dict[str, Any]] = []
        if self.parent is not None:
            # Routes list their parents; policies their ancestors.
            parent = next((p for p in st.get("parents", []) + st.get("ancestors", [])
                           if (p.get("parentRef") or p.get("ancestorRef"))["name"]
                           == self.parent), None)
            if parent is None:
                return f"no status for parent {self.parent}"
            conds = parent["conditions"]
        elif self.listener is not None:
            li = next((x for x in st.get("listeners", []) if x["name"] == self.listener), None)
            if li is None:
                return f"no status for listener {self.listener}"
            if self.attached is not None and li["attachedRoutes"] != self.attached:
                return f"attachedRoutes is {li['attachedRoutes']}"
            if self.supported is not None:
                # As upstream: the expected kinds must be there (an implementation may
                # support more); expecting none means none.
                kinds = tuple(k["kind"] for k in li["supportedKinds"])
                if (not self.supported and kinds) or not set(self.supported) <= set(kinds):
                    return f"supportedKinds is {list(kinds)}"
            conds = li["conditions"]
        else:
            conds = st.get("conditions", [])
        if self.condition is None:
            return None
        c = next((c for c in conds if c["type"] == self.condition), None)
        if c is None:
            return f"no {self.condition} condition"
        if c["status"] != self.status or (self.reason and c["reason"] != self.reason):
            return f"{self.condition} is {c['status']} ({c['reason']}: {c['message']})"
        if c.get("observedGeneration") != item["metadata"].get("generation"):
            return f"{self.condition} observedGeneration {c.get('observedGeneration')} is " \
                f"not generation {item['metadata'].get('generation')}"
        return None


def _route(name: str, parent: str, reason: str, kind: str = "HTTPRoute",
           namespace: str = INFRA) -> Expect:
    return Expect(kind, name, namespace, parent=parent, condition="Accepted", status="False",
                  reason=reason)


def _listener_conditions(gateway: str, listener: str, unresolved: str | None = None,
                         kind: str = "Gateway") -> list[Expect]:
    """A listener's ResolvedRefs, Accepted and Programmed: all True, or, with a CA
    reference that does not resolve, False with that reason and NoValidCACertificate."""
    if unresolved is None:
        return [Expect(kind, gateway, listener=listener, condition=c)
                for c in ("ResolvedRefs", "Accepted", "Programmed")]
    return [Expect(kind, gateway, listener=listener, condition="ResolvedRefs",
                   status="False", reason=unresolved),
            Expect(kind, gateway, listener=listener, condition="Accepted",
                   status="False", reason="NoValidCACertificate"),
            Expect(kind, gateway, listener=listener, condition="Programmed",
                   status="False")]


_LS_GW = "gateway-with-listenerset-protocol-conflict"
_LS_PC = "listenerset-with-protocol-conflict-with"


def _listener_set(name: str, accepted: bool, listeners: dict[str, bool]) -> list[Expect]:
    """A ListenerSet's own conditions, and each listener's: all True, or conflicted."""
    out = [Expect("ListenerSet", name, condition="Accepted", reason="Accepted"),
           Expect("ListenerSet", name, condition="Programmed", reason="Programmed")] \
        if accepted else [Expect("ListenerSet", name, condition=c, status="False",
                                 reason="ListenersNotValid") for c in ("Accepted", "Programmed")]
    for listener, ok in listeners.items():
        if ok:
            out += _listener_conditions(name, listener, kind="ListenerSet")
        else:
            out += [Expect("ListenerSet", name, listener=listener, condition=c,
                           status="True" if c == "Conflicted" else "False",
                           reason="ProtocolConflict")
                    for c in ("Accepted", "Programmed", "Conflicted")]
    return out


EXPECTATIONS: dict[str, list[Expect]] = {
    "httproute-invalid-cross-namespace-parent-ref": [
        _route("invalid-cross-namespace-parent-ref", "same-namespace", "NotAllowedByListeners",
               namespace="gateway-conformance-web-backend")],
    "httproute-invalid-parentref-not-matching-listener-port": [
        _route("httproute-listener-not-matching-route-port", "same-namespace",
               "NoMatchingParent")],
    "httproute-invalid-parentref-not-matching-section-name": [
        _route("httproute-listener-not-matching-section-name", "same-namespace",
               "NoMatchingParent")],
    "httproute-invalid-parentref-section-name-not-matching-port": [
        _route("httproute-listener-section-name-not-matching-port",
               "gateway-with-one-not-matching-port-and-section-name-route", "NoMatchingParent")],
    "httproute-disallowed-kind": [
        _route("disallowed-kind", "tlsroutes-only", "NotAllowedByListeners")],
    "gateway-invalid-route-kind": [
        Expect("Gateway", "gateway-only-invalid-route-kind", listener="http",
               condition="ResolvedRefs", status="False", reason="InvalidRouteKinds"),
        Expect("Gateway", "gateway-only-invalid-route-kind", listener="http", supported=()),
        Expect("Gateway", "gateway-supported-and-invalid-route-kind", listener="http",
               condition="ResolvedRefs", status="False", reason="InvalidRouteKinds"),
        Expect("Gateway", "gateway-supported-and-invalid-route-kind", listener="http",
               supported=("HTTPRoute",)),
    ],
    "gateway-invalid-listeners-unsupported-protocol": [
        Expect("Gateway", "gateway-only-unsupported-protocols", listener="invalid",
               condition="Accepted", status="False", reason="UnsupportedProtocol"),
        Expect("Gateway", "gateway-supported-and-unsupported-protocols", listener="invalid",
               condition="Accepted", status="False", reason="UnsupportedProtocol"),
        Expect("Gateway", "gateway-supported-and-unsupported-protocols", listener="http",
               condition="Accepted"),
    ],
    "gateway-with-attached-routes": [
        Expect("Gateway", "gateway-with-one-attached-route", listener="http", attached=1),
        Expect("Gateway", "gateway-with-two-attached-routes", listener="http", attached=2),
        _route("http-route-not-accepted", "gateway-with-two-attached-routes",
               "NoMatchingListenerHostname"),
    ],
    "tlsroute-invalid-no-matching-listener": [
        _route("tlsroute-not-allowed-protocol-http", "gateway-tlsroute-http-only",
               "NotAllowedByListeners", kind="TLSRoute"),
        _route("tlsroute-not-allowed-protocol-https", "gateway-tlsroute-https-only",
               "NotAllowedByListeners", kind="TLSRoute"),
        _route("tlsroute-no-matching-section-name", "gateway-tlsroute-tls-passthrough-only",
               "NoMatchingParent", kind="TLSRoute"),
    ],
    "tlsroute-invalid-no-matching-listener-hostname": [
        _route("tlsroute-hostname-mismatch-1", "gateway-tls-exact-hostname",
               "NoMatchingListenerHostname", kind="TLSRoute"),
        _route("tlsroute-hostname-mismatch-2", "gateway-tls-wildcard-hostname",
               "NoMatchingListenerHostname", kind="TLSRoute"),
    ],
    "tlsroute-invalid-backendref-nonexistent": [
        Expect("TLSRoute", "invalid-backend-ref-nonexistent",
               parent="gateway-tlsroute-invalid-backend-ref-nonexistent",
               condition="ResolvedRefs", status="False", reason="BackendNotFound")],
    "tlsroute-invalid-backendref-unknown-kind": [
        Expect("TLSRoute", "invalid-backend-ref-unknown-kind",
               parent="gateway-tlsroute-invalid-backend-ref-unknown-kind",
               condition="ResolvedRefs", status="False", reason="InvalidKind")],
    "tlsroute-invalid-reference-grant": [
        Expect("TLSRoute", "gateway-conformance-infra-test",
               parent="gateway-tlsroute-referencegrant", condition="ResolvedRefs",
               status="False", reason="RefNotPermitted")],
    "tlsroute-simple-same-namespace": [
        Expect("TLSRoute", "gateway-conformance-infra-test", parent="gateway-tlsroute",
               condition=c) for c in ("Accepted", "ResolvedRefs")] + [
        Expect("Gateway", "gateway-tlsroute", listener="https", attached=1)],
    "tlsroute-terminate-simple-same-namespace": [
        Expect("TLSRoute", "tlsroute-terminated-test", parent="gateway-tlsroute-terminate",
               condition=c) for c in ("Accepted", "ResolvedRefs")],
    "tlsroute-mixed-termination-same-namespace": [
        Expect("TLSRoute", name, parent="gateway-tlsroute-mixed-termination", condition=c)
        for name in ("gateway-conformance-mixed-passthroughroute",
                     "gateway-conformance-mixed-terminateroute")
        for c in ("Accepted", "ResolvedRefs")],
    "httproute-307-redirect": [
        Expect("HTTPRoute", "307-redirect", parent="same-namespace", condition=c)
        for c in ("Accepted", "ResolvedRefs")],
    "httproute-request-header-modifier-backend-weights": [
        Expect("HTTPRoute", "request-header-modifier-backend-weights", parent="same-namespace",
               condition=c) for c in ("Accepted", "ResolvedRefs")],
    "backendtlspolicy-invalid-ca-certificate-ref": [
        Expect("BackendTLSPolicy", name, parent="same-namespace", condition=c, status="False",
               reason=r)
        for name in ("nonexistent-ca-certificate-ref", "malformed-ca-certificate-ref")
        for c, r in (("Accepted", "NoValidCACertificate"),
                     ("ResolvedRefs", "InvalidCACertificateRef"))],
    "backendtlspolicy-invalid-kind": [
        Expect("BackendTLSPolicy", "invalid-kind", parent="same-namespace", condition=c,
               status="False", reason=r)
        for c, r in (("Accepted", "NoValidCACertificate"), ("ResolvedRefs", "InvalidKind"))],
    "backendtlspolicy-conflict-resolution": [
        Expect("BackendTLSPolicy", name, parent="same-namespace", condition="Accepted")
        for name in ("conflicted-without-section-name-1", "conflicted-with-section-name-1",
                     "not-conflicted-with-section-name", "not-conflicted-without-section-name")
    ] + [
        Expect("BackendTLSPolicy", name, parent="same-namespace", condition="Accepted",
               status="False", reason="Conflicted")
        for name in ("conflicted-without-section-name-2", "conflicted-with-section-name-2")],
    "listenerset-allowed-namespace-none": [
        Expect("ListenerSet", "listenerset-not-allowed", condition="Accepted", status="False",
               reason="NotAllowed")],
    "listenerset-default-not-allowed": [
        Expect("ListenerSet", "listenerset-default-not-allowed", condition="Accepted",
               status="False", reason="NotAllowed")],
    "listenerset-allowed-namespace-same": [
        Expect("ListenerSet", "listenerset-in-same-namespace", condition="Accepted"),
        Expect("ListenerSet", "listenerset-in-different-namespace",
               namespace="gateway-api-listenerset-not-allowed-ns", condition="Accepted",
               status="False", reason="NotAllowed")],
    "listenerset-allowed-namespace-selector": [
        Expect("ListenerSet", "listenerset-in-selected-namespace",
               namespace="gateway-api-listenerset-selector-allowed-ns", condition="Accepted"),
        Expect("ListenerSet", "listenerset-not-in-selected-namespace",
               namespace="gateway-api-listenerset-selector-not-allowed-ns",
               condition="Accepted", status="False", reason="NotAllowed")],
    "gateway-invalid-parameters-ref": [
        Expect("Gateway", "gateway-invalid-parameters-ref", condition="Accepted",
               status="False", reason="InvalidParameters")],
    "tlsroute-listener-passthrough-supported-kinds": [
        Expect("Gateway", "gateway-tlsroute-passthrough-supported-kind",
               listener="tls-passthrough", supported=("TLSRoute",)),
        Expect("Gateway", "gateway-tlsroute-passthrough-supported-kind",
               listener="tls-passthrough", condition="ResolvedRefs", status="False",
               reason="InvalidRouteKinds")],
    "tlsroute-listener-terminate-supported-kinds": [
        Expect("Gateway", "gateway-tlsroute-terminate-supported", listener="tls-terminate",
               supported=("TLSRoute",)),
        Expect("Gateway", "gateway-tlsroute-terminate-supported", listener="tls-terminate",
               condition="Accepted")],
    "gateway-optional-address-value": [
        Expect("Gateway", "gateway-without-address-value", condition=c)
        for c in ("Accepted", "Programmed")],
    "httproute-backend-protocol-websocket": [
        Expect("HTTPRoute", "backend-protocol-ws", parent="same-namespace", condition=c)
        for c in ("Accepted", "ResolvedRefs")],
    "listenerset-hostname-conflict": [
        Expect("Gateway", "gateway-with-listenerset-hostname-conflict",
               listener="hostname-conflict-with-gateway-listener", condition="Conflicted",
               status="False"),
        Expect("ListenerSet", "listenerset-with-hostname-conflict-with-gateway-1",
               listener="listener-set-1-listener", condition="Accepted"),
        # The first ListenerSet (oldest, then by name) that claims a hostname keeps it.
        Expect("ListenerSet", "listenerset-with-hostname-conflict-with-gateway-1",
               listener="hostname-conflict-with-listener-set-listener", condition="Conflicted",
               status="False"),
    ] + [
        Expect("ListenerSet", ls, listener=li, condition="Conflicted", reason="HostnameConflict")
        for ls, li in (
            ("listenerset-with-hostname-conflict-with-gateway-1",
             "hostname-conflict-with-gateway-listener"),
            ("listenerset-with-hostname-conflict-with-gateway-2",
             "hostname-conflict-with-gateway-listener"),
            ("listenerset-with-hostname-conflict-with-listener-set-1",
             "hostname-conflict-with-listener-set-listener"),
            ("listenerset-with-hostname-conflict-with-listener-set-2",
             "hostname-conflict-with-listener-set-listener"))],
    "gateway-secret-missing-reference-grant": [
        Expect("Gateway", "gateway-secret-missing-reference-grant", listener="https",
               condition="ResolvedRefs", status="False", reason="RefNotPermitted"),
        Expect("Gateway", "gateway-secret-missing-reference-grant", listener="https",
               condition="Programmed", status="False")],
    "gateway-secret-invalid-reference-grant": [
        Expect("Gateway", "gateway-secret-invalid-reference-grant", listener="https",
               condition="ResolvedRefs", status="False", reason="RefNotPermitted")],
    "gateway-secret-reference-grant-all-in-namespace": [
        Expect("Gateway", "gateway-secret-reference-grant-all-in-namespace", listener="https",
               condition="ResolvedRefs"),
        Expect("Gateway", "gateway-secret-reference-grant-all-in-namespace", listener="https",
               condition="Programmed")],
    "gateway-secret-reference-grant-specific": [
        Expect("Gateway", "gateway-secret-reference-grant-specific", listener="https",
               condition="ResolvedRefs"),
        Expect("Gateway", "gateway-secret-reference-grant-specific", listener="https",
               condition="Programmed")],
    "gateway-invalid-tls-configuration": [
        Expect("Gateway", gw, listener="https", condition="ResolvedRefs", status="False",
               reason="InvalidCertificateRef")
        for gw in ("gateway-certificate-nonexistent-secret",
                   "gateway-certificate-unsupported-group",
                   "gateway-certificate-unsupported-kind",
                   "gateway-certificate-malformed-secret")],
    "listenerset-protocol-conflict": [
        Expect("Gateway", _LS_GW, listener_sets=2),
        *_listener_conditions(_LS_GW, "gateway-listener"),
        *_listener_conditions(_LS_GW, "protocol-conflict-with-gateway-listener"),
        *_listener_set(f"{_LS_PC}-gateway-1", True, {
            "listener-set-1-listener": True, "protocol-conflict-with-gateway-listener": False,
            "protocol-conflict-with-listener-set-listener": True}),
        *_listener_set(f"{_LS_PC}-gateway-2", False, {
            "protocol-conflict-with-gateway-listener": False}),
        *_listener_set(f"{_LS_PC}-listener-set-1", True, {
            "listener-set-2-listener": True,
            "protocol-conflict-with-listener-set-listener": False}),
        *_listener_set(f"{_LS_PC}-listener-set-2", False, {
            "protocol-conflict-with-listener-set-listener": False})],
    "listenerset-reference-grant": [
        Expect("Gateway", "gateway-with-listener-sets-test-reference-grant",
               condition="Accepted"),
        Expect("ListenerSet", "listenerset-with-reference-grant", condition="Accepted"),
        Expect("ListenerSet", "listenerset-with-reference-grant", condition="Programmed"),
        Expect("ListenerSet", "listenerset-with-reference-grant",
               listener="listenerset-with-reference-grant-listener", condition="ResolvedRefs"),
        *[Expect("ListenerSet", "listenerset-without-reference-grant",
                 "gateway-api-listener-sets-test-reference-grant-ns", condition=c,
                 status="False", reason="ListenersNotValid")
          for c in ("Accepted", "Programmed")],
        Expect("ListenerSet", "listenerset-without-reference-grant",
               "gateway-api-listener-sets-test-reference-grant-ns",
               listener="listenerset-without-reference-grant-listener",
               condition="ResolvedRefs", status="False", reason="RefNotPermitted")],
    "listenerset-route-status-scoped-to-parentref": [
        Expect("Gateway", "gateway-parentref", condition="Accepted", listener_sets=1),
        *_listener_conditions("listenerset-parentref", "listenerset-parentref-listener",
                              kind="ListenerSet"),
        Expect("ListenerSet", "listenerset-parentref", listener="listenerset-parentref-listener",
               attached=1, supported=("HTTPRoute", "GRPCRoute")),
        Expect("HTTPRoute", "route-parentref-gwonly", parent="gateway-parentref",
               condition="Accepted"),
        Expect("HTTPRoute", "route-parentref-lsonly", parent="listenerset-parentref",
               condition="Accepted", reason="Accepted")],
    "listenerset-allowed-routes-supported-kinds": [
        Expect("Gateway", "gateway-with-listener-sets-test-supported-route-kinds",
               condition="Accepted"),
        Expect("ListenerSet", "listenerset-test-allowed-routes-supported-kinds",
               listener="listener-set-listener-allowed-routes-tls-only",
               condition="ResolvedRefs", status="False", reason="InvalidRouteKinds")],
    "gateway-tls-backend-client-certificate": [
        Expect("Gateway", "gateway-tls-backend-client-certificate", condition="ResolvedRefs",
               reason="ResolvedRefs"),
        Expect("HTTPRoute", "gateway-tls-backend-client-certificate",
               parent="gateway-tls-backend-client-certificate", condition="ResolvedRefs"),
        Expect("BackendTLSPolicy", "gateway-tls-backend-client-certificate-test",
               parent="gateway-tls-backend-client-certificate", condition="Accepted")],
    "gateway-invalid-tls-backend-configuration": [
        e for gw, reason in (
            ("gateway-client-certificate-nonexistent-secret", "InvalidClientCertificateRef"),
            ("gateway-client-certificate-unsupported-group", "InvalidClientCertificateRef"),
            ("gateway-client-certificate-unsupported-kind", "InvalidClientCertificateRef"),
            ("gateway-client-certificate-malformed-secret", "InvalidClientCertificateRef"),
            ("gateway-client-certificate-missing-reference-grant", "RefNotPermitted"))
        for e in (Expect("Gateway", gw, condition="ResolvedRefs", status="False",
                         reason=reason),
                  Expect("Gateway", gw, condition="Accepted", reason="Accepted"))],
    "gateway-with-invalid-clientcertificate-validation": [
        *_listener_conditions("gateway-with-invalid-client-cert-validation", "https"),
        *_listener_conditions("gateway-with-invalid-client-cert-validation",
                              "https-unresolved", "InvalidCACertificateRef"),
        *_listener_conditions("gateway-with-invalid-client-cert-validation",
                              "https-invalid-kind", "InvalidCACertificateKind"),
        *_listener_conditions("gateway-with-invalid-client-cert-validation",
                              "https-grant-missing", "RefNotPermitted")],
    "gateway-invalid-default-frontend-client-certificate-validation": [
        *_listener_conditions("invalid-default-client-validation-config", "http"),
        *_listener_conditions("invalid-default-client-validation-config", "https",
                              "InvalidCACertificateRef")],
    "gateway-with-clientcertificate-validation": [
        Expect("Gateway", "client-validation-default", condition="Accepted"),
        Expect("Gateway", "client-validation-default", condition="Programmed"),
        *[Expect("HTTPRoute", r, parent="client-validation-default", condition=c)
          for r in ("client-certificate-validation-https-test",
                    "client-certificate-validation-https-test-no-hostname")
          for c in ("Accepted", "ResolvedRefs")]],
    "gateway-with-clientcertificate-validation-insecure-fallback": [
        Expect("Gateway", "client-validation-insecure-fallback", condition="Accepted"),
        Expect("Gateway", "client-validation-insecure-fallback", condition="Programmed"),
        Expect("Gateway", "client-validation-insecure-fallback",
               condition="InsecureFrontendValidationMode", reason="ConfigurationChanged"),
        *[Expect("HTTPRoute", r, parent="client-validation-insecure-fallback", condition=c)
          for r in ("client-cert-validation-insecure-fallback-test",
                    "client-cert-validation-insecure-fallback-test-no-hostname")
          for c in ("Accepted", "ResolvedRefs")]],
}


def _add_listener(doc: dict[str, Any]) -> None:
    doc["spec"]["listeners"].append(
        {"name": "http-2", "hostname": "foo.com", "port": 80, "protocol": "HTTP"})


def _add_rule(doc: dict[str, Any]) -> None:
    rules = doc["spec"]["rules"]
    rules.append({"matches": [{"path": {"type": "PathPrefix", "value": "/bump"}}],
                  "backendRefs": rules[0]["backendRefs"]})


def _describe(doc: dict[str, Any]) -> None:
    doc["spec"]["description"] = "new"


def _rehost(doc: dict[str, Any]) -> None:
    doc["spec"]["validation"]["hostname"] = "other.example.com"


def _add_http_listener(doc: dict[str, Any]) -> None:
    doc["spec"]["listeners"].append({"name": "http", "port": 80, "protocol": "HTTP",
                                     "allowedRoutes": {"namespaces": {"from": "All"}}})


def _remove_https_listener(doc: dict[str, Any]) -> None:
    doc["spec"]["listeners"] = [x for x in doc["spec"]["listeners"] if x["name"] != "https"]


Change = tuple[str, str, Callable[[dict[str, Any]], None]]  # kind, name, change


def _drop_unsupported_address(doc: dict[str, Any]) -> None:
    doc["spec"]["addresses"] = [a for a in doc["spec"]["addresses"]
                                if a.get("type", "IPAddress") == "IPAddress"]


def _drop_unusable_address(doc: dict[str, Any]) -> None:
    # The runner's usable address is a loopback one; the unusable one is not.
    doc["spec"]["addresses"] = [a for a in doc["spec"]["addresses"]
                                if ipaddress.ip_address(a["value"]).is_loopback]


def _reconcile_ref(doc: dict[str, Any]) -> None:
    doc["spec"]["validation"]["caCertificateRefs"] = [
        {"group": "", "kind": "ConfigMap", "name": _RECONCILE_CM}]


def _reconcile_ca(doc: dict[str, Any]) -> None:
    doc["data"] = {"ca.crt": "COPY_OF:tls-checks-ca-certificate"}  # the runner fills it in


def _empty_ca(doc: dict[str, Any]) -> None:
    doc["data"] = {"ca.crt": ""}


def _policy(name: str, ok: bool = True, gateway: str = "same-namespace") -> list[Expect]:
    if ok:
        return [Expect("BackendTLSPolicy", name, parent=gateway, condition=c, reason=c)
                for c in ("Accepted", "ResolvedRefs")]
    return [Expect("BackendTLSPolicy", name, parent=gateway, condition="Accepted",
                   status="False", reason="NoValidCACertificate"),
            Expect("BackendTLSPolicy", name, parent=gateway, condition="ResolvedRefs",
                   status="False", reason="InvalidCACertificateRef")]


_RECONCILE_CM = "tls-checks-ca-certificate-reconcile-test"
Step = tuple[list[Change], list[Expect]]
_STATIC = "gateway-static-addresses"
# Tests that change objects' specs after they are accepted: the changes, step by step, and
# expectations that must then hold.
CHANGES: dict[str, list[Step]] = {
    "gateway-modify-listeners": [(
        [("Gateway", "gateway-add-listener", _add_http_listener),
         ("Gateway", "gateway-remove-listener", _remove_https_listener)],
        [Expect("Gateway", "gateway-add-listener", listener="http", attached=1),
         Expect("Gateway", "gateway-add-listener", condition="Programmed", generation=2),
         Expect("Gateway", "gateway-remove-listener", listener="http", attached=1),
         Expect("Gateway", "gateway-remove-listener", condition="Accepted", generation=2)])],
    # A policy's CA: a ConfigMap that does not exist yet, then does, then holds no
    # certificate, then does again (a change to a ConfigMap alone reaches the policy).
    "backendtlspolicy": [
        ([("BackendTLSPolicy", "reconcile-test", _reconcile_ref)],
         _policy("reconcile-test", ok=False)),
        ([("ConfigMap", _RECONCILE_CM, _reconcile_ca)], _policy("reconcile-test")),
        ([("ConfigMap", _RECONCILE_CM, _empty_ca)], _policy("reconcile-test", ok=False)),
        ([("ConfigMap", _RECONCILE_CM, _reconcile_ca)], _policy("reconcile-test"))],
    # Without the unsupported address type the Gateway is accepted but not programmed (an
    # address the node does not have); without that one too, it is served on the other.
    _STATIC: [
        ([("Gateway", _STATIC, _drop_unsupported_address)],
         [Expect("Gateway", _STATIC, condition="Accepted", reason="Accepted", generation=2),
          Expect("Gateway", _STATIC, condition="Programmed", status="False",
                 reason="AddressNotUsable", generation=2)]),
        ([("Gateway", _STATIC, _drop_unusable_address)],
         [Expect("Gateway", _STATIC, condition="Accepted", reason="Accepted", generation=3),
          Expect("Gateway", _STATIC, condition="Programmed", reason="Programmed",
                 generation=3, addresses_as_spec=True),
          Expect("Gateway", _STATIC, listener="http", condition="Accepted", attached=0),
          Expect("Gateway", _STATIC, listener="http", condition="ResolvedRefs",
                 supported=("HTTPRoute",))])],
}
EXPECTATIONS_BEFORE_CHANGES = {
    "gateway-modify-listeners": [
        Expect("Gateway", "gateway-add-listener", listener="https", condition="Programmed"),
        Expect("Gateway", "gateway-remove-listener", listener="http", attached=1)],
    _STATIC: [Expect("Gateway", _STATIC, condition="Accepted", status="False",
                     reason="UnsupportedAddress")],
    "backendtlspolicy": [
        *_policy("normative-test"),
        *_policy("normative-test", gateway="same-namespace-with-https-listener"),
        *_policy("host-mismatch"), *_policy("cert-mismatch"), *_policy("reconcile-test")],
    "backendtlspolicy-san": [
        Expect("BackendTLSPolicy", name, parent="same-namespace", condition="Accepted",
               reason="Accepted")
        for name in ("san-dns", "san-dns-mismatch", "san-uri", "san-uri-mismatch",
                     "multiple-sans", "multiple-mismatch-sans")],
}

BUMPS: dict[str, tuple[str, str, Callable[[dict[str, Any]], None], list[Expect]]] = {
    "gateway-observed-generation-bump": (
        "Gateway", "gateway-observed-generation-bump", _add_listener,
        [Expect("Gateway", "gateway-observed-generation-bump", condition=c, generation=2)
         for c in ("Accepted", "Programmed")]),
    "httproute-observed-generation-bump": (
        "HTTPRoute", "observed-generation-bump", _add_rule,
        [Expect("HTTPRoute", "observed-generation-bump", parent="same-namespace",
                condition=c, generation=2) for c in ("Accepted", "ResolvedRefs")]),
    "backendtlspolicy-observed-generation-bump": (
        "BackendTLSPolicy", "observed-generation-bump", _rehost,
        [Expect("BackendTLSPolicy", "observed-generation-bump", parent="same-namespace",
                condition=c, generation=2) for c in ("Accepted", "ResolvedRefs")]),
    "gatewayclass-observed-generation-bump": (
        "GatewayClass", "gatewayclass-observed-generation-bump", _describe,
        [Expect("GatewayClass", "gatewayclass-observed-generation-bump", namespace="",
                condition="Accepted", generation=2)]),
}
for _name, (_kind, _obj, _change, _after) in BUMPS.items():
    # Before the change: accepted at generation 1.
    EXPECTATIONS[_name] = [Expect(e.kind, e.name, e.namespace, e.parent, e.listener,
                                  e.condition, generation=1) for e in _after]
for _name, (_kind, _obj, _change, _after) in BUMPS.items():
    CHANGES[_name] = [([(_kind, _obj, _change)], _after)]
EXPECTATIONS.update(EXPECTATIONS_BEFORE_CHANGES)

