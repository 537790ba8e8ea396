"""The layout denoiser: one transformer over a *set* of elements (no positional encoding).

Input: the diffusion state at time s (``{"boxes": Float[B, N, 4] in model space z = 2b - 1,
"classes": Long[B, N] with ``mask_id = n_classes`` for masked and -1 for padding, "mask":
Bool[B, N]}``) and ``s`` Float[B]. Output: ``{"velocity": Float[B, N, 4], "logits": Float[B, N,
n_classes]}`` — the flow velocity eps - x0 of the boxes and the clean-class logits (mask token
excluded), both meaningless at padded slots (they are masked out of attention and of the loss).

Permutation equivariance: element tokens get no position embedding and padded slots are
key-masked, so permuting the elements permutes the outputs (tested).

Blocks are DiT-style: pre-norm self-attention and MLP, both modulated by the time embedding through
adaLN-zero (scale, shift and a zero-initialised gate), which lets a small model treat high and low
noise levels differently without learning it through the tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .data import PAD_CLASS

# Presets: JSON-able constructor kwargs. "tiny" is for tests (seconds); "default" is what
# `pgraft layout pretrain` trains on 2 CPU cores in <= 30 min (training settings: presets.PRESETS).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_ratio": 2.0},
    "default": {"d_model": 128, "n_layers": 4, "n_heads": 4, "mlp_ratio": 2.0},
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as for DDPM steps): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero time modulation (Peebles & Xie 2023, DiT)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.ada = nn.Linear(d_model, 6 * d_model)
        nn.init.zeros_(self.ada.weight)  # gates start at 0: every block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """h [B, N, d], temb [B, d], pad [B, N] (True = ignore as key) -> [B, N, d]."""
        s1, b1, g1, s2, b2, g2 = self.ada(nn.functional.silu(temb)).unsqueeze(1).chunk(6, dim=-1)
        x = self.norm1(h) * (1 + s1) + b1
        h = h + g1 * self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm2(h) * (1 + s2) + b2
        return h + g2 * self.mlp(x)


class LayoutDenoiser(nn.Module):
    """Joint box-flow / class-masking denoiser over up to ``max_elements`` elements.

    Constructor kwargs are plain JSON values (``save_pretrained`` stores them). ``count_probs``
    (length ``max_elements + 1``) is the empirical element-count law the unconditional prior draws
    from; it is data, not weights, but travels with the checkpoint so a loaded model can sample.
    """

    def __init__(self, n_classes: int = 5, max_elements: int = 20, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 count_probs: list[float] | None = None, fourier_features: int = 0) -> None:
        super().__init__()
        if n_classes < 1 or max_elements < 1:
            raise ValueError(f"need n_classes >= 1 and max_elements >= 1, got {n_classes}, {max_elements}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if count_probs is not None:
            if len(count_probs) != max_elements + 1 or count_probs[0] != 0 or sum(count_probs) <= 0:
                raise ValueError("count_probs must have max_elements + 1 entries, P(0 elements) = 0 and a "
                                 f"positive sum; got {count_probs}")
        self.n_classes, self.max_elements, self.d_model = n_classes, max_elements, d_model
        self.mask_id = n_classes
        self.count_probs = None if count_probs is None else [float(p) for p in count_probs]
        if fourier_features < 0:
            raise ValueError(f"fourier_features must be >= 0, got {fourier_features}")
        self.fourier_features = fourier_features
        box_dim = 4 * (1 + 2 * fourier_features)
        self.box_in = nn.Sequential(nn.Linear(box_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.class_in = nn.Embedding(n_classes + 1, d_model)  # + the mask token
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.blocks = nn.ModuleList(AdaLNBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(d_model, elementwise_affine=False)
        self.ada_out = nn.Linear(d_model, 2 * d_model)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.velocity_out = nn.Linear(d_model, 4)
        self.logits_out = nn.Linear(d_model, n_classes)

    def box_features(self, z: torch.Tensor) -> torch.Tensor:
        """[..., 4] -> [..., 4 (1 + 2F)]: z and sin / cos(2^k pi z), k < F (F = fourier_features).

        Alignment is a matter of ~1e-3 of the page; Fourier features let a small MLP resolve such
        offsets, which raw coordinates make it learn slowly (Tancik et al. 2020).
        """
        if not self.fourier_features:
            return z
        freqs = math.pi * 2.0 ** torch.arange(self.fourier_features, device=z.device, dtype=z.dtype)
        angles = (z.unsqueeze(-1) * freqs).flatten(-2)
        return torch.cat([z, torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, x: dict[str, torch.Tensor], t: torch.Tensor, cond: Any = None) -> dict[str, torch.Tensor]:
        """x: state at time t (see module doc), t Float[B] -> {"velocity" [B,N,4], "logits" [B,N,C]}.

        ``cond`` is unused: class conditioning enters through the (clean) classes in ``x``.
        """
        boxes, classes, mask = x["boxes"], x["classes"], x["mask"].bool()
        # padded slots carry -1; any in-range id will do, they are key-masked and their outputs dropped
        tokens = torch.where(classes == PAD_CLASS, torch.full_like(classes, self.mask_id), classes)
        h = self.box_in(self.box_features(boxes.float())) + self.class_in(tokens)
        temb = self.time_mlp(timestep_embedding(t.to(boxes.device), self.d_model))
        pad = ~mask
        for block in self.blocks:
            h = block(h, temb, pad)
        shift, scale = self.ada_out(nn.functional.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm_out(h) * (1 + scale) + shift
        return {"velocity": self.velocity_out(h), "logits": self.logits_out(h)}
