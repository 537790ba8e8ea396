"""Defects from the math audit: 0/0 at the loss endpoint, reshaped rewards under ties, and the
policy-gradient log-density convention (docs/derivations.md)."""

import math

import pytest
import torch
from torch import nn

from pgraft.core import grs, losses
from pgraft.core.schedules import cosine_alpha_bar, linear_alpha_bar


# ----------------------------------------------------------------------------- eps loss at s = 0
class _EchoEps(nn.Module):
    """eps_theta(x, s) = x * (1 + s): a fixed, differentiable stand-in for a denoiser."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, s, cond=None):
        return self.scale * x * (1 + s[:, None].float())


def _force_first_time_to(value, monkeypatch):
    """Make the loss's draw of s hit ``value`` for sample 0 (torch.rand returns exactly 0 about
    once in 2^24 draws); the generator is consumed exactly as by the real draw."""
    real = losses.sample_times

    def forced(batch, t_start, generator, device=None):
        s = real(batch, t_start, generator, device).clone()
        s[0] = value
        return s

    monkeypatch.setattr(losses, "sample_times", forced)


@pytest.mark.parametrize("alpha_bar", [cosine_alpha_bar, linear_alpha_bar])
@pytest.mark.parametrize("weighting", ["eps", "v"])
def test_eps_loss_takes_the_limit_when_s_is_exactly_zero(monkeypatch, weighting, alpha_bar):
    # t_start = 0 has abar_t = 1, so lambda = (1 - abar_s)/(1 - abar_s) = 1 for every s > 0 and
    # its limit at s = 0 is 1: the sample at s = 0 contributes || eps_theta(x_0, 0) - eta ||^2.
    _force_first_time_to(0.0, monkeypatch)
    model = _EchoEps()
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    loss = losses.eps_matching_loss(model, x0, 0.0, alpha_bar, None, torch.Generator().manual_seed(1),
                                    weighting=weighting)
    assert torch.isfinite(loss), f"loss is {loss.item()} with a drawn s = 0"
    loss.backward()
    assert torch.isfinite(model.scale.grad)

    g = torch.Generator().manual_seed(1)  # replay: s, then eta
    s = losses.sample_times(5, 0.0, g)  # (the patched one: s[0] = 0)
    eta = torch.randn(x0.shape, generator=g)
    a = alpha_bar(s.double())
    x_s = a.sqrt().float()[:, None] * x0 + (1 - a).sqrt().float()[:, None] * eta
    per_sample = ((model(x_s, s).detach() - eta) ** 2).mean(1)
    if weighting == "v":
        per_sample = per_sample / a.float()
    torch.testing.assert_close(loss.detach(), per_sample.mean(), rtol=1e-5, atol=1e-6)


def _old_eps_loss(model, x_start, t_start, alpha_bar, generator, weighting):
    """The loss as it was before the s = 0 fix, for draws off the endpoint."""
    s = losses.sample_times(x_start.shape[0], t_start, generator)
    a_s = alpha_bar(s.double())
    a_t = float(alpha_bar(torch.tensor(t_start, dtype=torch.float64)))
    ratio = (a_s / a_t).clamp(max=1.0)
    eta = torch.randn(x_start.shape, generator=generator)
    ex = lambda v: v.view(-1, 1).to(x_start.dtype)  # noqa: E731
    x_s = ex(ratio.sqrt()) * x_start + ex((1 - ratio).sqrt()) * eta
    lam = ex(((1 - ratio) / (1 - a_s)).clamp(0.0, 1.0))
    per_sample = ((lam.sqrt() * model(x_s, s, None) - eta) ** 2).flatten(1).mean(1)
    if weighting == "v":
        per_sample = per_sample / a_s.to(per_sample.dtype)
    return per_sample.mean()


@pytest.mark.parametrize("t_start", [0.0, 0.3])
@pytest.mark.parametrize("weighting", ["eps", "v"])
def test_eps_loss_is_bit_identical_off_the_endpoint(weighting, t_start):
    model = _EchoEps()
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    new = losses.eps_matching_loss(model, x0, t_start, cosine_alpha_bar, None, torch.Generator().manual_seed(2),
                                   weighting=weighting)
    old = _old_eps_loss(model, x0, t_start, cosine_alpha_bar, torch.Generator().manual_seed(2), weighting)
    assert torch.equal(new, old)


@pytest.mark.parametrize("t_start", [0.0, 0.4])
def test_losses_are_finite_when_s_hits_t_start(monkeypatch, t_start):
    _force_first_time_to(t_start, monkeypatch)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    model = _EchoEps()
    for loss in (losses.eps_matching_loss(model, x0, t_start, cosine_alpha_bar, None, torch.Generator().manual_seed(3)),
                 losses.flow_matching_loss(model, x0, t_start, None, torch.Generator().manual_seed(3))):
        assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- reshaped rewards with ties
def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x.double() / math.sqrt(2)))


def _rounded_normal(n: int, seed: int) -> torch.Tensor:
    """r = round(x), x ~ N(0, 1): a reward with atoms; P(R <= r) = Phi(r + 1/2), P(R < r) = Phi(r - 1/2)."""
    return torch.round(torch.randn(n, generator=torch.Generator().manual_seed(seed)))


def _check_rates_against(acc: torch.Tensor, r: torch.Tensor, predicted: dict[float, float]) -> None:
    for value, p in predicted.items():
        inside = r == value
        n = int(inside.sum())
        rate = acc[inside].double().mean().item()
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)  # binomial standard error of the rate
        assert abs(rate - p) < 5 * se, f"r = {value}: accepted {rate:.4f} of {n}, formula says {p:.4f}"


def _support(r: torch.Tensor, min_count: int = 2000) -> list[float]:
    values, counts = torch.unique(r, return_counts=True)
    return [float(v) for v, c in zip(values, counts) if c >= min_count]


def test_best_of_n_reshaped_reward_is_exact_under_ties():
    n = 4
    r = _rounded_normal(n * 200_000, 0)
    acc = grs.accept_best_of_n(r, torch.arange(len(r)) // n, torch.Generator().manual_seed(1))
    support = _support(r)
    v = torch.tensor(support, dtype=torch.float64)
    f, f_below = _normal_cdf(v + 0.5), _normal_cdf(v - 0.5)
    p = torch.exp(grs.reshaped_reward_best_of_n(f, n, cdf_below=f_below))
    _check_rates_against(acc, r, dict(zip(support, p.tolist())))
    # the audit's numbers: accepted 0.144 of the r = 0 samples (F^(N-1) would say 0.332), 0.548 at r = 1
    assert p[support.index(0.0)].item() == pytest.approx(0.1433, abs=1e-3)
    assert p[support.index(1.0)].item() == pytest.approx(0.5475, abs=1e-3)


def test_top_k_reshaped_reward_is_exact_under_ties():
    m, k = 6, 2
    r = _rounded_normal(m * 100_000, 1)
    acc = grs.accept_top_k(r, k, torch.arange(len(r)) // m, torch.Generator().manual_seed(2))
    support = _support(r)
    v = torch.tensor(support, dtype=torch.float64)
    p = torch.exp(grs.reshaped_reward_top_k(_normal_cdf(v + 0.5), m, k, cdf_below=_normal_cdf(v - 0.5)))
    _check_rates_against(acc, r, dict(zip(support, p.tolist())))


@pytest.mark.parametrize("rule, k", [("bon", 1), ("topk", 3)])
def test_empirical_reshaped_reward_handles_ties_in_the_reference(rule, k):
    # reshaped_reward estimates F from a reference sample: ties in it are atoms of the reward law
    m = 5
    r = _rounded_normal(m * 100_000, 3)
    groups = torch.arange(len(r)) // m
    cfg = grs.GRSConfig(rule=rule, k=k)
    acc = grs.accept(r, groups, cfg, torch.Generator().manual_seed(4))
    support = _support(r)
    v = torch.tensor(support, dtype=torch.float64)
    p = torch.exp(grs.reshaped_reward(v, cfg, m, reference=r))
    _check_rates_against(acc, r, dict(zip(support, p.tolist())))


def test_tie_exact_forms_reduce_to_the_continuous_ones():
    f = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for n in (1, 2, 7):
        torch.testing.assert_close(grs.reshaped_reward_best_of_n(f[1:], n, 0.5, cdf_below=f[1:]),
                                   grs.reshaped_reward_best_of_n(f[1:], n, 0.5))
        # F_- -> F: the tie-exact value tends to the continuous one
        near = grs.reshaped_reward_best_of_n(f[1:], n, cdf_below=f[1:] - 1e-9)
        torch.testing.assert_close(near, grs.reshaped_reward_best_of_n(f[1:], n), atol=1e-6, rtol=0)
    for m, k in ((6, 1), (6, 2), (7, 7)):
        torch.testing.assert_close(grs.reshaped_reward_top_k(f, m, k, 0.5, cdf_below=f),
                                   grs.reshaped_reward_top_k(f, m, k, 0.5))
    # top-1 of M is best-of-M, with ties too
    fb = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.95], dtype=torch.float64)
    torch.testing.assert_close(grs.reshaped_reward_top_k(f[1:], 5, 1, cdf_below=fb[1:]),
                               grs.reshaped_reward_best_of_n(f[1:], 5, cdf_below=fb[1:]))
    # keeping all M accepts everything, whatever the ties
    torch.testing.assert_close(grs.reshaped_reward_top_k(f, 4, 4, cdf_below=fb), torch.zeros(5, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_best_of_one_accepts_everything_even_at_zero_cdf():
    f = torch.tensor([0.0, 0.5, 1.0])
    for kwargs in ({}, {"cdf_below": torch.zeros(3)}):
        out = grs.reshaped_reward_best_of_n(f, 1, **kwargs)
        assert torch.equal(out, torch.zeros(3, dtype=torch.float64)), out
    # for N > 1 a sample every other candidate beats is never kept
    assert grs.reshaped_reward_best_of_n(torch.tensor([0.0]), 3).item() == -math.inf


def test_cdf_below_is_validated():
    with pytest.raises(ValueError, match="cdf_below"):
        grs.reshaped_reward_best_of_n(torch.tensor([0.5]), 3, cdf_below=torch.tensor([0.7]))
    with pytest.raises(ValueError, match="shape"):
        grs.reshaped_reward_top_k(torch.tensor([0.5, 0.6]), 3, 2, cdf_below=torch.tensor([0.1]))


# ----------------------------------------------------------------------------- policy-gradient convention
class _GaussianPolicy(nn.Module):
    """A one-step Gaussian policy x_next ~ N(theta, sigma^2 I) on states shaped like x."""

    def __init__(self, theta: float = 0.0, sigma: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.sigma = sigma

    def forward(self, x, t=None, cond=None):
        return self.theta.expand_as(x)


def _summed_gaussian_log_prob(model, x, t, t_next, x_next, cond=None):
    """What the apps return: the step's log-density summed over every dimension; [B]."""
    d = (x_next - model(x)) / model.sigma
    return (-0.5 * d**2 - math.log(model.sigma) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


@pytest.mark.parametrize("shape", [(1,), (16,), (3, 8, 8)])
def test_log_ratio_of_a_known_step_is_per_dimension(shape):
    from pgraft.core.policy_gradient import PGConfig, clipped_surrogate, per_dimension

    # the policy's mean moves by delta = 0.01 sigma in every dimension; at x_next = old mean the
    # per-dimension log-ratio is -delta^2/2 = -5e-5 whatever D, inside DDPO's clip range 1e-4
    delta = 0.01
    old, new = _GaussianPolicy(0.0), _GaussianPolicy(delta)
    x = torch.zeros(4, *shape)
    log_prob = per_dimension(_summed_gaussian_log_prob)
    with torch.no_grad():
        ratio = torch.exp(log_prob(new, x, 0.6, 0.5, x, None) - log_prob(old, x, 0.6, 0.5, x, None))
    torch.testing.assert_close(ratio, torch.full((4,), math.exp(-delta**2 / 2)))
    out = clipped_surrogate(torch.log(ratio), torch.zeros(4), torch.ones(4), PGConfig().clip)
    assert PGConfig().clip == 1e-4 and PGConfig().log_prob_reduction == "mean"
    assert out.clip_fraction == 0.0
    assert out.approx_kl == pytest.approx(0.5 * (delta**2 / 2) ** 2, rel=1e-2)  # float32 log-densities


def test_state_dims_counts_the_entries_of_non_boolean_fields():
    from pgraft.core.policy_gradient import state_dims

    assert state_dims(torch.zeros(5, 3, 7, 7)) == 147
    graph = {"nodes": torch.zeros(2, 9, dtype=torch.long), "edges": torch.zeros(2, 9, 9, dtype=torch.long),
             "node_mask": torch.ones(2, 9, dtype=torch.bool)}
    assert state_dims(graph) == 90


def _run_repeated_coordinate_problem(dim: int, tmp_path):
    """PG on a 1-D Gaussian problem whose state repeats its one coordinate ``dim`` times."""
    from pgraft.core.policy_gradient import PGConfig, run_policy_gradient
    from pgraft.core.trainer import GraftProblem

    def step(model, x, t, t_next, cond=None, generator=None):
        z = torch.randn(x.shape[0], 1, generator=generator).expand_as(x)
        return model(x) + model.sigma * z

    problem = GraftProblem(prior=lambda n, g: torch.zeros(n, dim), times=torch.tensor([1.0, 0.0], dtype=torch.float64),
                           step=step, loss=lambda *a: None, reward=lambda x0, cond: x0[:, 0].double())
    cfg = PGConfig(rounds=2, groups=8, group_size=4, epochs=3, batch_size=8, lr=0.05, final_eval=False, seed=0)
    policy, table = run_policy_gradient(problem, _summed_gaussian_log_prob, _GaussianPolicy(), {}, cfg,
                                        tmp_path / f"pg{dim}", show_progress=False)
    return policy.theta.item(), table


def test_policy_gradient_update_does_not_depend_on_the_dimension(tmp_path):
    # a state that repeats one coordinate D times is the same 1-D problem: with a per-dimension
    # log-density every D gives the same ratios, clipping and update (a summed one clips D x tighter)
    theta_1, table_1 = _run_repeated_coordinate_problem(1, tmp_path)
    theta_64, table_64 = _run_repeated_coordinate_problem(64, tmp_path)
    assert theta_1 > 0.05  # it learned to raise the reward x
    assert theta_64 == pytest.approx(theta_1, rel=1e-4)
    for col in ("clip_fraction", "approx_kl"):
        assert table_64[col].tolist() == pytest.approx(table_1[col].tolist(), rel=1e-3, abs=1e-9)
    assert 0 < table_1["clip_fraction"].max() <= 1
