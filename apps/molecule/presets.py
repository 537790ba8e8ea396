"""Pretraining presets of the molecule base model (frozen dataclasses).

``tiny`` trains in seconds for tests and smoke runs; ``default`` is the QM9 base model shipped in
``bases/default`` (validity 0.859, uniqueness 0.999 on 1,000 samples; see its SHIPPED.json).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pgraft.core.pretrain import PretrainConfig

from .data import GraphSpec


@dataclass(frozen=True)
class MoleculePretrainPreset:
    """Everything that defines a base model run (dataset, architecture, optimisation, sampling)."""

    dataset: str = "qm9"
    dataset_limit: int | None = None
    hidden_dim: int = 64
    edge_dim: int = 32
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.0
    use_structural_features: bool = True
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    ema: float = 0.999
    grad_clip: float = 1.0
    edge_weight: float = 1.0
    sample_steps: int = 100
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500

    def model_kwargs(self, spec: GraphSpec) -> dict[str, Any]:
        """JSON-able constructor kwargs of :class:`GraphTransformer` for a dataset vocabulary."""
        return {"n_atom_types": spec.n_atom_types, "n_bond_types": spec.n_bond_types, "max_nodes": spec.max_nodes,
                "hidden_dim": self.hidden_dim, "edge_dim": self.edge_dim, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "ffn_mult": self.ffn_mult, "dropout": self.dropout,
                "use_structural_features": self.use_structural_features}

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
                              grad_clip=self.grad_clip, ema=self.ema, seed=self.seed, log_every=self.log_every,
                              ckpt_every=self.ckpt_every)


PRESETS: dict[str, MoleculePretrainPreset] = {
    # seconds on one core: a handful of steps of a 2-layer model (tests pass their own tiny dataset)
    "tiny": MoleculePretrainPreset(hidden_dim=16, edge_dim=8, n_layers=2, n_heads=2, steps=5, batch_size=3,
                                   warmup=1, ema=0.9, sample_steps=4, log_every=1, ckpt_every=5),
    # QM9, 0.27 M params. Measured with 1 thread on a shared 2-core box (0.27-0.31 s/step at batch 256):
    # 1800 steps -> validity 0.80, 3600 steps -> 0.848 (uniqueness 1.00, 1,000 samples, 100 sampling
    # steps); validity was still rising, so the default trains 5000 steps (~25 min on 1 thread).
    "default": MoleculePretrainPreset(steps=5000),
}


def get_preset(name: str, **overrides: Any) -> MoleculePretrainPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown molecule preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
