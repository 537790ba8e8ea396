"""Metrics in closed form on hand-built layouts, bad inputs, model/step/loss shapes, conditioning, P-GRAFT loss."""

from __future__ import annotations

import math

import pytest
import torch

from pgraft.apps.layout import diffusion
from pgraft.apps.layout.data import PUBLAYNET_CLASSES, Layouts, pack, page_to_state, synthetic_layouts, to_state
from pgraft.apps.layout.metrics import class_tv, frechet_distance, maximum_iou
from pgraft.apps.layout.model import PRESETS, LayoutDenoiser
from pgraft.apps.layout.rewards import REWARDS, alignment, combined_reward, out_of_page, overlap
from pgraft.core.sampling import sample


def _layouts(rows: list[list[tuple[int, float, float, float, float]]], n: int = 6) -> Layouts:
    return pack(rows, n, PUBLAYNET_CLASSES)


# ----------------------------------------------------------------------------- metrics
def test_perfect_grid_has_zero_alignment():
    # 2 x 3 grid of equal boxes: every element shares its left/centre/right line with the one
    # below it and its top/centre/bottom line with its row neighbours -> d_i = 0 -> alignment 0
    grid = [(0, 0.2 + 0.3 * c, 0.25 + 0.5 * r, 0.2, 0.3) for r in range(2) for c in range(3)]
    d = _layouts([grid])
    assert alignment(d.boxes, d.mask).item() == pytest.approx(0.0, abs=1e-6)
    lone = [(0, 0.3, 0.2, 0.2, 0.1), (1, 0.62, 0.53, 0.2, 0.1)]  # closest lines: x-offset 0.32, y 0.33
    d = _layouts([lone])
    expected = -math.log(1 - 0.32)  # both elements have d = min(0.32, 0.33) = 0.32
    assert alignment(d.boxes, d.mask).item() == pytest.approx(expected, rel=1e-5)


def test_two_identical_boxes_overlap_one():
    # normalization: sum over ordered pairs i != j of area(i ∩ j)/area(i), divided by the number
    # of real elements n: (1 + 1) / 2 = 1
    d = _layouts([[(0, 0.5, 0.5, 0.4, 0.2), (1, 0.5, 0.5, 0.4, 0.2)]])
    assert overlap(d.boxes, d.mask).item() == pytest.approx(1.0, abs=1e-6)
    # box inside a box of twice its area: (1 + 1/2) / 2
    d = _layouts([[(0, 0.5, 0.5, 0.4, 0.2), (1, 0.5, 0.5, 0.2, 0.2)]])
    assert overlap(d.boxes, d.mask).item() == pytest.approx(0.75, abs=1e-6)
    # disjoint boxes and padded slots contribute nothing
    d = _layouts([[(0, 0.25, 0.5, 0.2, 0.2), (1, 0.75, 0.5, 0.2, 0.2)]])
    assert overlap(d.boxes, d.mask).item() == 0.0


def test_out_of_page():
    d = _layouts([[(0, 0.5, 0.5, 0.2, 0.2)], [(0, 0.95, 0.5, 0.2, 0.2)]])
    assert out_of_page(d.boxes, d.mask).tolist() == pytest.approx([0.0, 0.05], abs=1e-6)


def test_max_iou_of_a_set_with_itself_is_one():
    d = synthetic_layouts(30, "test", seed=1, max_elements=10)
    score, coverage = maximum_iou(d, d)
    assert score == pytest.approx(1.0, abs=1e-9) and coverage == 1.0
    # a shifted copy scores less
    shifted = Layouts(d.boxes + 0.02 * d.mask.unsqueeze(-1), d.classes, d.mask, d.class_names)
    assert maximum_iou(shifted, d)[0] < 0.95


def test_fid_and_class_tv_closed_form(gen):
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means differ by 1 in one coordinate -> FID ~ 1
    assert frechet_distance(a, a + torch.tensor([1.0, 0, 0], dtype=torch.float64)) == pytest.approx(1.0, abs=1e-6)
    d = synthetic_layouts(20, "train", max_elements=10)
    assert class_tv(d, d) == 0.0
    only_text = _layouts([[(0, 0.5, 0.5, 0.1, 0.1)]])
    only_title = _layouts([[(1, 0.5, 0.5, 0.1, 0.1)]])
    assert class_tv(only_text, only_title) == 1.0


def test_rewards_are_negated_scores_and_finite_on_wild_samples():
    d = synthetic_layouts(5, "train", max_elements=12)
    s = to_state(d)
    assert torch.allclose(REWARDS["alignment"](s, None), -alignment(d.boxes, d.mask), atol=1e-5)
    assert torch.allclose(REWARDS["overlap"](s, None), -overlap(d.boxes, d.mask), atol=1e-5)
    wild = {"boxes": torch.tensor([[[float("nan"), 5.0, -3.0, 2.0], [40.0, -40.0, 1.0, 1.0]]]),
            "classes": torch.tensor([[0, 1]]), "mask": torch.tensor([[True, True]])}
    for name, r in REWARDS.items():
        assert torch.isfinite(r(wild, None)).all(), name
    with pytest.raises(ValueError, match="unknown score"):
        combined_reward({"beauty": 1.0})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        combined_reward({"overlap": -1.0})


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="every layout in cond needs at least one element"):
        diffusion.prior(2, [0, 1], 5, cond=torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="cond holds class 7"):
        diffusion.prior(1, [0, 1], 5, cond=torch.tensor([[7, -1]]))
    with pytest.raises(ValueError, match=r"count_probs must be a law over 0..N with P\(0\) = 0"):
        diffusion.prior(2, [0.5, 0.5], 5)
    with pytest.raises(ValueError, match="count_probs must have max_elements"):
        LayoutDenoiser(max_elements=3, count_probs=[0.0, 1.0])
    with pytest.raises(ValueError, match="nothing to render"):
        from pgraft.apps.layout.render import render_grid

        render_grid(_layouts([]), "/tmp/never.png")
    with pytest.raises(ValueError, match="noise must be >= 0"):
        diffusion.sde_step(-0.1)


# ----------------------------------------------------------------------------- model, step, loss
def _tiny(gen) -> LayoutDenoiser:
    torch.manual_seed(0)
    return LayoutDenoiser(n_classes=5, max_elements=5, count_probs=[0, 0.2, 0.2, 0.2, 0.2, 0.2], **PRESETS["tiny"])


def _clean_state(n: int = 3) -> dict[str, torch.Tensor]:
    return to_state(synthetic_layouts(n, "train", seed=2, max_elements=5))


def test_model_step_and_loss_shapes_odd_sizes(gen):
    model = _tiny(gen)
    x = diffusion.model_prior(model, 3, generator=gen)
    assert x["boxes"].shape == (3, 5, 4) and x["classes"].shape == (3, 5) and x["mask"].shape == (3, 5)
    assert (x["classes"][x["mask"]] == model.mask_id).all() and (x["boxes"][~x["mask"]] == 0).all()
    out = model(x, torch.full((3,), 0.7), None)
    assert out["velocity"].shape == (3, 5, 4) and out["logits"].shape == (3, 5, 5)
    y = diffusion.step(model, x, 0.7, 0.5, None, gen)
    assert y["boxes"].shape == (3, 5, 4) and torch.equal(y["mask"], x["mask"])
    with torch.no_grad():
        x0 = sample(model, x, diffusion.times(5), diffusion.step, None, gen)
    # every real class is revealed at t = 0, padding untouched
    assert ((x0["classes"] >= 0) & (x0["classes"] < 5))[x0["mask"]].all()
    assert (x0["classes"][~x0["mask"]] == -1).all() and (x0["boxes"][~x0["mask"]] == 0).all()
    for t_start in (0.0, 0.4):
        loss = diffusion.loss(model, _clean_state(3), t_start, None, gen)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()


def test_model_is_permutation_equivariant(gen):
    model = _tiny(gen).eval()
    x = _clean_state(3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    xp = {k: v[:, perm] for k, v in x.items()}
    t = torch.full((3,), 0.3)
    out, outp = model(x, t, None), model(xp, t, None)
    m = x["mask"][:, perm]
    assert torch.allclose(out["velocity"][:, perm][m], outp["velocity"][m], atol=1e-5)
    assert torch.allclose(out["logits"][:, perm][m], outp["logits"][m], atol=1e-5)


def test_class_conditioned_sampling_keeps_classes_fixed(gen):
    model = _tiny(gen)
    cond = torch.tensor([[0, 3, -1, -1, -1], [4, 4, 1, 2, -1], [1, -1, -1, -1, -1]])
    x = diffusion.model_prior(model, 3, cond, gen)
    assert torch.equal(x["classes"], cond) and torch.equal(x["mask"], cond != -1)
    with torch.no_grad():
        x0 = sample(model, x, diffusion.times(4), diffusion.step, cond, gen)
        # the all-slots prior + projection of the fine-tuning problem gives the same law of slots
        full = diffusion.prior(3, [0, 0, 0, 0, 0, 1], 5, None, gen)
        x1 = sample(model, full, diffusion.times(4), diffusion.project_on_cond(diffusion.step), cond, gen)
    for out in (x0, x1):
        assert torch.equal(out["classes"], cond) and torch.equal(out["mask"], cond != -1)
        assert (out["boxes"][cond == -1] == 0).all()


def test_pgraft_loss_gives_no_class_loss_to_tokens_masked_at_t(gen, monkeypatch):
    """With t_start > 0, tokens masked in X_t must never be targets; tokens unmasked at t are
    remasked w.p. (s - t)/(1 - t) and then are."""
    model = _tiny(gen)
    x = _clean_state(3)
    x_t = dict(x)
    masked_at_t = x["mask"] & (torch.arange(5) % 2 == 0)
    x_t["classes"] = torch.where(masked_at_t, model.mask_id, x["classes"])
    seen = {}
    import pgraft.apps.layout.diffusion as dmod

    real_ce = dmod.masked_cross_entropy

    def spy(logits, targets, weight_mask):
        seen["targets"], seen["weights"] = targets.clone(), weight_mask.clone()
        return real_ce(logits, targets, weight_mask)

    monkeypatch.setattr(dmod, "masked_cross_entropy", spy)
    hits = torch.zeros(3, 5, dtype=torch.bool)
    for i in range(20):
        dmod.loss(model, x_t, 0.5, None, torch.Generator().manual_seed(i))
        w = seen["weights"]
        assert not (w & masked_at_t).any(), "a token masked at t received class loss"
        assert (seen["targets"][w] != model.mask_id).all()
        hits |= w
    assert (hits & x["mask"] & ~masked_at_t).any()  # tokens unmasked at t do get loss
    # t_start = 0 on the clean state: every real token can be a target
    dmod.loss(model, x, 0.0, None, torch.Generator().manual_seed(0))
    assert (seen["weights"] <= x["mask"]).all()


def test_sde_step_zero_noise_is_euler_and_log_prob(gen):
    model = _tiny(gen)
    x = diffusion.model_prior(model, 3, generator=gen)
    a = diffusion.step(model, x, 0.6, 0.4, None, torch.Generator().manual_seed(5))
    b = diffusion.sde_step(0.0)(model, x, 0.6, 0.4, None, torch.Generator().manual_seed(5))
    assert torch.allclose(a["boxes"], b["boxes"]) and torch.equal(a["classes"], b["classes"])
    step, log_prob = diffusion.sde_step(0.3), diffusion.sde_log_prob(0.3)
    y = step(model, x, 0.6, 0.4, None, gen)
    lp = log_prob(model, x, 0.6, 0.4, y, None)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    # the box term is a Gaussian density: its log at the mean exceeds that at a far point
    far = {**y, "boxes": y["boxes"] + 1.0 * x["mask"].unsqueeze(-1)}
    assert (log_prob(model, x, 0.6, 0.4, far, None) < lp).all()
    # the last step is deterministic: no noise lands on the sample
    z = step(model, x, 0.2, 0.0, None, gen)
    z2 = diffusion.step(model, x, 0.2, 0.0, None, gen)
    assert torch.allclose(z["boxes"], z2["boxes"])


def test_dedup_key_ignores_element_order():
    x = _clean_state(2)
    perm = torch.tensor([4, 3, 2, 1, 0])
    xp = {k: v[:, perm] for k, v in x.items()}
    assert diffusion.key(x) == diffusion.key(xp)
    assert diffusion.key(x)[0] != diffusion.key(x)[1]


def test_page_state_conversion():
    b = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    assert torch.allclose(page_to_state(b), torch.tensor([[0.0, -0.5, -0.6, -0.8]]))
