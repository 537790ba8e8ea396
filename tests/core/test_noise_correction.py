"""The noise-correction workflow (core.noise_correction) driven through a tiny adapter whose every stage
has a closed form.

The base flow has the constant velocity c, so its Euler sampler (any grid from s = 1 to s = 0) maps a
noise n to n - c and inverts x to x + c exactly. A noise flow whose velocity is a learned constant b
(``BiasFlow``) is fitted by flow matching, whose loss E|b - (z - y)|^2 is minimised by b = E[z - y]
= -E[y] whatever the coupling of z ~ N(0, I) with the inverted noises y: here b* = -(mean of the data)
- c. Corrected sampling is then z -> z - b -> z - b - c, again exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pgraft.core.checkpoint import save_json
from pgraft.core.errors import UsageError
from pgraft.core.inversion import read_shards, shard_path
from pgraft.core.noise_correction import (
    CORRECT_META,
    INVERT_META,
    CorrectionConfig,
    FlowBase,
    NoiseModels,
    claim,
    correct_noise,
    invert_batch,
    invert_shards,
    load_correction,
    load_inversion,
    resume_conflicts,
    sample_corrected,
    train_correction,
)
from pgraft.core.pretrain import trained_steps
from pgraft.core.sampling import euler_step
from pgraft.core.schedules import flow_times

torch.set_num_threads(1)
SHAPE = (1, 4, 4)
C = torch.linspace(-0.8, 0.8, 16).view(SHAPE)


class ConstantField(nn.Module):
    """v(x, t) = c: Euler from s = 1 to s = 0 maps n to n - c."""

    def forward(self, x, t, cond=None):
        return C.to(x).expand_as(x)


class BiasFlow(nn.Module):
    """A noise flow with a learned constant velocity b (one value per element)."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = list(shape)
        self.bias = nn.Parameter(torch.zeros(self.shape))

    @property
    def config(self) -> dict:
        return {"shape": self.shape}

    def forward(self, x, t, cond=None):
        return self.bias.expand_as(x)


def _build(preset: str, noise_shape: tuple[int, ...]) -> BiasFlow:
    if preset == "bias" and tuple(noise_shape) != SHAPE:
        raise UsageError(f"preset {preset!r} works on {SHAPE}, the noises are {tuple(noise_shape)}")
    return BiasFlow(list(noise_shape))


MODELS = NoiseModels(app="tiny", model_class=BiasFlow, build=_build, presets=("bias", "any"),
                     defaults={"preset": "bias", "steps": 80, "batch_size": 32, "lr": 2e-2, "warmup": 0, "ema": 0.9},
                     describe=lambda inv, noises, model: {"base": inv["base"]})


def _base(steps: int = 3) -> FlowBase:
    return FlowBase(ConstantField(), flow_times(steps), SHAPE, euler_step, {"base": "constant-c"})


def _data(n: int = 40) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))


def _invert(out: Path, data: torch.Tensor, steps: int = 3, shard_size: int = 16, on_shard=None):
    """A minimal app inversion: invert.json settled under the lock (another step count is refused), then
    the shards of ``data`` in order."""
    base = _base(steps)
    meta = {"config": {"steps": steps, "shard_size": shard_size}, **base.identity}

    def settle(saved):
        if saved is not None and saved != meta:
            raise UsageError(f"{out} holds an inversion with other settings")
        return meta

    with claim(out, INVERT_META, settle):
        shards = {i: torch.arange(s, min(len(data), s + shard_size)) for i, s in enumerate(range(0, len(data), shard_size))}
        return invert_shards(out, shards, lambda rows: invert_batch(base, data[rows], max_iter=20, tol=1e-7)[0], 5,
                             show_progress=False, on_shard=on_shard)


def test_inversion_shards_hold_the_closed_form_noises_and_resume_after_a_kill(tmp_path):
    data = _data()
    whole = _invert(tmp_path / "whole", data)
    assert (whole.computed, whole.items, whole.skipped) == ([0, 1, 2], 40, 0)
    s = read_shards(tmp_path / "whole")
    assert torch.equal(s["index"], torch.arange(40))
    torch.testing.assert_close(s["noise"], data + C, atol=1e-6, rtol=0)  # Phi^{-1}(x) = x + c
    assert float(s["recon_abs_max"].max()) < 1e-6 and float(s["residual"].max()) < 1e-6
    assert s["recon_abs_sum"].dtype == torch.float64

    class Killed(Exception):
        pass

    def kill(i):
        if i == 0:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        _invert(out, data, on_shard=kill)
    stamp = os.stat(shard_path(out, 0)).st_mtime_ns
    again = _invert(out, data)
    assert (again.computed, again.skipped) == ([1, 2], 16) and os.stat(shard_path(out, 0)).st_mtime_ns == stamp
    assert _invert(out, data).computed == []
    resumed = read_shards(out)
    assert all(torch.equal(resumed[k], s[k]) for k in s)
    # the settings are compared under the lock before anything is written: a refused run changes nothing
    before = (out / INVERT_META).read_text()
    with pytest.raises(UsageError, match="other settings"):
        _invert(out, data, steps=4)
    assert (out / INVERT_META).read_text() == before
    assert load_inversion(out, "tiny")["config"]["steps"] == 3


def test_invert_correct_sample_round_trip_and_resume(tmp_path):
    data = _data(64)
    inv, cor = tmp_path / "invert", tmp_path / "correct"
    _invert(inv, data)
    cfg = MODELS.config()
    correction = train_correction(inv, cor, cfg, MODELS, show_progress=False)
    meta = json.loads((cor / CORRECT_META).read_text())
    assert meta == correction.meta and correction.base_steps == 3
    assert (meta["n_noises"], meta["base"], meta["invert"]) == (64, "constant-c", str(inv.resolve()))
    # the flow-matching optimum of a constant velocity is b* = E[z - y] = -(data mean) - c, whatever the coupling
    b = correction.noise_model.bias.detach()
    torch.testing.assert_close(b, -(data.mean(0) + C), atol=0.15, rtol=0)
    assert float((b + C).abs().mean()) < 0.5 * float(C.abs().mean())  # it learned the shift, not just noise
    # corrected sampling z -> z - b (any step count) -> base: z - b - c; no noise flow: z - c
    z = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample_corrected(correction.noise_model, _base(), z, 2), z - b - C, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample_corrected(None, _base(), z, 2), z - C, atol=1e-6, rtol=0)
    assert torch.equal(correct_noise(correction.noise_model, z, 0), z)
    # loading gives back the same noise flow and metadata
    loaded = load_correction(cor, MODELS)
    assert torch.equal(loaded.noise_model.bias, correction.noise_model.bias) and loaded.meta == meta
    # a rerun resumes the weights: more steps and another lr may follow ...
    more = train_correction(inv, cor, MODELS.config(steps=90, lr=1e-2), MODELS, show_progress=False)
    assert trained_steps(cor) == 90 and more.meta["config"]["steps"] == 90
    # ... another seed (or preset, or inversion) may not, and correct.json stays as it was
    before = (cor / CORRECT_META).read_text()
    with pytest.raises(UsageError, match=r"other settings or noises \(seed 0 -> 1\)"):
        train_correction(inv, cor, MODELS.config(steps=90, seed=1), MODELS, show_progress=False)
    with pytest.raises(UsageError, match=r"preset 'bias' -> 'any'"):
        train_correction(inv, cor, MODELS.config(steps=90, preset="any"), MODELS, show_progress=False)
    assert (cor / CORRECT_META).read_text() == before


def test_refusals_are_one_line_usage_errors_naming_the_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"empty is not a `pgraft tiny invert` directory \(no invert.json\)"):
        load_inversion(empty, "tiny")
    with pytest.raises(UsageError, match=r"no inverted-noise shards in .*empty/shards; run `pgraft tiny invert`"):
        read_shards(empty, command="pgraft tiny invert")
    with pytest.raises(UsageError, match=r"empty holds no trained noise corrector .* `pgraft tiny correct` first"):
        load_correction(empty, MODELS)
    with pytest.raises(UsageError, match=r"unknown tiny noise-model preset 'huge'; choose one of bias, any"):
        MODELS.config(preset="huge")
    with pytest.raises(UsageError, match="'stepz'"):
        MODELS.config(stepz=3)
    with pytest.raises(UsageError, match="not a `pgraft tiny invert`"):
        train_correction(empty, tmp_path / "c", MODELS.config(), MODELS, show_progress=False)
    assert not (tmp_path / "c").exists()  # refused before anything was written
    # noises of another shape than the preset's: the app's build refuses, before the lock is taken
    inv = tmp_path / "inv"
    save_json({"config": {"steps": 3}, "base": "elsewhere"}, inv / INVERT_META)
    shard_path(inv, 0).parent.mkdir()
    save_file({"noise": torch.zeros(4, 1, 2, 2), "index": torch.arange(4)}, str(shard_path(inv, 0)))
    with pytest.raises(UsageError, match=r"works on \(1, 4, 4\), the noises are \(1, 2, 2\)"):
        train_correction(inv, tmp_path / "c", MODELS.config(), MODELS, show_progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(UsageError, match="'sinkhorn'"):
        CorrectionConfig(coupling="sinkhorn")
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"ema": 1.0}, {"warmup": -1}):
        with pytest.raises(UsageError, match="noise flow needs"):
            MODELS.config(**bad)


@pytest.mark.slow  # importing the t2i app (diffusers) takes ~15 s
def test_correction_config_and_the_apps_defaults():
    from pgraft.apps.flow.correct import correction_config as flow_config
    from pgraft.apps.t2i.flow_inc import correction_config as t2i_config

    short = CorrectionConfig(steps=20, warmup=100, lr=3e-3).pretrain_config()
    assert (short.steps, short.warmup, short.lr, short.log_every, short.ckpt_every) == (20, 20, 3e-3, 20, 20)
    flow, t2i = flow_config(), t2i_config()
    assert (flow.preset, flow.steps, flow.batch_size, flow.lr) == ("noise-small", 6000, 64, 1e-3)
    assert (t2i.preset, t2i.steps, t2i.batch_size, t2i.lr) == ("small", 2000, 16, 5e-4)
    with pytest.raises(UsageError, match="'noise-huge'"):
        flow_config(preset="noise-huge")
    with pytest.raises(UsageError, match="'noise-small'"):
        t2i_config(preset="noise-small")  # a flow-app preset is not a t2i corrector preset


def test_resume_conflicts_allow_only_steps_and_lr_to_change():
    saved = {"config": asdict(CorrectionConfig(preset="p", seed=0)), "n_noises": 2000, "shape": (1, 28, 28)}
    assert resume_conflicts(saved, {**saved, "config": asdict(CorrectionConfig(preset="p", steps=9000, lr=2e-3))}) == []
    assert resume_conflicts(json.loads(json.dumps(saved)), saved) == []  # as read back from correct.json
    assert resume_conflicts(saved, {**saved, "config": asdict(CorrectionConfig(preset="p", seed=1))}) == ["seed 0 -> 1"]
    assert resume_conflicts(saved, {**saved, "n_noises": 6000}) == ["n_noises 2000 -> 6000"]
    # a top-level entry and a config entry of the same name are told apart
    assert resume_conflicts({**saved, "seed": 0}, {**saved, "seed": 0, "config": {**saved["config"], "seed": 3}}) \
        == ["seed 0 -> 3"]
