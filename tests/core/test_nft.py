"""DiffusionNFT (core/nft.py): the loss's optimum in closed form, its gradient, and a toy run."""

import pytest
import torch

from pgraft.apps.toy.train import make_problem
from pgraft.core.bridges import VPPath
from pgraft.core.nft import NFTConfig, implicit_policies, nft_loss, optimality_weights, run_nft
from pgraft.core.schedules import cosine_alpha_bar


def _minimise(loss_of, shape):
    """argmin of a quadratic loss in a free tensor (LBFGS converges to it exactly)."""
    v = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = loss_of(v)
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach()


def test_implicit_policies_mirror_each_other_about_the_old_policy():
    gen = torch.Generator().manual_seed(0)
    v_old, v = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    pos, neg = implicit_policies(v_old, v, 0.3)
    assert torch.allclose(pos + neg, 2 * v_old)
    assert torch.allclose(pos - neg, 2 * 0.3 * (v - v_old))
    assert torch.allclose(implicit_policies(v_old, v, 1.0)[0], v)  # beta = 1: v+ is the network


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_two_point_optimum_is_the_positive_samples_flow(beta):
    # one x_s, two clean targets u_a (w = 1) and u_b (w = 0); v_old their regression (u_a + u_b)/2:
    # the minimiser gives v+ = u_a (the reward-tilted target) and v- = u_b
    u = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v_old = u.mean(0, keepdim=True).expand(2, 2)
    v = _minimise(lambda p: nft_loss(p.expand(2, 2), v_old, u, w, beta), (1, 2))
    pos, neg = implicit_policies(v_old[:1], v, beta)
    assert torch.allclose(pos, u[:1], atol=1e-6)
    assert torch.allclose(neg, u[1:], atol=1e-6)


def test_optimum_in_closed_form_for_any_weights():
    # dL/dv = 0 at v* = v_old + mean((2w - 1)(u - v_old)) / beta, for a free output at one x_s
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    v_old = torch.randn(1, 3, generator=gen, dtype=torch.float64).expand(7, 3)
    beta = 0.4
    v = _minimise(lambda p: nft_loss(p.expand(7, 3), v_old, u, w, beta), (1, 3))
    expected = v_old[0] + ((2 * w - 1)[:, None] * (u - v_old)).mean(0) / beta
    assert torch.allclose(v[0], expected, atol=1e-6)


def test_gradient_at_the_old_policy_is_reward_weighted_regression():
    # at v = v_old both implicit policies equal v_old: grad_v L = -(2 beta / (B D)) (2w - 1)(u - v_old) per entry,
    # i.e. beta times the gradient of a regression on u weighted by 2w - 1 (good samples pull, bad ones push)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    lam = torch.rand(6, generator=gen, dtype=torch.float64)
    v_old = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    for beta in (1e-3, 0.5):
        v = v_old.clone().requires_grad_(True)
        nft_loss(v, v_old, u, w, beta, lam).backward()
        expected = -(2 * beta / (6 * 4)) * (lam * (2 * w - 1))[:, None] * (u - v_old)
        assert torch.allclose(v.grad, expected, atol=1e-12)


def test_optimality_weights_map_clipped_advantages_onto_0_1():
    a = torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert torch.allclose(optimality_weights(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


@pytest.mark.parametrize("change, message", [({"beta": 0.0}, "beta must be > 0, got 0.0"),
                                             ({"advantage": "x"}, "advantage must be one of"),
                                             ({"groups": 0}, "groups must be >= 1, got 0"),
                                             ({"lora_rank": -1}, "lora_rank must be >= 0")])
def test_bad_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        NFTConfig(**change)


@pytest.fixture
def toy_base(trained_toy_base):
    return trained_toy_base


@pytest.mark.slow  # pretrains a small toy base (module fixture)
def test_nft_raises_the_toy_reward_and_is_seeded(toy_base, tmp_path):
    toy, base = toy_base
    cfg = NFTConfig(rounds=3, groups=16, group_size=8, epochs=2, batch_size=64, lr=1e-3, sample_batch_size=128,
                    seed=0)
    tables = [run_nft(make_problem(toy), VPPath(cosine_alpha_bar), base, toy.model_config(), cfg, tmp_path / name,
                      show_progress=False)[1] for name in ("a", "b")]
    table = tables[0]
    assert list(table["phase"]) == ["train"] * 3 + ["eval"]
    assert table["reward_mean"].iloc[-1] > table["reward_mean"].iloc[0] + 0.3
    assert table["positive_weight_mean"].iloc[:3].tolist() == pytest.approx([0.5] * 3, abs=1e-6)  # A has mean 0
    assert tables[0]["reward_mean"].tolist() == tables[1]["reward_mean"].tolist()


@pytest.mark.slow  # pretrains a small toy base (module fixture)
def test_a_resumed_nft_run_ends_as_an_uninterrupted_one(toy_base, tmp_path):
    toy, base = toy_base
    cfg = NFTConfig(rounds=3, groups=8, group_size=8, epochs=1, batch_size=32, lr=1e-3, sample_batch_size=64, seed=3)
    path = VPPath(cosine_alpha_bar)
    _, full = run_nft(make_problem(toy), path, base, toy.model_config(), cfg, tmp_path / "full", show_progress=False)

    def cut(round_, result):  # after round 1's checkpoint committed
        if round_ == 1:
            raise RuntimeError("cut")

    problem = make_problem(toy)
    problem.on_round = cut
    with pytest.raises(RuntimeError, match="cut"):
        run_nft(problem, path, base, toy.model_config(), cfg, tmp_path / "cut", show_progress=False)
    _, resumed = run_nft(make_problem(toy), path, base, toy.model_config(), cfg, tmp_path / "cut",
                         show_progress=False, resume=True)
    cols = ["round", "phase", "reward_mean", "reward_std"]
    assert resumed[cols].equals(full[cols])
    assert resumed["train_loss"].iloc[:3].tolist() == full["train_loss"].iloc[:3].tolist()


def test_lora_head_starts_at_full_fine_tunings_loss_and_trains_only_the_adapters(tmp_path):
    # one minibatch per round: train_loss is the loss at step 0, where LoRA's B = 0 makes the head the base
    from dataclasses import replace

    from pgraft.apps.toy.model import ToyDenoiser
    from pgraft.apps.toy.train import ToyConfig
    from pgraft.core.rundir import RunDir

    toy = ToyConfig(n_steps=4, hidden=16, depth=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = ToyDenoiser(**toy.model_config()).eval()
    cfg = NFTConfig(rounds=1, groups=4, group_size=4, epochs=1, batch_size=16, lr=1e-2, sample_batch_size=16,
                    final_eval=False, seed=0)
    lora_cfg = replace(cfg, lora_rank=2)
    runs = {name: run_nft(make_problem(toy), VPPath(cosine_alpha_bar), base, toy.model_config(), c, tmp_path / name,
                          show_progress=False) for name, c in (("full", cfg), ("lora", lora_cfg))}
    full, lora = (runs[k][1].iloc[0] for k in ("full", "lora"))
    assert lora["reward_mean"] == full["reward_mean"]  # the same round-0 candidates (both sample the base)
    assert lora["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6, abs=0)
    _, weights, _ = RunDir(tmp_path / "lora", resume=True).load_checkpoint()
    base_state = base.state_dict()
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
              for k, v in weights.items() if "lora_" not in k}
    assert frozen.keys() == base_state.keys()
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)  # the base's weights untouched
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 3 and all(bool(v.abs().sum() > 0) for v in lora_b)  # every adapter moved off B = 0
    x, t = torch.randn(8, 1, generator=torch.Generator().manual_seed(1)), torch.full((8,), 0.5)
    with torch.no_grad():  # the returned head is the merged policy, away from the base
        assert not torch.allclose(runs["lora"][0](x, t), base(x, t), atol=1e-6)
