"""FID/KID with bootstrap intervals (apps/flow/metrics.fid_kid_bootstrap) and the Evaluator settings
the protocol benchmark uses (a larger Inception reference set, bootstrap intervals)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgraft.apps.flow import metrics
from pgraft.apps.flow.evaluate import EvalConfig, Evaluator
from pgraft.apps.flow.metrics import (
    FeatureStats,
    fid_kid_bootstrap,
    frechet_distance,
    gaussian_statistics,
    kernel_pair_mean,
    prepare_reference,
)
from pgraft.apps.flow.pretrain import FlowPretrainConfig

torch.set_num_threads(1)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) + shift


def _direct_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


@pytest.mark.parametrize("n", [300, 12])  # more samples than feature dims (D form), fewer (Gram form)
def test_point_estimates_match_the_reference_formulas(n):
    """FID agrees with frechet_distance (scipy's sqrtm) to 1e-6 relative, KID with the unbiased
    all-pairs MMD^2 computed directly to 1e-9: both are float64 round-off only."""
    ref = FeatureStats.from_features(_features(400, 16, 0))
    x = _features(n, 16, 1, shift=0.2)
    out = fid_kid_bootstrap(x, prepare_reference(ref))
    mu, sigma = gaussian_statistics(x)
    assert out["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-6)
    assert out["kid"] == pytest.approx(_direct_kid(x, ref.features), rel=1e-9, abs=1e-12)
    assert kernel_pair_mean(ref.features, chunk=7) == pytest.approx(kernel_pair_mean(ref.features), rel=1e-12)
    assert set(out) == {"fid", "kid"}  # no resamples, no interval


def test_bootstrap_interval_covers_the_spread_of_independent_draws():
    """The interval is reproducible from its generator, contains the estimate, and its width is of the
    order of the spread of FID over independent sample sets (within a factor 3: 40 resamples)."""
    ref = FeatureStats.from_features(_features(2000, 8, 0))
    prepared = prepare_reference(ref)
    x = _features(200, 8, 1, shift=0.3)
    a = fid_kid_bootstrap(x, prepared, 40, torch.Generator().manual_seed(0))
    b = fid_kid_bootstrap(x, prepared, 40, torch.Generator().manual_seed(0))
    assert a == b
    for m in ("fid", "kid"):
        assert a[f"{m}_ci_low"] < a[m] < a[f"{m}_ci_high"]
    assert a["n_boot"] == 40 and a["ci_level"] == 0.95
    independent = [fid_kid_bootstrap(_features(200, 8, s, shift=0.3)[:, :], prepared)["fid"] for s in range(2, 22)]
    spread = float(np.std(independent, ddof=1))
    assert spread / 3 < a["fid_boot_std"] < 3 * spread


class _FakeInception(torch.nn.Module):
    """Stands in for Inception-v3 (0.35 s/image on a CPU): mean-pooled pixels times a fixed map."""

    name = "fake-inception"

    def __init__(self, weights=None) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


def test_evaluator_uses_a_larger_inception_reference_and_bootstraps(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "InceptionFeatures", _FakeInception)
    g = torch.Generator().manual_seed(0)
    ref_x, ref_y = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 2, (40,), generator=g)
    cfg = EvalConfig(n=16, reference_n=40, inception=True, inception_n=16, inception_reference_n=30,
                     classifier_steps=5, bootstrap=10)
    ev = Evaluator.build(cfg, FlowPretrainConfig(preset="tiny"), tmp_path / "cache", ref_x, ref_y, show_progress=False)
    assert ev.inception_reference.count == 30  # not inception_n
    row = ev.row(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1)
    assert row["n_inception"] == 16 and row["n_reference_inception"] == 30
    assert row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"] and row["n_boot"] == 10
    cached = json.loads((tmp_path / "cache" / f"{ev.inception_reference_key}.kid.json").read_text())
    assert cached["count"] == 30 and cached["kyy"] == pytest.approx(kernel_pair_mean(ev.inception_reference.features))
    # a second evaluator reads the cached kernel mean instead of recomputing it
    again = Evaluator.build(cfg, FlowPretrainConfig(preset="tiny"), tmp_path / "cache", ref_x, ref_y, show_progress=False)
    assert again.prepared_inception_reference().kyy == cached["kyy"]
