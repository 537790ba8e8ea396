"""Presets of the embedded shapes world's base model: model sizes (:class:`ModelPreset`) and
pretraining steps. ``tiny`` trains in seconds for tests; ``default`` is the CPU base model of
``pgraft t2i pretrain``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pgraft.core.app import resolve_base_dir
from pgraft.core.shipped import default_base, resolve_base, shipped_dir


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


# ----------------------------------------------------------------------------- the shipped base and scorer
# `pgraft t2i pretrain` and `pgraft t2i train-scorer` with their defaults, shipped with the package (see
# each SHIPPED.json): train / sample / evaluate / diagnose start from them with no pretraining.
_APP_DIR = Path(__file__).parent
SHIPPED_BASE = shipped_dir(_APP_DIR)
SHIPPED_SCORER = shipped_dir(_APP_DIR, "scorer")
DEFAULT_MODEL = default_base(SHIPPED_BASE, "runs/t2i/base")
DEFAULT_SCORER = default_base(SHIPPED_SCORER, "runs/t2i/scorer")


# how long making a base takes, and what else the default reward needs (quoted by refusals)
MODEL_NOTE = "~45 min on 2 cores; then `pgraft t2i train-scorer` for the vqa reward"


def resolve_model(value: str | Path) -> Path:
    """The pipeline directory a ``--model`` value names: ``shipped`` is the shipped base (verified
    against its manifest); a directory that does not exist is refused naming the commands that make
    one (nothing is pretrained on its own: that takes ~45 minutes). The same rule as the t2i
    contract's ``APP.resolve_base`` (:func:`pgraft.core.app.resolve_base_dir`). A hub id ``ORG/NAME``
    naming no local path is read from the local Hugging Face cache (:mod:`.hub`; never downloaded)."""
    from .hub import resolve_hub_model

    cached = resolve_hub_model(value)
    if cached is not None:
        return cached
    return resolve_base_dir(value, SHIPPED_BASE, app="t2i", flag="--model", must_exist=True, note=MODEL_NOTE)


def resolve_scorer(value: str | Path) -> Path:
    """The weights directory a ``--reward-weights`` value names: ``shipped`` is the shipped learned
    scorer of the vqa reward (verified against its manifest); anything else that path."""
    return resolve_base(value, SHIPPED_SCORER if SHIPPED_SCORER.is_dir() else None)
