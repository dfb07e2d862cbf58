"""The ingress-nginx e2e case runner: `python -m tests.ingress_nginx [-k SUBSTRING]`.

Development tooling, not part of the product: it runs the real agent (`mesh run`) and real
Envoy on the cases transcribed from ingress-nginx's e2e annotation tests
(../shared/ingress-nginx/cases.yaml) and judges the requests they send.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mesh import logs


@click.command()
@click.option("-k", "pattern", help="Only the cases whose id contains SUBSTRING (or whose "
              "annotation is SUBSTRING).", metavar="SUBSTRING")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The cases' directory (default: ../shared/ingress-nginx).")
@click.option("-v", "--verbose", is_flag=True,
              help="Every request and its outcome, the agent's warnings on each case's "
              "Ingresses, where the agents' logs are.")
@click.option("--retry", type=float, default=10.0, show_default=True,
              help="Seconds the first request of a step is retried until it passes.")
def ingress_nginx(pattern: str | None, data: Path | None, verbose: bool, retry: float) -> None:
    """Run ingress-nginx's e2e annotation cases against a real `mesh run`."""
    from tests.ingress_nginx.runner import report, run

    result = run(pattern, data, log=click.echo, verbose=verbose, retry=retry)
    click.echo(report(result))
    if not result.results:
        click.echo("no case selected", err=True)
        sys.exit(2)
    if any(r.outcome != "PASS" for r in result.results):
        sys.exit(1)


if __name__ == "__main__":
    logs.setup("warning", "text")
    ingress_nginx()
