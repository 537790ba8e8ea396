"""P-GRAFT losses: the forward bridges have the right marginals, and a head trained on a known
X_t law reproduces it when sampled T -> t."""

import pytest
import torch
from torch import nn

from pgraft.core.losses import eps_matching_loss, flow_bridge, flow_matching_loss, masked_cross_entropy, remask
from pgraft.core.sampling import ddim_log_prob, ddim_step, euler_step, sample, sample_split, unmask_tokens
from pgraft.core.schedules import cosine_alpha_bar, flow_times, split_times


def test_flow_bridge_from_x_t_has_the_base_marginal(gen):
    # X_0 ~ N(3, 0.5^2); X_t = (1-t) X_0 + t eps; bridge to s must give (1-s) X_0 + s eps' in law
    t, s = 0.4, 0.7
    x0 = 3 + 0.5 * torch.randn(200_000, 1, generator=gen)
    x_t = (1 - t) * x0 + t * torch.randn_like(x0)
    x_s, u, w = flow_bridge(x_t, t, torch.full((len(x0),), s), torch.randn(x0.shape, generator=gen))
    assert x_s.mean().item() == pytest.approx((1 - s) * 3, abs=0.01)
    assert x_s.var().item() == pytest.approx((1 - s) ** 2 * 0.25 + s**2, abs=0.01)
    assert 0 < w[0].item() < 1


def test_flow_bridge_at_t0_is_ordinary_cfm(gen):
    x0 = torch.randn(5, 3, generator=gen)
    eps = torch.randn(5, 3, generator=gen)
    s = torch.rand(5, generator=gen)
    x_s, u, w = flow_bridge(x0, 0.0, s, eps)
    assert torch.allclose(x_s, (1 - s[:, None]) * x0 + s[:, None] * eps)
    assert torch.allclose(u, eps - x0) and torch.all(w == 1)


class MLP(nn.Module):
    def __init__(self, dim=1, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t[:, None].float()], 1))


def _fit(loss_fn, steps=1500, lr=3e-3):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = loss_fn(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_pgraft_flow_head_reproduces_known_intermediate_law():
    # the tilted X_t law is N(1.5, 0.3^2) at t = 0.5; a head trained with the P-GRAFT loss must
    # carry N(0,1) at s = 1 to it when sampled over the head grid 1 -> 0.5
    t = 0.5
    law = lambda n, g: 1.5 + 0.3 * torch.randn(n, 1, generator=g)  # noqa: E731
    model = _fit(lambda m, g: flow_matching_loss(m, law(256, g), t, None, g))
    head_times = split_times(flow_times(40), t, "time").head
    x_t = sample(model, torch.randn(20_000, 1, generator=torch.Generator().manual_seed(1)), head_times, euler_step)
    assert x_t.mean().item() == pytest.approx(1.5, abs=0.08)
    assert x_t.std().item() == pytest.approx(0.3, abs=0.08)


def test_pgraft_eps_head_reproduces_known_intermediate_law():
    t = 0.4
    law = lambda n, g: -1.0 + 0.5 * torch.randn(n, 1, generator=g)  # noqa: E731
    model = _fit(lambda m, g: eps_matching_loss(m, law(256, g), t, cosine_alpha_bar, None, g), steps=2000)
    head_times = split_times(flow_times(50), t, "time").head
    # stochastic (DDPM-like) head sampler: robust to the crude model near t = 1
    x_t = sample(model, torch.randn(20_000, 1, generator=torch.Generator().manual_seed(1)), head_times,
                 ddim_step(cosine_alpha_bar, 1.0), generator=torch.Generator().manual_seed(2))
    assert x_t.mean().item() == pytest.approx(-1.0, abs=0.1)
    assert x_t.std().item() == pytest.approx(0.5, abs=0.1)


def test_remask_only_masks_unmasked_tokens_at_the_right_rate(gen):
    mask_id = 9
    tokens = torch.randint(0, 9, (4000, 20), generator=gen)
    tokens[:, :5] = mask_id  # masked at t_from: must never be counted as newly masked
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    maskable[:, -2:] = False
    t_from, t_to = 0.25, torch.full((4000,), 0.625)
    out, newly = remask(tokens, maskable, mask_id, t_from, t_to, gen)
    assert not newly[:, :5].any() and not newly[:, -2:].any()
    assert (out[newly] == mask_id).all() and torch.equal(out[~newly], tokens[~newly])
    rate = newly[:, 5:-2].float().mean().item()
    assert rate == pytest.approx((0.625 - 0.25) / 0.75, abs=0.01)


def test_masked_cross_entropy_ignores_unweighted_positions():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[0, 99, 1], [2, 99, 3]])  # 99 would crash cross_entropy if read
    mask = targets != 99
    ce = masked_cross_entropy(logits, targets, mask)
    assert torch.isfinite(ce)
    assert masked_cross_entropy(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_unmask_tokens_reveals_everything_at_zero_and_never_changes_revealed(gen):
    mask_id = 4
    tokens = torch.full((50, 10), mask_id)
    tokens[:, 0] = 2
    logits = torch.randn(50, 10, 4, generator=gen)
    half = unmask_tokens(tokens, logits, mask_id, 1.0, 0.5, gen)
    assert (half[:, 0] == 2).all()
    assert (half == mask_id).float().mean().item() == pytest.approx(0.5 * 0.9, abs=0.05)
    done = unmask_tokens(half, logits, mask_id, 0.5, 0.0, gen)
    assert not (done == mask_id).any()
    assert torch.equal(done[half != mask_id], half[half != mask_id])


def test_euler_is_exact_for_constant_velocity():
    model = lambda x, t, c: torch.full_like(x, -2.0)  # noqa: E731
    x = sample(model, torch.zeros(3, 2), flow_times(7), euler_step)
    assert torch.allclose(x, torch.full((3, 2), 2.0))


def test_split_sampler_runs_head_then_base():
    head = lambda x, t, c: torch.full_like(x, -1.0)  # noqa: E731
    base = lambda x, t, c: torch.full_like(x, -10.0)  # noqa: E731
    out = sample_split(head, base, torch.zeros(2, 1), flow_times(10), 6, euler_step)
    assert out.t == pytest.approx(0.4)
    assert torch.allclose(out.x_t, torch.full((2, 1), 0.6))
    assert torch.allclose(out.x_0, torch.full((2, 1), 0.6 + 4.0))


@pytest.mark.parametrize("clip", [None, 0.1])
def test_ddim_log_prob_is_the_gaussian_density_of_the_step(gen, clip):
    model = MLP()
    step, logp = ddim_step(cosine_alpha_bar, 1.0, clip), ddim_log_prob(cosine_alpha_bar, 1.0, clip)
    x = torch.randn(8, 1, generator=gen)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        x_next = step(model, x, 0.6, 0.5, None, g1)
        z = torch.randn(x.shape, generator=g2)
        lp = logp(model, x, 0.6, 0.5, x_next, None)
    # x_next = mean + sigma z  =>  log N(x_next; mean, sigma) = -z^2/2 - log sigma - log(2pi)/2
    a_t, a_n = float(cosine_alpha_bar(0.6)), float(cosine_alpha_bar(0.5))
    sigma = ((1 - a_n) / (1 - a_t)) ** 0.5 * (1 - a_t / a_n) ** 0.5
    expected = (-0.5 * z**2 - torch.log(torch.tensor(sigma)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(1)
    assert torch.allclose(lp, expected, atol=1e-4)


def test_unmask_log_prob_sums_revealed_positions_only():
    from pgraft.core.sampling import unmask_log_prob

    mask_id = 3
    tokens = torch.tensor([[3, 3, 1, 3]])
    nxt = torch.tensor([[0, 3, 1, 2]])  # positions 0 and 3 revealed; 2 was already known
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]] * 4]))
    lp = unmask_log_prob(tokens, nxt, logits, mask_id)
    assert lp.item() == pytest.approx(float(torch.log(torch.tensor(0.5 * 0.25))))


def test_clipped_ddim_step_matches_unclipped_inside_range_and_bounds_x0():
    x0 = torch.rand(4, 3, 2, 2) * 1.6 - 0.8
    a = float(cosine_alpha_bar(0.6))
    eps = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    x = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    oracle = lambda x_, t_, c_: eps  # noqa: E731  exact eps: x0_hat = x0 lies inside [-1, 1]
    for eta in (0.0, 1.0):
        a_out = ddim_step(cosine_alpha_bar, eta, clip=1.0)(oracle, x, 0.6, 0.4, None, torch.Generator().manual_seed(1))
        b_out = ddim_step(cosine_alpha_bar, eta)(oracle, x, 0.6, 0.4, None, torch.Generator().manual_seed(1))
        torch.testing.assert_close(a_out, b_out)
    wild = lambda x_, t_, c_: torch.full_like(x_, -50.0)  # noqa: E731  a terrible model
    out = ddim_step(cosine_alpha_bar, 0.0, clip=1.0)(wild, torch.zeros(1, 3, 2, 2), 0.5, 0.0)
    assert out.abs().max() <= 1.0  # last step returns the clipped x0_hat
    assert ddim_step(cosine_alpha_bar, 0.0)(wild, torch.zeros(1, 3, 2, 2), 0.5, 0.0).abs().max() > 1.0


def test_v_weighting_of_the_eps_loss_is_the_v_prediction_mse():
    from pgraft.core.losses import sample_times

    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))

    def v_model(x_s, s, cond):  # predicts v = 0, reported as eps = sqrt(a) v + sqrt(1 - a) x_s
        return (1 - cosine_alpha_bar(s.double()).float())[:, None].sqrt() * x_s

    loss = eps_matching_loss(v_model, x0, 0.0, cosine_alpha_bar, None, torch.Generator().manual_seed(1), weighting="v")
    g = torch.Generator().manual_seed(1)  # replay the loss's draws: s, then the noise
    s = sample_times(16, 0.0, g)
    eta = torch.randn(x0.shape, generator=g)
    a = cosine_alpha_bar(s.double()).float()[:, None]
    v = a.sqrt() * eta - (1 - a).sqrt() * x0
    torch.testing.assert_close(loss, (v**2).mean(1).mean(), rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        eps_matching_loss(v_model, x0, 0.0, cosine_alpha_bar, None, None, weighting="x0")
