"""The exact programmatic GenEval-style checker for the embedded world.

Detection: every pixel is assigned to the nearest palette colour if it is within ``color_tol`` of
it (in [0,1] RGB; dark pixels are background), each colour mask is split into 8-connected
components, components smaller than ``min_area`` are noise, and a component's shape is the world
shape whose template, fitted to the component's bounding box, has the highest IoU with it.

Correctness (GenEval's rules, on detected objects):

=============  ============================================================
single_object  >= 1 object of the shape
two_object     >= 1 of each shape
counting       exactly n objects of the shape
colors         >= 1 object of the shape, and every object of that shape has the colour
position       >= 1 of each shape, and some pair lies in the relation
               (GenEval's ``relative_position``, see :func:`relative_position`)
color_attr     >= 1 object of each (colour, shape)
=============  ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from .world import CATEGORIES, COLORS, PALETTE, SHAPES, PromptSpec, parse_prompt, shape_template


@dataclass(frozen=True)
class Detection:
    """One detected object: centroid (x, y), bounding-box size (w, h) and area, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    w: int
    h: int
    area: int


@dataclass(frozen=True)
class CheckerConfig:
    # palette colours are >= 1 apart; generated pixels are noisy (0.45 -> 0.6 took the checker from
    # 55% to ~78% on lightly re-noised renders of a 300-step model, with rendered truth still at 100%)
    color_tol: float = 0.6
    min_area_frac: float = 0.012  # of the image area: 12 px at 32x32
    position_margin: float = 0.1


_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [C, 3]
_EIGHT = np.ones((3, 3), dtype=bool)


# continuous bounding-box width of each shape in units of its radius r (see world.shape_mask)
_EXTENT = {"circle": (2.0, 2.0), "square": (1.7, 1.7), "triangle": (2.0, 1.8), "diamond": (2.2, 2.2)}


def classify_shape(mask: np.ndarray, cfg: "CheckerConfig | None" = None) -> str:
    """Shape of one connected component (bool [h, w] cropped to its bounding box).

    Template matching: for every shape of the world, the renderer's own mask is fitted to the
    component's bounding box (centre and radius from the box, refined over a small grid of
    sub-pixel shifts and radii, since pixelization moves the box by up to a pixel) and the shape
    with the highest IoU wins. Scale-free, and tolerant of a few flipped pixels.
    """
    mask = np.pad(mask, 1)
    h, w = mask.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cx0, cy0 = w / 2, h / 2
    shifts = np.array([-0.3, 0.0, 0.3])
    best, best_iou = "circle", -1.0
    for shape in SHAPES:
        kx, ky = _EXTENT[shape]
        r0 = 0.5 * ((w - 2) / kx + (h - 2) / ky)
        r = (r0 + shifts)[:, None, None, None, None]
        dx = x[None, None, None] - (cx0 + shifts)[None, :, None, None, None]
        dy = y[None, None, None] - (cy0 + shifts)[None, None, :, None, None]
        templ = _template(shape, dx, dy, r)  # [3, 3, 3, h, w]
        inter = (templ & mask).sum((-1, -2))
        union = (templ | mask).sum((-1, -2))
        iou = float((inter / np.maximum(union, 1)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _template(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Vectorised :func:`world.shape_template` (one geometry for drawing and checking)."""
    return shape_template(shape, dx, dy, r)


def color_labels(image: torch.Tensor, cfg: CheckerConfig = CheckerConfig()) -> np.ndarray:
    """Per-pixel palette index (or -1 for background / no colour): int [H, W] from [3, H, W] in [-1, 1]."""
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # [H, W, 3]
    d = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, C]
    best = d.argmin(-1)
    return np.where(d.min(-1) <= cfg.color_tol, best, -1)


def detect(image: torch.Tensor, cfg: CheckerConfig = CheckerConfig()) -> list[Detection]:
    """All objects in one image [3, H, W] in [-1, 1]."""
    labels = color_labels(image, cfg)
    min_area = max(2, int(round(cfg.min_area_frac * labels.size)))
    found: list[Detection] = []
    for ci, color in enumerate(COLORS):
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            found.append(Detection(classify_shape(mask), color, float(xs.mean() + sl[1].start + 0.5),
                                   float(ys.mean() + sl[0].start + 0.5), mask.shape[1], mask.shape[0], area))
    return found


def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> set[str]:
    """GenEval's relations of ``a`` to ``b``: the centroid offset, shrunk per axis by
    ``threshold`` x (sum of the two box sizes), normalised by the raw offset length; a relation
    holds when its axis component exceeds 0.5 (so the named axis must dominate)."""
    off = np.array([a.cx - b.cx, a.cy - b.cy])
    dims = np.array([a.w + b.w, a.h + b.h], dtype=np.float64)
    revised = np.maximum(np.abs(off) - threshold * dims, 0) * np.sign(off)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(off)
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


def check_spec(spec: PromptSpec, objects: list[Detection], size: int, cfg: CheckerConfig = CheckerConfig()) -> bool:
    """GenEval's correctness rule for one parsed prompt on the detected objects (module docstring)."""
    def of(shape: str, color: str | None = None) -> list[Detection]:
        return [d for d in objects if d.shape == shape and (color is None or d.color == color)]

    o = spec.objects
    if spec.category == "single_object":
        return len(of(o[0].shape)) >= 1
    if spec.category == "two_object":
        return len(of(o[0].shape)) >= 1 and len(of(o[1].shape)) >= 1
    if spec.category == "counting":
        return len(of(o[0].shape)) == o[0].count
    if spec.category == "colors":
        found = of(o[0].shape)
        return len(found) >= 1 and all(d.color == o[0].color for d in found)
    if spec.category == "position":
        return any(spec.relation in relative_position(a, b, cfg.position_margin)
                   for a in of(o[0].shape) for b in of(o[1].shape))
    if spec.category == "color_attr":
        return len(of(o[0].shape, o[0].color)) >= 1 and len(of(o[1].shape, o[1].color)) >= 1
    raise ValueError(f"unknown category {spec.category!r}")


def check(images: torch.Tensor, prompts: list[str], cfg: CheckerConfig = CheckerConfig()) -> torch.Tensor:
    """Per-image correctness (bool [B]) of ``images`` [B, 3, H, W] for ``prompts`` (grammar captions)."""
    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(f"need images [B, 3, H, W] and B prompts, got {tuple(images.shape)} and {len(prompts)}")
    specs = [parse_prompt(p) for p in prompts]
    size = images.shape[-1]
    return torch.tensor([check_spec(s, detect(img, cfg), size, cfg) for s, img in zip(specs, images)])


def accuracy_table(prompts: list[str], correct: torch.Tensor | np.ndarray | list[bool], name: str = "") -> pd.DataFrame:
    """GenEval-style one-row table: per-category accuracy and ``overall`` = their mean.

    As in GenEval, ``overall`` averages the categories (each category weighs the same, whatever
    its number of prompts); categories absent from ``prompts`` are NaN and left out of the mean.
    """
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(correct)} correctness values")
    cats = np.array([parse_prompt(p).category for p in prompts])
    row = {c: float(correct[cats == c].mean()) if (cats == c).any() else float("nan") for c in CATEGORIES}
    present = [v for v in row.values() if not np.isnan(v)]
    row = {"overall": float(np.mean(present)) if present else float("nan"), **row, "n": len(prompts)}
    return pd.DataFrame([row], index=[name] if name else None)
