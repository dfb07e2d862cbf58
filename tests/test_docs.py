"""The documentation site against the repository: what the pages name must exist.

`mkdocs build --strict` (in `make test`) already fails on a broken link, anchor, snippet or
generated reference; these tests cover what it cannot see: a path of the repository quoted
in backticks (`mesh/agent/pipeline.py`, `bpf/lib/`) that no longer exists, so that the code
map and the other pages cannot go stale silently, and the ingress-nginx annotation table (the
docs hook renders it from `mesh/translate/ingress_nginx_compat.py`) against the parser.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from mesh.translate import ingress_annotations
from mesh.translate import ingress_nginx_compat as compat

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
TOP = ("mesh", "meshxds", "tests", "benchmarks", "bpf", "charts", "examples", "gateway-api",
       "docs")
# A code span that is a path of the repository: a top-level directory, then a path (a
# pytest node id's `::test` and a trailing `:LINE` are cut off first).
PATH = re.compile(rf"^(?:{'|'.join(map(re.escape, TOP))})/[A-Za-z0-9_.*/-]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^(```|~~~)")


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, content) of every inline code span outside fenced blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, m[2].strip()) for m in CODE_SPAN.finditer(line)]
    return out


def repo_paths(text: str) -> list[tuple[int, str]]:
    out = []
    for n, span in code_spans(text):
        path = span.split("::")[0]
        if PATH.match(path):
            out.append((n, path))
    return out


def exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path.rstrip("/")).exists()


def test_the_site_has_pages() -> None:
    assert len(PAGES) > 10
    assert (DOCS / "development" / "how-it-is-built.md") in PAGES


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_path_exists(page: Path) -> None:
    missing = [f"{page.relative_to(ROOT)}:{n}: `{path}`"
               for n, path in repo_paths(page.read_text()) if not exists(path)]
    assert not missing, "paths named in the docs that are not in the repository:\n" + \
        "\n".join(missing)


def test_the_path_check_sees_paths() -> None:
    text = ("See `mesh/agent/` and `bpf/lib/lb.h`, `tests/test_x.py::test_y`, not "
            "`mesh.dev/canary` or `mesh/default/echo:80`.\n```\n`mesh/in/a/fence.py`\n```\n")
    assert [p for _, p in repo_paths(text)] == ["mesh/agent/", "bpf/lib/lb.h",
                                                "tests/test_x.py"]
    assert exists("mesh/agent/") and exists("bpf/lib/lb.h") and not exists("mesh/nothing.py")


def test_the_code_map_names_every_package() -> None:
    """A new package of mesh/ or meshxds/ is not left out of the map."""
    page = DOCS / "development" / "how-it-is-built.md"
    named = {path for _, path in repo_paths(page.read_text())}
    packages = {str(init.parent.relative_to(ROOT))
                for top in ("mesh", "meshxds") for init in (ROOT / top).rglob("__init__.py")}
    missing = {pkg for pkg in packages
               if not any(p == pkg + "/" or p.startswith(pkg + "/") for p in named)}
    assert not missing, f"packages the code map ({page.relative_to(ROOT)}) does not name"


def reference_hook() -> Any:
    spec = importlib.util.spec_from_file_location("_docs_reference_hook",
                                                  DOCS / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def annotation_table() -> dict[str, list[str]]:
    """Annotation name -> its Support column(s), from the table the docs hook renders for the
    reference page's marker."""
    page = (DOCS / "reference" / "ingress-annotations.md").read_text()
    marker = reference_hook().MARKER.search(page)
    assert marker is not None and marker["kind"] == "ingress-nginx", \
        "the reference page has no ingress-nginx table marker"
    rendered = reference_hook().ingress_nginx_annotations(ROOT / marker["args"])
    out: dict[str, list[str]] = {}
    for line in rendered.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            out.setdefault(cells[0].strip("`"), []).append(cells[1])
    return out


def test_every_annotation_is_in_the_docs_once_with_its_level() -> None:
    table = annotation_table()
    assert {name: levels for name, levels in table.items() if len(levels) > 1} == {}
    assert set(table) == set(compat.BY_NAME)
    assert {name: levels[0] for name, levels in table.items()} == \
        {a.name: a.level.value for a in compat.ANNOTATIONS}
    # What the parser reads is what the docs call supported.
    claimed = {name for name, levels in table.items() if levels[0] != "Not supported"}
    assert claimed == set(ingress_annotations.SUPPORTED)


def test_the_annotation_table_is_not_written_by_hand() -> None:
    """The page keeps its prose; the rows are the hook's."""
    page = (DOCS / "reference" / "ingress-annotations.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows == []


def test_the_readme_links_into_the_docs() -> None:
    """The README is not part of the site (mkdocs checks the site's links, not these)."""
    links = re.findall(r"\]\(((?:docs|charts|gateway-api|examples)/[^)#\s]*)",
                       (ROOT / "README.md").read_text())
    assert links
    assert [link for link in links if not (ROOT / link).exists()] == []
