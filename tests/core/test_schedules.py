import pytest
import torch

from pgraft.core.schedules import cosine_alpha_bar, flow_times, linear_alpha_bar, split_times


@pytest.mark.parametrize("at, by, index", [(0.0, "fraction", 10), (0.25, "fraction", 8), (0.3, "time", 7),
                                           (4, "index", 4)])
def test_split_partitions_the_grid(at, by, index):
    times = flow_times(10)
    s = split_times(times, at, by)
    assert s.index == index
    assert torch.equal(torch.cat([s.head, s.tail[1:]]), times)
    assert s.head[-1] == s.tail[0] == s.t
    assert (len(s.head) - 1) + (len(s.tail) - 1) == 10


def test_grid_is_descending_from_noise_to_data():
    t = flow_times(7)
    assert t[0] == 1.0 and t[-1] == 0.0 and (t[1:] < t[:-1]).all()


@pytest.mark.parametrize("at, by, match", [(1.0, "fraction", "got 1.0"), (-0.1, "fraction", "got -0.1"),
                                           (11, "index", "got 11"), (0, "index", "no step"),
                                           (0.5, "nope", "by must be")])
def test_bad_split_raises(at, by, match):
    with pytest.raises(ValueError, match=match):
        split_times(flow_times(10), at, by)


def test_alpha_bar_schedules_are_monotone_from_one():
    t = torch.linspace(0, 1, 50)
    for ab in (cosine_alpha_bar(t), linear_alpha_bar(t)):
        assert ab[0] == pytest.approx(1.0, abs=1e-3)
        assert (ab[1:] <= ab[:-1]).all()
        assert ab[-1] < 1e-3
