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


def test_a_shared_error_widens_the_interval_in_quadrature_and_covers_at_its_level():
    # closed form: values 1, 2, 3 (sd 1) and a shared sd of 0.5 -> sqrt(t_{0.975,2}^2 / 3 + z_{0.975}^2 0.25)
    ci = mean_ci([1.0, 2.0, 3.0], shared_sd=0.5)
    assert ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(math.sqrt(4.302653 ** 2 / 3 + 1.959964 ** 2 * 0.25), rel=1e-6)
    assert mean_ci([1.0, 2.0, 3.0], shared_sd=0.0).half_width == pytest.approx(mean_ci([1.0, 2.0, 3.0]).half_width)
    # identical seeds still carry the shared error, at the normal quantile
    assert mean_ci([1.0, 1.0, 1.0], shared_sd=0.1).half_width == pytest.approx(1.959964 * 0.1, rel=1e-5)
    # coverage: 3 seeds of sd 1 around one reference draw of sd sigma (the same for the three), a shared
    # error smaller than, like and larger than the seeds' standard error
    gen = torch.Generator().manual_seed(1)
    for sigma in (0.3, 0.6, 2.0):
        reference = sigma * torch.randn(4000, 1, generator=gen)
        d = (torch.randn(4000, 3, generator=gen) + 1.0 - reference).tolist()
        covered = sum(ci.lo <= 1.0 <= ci.hi for ci in (mean_ci(row, shared_sd=sigma) for row in d)) / 4000
        assert 0.94 <= covered <= 0.985, (sigma, covered)
        naive = sum(ci.lo <= 1.0 <= ci.hi for ci in (mean_ci(row) for row in d)) / 4000
        assert naive < covered                       # the seeds' interval alone misses the shared error
    with pytest.raises(ValueError, match="shared_sd"):
        mean_ci([1.0, 2.0], shared_sd=-1.0)


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


def test_p_value_is_students_one_sample_test():
    from scipy import stats as sp

    from pgraft.core.stats import mean_ci

    values = [0.31, -0.05, 0.22, 0.4, 0.18]
    assert mean_ci(values).p == pytest.approx(sp.ttest_1samp(values, 0.0).pvalue, rel=1e-12)
    assert math.isnan(mean_ci(values, shared_sd=0.1).p)  # no plain t-test with a shared error


def test_holm_steps_down_and_stops_at_the_first_failure():
    from pgraft.core.stats import holm

    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop (0.04 is not rejected either)
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.01, math.nan, 0.02]) == [True, False, True]  # NaN: untested, outside the family
    assert holm([0.2, 0.3]) == [False, False]


def test_identical_differences_are_not_judged_and_the_family_line_counts_survivors():
    from pgraft.core.stats import family_line, mean_ci, verdict

    flat = mean_ci([0.5, 0.5, 0.5])
    assert flat.half_width == 0 and verdict(flat) == "no spread across seeds (identical differences): not judged"
    # n = 3 values a ± d and a: t = a sqrt(3) / d, so t = 5 and t = 6 (p 0.038 and 0.027, each separated
    # alone); Holm over three: 0.00016 <= 0.05/3 passes, 0.027 > 0.05/2 stops, so only the strong one stays
    strong = mean_ci([1.0, 1.1, 0.9, 1.05])
    t5 = mean_ci([1 + 3**0.5 / 5, 1 - 3**0.5 / 5, 1.0])
    t6 = mean_ci([1 + 3**0.5 / 6, 1 - 3**0.5 / 6, 1.0])
    assert all(d.excludes_zero for d in (strong, t5, t6)) and 0.025 < t6.p < t5.p < 0.05
    line = family_line(["A − B (x)", "C − D (x)", "E − F (x)", "G − H (x)"], [strong, t5, t6, flat])
    assert line == ("family-wise (Holm over the 3 tested comparisons above, 5%): 1 of the 3 separated one by one "
                    "stay separated: A − B (x)")
