"""The flow base shipped with the package: it is the default `pgraft flow pretrain`, its samples
look like Fashion-MNIST by the recorded statistics, and `pgraft flow invert shipped` inverts
through it (recording the resolved directory and the weights' digest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgraft.apps.flow.correct import InvertConfig, invert_dataset
from pgraft.apps.flow.pretrain import APP, FlowPretrainConfig, load_base
from pgraft.apps.flow.sample import SamplerSpec, sample_images
from pgraft.core.shipped import SHIPPED, read_record, weights_sha256

pytestmark = pytest.mark.skipif(not APP.ships, reason="this checkout ships no flow base")

torch.set_num_threads(1)


def ink_stats(images: torch.Tensor) -> tuple[float, float]:
    """(mean pixel value, fraction of pixels brighter than the black background) of [-1, 1] images."""
    return float(images.mean()), float((images > -0.5).double().mean())


def test_the_shipped_flow_base_samples_garments_not_noise():
    """128 Euler-10 samples: their mean pixel and ink fraction are within 0.05 of Fashion-MNIST's
    (recorded in SHIPPED.json from 1,000 test images; ~0.5 of the pixels are background), while
    N(0, I) noise clamped to [-1, 1] has ink fraction ~0.69 and mean ~0."""
    model, cfg = load_base(APP.shipped)
    assert cfg == FlowPretrainConfig()
    reference = read_record(APP.shipped)["eval"]["fashion_mnist_test"]
    mean, ink = ink_stats(sample_images(SamplerSpec(10), model, 128, seed=5, show_progress=False))
    assert mean == pytest.approx(reference["mean_pixel"], abs=0.05)
    assert ink == pytest.approx(reference["ink_fraction"], abs=0.05)


def test_invert_shipped_inverts_through_the_shipped_base(tmp_path):
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = InvertConfig(steps=2, limit=3, shard_size=3, batch_size=3)
    report = invert_dataset(SHIPPED, tmp_path / "inv", cfg, show_progress=False, images=images)
    assert report.n_images == 3
    meta = json.loads((tmp_path / "inv" / "invert.json").read_text())
    assert Path(meta["base"]) == APP.shipped.resolve()
    assert meta["base_weights"] == weights_sha256(APP.shipped)[:16]
