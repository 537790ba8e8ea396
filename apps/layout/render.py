"""Render layouts as PNG pages: a grid of portrait pages, coloured class boxes with labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .data import Layouts  # noqa: E402

# page aspect (height / width) of A4 / US letter, the shape PubLayNet pages have
PAGE_ASPECT = 1.3


def render_grid(layouts: Layouts, path: str | Path, n_cols: int = 8, titles: Sequence[str] | None = None,
                page_aspect: float = PAGE_ASPECT, label_boxes: bool = True, dpi: int = 100) -> Path:
    """Draw each layout as a page (boxes in page units, y downwards) and save one PNG grid.

    Boxes that leave the page are drawn where they are (the page border shows it); a legend maps
    colours to ``layouts.class_names``. Returns the written path.
    """
    n = len(layouts)
    if n == 0:
        raise ValueError("nothing to render: no layouts")
    n_cols = max(1, min(n_cols, n))
    n_rows = math.ceil(n / n_cols)
    cmap = plt.get_cmap("tab10" if layouts.n_classes <= 10 else "tab20" if layouts.n_classes <= 20 else "gist_ncar")
    colors = [cmap(i / max(1, layouts.n_classes - 1)) if layouts.n_classes > 20 else cmap(i)
              for i in range(layouts.n_classes)]
    w = 1.6
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(w * n_cols, w * page_aspect * n_rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.add_patch(Rectangle((0, 0), 1, page_aspect, fill=False, lw=1.0, ec="black"))
        boxes, classes, mask = layouts.boxes[k], layouts.classes[k], layouts.mask[k]
        for (xc, yc, bw, bh), c in zip(boxes[mask].tolist(), classes[mask].tolist()):
            color = colors[c] if 0 <= c < len(colors) else (0.5, 0.5, 0.5, 1.0)
            # page y runs downwards; matplotlib's upwards, hence the flip
            x0, y0 = xc - bw / 2, (1 - (yc + bh / 2)) * page_aspect
            ax.add_patch(Rectangle((x0, y0), bw, bh * page_aspect, fc=(*color[:3], 0.35), ec=color, lw=0.8))
            if label_boxes and bw * bh > 0.004:
                name = layouts.class_names[c] if 0 <= c < len(colors) else "?"
                ax.text(x0 + 0.01, y0 + bh * page_aspect - 0.01, name, fontsize=4, va="top", ha="left")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, page_aspect + 0.05)
        ax.set_aspect("equal")
        if titles is not None and k < len(titles):
            ax.set_title(titles[k], fontsize=6)
    handles = [Patch(fc=(*colors[i][:3], 0.35), ec=colors[i], label=name) for i, name in enumerate(layouts.class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
