"""The benchmarks' `--plot PATH`: their size series drawn as a PNG with matplotlib.

Each figure's footer names the command line that measured it (so a plot from a `--quick`
run says so) and the day. matplotlib is imported only when a plot is asked for.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# (x, y) points; a None y (not measured in this run) is left out of the line.
Series = Sequence[tuple[float, float | None]]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Series]
    logy: bool = False
    # Horizontal reference lines: label -> y (a target, say).
    targets: Mapping[str, float] = field(default_factory=dict)
    # Categories on the x axis instead of numbers: the points of each series are drawn
    # side by side per category (x is the category's index).
    categories: Sequence[str] = ()
    # False: points only (trials in order), no line between them; integer x ticks.
    lines: bool = True


def command_line() -> str:
    """How this run was started, as a reader would type it."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    args = [a for i, a in enumerate(sys.argv[1:])
            if a != "--plot" and (i == 0 or sys.argv[i] != "--plot")]
    return " ".join(["python", str(script), *args])


def save(path: Path, title: str, panels: Sequence[Panel]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 5.2 * len(panels)), 4.0),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(panel.series))
        for n, (label, points) in enumerate(panel.series.items()):
            pts = [(x, y) for x, y in points if y is not None]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if panel.categories:
                offset = (n - (len(panel.series) - 1) / 2) * width
                ax.bar([x + offset for x in xs], ys, width=width, label=label)
            elif panel.lines:
                ax.plot(xs, ys, marker="o", label=label)
            else:
                ax.plot(xs, ys, marker="o", linestyle="none", label=label)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for label, y in panel.targets.items():
            ax.axhline(y, linestyle="--", color="grey", linewidth=1)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")
        if panel.categories:
            ax.set_xticks(range(len(panel.categories)), list(panel.categories))
        if panel.logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.text(0.01, 0.01, f"{command_line()}, {datetime.date.today().isoformat()}, "
             f"{os.cpu_count()} cores", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)
