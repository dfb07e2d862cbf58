"""The Gateway API conformance data (../shared/conformance), read at run time.

Manifests get our GatewayClass and controller name; Deployments become "pods" (local echo
processes, see backends.py); cases are the upstream request/expectation pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GATEWAY_CLASS = "mesh-conformance"
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / \
    "gateway-api-v1.6.1"


@dataclass(frozen=True)
class ConformanceTest:
    name: str  # the file's stem, e.g. httproute-simple-same-namespace
    short_name: str
    features: tuple[str, ...]
    manifests: tuple[Path, ...]
    gateways: tuple[str, ...]
    cases: tuple[dict[str, Any], ...]
    provisional: bool


class Suite:
    def __init__(self, data: Path = DEFAULT_DATA, controller: str = "") -> None:
        if not (data / "cases.json").exists():
            raise FileNotFoundError(f"no conformance data in {data}")
        self.data = data
        self.controller = controller

    def substitute(self, text: str) -> str:
        return text.replace("{GATEWAY_CLASS_NAME}", GATEWAY_CLASS).replace(
            "{GATEWAY_CONTROLLER_NAME}", self.controller)

    def documents(self, path: Path) -> list[dict[str, Any]]:
        text = self.substitute((self.data / path).read_text())
        return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]

    def base(self) -> list[dict[str, Any]]:
        gateway_class = {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS},
            "spec": {"controllerName": self.controller},
        }
        return [gateway_class, *self.documents(Path("base-manifests.yaml"))]

    def tests(self) -> list[ConformanceTest]:
        raw = json.loads((self.data / "cases.json").read_text())
        out = []
        for name, t in sorted(raw.items()):
            out.append(ConformanceTest(
                name=name,
                short_name=t.get("shortName") or name,
                features=tuple(t.get("features", [])),
                manifests=tuple(Path(m) for m in t.get("manifests", [])),
                gateways=tuple(t.get("gateways") or ()),
                cases=tuple(t.get("cases", [])),
                provisional=bool(t.get("provisional")),
            ))
        return out
