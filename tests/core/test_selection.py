import pandas as pd
import torch

from pgraft.core.grs import GRSConfig
from pgraft.core.selection import select


def test_select_keeps_accepted_then_first_copy_of_each_unseen_key():
    rewards = torch.tensor([5.0, 1.0, 4.0, 3.0, 9.0, 8.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    keys = ["a", "b", "a", "c", "d", "d"]
    out = select(rewards, groups, GRSConfig(rule="bon"), torch.Generator().manual_seed(0), 7, keys,
                 pd.DataFrame({"smiles": list("uvwxyz")}), dedup=True, seen={"d"})
    assert out.accepted.tolist() == [True, False, True, False, True, False]
    assert out.keep.tolist() == [True, False, False, False, False, False]  # "a" again, "d" seen before
    assert out.index.tolist() == [0]
    assert out.records.to_dict("list") == {"round": [7], "reward": [5.0], "group": [0], "key": ["a"],
                                           "smiles": ["u"]}


def test_select_without_dedup_keeps_every_accepted_sample_and_its_records():
    rewards = torch.arange(8, dtype=torch.float64)
    groups = torch.arange(8) // 4
    out = select(rewards, groups, GRSConfig(rule="topk", k=2), torch.Generator().manual_seed(0), 0)
    assert out.index.tolist() == [2, 3, 6, 7] and torch.equal(out.keep, out.accepted)
    assert list(out.records.columns) == ["round", "reward", "group"] and out.records["group"].tolist() == [0, 0, 1, 1]
