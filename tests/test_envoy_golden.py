"""Golden files for the Envoy sink alone: the translator's expected IR in
(tests/golden/translate/expected/*.ir.yaml: the IR as a test input, as Envoy Gateway's
testdata/in/xds-ir), Envoy resources out (expected/*.envoy.yaml beside it). UPDATE_GOLDEN=1
rewrites the Envoy files from the IR files after a deliberate change (test_translate_golden
rewrites the IR files and these after them); then read the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from mesh import ir
from mesh.sinks.envoy.translate import EnvoyCache, to_envoy
from meshxds import types
from tests import ircodec
from tests.ircodec import decode, encode, sorted_maps

EXPECTED = Path(__file__).parent / "golden" / "translate" / "expected"
CASES = sorted(p.name.removesuffix(".ir.yaml") for p in EXPECTED.glob("*.ir.yaml"))


def load_ir(case: str) -> ir.IR:
    return ircodec.load((EXPECTED / f"{case}.ir.yaml").read_text())


def resources(model: ir.IR, cache: EnvoyCache | None = None) -> dict[str, Any]:
    envoy = to_envoy(model, cache)
    out = sorted(
        ({"@type": types.type_url_of(m),
          **sorted_maps(json.loads(json_format.MessageToJson(m)))}
         for m in envoy.resources),
        key=lambda d: (types.PUSH_ORDER.index(d["@type"]), d.get("name") or
                       d.get("clusterName", "")))
    return {"resources": out,
            "owned": {str(k): sorted(f"{types.SHORT_NAMES[t]}/{n}" for t, n in v)
                      for k, v in sorted(envoy.owned.items())}}


def test_the_ir_codec_round_trips() -> None:
    for case in CASES:
        model = load_ir(case)
        assert decode(ir.IR, yaml.safe_load(yaml.safe_dump(encode(model)))) == model


def envoy_text(model: ir.IR) -> str:
    return yaml.safe_dump(resources(model), sort_keys=False, width=100)


def update(case: str) -> None:
    """Rewrite a case's Envoy file from its IR file."""
    (EXPECTED / f"{case}.envoy.yaml").write_text(envoy_text(load_ir(case)))


@pytest.mark.parametrize("case", CASES)
def test_envoy_resources_match_golden_files(case: str) -> None:
    if os.environ.get("UPDATE_GOLDEN"):
        update(case)
    got = envoy_text(load_ir(case))
    path = EXPECTED / f"{case}.envoy.yaml"
    assert got == path.read_text(), f"{case}: differs from {path}"


def test_the_cached_conversion_equals_a_fresh_one() -> None:
    """Virtual hosts and routes equal to last time's reuse their messages: the bytes must be
    those of a conversion from scratch, whichever IR came before."""
    cache = EnvoyCache()
    for case in [*CASES, *reversed(CASES)]:
        model = load_ir(case)
        cached = [m.SerializeToString(deterministic=True)
                  for m in to_envoy(model, cache).resources]
        fresh = [m.SerializeToString(deterministic=True) for m in to_envoy(model).resources]
        assert cached == fresh, case
