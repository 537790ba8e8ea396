"""Deduplicated GRS (paper, molecule experiments): keep one copy of each distinct accepted sample.

Without dedup, a sample the model produces often is accepted often and fine-tuning collapses onto
it; keeping one copy per key multiplies the accepted density by 1/#copies, i.e. the reshaped reward
gains the diversity term log(1/#copies) = -log(#copies).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DedupResult:
    """``keep``: bool [B], the accepted samples that survive (first copy of each key);
    ``copies``: long [B], number of accepted samples sharing each sample's key (0 if not accepted);
    ``reward_term``: float [B], -log(copies) for accepted samples, 0 elsewhere."""

    keep: torch.Tensor
    copies: torch.Tensor
    reward_term: torch.Tensor


def deduplicate(keys: Sequence[Hashable], accepted: torch.Tensor,
                seen: Iterable[Hashable] = ()) -> DedupResult:
    """Keep the first accepted occurrence of each key; drop keys already in ``seen`` (e.g. the store).

    ``keys[i]`` identifies sample i (canonical SMILES, rounded tensor bytes, ...); ``None`` keys
    (e.g. invalid molecules) are never deduplicated against each other.
    """
    accepted = torch.as_tensor(accepted, dtype=torch.bool)
    if accepted.ndim != 1 or len(keys) != len(accepted):
        raise ValueError(f"keys ({len(keys)}) and accepted mask ({tuple(accepted.shape)}) must have one entry per sample")
    counts: dict[Hashable, int] = {}
    for i in accepted.nonzero().flatten().tolist():
        if keys[i] is not None:
            counts[keys[i]] = counts.get(keys[i], 0) + 1
    seen = set(seen)
    keep = torch.zeros_like(accepted)
    copies = torch.zeros(len(keys), dtype=torch.long)
    taken: set[Hashable] = set()
    for i in accepted.nonzero().flatten().tolist():
        key = keys[i]
        copies[i] = 1 if key is None else counts[key]
        if key is None or (key not in taken and key not in seen):
            keep[i] = True
            if key is not None:
                taken.add(key)
    reward_term = torch.where(copies > 0, -torch.log(copies.clamp_min(1).double()), torch.zeros(len(keys), dtype=torch.float64))
    return DedupResult(keep=keep, copies=copies, reward_term=reward_term)


def tensor_key(x: torch.Tensor, decimals: int = 4) -> bytes:
    """A hashable key for a continuous sample: its values rounded to ``decimals``."""
    return torch.round(x.detach().double().cpu(), decimals=decimals).numpy().tobytes()
