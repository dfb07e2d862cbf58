"""The conformance report in the upstream format (ConformanceReport), per profile.

A test belongs to a profile when every feature it needs is one the profile covers; it counts
as core when it needs only the profile's core features, extended otherwise.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Protocol

import yaml

PROFILES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    # name: (core features, prefixes of its extended features)
    "GATEWAY-HTTP": (frozenset({"Gateway", "HTTPRoute", "ReferenceGrant"}),
                     ("HTTPRoute", "Gateway", "BackendTLSPolicy", "ListenerSet")),
    "GATEWAY-GRPC": (frozenset({"Gateway", "GRPCRoute", "ReferenceGrant"}),
                     ("GRPCRoute", "Gateway")),
    "GATEWAY-TLS": (frozenset({"Gateway", "TLSRoute", "ReferenceGrant"}),
                    ("TLSRoute", "Gateway")),
    "MESH-HTTP": (frozenset({"Mesh", "HTTPRoute"}), ("HTTPRoute", "Mesh")),
    "MESH-GRPC": (frozenset({"Mesh", "GRPCRoute"}), ("GRPCRoute", "Mesh")),
}


class _Result(Protocol):
    outcome: str

    @property
    def test(self) -> Any: ...


def _section(results: Sequence[_Result], supported: set[str]) -> dict[str, Any]:
    stats = {k.capitalize(): sum(r.outcome == k for r in results)
             for k in ("PASS", "FAIL", "SKIP")}
    out: dict[str, Any] = {
        "result": "failure" if stats["Fail"] else ("partial" if stats["Skip"] else "success"),
        "statistics": {"Passed": stats["Pass"], "Failed": stats["Fail"],
                       "Skipped": stats["Skip"]},
    }
    if stats["Skip"]:
        out["skippedTests"] = sorted(r.test.short_name for r in results if r.outcome == "SKIP")
    if stats["Fail"]:
        out["failedTests"] = sorted(r.test.short_name for r in results if r.outcome == "FAIL")
    if supported:
        out["supportedFeatures"] = sorted(supported)
    return out


def upstream_report(results: Sequence[_Result], version: str = "0.1.0") -> str:
    profiles = []
    for name, (core, prefixes) in PROFILES.items():
        mesh_profile = name.startswith("MESH")
        mine = [r for r in results if ("Mesh" in r.test.features) == mesh_profile and all(
            f in core or f.startswith(prefixes) for f in r.test.features)]
        core_results = [r for r in mine if set(r.test.features) <= core]
        extended = [r for r in mine if not set(r.test.features) <= core]
        extended_features = {f for r in extended if r.outcome == "PASS"
                             for f in r.test.features if f not in core}
        if not mine:
            continue  # a profile this run did not cover (the gateway or the mesh suite)
        profiles.append({"name": name, "core": _section(core_results, set()),
                         "extended": _section(extended, extended_features)})
    report = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "ConformanceReport",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gatewayAPIVersion": "v1.6.1",
        "gatewayAPIChannel": "experimental",
        "implementation": {"organization": "mesh", "project": "mesh", "version": version,
                           "url": "", "contact": []},
        "mode": "default",
        "profiles": profiles,
    }
    return yaml.safe_dump(report, sort_keys=False)
