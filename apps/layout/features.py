"""This project's layout feature network for layout FID (not comparable to published FIDs).

LayoutGAN++ / LayoutDM compute layout FID on the features of a network trained on the dataset
(FIDNetV3: a transformer trained to tell real layouts from perturbed ones and to reconstruct them).
No such weights can be downloaded here, so the app trains its own, in the same spirit and in under
two minutes on one CPU core:

* a permutation-invariant transformer encoder over the elements (box + class embeddings, a learned
  [CLS] token, no positions); the feature is the [CLS] output, Float[B, d_model];
* trained on real pages vs. corrupted ones (boxes jittered at a random scale, elements replaced by
  random boxes, classes reassigned, elements dropped or duplicated) with a logistic loss, plus a
  regression of per-class statistics (element count and mean box of each class) from the feature,
  which keeps the feature informative about *what* is on the page and not only about realism.

FIDs computed with different feature networks (other seeds, data, sizes) are not comparable:
always compare methods under one saved network (``save_pretrained`` directory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgraft.core.checkpoint import load_pretrained, save_pretrained

from .data import PAD_CLASS, Layouts


class LayoutFeatureNet(nn.Module):
    """Transformer encoder over a set of page-unit boxes and classes -> feature [B, d_model]."""

    def __init__(self, n_classes: int = 5, d_model: int = 64, n_layers: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.n_classes, self.d_model = n_classes, d_model
        self.box_in = nn.Sequential(nn.Linear(4, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.class_in = nn.Embedding(n_classes + 1, d_model)  # last row: padding (never attended)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.real_head = nn.Linear(d_model, 1)
        self.stats_head = nn.Linear(d_model, 5 * n_classes)

    def features(self, boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """boxes Float[B, N, 4] (page units), classes Long[B, N], mask Bool[B, N] -> Float[B, d]."""
        tokens = torch.where(mask, classes.clamp(0, self.n_classes - 1), self.n_classes)
        h = self.box_in(boxes.float().clamp(-2.0, 3.0)) + self.class_in(tokens)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask.bool()], dim=1)
        return self.norm(self.encoder(h, src_key_padding_mask=pad)[:, 0])

    def forward(self, boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(boxes, classes, mask)
        return {"features": f, "real_logit": self.real_head(f).squeeze(-1), "stats": self.stats_head(f)}


def class_stats(boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class [count / 5, mean box (4)] flattened: Float[B, 5 * n_classes] (zeros for absent classes)."""
    onehot = nn.functional.one_hot(classes.clamp(0, n_classes - 1), n_classes).float() * mask.unsqueeze(-1)
    count = onehot.sum(1)  # [B, C]
    mean_box = torch.einsum("bnc,bnk->bck", onehot, boxes.float()) / count.clamp_min(1).unsqueeze(-1)
    return torch.cat([count.unsqueeze(-1) / 5.0, mean_box], -1).flatten(1)


def corrupt(boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, n_classes: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake layouts from real ones: each row gets one corruption drawn uniformly from
    (jitter all boxes at scale 10^U(-2.5, -0.5), replace ~30% of elements by uniform random boxes,
    reassign ~40% of classes at random, drop ~30% of elements, duplicate-and-shift elements)."""
    B, N, _ = boxes.shape
    kind = torch.randint(0, 5, (B,), generator=generator)
    u = torch.rand(B, N, generator=generator)
    boxes, classes, mask = boxes.clone(), classes.clone(), mask.clone()
    scale = 10 ** (-2.5 + 2.0 * torch.rand(B, 1, 1, generator=generator))
    jitter = torch.randn(B, N, 4, generator=generator) * scale
    boxes = torch.where((kind == 0).view(B, 1, 1), boxes + jitter, boxes)
    rand_box = torch.rand(B, N, 4, generator=generator)
    rand_box = torch.stack([rand_box[..., 0], rand_box[..., 1], 0.05 + 0.6 * rand_box[..., 2],
                            0.02 + 0.3 * rand_box[..., 3]], -1)
    replace = (kind == 1).view(B, 1) & (u < 0.3) & mask
    boxes = torch.where(replace.unsqueeze(-1), rand_box, boxes)
    recls = (kind == 2).view(B, 1) & (u < 0.4) & mask
    classes = torch.where(recls, torch.randint(0, n_classes, (B, N), generator=generator), classes)
    drop = (kind == 3).view(B, 1) & (u < 0.3) & mask
    keep_one = mask & ~drop
    drop = drop & keep_one.any(1, keepdim=True)  # never empty a page
    mask = mask & ~drop
    # duplicate: padded slots take a shifted copy of a random real element
    src = torch.multinomial(mask.float() + 1e-9, N, replacement=True, generator=generator)
    dup = (kind == 4).view(B, 1) & ~mask & (u < 0.5)
    shifted = torch.gather(boxes, 1, src.unsqueeze(-1).expand(-1, -1, 4)) + torch.randn(B, N, 4, generator=generator) * 0.05
    boxes = torch.where(dup.unsqueeze(-1), shifted, boxes)
    classes = torch.where(dup, torch.gather(classes, 1, src), classes)
    mask = mask | dup
    classes = torch.where(mask, classes, torch.full_like(classes, PAD_CLASS))
    return boxes * mask.unsqueeze(-1), classes, mask


@dataclass(frozen=True)
class FeatureTrainConfig:
    """Defaults: ~0.075 s of CPU per step on one thread (64 real + 64 corrupted pages), so the
    1500 steps take ~2 min."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    stats_weight: float = 1.0


def train_feature_net(data: Layouts, config: FeatureTrainConfig = FeatureTrainConfig(),
                      directory: str | Path | None = None, log_every: int = 0) -> LayoutFeatureNet:
    """Train :class:`LayoutFeatureNet` on real layouts ``data``; save it to ``directory`` if given.

    loss = BCE(real vs corrupted) + stats_weight * MSE(class stats of the real rows).
    """
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    kwargs: dict[str, Any] = {"n_classes": data.n_classes, "d_model": config.d_model,
                              "n_layers": config.n_layers, "n_heads": config.n_heads}
    net = LayoutFeatureNet(**kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    t0 = time.time()
    for it in range(config.steps):
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        b, c, m = data.boxes[idx], data.classes[idx], data.mask[idx]
        fb, fc, fm = corrupt(b, c, m, data.n_classes, g)
        out = net(torch.cat([b, fb]), torch.cat([c, fc]), torch.cat([m, fm]))
        target = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
        bce = nn.functional.binary_cross_entropy_with_logits(out["real_logit"], target)
        mse = ((out["stats"][: len(idx)] - class_stats(b, c, m, data.n_classes)) ** 2).mean()
        loss = bce + config.stats_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (it + 1) % log_every == 0:
            acc = ((out["real_logit"] > 0).float() == target).float().mean().item()
            print(f"feature net step {it + 1}: bce {bce.item():.3f} acc {acc:.3f} stats {mse.item():.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    net.eval()
    if directory is not None:
        save_pretrained(net, kwargs, directory)
    return net


def load_feature_net(directory: str | Path) -> LayoutFeatureNet:
    return load_pretrained(LayoutFeatureNet, directory).eval()


@torch.no_grad()
def layout_features(net: LayoutFeatureNet, boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor,
                    batch_size: int = 512) -> torch.Tensor:
    """Features Float[L, d] of page-unit layouts, in batches."""
    net.eval()
    return torch.cat([net.features(boxes[i : i + batch_size], classes[i : i + batch_size], mask[i : i + batch_size])
                      for i in range(0, len(boxes), batch_size)])
