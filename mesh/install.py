"""`mesh install`: the Helm chart `charts/mesh` rendered for users without Helm.

The chart is rendered by the Helm library itself (helm-python-sdk: ctypes over Helm's Go
SDK, no helm binary), with the values Helm would use: the chart's defaults, then each
`-f FILE` in order, then each `--set` (later ones win), validated against
`values.schema.json`. `--dry-run` prints a YAML stream, in the order `kubectl apply` must
see it: the CRDs (`crds/`, as Helm installs them before anything else), the release's
Namespace (`--create-namespace`, the default), then the templates in Helm's install order.

Applying is left to kubectl (`mesh install --dry-run | kubectl apply --server-side -f -`);
`mesh install` itself talks to no API server. The chart is found beside the package
(`../charts/mesh`), so `mesh install` runs from a checkout (an editable install).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

CHART_DIR = Path(__file__).resolve().parent.parent / "charts" / "mesh"
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Helm's install order (pkg/release/util/kind_sorter.go); kinds it does not know go last.
INSTALL_ORDER = (
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
)
_GO_LOG = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO) ")


class InstallError(click.ClickException):
    """A one-line error (bad values, a bad option), exit status 2 like a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class Manifest:
    source: str  # the chart's file, e.g. mesh/templates/daemonset.yaml
    kind: str
    text: str  # the document as rendered, comments kept

    @property
    def object(self) -> dict[str, Any]:
        obj = yaml.safe_load(self.text)
        assert isinstance(obj, dict)
        return obj


@contextlib.contextmanager
def _native_stderr() -> Iterator[None]:
    """Helm's Go side logs to file descriptor 2 past Python (an INFO line per symlinked CRD
    at every load): its INFO and DEBUG lines are dropped, anything else is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().splitlines(keepends=True):
                if not _GO_LOG.match(line):
                    sys.stderr.write(line.decode(errors="replace"))


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of values sources: maps merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _values_error(e: Exception) -> InstallError:
    """The schema's findings on one line: `values: /path: what is wrong; ...`."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    found = [ln[2:] for ln in lines if ln.startswith("- ")]
    found = [re.sub(r"^at '([^']*)': ", lambda m: f"{m.group(1) or '/'}: ", f) for f in found]
    return InstallError(f"invalid values: {'; '.join(found) or ' '.join(lines)}")


def user_values(files: tuple[str, ...] = (), sets: tuple[str, ...] = (),
                strings: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values given, merged as Helm merges them: each file (YAML) in order, then each
    --set, then each --set-string (whose values stay strings)."""
    import helm_python as helm

    values: dict[str, Any] = {}
    for name in files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as e:
            raise InstallError(f"values file {name}: {e.strerror or e}") from e
        try:
            shape = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InstallError(f"values file {name}: not YAML: {' '.join(str(e).split())}") \
                from e
        if shape is None:
            continue
        if not isinstance(shape, dict):
            raise InstallError(f"values file {name}: not a map of values")
        try:
            doc = helm.values_from_yaml(text)  # as Helm reads it (its YAML, its types)
        except helm.HelmError as e:
            raise InstallError(f"values file {name}: {' '.join(str(e).split())}") from e
        values = merge(values, doc)
    parsers = (("--set", helm.parse_set_string, sets),
               ("--set-string", helm.parse_set_string_values, strings))
    for flag, parse, expressions in parsers:
        for expression in expressions:
            try:
                values = merge(values, parse(expression))
            except helm.HelmError as e:
                raise InstallError(f"{flag} {expression}: {' '.join(str(e).split())}") from e
    return values


def _documents(source: str, text: str) -> Iterator[Manifest]:
    for doc in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
        try:
            obj = yaml.safe_load(doc)
        except yaml.YAMLError as e:
            raise InstallError(f"{source} renders to invalid YAML: {e}") from e
        if obj is None:
            continue  # empty (a disabled template) or comments only
        if not isinstance(obj, dict) or not obj.get("kind"):
            raise InstallError(f"{source} renders a document without a kind")
        yield Manifest(source, str(obj["kind"]), doc.strip("\n") + "\n")


def _order(m: Manifest) -> int:
    return INSTALL_ORDER.index(m.kind) if m.kind in INSTALL_ORDER else len(INSTALL_ORDER)


def namespace_manifest(namespace: str) -> Manifest:
    text = (
        "# The release's namespace. hostNetwork, hostPath volumes and added capabilities are\n"
        "# the privileged Pod Security level.\n"
        "apiVersion: v1\nkind: Namespace\nmetadata:\n"
        f"  name: {namespace}\n"
        "  labels:\n    pod-security.kubernetes.io/enforce: privileged\n")
    return Manifest("mesh install --create-namespace", "Namespace", text)


def render(values: dict[str, Any] | None = None, *, release: str = "mesh",
           namespace: str = "mesh-system", create_namespace: bool = False,
           chart_dir: Path = CHART_DIR) -> list[Manifest]:
    """The chart's manifests in the order to apply them: CRDs, the Namespace (if asked),
    then the templates by kind as Helm orders them (stable within a kind)."""
    import helm_python as helm

    if not NAMESPACE_RE.match(namespace) or len(namespace) > 63:
        raise InstallError(f"namespace {namespace!r} is not a DNS label")
    try:
        helm.validate_release_name(release)
    except helm.HelmError as e:
        raise InstallError(f"release name {release!r}: {' '.join(str(e).split())}") from e
    if not (chart_dir / "Chart.yaml").is_file():
        raise InstallError(f"no chart at {chart_dir}: mesh install runs from a checkout")
    with _native_stderr(), helm.Chart.load(chart_dir) as chart:
        crds = [m for c in sorted(chart.crds, key=lambda c: c["name"])
                for m in _documents(c["filename"], c["data"])]
        try:
            rendered = chart.render(values or {}, name=release, namespace=namespace,
                                    is_install=True)
        except helm.HelmValuesError as e:
            raise _values_error(e) from e
        except helm.HelmError as e:
            raise InstallError(f"the chart does not render: {' '.join(str(e).split())}") from e
    templates = [m for source in sorted(rendered) if source.endswith((".yaml", ".yml"))
                 for m in _documents(source, rendered[source])]
    templates.sort(key=_order)
    return [*crds, *([namespace_manifest(namespace)] if create_namespace else []), *templates]


def to_stream(manifests: list[Manifest]) -> str:
    return "".join(f"---\n# Source: {m.source}\n{m.text}" for m in manifests)


@click.command("install")
@click.option("--dry-run", is_flag=True,
              help="Print the manifests (a YAML stream) instead; pipe them to kubectl apply.")
@click.option("--namespace", "-n", default="mesh-system", show_default=True,
              help="The release namespace (the DaemonSet, its ServiceAccount, the Lease).")
@click.option("--release-name", default="mesh", show_default=True,
              help="Prefix of the objects' names (mesh-agent...), as Helm's release name.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A value, as helm's --set (a.b=c, lists as {x,y}); repeatable, last wins.")
@click.option("--set-string", "strings", multiple=True, metavar="KEY=VALUE",
              help="As --set, the value kept a string (nodeSelector, podAnnotations).")
@click.option("-f", "--values", "files", multiple=True, metavar="FILE",
              help="A YAML file of values (- for stdin); repeatable, later files win.")
@click.option("--create-namespace/--no-create-namespace", default=True, show_default=True,
              help="Include the Namespace (labelled for the privileged Pod Security level).")
def install(dry_run: bool, namespace: str, release_name: str, sets: tuple[str, ...],
            strings: tuple[str, ...], files: tuple[str, ...], create_namespace: bool) -> None:
    """Render the mesh Helm chart (charts/mesh) with your values."""
    values = user_values(files, sets, strings)
    manifests = render(values, release=release_name, namespace=namespace,
                       create_namespace=create_namespace)
    if not dry_run:
        given = [*(f"-f {f}" for f in files), *(f"--set {s}" for s in sets),
                 *(f"--set-string {s}" for s in strings)]
        mesh = " ".join(["mesh install --dry-run -n", namespace, *given])
        helm = " ".join(["helm install", release_name, "charts/mesh -n", namespace,
                         "--create-namespace", *given])
        raise InstallError(
            "mesh install does not apply to a cluster itself (the values are valid). "
            f"Apply what it renders: {mesh} | kubectl apply --server-side -f -  "
            f"(or with Helm: {helm})")
    click.echo(to_stream(manifests), nl=False)
