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
def conformance(patterns: tuple[str, ...], data: Path | None, report_path: Path | None) -> None:
    """Run the Gateway API conformance tests whose names contain PATTERNS (default: all)."""
    from tests.conformance.profiles import upstream_report
    from tests.conformance.runner import report, run

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
