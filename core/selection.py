"""One round's selection: GRS acceptance, then deduplication, then the records kept with the
accepted samples. A pure function of the candidates' rewards, groups and keys (and an explicit
generator), so the round loop, the benchmarks and the tests share it.

Dedup keeps one copy per key *in the training set*: with replay the store of every round so far
is the training set, so a key an earlier round stored is dropped (``seen``); without replay a
round trains on its own accepted samples alone, so only duplicates within the round are removed
and a round that accepted something never trains on nothing (docs/derivations.md, "Dedup").
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import pandas as pd
import torch

from .dedup import deduplicate
from .grs import GRSConfig, accept


@dataclass(frozen=True)
class Selection:
    """``accepted``: the GRS mask [B]; ``keep``: what enters the store after dedup [B];
    ``records``: one row per kept sample (round, reward, group, key, then the app's columns)."""

    accepted: torch.Tensor
    keep: torch.Tensor
    records: pd.DataFrame

    @property
    def index(self) -> torch.Tensor:
        """Indices of the kept candidates, increasing."""
        return self.keep.nonzero().flatten()


def select(rewards: torch.Tensor, groups: torch.Tensor, grs: GRSConfig, generator: torch.Generator,
           round_: int, keys: list[Hashable] | None = None, records: pd.DataFrame | None = None,
           dedup: bool = False, seen: Iterable[str] = ()) -> Selection:
    """Accept by ``grs`` within ``groups``; with ``dedup``, keep the first accepted copy of each key
    not in ``seen``. ``records`` (one row per candidate) are the app's columns of each sample."""
    accepted = accept(rewards, groups, grs, generator)
    keep = accepted
    if dedup:
        if keys is None:
            raise ValueError("dedup needs a problem.key function (e.g. canonical SMILES)")
        keep = deduplicate([None if k is None else str(k) for k in keys], accepted, set(seen)).keep
    idx = keep.nonzero().flatten()
    table = (records if records is not None else pd.DataFrame(index=range(len(rewards))))
    table = table.iloc[idx.tolist()].reset_index(drop=True)
    table.insert(0, "round", round_)
    table.insert(1, "reward", rewards[idx].numpy())
    table.insert(2, "group", groups[idx].numpy())
    if keys is not None:
        table.insert(3, "key", [str(keys[i]) for i in idx.tolist()])
    return Selection(accepted, keep, table)
