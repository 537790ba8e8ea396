import math

import torch

from pgraft.core.dedup import deduplicate, tensor_key


def test_dedup_keeps_first_copy_and_reports_copies():
    keys = ["CCO", "c1ccccc1", "CCO", "CCO", None, None, "N"]
    accepted = torch.tensor([True, True, True, False, True, True, False])
    res = deduplicate(keys, accepted)
    assert res.keep.tolist() == [True, True, False, False, True, True, False]
    # "CCO" accepted twice (index 3 was rejected, so it does not count)
    assert res.copies.tolist() == [2, 1, 2, 0, 1, 1, 0]
    assert res.reward_term[0].item() == -math.log(2)
    assert res.reward_term[1].item() == 0.0
    assert res.reward_term[3].item() == 0.0


def test_dedup_against_seen_keys():
    res = deduplicate(["a", "b", "a"], torch.tensor([True, True, True]), seen={"b"})
    assert res.keep.tolist() == [True, False, False]


def test_tensor_key_rounds():
    a = torch.tensor([1.00001, 2.0])
    b = torch.tensor([1.00002, 2.0])
    assert tensor_key(a, 3) == tensor_key(b, 3)
    assert tensor_key(a, 6) != tensor_key(b, 6)
