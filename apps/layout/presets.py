"""Pretraining presets of the layout base model: data, model size and optimisation (JSON-able,
saved with the base). ``tiny`` trains in seconds for tests; ``default`` is the base shipped in
``bases/default`` (see its SHIPPED.json). Model sizes are :data:`.model.PRESETS`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .features import FeatureTrainConfig
from .model import PRESETS as MODEL_PRESETS


@dataclass(frozen=True)
class LayoutPreset:
    """Data + model + pretraining settings of a base model (JSON-able; saved with the base).

    ``dataset``: "synthetic" (embedded generator) or "publaynet" / "rico" with ``data_path``.
    ``p_class_cond``: share of pretraining samples with clean classes (class-conditioned task).
    """

    model: str = "default"
    dataset: str = "synthetic"
    data_path: str | None = None
    n_train: int = 20000
    n_test: int = 2000
    max_elements: int = 20
    steps: int = 8000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999
    p_class_cond: float = 0.25
    sample_steps: int = 50
    feature: FeatureTrainConfig = field(default_factory=FeatureTrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.feature, dict):
            object.__setattr__(self, "feature", FeatureTrainConfig(**self.feature))
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose from {sorted(MODEL_PRESETS)}")
        for name in ("n_train", "n_test", "max_elements", "steps", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# "default": measured 5.8 steps/s at batch 64 with one thread on the shared 2-core box (~1.0M
# parameters), so 8000 steps take ~23 min; the feature net (1500 steps) ~2 min: <= 30 min in all.
PRESETS: dict[str, LayoutPreset] = {
    "tiny": LayoutPreset(model="tiny", n_train=256, n_test=64, steps=30, batch_size=16, warmup=5, ema=0.9,
                         sample_steps=6, feature=FeatureTrainConfig(steps=20, batch_size=32, d_model=16, n_layers=1,
                                                                    n_heads=2)),
    "default": LayoutPreset(),
}


def get_preset(name: str, **overrides: Any) -> LayoutPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
