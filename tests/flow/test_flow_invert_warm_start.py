"""The fixed-point warm start of ODE inversion: "extrapolate" (previous step's update) reaches the same
noises as "previous" (the old behaviour, still the default of core.inversion.invert) in fewer model calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgraft.apps.flow.correct import InvertConfig, invert_dataset
from pgraft.apps.flow.model import from_preset
from pgraft.apps.flow.pretrain import FlowPretrainConfig
from pgraft.core.checkpoint import save_json, save_pretrained
from pgraft.core.inversion import invert, read_shards
from pgraft.core.sampling import FLOW_STEPS, sample
from pgraft.core.schedules import flow_times

torch.set_num_threads(1)


class SmoothVelocity(torch.nn.Module):
    """v(x, s) = tanh(W [x, s]) on 8x8 images: smooth in x and s, like a trained flow's field (a
    randomly initialised UNet's field is not smooth in s: its time embedding has frequencies up to 1000)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(65, 64)

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return torch.tanh(self.lin(torch.cat([x.flatten(1), t[:, None]], 1))).view_as(x)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("field", ["unet", "smooth"])
def test_extrapolated_warm_start_reaches_the_same_noise(sampler, field):
    """Tolerance: with fixed-point tol 1e-7 each step's solution is pinned to ~1e-7, and 30 steps
    amplify that to well below 1e-4 (max abs). On the smooth field the extrapolated guess must also
    save iterations (a wrong sign or scale would still converge, but cost more)."""
    torch.manual_seed(0)
    model = from_preset("tiny").eval() if field == "unet" else SmoothVelocity()
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    times, step = flow_times(30 if field == "smooth" else 12), FLOW_STEPS[sampler]
    old = invert(model, x0, times, step, max_iter=100, tol=1e-7)
    assert old.noise.equal(invert(model, x0, times, step, max_iter=100, tol=1e-7, warm_start="previous").noise)
    new = invert(model, x0, times, step, max_iter=100, tol=1e-7, warm_start="extrapolate")
    assert float((new.noise - old.noise).abs().max()) < 1e-4
    assert float(new.residual.max()) < 1e-6
    assert float((sample(model, new.noise, times, step) - x0).abs().max()) < 1e-4
    assert new.iterations[-1] == old.iterations[-1]  # the first inverted step (last on the grid) has no previous update
    if field == "smooth":
        assert sum(new.iterations) < 0.9 * sum(old.iterations), (sum(new.iterations), sum(old.iterations))
    with pytest.raises(ValueError, match="warm_start"):
        invert(model, x0, times, step, warm_start="linear")


def test_directories_keep_their_warm_start(tmp_path: Path):
    """New inversions default to "extrapolate"; a directory written before the option existed (no
    warm_start in invert.json) resumes with "previous"; an explicit other one is refused."""
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    base = tmp_path / "base"
    save_pretrained(model, model.config, base)
    save_json(json.loads(json.dumps(FlowPretrainConfig(preset="tiny").__dict__)), base / "flow.json")
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = InvertConfig(steps=4, limit=4, shard_size=2, batch_size=2, max_iter=60, tol=1e-7)
    new, old = tmp_path / "new", tmp_path / "old"
    invert_dataset(base, new, cfg, show_progress=False, images=images)
    assert json.loads((new / "invert.json").read_text())["config"]["warm_start"] == "extrapolate"
    invert_dataset(base, old, InvertConfig(**{**cfg.__dict__, "warm_start": "previous"}), show_progress=False,
                   images=images)
    torch.testing.assert_close(read_shards(new)["noise"], read_shards(old)["noise"], rtol=0, atol=1e-5)
    meta = json.loads((old / "invert.json").read_text())
    del meta["config"]["warm_start"]  # as written before the option existed
    (old / "invert.json").write_text(json.dumps(meta))
    invert_dataset(base, old, InvertConfig(**{**cfg.__dict__, "limit": 6}), show_progress=False, images=images)
    assert json.loads((old / "invert.json").read_text())["config"]["warm_start"] == "previous"
    with pytest.raises(ValueError, match="different settings"):
        invert_dataset(base, old, InvertConfig(**{**cfg.__dict__, "limit": 6, "warm_start": "extrapolate"}),
                       show_progress=False, images=images)
