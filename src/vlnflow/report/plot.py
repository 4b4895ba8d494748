"""timing.png: where the wall time went per stage, training s/it per logged step (cached vs live), the
loss curve with the held-out (validation) loss at its evaluation steps, and the loss's parts (text,
action head, each answer segment: vlnflow.model.objective) per step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_timing(table: pd.DataFrame, runs: dict[str, pd.DataFrame], out_png: str | Path,
                val: dict[str, pd.DataFrame] | None = None) -> None:
    """Bars of summed wall and CPU seconds per stage; a line of s/it per step for each training run;
    training loss per step with `val` (label -> validation records: step, val_loss) as markers."""
    fig = Figure(figsize=(20, 4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, no global pyplot state
    bars, steps, losses, parts = fig.subplots(1, 4, width_ratios=[1.2, 1, 1, 1])
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
    _plot_losses(losses, runs, val or {})
    _plot_loss_parts(parts, runs)
    fig.savefig(out_png, dpi=100)


def _plot_losses(ax, runs: dict[str, pd.DataFrame], val: dict[str, pd.DataFrame]) -> None:
    """Training loss per logged step (line) and held-out loss per evaluation (markers), on a log scale when every
    value is positive."""
    drawn = False
    for label, metrics in runs.items():
        if "loss" in metrics:
            x = metrics["step"] if "step" in metrics else range(1, len(metrics) + 1)
            ax.plot(x, metrics["loss"], label=f"train ({label})")
            drawn = True
    for label, records in val.items():
        ax.plot(records["step"], records["val_loss"], marker="o", linestyle="--", label=f"validation ({label})")
        drawn = True
    if drawn:
        ax.legend(fontsize="small")
        if all((m["loss"] > 0).all() for m in runs.values() if "loss" in m) and all((r["val_loss"] > 0).all() for r in val.values()):
            ax.set_yscale("log")  # a run that learns falls by orders of magnitude: its late steps stay readable
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.set_title("loss")


# metrics.jsonl keys of the loss's parts, in legend order, and their legend names
LOSS_PARTS = {"loss_text_total": "text (weighted)", "loss_action_head": "action head", "loss_subinstruction": "SUBINSTRUCTION",
              "loss_2d": "2D_DESCRIPTION", "loss_3d": "3D_DESCRIPTION", "loss_action": "ACTION"}


def _plot_loss_parts(ax, runs: dict[str, pd.DataFrame]) -> None:
    """The first run's loss parts per step: text loss, the action head's cross-entropy, each answer segment's loss."""
    label, metrics = next(((k, m) for k, m in runs.items() if any(c in m for c in LOSS_PARTS)), (None, None))
    if metrics is None:
        ax.text(0.5, 0.5, "no loss parts logged", ha="center", va="center", transform=ax.transAxes)
    else:
        x = metrics["step"] if "step" in metrics else range(1, len(metrics) + 1)
        for key, name in LOSS_PARTS.items():
            if key in metrics and metrics[key].notna().any():
                ax.plot(x, metrics[key], marker=".", label=name)
        ax.legend(fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("loss by part" + (f" ({label})" if label else ""))
