"""The volumes the lab's kubelet gives a container.

A container is a process on the node's file system, so a volume is a directory the kubelet
fills under its state (STATE/volumes/<pod uid>/<volume>) and mounts at the container's
`mountPath` in a mount namespace of the container's own (mesh.lab.sandbox), as a runtime
mounts it into the container's root: the host's file system does not see it. Kinds given:
`secret`, `configMap`, `downwardAPI`, `emptyDir`, and `projected` of those; `items`,
`defaultMode`/`mode`, `optional`, `readOnly` and `subPath` as Kubernetes reads them. The API
server's own service-account volume (`kube-api-access-*`) is given its CA and namespace, and
its token through a TokenRequest for the pod, as a kubelet does.

A volume the lab cannot give (another kind, a Secret that is not there and not optional)
is a `VolumeError`: the container waits with CreateContainerConfigError and its message.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GET an object (path) -> (status, body); POST (path, body) -> (status, body).
Get = Callable[[str], Awaitable[tuple[int, Any]]]
Post = Callable[[str, Any], Awaitable[tuple[int, Any]]]

KINDS = ("secret", "configMap", "downwardAPI", "emptyDir", "projected")
MAX_BYTES = 4 << 20  # a volume's files, at most (a Secret holds at most 1 MiB)


class VolumeError(ValueError):
    pass


@dataclass(frozen=True)
class Mount:
    source: Path  # what the kubelet made
    target: str  # the container's mountPath
    read_only: bool


def _kind(volume: Mapping[str, Any]) -> str:
    return next((k for k in volume if k != "name"), "unknown")


def _write(directory: Path, rel: str, data: bytes, mode: int) -> None:
    path = (directory / rel).resolve()
    if directory.resolve() not in path.parents:
        raise VolumeError(f"path {rel!r} leaves the volume")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode & 0o777)


def _items(data: Mapping[str, bytes], items: Any, mode: int, optional: bool,
           what: str) -> list[tuple[str, bytes, int]]:
    """(relative path, content, mode) of the keys a Secret's or ConfigMap's volume shows."""
    if not isinstance(items, list) or not items:
        return [(k, v, mode) for k, v in sorted(data.items())]
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        key = str(item.get("key"))
        if key not in data:
            if optional:
                continue
            raise VolumeError(f"{what} has no key {key!r}")
        m = item.get("mode")
        out.append((str(item.get("path") or key), data[key], m if isinstance(m, int) else mode))
    return out


def _field(pod: Mapping[str, Any], path: str) -> bytes:
    meta = pod.get("metadata") or {}
    if path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(path.split(".")[1]) or {}
        return "".join(f'{k}="{v}"\n' for k, v in sorted(values.items())).encode()
    known = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
             "metadata.uid": meta.get("uid")}
    if path not in known:
        raise VolumeError(f"downwardAPI field {path!r} is not one the lab gives")
    return str(known[path] or "").encode()


class Builder:
    """Fills one pod's volumes (under `root`) from the API (`get`, `post`)."""

    def __init__(self, pod: Mapping[str, Any], root: Path, get: Get, post: Post) -> None:
        self.pod = pod
        self.root = root
        self.get = get
        self.post = post
        meta = pod.get("metadata") or {}
        self.namespace = str(meta.get("namespace"))
        self.volumes = {str(v.get("name")): v for v in (pod.get("spec") or {}).get("volumes")
                        or [] if isinstance(v, Mapping)}

    async def _object(self, kind: str, name: str, optional: bool) -> Mapping[str, bytes] | None:
        plural = "secrets" if kind == "Secret" else "configmaps"
        code, body = await self.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if code == 404 and optional:
            return None
        if code != 200 or not isinstance(body, Mapping):
            raise VolumeError(f'{kind.lower()} "{name}" not found' if code == 404 else
                              f"{kind} {name}: {code} {str(body)[:200]}")
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()}
        data = {k: str(v).encode() for k, v in (body.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (body.get("binaryData") or {}).items()})
        return data

    async def _token(self, source: Mapping[str, Any]) -> bytes:
        account = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
        meta = self.pod.get("metadata") or {}
        expiry = source.get("expirationSeconds")
        code, body = await self.post(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "audiences": [source["audience"]] if source.get("audience") else None,
                "expirationSeconds": expiry if isinstance(expiry, int) else 3607,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name"),
                                   "uid": meta.get("uid")}}})
        if code != 201 or not isinstance(body, Mapping):
            raise VolumeError(f"no token for service account {account}: {code} "
                              f"{str(body)[:200]}")
        return str(body["status"]["token"]).encode()

    async def _files(self, name: str, volume: Mapping[str, Any]) -> list[tuple[str, bytes, int]]:
        kind = _kind(volume)
        spec = volume.get(kind) or {}
        if not isinstance(spec, Mapping):
            spec = {}
        default = spec.get("defaultMode")
        mode = default if isinstance(default, int) else 0o644
        if kind in ("secret", "configMap"):
            ref = spec.get("secretName") if kind == "secret" else spec.get("name")
            optional = bool(spec.get("optional"))
            data = await self._object("Secret" if kind == "secret" else "ConfigMap", str(ref),
                                      optional)
            return _items(data or {}, spec.get("items"), mode, optional, f"{kind} {ref}")
        if kind == "downwardAPI":
            return [(str(i.get("path")), _field(self.pod, str(
                (i.get("fieldRef") or {}).get("fieldPath"))), mode)
                for i in spec.get("items") or [] if isinstance(i, Mapping)]
        if kind == "emptyDir":
            return []
        if kind == "projected":
            out: list[tuple[str, bytes, int]] = []
            for source in spec.get("sources") or []:
                if not isinstance(source, Mapping):
                    continue
                sub = _kind(source)
                if sub == "serviceAccountToken":
                    token = source[sub]
                    out.append((str(token.get("path") or "token"),
                                await self._token(token), mode))
                elif sub in ("secret", "configMap", "downwardAPI"):
                    inner = dict(source[sub])
                    inner.setdefault("defaultMode", mode)
                    out += await self._files(name, {"name": name, sub: inner})
                else:
                    raise VolumeError(f'volume "{name}": projected source {sub} is not one '
                                      "the lab gives")
            return out
        raise VolumeError(f'volume "{name}" ({kind}) cannot be mounted: the lab gives '
                          f"{', '.join(KINDS)} volumes")

    async def mounts(self, volume_mounts: list[tuple[str, str, bool, str]]) -> list[Mount]:
        """The mounts of a container's volumeMounts, (volume, mountPath, readOnly,
        subPath) each, the volumes filled first (again at each start: a Secret's new
        content shows at the container's next start)."""
        made: dict[str, Path] = {}
        out = []
        for name, target, read_only, sub_path in volume_mounts:
            volume = self.volumes.get(name)
            if volume is None:
                raise VolumeError(f'volume "{name}" is not among the pod\'s volumes')
            if name not in made:
                directory = self.root / name
                if _kind(volume) != "emptyDir" or not directory.is_dir():
                    shutil.rmtree(directory, ignore_errors=True)
                    directory.mkdir(parents=True, exist_ok=True)
                    files = await self._files(name, volume)
                    if sum(len(d) for _, d, _ in files) > MAX_BYTES:
                        raise VolumeError(f'volume "{name}" is over {MAX_BYTES >> 20} MiB')
                    for rel, data, mode in files:
                        _write(directory, rel, data, mode)
                made[name] = directory
            source = made[name] / sub_path if sub_path else made[name]
            if sub_path and made[name].resolve() not in source.resolve().parents:
                raise VolumeError(f"subPath {sub_path!r} leaves the volume")
            if sub_path and not source.exists():
                source.mkdir(parents=True)  # as a kubelet makes a missing subPath
            out.append(Mount(source, target, read_only))
        return out
