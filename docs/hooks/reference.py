"""MkDocs hook: the generated parts of the reference pages, rendered at build time.

A page asks for one with a marker line:

    <!-- reference: crd gateway-api/trafficpolicy.yaml -->
    <!-- reference: chart-values charts/mesh/values.schema.json charts/mesh/values.yaml -->
    <!-- reference: ingress-nginx mesh/translate/ingress_nginx_compat.py -->

`crd FILE`: the CustomResourceDefinition's names and printer columns, then a table of every
field of each version's openAPIV3Schema (type, bounds, defaults, CEL rules' messages).
`chart-values SCHEMA VALUES`: a table of every value of the chart: its type from the JSON
schema, its default from values.yaml, its description from the schema and from the comment
above it in values.yaml.
`ingress-nginx MODULE`: the table of every ingress-nginx annotation (`ANNOTATIONS` of the
module, loaded from its file: plain data, no I/O), one table per family: the annotation, its
level, what it does here and how it differs from ingress-nginx (or why it is not supported).

An unknown marker or a file that does not parse fails the build. `mkdocs serve` watches the
files the markers name.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.livereload import LiveReloadServer
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

MARKER = re.compile(r"^<!-- reference: (?P<kind>[a-z-]+) (?P<args>[^>]*?) -->$", re.MULTILINE)
WATCHED = ("gateway-api", "charts/mesh/values.schema.json", "charts/mesh/values.yaml",
           "mesh/translate/ingress_nginx_compat.py")


def _root(config: MkDocsConfig) -> Path:
    return Path(str(config.config_file_path)).resolve().parent


def on_serve(server: LiveReloadServer, config: MkDocsConfig, builder: Any) -> LiveReloadServer:
    for path in WATCHED:
        server.watch(str(_root(config) / path))
    return server


def on_page_markdown(markdown: str, *, page: Page, config: MkDocsConfig,
                     files: Files) -> str:
    root = _root(config)

    def render(match: re.Match[str]) -> str:
        kind, args = match["kind"], match["args"].split()
        try:
            if kind == "crd" and len(args) == 1:
                return crd_reference(root / args[0], args[0])
            if kind == "chart-values" and len(args) == 2:
                return chart_values(root / args[0], root / args[1])
            if kind == "ingress-nginx" and len(args) == 1:
                return ingress_nginx_annotations(root / args[0])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError,
                yaml.YAMLError) as e:
            raise PluginError(f"{page.file.src_path}: {match[0]}: {e}") from e
        raise PluginError(f"{page.file.src_path}: unknown reference marker {match[0]}")

    return MARKER.sub(render, markdown)


# Table cells ---------------------------------------------------------------------------

def code(value: object) -> str:
    """A code span (pipes inside one do not split a table cell)."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("\n", " ")
    if text == "":
        return '`""`'
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def prose(text: str) -> str:
    """Folded text in a cell: one line, pipes escaped, and outside code spans, angle brackets
    (`<gateway name>` is text, not a tag)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


# ingress-nginx's annotations -------------------------------------------------------------

def load_module(path: Path) -> Any:
    """A module of the repository, loaded from its file each time (`mkdocs serve` sees an
    edit), under a name of its own."""
    name = "_docs_" + "_".join(path.with_suffix("").parts[-3:])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def ingress_nginx_annotations(path: Path) -> str:
    table = load_module(path)
    rows = table.ANNOTATIONS
    counts = {level.value: sum(a.level is level for a in rows) for level in table.Level}
    out = [f"{len(rows)} annotations: " + ", ".join(
        f"{n} {level.lower()}" for level, n in counts.items()) + ".", ""]
    for family in table.FAMILIES:
        out += [f"### {family}", "",
                "| Annotation | Support | What it does here | Difference from ingress-nginx |",
                "|---|---|---|---|"]
        out += [f"| {code(a.name)} | {a.level.value} | {prose(a.here) or '—'} | "
                f"{prose(a.difference if a.supported else _sentence(a.difference))} |"
                for a in table.of_family(family)]
        out.append("")
    return "\n".join(out)


def _sentence(text: str) -> str:
    """A reason as the warnings say it ("the IR has no ...") as a sentence of the table."""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# CRDs ----------------------------------------------------------------------------------

def crd_reference(path: Path, shown: str) -> str:
    crd = yaml.safe_load(path.read_text())
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{shown} is not a CustomResourceDefinition")
    spec = crd["spec"]
    names = spec["names"]
    out = [
        f"`{names['kind']}` in `{spec['group']}`, "
        f"{'namespaced' if spec['scope'] == 'Namespaced' else 'cluster-scoped'} "
        f"(from `{shown}`).",
        "",
        "| name | value |",
        "|---|---|",
        f"| plural, singular | `{names['plural']}`, `{names['singular']}` |",
    ]
    if names.get("shortNames"):
        out.append(f"| short names | {', '.join(code(n) for n in names['shortNames'])} |")
    if names.get("categories"):
        out.append(f"| categories | {', '.join(code(n) for n in names['categories'])} |")
    for version in spec["versions"]:
        served = "served" if version.get("served") else "not served"
        storage = ", storage" if version.get("storage") else ""
        sub = ", ".join(sorted(version.get("subresources", {})))
        out.append(f"| version `{version['name']}` | {served}{storage}"
                   f"{'; subresources: ' + sub if sub else ''} |")
    for version in spec["versions"]:
        api_version = f"{spec['group']}/{version['name']}"
        columns = version.get("additionalPrinterColumns", [])
        if columns:
            out += ["", f"`kubectl get {names['plural']}` ({api_version}) shows:", "",
                    "| column | path | |", "|---|---|---|"]
            for col in columns:
                out.append(f"| {col['name']} | {code(col['jsonPath'])} | "
                           f"{prose(col.get('description', ''))} |")
        schema = version["schema"]["openAPIV3Schema"]
        out += ["", f"#### {names['kind']} {version['name']} fields", ""]
        if schema.get("description"):
            out += [prose(schema["description"]), ""]
        out += ["| field | type | description |", "|---|---|---|"]
        top = schema.get("properties", {})
        for name in ("spec", "status"):
            if name in top:
                required = name in schema.get("required", [])
                out += [_field_row(p, s, r) for p, s, r in _fields(name, top[name], required)]
    return "\n".join(out) + "\n"


def _fields(path: str, schema: Mapping[str, Any],
            required: bool) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    yield path, schema, required
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        yield from _children(path + "[]", schema["items"])
    else:
        yield from _children(path, schema)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        yield from _children(path + ".*", extra)


def _children(path: str, schema: Mapping[str, Any]
              ) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    needed = set(schema.get("required", []))
    for name, child in schema.get("properties", {}).items():
        yield from _fields(f"{path}.{name}", child, name in needed)


def _type(schema: Mapping[str, Any]) -> str:
    t = schema.get("type", "")
    if t == "array":
        items = schema.get("items", {})
        return "[]" + (_type(items) if isinstance(items, dict) else "")
    extra = schema.get("additionalProperties")
    if t == "object" and isinstance(extra, dict):
        return f"map[string]{_type(extra)}"
    if schema.get("format"):
        return f"{t} ({schema['format']})"
    return str(t) if t else "any"


def _bounds(schema: Mapping[str, Any]) -> list[str]:
    out = []
    for low, high, one, many in (("minimum", "maximum", "", ""),
                                 ("minLength", "maxLength", " character", " characters"),
                                 ("minItems", "maxItems", " item", " items"),
                                 ("minProperties", "maxProperties", " field", " fields")):
        lo, hi = schema.get(low), schema.get(high)
        if lo is not None and hi is not None:
            out.append(f"{lo} to {hi}{many}")
        elif lo is not None:
            out.append(f"at least {lo}{one if lo == 1 else many}")
        elif hi is not None:
            out.append(f"at most {hi}{one if hi == 1 else many}")
    return out


def _field_row(path: str, schema: Mapping[str, Any], required: bool) -> str:
    kind = code(_type(schema))
    if required:
        kind += ", required"
    notes = []
    if schema.get("description"):
        notes.append(prose(schema["description"]))
    if "enum" in schema:
        notes.append("One of " + ", ".join(code(v) for v in schema["enum"]) + ".")
    bounds = _bounds(schema)
    if bounds:
        notes.append(prose("; ".join(bounds).capitalize()) + ".")
    if "pattern" in schema:
        notes.append(f"Pattern {code(schema['pattern'])}.")
    if "default" in schema:
        notes.append(f"Default {code(schema['default'])}.")
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = ", ".join(code(k) for k in schema.get("x-kubernetes-list-map-keys", []))
        notes.append(f"A list keyed by {keys}.")
    elif list_type == "set":
        notes.append("Items are unique.")
    for rule in schema.get("x-kubernetes-validations", []):
        notes.append("Rule: " + prose(rule.get("message") or rule["rule"]) + ".")
    return f"| {code(path)} | {kind} | {' '.join(notes)} |"


# The chart's values ------------------------------------------------------------------

def chart_values(schema_path: Path, values_path: Path) -> str:
    schema = json.loads(schema_path.read_text())
    text = values_path.read_text()
    defaults = yaml.safe_load(text)
    comments = values_comments(text)
    definitions = schema.get("definitions", {})
    out = ["| value | type | default | description |", "|---|---|---|---|"]
    for path, node in _values(schema, definitions, ""):
        default = _lookup(defaults, path)
        notes = []
        if path in comments:
            notes.append(comments[path])
        if node.get("description") and not _said(node["description"], comments.get(path, "")):
            notes.append(prose(node["description"]))
        out.append(f"| {code(path)} | {_value_type(node, definitions)} | "
                   f"{'' if default is _MISSING else code(_flow(default))} | "
                   f"{' '.join(notes)} |")
    return "\n".join(out) + "\n"


_MISSING = object()


def _words(text: str) -> list[str]:
    return [w.strip(".,:;()\"'`").lower() for w in text.split()]


def _said(description: str, comment: str) -> bool:
    """Whether the comment already says what the schema's description says (most words)."""
    words, said = _words(description), set(_words(comment))
    return bool(words) and sum(w in said for w in words) >= 0.8 * len(words)


def _lookup(values: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values


def _flow(value: Any) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict | list):
        return json.dumps(value)
    return str(yaml.safe_dump(value, default_flow_style=True, width=10_000)).strip()


def _resolve(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith("#/definitions/"):
        return dict(definitions[ref.removeprefix("#/definitions/")], **{
            k: v for k, v in node.items() if k != "$ref"})
    return node


def _values(schema: Mapping[str, Any], definitions: Mapping[str, Any],
            prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, child in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        node = _resolve(child, definitions)
        if node.get("type") == "object" and node.get("properties"):
            yield from _values(node, definitions, path + ".")
        else:
            yield path, node


def _value_type(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> str:
    if "enum" in node:
        return "one of " + ", ".join(code(v) for v in node["enum"])
    if "const" in node:
        return code(node["const"])
    if "anyOf" in node:
        return " or ".join(_value_type(_named(n, definitions), definitions)
                           for n in node["anyOf"])
    if "name" in node and "type" not in node:
        return str(node["name"])
    t = node.get("type", "")
    if isinstance(t, list):
        return " or ".join(t)
    if t == "array":
        items = _resolve(node.get("items", {}), definitions)
        return f"list of {items.get('type', 'any')}s"
    if t == "object" and "additionalProperties" in node:
        extra = node["additionalProperties"]
        inner = _value_type(_named(extra, definitions), definitions) \
            if isinstance(extra, dict) else "any"
        return f"map of {inner}"
    text = str(t or "any")
    bounds = _bounds(node)
    if bounds:
        text += f" ({'; '.join(bounds)})"
    return text


def _named(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> Mapping[str, Any]:
    """A $ref by its definition's name (ipv4CIDR, quantity...), anything else as it is."""
    ref = node.get("$ref", "")
    if ref.startswith("#/definitions/"):
        return {"name": ref.removeprefix("#/definitions/")}
    return node


KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):")


def values_comments(text: str) -> dict[str, str]:
    """The comment block right above each key of values.yaml, by dotted path. Lines indented
    past the comment's first (a list, an example) keep their own line."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped[1:])
            continue
        m = KEY.match(line)
        if m and not stripped.startswith("-"):
            indent = len(m["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m["key"]))
            if block:
                out[".".join(k for _, k in stack)] = _comment(block)
        block = []
    return out


def _comment(lines: list[str]) -> str:
    """Prose lines run on; an indented line (a list item, an example's line) starts a line of
    its own, keeping its indentation, unless it is indented far past the line before (the
    rest of that item's text, aligned under it)."""
    out, last = "", 0
    for line in lines:
        body = line[1:] if line.startswith(" ") else line
        indent = len(body) - len(body.lstrip())
        if indent and out and not (last and indent > last + 4):
            out += "<br>" + "&nbsp;" * (indent - 2) + prose(body)
            last = indent
        else:
            out += (" " if out else "") + prose(body)
            last = last if indent else 0
    return out
