"""Evaluation of the image-flow experiment: the :class:`Evaluator` (feature networks and cached
reference statistics of one base's data), its settings :class:`EvalConfig`, and :func:`evaluate`, one
metrics row per sampler configuration (FLOPs/image counted, not estimated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgraft.core.checkpoint import save_json
from pgraft.core.state import module_device, read_json

from .model import PRESETS, FlowUNet
from .pretrain import FlowPretrainConfig, load_training_images
from .sample import SamplerSpec, flops_per_image, sample_images


@dataclass(frozen=True)
class EvalConfig:
    """Metrics settings. ``n`` samples per configuration for the classifier-feature metrics;
    ``inception_n`` (<= n) of them for Inception FID/KID, against ``inception_reference_n`` reference
    images (None: as many as ``inception_n``; 10,000 = the whole Fashion-MNIST test split).

    ``bootstrap`` > 0: Inception FID/KID come from
    :func:`~pgraft.apps.flow.metrics.fid_kid_bootstrap` (FID by a symmetric eigendecomposition,
    KID over all samples) with ``ci_level`` intervals from that many resamples of the samples;
    0: :func:`~pgraft.apps.flow.metrics.fid_kid` (scipy's sqrtm, KID averaged over subsets).
    ``inception_batch_size``: images per Inception call (50 suits a CPU; a GPU takes hundreds)."""

    n: int = 1000
    reference_n: int = 5000
    inception: bool = False
    inception_n: int = 300
    inception_weights: str | None = None
    classifier_steps: int = 2000
    seed: int = 0
    cache_dir: str | None = None
    inception_reference_n: int | None = None
    inception_batch_size: int = 50
    bootstrap: int = 0
    ci_level: float = 0.95


@dataclass
class Evaluator:
    """Feature networks + cached reference statistics of one base's data, reused across rows."""

    cfg: EvalConfig
    base_cfg: FlowPretrainConfig
    cache_dir: Path
    classifier: Any = None
    classifier_reference: Any = None
    inception: Any = None
    inception_reference: Any = None
    classifier_report: dict[str, Any] = field(default_factory=dict)
    inception_reference_key: str = ""
    _prepared: Any = None

    @classmethod
    def build(cls, cfg: EvalConfig, base_cfg: FlowPretrainConfig, cache_dir: str | Path,
              reference_images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
              show_progress: bool = True, train_images: torch.Tensor | None = None,
              train_labels: torch.Tensor | None = None, device: torch.device | str = "cpu") -> Evaluator:
        """Train (or load) the feature classifier and compute (or load) the reference statistics.

        The feature networks run on ``device`` (the classifier is trained on the CPU, a fixed step
        budget, so every device scores in the same feature space).

        The reference set is the held-out test split when the dataset has one (else training images).
        ``reference_images``/``labels`` (and the classifier's ``train_images``/``train_labels``, by
        default the reference set itself) override the data (tests, --quick).
        """
        from .metrics import (
            InceptionFeatures,
            cached_reference_stats,
            extract_features,
            load_classifier,
            reference_key,
            save_classifier,
            train_classifier,
        )

        cache_dir = Path(cache_dir)
        ev = cls(cfg=cfg, base_cfg=base_cfg, cache_dir=cache_dir)
        size = PRESETS[base_cfg.preset]["image_size"]
        dataset = f"{base_cfg.data}-{Path(base_cfg.path).name if base_cfg.path else 'default'}-{size}px"
        inception_reference_n = cfg.inception_reference_n or cfg.inception_n
        if reference_images is None:
            loaded_n = max(cfg.reference_n, inception_reference_n if cfg.inception else 0)
            all_reference, all_labels, train_x, train_y = _reference_data(base_cfg, loaded_n)
            # the classifier's statistics keep their first reference_n images (and cache key)
            reference_images = all_reference[: cfg.reference_n]
            labels = None if all_labels is None else all_labels[: cfg.reference_n]
        else:
            all_reference = reference_images
            train_x = train_images if train_images is not None else reference_images
            train_y = train_labels if train_images is not None else labels
        clf_dir = cache_dir / f"classifier-{dataset}"
        if (clf_dir / "model.safetensors").is_file():
            ev.classifier = load_classifier(clf_dir)
        else:
            if train_y is None:
                raise ValueError(f"the feature classifier needs labels; dataset {base_cfg.data!r} has none here")
            ev.classifier, report = train_classifier(train_x, train_y, reference_images, labels,
                                                     steps=cfg.classifier_steps, seed=cfg.seed)
            save_classifier(ev.classifier, clf_dir)
            save_json(asdict(report), clf_dir / "report.json")
        if (clf_dir / "report.json").is_file():
            ev.classifier_report = read_json(clf_dir / "report.json", fix=f"delete {clf_dir} to retrain the classifier")
        ev.classifier = ev.classifier.to(device)
        ref = reference_images
        ev.classifier_reference = cached_reference_stats(
            cache_dir, reference_key(dataset, len(ref), ev.classifier.name),
            lambda: extract_features(ev.classifier.features, ref, 256, device=device))
        if cfg.inception:
            ev.inception = InceptionFeatures(cfg.inception_weights).to(device)
            ref_i = all_reference[:inception_reference_n]
            ev.inception_reference_key = reference_key(dataset, len(ref_i), ev.inception.name)
            ev.inception_reference = cached_reference_stats(
                cache_dir, ev.inception_reference_key,
                lambda: extract_features(ev.inception, ref_i, cfg.inception_batch_size, show_progress,
                                         "inception reference", device))
        return ev

    def row(self, samples: torch.Tensor, with_inception: bool = True, show_progress: bool = False,
            inception_features: torch.Tensor | None = None) -> dict[str, Any]:
        """Metrics of samples [M, C, H, W]; Inception on the first ``inception_n`` when enabled
        (``inception_features``: their pool3 features, already computed, e.g. by :meth:`inception_features`)."""
        from .metrics import evaluate_samples

        row = evaluate_samples(samples, self.classifier, self.classifier_reference, seed=self.cfg.seed,
                               progress=show_progress)
        row["n_inception"] = 0
        if with_inception and self.inception is not None:
            row.update(self.inception_metrics(samples, show_progress, inception_features))
        return row

    def inception_features(self, samples: torch.Tensor, show_progress: bool = False) -> torch.Tensor:
        """Inception pool3 features [min(M, inception_n), 2048] of the first ``inception_n`` samples."""
        from .metrics import extract_features

        if self.inception is None:
            raise ValueError("Inception metrics were not enabled (EvalConfig.inception=False)")
        return extract_features(self.inception, samples[: self.cfg.inception_n], self.cfg.inception_batch_size,
                                show_progress, "inception features", module_device(self.inception))

    def inception_metrics(self, samples: torch.Tensor, show_progress: bool = False,
                          features: torch.Tensor | None = None) -> dict[str, Any]:
        """Inception FID/KID of the first ``inception_n`` samples against the reference images.
        ``features``: their Inception features if already computed (the first ``inception_n`` rows are used)."""
        from .metrics import fid_kid

        if features is None:
            feats = self.inception_features(samples, show_progress)
        else:
            want = min(len(samples), self.cfg.inception_n)
            if len(features) < want:
                raise ValueError(f"{len(features)} Inception feature rows given for {want} samples")
            feats = features[:want]
        ref = self.inception_reference
        counts = {"n_reference_inception": ref.count, "n_inception": int(len(feats))}
        if self.cfg.bootstrap > 0:
            from .metrics import fid_kid_bootstrap

            return {**fid_kid_bootstrap(feats, self.prepared_inception_reference(), self.cfg.bootstrap,
                                        torch.Generator().manual_seed(self.cfg.seed), self.cfg.ci_level), **counts}
        return {**fid_kid(feats, ref, generator=torch.Generator().manual_seed(self.cfg.seed)), **counts}

    def prepared_inception_reference(self):
        """The Inception reference readied for :func:`~pgraft.apps.flow.metrics.fid_kid_bootstrap` on the
        Inception network's device (once per evaluator); its KID kernel mean is cached next to the
        reference features (``<key>.kid.json``)."""
        from .metrics import prepare_reference

        if self._prepared is None:
            path = self.cache_dir / f"{self.inception_reference_key}.kid.json"
            kyy = read_json(path, keys=("kyy",))["kyy"] if path.is_file() else None
            self._prepared = prepare_reference(self.inception_reference, module_device(self.inception), kyy)
            if kyy is None:
                save_json({"kyy": self._prepared.kyy, "count": self._prepared.count}, path)
        return self._prepared


def _reference_data(base_cfg: FlowPretrainConfig, reference_n: int):
    """(reference images, their labels, classifier training images, labels) for the base's dataset."""
    from .data import load_fashion_mnist

    size = PRESETS[base_cfg.preset]["image_size"]
    if base_cfg.data == "fashion-mnist":
        pad = size if size != 28 else None
        test_x, test_y = load_fashion_mnist("test", base_cfg.path, reference_n, pad)
        train_x, train_y = load_fashion_mnist("train", base_cfg.path, base_cfg.limit, pad)
        return test_x, test_y, train_x, train_y
    if base_cfg.data == "cifar10":
        from .data import load_cifar10

        test_x, test_y = load_cifar10(base_cfg.path, "test", reference_n)
        train_x, train_y = load_cifar10(base_cfg.path, "train", base_cfg.limit)
        return test_x, test_y, train_x, train_y
    # folders have no labels: the classifier cannot be trained here
    images = load_training_images(base_cfg, limit=reference_n)
    return images, None, images, None


def evaluate(specs: list[SamplerSpec], base: FlowUNet, evaluator: Evaluator, noise_model: FlowUNet | None = None,
             inception_for: Callable[[SamplerSpec], bool] = lambda spec: True, seed: int = 0,
             show_progress: bool = True, keep_samples: dict[str, torch.Tensor] | None = None,
             batch_size: int = 250) -> list[dict[str, Any]]:
    """One row per sampler configuration: sampler, steps, noise steps, FLOPs/image, feature-FID/KID,
    precision, recall and (where ``inception_for(spec)`` and Inception is on) FID/KID with its sample count.

    Every configuration starts from the same z seed, so rows differ only by the sampler.
    ``keep_samples``, if given, receives each configuration's samples under its label. ``batch_size``:
    images sampled at once (z is drawn batch by batch: keep it fixed between runs that must match).
    """
    rows = []
    for spec in specs:
        x = sample_images(spec, base, evaluator.cfg.n, noise_model, seed, batch_size=batch_size,
                          show_progress=show_progress)
        flops = flops_per_image(spec, base, noise_model)
        if keep_samples is not None:
            keep_samples[spec.label] = x
        metrics = evaluator.row(x, inception_for(spec), show_progress=False)
        rows.append({"config": spec.label, "sampler": spec.sampler, "steps": spec.steps,
                     "noise_sampler": spec.noise_sampler if spec.corrected else "", "noise_steps": spec.noise_steps,
                     "flops_per_image": flops, **metrics})
    return rows
