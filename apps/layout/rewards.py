"""Layout quality scores (alignment, overlap, out-of-page) and the rewards built from them.

All scores take page-unit centre boxes ``boxes`` Float[B, N, 4] = (xc, yc, w, h) and ``mask``
Bool[B, N] (True = real element) and return Float[B]; *lower is better* for every score. Rewards
are plain callables ``reward(state, cond) -> Float[B]`` on the diffusion state
(``{"boxes": z = 2b - 1, "classes", "mask"}``, see :mod:`pgraft.apps.layout.data`) and are the
*negated* scores, so that higher is better as GRS expects. They never raise on odd samples
(negative sizes, boxes off the page): those get a finite, bad score.

Definitions follow LayoutGAN++ (Kikuchi et al., ACM MM 2021) as implemented in layout-dm
(CyberAgentAILab/layout-dm, ``trainer/helpers/metric.py``: ``alignment-LayoutGAN++`` and
``overlap-LayoutGAN++``), with one deliberate difference: padded slots are excluded as *partners*
too (layout-dm masks them only as rows in the alignment, so a zero padding box can "align" with an
element at the page's left edge).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .data import state_to_page

Reward = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]

# -log(1 - d) is infinite at d = 1; element distances beyond the page are clamped here so that
# the score of a wild sample stays finite (-log(1e-6) ~ 13.8 per element).
_MAX_ALIGN_DISTANCE = 1.0 - 1e-6


def xywh_to_ltrb(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centre boxes [..., 4] -> (left, top, right, bottom), each [...]."""
    xc, yc, w, h = boxes.unbind(-1)
    return xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool[B, N, N]: both elements real and i != j."""
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye


def alignment(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LayoutGAN++ alignment: mean over elements of -log(1 - d_i), Float[B] (0 = perfectly aligned).

    d_i = min over other real elements j and over the six lines k in (left, x-centre, right, top,
    y-centre, bottom) of |k_i - k_j|: how far element i is from sharing *any* alignment line with
    *any* other element. An element with no partner contributes 0 (layout-dm convention), and the
    sum is divided by the number of real elements. Example: a 2x2 grid of equal boxes -> 0.
    """
    l, t, r, b = xywh_to_ltrb(boxes)
    lines = torch.stack([l, boxes[..., 0], r, t, boxes[..., 1], b], dim=-1)  # [B, N, 6]
    diff = (lines.unsqueeze(2) - lines.unsqueeze(1)).abs()  # [B, N(i), N(j), 6]
    pairs = _pair_mask(mask)
    diff = diff.masked_fill(~pairs.unsqueeze(-1), float("inf"))
    d = diff.amin(dim=(2, 3))  # [B, N]
    has_partner = pairs.any(2) & mask
    d = torch.where(has_partner, d, torch.zeros_like(d)).clamp(0.0, _MAX_ALIGN_DISTANCE)
    per_elem = -torch.log1p(-d)
    n = mask.sum(1).clamp_min(1)
    return (per_elem * mask).sum(1) / n


def intersection_areas(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas Float[B, N, N] (0 where disjoint; negative sizes count as empty)."""
    l, t, r, b = xywh_to_ltrb(boxes)
    iw = (torch.minimum(r.unsqueeze(2), r.unsqueeze(1)) - torch.maximum(l.unsqueeze(2), l.unsqueeze(1))).clamp_min(0)
    ih = (torch.minimum(b.unsqueeze(2), b.unsqueeze(1)) - torch.maximum(t.unsqueeze(2), t.unsqueeze(1))).clamp_min(0)
    w, h = boxes[..., 2].clamp_min(0), boxes[..., 3].clamp_min(0)
    # a box with w or h <= 0 has no area and meets nothing
    valid = (w > 0) & (h > 0)
    inter = iw * ih
    return inter * (valid.unsqueeze(2) & valid.unsqueeze(1))


def overlap(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LayoutGAN++ overlap: (1/n) sum_{i != j} area(i ∩ j) / area(i), Float[B] (0 = no overlap).

    Normalization: the sum over *ordered* pairs of real elements divided by the number n of real
    elements. Two identical boxes give (1 + 1) / 2 = 1 exactly; a box inside a box twice its area
    gives (1 + 1/2) / 2 = 0.75. (The un-normalized sum, "overlap-ACLayoutGAN" in layout-dm, gives 2.)
    """
    inter = intersection_areas(boxes)
    area = (boxes[..., 2].clamp_min(0) * boxes[..., 3].clamp_min(0)).unsqueeze(2)  # area of i
    ratio = torch.where(area > 0, inter / area.clamp_min(1e-12), torch.zeros_like(inter))
    ratio = ratio * _pair_mask(mask)
    return ratio.sum((1, 2)) / mask.sum(1).clamp_min(1)


def out_of_page(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real elements of how far the box leaves the page [0, 1]^2 or has negative size.

    per element: relu(-l) + relu(-t) + relu(r - 1) + relu(b - 1) + relu(-w) + relu(-h), in page
    units; 0 for every box inside the page. Float[B].
    """
    l, t, r, b = xywh_to_ltrb(boxes)
    relu = torch.relu
    per = relu(-l) + relu(-t) + relu(r - 1) + relu(b - 1) + relu(-boxes[..., 2]) + relu(-boxes[..., 3])
    return (per * mask).sum(1) / mask.sum(1).clamp_min(1)


SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "alignment": alignment,
    "overlap": overlap,
    "out_of_page": out_of_page,
}


# ----------------------------------------------------------------------------- rewards
def _page(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = state_to_page(state["boxes"].float())
    boxes = torch.nan_to_num(boxes, nan=10.0, posinf=10.0, neginf=-10.0)  # a NaN sample is just far off
    return boxes, state["mask"].bool()


def alignment_reward(state: Mapping[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
    """-alignment (higher is better; 0 is perfect)."""
    return -alignment(*_page(state))


def overlap_reward(state: Mapping[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
    """-overlap (higher is better; 0 is no overlap)."""
    return -overlap(*_page(state))


def out_of_page_reward(state: Mapping[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
    """-out_of_page (higher is better; 0 when every box is on the page)."""
    return -out_of_page(*_page(state))


# Default weights give each score a similar spread over base-model samples, so none of them decides
# the GRS ranking alone. Measured on 256 samples of a 1500-step default-preset base (synthetic pages):
# alignment mean 0.0037 / std 0.0035, overlap mean 0.69 / std 0.34, out-of-page mean 0.0008 /
# std 0.0016 (training pages: alignment 0.0008, overlap 0.021, out-of-page 0). Hence x100 for
# alignment and out-of-page.
DEFAULT_WEIGHTS: dict[str, float] = {"alignment": 100.0, "overlap": 1.0, "out_of_page": 100.0}


def combined_reward(weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Reward:
    """Reward -(sum_k weights[k] * score_k) over ``SCORES`` names; returns a plain callable."""
    unknown = set(weights) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown score(s) {sorted(unknown)}; choose from {sorted(SCORES)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0, got {dict(weights)}")
    frozen = dict(weights)

    def reward(state: Mapping[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
        boxes, mask = _page(state)
        total = torch.zeros(boxes.shape[0], device=boxes.device)
        for name, w in frozen.items():
            if w:
                total = total + w * SCORES[name](boxes, mask)
        return -total

    reward.__name__ = "combined_reward"
    reward.__doc__ = f"-({' + '.join(f'{w:g}*{k}' for k, w in frozen.items())})"
    return reward


REWARDS: dict[str, Reward] = {
    "alignment": alignment_reward,
    "overlap": overlap_reward,
    "out_of_page": out_of_page_reward,
    "combined": combined_reward(),
}

# A true upper bound of each reward, known before sampling (``--rule rs``'s default --reward-max):
# every score is >= 0 (alignment's -log(1 - d) with d in [0, 1), overlap's area ratios, out-of-page's
# relus) and the combined weights are >= 0, so every reward, a negated score, is <= 0.
REWARD_MAX: dict[str, float] = {name: 0.0 for name in REWARDS}
