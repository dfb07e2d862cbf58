"""Manifest text to documents, with bounds: no input can make the agent spin or balloon.

A file is split into documents at `---` separator lines, as kubectl's YAML reader does, so
each document is parsed on its own: a document's text is its cache key (one change in a file
of 10,000 routes parses one document), and one bad document does not take the others along.

Each document is composed by libyaml and checked before anything is built from it: its size,
its nesting depth, and its size once aliases are expanded (the "billion laughs" shape is a few
hundred bytes that expand to 10^9 nodes). Only a document within the limits is constructed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import yaml

# libyaml's parser where PyYAML has it: 20 times faster on large manifests.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# What may follow `---` on a separator line: only blanks or a comment (kubectl's rule).
_SEPARATOR_REST = re.compile(r"[ \t]*(?:#.*)?")


@dataclass(frozen=True)
class Limits:
    """Bounds on manifest input. The defaults hold every real manifest with room to spare:
    the API server refuses requests over 3 MiB, and Kubernetes objects nest 10-20 deep."""

    file_bytes: int = 64 * 1024 * 1024
    # One object's document (a `kind: List` counts as its items: kubectl sends them apart).
    document_bytes: int = 3 * 1024 * 1024
    depth: int = 64
    # A document once every alias is expanded, what building and encoding it would cost:
    # nodes, and bytes of scalars (an alias of a long string costs the string).
    expanded_nodes: int = 1_000_000
    expanded_bytes: int = 16 * 1024 * 1024


DEFAULT_LIMITS = Limits()


class DocumentError(ValueError):
    """A document that cannot be used; the message says why."""


def split(text: str) -> list[str]:
    """The documents of a multi-document YAML text, each with the text that makes it.
    (str.split does the scan: a regular expression over a 5 MB file took 35 ms.)"""
    docs: list[str] = []
    current = ""
    for i, part in enumerate(("\n" + text).split("\n---")):
        rest, newline, body = part.partition("\n")
        if i == 0:
            current = part[1:]
        elif not _SEPARATOR_REST.fullmatch(rest):
            current += "\n---" + part  # not a separator: the document's own text
        else:
            docs.append(current + "\n")
            current = body if newline else ""
    docs.append(current)
    return [d for d in docs if d.strip()]


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


def _check_graph(root: yaml.Node, limits: Limits) -> None:
    """Refuse a composed document that nests too deeply or would expand past the limit
    once built. Aliases share nodes in the graph, so each node is measured once (post-order,
    no recursion) and an alias costs what it stands for; an alias inside its own anchor is a
    cycle, and refused."""
    size: dict[int, int] = {}
    weight: dict[int, int] = {}  # bytes of scalars
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[nid], weight[nid], depth[nid] = 1, len(node.value), 0
            continue
        children = node.value if isinstance(node, yaml.SequenceNode) else [
            part for pair in node.value for part in pair]
        if finished:
            on_path.discard(nid)
            size[nid] = 1 + sum(size[id(c)] for c in children)
            weight[nid] = sum(weight[id(c)] for c in children)
            depth[nid] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[nid] > limits.expanded_nodes:
                raise DocumentError(f"document expands to more than {limits.expanded_nodes} "
                                    "nodes (aliases of aliases?)")
            if weight[nid] > limits.expanded_bytes:
                raise DocumentError(f"document expands to more than {limits.expanded_bytes} "
                                    "bytes of text (aliases of long strings?)")
            if depth[nid] > limits.depth:
                raise DocumentError(f"document nests deeper than {limits.depth} levels")
            continue
        if nid in size:
            continue
        if nid in on_path:
            raise DocumentError("document has an alias inside its own anchor (a cycle)")
        on_path.add(nid)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _check_size(text: str, doc: Any, limits: Limits) -> None:
    if not _is_list(doc) and len(text.encode()) > limits.document_bytes:
        raise DocumentError(f"document is over the limit of {limits.document_bytes} bytes")


def load_yaml(text: str, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """The documents of one chunk of YAML text, within the limits, or DocumentError. Each is
    composed (libyaml), measured, and only then built."""
    loader = _LOADER(text)
    try:
        out = []
        while loader.check_node():
            node = loader.get_node()
            _check_graph(node, limits)
            doc = loader.construct_document(node)
            _check_size(text, doc, limits)
            out.append(doc)
        return out
    except RecursionError as e:
        raise DocumentError("document nests too deeply") from e
    except (yaml.YAMLError, ValueError, TypeError) as e:
        # ValueError: an integer past Python's digit limit, say; TypeError: an unhashable key
        raise DocumentError(str(e).replace("\n", " ")) from e
    finally:
        loader.dispose()


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def load_json(text: str, limits: Limits = DEFAULT_LIMITS) -> Any:
    """One JSON document, within the limits (JSON has no aliases: depth and size only)."""
    # Nesting measured on the text before parsing (json's recursion is what deep input
    # hits): strings out, then the running count of brackets, in C.
    brackets = _JSON_BRACKET.findall(_JSON_STRING.sub("", text))
    if max(accumulate(_DEPTH_STEP[b] for b in brackets), default=0) > limits.depth:
        raise DocumentError(f"document nests deeper than {limits.depth} levels")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DocumentError(f"not valid JSON: {e}") from e
    _check_size(text, doc, limits)
    return doc


def _is_list(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(
        doc.get("items"), list)


def flatten(doc: Any) -> Iterator[Any]:
    """A document's objects: the items of a `kind: List`, or the document itself."""
    if _is_list(doc):
        yield from doc["items"]
    else:
        yield doc
