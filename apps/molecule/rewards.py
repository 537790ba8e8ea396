"""Chemistry rewards on generated graph states, and the canonical-SMILES dedup key.

A reward is a plain callable ``reward(state, cond) -> Tensor[B]`` (float32, CPU) on a batch of fully
revealed graphs. Invalid molecules (RDKit sanitization fails, several fragments, a leftover mask
token) get the reward's lowest value, 0.0, never an exception: a fine-tuning run must survive
whatever the model emits.

Registered rewards (all in [0, 1] except ``qed+valid`` in [0, 2]):
- ``valid``: 1 if the graph is one sanitizable molecule, else 0;
- ``qed``: QED drug-likeness (Bickerton et al. 2012), 0 for invalid;
- ``sa``: synthetic accessibility, normalized (10 - SA)/9 so that higher is better (SA in [1, 10],
  Ertl & Schuffenhauer 2009, RDKit Contrib ``sascorer``, shipped in the pip rdkit wheel), 0 for invalid;
- ``qed+valid``: valid + qed, so any valid molecule beats every invalid one and QED ranks the valid.

Note the two SA scales: the ``sa`` *reward* is (10 - SA)/9 in [0, 1], higher is better; the
``sa_raw_mean`` *metric* of :mod:`.metrics` is the raw SA in [1, 10], lower is better.

:class:`NovelReward` wraps any of them (``train --novel``): a molecule of the training set (same
canonical SMILES, ``data.mol_to_smiles``) scores 0, like an invalid one; :func:`training_smiles`
loads that reference set once per dataset split and caches it.

Graph states carry only token ids, so decoding needs the dataset's atom vocabulary: ``REWARDS``
is built for QM9's (``data.QM9_SPEC``); :func:`make_rewards` builds the registry for any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from rdkit import Chem, rdBase
from rdkit.Chem import QED
from rdkit.Contrib.SA_Score import sascorer

from .data import QM9_SPEC, GraphSpec, graph_to_mol, load_dataset, state_to_graphs, state_to_smiles

MolScore = Callable[[Chem.Mol | None], float]


# ----------------------------------------------------------------------------- per-molecule scores
def valid_score(mol: Chem.Mol | None) -> float:
    return 0.0 if mol is None else 1.0


def qed_score(mol: Chem.Mol | None) -> float:
    if mol is None:
        return 0.0
    with rdBase.BlockLogs():
        value = QED.qed(mol)
    return value if math.isfinite(value) else 0.0


def sa_raw(mol: Chem.Mol) -> float:
    """SA score in [1 (easy), 10 (hard)]."""
    with rdBase.BlockLogs():
        return float(sascorer.calculateScore(mol))


def sa_score(mol: Chem.Mol | None) -> float:
    """(10 - SA)/9 in [0, 1], higher = easier to synthesize; 0 for invalid."""
    if mol is None:
        return 0.0
    value = (10.0 - sa_raw(mol)) / 9.0
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


def qed_plus_valid_score(mol: Chem.Mol | None) -> float:
    return valid_score(mol) + qed_score(mol)


MOL_SCORES: dict[str, MolScore] = {
    "valid": valid_score,
    "qed": qed_score,
    "sa": sa_score,
    "qed+valid": qed_plus_valid_score,
}

# A true upper bound of each reward, known before sampling: ``--rule rs`` uses it as its default
# ``--reward-max`` (exact rejection sampling). QED is a weighted geometric mean of desirability
# functions each normalised to max 1, so QED <= 1; sa is clipped to [0, 1]; validity is 0 or 1.
# NovelReward only lowers a reward to 0, so the bounds hold with --novel too.
REWARD_MAX: dict[str, float] = {"valid": 1.0, "qed": 1.0, "sa": 1.0, "qed+valid": 2.0}


# ----------------------------------------------------------------------------- state-level helpers
def to_mols(state: dict[str, torch.Tensor], atom_types: Sequence[str] = QM9_SPEC.atom_types) -> list[Chem.Mol | None]:
    """Sanitized single-fragment molecules per sample (None if invalid)."""
    return [graph_to_mol(v, e, atom_types) for v, e in state_to_graphs(state)]


def to_smiles(state: dict[str, torch.Tensor], atom_types: Sequence[str] = QM9_SPEC.atom_types) -> list[str | None]:
    """Canonical SMILES per sample (None if invalid) — also the dedup key (``data.state_to_smiles``)."""
    return state_to_smiles(state, atom_types)


@dataclass(frozen=True)
class GraphReward:
    """``reward(state, cond) -> float32 [B]``: decode each graph with ``atom_types``, score it with ``score``."""

    score: MolScore
    atom_types: tuple[str, ...]

    def __call__(self, state: dict[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
        return torch.tensor([self.score(m) for m in to_mols(state, self.atom_types)], dtype=torch.float32)


def make_rewards(spec: GraphSpec) -> dict[str, GraphReward]:
    """The reward registry for a dataset vocabulary."""
    return {name: GraphReward(score, tuple(spec.atom_types)) for name, score in MOL_SCORES.items()}


REWARDS: dict[str, GraphReward] = make_rewards(QM9_SPEC)


def get_reward(name: str, spec: GraphSpec = QM9_SPEC) -> GraphReward:
    """Look up a reward by name; ValueError listing the known names otherwise."""
    if name not in MOL_SCORES:
        raise ValueError(f"unknown molecule reward {name!r}; choose one of {sorted(MOL_SCORES)}")
    return GraphReward(MOL_SCORES[name], tuple(spec.atom_types))


@dataclass(frozen=True)
class NovelReward:
    """Any molecule reward restricted to novel molecules: ``reward(state, cond)`` where the sample's
    canonical SMILES (:func:`to_smiles`) is not in ``reference`` (the training set, canonical SMILES
    as ``data.load_dataset`` stores them); 0.0 for training-set molecules and for invalid graphs."""

    reward: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    reference: frozenset[str]
    atom_types: tuple[str, ...] = tuple(QM9_SPEC.atom_types)

    def __call__(self, state: dict[str, torch.Tensor], cond: Any = None) -> torch.Tensor:
        values = torch.as_tensor(self.reward(state, cond), dtype=torch.float32)
        novel = torch.tensor([k is not None and k not in self.reference for k in to_smiles(state, self.atom_types)],
                             dtype=torch.bool)
        return torch.where(novel, values, torch.zeros_like(values))


@lru_cache(maxsize=4)
def training_smiles(dataset: str = "qm9", seed: int = 0, limit: int | None = None) -> frozenset[str]:
    """Canonical SMILES of the training split ``data.load_dataset(dataset, seed=seed, limit=limit)``
    (the split a base of that preset was trained on), loaded once per process and cached."""
    return frozenset(load_dataset(dataset, seed=seed, limit=limit).train.smiles)


def novel_reward(reward: GraphReward, reference: Sequence[str] | frozenset[str]) -> NovelReward:
    """:class:`NovelReward` of ``reward`` (its vocabulary) against the canonical SMILES ``reference``."""
    return NovelReward(reward, frozenset(reference), tuple(reward.atom_types))
