"""`mesh ingress-nginx check`: what the mesh would do with a user's Ingresses, annotation by
annotation, before they move from ingress-nginx.

The input is what `kubectl get ingress -A -o yaml` prints (a `List`), multi-document YAML or
JSON: a file, a directory (read recursively, `*.yaml`, `*.yml`, `*.json`, as `mesh run
--manifests` reads one), or `-` for standard input, read within the bounds of
`mesh.documents`. Each Ingress's annotations under `nginx.ingress.kubernetes.io/` and
`mesh.dev/` are looked up in the compatibility table (`ingress_nginx_compat`) and run through
the parser the agent uses (`ingress_annotations.parse`), so a value the agent would refuse is
found here too, with the agent's own warning.

Only Ingresses of the classes being migrated are judged: `nginx` and `mesh` by default (or
`--class`), and any IngressClass in the input whose controller is ingress-nginx's or the
mesh's. An Ingress without a class is judged too (the default class of the cluster serves
it); one of another class is listed as not judged.

Exit status: 0 when every judged Ingress would behave as under ingress-nginx; 1 when some
annotation would not (partly supported, not supported, or a value refused), or an Ingress
would not be served at all; 2 when some input could not be read (what could be read is
still reported).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import click

from mesh import documents
from mesh.documents import DocumentError
from mesh.store import kinds
from mesh.store.objects import KubeObject, ObjectError, parse_object
from mesh.translate import ingress_annotations as nginx
from mesh.translate import ingress_nginx_compat as compat
from mesh.translate import model
from mesh.translate.config import DEFAULT_INGRESS_CONTROLLER

INGRESS_NGINX_CONTROLLER = "k8s.io/ingress-nginx"
DEFAULT_CLASSES = ("nginx", "mesh")
SUFFIXES = (".yaml", ".yml", ".json")

# What a finding says about an annotation (or the Ingress as a whole).
SUPPORTED, PARTLY, NOT_SUPPORTED, REFUSED, NOT_JUDGED = (
    "supported", "partly", "not supported", "refused", "not judged")
_SUPPORT = {compat.Level.SUPPORTED: SUPPORTED, compat.Level.PARTLY: PARTLY,
            compat.Level.NOT_SUPPORTED: NOT_SUPPORTED}
TLS_DEFAULT = "ssl-redirect (default)"


@dataclass(frozen=True)
class Finding:
    """One annotation of an Ingress (or, with `key` None, the Ingress as a whole)."""

    key: str | None  # the annotation as written: nginx.ingress.kubernetes.io/rewrite-target
    name: str  # rewrite-target
    support: str  # supported | partly | not supported | refused
    difference: str  # the table's: how it differs from ingress-nginx, or why not
    warnings: tuple[str, ...] = ()  # the parser's, about this annotation
    value: Any = None

    @property
    def changes(self) -> bool:
        """Whether the mesh would behave differently from ingress-nginx."""
        return self.support != SUPPORTED


@dataclass
class IngressReport:
    source: str
    namespace: str
    name: str
    class_name: str | None
    judged: bool
    note: str = ""
    findings: list[Finding] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return self.judged and any(f.changes for f in self.findings)


@dataclass
class Report:
    ingresses: list[IngressReport] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, why)

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 2
        return 1 if any(i.changes for i in self.ingresses) else 0

    def to_dict(self) -> dict[str, Any]:
        judged = [i for i in self.ingresses if i.judged]
        return {
            "ingresses": [{
                "source": i.source, "namespace": i.namespace, "name": i.name,
                "class": i.class_name, "judged": i.judged, "note": i.note,
                "changes": i.changes,
                "annotations": [{
                    "key": f.key, "name": f.name, "value": f.value, "support": f.support,
                    "difference": f.difference, "warnings": list(f.warnings),
                    "changes": f.changes} for f in i.findings]}
                for i in self.ingresses],
            "errors": [{"source": s, "error": e} for s, e in self.errors],
            "summary": {"ingresses": len(self.ingresses),
                        "unchanged": sum(not i.changes for i in judged),
                        "changed": sum(i.changes for i in judged),
                        "notJudged": len(self.ingresses) - len(judged),
                        "errors": len(self.errors)},
            "exitCode": self.exit_code,
        }


# -- reading -----------------------------------------------------------------------------------

def read(source: str, stdin: BinaryIO,
         limits: documents.Limits = documents.DEFAULT_LIMITS) -> tuple[list[tuple[str, Any]],
                                                                      list[tuple[str, str]]]:
    """Every object of the input with where it comes from, and what could not be read."""
    objects: list[tuple[str, Any]] = []
    errors: list[tuple[str, str]] = []
    if source == "-":
        files: list[tuple[str, Path | None]] = [("<stdin>", None)]
    else:
        path = Path(source)
        paths = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file() and
                       not p.name.startswith(".")) if path.is_dir() else [path]
        files = [(str(p), p) for p in paths]
    for label, p in files:
        try:
            if p is None:
                data = stdin.read(limits.file_bytes + 1)
            else:
                size = p.stat().st_size
                if size > limits.file_bytes:
                    raise DocumentError(f"file is {size} bytes, over the limit of "
                                        f"{limits.file_bytes}")
                with p.open("rb") as f:
                    data = f.read(limits.file_bytes + 1)
            text = documents.check_text(data, limits)
        except (OSError, DocumentError) as e:
            errors.append((label, str(e)))
            continue
        is_json = p.suffix == ".json" if p is not None else text.lstrip().startswith("{")
        chunks = [text] if is_json else documents.split(text)
        for n, chunk in enumerate(chunks, 1):
            where = label if len(chunks) == 1 else f"{label}: document {n}"
            try:
                docs = [documents.load_json(chunk, limits)] if is_json else \
                    documents.load_yaml(chunk, limits)
            except DocumentError as e:
                errors.append((where, str(e)))
                continue
            for doc in docs:
                for item in documents.flatten(doc):
                    if item is None:
                        continue
                    if not isinstance(item, Mapping):
                        errors.append((where, "not a Kubernetes object"))
                        continue
                    objects.append((where, item))
    return objects, errors


# -- judging -----------------------------------------------------------------------------------

def check(objects: list[tuple[str, Any]], classes: tuple[str, ...] = DEFAULT_CLASSES,
          errors: list[tuple[str, str]] | None = None) -> Report:
    report = Report(errors=list(errors or []))
    ingresses: list[tuple[str, KubeObject]] = []
    judged = set(classes)
    default: str | None = None
    for source, item in objects:
        if item.get("kind") not in ("Ingress", "IngressClass"):
            continue  # only Ingresses are judged, whatever their annotations
        try:
            obj = parse_object(item, source=source)
        except ObjectError as e:
            report.errors.append((source, str(e)))
            continue
        if obj.group_kind == kinds.INGRESS:
            ingresses.append((source, obj))
        elif obj.group_kind == kinds.INGRESS_CLASS:
            if obj.spec.get("controller") in (INGRESS_NGINX_CONTROLLER,
                                              DEFAULT_INGRESS_CONTROLLER):
                judged.add(obj.name)
            if obj.annotations.get("ingressclass.kubernetes.io/is-default-class") == "true":
                default = obj.name
    for source, obj in ingresses:
        report.ingresses.append(judge(source, obj, judged, default))
    return report


def judge(source: str, obj: KubeObject, classes: set[str], default: str | None
          ) -> IngressReport:
    try:
        class_name = model.parse_ingress(obj).class_name
        invalid = None
    except model.Invalid as e:
        class_name, invalid = _class_of(obj), str(e)
    out = IngressReport(source, obj.namespace, obj.name, class_name, judged=True)
    effective = class_name or default
    if effective is not None and effective not in classes:
        out.judged = False
        out.note = f"class {effective}: not ingress-nginx's nor the mesh's (--class to judge it)"
        return out
    if class_name is None:
        out.note = ("no class: the mesh serves it when its IngressClass is the cluster's "
                    "default" if default is None else f"class {default}, the default")
    if invalid is not None:
        out.findings.append(Finding(None, "Ingress", NOT_SUPPORTED,
                                    f"the mesh would not serve this Ingress: {invalid}"))
    settings = nginx.parse(obj)
    keys = sorted(k for k in obj.annotations if isinstance(k, str) and
                  any(k.startswith(p) and len(k) > len(p) for p in nginx.PREFIXES))
    claimed: set[str] = set()
    for key in keys:
        mine = tuple(w for w in settings.warnings if _about(w, key))
        claimed.update(mine)
        out.findings.append(_finding(key, obj.annotations[key], mine))
    rest = tuple(w for w in settings.warnings if w not in claimed)
    if rest:
        out.findings.append(Finding(None, "Ingress", PARTLY, "", rest))
    if not keys and obj.spec.get("tls"):
        # The parser's default: only an Ingress written for us redirects to HTTPS.
        out.findings.append(Finding(
            None, TLS_DEFAULT, PARTLY,
            "ingress-nginx redirects plain HTTP to HTTPS where the host has TLS; the mesh "
            "does so for an Ingress with at least one annotation under its prefixes: set "
            f'{nginx.NGINX}ssl-redirect: "true" to keep the redirect'))
    return out


def _class_of(obj: KubeObject) -> str | None:
    name = obj.spec.get("ingressClassName")
    if not isinstance(name, str):
        name = obj.annotations.get("kubernetes.io/ingress.class")
    return name if isinstance(name, str) else None


def _about(warning: str, key: str) -> bool:
    """Whether a warning of the parser is about the annotation `key` (they start with it)."""
    return warning.startswith((key + ":", key + " "))


def _finding(key: str, value: Any, warnings: tuple[str, ...]) -> Finding:
    name = key.split("/", 1)[1]
    entry = compat.BY_NAME.get(name)
    if entry is None:
        return Finding(key, name, NOT_SUPPORTED,
                       "not an annotation ingress-nginx documents (a typo, or one it removed?)",
                       (), value)
    if not entry.supported:
        # The parser's warning only repeats the table's reason.
        return Finding(key, name, NOT_SUPPORTED, entry.difference, (), value)
    refused = any(" is refused" in w for w in warnings)
    return Finding(key, name, REFUSED if refused else _SUPPORT[entry.level],
                   entry.difference, warnings, value)


# -- the command -------------------------------------------------------------------------------

@click.group("ingress-nginx")
def ingress_nginx() -> None:
    """Moving Ingresses from ingress-nginx to the mesh."""


@ingress_nginx.command("check")
@click.argument("source", metavar="DIR|FILE|-",
                type=click.Path(exists=True, allow_dash=True, path_type=str))
@click.option("--class", "classes", multiple=True, metavar="NAME",
              help="Judge the Ingresses of this IngressClass (repeatable; default: nginx and "
                   "mesh, and the input's IngressClasses of ingress-nginx or the mesh).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def check_cmd(source: str, classes: tuple[str, ...], output: str) -> None:
    """What the mesh would do with each Ingress's ingress-nginx annotations: supported,
    partly (how it differs), not supported or refused (why). Reads `kubectl get ingress -A
    -o yaml` output (-), or a directory of manifests.

    Exit status: 0 every Ingress behaves as under ingress-nginx, 1 some would not, 2 some
    input could not be read."""
    import json

    objects, errors = read(source, sys.stdin.buffer)
    report = check(objects, classes or DEFAULT_CLASSES, errors)
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_table(report)
    sys.exit(report.exit_code)


def _print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    for where, why in report.errors:
        click.echo(f"cannot read {where}: {why}", err=True)
    # A terminal's width, or $COLUMNS; else (a pipe, a file) 160 columns.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    table = Table("INGRESS", "ANNOTATION", "SUPPORT", "DETAIL")
    for i in report.ingresses:
        ingress = f"{i.namespace}/{i.name}"
        for annotation, support, detail in _rows(i):
            table.add_row(Text(ingress), Text(annotation), Text(support), Text(detail))
            ingress = ""
    console.print(table)
    d = report.to_dict()["summary"]
    console.print(Text(
        f"{d['ingresses']} Ingress(es): {d['unchanged']} as under ingress-nginx, "
        f"{d['changed']} with differences, {d['notJudged']} not judged"
        + (f"; {d['errors']} input error(s)" if d["errors"] else "")))


def _rows(i: IngressReport) -> Iterator[tuple[str, str, str]]:
    if not i.judged:
        yield "-", NOT_JUDGED, i.note
        return
    if i.note:
        yield "-", "", i.note
    if not i.findings:
        yield "-", SUPPORTED, "no ingress-nginx annotations"
    for f in i.findings:
        shown = f.name if f.key is None else f.key.removeprefix(nginx.NGINX)
        # The warnings without the annotation they start with; then how it differs (a
        # supported one's notes are left to the reference page and -o json).
        said = [w.removeprefix(f.key or "").removeprefix(":").strip() for w in f.warnings]
        if f.support != SUPPORTED:
            said.append(f.difference)
        yield shown, f.support, " ".join(said).replace("`", "")
