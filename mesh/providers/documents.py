"""Manifest text to documents, with bounds: no input can make the agent spin or balloon.

A file is split into documents at `---` separator lines, as kubectl's YAML reader does, so
each document is parsed on its own: a document's text is its cache key (one change in a file
of 10,000 routes parses one document), and one bad document does not take the others along.

Each document is checked from libyaml's event stream before anything is built: its size, its
nesting depth, and its size once aliases are expanded (the "billion laughs" shape is a few
hundred bytes that expand to 10^9 nodes). Only a document within the limits is constructed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

# libyaml's parser where PyYAML has it: 20 times faster on large manifests.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A separator line: `---`, then only blanks or a comment (kubectl's rule).
_SEPARATOR = re.compile(r"^---[ \t]*(?:#[^\n]*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Limits:
    """Bounds on manifest input. The defaults hold every real manifest with room to spare:
    the API server refuses requests over 3 MiB, and Kubernetes objects nest 10-20 deep."""

    file_bytes: int = 64 * 1024 * 1024
    document_bytes: int = 3 * 1024 * 1024
    depth: int = 64
    # Nodes of a document once every alias is expanded: what building it would cost.
    expanded_nodes: int = 1_000_000


DEFAULT_LIMITS = Limits()


class DocumentError(ValueError):
    """A document that cannot be used; the message says why."""


def split(text: str) -> list[str]:
    """The documents of a multi-document YAML text, each with the text that makes it."""
    parts = _SEPARATOR.split(text)
    return [p for p in parts if p.strip()]


def check_text(data: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    """The file's text, or DocumentError for binary, non-UTF-8 or oversized input."""
    if len(data) > limits.file_bytes:
        raise DocumentError(f"file is {len(data)} bytes, over the limit of "
                            f"{limits.file_bytes}")
    if b"\x00" in data:
        raise DocumentError("file is binary (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"file is not UTF-8 text: {e}") from e


def _check_events(text: str, limits: Limits) -> None:
    """Walk libyaml's events (flat, no recursion) and refuse what is too deep or would
    expand past the limit. Anchored nodes remember their expanded size, so each alias
    costs what it stands for."""
    loader = _LOADER(text)
    try:
        # Per open collection: its anchor and its expanded size so far (itself included).
        stack: list[list[Any]] = []
        anchored: dict[str, int] = {}
        total = 0

        def count(n: int) -> None:
            nonlocal total
            total += n
            if total > limits.expanded_nodes:
                raise DocumentError(
                    f"document expands to more than {limits.expanded_nodes} nodes "
                    "(aliases of aliases?)")

        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent | yaml.ScalarEvent):
                if isinstance(event, yaml.AliasEvent):
                    if event.anchor not in anchored:
                        raise DocumentError(f"alias *{event.anchor} refers to an unknown "
                                            "or unfinished anchor")
                    n = anchored[event.anchor]
                else:
                    n = 1
                    if event.anchor is not None:
                        anchored[event.anchor] = 1
                count(n)
                if stack:
                    stack[-1][1] += n
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                count(1)
                stack.append([event.anchor, 1])
                if len(stack) > limits.depth:
                    raise DocumentError(f"document nests deeper than {limits.depth} levels")
            elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                anchor, size = stack.pop()
                if anchor is not None:
                    anchored[anchor] = size
                if stack:
                    stack[-1][1] += size
            elif isinstance(event, yaml.DocumentStartEvent):
                anchored.clear()  # anchors do not cross documents
    finally:
        loader.dispose()


def load_yaml(text: str, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """The documents of one chunk of YAML text, within the limits, or DocumentError."""
    if len(text.encode()) > limits.document_bytes:
        raise DocumentError(f"document is over the limit of {limits.document_bytes} bytes")
    try:
        _check_events(text, limits)
        return list(yaml.load_all(text, Loader=_LOADER))
    except RecursionError as e:
        raise DocumentError("document nests too deeply") from e
    except yaml.YAMLError as e:
        raise DocumentError(str(e).replace("\n", " ")) from e


def load_json(text: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """One JSON document, within the limits (JSON has no aliases: depth and size only)."""
    if len(text.encode()) > limits.document_bytes:
        raise DocumentError(f"document is over the limit of {limits.document_bytes} bytes")
    depth = max_depth = 0
    in_string = escaped = False
    # Nesting measured on the text before parsing: json's recursion is what deep input hits.
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            max_depth = max(max_depth, depth)
            if max_depth > limits.depth:
                raise DocumentError(f"document nests deeper than {limits.depth} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DocumentError(f"not valid JSON: {e}") from e


def flatten(doc: Any) -> Iterator[Any]:
    """A document's objects: the items of a `kind: List`, or the document itself."""
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        yield from doc["items"]
    else:
        yield doc
