"""timing.png: where the wall time went per stage, and training s/it per logged step (cached vs live)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_timing(table: pd.DataFrame, runs: dict[str, pd.DataFrame], out_png: str | Path) -> None:
    """Bars of summed wall and CPU seconds per stage; a line of s/it per step for each training run."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, no global pyplot state
    bars, steps = fig.subplots(1, 2, width_ratios=[1.2, 1])
    y = range(len(table))
    for offset, column, label in ((-0.2, "wall_s_sum", "wall s (sum over jobs)"), (0.2, "cpu_s", "CPU s")):
        values = table[column]
        drawn = bars.barh([i + offset for i in y], values.fillna(0), height=0.4, label=label)
        text = ["" if pd.isna(v) else f"{v:.4g}" for v in values]  # blank where not run / not sampled
        bars.bar_label(drawn, labels=text, fontsize="x-small", padding=2)
    bars.set_yticks(list(y), table["stage"])
    bars.invert_yaxis()
    bars.set_xlabel("seconds")
    bars.set_title("per-stage time")
    bars.legend(fontsize="small")
    bars.margins(x=0.15)
    for label, metrics in runs.items():
        x = metrics["step"] if "step" in metrics else range(1, len(metrics) + 1)
        steps.plot(x, metrics["s_per_it"], marker=".", label=label)
    if runs:
        steps.legend(fontsize="small")
    else:
        steps.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=steps.transAxes)
    steps.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps.set_xlabel("optimizer step")
    steps.set_ylabel("s/it")
    steps.set_title("training step time")
    fig.savefig(out_png, dpi=100)
