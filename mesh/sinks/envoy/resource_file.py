"""Envoy resources from YAML or JSON: a `resources:` list of objects that each carry `@type`.

This is Envoy's own JSON mapping of its protobuf API, so any Envoy resource can be written
by hand (for the demo, for debugging) without a translator in between. The file is bounded
like any manifest (`mesh.documents`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Importing these registers the message types that resource files name in `@type`,
# including the nested typed_config of the common filters.
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # noqa: F401
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from mesh import documents
from meshxds import types


class ResourceFileError(ValueError):
    """The file cannot be turned into resources; the message says where and why."""


def load_resources(path: Path,
                   limits: documents.Limits = documents.DEFAULT_LIMITS) -> list[Message]:
    try:
        with path.open("rb") as f:
            text = documents.check_text(f.read(limits.file_bytes + 1), limits)
        docs = documents.load_yaml(text, limits)
    except (OSError, documents.DocumentError) as e:
        raise ResourceFileError(f"{path}: {e}") from e
    if len(docs) != 1:
        raise ResourceFileError(f"{path}: expected one document, found {len(docs)}")
    doc = docs[0]
    if not isinstance(doc, dict) or not isinstance(doc.get("resources"), list):
        raise ResourceFileError(f"{path}: expected a mapping with a 'resources' list")
    return [_parse(path, i, item) for i, item in enumerate(doc["resources"])]


def _parse(path: Path, index: int, item: Any) -> Message:
    where = f"{path}: resources[{index}]"
    if not isinstance(item, dict) or "@type" not in item:
        raise ResourceFileError(f"{where}: each resource needs an '@type'")
    type_url = str(item["@type"])
    if type_url not in types.SHORT_NAMES:
        raise ResourceFileError(f"{where}: unsupported type {type_url!r}")
    full_name = type_url.rsplit("/", 1)[-1]
    descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    cls = message_factory.GetMessageClass(descriptor)
    body = {k: v for k, v in item.items() if k != "@type"}
    try:
        message: Message = json_format.ParseDict(body, cls())
    except json_format.ParseError as e:
        raise ResourceFileError(f"{where}: {e}") from e
    return message
