"""FlowUNet: shapes at odd batch sizes, time dependence, JSON config round trip, presets."""

from __future__ import annotations

import json

import pytest
import torch

from pgraft.apps.flow.model import PRESETS, FlowUNet, from_preset
from pgraft.core.checkpoint import load_pretrained, save_pretrained


@pytest.mark.parametrize("preset", ["tiny", "noise-tiny"])
def test_tiny_forward_shape_odd_batch(preset):
    torch.manual_seed(0)
    model = from_preset(preset).eval()
    x = torch.randn(3, *model.image_shape)
    with torch.no_grad():
        v = model(x, torch.tensor([0.0, 0.5, 1.0]))
        v_scalar = model(x, 0.5)
        v_vec = model(x, torch.full((3,), 0.5))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.allclose(v_scalar, v_vec)
    # the velocity must depend on time, otherwise the time embedding is not wired
    assert not torch.allclose(v[1], model(x[1:2], torch.tensor([0.9]))[0])


def test_config_is_json_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    json.dumps(model.config)  # plain JSON kwargs
    save_pretrained(model, model.config, tmp_path / "ckpt")
    loaded = load_pretrained(FlowUNet, tmp_path / "ckpt").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))


def test_class_conditional_and_cond_checks():
    model = from_preset("tiny", num_classes=4).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = model(x, torch.rand(3), torch.tensor([0, 1, 2]))
    assert a.shape == x.shape
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        from_preset("tiny")(x, torch.rand(3), torch.tensor([0, 1, 2]))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        FlowUNet(image_size=28, block_channels=[16, 32, 64, 64], attention=[False] * 4)
    with pytest.raises(ValueError, match="norm_groups"):
        FlowUNet(image_size=8, block_channels=[12, 16], attention=[False, False], norm_groups=8)
    with pytest.raises(ValueError, match="attention_head_dim"):
        FlowUNet(image_size=8, block_channels=[16, 48], attention=[False, True], attention_head_dim=32)
    with pytest.raises(ValueError, match="unknown model preset"):
        from_preset("huge")


def test_noise_presets_are_much_smaller_than_their_base():
    for base, noise in (("default", "noise-small"), ("tiny", "noise-tiny")):
        n_base, n_noise = from_preset(base).num_parameters(), from_preset(noise).num_parameters()
        assert n_noise < 0.5 * n_base, (base, n_base, noise, n_noise)
        assert PRESETS[base]["image_size"] == PRESETS[noise]["image_size"]
        assert PRESETS[base]["channels"] == PRESETS[noise]["channels"]
