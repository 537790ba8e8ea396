"""Pretraining the molecule base model: presets and one entry point around ``core.pretrain``.

``pretrain_molecule(preset, run_dir)`` loads (and caches) the dataset, builds the graph transformer,
trains it with the core loop (EMA, checkpoints, resume, NaN guard, progress bar) on the masking
loss at t_start = 0, writes ``molecule.json`` (vocabulary, size distribution, preset) next to the
save_pretrained checkpoint, and optionally evaluates validity/uniqueness of fresh samples.

Presets live in :mod:`.presets` (``tiny`` for tests, ``default`` for the shipped QM9 base).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgraft.core.checkpoint import load_pretrained, save_json
from pgraft.core.pretrain import pretrain
from pgraft.core.state import RESTORE_BASE, read_json

from . import diffusion
from .data import GraphSpec, MoleculeData, batches, load_dataset, state_to_smiles
from .metrics import evaluate_smiles
from .model import GraphTransformer
from .presets import MoleculePretrainPreset

META_NAME = "molecule.json"


@dataclass(frozen=True)
class PretrainLoss:
    """``loss_fn(model, x0, cond, generator)`` for ``core.pretrain``: the masking loss at t_start = 0."""

    edge_weight: float = 1.0

    def __call__(self, model: nn.Module, x0, cond, generator) -> torch.Tensor:
        return diffusion.loss(model, x0, 0.0, cond, generator, edge_weight=self.edge_weight)


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model with what sampling and decoding need."""

    model: GraphTransformer
    spec: GraphSpec
    size_distribution: torch.Tensor
    preset: MoleculePretrainPreset
    dataset: str | None = None  # the name of the data it was trained on (``molecule.json``), None if unrecorded


def write_meta(run_dir: str | Path, data: MoleculeData, preset: MoleculePretrainPreset) -> None:
    save_json({"dataset": data.name, "spec": data.spec.to_dict(),
               "size_distribution": data.size_distribution.tolist(), "preset": asdict(preset)},
              Path(run_dir) / META_NAME)


def load_base(run_dir: str | Path) -> BaseModel:
    """Load a pretrained molecule base model; clear FileNotFoundError if ``run_dir`` has none."""
    run_dir = Path(run_dir)
    meta_path = run_dir / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"no molecule base model at {run_dir} (missing {META_NAME}); "
                                "run `pgraft molecule pretrain` first")
    meta = read_json(meta_path, keys=("spec",), fix=RESTORE_BASE)
    model = load_pretrained(GraphTransformer, run_dir)
    return BaseModel(model=model.eval(), spec=GraphSpec.from_dict(meta["spec"]),
                     size_distribution=torch.tensor(meta["size_distribution"]),
                     preset=MoleculePretrainPreset(**meta["preset"]), dataset=meta.get("dataset"))


def evaluate_base(model: nn.Module, data: MoleculeData, n: int = 1000, n_steps: int = 100, seed: int = 0,
                  fcd: bool = False) -> dict[str, Any]:
    """Sample ``n`` molecules and return ``evaluate_smiles``'s row (plus sampling seconds)."""
    t0 = time.time()
    x = diffusion.sample_graphs(model, n, data.size_distribution, n_steps, torch.Generator().manual_seed(seed))
    seconds = time.time() - t0
    smiles = state_to_smiles(x, data.spec.atom_types)
    row = evaluate_smiles(smiles, data.train.smiles, data.test.smiles, fcd=fcd, seed=seed)
    return {**row, "sample_steps": n_steps, "sample_seconds": seconds}


def pretrain_molecule(
    preset: MoleculePretrainPreset,
    run_dir: str | Path,
    data: MoleculeData | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = True,
    eval_samples: int = 0,
) -> BaseModel:
    """Train (or resume) the base model of ``preset`` into ``run_dir``; returns the EMA model.

    ``data`` overrides the preset's dataset (tests pass a tiny one). With ``eval_samples > 0`` the
    EMA model samples that many molecules and ``run_dir/eval.json`` records the metrics row.
    """
    run_dir = Path(run_dir)
    if data is None:
        data = load_dataset(preset.dataset, cache_dir=cache_dir, seed=preset.seed, limit=preset.dataset_limit)
    torch.manual_seed(preset.seed)  # model init
    model_kwargs = preset.model_kwargs(data.spec)
    model = GraphTransformer(**model_kwargs)
    write_meta(run_dir, data, preset)
    t0 = time.time()
    ema_model = pretrain(model, batches(data.train, preset.batch_size, preset.seed), PretrainLoss(preset.edge_weight),
                         preset.pretrain_config(), run_dir, model_kwargs, resume=resume, show_progress=show_progress)
    train_seconds = time.time() - t0
    ema_model.eval()
    if eval_samples > 0:
        row = evaluate_base(ema_model, data, eval_samples, preset.sample_steps, preset.seed)
        save_json({**row, "train_seconds": train_seconds, "steps": preset.steps}, run_dir / "eval.json")
    return BaseModel(model=ema_model, spec=data.spec, size_distribution=data.size_distribution, preset=preset)
