"""The forward processes of core/bridges.py against the closed forms of docs/derivations.md, section 3:
marginals from a fixed X_t and from a Gaussian X_0, the restarted bridges' regression targets
against the base's posterior fields, and the endpoints s = t_start."""

import math

import pytest
import torch

from pgraft.core.bridges import LinearFlowPath, MaskingPath, PathSample, VPPath
from pgraft.core.losses import flow_bridge, remask
from pgraft.core.schedules import cosine_alpha_bar, linear_alpha_bar

N = 400_000


def _normal(n, gen, dtype=torch.float64):
    return torch.randn(n, 1, generator=gen, dtype=dtype)


def _fit_line(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x (both [N, 1])."""
    x, y = x.flatten().double(), y.flatten().double()
    slope = ((x - x.mean()) * (y - y.mean())).mean() / x.var(unbiased=False)
    return slope.item(), (y.mean() - slope * x.mean()).item()


@pytest.mark.parametrize("path", [LinearFlowPath, lambda t: VPPath(cosine_alpha_bar, t), lambda t: MaskingPath(3, t)])
@pytest.mark.parametrize("t_start", [-0.1, 1.0, 1.5])
def test_paths_reject_t_start_outside_0_1(path, t_start):
    with pytest.raises(ValueError, match="t_start must be in"):
        path(t_start)


# ----------------------------------------------------------------------------- linear flow
def _flow_sigma2(t, s):
    return s**2 - (1 - s) ** 2 * t**2 / (1 - t) ** 2


@pytest.mark.parametrize("t, s", [(0.0, 0.6), (0.4, 0.7), (0.6, 0.9)])
def test_flow_bridge_from_a_fixed_x_t_has_mean_m_x_t_and_variance_sigma2(gen, t, s):
    x_t = torch.full((N, 1), 1.7, dtype=torch.float64)
    out = LinearFlowPath(t).sample(x_t, _normal(N, gen), torch.full((N,), s, dtype=torch.float64))
    assert isinstance(out, PathSample)
    assert out.x_t.mean().item() == pytest.approx((1 - s) / (1 - t) * 1.7, abs=0.01)
    assert out.x_t.var().item() == pytest.approx(_flow_sigma2(t, s), rel=0.01)
    assert torch.allclose(out.weight, torch.full((N,), _flow_sigma2(t, s) / s**2, dtype=torch.float64))


@pytest.mark.parametrize("t, s", [(0.0, 0.5), (0.4, 0.7), (0.6, 0.9)])
def test_restarted_flow_bridge_has_the_base_marginal_and_the_base_velocity_field(gen, t, s):
    # X_0 ~ N(mu, tau^2), X_t = (1-t) X_0 + t eps'. The bridge's x_s must be distributed like the base path's
    # (1-s) X_0 + s eps, and its target u must regress on x_s to the base's marginal velocity
    # E[eps - X_0 | x_s] (Gaussian, so linear in x_s): the head keeps the base's parametrisation.
    mu, tau = 2.0, 0.5
    x0 = mu + tau * _normal(N, gen)
    x_t = (1 - t) * x0 + t * _normal(N, gen)
    out = LinearFlowPath(t).sample(x_t, _normal(N, gen), torch.full((N,), s, dtype=torch.float64))
    var_s = (1 - s) ** 2 * tau**2 + s**2
    assert out.x_t.mean().item() == pytest.approx((1 - s) * mu, abs=0.01)
    assert out.x_t.var().item() == pytest.approx(var_s, rel=0.01)
    slope = (s - (1 - s) * tau**2) / var_s  # Cov(eps - X_0, x_s) / Var(x_s)
    intercept = -mu - slope * (1 - s) * mu
    got_slope, got_intercept = _fit_line(out.x_t, out.target)
    assert got_slope == pytest.approx(slope, abs=0.02)
    assert got_intercept == pytest.approx(intercept, abs=0.02)
    # equivalently x_s - s u regresses to the posterior mean E[X_0 | x_s] (the x_0-prediction)
    post_slope = (1 - s) * tau**2 / var_s
    got_slope, got_intercept = _fit_line(out.x_t, out.x_t - s * out.target)
    assert got_slope == pytest.approx(post_slope, abs=0.02)
    assert got_intercept == pytest.approx(mu - post_slope * (1 - s) * mu, abs=0.02)


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_flow_target_is_the_time_derivative_of_the_path(gen, t):
    x_t, eta = torch.randn(64, 3, generator=gen, dtype=torch.float64), torch.randn(64, 3, generator=gen, dtype=torch.float64)
    s = t + 0.1 + 0.8 * torch.rand(64, generator=gen, dtype=torch.float64)
    path, h = LinearFlowPath(t), 1e-6
    u = path.sample(x_t, eta, s).target
    finite_difference = (path.sample(x_t, eta, s + h).x_t - path.sample(x_t, eta, s - h).x_t) / (2 * h)
    torch.testing.assert_close(u, finite_difference, rtol=1e-6, atol=1e-6)


def test_flow_from_data_recovers_x_0_and_has_unit_weight(gen):
    x0, eps = torch.randn(32, 2, 3, generator=gen), torch.randn(32, 2, 3, generator=gen)
    s = torch.rand(32, generator=gen)
    s[0] = 0.0
    out = LinearFlowPath().sample(x0, eps, s)
    torch.testing.assert_close(out.x_t - s[:, None, None] * out.target, x0)
    assert torch.equal(out.x_t[0], x0[0]) and torch.equal(out.target, eps - x0)
    assert torch.equal(out.weight, torch.ones(32)) and out.t is s


def test_flow_bridge_at_s_equal_t_start_returns_x_t(gen):
    t = 0.5
    x_t, eta = torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen)
    out = LinearFlowPath(t).sample(x_t, eta, torch.full((16,), t))
    torch.testing.assert_close(out.x_t, x_t, rtol=0, atol=1e-5)  # sigma_t^2 = 0, clamped to 1e-12
    assert torch.isfinite(out.target).all() and (out.weight < 1e-10).all()


def test_flow_weight_rises_from_0_at_t_start_to_1_at_s_1():
    t = 0.3
    s = torch.linspace(t, 1.0, 50, dtype=torch.float64)
    w = LinearFlowPath(t).sample(torch.zeros(50, 1, dtype=torch.float64), torch.zeros(50, 1, dtype=torch.float64), s).weight
    assert w[0] < 1e-10 and w[-1].item() == pytest.approx(1.0) and torch.all(w.diff() > 0)
    assert torch.all((w >= 0) & (w <= 1))


def test_flow_bridge_is_the_tuple_form_of_the_path(gen):
    x, eta, s = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen), 0.2 + 0.8 * torch.rand(8, generator=gen)
    for t in (0.0, 0.2):
        out = LinearFlowPath(t).sample(x, eta, s)
        for a, b in zip(flow_bridge(x, t, s, eta), (out.x_t, out.target, out.weight)):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- VP diffusion
@pytest.mark.parametrize("alpha_bar", [cosine_alpha_bar, linear_alpha_bar])
def test_vp_bridge_from_a_fixed_x_t_has_mean_and_variance_of_the_forward_step(gen, alpha_bar):
    t, s = 0.25, 0.5
    ratio = float(alpha_bar(s)) / float(alpha_bar(t))
    x_t = torch.full((N, 1), -1.3, dtype=torch.float64)
    out = VPPath(alpha_bar, t).sample(x_t, _normal(N, gen), torch.full((N,), s, dtype=torch.float64))
    assert out.x_t.mean().item() == pytest.approx(math.sqrt(ratio) * -1.3, abs=0.01)
    assert out.x_t.var().item() == pytest.approx(1 - ratio, rel=0.01)
    assert out.weight[0].item() == pytest.approx((1 - ratio) / (1 - float(alpha_bar(s))))


@pytest.mark.parametrize("t, s", [(0.0, 0.5), (0.4, 0.7)])
def test_restarted_vp_bridge_has_the_base_marginal_and_the_base_eps_field(gen, t, s):
    # X_0 ~ N(mu, tau^2), X_t = sqrt(a_t) X_0 + sqrt(1 - a_t) eps'. x_s ~ sqrt(a_s) X_0 + sqrt(1 - a_s) eps in law,
    # and the unweighted eps target eta / sqrt(lambda) regresses to the base's E[eps | x_s].
    mu, tau = -1.0, 0.5
    a_t, a_s = float(cosine_alpha_bar(t)), float(cosine_alpha_bar(s))
    x0 = mu + tau * _normal(N, gen)
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * _normal(N, gen)
    out = VPPath(cosine_alpha_bar, t).sample(x_t, _normal(N, gen), torch.full((N,), s, dtype=torch.float64))
    var_s = a_s * tau**2 + 1 - a_s
    assert out.x_t.mean().item() == pytest.approx(math.sqrt(a_s) * mu, abs=0.01)
    assert out.x_t.var().item() == pytest.approx(var_s, rel=0.01)
    slope = math.sqrt(1 - a_s) / var_s  # E[eps | x] = slope * (x - sqrt(a_s) mu)
    got_slope, got_intercept = _fit_line(out.x_t, out.target / out.weight.sqrt()[:, None])
    assert got_slope == pytest.approx(slope, abs=0.02)
    assert got_intercept == pytest.approx(-slope * math.sqrt(a_s) * mu, abs=0.02)


def test_vp_from_data_recovers_x_0_with_unit_weight_including_s_0(gen):
    x0 = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    eta = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    s = torch.rand(32, generator=gen)
    s[0] = 0.0  # abar = 1: lambda is 0/0, its limit is 1
    out = VPPath(cosine_alpha_bar).sample(x0, eta, s)
    a = cosine_alpha_bar(s.double())[:, None]
    torch.testing.assert_close((out.x_t - (1 - a).sqrt() * out.target) / a.sqrt(), x0)
    assert torch.equal(out.x_t[0], x0[0]) and torch.equal(out.target, eta)
    assert torch.equal(out.weight, torch.ones(32, dtype=torch.float64))


def test_vp_bridge_at_s_equal_t_start_returns_x_t_with_zero_weight(gen):
    t = 0.5  # exactly representable in float32: abar(s) == abar(t_start)
    x_t = torch.randn(16, 4, generator=gen)
    out = VPPath(cosine_alpha_bar, t).sample(x_t, torch.randn(16, 4, generator=gen), torch.full((16,), t))
    assert torch.equal(out.x_t, x_t) and torch.equal(out.weight, torch.zeros(16, dtype=torch.float64))


# ----------------------------------------------------------------------------- masking
MASK = 9


def _masked_at(x0: torch.Tensor, t: float, gen) -> torch.Tensor:
    return MaskingPath(MASK).sample(x0, torch.rand(x0.shape, generator=gen), torch.full((len(x0),), t)).x_t


@pytest.mark.parametrize("t, s", [(0.0, 0.4), (0.3, 0.8)])
def test_restarted_masking_bridge_masks_a_fraction_s_overall(gen, t, s):
    # base to t, then the bridge t -> s: every token masked with probability s, as the base to s
    x0 = torch.randint(0, MASK, (20_000, 20), generator=gen)
    x_t = _masked_at(x0, t, gen)
    out = MaskingPath(MASK, t).sample(x_t, torch.rand(x0.shape, generator=gen), torch.full((len(x0),), s))
    assert (x_t == MASK).float().mean().item() == pytest.approx(t, abs=0.005)
    assert (out.x_t == MASK).float().mean().item() == pytest.approx(s, abs=0.005)
    visible = x_t != MASK
    assert out.weight[visible].float().mean().item() == pytest.approx((s - t) / (1 - t), abs=0.005)


def test_masking_bridge_never_unmasks_and_weights_exactly_the_newly_masked(gen):
    t = 0.3
    x0 = torch.randint(0, MASK, (500, 30), generator=gen)
    x_t = _masked_at(x0, t, gen)
    maskable = torch.rand(x0.shape, generator=gen) < 0.8
    s = t + (1 - t) * torch.rand(500, generator=gen)
    out = MaskingPath(MASK, t).sample(x_t, torch.rand(x0.shape, generator=gen), s, maskable)
    assert (out.x_t[x_t == MASK] == MASK).all()  # masked at t_start stays masked
    assert torch.equal(out.x_t[~maskable], x_t[~maskable])
    assert torch.equal(out.weight, (x_t != MASK) & (out.x_t == MASK))
    assert torch.equal(out.target, x_t) and torch.equal(out.x_t[~out.weight], x_t[~out.weight])


def test_masking_bridge_masks_where_the_uniform_is_below_the_rate():
    tokens = torch.tensor([[1, 2, MASK, 4]])
    noise = torch.tensor([[0.1, 0.7, 0.0, 0.49]])
    out = MaskingPath(MASK, 0.2).sample(tokens, noise, torch.tensor([0.6]))  # p = 0.4 / 0.8 = 0.5
    assert out.x_t.tolist() == [[MASK, 2, MASK, MASK]]
    assert out.weight.tolist() == [[True, False, False, True]]


def test_masking_bridge_at_s_equal_t_start_changes_nothing(gen):
    x_t = _masked_at(torch.randint(0, MASK, (64, 10), generator=gen), 0.4, gen)
    out = MaskingPath(MASK, 0.4).sample(x_t, torch.rand(x_t.shape, generator=gen), torch.full((64,), 0.4))
    assert torch.equal(out.x_t, x_t) and not out.weight.any()


def test_remask_is_the_tuple_form_of_the_masking_path(gen):
    tokens = torch.randint(0, MASK + 1, (16, 12), generator=gen)
    maskable = torch.rand(tokens.shape, generator=gen) < 0.7
    s = 0.25 + 0.75 * torch.rand(16, generator=gen)
    got = remask(tokens, maskable, MASK, 0.25, s, torch.Generator().manual_seed(5))
    out = MaskingPath(MASK, 0.25).sample(tokens, torch.rand(tokens.shape, generator=torch.Generator().manual_seed(5)),
                                         s, maskable)
    assert torch.equal(got[0], out.x_t) and torch.equal(got[1], out.weight)
