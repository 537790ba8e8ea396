"""Flow-app stages: inversion round trip, resumable sharded inversion, noise correction, CLI smoke run."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pgraft.apps.flow.correct import InvertConfig, invert_dataset
from pgraft.apps.flow.model import from_preset
from pgraft.apps.flow.pretrain import FlowPretrainConfig
from pgraft.apps.flow.sample import SamplerSpec, flops_per_image
from pgraft.core.checkpoint import save_json, save_pretrained
from pgraft.core.errors import UsageError
from pgraft.core.inversion import invert, read_shards, shard_path
from pgraft.core.sampling import FLOW_STEPS, sample
from pgraft.core.schedules import flow_times

torch.set_num_threads(1)


def _tiny_base(tmp_path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny FlowUNet saved as a base dir (weights scaled so the field is smooth)."""
    torch.manual_seed(seed)
    model = from_preset("tiny").eval()
    base = tmp_path / "base"
    save_pretrained(model, model.config, base)
    save_json(json.loads(json.dumps(FlowPretrainConfig(preset="tiny").__dict__)), base / "flow.json")
    return base


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_inversion_round_trip_tiny_unet(sampler):
    """Phi(Phi^{-1}(x)) = x: sampling the inverted noise forward returns the image.

    Tolerance 1e-4 (max abs, images in [-1, 1]) with fixed-point tol 1e-6: float32 round-off over
    8 steps stays ~1e-6, so 1e-4 leaves room while catching any wrong time/sign convention (those
    give errors of order the step size, ~1e-1).
    """
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    times = flow_times(8)
    res = invert(model, x0, times, FLOW_STEPS[sampler], max_iter=100, tol=1e-6)
    assert float(res.residual.max()) < 1e-5
    recon = sample(model, res.noise, times, FLOW_STEPS[sampler])
    assert float((recon - x0).abs().max()) < 1e-4
    assert float((res.noise - x0).abs().mean()) > 1e-3  # inversion actually moved the input


def test_invert_dataset_shards_and_resume_after_kill(tmp_path):
    base = _tiny_base(tmp_path)
    images = torch.rand(13, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = InvertConfig(steps=3, limit=11, shard_size=4, batch_size=3, max_iter=40, tol=1e-6)
    out = tmp_path / "invert"

    class Killed(Exception):
        pass

    def kill_after_second(i: int) -> None:
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        invert_dataset(base, out, cfg, show_progress=False, images=images, on_shard=kill_after_second)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["noise_00000.safetensors", "noise_00001.safetensors"]
    first = load_file(str(shard_path(out, 0)))
    mtime = shard_path(out, 0).stat().st_mtime_ns
    written = []
    report = invert_dataset(base, out, cfg, show_progress=False, images=images, on_shard=written.append)
    assert written == [2]  # finished shards were skipped, not recomputed
    assert shard_path(out, 0).stat().st_mtime_ns == mtime
    shards = read_shards(out)
    idx = shards["index"]
    assert len(idx) == 11 and len(set(idx.tolist())) == 11  # nothing lost or duplicated
    assert torch.equal(shards["noise"][:4], first["noise"])
    assert report.n_images == 11 and report.shards == 3
    assert report.max_abs < 1e-4 and report.mean_abs <= report.max_abs
    # a straight (uninterrupted) run gives the same noises
    straight = invert_dataset(base, tmp_path / "straight", cfg, show_progress=False, images=images)
    assert torch.allclose(read_shards(tmp_path / "straight")["noise"], shards["noise"])
    assert straight.n_images == 11
    # changed settings in the same directory are refused
    with pytest.raises(ValueError, match="different settings"):
        invert_dataset(base, out, InvertConfig(steps=5, limit=11, shard_size=4), show_progress=False, images=images)
    # a larger limit extends: full shards are kept, the old partial last shard is redone
    written.clear()
    bigger = replace(cfg, limit=13)
    report = invert_dataset(base, out, bigger, show_progress=False, images=images, on_shard=written.append)
    assert written == [2, 3] and shard_path(out, 0).stat().st_mtime_ns == mtime
    extended = read_shards(out)
    assert report.n_images == 13 and sorted(extended["index"].tolist()) == list(range(13))
    assert torch.equal(extended["index"][:11], idx) and torch.allclose(extended["noise"][:11], shards["noise"])
    with pytest.raises(ValueError, match="would drop"):
        invert_dataset(base, out, cfg, show_progress=False, images=images)


def test_flops_per_image_is_counted_and_additive():
    torch.manual_seed(0)
    base, noise = from_preset("tiny"), from_preset("noise-tiny")
    one = flops_per_image(SamplerSpec(1), base)
    assert one > 0
    assert flops_per_image(SamplerSpec(7), base) == 7 * one
    assert flops_per_image(SamplerSpec(3, "heun"), base) == 6 * one
    noise_one = flops_per_image(SamplerSpec(1, noise_steps=1), base, noise) - one
    assert 0 < noise_one < one  # the correction flow is much smaller than the base
    assert flops_per_image(SamplerSpec(4, noise_steps=3), base, noise) == 4 * one + 3 * noise_one


# ----------------------------------------------------------------------------- CLI smoke run
def _write_idx(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def _fabricated_fashion(root: Path, n_train: int = 96, n_test: int = 64) -> Path:
    """idx files in Fashion-MNIST's format with 8x8 images: two classes (bright square top-left / bottom-right)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n, (img, lab) in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                 ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        labels = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 8, 8))
        for i, y in enumerate(labels):
            x[i, (0 if y == 0 else 4):(4 if y == 0 else 8), (0 if y == 0 else 4):(4 if y == 0 else 8)] += 200
        _write_idx(root / f"{img}.gz", np.clip(x, 0, 255), 0x08)
        _write_idx(root / f"{lab}.gz", labels, 0x08)
    return root


def test_cli_smoke_pretrain_invert_correct_sample_evaluate(tmp_path):
    from typer.testing import CliRunner

    from pgraft.apps.flow.cli import app

    data = _fabricated_fashion(tmp_path / "fashion")
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [*args, "--quiet"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    base, inv, cor = tmp_path / "base", tmp_path / "inv", tmp_path / "cor"
    run("pretrain", "--data", "fashion-mnist", "--path", str(data), "--preset", "tiny", "--steps", "6",
        "--batch-size", "8", "--out", str(base))
    r = run("invert", str(base), "--out", str(inv), "--steps", "3", "--limit", "7", "--shard-size", "3",
            "--batch-size", "3")
    assert "7 noises in 3 shards" in r.output
    run("correct", str(inv), "--out", str(cor), "--preset", "noise-tiny", "--steps", "5", "--batch-size", "4")
    run("sample", str(cor), "-n", "5", "--noise-steps", "2", "--out", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0
    r = run("sample", str(cor), "-n", "3", "--steps", "5", "--out", str(tmp_path / "grid5.png"))
    assert "corrected(heun-5)+euler-5" in r.output  # noise flow, then 5 base steps (not the inverted 3)
    run("sample", str(base), "-n", "4", "--steps", "2")
    assert (base / "samples.png").is_file()
    csv = tmp_path / "eval.csv"
    run("evaluate", str(cor), "--steps", "2,3", "--noise-steps", "1,2", "--n", "12", "--reference-n", "20",
        "--classifier-steps", "20", "--cache", str(tmp_path / "cache"), "--out", str(csv), "--no-inception")
    import pandas as pd

    table = pd.read_csv(csv)
    assert list(table["steps"]) == [2, 3, 3, 3]
    assert list(table["noise_steps"]) == [0, 0, 1, 2]
    assert table["flops_per_image"].is_monotonic_increasing
    assert table[["feature_fid", "precision", "recall"]].notna().all().all()
    assert (table["n_samples"] == 12).all()
    assert list(table["noise_sampler"].fillna("")) == ["", "", "heun", "heun"]  # the default noise sampler
    # Euler spends one noise-flow evaluation per step, Heun two: counted FLOPs show it
    euler_csv = tmp_path / "eval_euler.csv"
    run("evaluate", str(cor), "--steps", "", "--noise-steps", "2", "--noise-sampler", "euler", "--n", "12",
        "--reference-n", "20", "--cache", str(tmp_path / "cache"), "--out", str(euler_csv), "--no-inception",
        "--corrected-steps", "3,5")
    euler = pd.read_csv(euler_csv)
    assert list(euler["config"]) == ["corrected(euler-2)+euler-3", "corrected(euler-2)+euler-5"]
    base3 = table.loc[table["noise_steps"] == 0, "flops_per_image"].iloc[-1]
    heun2 = table.loc[table["noise_steps"] == 2, "flops_per_image"].iloc[0]
    assert heun2 - base3 == 2 * (euler["flops_per_image"].iloc[0] - base3)


def test_cli_errors_name_missing_paths(tmp_path):
    from typer.testing import CliRunner

    from pgraft.apps.flow.cli import app

    runner = CliRunner()
    missing = tmp_path / "nowhere"
    for args in (["invert", str(missing)], ["correct", str(missing)], ["sample", str(missing)],
                 ["evaluate", str(missing)]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        assert "nowhere" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["invert", str(empty)])
    assert result.exit_code != 0 and "empty" in result.output
    for device in ("gpu0", *(() if torch.cuda.is_available() else ("cuda",))):
        result = runner.invoke(app, ["pretrain", "--device", device, "--out", str(tmp_path / "b")])
        assert result.exit_code == 2 and "--device" in result.output and device in result.output
        assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- noise correction on a known toy
class ShiftBase(torch.nn.Module):
    """A 'base flow' with constant velocity v(x, s) = c: every Euler sampler maps z -> z - c exactly.

    With data x ~ N(0, I) the noises its sampler needs are z = x + c ~ N(c, I): the ideal
    noise-correction law is known in closed form.
    """

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c)
        self.image_shape = tuple(c.shape)

    def forward(self, x, t, cond=None):
        return self.c.expand_as(x)


@pytest.mark.slow  # over 5 s here
def test_noise_correction_learns_known_shift(tmp_path):
    """Inverting N(0, I) data through a base that samples z - c gives N(c, I); the trained noise
    flow must move its samples from N(0, I) toward c, and composed sampling back toward the data.

    Tolerance: the per-pixel mean of 512 corrected noises is within 30% (mean abs, relative to |c|)
    of c, against 100% for the uncorrected prior; sampling noise alone is ~1/sqrt(512) ~ 0.04.
    """
    from safetensors.torch import save_file

    from pgraft.apps.flow.correct import NOISE_MODELS, correction_config
    from pgraft.core.inversion import sample_noise_corrected
    from pgraft.core.noise_correction import INVERT_META, train_correction

    c = torch.full((1, 8, 8), 0.8)
    c[:, 4:] = -0.8  # a structured shift: top half +0.8, bottom half -0.8
    base = ShiftBase(c)
    times = flow_times(4)
    data = torch.randn(768, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = invert(base, data, times, FLOW_STEPS["euler"], max_iter=10, tol=1e-6)
    assert torch.allclose(res.noise, data + c, atol=1e-5)  # closed-form inverse of z -> z - c

    inv = tmp_path / "invert"
    save_json({"config": InvertConfig(steps=4, limit=768).__dict__, "base": str(tmp_path / "base"), "n_train": 768},
              inv / INVERT_META)
    shard_path(inv, 0).parent.mkdir(parents=True)
    save_file({"noise": res.noise.contiguous(), "index": torch.arange(768), "residual": res.residual,
               "recon_abs_sum": torch.zeros(768, dtype=torch.float64), "recon_abs_max": torch.zeros(768)},
              str(shard_path(inv, 0)))
    noise_model = train_correction(inv, tmp_path / "correct", correction_config(
        preset="noise-tiny", steps=150, batch_size=64, lr=3e-3, warmup=20, ema=0.99), NOISE_MODELS,
        show_progress=False).noise_model

    z = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    corrected = sample(noise_model, z, flow_times(8), FLOW_STEPS["euler"])
    rel_err = float((corrected.mean(0) - c).abs().mean() / c.abs().mean())
    assert float((z.mean(0) - c).abs().mean() / c.abs().mean()) > 0.9
    assert rel_err < 0.3, rel_err
    assert 0.7 < float(corrected.std(0).mean()) < 1.3  # a shift, not a collapse
    # composed sampler: noise flow -> frozen base brings the sample mean from -c back toward 0 (the data's)
    x = sample_noise_corrected(noise_model, base, z, flow_times(8), times)
    plain = sample(base, z, times, FLOW_STEPS["euler"])
    assert float(x.mean(0).abs().mean()) < 0.3 * float(plain.mean(0).abs().mean())
    # a rerun in the same directory resumes its weights, so it refuses another seed (or batch, preset, ...)
    with pytest.raises(UsageError, match=r"seed 0 -> 1"):
        train_correction(inv, tmp_path / "correct", correction_config(
            preset="noise-tiny", steps=150, batch_size=64, lr=3e-3, warmup=20, ema=0.99, seed=1), NOISE_MODELS,
            show_progress=False)


def test_pretraining_is_reproducible_whatever_the_global_rng_state(tmp_path):
    """The model is initialised from the config's seed, not from whatever the process drew before."""
    from pgraft.apps.flow.pretrain import pretrain_flow

    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = FlowPretrainConfig(preset="tiny", steps=2, batch_size=4, warmup=1, ckpt_every=2)
    weights = []
    for run, draws in (("a", 0), ("b", 7)):
        torch.randn(draws)  # a different global RNG state before each run
        pretrain_flow(cfg, tmp_path / run, show_progress=False, images=images)
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0)


def test_pgraft_flow_correct_is_reproducible_whatever_the_global_rng_state(tmp_path):
    """`pgraft flow correct --seed S` initialises the noise flow from S (`train_correction` seeds it; torch seeds its global generator at
    random per process), so the same command trains the same corrector; another seed another one."""
    from typer.testing import CliRunner

    from pgraft.apps.flow.cli import app
    from pgraft.apps.flow.correct import InvertConfig, invert_dataset
    from pgraft.apps.flow.pretrain import pretrain_flow

    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pretrain_flow(FlowPretrainConfig(preset="tiny", steps=2, batch_size=4, warmup=1, ckpt_every=2), tmp_path / "base",
                  show_progress=False, images=images)
    invert_dataset(tmp_path / "base", tmp_path / "inv", InvertConfig(steps=2, limit=8, shard_size=8, batch_size=8),
                   show_progress=False, images=images)
    weights = {}
    for run, seed, draws in (("a", "0", 0), ("b", "0", 7), ("c", "1", 0)):
        torch.randn(draws)  # a different global RNG state before each run
        result = CliRunner().invoke(app, ["correct", str(tmp_path / "inv"), "--out", str(tmp_path / run), "--preset",
                                          "noise-tiny", "--steps", "2", "--batch-size", "4", "--seed", seed, "--quiet"])
        assert result.exit_code == 0, result.output
        weights[run] = load_file(str(tmp_path / run / "model.safetensors"))
    for k in weights["a"]:
        torch.testing.assert_close(weights["a"][k], weights["b"][k], rtol=0, atol=0)
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
