"""Kubernetes objects as the agent sees them, and the store that holds them.

Providers put objects in; the translator reads an immutable snapshot. Objects keep their
raw body (the translator parses what it needs): no Kubernetes client types leak in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

GATEWAY_GROUP = "gateway.networking.k8s.io"
CLUSTER_SCOPED = frozenset({"Namespace", "GatewayClass", "IngressClass"})
KINDS = frozenset({
    "Namespace", "Service", "EndpointSlice", "Secret", "ConfigMap", "GatewayClass",
    "Gateway", "ListenerSet", "XListenerSet", "HTTPRoute", "GRPCRoute", "TLSRoute",
    "ReferenceGrant", "BackendTLSPolicy", "Ingress", "IngressClass",
})


class ObjectKey(NamedTuple):
    """Kind, namespace ("" for cluster-scoped kinds), name. A tuple: keys are hashed and
    compared everywhere, and a tuple does that in C."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind} {self.name}")


@dataclass(frozen=True)
class KubeObject:
    api_version: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any] = field(compare=False, repr=False)
    generation: int = 1
    # Order of creation, for the tie-breaks the Gateway API defines ("oldest first").
    created: float = 0.0
    source: str = ""

    @cached_property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.namespace, self.name)

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0] if "/" in self.api_version else ""

    @property
    def spec(self) -> Mapping[str, Any]:
        spec = self.body.get("spec")
        return spec if isinstance(spec, Mapping) else {}

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.body.get("metadata")
        return meta if isinstance(meta, Mapping) else {}

    @property
    def labels(self) -> Mapping[str, str]:
        labels = self.metadata.get("labels")
        return labels if isinstance(labels, Mapping) else {}

    @property
    def annotations(self) -> Mapping[str, str]:
        ann = self.metadata.get("annotations")
        return ann if isinstance(ann, Mapping) else {}


class ObjectError(ValueError):
    """A document that is not a usable Kubernetes object."""


def parse_object(doc: Any, source: str = "") -> KubeObject:
    if not isinstance(doc, Mapping):
        raise ObjectError("not a mapping")
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    meta = doc.get("metadata")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        raise ObjectError("apiVersion and kind are required")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ObjectError(f"{kind}: metadata.name is required")
    namespace = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    generation = meta.get("generation")
    return KubeObject(
        api_version=api_version,
        kind=kind,
        namespace=namespace,
        name=meta["name"],
        body=doc,
        generation=generation if isinstance(generation, int) and generation > 0 else 1,
        source=source,
    )


class StoreSnapshot:
    """An immutable view of the store, what the translator gets."""

    def __init__(self, objects: Mapping[ObjectKey, KubeObject]) -> None:
        self._objects = MappingProxyType(dict(objects))
        by_kind: dict[str, list[KubeObject]] = {}
        for obj in self._objects.values():
            by_kind.setdefault(obj.kind, []).append(obj)
        for objs in by_kind.values():
            objs.sort(key=lambda o: (o.namespace, o.name))
        self._by_kind = by_kind

    def __iter__(self) -> Iterator[KubeObject]:
        return iter(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, kind: str, namespace: str, name: str) -> KubeObject | None:
        return self._objects.get(ObjectKey(kind, "" if kind in CLUSTER_SCOPED else namespace,
                                           name))

    def of_kind(self, *kinds: str) -> list[KubeObject]:
        out: list[KubeObject] = []
        for kind in kinds:
            out.extend(self._by_kind.get(kind, ()))
        return out

    @classmethod
    def of(cls, objects: Iterable[KubeObject]) -> StoreSnapshot:
        return cls({o.key: o for o in objects})
