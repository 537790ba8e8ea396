"""Presets of the embedded shapes world's base model: model sizes (:class:`ModelPreset`) and
pretraining steps. ``tiny`` trains in seconds for tests; ``default`` is the CPU base model of
``pgraft t2i pretrain``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of the embedded world's UNet and text encoder."""

    image_size: int
    block_out_channels: tuple[int, ...]
    attention: tuple[bool, ...]  # cross-attention at each resolution level
    layers_per_block: int
    norm_groups: int
    head_dim: int
    text_hidden: int
    text_layers: int
    text_heads: int
    max_length: int = 16
    patch_size: int = 2  # the UNet sees image_size/patch pixels of 3*patch^2 channels


PRESETS: dict[str, ModelPreset] = {
    # seconds-scale smoke tests: 16x16 images, an 8x8x12 UNet input
    "tiny": ModelPreset(image_size=16, block_out_channels=(16, 32), attention=(False, True), layers_per_block=1,
                        norm_groups=8, head_dim=8, text_hidden=32, text_layers=1, text_heads=2),
    # the CPU base model of `pgraft t2i pretrain`: 32x32 RGB seen as 16x16x12 (2x2 space-to-depth;
    # 4x fewer UNet pixels, ~0.6 s per batch-32 step on one shared core)
    "default": ModelPreset(image_size=32, block_out_channels=(32, 64, 96), attention=(False, True, True),
                           layers_per_block=1, norm_groups=16, head_dim=16, text_hidden=128, text_layers=2,
                           text_heads=4),
}


# optimizer steps of `pgraft t2i pretrain` per preset (the command's --steps overrides)
PRETRAIN_STEPS: dict[str, int] = {"tiny": 200, "default": 3600}
