"""The Gateway API conformance suite (../shared/conformance) against a real `mesh run`.

Every test must pass, every case in the data run. A test is skipped only when it does not
apply to this implementation (TCPRoute and UDPRoute, outside the three profiles; tests for
implementations without a feature this one has; resources generated per Gateway): the
runner's NOT_APPLICABLE list, with the reason.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conformance.mesh import MESH_DATA
from tests.conformance.mesh import run as mesh_run
from tests.conformance.profiles import upstream_report
from tests.conformance.runner import NOT_APPLICABLE, report, run
from tests.conformance.suite import DEFAULT_DATA

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.skipif(not (DEFAULT_DATA / "cases.json").exists(),
                    reason="the conformance data lives in ../shared/conformance beside the repo")
def test_conformance_suite() -> None:
    lines: list[str] = []
    results = run([], log=lines.append)
    print("\n".join(lines))
    print(report(results))
    failed = [f"{r.test.name}: {r.detail}" for r in results if r.outcome == "FAIL"]
    assert not failed, "\n".join(failed)
    # Every case the runner replays was judged: a silent runner must not look green.
    replayed = [c for r in results for c in r.cases]
    assert replayed and all(c[1] == "PASS" for c in replayed)
    assert len(results) == len({r.test.name for r in results}) > 100
    skipped = [r for r in results if r.outcome == "SKIP"]
    assert all(r.detail in NOT_APPLICABLE.values() for r in skipped), \
        [f"{r.test.name}: {r.detail}" for r in skipped if r.detail not in NOT_APPLICABLE.values()]
    not_run = [f"{r.test.name}: {r.detail}" for r in results if "not run" in r.detail]
    assert not not_run, not_run
    # The report in the upstream format covers the three profiles, with nothing failed.
    doc = yaml.safe_load(upstream_report(results))
    assert [p["name"] for p in doc["profiles"]] == ["GATEWAY-HTTP", "GATEWAY-GRPC",
                                                    "GATEWAY-TLS"]
    for p in doc["profiles"]:
        assert p["core"]["statistics"]["Failed"] == 0 and p["core"]["statistics"]["Passed"] > 0
        print(p["name"], p["core"]["statistics"], p["extended"]["statistics"])


@pytest.mark.netns
@pytest.mark.skipif(not (MESH_DATA / "cases.json").exists(),
                    reason="the conformance data lives in ../shared/conformance beside the repo")
def test_mesh_conformance_in_the_lab() -> None:
    """MESH-HTTP (GAMMA): every test of the mesh data and its variants, in a two-node lab,
    sent from the client pods; every case passes."""
    lines: list[str] = []
    results = mesh_run([], log=lines.append)
    print("\n".join(lines))
    failed = [f"{r.name}: {r.detail}" for r in results if r.outcome != "PASS"]
    assert not failed, "\n".join(failed)
    cases = [c for r in results for c in r.cases]
    assert len(results) >= 17 and len(cases) >= 50 and all(c[1] == "PASS" for c in cases)
    doc = yaml.safe_load(upstream_report(results))
    mesh_http = next(p for p in doc["profiles"] if p["name"] == "MESH-HTTP")
    assert mesh_http["core"]["result"] == "success", mesh_http
    assert mesh_http["extended"]["result"] == "success", mesh_http
