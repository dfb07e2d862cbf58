"""The Gateway API conformance runner: `python -m tests.conformance [PATTERN...]`.

Development tooling, not part of the product: it runs the real agent (`mesh run`) and real
Envoy on the upstream suite's manifests and judges the requests it sends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mesh import logs


@click.command()
@click.argument("patterns", nargs=-1)
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Conformance data (default: ../shared/conformance/gateway-api-v1.6.1).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the report in the upstream format (ConformanceReport YAML).")
@click.option("--mesh", is_flag=True,
              help="Run the mesh profiles (GAMMA) in a lab instead: needs root.")
def conformance(patterns: tuple[str, ...], data: Path | None, report_path: Path | None,
                mesh: bool) -> None:
    """Run the Gateway API conformance tests whose names contain PATTERNS (default: all)."""
    from tests.conformance.profiles import upstream_report
    from tests.conformance.runner import report, run

    if mesh:
        from tests.conformance import mesh as mesh_suite

        mesh_results = mesh_suite.run(list(patterns), log=click.echo)
        passed = sum(r.outcome == "PASS" for r in mesh_results)
        cases = [c for r in mesh_results for c in r.cases]
        click.echo(f"mesh tests: {passed} passed, {len(mesh_results) - passed} failed; cases: "
                   f"{sum(c[1] == 'PASS' for c in cases)} passed of {len(cases)}")
        if report_path is not None:
            report_path.write_text(upstream_report(mesh_results))
        if passed != len(mesh_results):
            sys.exit(1)
        return
    results = run(list(patterns), log=click.echo, data=data)
    click.echo(report(results))
    if report_path is not None:
        report_path.write_text(upstream_report(results))
        click.echo(f"upstream-format report written to {report_path}")
    if any(r.outcome == "FAIL" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    logs.setup("info", "text")
    conformance()
