"""Kubernetes objects as the agent sees them: a key with the API group, the raw body, and a
content version.

Objects keep their raw body (the translator parses what it needs): no Kubernetes client
types leak in. The content version is what caches key on: an API server does not bump
`metadata.generation` for core kinds (a Service's port change keeps its generation), so
generation cannot tell a changed object from an unchanged one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from mesh.store.kinds import CLUSTER_SCOPED, STATUS_READ, GroupKind, display

# Metadata the API server changes without any change of meaning: never part of a version.
_VOLATILE_METADATA = frozenset({"resourceVersion", "managedFields", "selfLink"})


class ObjectKey(NamedTuple):
    """Group, kind, namespace ("" for cluster-scoped kinds), name. A tuple: keys are hashed
    and compared everywhere, and a tuple does that in C."""

    group: str
    kind: str
    namespace: str
    name: str

    @property
    def group_kind(self) -> GroupKind:
        return GroupKind(self.group, self.kind)

    def __str__(self) -> str:
        kind = display(self.group_kind)
        return f"{kind} {self.namespace}/{self.name}" if self.namespace else f"{kind} {self.name}"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def hashes(body: Mapping[str, Any]) -> tuple[str, str]:
    """(spec hash, content hash) of an object's body, encoding the bulk of it once.

    The spec hash covers all but metadata and status: what the API server counts as a spec
    change (it bumps the generation). The content hash adds the metadata the API server
    does not change on its own (labels, annotations, generation...), and the status fields
    the translator reads (STATUS_READ: a Node's addresses): everything the translator can
    read."""
    kind, api_version = body.get("kind"), body.get("apiVersion")
    fields = STATUS_READ.get(GroupKind(group_of(api_version), kind), ()) \
        if isinstance(kind, str) and isinstance(api_version, str) else ()
    spec = _digest(_canonical({k: v for k, v in body.items()
                               if k not in ("metadata", "status")}))
    meta = body.get("metadata")
    kept = {k: v for k, v in meta.items() if k not in _VOLATILE_METADATA} \
        if isinstance(meta, Mapping) else None
    raw = body.get("status")
    status = {f: raw.get(f) for f in fields} if fields and isinstance(raw, Mapping) else None
    return spec, _digest(spec + _canonical([kept, status]))


def content_hash(body: Mapping[str, Any]) -> str:
    return hashes(body)[1]


@dataclass(frozen=True)
class KubeObject:
    group: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any] = field(compare=False, repr=False)
    generation: int = 1
    # Order of creation, for the tie-breaks the Gateway API defines ("oldest first").
    created: float = 0.0
    source: str = ""
    # The body's content hash, when the provider has it already (else computed on demand).
    body_hash: str = field(default="", compare=False, repr=False)

    @cached_property
    def key(self) -> ObjectKey:
        return ObjectKey(self.group, self.kind, self.namespace, self.name)

    @property
    def group_kind(self) -> GroupKind:
        return GroupKind(self.group, self.kind)

    @cached_property
    def version(self) -> str:
        """The content version: equal for objects the translator cannot tell apart. The
        generation and creation order a file provider stamps outside the body count too."""
        return f"{self.body_hash or content_hash(self.body)}/{self.generation}/{self.created}"

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
        return _strings(self.metadata.get("labels"))

    @property
    def annotations(self) -> Mapping[str, Any]:
        """As written: the ingress-nginx annotations' reader names a value that is not a
        string, rather than lose it."""
        ann = self.metadata.get("annotations")
        return ann if isinstance(ann, Mapping) else {}


def _strings(raw: Any) -> Mapping[str, str]:
    """Labels as the API server keeps them, strings to strings: a manifest's other entries
    (a number, a list) are left out rather than crash whoever reads them."""
    if not isinstance(raw, Mapping):
        return {}
    if all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        return raw
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


class ObjectError(ValueError):
    """A document that is not a usable Kubernetes object."""


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def parse_object(doc: Any, source: str = "", body_hash: str = "") -> KubeObject:
    if not isinstance(doc, Mapping):
        raise ObjectError("not a mapping")
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    meta = doc.get("metadata")
    if not isinstance(kind, str) or not isinstance(api_version, str):
        raise ObjectError("apiVersion and kind are required")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ObjectError(f"{kind}: metadata.name is required")
    group = group_of(api_version)
    namespace = "" if GroupKind(group, kind) in CLUSTER_SCOPED else str(
        meta.get("namespace") or "default")
    generation = meta.get("generation")
    return KubeObject(
        group=group,
        kind=kind,
        namespace=namespace,
        name=meta["name"],
        body=doc,
        generation=generation if isinstance(generation, int) and generation > 0 else 1,
        source=source,
        body_hash=body_hash,
    )
