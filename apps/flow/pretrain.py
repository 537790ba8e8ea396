"""Base-flow pretraining of the unconditional image-flow experiment, and what identifies a base.

    pretrain_flow     data -> base velocity model v(x, s) (flow matching, t_start = 0)
    load_base         a base directory (or the shipped one) -> (EMA model, its pretraining config)

A base directory holds config.json, model.safetensors (EMA), train_state.pt, loss.csv and flow.json
(data + preset). :data:`APP` is the app contract (:mod:`pgraft.core.app`): ``APP.lacks`` says why a
directory is no base, ``APP.resolve_base`` what a ``--base`` value names, ``APP.sample_target`` what
``pgraft flow sample`` / ``evaluate`` point at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgraft.core.app import App
from pgraft.core.checkpoint import WEIGHTS_NAME, load_pretrained, save_json
from pgraft.core.losses import flow_matching_loss
from pgraft.core.noise_correction import CORRECT_META
from pgraft.core.pretrain import PretrainConfig, is_pretrained, pretrain
from pgraft.core.shipped import open_base_dir, shipped_dir
from pgraft.core.state import RESTORE_BASE, read_json

from .data import DATASETS, infinite_batches, load_images
from .model import PRESETS, FlowUNet, from_preset

BASE_META = "flow.json"
# `pgraft flow pretrain` with its defaults (Fashion-MNIST, "default" preset), see bases/default/SHIPPED.json;
# `pgraft flow invert shipped` inverts through it
SHIPPED_BASE = shipped_dir(Path(__file__).parent)


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")


@dataclass(frozen=True)
class FlowPretrainConfig:
    """Base-flow pretraining. ``steps=2500`` at batch 64 is ~26 min for the "default" preset on one
    CPU thread (measured 1.6 steps/s), inside the 30-minute CPU budget."""

    data: str = "fashion-mnist"
    path: str | None = None
    preset: str = "default"
    limit: int | None = None
    steps: int = 2500
    batch_size: int = 64
    lr: float = 7e-4
    warmup: int = 100
    ema: float = 0.999
    hflip: bool = False
    seed: int = 0
    ckpt_every: int = 250

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"unknown dataset {self.data!r}; choose from {sorted(DATASETS)}")
        _check_preset(self.preset)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def load_training_images(cfg: FlowPretrainConfig, split: str = "train", limit: int | None = None) -> torch.Tensor:
    """The images the base was (or will be) trained on, at the preset's resolution: [N, C, H, W] in [-1, 1]."""
    size = PRESETS[cfg.preset]["image_size"]
    images = load_images(cfg.data, cfg.path, split, limit if limit is not None else cfg.limit, size)
    channels = PRESETS[cfg.preset]["channels"]
    if images.shape[1] != channels:
        raise ValueError(f"preset {cfg.preset!r} expects {channels}-channel images, {cfg.data} has {images.shape[1]}")
    return images


def pretrain_flow(cfg: FlowPretrainConfig, out: str | Path, show_progress: bool = True,
                  images: torch.Tensor | None = None, device: torch.device | str = "cpu") -> FlowUNet:
    """Train the base flow with conditional flow matching on x_s = (1-s) x_0 + s eps, target eps - x_0.

    Resumes an interrupted run in ``out``. ``images`` overrides the dataset (tests). Trains on
    ``device``; the data and every random draw stay on the CPU, so a GPU run starts from the same
    initial weights and sees the same batches. Returns the EMA model (what is saved).
    """
    out = Path(out)
    torch.manual_seed(cfg.seed)  # model init (core.pretrain seeds only after the model exists)
    model = from_preset(cfg.preset).to(device)
    data = images if images is not None else load_training_images(cfg)
    save_json(asdict(cfg), out / BASE_META)
    batches = infinite_batches(data, cfg.batch_size, torch.Generator().manual_seed(cfg.seed), cfg.hflip)
    core_cfg = PretrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, ema=cfg.ema, seed=cfg.seed,
                              ckpt_every=cfg.ckpt_every, log_every=min(50, cfg.steps))
    ema = pretrain(model, batches, lambda m, x, c, g: flow_matching_loss(m, x, 0.0, c, g), core_cfg, out,
                   model.config, show_progress=show_progress)
    return ema.eval()


def load_base(base_dir: str | Path) -> tuple[FlowUNet, FlowPretrainConfig]:
    """(EMA base model in eval mode, its pretraining config) from a ``pretrain_flow`` directory,
    verified by :func:`~pgraft.core.shipped.open_base_dir` (a damaged or partial base is refused
    naming the file)."""
    base_dir = Path(base_dir)
    if not open_base_dir(base_dir):
        raise FileNotFoundError(f"no pretrained base flow in {base_dir} (missing config.json or model.safetensors); "
                                "run `pgraft flow pretrain --out {base_dir}` first".replace("{base_dir}", str(base_dir)))
    meta = base_dir / BASE_META
    cfg = FlowPretrainConfig(**read_json(meta, fix=RESTORE_BASE)) if meta.is_file() else FlowPretrainConfig()
    return load_pretrained(FlowUNet, base_dir).eval(), cfg


def weights_digest(model_dir: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of ``model_dir``'s model.safetensors (identifies a checkpoint)."""
    import hashlib

    return hashlib.sha256((Path(model_dir) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]


def pretraining_finished(base_dir: str | Path) -> bool:
    """The base checkpoint exists and its pretraining ran all its steps (not an interrupted run)."""
    return is_pretrained(base_dir)


def _no_correction(directory: Path) -> str | None:
    """A noise-correction directory holds a FlowUNet checkpoint too, but it is no base."""
    return f"it holds {CORRECT_META}: a `pgraft flow correct` directory" if (directory / CORRECT_META).is_file() else None


def _correct_lacks(directory: Path) -> str | None:
    from .correct import correct_lacks  # correct.py imports this module

    return correct_lacks(directory)


# no flow command pretrains a base on its own: a missing --base directory is refused naming `pgraft flow pretrain`
APP = App(name="flow", shipped=SHIPPED_BASE, load=load_base, model_class=FlowUNet.__name__, check=_no_correction,
          pretrain=None, run_lacks=_correct_lacks, run_kind="`pgraft flow correct` directory")
