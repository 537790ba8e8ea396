"""Plots every app writes next to its results (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_rounds(table: pd.DataFrame, columns: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One panel per metric column against ``round`` (train rounds as a line, the final eval as a star)."""
    columns = [c for c in columns if c in table.columns]
    if not columns:
        raise ValueError(f"none of the columns {list(columns)} are in the metrics table ({list(table.columns)})")
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    phase = table["phase"] if "phase" in table else pd.Series(["train"] * len(table))
    for ax, col in zip(axes[0], columns):
        train = table[phase == "train"]
        ax.plot(train["round"], train[col], "o-", label="candidates of round (current model)")
        final = table[phase == "eval"]
        if len(final):
            ax.plot(final["round"], final[col], "*", ms=12, label="final model")
        ax.set_xlabel("round")
        ax.set_title(col)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
