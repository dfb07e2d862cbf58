"""`python -m tests.netpol [PATTERN...] [--lab NAME] [--keep]`: the upstream Kubernetes
NetworkPolicy e2e cases (../shared/netpol) against a lab (brought up with two nodes if it does
not run; taken down after unless --keep). Development tooling: needs root."""

from __future__ import annotations

import argparse
import subprocess
import sys

from tests.netpol import runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", help="cases whose id contains one of these")
    parser.add_argument("--lab", default="netpol")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    args = parser.parse_args()
    if not runner.CASES.exists():
        raise SystemExit(f"{runner.CASES} is missing: the cases are read from ../shared")

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        lab = runner.lab_up(args.lab, args.nodes, log)
        results = runner.run(lab, args.patterns, log)
    finally:
        if not args.keep:
            subprocess.run([sys.executable, "-m", "mesh.cli", "lab", "down", "--name",
                            args.lab], cwd=runner.ROOT, capture_output=True)
    passed = sum(r.passed for r in results)
    probes = sum(r.probes for r in results)
    print(f"{passed} passed, {len(results) - passed} failed ({probes} probes, "
          f"{sum(r.seconds for r in results):.0f} s)")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
