import math

import pytest
import torch

from pgraft.core.stats import format_verdict, mean_ci, paired_difference, verdict


def test_mean_ci_matches_the_student_t_closed_form():
    # n = 3: t_{0.975, 2} = 4.302653; values 1, 2, 3 -> sd 1, half width 4.302653 / sqrt(3)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.lo == pytest.approx(2.0 - 4.302653 / math.sqrt(3), rel=1e-6)


def test_mean_ci_covers_the_mean_at_its_level():
    # 4,000 repeats of 5 normal draws: the 95% interval covers the true mean 95% of the time
    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 5, generator=gen) + 3.0
    covered = sum(mean_ci(row.tolist()).lo <= 3.0 <= mean_ci(row.tolist()).hi for row in draws)
    assert abs(covered / 4000 - 0.95) < 0.012


def test_one_value_has_no_interval_and_nan_is_refused():
    ci = mean_ci([0.5])
    assert ci.mean == 0.5 and math.isnan(ci.lo) and not ci.excludes_zero
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([1.0, float("nan")])


def test_paired_difference_uses_pairs_only_and_removes_the_shared_noise():
    shared = {0: 10.0, 1: -5.0, 2: 3.0}          # seed effects both methods share
    a = {s: v + 1.0 + 0.01 * s for s, v in shared.items()}
    b = dict(shared) | {7: 100.0}                  # seed 7 has no partner in a
    diff = paired_difference(a, b)
    assert diff.n == 3
    assert diff.mean == pytest.approx(1.01)
    assert diff.excludes_zero                      # unpaired, the seed effects would swamp the +1
    unpaired = mean_ci([a[s] for s in sorted(a)]).half_width
    assert diff.half_width < unpaired / 100


def test_verdict_lines():
    inside = mean_ci([0.01, -0.02, 0.03])
    assert verdict(inside) == "not separated"
    ahead = mean_ci([0.10, 0.11, 0.12])
    assert verdict(ahead) == "separated: ahead"
    assert verdict(ahead, higher_is_better=False) == "separated: behind"
    line = format_verdict("P-GRAFT t=0.25", "GRAFT BoN", "QED", ahead)
    assert line.startswith("P-GRAFT t=0.25 − GRAFT BoN: QED +0.110 [95% CI +0.085, +0.135] (n = 3 seeds)")
    assert line.endswith("→ separated: ahead")
