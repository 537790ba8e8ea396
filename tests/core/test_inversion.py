
import pytest
import torch
from torch import nn

from pgraft.core.inversion import count_flops, invert, sample_noise_corrected, sampler_flops, train_noise_flow
from pgraft.core.pretrain import PretrainConfig
from pgraft.core.sampling import euler_step, heun_step, sample
from pgraft.core.schedules import flow_times


class Velocity(nn.Module):
    def __init__(self, dim=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Linear(32, dim))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t[:, None]], 1))


@pytest.mark.parametrize("step", [euler_step, heun_step])
def test_inversion_then_sampling_returns_the_input(step, gen):
    model = Velocity()
    x0 = torch.randn(7, 3, generator=gen)
    times = flow_times(20)
    inv = invert(model, x0, times, step, tol=1e-7, max_iter=100)
    assert inv.residual.max() < 1e-5
    back = sample(model, inv.noise, times, step)
    assert torch.allclose(back, x0, atol=1e-4)  # tolerance: 1e-4 in float32 after 20 steps


class ConstantShift(nn.Module):
    """v = -m: the Euler sampler maps noise z to z + m exactly."""

    def __init__(self, m: float):
        super().__init__()
        self.m = m
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        return torch.full_like(x, -self.m) + 0 * self.dummy


def test_noise_correction_learns_the_inverted_noise_law(tmp_path, gen):
    # base maps N(0,1) to N(2,1) but the data are N(2.7, 1): the ideal noise law is N(0.7, 1)
    base = ConstantShift(2.0)
    data = 2.7 + torch.randn(4000, 1, generator=gen)
    inv = invert(base, data, flow_times(5), euler_step)
    assert inv.noise.mean().item() == pytest.approx(0.7, abs=0.05)
    noise_model = Velocity(dim=1)
    cfg = PretrainConfig(steps=600, lr=3e-3, warmup=10, ema=0.9, log_every=100, ckpt_every=600)
    noise_model = train_noise_flow(noise_model, inv.noise, cfg, tmp_path, {"dim": 1}, batch_size=256,
                                   show_progress=False)
    z = torch.randn(8000, 1, generator=gen)
    x = sample_noise_corrected(noise_model, base, z, flow_times(10), flow_times(5))
    assert x.mean().item() == pytest.approx(2.7, abs=0.1)
    assert sample(base, z, flow_times(5), euler_step).mean().item() == pytest.approx(2.0, abs=0.05)


def test_ot_pairing_is_the_monotone_coupling_in_1d(gen):
    from pgraft.core.losses import ot_pairing

    x, z = torch.randn(64, 1, generator=gen), torch.randn(64, 1, generator=gen)
    paired = ot_pairing(x, z)
    assert sorted(paired.view(-1).tolist()) == sorted(z.view(-1).tolist())  # a permutation of the noise
    assert torch.equal(paired[x.view(-1).argsort()].view(-1), z.view(-1).sort().values)  # ranks matched


@pytest.mark.slow  # over 5 s here
@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_one_step_noise_flow_keeps_the_spread_only_with_ot_coupling(tmp_path, gen, coupling):
    # target noise law N(0.7, 1): the OT map from N(0, 1) is a shift, a straight path that one Euler
    # step follows exactly; the independent coupling's field at s = 1 points every z to the mean.
    noises = 0.7 + torch.randn(4000, 1, generator=gen)
    cfg = PretrainConfig(steps=600, lr=3e-3, warmup=10, ema=0.9, log_every=100, ckpt_every=600)
    model = train_noise_flow(Velocity(dim=1), noises, cfg, tmp_path, {"dim": 1}, batch_size=256,
                             show_progress=False, coupling=coupling)
    x = sample(model, torch.randn(8000, 1, generator=gen), flow_times(1), euler_step)
    assert x.mean().item() == pytest.approx(0.7, abs=0.1)
    if coupling == "ot":
        assert x.std().item() == pytest.approx(1.0, abs=0.15)
    else:
        assert x.std().item() < 0.5


def test_flops_are_counted():
    lin = nn.Linear(4, 8, bias=False)
    assert count_flops(lambda: lin(torch.zeros(1, 4))) == 2 * 4 * 8
    # attention: Q K^T and the weighted sum of V, 2 L^2 d FLOPs each, on the CPU as on a GPU
    # (the CPU's fused attention kernel alone would be counted as 0)
    q = torch.randn(2, 4, 49, 64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, q, q)) == 2 * 4 * 2 * (2 * 49 * 49 * 64)
    model = Velocity(dim=3)
    per_eval = 2 * (4 * 32 + 32 * 3)
    assert sampler_flops(model, torch.zeros(1, 3), n_steps=10, evals_per_step=2) == per_eval * 20


def test_invert_step_stops_when_the_iteration_stalls_and_keeps_the_best_iterate():
    from pgraft.core.inversion import invert_step

    # v(x) = -a x, t -> t_next = t - 0.1: step(x) = (1 + 0.1 a) x, and the fixed-point map
    # x <- x_next - 0.1 a x diverges for 0.1 a = 3 > 1,
    # so the residual never falls below tol; the stall stop ends it early and returns the start.
    a, x_next = 30.0, torch.ones(2, 3)
    model = lambda x, t, c: -a * x  # noqa: E731
    x, res, it = invert_step(model, x_next, 0.2, 0.1, max_iter=50, tol=1e-6, patience=3)
    assert it == 4  # the first residual is the best; 3 non-improving iterations follow
    torch.testing.assert_close(x, x_next)
    torch.testing.assert_close(res, torch.full((2,), 0.1 * a))  # |x + dt * v(x) - x_next| at x = x_next
    # a contracting case (0.1 a = 0.5) converges to x = x_next / 1.5 instead
    x, res, it = invert_step(lambda x, t, c: -5.0 * x, x_next, 0.2, 0.1, max_iter=100, tol=1e-6)
    assert res.max() < 1e-6 and it < 100
    torch.testing.assert_close(1.5 * x, x_next, atol=1e-5, rtol=0)


def test_invert_step_drops_converged_samples_and_a_samples_result_does_not_depend_on_its_batch():
    from pgraft.core.inversion import invert_step

    # per-sample contraction rates: row 0 contracts fast (0.1 a = 0.05), row 1 slowly (0.1 a = 0.8),
    # so whole-batch iteration would evaluate row 0 as often as row 1
    rate = torch.tensor([0.5, 8.0]).view(2, 1)
    rows_seen = []

    def model(x, t, c):
        rows_seen.append(len(x))
        return -c * x  # c: each sample's own rate (split with the batch)

    x_next = torch.ones(2, 3)
    x, res, it = invert_step(model, x_next, 0.2, 0.1, cond=rate, max_iter=200, tol=1e-6)
    assert res.max() < 1e-6
    torch.testing.assert_close((1 + 0.1 * rate) * x, x_next, atol=1e-5, rtol=0)
    assert it == len(rows_seen) and rows_seen[0] == 2 and rows_seen[-1] == 1  # row 0 left, row 1 went on
    assert sum(rows_seen) < 2 * it
    alone, res_alone, it_alone = invert_step(model, x_next[:1], 0.2, 0.1, cond=rate[:1], max_iter=200, tol=1e-6)
    assert torch.equal(alone, x[:1]) and torch.equal(res_alone, res[:1])
    assert it_alone == rows_seen.count(2) < it  # row 0 left the pair after its own iterations


def test_invert_step_splits_a_condition_object_with_take_samples_and_refuses_one_without():
    import pytest

    from pgraft.core.inversion import invert_step

    class Rates:  # a per-sample condition that is not a tensor (like a batch of prompt embeddings)
        def __init__(self, rate):
            self.rate = rate

        def take_samples(self, index):
            return Rates(self.rate[index])

    rate = torch.tensor([0.5, 8.0]).view(2, 1)
    model = lambda x, t, c: -c.rate * x  # noqa: E731  (fails on a shape mismatch if c is not split)
    x_next = torch.ones(2, 3)
    x, res, _ = invert_step(model, x_next, 0.2, 0.1, cond=Rates(rate), max_iter=200, tol=1e-6)
    assert res.max() < 1e-6
    torch.testing.assert_close((1 + 0.1 * rate) * x, x_next, atol=1e-5, rtol=0)
    # a tensor without the batch dimension is shared by every sample and passed whole
    shared = torch.tensor(0.5)
    x, res, _ = invert_step(lambda x, t, c: -c * x, x_next, 0.2, 0.1, cond=shared, max_iter=200, tol=1e-6)
    torch.testing.assert_close(1.05 * x, x_next, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="dict condition cannot be split by sample"):
        invert_step(lambda x, t, c: -x, x_next, 0.2, 0.1, cond={"rate": rate})
