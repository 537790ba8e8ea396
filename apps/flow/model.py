"""Pixel-space velocity model for the image flow: a diffusers ``UNet2DModel`` with the flow signature.

Flow convention (CONTRACT.md): x_s = (1 - s) x_0 + s eps, s = 1 is noise, and the model predicts
the velocity v(x_s, s) ~= E[eps - x_0 | x_s], called as ``model(x [B, C, H, W], s [B], cond)``.
The same class serves as the *base* flow (data <- noise) and as the small *noise-correction* flow
(docs/derivations.md, "Inverse noise correction": N(0, I) -> law of inverted noises), on the same [C, H, W]
shape, only with far fewer channels.

Constructor kwargs are plain JSON values so ``pgraft.core.checkpoint.save_pretrained`` can store
them; :data:`PRESETS` holds the sizes we measured (see :func:`from_preset`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn


class FlowUNet(nn.Module):
    """Velocity network v_theta(x, s) on images [B, C, H, W]; H, W divisible by 2^(levels-1).

    Args:
        image_size: nominal H = W (metadata for samplers/FLOPs; the UNet itself accepts any
            size divisible by 2^(len(block_channels)-1)).
        channels: image channels C (1 for Fashion-MNIST, 3 for CIFAR-10/CelebA).
        block_channels: feature width per resolution level; level i runs at H / 2^i.
        layers_per_block: ResNet blocks per level (the up path has one more, as in diffusers).
        attention: per level, whether the level has self-attention (same length as block_channels).
        mid_attention: self-attention in the bottleneck (lowest resolution) block.
        norm_groups: GroupNorm groups; must divide every entry of block_channels.
        attention_head_dim: channels per attention head.
        dropout: dropout inside ResNet blocks.
        num_classes: if set, ``cond`` is an int64 class label [B] added to the time embedding.
        time_scale: s in [0, 1] is multiplied by this before the sinusoidal embedding, whose
            frequencies were designed for integer DDPM timesteps in [0, 1000).
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        block_channels: list[int] | tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention: list[bool] | tuple[bool, ...] = (False, False, True),
        mid_attention: bool = True,
        norm_groups: int = 8,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        num_classes: int | None = None,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        block_channels, attention = list(block_channels), list(attention)
        if len(attention) != len(block_channels):
            raise ValueError(f"attention needs one flag per level ({len(block_channels)}), got {attention}")
        if any(c % norm_groups for c in block_channels):
            raise ValueError(f"norm_groups={norm_groups} must divide every block channel count {block_channels}")
        attn_channels = [c for c, a in zip(block_channels, attention) if a] + (block_channels[-1:] if mid_attention else [])
        if any(c % attention_head_dim for c in attn_channels):
            raise ValueError(f"attention_head_dim={attention_head_dim} must divide the attended channel counts {attn_channels}")
        factor = 2 ** (len(block_channels) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by {factor} for {len(block_channels)} levels")
        self.config: dict[str, Any] = dict(
            image_size=image_size, channels=channels, block_channels=block_channels,
            layers_per_block=layers_per_block, attention=attention, mid_attention=mid_attention, norm_groups=norm_groups,
            attention_head_dim=attention_head_dim, dropout=dropout, num_classes=num_classes,
            time_scale=time_scale,
        )  # fmt: skip
        self.time_scale = float(time_scale)
        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(block_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            add_attention=mid_attention,
            norm_num_groups=norm_groups,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            num_class_embeds=num_classes,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample at the nominal size: the prior N(0, I) is drawn on this shape."""
        return (self.config["channels"], self.config["image_size"], self.config["image_size"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v(x, s) [B, C, H, W] for x [B, C, H, W] at flow times s = ``t`` ([B] or scalar)."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if cond is not None and self.num_classes is None:
            raise ValueError("this FlowUNet is unconditional (num_classes=None) but got a cond")
        if cond is None and self.num_classes is not None:
            raise ValueError(f"this FlowUNet is class-conditional ({self.num_classes} classes); pass cond labels [B]")
        return self.unet(x, t * self.time_scale, class_labels=cond, return_dict=False)[0]


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests / smoke runs at 8x8: a forward+backward pass takes milliseconds.
    "tiny": dict(image_size=8, channels=1, block_channels=[16, 32], layers_per_block=1,
                 attention=[False, False], mid_attention=False, norm_groups=8),
    # Fashion-MNIST 28x28 base flow for CPU (28 -> 14 -> 7, attention only at 7x7). Narrow at full
    # resolution because the 28x28 convolutions dominate CPU time: 32 channels there ran 3x slower.
    "default": dict(image_size=28, channels=1, block_channels=[16, 32, 64], layers_per_block=1,
                    attention=[False, False, True], norm_groups=8),
    # Small noise-correction flow on the same 1x28x28 noise shape (~1/8 of "default"'s parameters;
    # the paper pairs a 65M base with a 16M noise model).
    "noise-small": dict(image_size=28, channels=1, block_channels=[8, 16, 32], layers_per_block=1,
                        attention=[False, False, False], mid_attention=False, norm_groups=4),
    # Noise-correction flow for "default" at a larger budget: 2.2x noise-small's FLOPs per evaluation,
    # so Heun 3 (6 evaluations) + base Euler 10 costs 1.32x base Euler 10.
    "noise-medium": dict(image_size=28, channels=1, block_channels=[12, 24, 48], layers_per_block=1,
                         attention=[False, False, False], mid_attention=False, norm_groups=4),
    # Fashion-MNIST base for a GPU: "default" twice as wide (2.7M parameters, 4x the FLOPs per
    # evaluation); its noise flow can be "default" itself (a quarter of its parameters, as in the paper).
    "fmnist-gpu": dict(image_size=28, channels=1, block_channels=[32, 64, 128], layers_per_block=1,
                       attention=[False, False, True], norm_groups=8),
    # Noise-correction flow for the tiny 8x8 smoke runs.
    "noise-tiny": dict(image_size=8, channels=1, block_channels=[8, 16], layers_per_block=1,
                       attention=[False, False], mid_attention=False, norm_groups=4),
    # CIFAR-10 32x32 on a GPU: the DDPM CIFAR-10 UNet layout (ch 128, mult 1-2-2-2, 2 res blocks,
    # attention at 16x16, dropout 0.1), ~36M parameters.
    "cifar-gpu": dict(image_size=32, channels=3, block_channels=[128, 256, 256, 256], layers_per_block=2,
                      attention=[False, True, False, False], norm_groups=32, attention_head_dim=64,
                      dropout=0.1),
    # Its noise-correction companion (about a quarter of the base's parameters, as in the paper).
    "noise-cifar-gpu": dict(image_size=32, channels=3, block_channels=[64, 128, 128, 128], layers_per_block=2,
                            attention=[False, True, False, False], norm_groups=32, attention_head_dim=64),
}  # fmt: skip
"""Measured sizes; see the module docstring of apps/flow/model.py and the issue note for timings."""


def from_preset(name: str, **overrides: Any) -> FlowUNet:
    """Build a :class:`FlowUNet` from :data:`PRESETS` ``name`` with keyword ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return FlowUNet(**{**PRESETS[name], **overrides})
