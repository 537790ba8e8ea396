"""Layout metrics (LayoutGAN++ / LayoutDM protocol, on this project's feature network).

:func:`evaluate` returns one table row (dict) for a set of generated layouts against a reference
set (the test split):

* ``fid``: Fréchet distance between feature Gaussians of generated and reference layouts, features
  from :class:`pgraft.apps.layout.features.LayoutFeatureNet` (this project's network: numbers are
  comparable only under the same saved network, never to published FIDs);
* ``alignment``, ``overlap``, ``out_of_page``: means of the LayoutGAN++ scores of
  :mod:`pgraft.apps.layout.rewards` (lower is better). They are *raw* values: LayoutGAN++ and
  LayoutDM print alignment and overlap multiplied by 100, so 0.0021 here is 0.21 in their tables;
* ``max_iou``: LayoutGAN++ maximum IoU against the reference set (higher is better), with
  ``max_iou_coverage`` the fraction of the ``max_iou_n`` generated layouts entering it whose class
  multiset occurs among the ``max_iou_ref_n`` reference layouts entering it (only those can be
  matched; the others are left out of the mean, not counted as 0). Max-IoU is not comparable
  across reference sizes: it grows with ``max_iou_ref_n`` (more candidates per class multiset), so
  always read it with ``max_iou_ref_n`` and ``max_iou_coverage``;
* ``class_tv``: total-variation distance between the class frequencies of all generated elements
  and of all reference elements, 0.5 * sum_c |p_c - q_c| in [0, 1].
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import linalg
from scipy.optimize import linear_sum_assignment

from .data import Layouts, from_state
from .features import LayoutFeatureNet, layout_features
from .rewards import alignment, out_of_page, overlap


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of two feature sets [n, d] (float64)."""
    a, b = feats_a.double().cpu().numpy(), feats_b.double().cpu().numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(len(s_a))
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def class_tv(a: Layouts, b: Layouts) -> float:
    """Total variation between the class frequencies of all elements of ``a`` and of ``b``."""
    n = max(a.n_classes, b.n_classes)
    p = torch.bincount(a.classes[a.mask], minlength=n).double()
    q = torch.bincount(b.classes[b.mask], minlength=n).double()
    return float(0.5 * (p / p.sum().clamp_min(1) - q / q.sum().clamp_min(1)).abs().sum())


# ----------------------------------------------------------------------------- maximum IoU
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every centre box of a [n, 4] and of b [m, 4] -> [n, m] (0 for empty boxes)."""
    al, at, ar, ab = (a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2)
    bl, bt, br, bb = (b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2)
    iw = np.clip(np.minimum(ar[:, None], br[None]) - np.maximum(al[:, None], bl[None]), 0, None)
    ih = np.clip(np.minimum(ab[:, None], bb[None]) - np.maximum(at[:, None], bt[None]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2], 0, None) * np.clip(a[:, 3], 0, None)
    area_b = np.clip(b[:, 2], 0, None) * np.clip(b[:, 3], 0, None)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _pair_max_iou(la: tuple[np.ndarray, np.ndarray], lb: tuple[np.ndarray, np.ndarray]) -> float:
    """Two layouts with the same class multiset: per class, the best one-to-one box matching by
    IoU (Hungarian); sum of matched IoUs over all classes / number of elements."""
    (ba, ca), (bb, cb) = la, lb
    score = 0.0
    for c in np.unique(ca):
        iou = iou_matrix(ba[ca == c], bb[cb == c])
        r, k = linear_sum_assignment(iou, maximize=True)
        score += iou[r, k].sum()
    return score / len(ca)


def maximum_iou(generated: Layouts, reference: Layouts) -> tuple[float, float]:
    """LayoutGAN++ maximum IoU (Kikuchi et al. 2021; layout-dm ``compute_maximum_iou``).

    Layouts are grouped by their sorted class multiset; within each group present in both sets the
    generated and reference layouts are matched one-to-one (Hungarian, maximizing the pair score
    of :func:`_pair_max_iou`), and the matched scores are averaged over all groups. Returns
    (max_iou, coverage = fraction of generated layouts in a shared group); (0, 0) if none.
    A set compared with itself scores 1.
    """
    def groups(x: Layouts) -> dict[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]]:
        out: dict[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        boxes, classes, mask = x.boxes.double().numpy(), x.classes.numpy(), x.mask.numpy()
        for b, c, m in zip(boxes, classes, mask):
            out[tuple(sorted(c[m].tolist()))].append((b[m], c[m]))
        return out

    ga, gb = groups(generated), groups(reference)
    scores: list[float] = []
    for key in ga.keys() & gb.keys():
        A, B = ga[key], gb[key]
        mat = np.array([[_pair_max_iou(a, b) for b in B] for a in A])
        r, k = linear_sum_assignment(mat, maximize=True)
        scores.extend(mat[r, k].tolist())
    if not scores:
        return 0.0, 0.0
    covered = sum(len(ga[k]) for k in ga.keys() & gb.keys())
    return float(np.mean(scores)), covered / len(generated)


# ----------------------------------------------------------------------------- one row
def score_table(layouts: Layouts) -> pd.DataFrame:
    """Per-layout columns: n_elements, alignment, overlap, out_of_page (lower is better)."""
    return pd.DataFrame({
        "n_elements": layouts.counts().numpy(),
        "alignment": alignment(layouts.boxes, layouts.mask).numpy(),
        "overlap": overlap(layouts.boxes, layouts.mask).numpy(),
        "out_of_page": out_of_page(layouts.boxes, layouts.mask).numpy(),
    })


def describe(state: dict[str, torch.Tensor], class_names: tuple[str, ...]) -> pd.DataFrame:
    """:func:`score_table` of a diffusion state (the GraftProblem ``describe`` hook)."""
    return score_table(from_state(state, class_names))


def evaluate(generated: Layouts, reference: Layouts, feature_net: LayoutFeatureNet | None = None,
             max_iou_limit: int | None = 1000, reference_features: torch.Tensor | None = None) -> dict[str, Any]:
    """All metrics as one row (see the module docstring). ``max_iou_limit`` caps how many layouts
    of each set enter max-IoU, the first ones of each (its Hungarian matching is quadratic per
    class-multiset group; None = all): the row records the sizes used as ``max_iou_n`` (generated)
    and ``max_iou_ref_n`` (reference). ``reference_features`` may be passed to avoid recomputing
    them across rows. ``alignment`` and ``overlap`` are raw (LayoutGAN++ prints them ×100)."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("evaluate needs non-empty generated and reference sets")
    row: dict[str, Any] = {"n": len(generated)}
    table = score_table(generated)
    for col in ("alignment", "overlap", "out_of_page"):
        row[col] = float(table[col].mean())
    if feature_net is not None:
        fg = layout_features(feature_net, generated.boxes, generated.classes, generated.mask)
        fr = reference_features if reference_features is not None else layout_features(
            feature_net, reference.boxes, reference.classes, reference.mask)
        row["fid"] = frechet_distance(fg, fr)
    if max_iou_limit is not None and max_iou_limit < 1:
        raise ValueError(f"max_iou_limit must be >= 1 or None, got {max_iou_limit}")
    lim = slice(0, max_iou_limit)
    gen_used, ref_used = generated.subset(lim), reference.subset(lim)
    row["max_iou"], row["max_iou_coverage"] = maximum_iou(gen_used, ref_used)
    row["max_iou_n"], row["max_iou_ref_n"] = len(gen_used), len(ref_used)
    row["class_tv"] = class_tv(generated, reference)
    return row
