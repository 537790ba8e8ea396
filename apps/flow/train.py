"""Stages of the unconditional image-flow experiment (docs/derivations.md, "Inverse noise correction"; paper Table 5).

    pretrain_flow     data -> base velocity model v(x, s) (flow matching, t_start = 0)
    invert_dataset    training images -> noises z = Phi^{-1}(x) through the *discrete* base sampler
    train_correction  N(0, I) -> law of the inverted noises (a much smaller FlowUNet)
    sample_base       z ~ N(0, I) -> base sampler -> images
    sample_corrected  z ~ N(0, I) -> noise flow -> frozen base sampler -> images
    evaluate          one metrics row per sampler configuration (FLOPs/image counted, not estimated;
                      the metrics are :class:`~pgraft.apps.flow.evaluate.Evaluator`'s)

Run directories (every file written atomically, every stage resumable)::

    base/      config.json, model.safetensors (EMA), train_state.pt, loss.csv, flow.json (data + preset)
    invert/    invert.json (config + base dir), shards/noise_00003.safetensors, reconstruction.json,
               throughput/rank_000.json (images/s of each process of the last run)
    correct/   config.json, model.safetensors (noise flow), correct.json (invert dir, base dir, preset)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pgraft.core.checkpoint import WEIGHTS_NAME, load_pretrained, save_json
from pgraft.core.errors import UsageError
from pgraft.core.integrity import exclusive
from pgraft.core.inversion import (
    SHARD_DIR,
    WARM_STARTS,
    NoiseFlowConfig,
    full_fp32,
    invert,
    resume_conflicts,
    sampler_flops,
    shard_done,
    shard_path,
    train_noise_flow,
)
from pgraft.core.inversion import read_shards as read_noise_shards
from pgraft.core.losses import flow_matching_loss
from pgraft.core.pretrain import PretrainConfig, is_pretrained, pretrain
from pgraft.core.progress import progress_bar
from pgraft.core.sampling import FLOW_STEP_EVALS, FLOW_STEPS, sample
from pgraft.core.schedules import flow_times
from pgraft.core.shipped import open_base_dir, resolve_base, shipped_dir
from pgraft.core.state import atomic_write, module_device
from pgraft.core.targets import checkpoint_lacks

from .data import DATASETS, infinite_batches, load_images
from .evaluate import Evaluator
from .model import PRESETS, FlowUNet, from_preset

BASE_META = "flow.json"
INVERT_META = "invert.json"
CORRECT_META = "correct.json"
RECONSTRUCTION = "reconstruction.json"
THROUGHPUT_DIR = "throughput"
# `pgraft flow pretrain` with its defaults (Fashion-MNIST, "default" preset), see bases/default/SHIPPED.json;
# `pgraft flow invert shipped` inverts through it
SHIPPED_BASE = shipped_dir(Path(__file__).parent)


def _check_sampler(sampler: str) -> None:
    if sampler not in FLOW_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(FLOW_STEPS)}")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")


# ----------------------------------------------------------------------------- pretraining
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
    cfg = FlowPretrainConfig(**json.loads(meta.read_text())) if meta.is_file() else FlowPretrainConfig()
    return load_pretrained(FlowUNet, base_dir).eval(), cfg


def weights_digest(model_dir: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of ``model_dir``'s model.safetensors (identifies a checkpoint)."""
    import hashlib

    return hashlib.sha256((Path(model_dir) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]


def base_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a finished base flow (None when it is one), for a refusal
    that names it (see :mod:`pgraft.core.targets`); a noise-correction flow is no base."""
    if (Path(directory) / CORRECT_META).is_file():
        return f"it holds {CORRECT_META}: a `pgraft flow correct` directory"
    return checkpoint_lacks(directory, FlowUNet.__name__)


def correct_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a finished ``pgraft flow correct`` directory (None when it is one)."""
    return checkpoint_lacks(directory, FlowUNet.__name__, (CORRECT_META,))


def pretraining_finished(base_dir: str | Path) -> bool:
    """The base checkpoint exists and its pretraining ran all its steps (not an interrupted run)."""
    return is_pretrained(base_dir)


# ----------------------------------------------------------------------------- inversion
@dataclass(frozen=True)
class InvertConfig:
    """Invert ``limit`` training images (a seeded random subset) through ``steps`` steps of ``sampler``.

    The fixed-point solve of each step stops at ``tol`` (max-abs residual) or ``max_iter``.
    ``warm_start`` is its first iterate (:func:`pgraft.core.inversion.invert`): "previous" (the
    point just inverted: every inversion made before this option existed), "extrapolate" (plus the
    previous step's update: ~30% fewer model calls at 200 Euler steps on the shipped base, same
    fixed point) or None: the directory's own when resuming one, else "extrapolate".
    """

    steps: int = 10
    sampler: str = "euler"
    limit: int = 2000
    shard_size: int = 250
    batch_size: int = 125
    max_iter: int = 30
    tol: float = 1e-4
    seed: int = 0
    warm_start: str | None = None

    def __post_init__(self) -> None:
        _check_sampler(self.sampler)
        if self.warm_start is not None and self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {WARM_STARTS}, got {self.warm_start!r}")
        for name in ("steps", "limit", "shard_size", "batch_size", "max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ReconstructionReport:
    """|Phi(Phi^{-1}(x)) - x| over all pixels of all inverted images, and the worst fixed-point residual."""

    n_images: int
    mean_abs: float
    max_abs: float
    max_residual: float
    shards: int


def _subset(n_available: int, limit: int, seed: int) -> torch.Tensor:
    """Indices of the images to invert: the first ``limit`` of a seeded permutation (reproducible on resume)."""
    return torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))[: min(limit, n_available)]


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process from torchrun's environment variables RANK,
    WORLD_SIZE and LOCAL_RANK; (0, 1, 0) outside torchrun. No process group is created."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def _settle_meta(out: Path, cfg: InvertConfig, base_dir: Path, n_train: int) -> tuple[InvertConfig, dict[str, Any]]:
    """(config with its warm start resolved, the invert.json it implies) for an inversion into ``out``;
    refuses settings that differ from the inversion already there, and a smaller limit."""
    meta_path = out / INVERT_META
    saved = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if saved is not None:
        saved.setdefault("config", {}).setdefault("warm_start", "previous")  # written before the option existed
    if cfg.warm_start is None:
        cfg = replace(cfg, warm_start=saved["config"]["warm_start"] if saved is not None else "extrapolate")
    # the weights' digest makes a rerun after the base changed (e.g. more pretraining) refuse to
    # mix stale shards with new ones instead of silently resuming
    meta = {"config": asdict(cfg), "base": str(base_dir.resolve()), "base_weights": weights_digest(base_dir),
            "n_train": int(n_train)}
    if saved is not None:
        now = json.loads(json.dumps(meta))
        saved_limit = saved["config"].pop("limit", None)
        now["config"].pop("limit")
        if saved != now:
            raise ValueError(f"{out} holds an inversion with different settings ({saved}); "
                             f"use another --out or delete it (now: {now})")
        if saved_limit is not None and cfg.limit < saved_limit:
            raise ValueError(f"{out} holds an inversion of {saved_limit} images; --limit {cfg.limit} would drop "
                             f"some of them (use a limit >= {saved_limit}, or another --out)")
    return cfg, meta


def invert_dataset(base_dir: str | Path, out: str | Path, cfg: InvertConfig, show_progress: bool = True,
                   images: torch.Tensor | None = None,
                   on_shard: Callable[[int], None] | None = None,
                   device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                   throughput: dict[str, Any] | None = None, poll_seconds: float = 0.5,
                   meta_timeout: float = 600.0) -> ReconstructionReport:
    """Invert training images into noises, shard by shard; finished shards are skipped on a rerun.

    Shard ``i`` holds images ``i*shard_size ... (i+1)*shard_size - 1`` of the subset, as tensors
    ``noise`` [n, C, H, W], ``index`` int64 [n] (row in the training set), ``residual`` [n]
    (worst per-step fixed-point residual) and ``recon_abs_sum`` / ``recon_abs_max`` [n]
    (|sample(base, noise) - x| summed / maxed over pixels). Each shard is written atomically, so a
    killed run loses at most the shard in progress and never leaves a partial one.

    ``images`` overrides the base's training set (tests); ``on_shard(i)`` is called after shard i
    is written (tests simulate a kill there). On a GPU the solve runs in full fp32 (TF32
    convolutions and matmuls are switched off meanwhile): their 1e-3 relative error would stall the
    fixed-point iteration far above ``tol``.

    A rerun with a larger ``limit`` and otherwise the same settings extends the inversion: the subset
    is a prefix of one seeded permutation, so finished shards stay valid (a shard whose indices do
    not match the new subset, e.g. the old last partial one, is inverted again). A smaller limit is
    refused, as are any other changed settings.

    **Several processes** (``pgraft flow invert`` under torchrun; :func:`distributed_env`): process
    ``rank`` of ``world_size`` inverts the shards i with i % world_size == rank, with the same subset
    and batches as one process, so every shard is the same (bit for bit on the CPU with the same
    thread count). No two processes write the same file: rank 0 alone holds the directory's writer
    lock (:func:`pgraft.core.integrity.exclusive`), writes invert.json (the other ranks check the
    settings too and wait up to ``meta_timeout`` s for it before writing a shard), waits (polling
    every ``poll_seconds``) for the other ranks' shards and then writes reconstruction.json; each rank
    writes its own shards and ``throughput/rank_NNN.json``. Rank 0 returns the report of the whole
    inversion, another rank that of its own shards. ``throughput``, if given, receives this process's
    images/s (the JSON's contents: images inverted by this run, not the skipped ones, over the seconds
    spent on them, sampling back for the reconstruction error included).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    base_dir, out = resolve_base(base_dir, SHIPPED_BASE), Path(out)  # "shipped": verified, then its directory
    model, base_cfg = load_base(base_dir)
    model = model.to(device)
    data = images if images is not None else load_training_images(base_cfg)
    with exclusive(out) if rank == 0 else nullcontext():
        meta_path = out / INVERT_META
        if rank == 0:
            cfg, meta = _settle_meta(out, cfg, base_dir, len(data))
            save_json(meta, meta_path)
            for stale in (out / THROUGHPUT_DIR).glob("rank_*.json"):  # ranks of an earlier, wider run
                if int(stale.stem.split("_")[1]) >= world_size:
                    stale.unlink(missing_ok=True)
        else:  # rank 0 writes invert.json: wait for exactly the settings this process will use
            deadline = time.monotonic() + meta_timeout
            while True:
                cfg, meta = _settle_meta(out, cfg, base_dir, len(data))
                if meta_path.is_file() and json.loads(meta_path.read_text()) == json.loads(json.dumps(meta)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank}: rank 0 did not write {meta_path} within {meta_timeout:.0f} s")
                time.sleep(poll_seconds)
        subset = _subset(len(data), cfg.limit, cfg.seed)
        times, step = flow_times(cfg.steps), FLOW_STEPS[cfg.sampler]
        n_shards = -(-len(subset) // cfg.shard_size)
        mine = [i for i in range(n_shards) if i % world_size == rank]
        shard_idx = {i: subset[i * cfg.shard_size : (i + 1) * cfg.shard_size] for i in range(n_shards)}
        label = f"invert ({cfg.steps} {cfg.sampler} steps" + (f", rank {rank}/{world_size})" if world_size > 1 else ")")
        done = skipped = 0
        iterations: list[float] = []
        started = time.perf_counter()
        with full_fp32(), progress_bar(sum(len(shard_idx[i]) for i in mine), label, show_progress) as advance:
            for i in mine:
                idx = shard_idx[i]
                if shard_done(out, i, idx):
                    skipped += len(idx)
                    advance(len(idx))
                    continue
                parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("noise", "residual", "recon_abs_sum",
                                                                       "recon_abs_max")}
                for b in idx.split(cfg.batch_size):
                    x0 = data[b].to(device)
                    res = invert(model, x0, times, step, max_iter=cfg.max_iter, tol=cfg.tol, warm_start=cfg.warm_start)
                    recon = sample(model, res.noise, times, step)
                    err = (recon - x0).abs().flatten(1).cpu()
                    parts["noise"].append(res.noise.cpu())
                    parts["residual"].append(res.residual.cpu())
                    parts["recon_abs_sum"].append(err.double().sum(1))
                    parts["recon_abs_max"].append(err.amax(1))
                    iterations.append(sum(res.iterations) / cfg.steps)
                    advance(len(b), recon_max=float(err.max()))
                tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
                tensors["index"] = idx.contiguous()
                atomic_write(shard_path(out, i), lambda tmp: save_file(tensors, tmp))
                done += len(idx)
                if on_shard is not None:
                    on_shard(i)
        seconds = time.perf_counter() - started
        stats = {"rank": rank, "world_size": world_size, "device": str(device), "threads": torch.get_num_threads(),
                 "images": done, "skipped": skipped, "shards": len(mine), "seconds": seconds,
                 "images_per_s": done / seconds if done and seconds > 0 else float("nan"),
                 "steps": cfg.steps, "sampler": cfg.sampler, "batch_size": cfg.batch_size,
                 "warm_start": cfg.warm_start, "tol": cfg.tol,
                 "fixed_point_iterations_per_step": sum(iterations) / len(iterations) if iterations else float("nan"),
                 "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        save_json(stats, out / THROUGHPUT_DIR / f"rank_{rank:03d}.json")
        if throughput is not None:
            throughput.update(stats)
        if rank != 0:
            return reconstruction_report(out, mine)
        _wait_for_shards(out, {i: shard_idx[i] for i in range(n_shards) if i % world_size != 0}, poll_seconds)
        report = reconstruction_report(out)
        save_json(asdict(report), out / RECONSTRUCTION)
        return report


def _wait_for_shards(out: Path, expected: dict[int, torch.Tensor], poll_seconds: float) -> None:
    """Block until every shard in ``expected`` (index -> its training-set rows) is written (other
    ranks' shards; a rank that fails under torchrun makes torchrun stop this one too)."""
    missing, told = dict(expected), False
    while missing:
        for i, idx in list(missing.items()):
            if shard_done(out, i, idx):
                del missing[i]
        if missing:
            if not told:
                print(f"rank 0: waiting for {len(missing)} shard(s) of the other ranks", file=sys.stderr, flush=True)
                told = True
            time.sleep(poll_seconds)


def read_shards(invert_dir: str | Path) -> dict[str, torch.Tensor]:
    """All shards of an inversion concatenated in shard order (keys as in :func:`invert_dataset`)."""
    return read_noise_shards(invert_dir, command="pgraft flow invert")


def reconstruction_report(invert_dir: str | Path, shards: list[int] | None = None) -> ReconstructionReport:
    """The report over every shard in ``invert_dir``, or over the shards numbered ``shards`` (a rank's
    own; none: a report of 0 images with NaN errors)."""
    invert_dir = Path(invert_dir)
    if shards is not None:
        files = [shard_path(invert_dir, i) for i in shards]
        if not files:
            nan = float("nan")
            return ReconstructionReport(n_images=0, mean_abs=nan, max_abs=nan, max_residual=nan, shards=0)
        loaded = [load_file(str(f)) for f in files]
        tensors = {k: torch.cat([t[k] for t in loaded]) for k in loaded[0]}
    else:
        tensors = read_shards(invert_dir)
        files = list((invert_dir / SHARD_DIR).glob("noise_*.safetensors"))
    n = len(tensors["index"])
    pixels = tensors["noise"][0].numel()
    return ReconstructionReport(n_images=n, mean_abs=float(tensors["recon_abs_sum"].sum() / (n * pixels)),
                                max_abs=float(tensors["recon_abs_max"].max()),
                                max_residual=float(tensors["residual"].max()), shards=len(files))


def load_inversion(invert_dir: str | Path) -> tuple[dict[str, Any], InvertConfig]:
    """(invert.json contents, its InvertConfig); the error names the missing file."""
    path = Path(invert_dir) / INVERT_META
    if not path.is_file():
        raise FileNotFoundError(f"{invert_dir} is not an inversion directory (missing {path}); run `pgraft flow invert`")
    meta = json.loads(path.read_text())
    return meta, InvertConfig(**meta["config"])


# ----------------------------------------------------------------------------- noise correction
@dataclass(frozen=True)
class CorrectionConfig(NoiseFlowConfig):
    """Noise-correction flow (core.inversion.NoiseFlowConfig): a small FlowUNet (``preset``, one of
    the ``noise-*`` presets) trained N(0, I) -> law of the inverted noises."""

    preset: str = "noise-small"
    steps: int = 6000

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_preset(self.preset)


def train_correction(invert_dir: str | Path, out: str | Path, cfg: CorrectionConfig,
                     show_progress: bool = True, device: torch.device | str = "cpu") -> FlowUNet:
    """Fit the noise flow on every inverted noise in ``invert_dir`` (on ``device``; the noises and
    the random draws stay on the CPU); saves it (resumable) in ``out``."""
    invert_dir, out = Path(invert_dir), Path(out)
    meta, inv_cfg = load_inversion(invert_dir)
    noises = read_shards(invert_dir)["noise"]
    model = from_preset(cfg.preset).to(device)
    if tuple(noises.shape[1:]) != model.image_shape:
        raise ValueError(f"noise preset {cfg.preset!r} works on {model.image_shape}, the inverted noises are "
                         f"{tuple(noises.shape[1:])}")
    saved_path = out / CORRECT_META
    if saved_path.is_file():  # a rerun resumes the saved weights: only the length and the lr may change
        conflicts = resume_conflicts({"config": json.loads(saved_path.read_text())["config"]}, {"config": asdict(cfg)})
        if conflicts:
            raise UsageError(f"{out} holds a noise flow trained with other settings ({', '.join(conflicts)}); it would "
                             "resume those weights: use another --out or delete it (only --steps and --lr may change "
                             "on a rerun)")
    save_json({"config": asdict(cfg), "invert": str(invert_dir.resolve()), "base": meta["base"],
               "base_steps": inv_cfg.steps, "base_sampler": inv_cfg.sampler, "n_noises": int(len(noises))},
              saved_path)
    return train_noise_flow(model, noises, cfg.pretrain_config(), out, model.config, batch_size=cfg.batch_size,
                            show_progress=show_progress, coupling=cfg.coupling).eval()


@dataclass(frozen=True)
class Correction:
    """A trained noise flow with the base and base sampler it was inverted through."""

    noise_model: FlowUNet
    base: FlowUNet
    base_cfg: FlowPretrainConfig
    base_dir: Path
    base_steps: int
    base_sampler: str


def load_correction(correct_dir: str | Path, base_dir: str | Path | None = None) -> Correction:
    """Load ``correct_dir``; ``base_dir`` overrides the base path recorded at training time."""
    correct_dir = Path(correct_dir)
    meta_path = correct_dir / CORRECT_META
    if not meta_path.is_file() or not is_pretrained(correct_dir):
        raise FileNotFoundError(f"{correct_dir} holds no trained noise-correction flow (missing {meta_path} or "
                                "model.safetensors); run `pgraft flow correct` first")
    meta = json.loads(meta_path.read_text())
    base_path = Path(base_dir) if base_dir is not None else Path(meta["base"])
    base, base_cfg = load_base(base_path)
    return Correction(noise_model=load_pretrained(FlowUNet, correct_dir).eval(), base=base, base_cfg=base_cfg,
                      base_dir=base_path, base_steps=int(meta["base_steps"]), base_sampler=meta["base_sampler"])


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplerSpec:
    """One sampler configuration: base ``steps`` of ``sampler``, optionally preceded by
    ``noise_steps`` of ``noise_sampler`` through the noise-correction flow (0 = plain base)."""

    steps: int
    sampler: str = "euler"
    noise_steps: int = 0
    noise_sampler: str = "euler"

    def __post_init__(self) -> None:
        _check_sampler(self.sampler)
        _check_sampler(self.noise_sampler)
        if self.steps < 1 or self.noise_steps < 0:
            raise ValueError(f"need steps >= 1 and noise_steps >= 0, got {self.steps}, {self.noise_steps}")

    @property
    def corrected(self) -> bool:
        return self.noise_steps > 0

    @property
    def label(self) -> str:
        base = f"{self.sampler}-{self.steps}"
        return f"corrected({self.noise_sampler}-{self.noise_steps})+{base}" if self.corrected else f"base {base}"


@torch.no_grad()
def sample_images(spec: SamplerSpec, base: FlowUNet, n: int, noise_model: FlowUNet | None = None, seed: int = 0,
                  batch_size: int = 250, show_progress: bool = True) -> torch.Tensor:
    """n images [n, C, H, W] (clamped to [-1, 1]) from z ~ N(0, I) [-> noise flow] -> base sampler.

    The noise flow integrates its own ODE from s = 1 (its N(0, I) prior) to s = 0 (the inverted-noise
    law); its output is the base's x_1 (core.inversion.sample_noise_corrected, batched here).
    Runs where ``base`` lives (the noise flow must be there too); z is drawn on the CPU, so a seed
    gives the same starting noise on any device. Returns CPU tensors.
    """
    if spec.corrected and noise_model is None:
        raise ValueError(f"sampler {spec.label} needs a noise-correction model")
    g = torch.Generator().manual_seed(seed)
    device = module_device(base)
    base_times, base_step = flow_times(spec.steps), FLOW_STEPS[spec.sampler]
    out = []
    with progress_bar(n, spec.label, show_progress) as advance:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = torch.randn((m, *base.image_shape), generator=g).to(device)
            if spec.corrected:
                z = sample(noise_model, z, flow_times(spec.noise_steps), FLOW_STEPS[spec.noise_sampler])
            out.append(sample(base, z, base_times, base_step).clamp(-1, 1).cpu())
            advance(m)
    return torch.cat(out)


def sample_base(base: FlowUNet, n: int, steps: int, sampler: str = "euler", seed: int = 0,
                show_progress: bool = True) -> torch.Tensor:
    """Plain base sampling: z ~ N(0, I) -> ``steps`` of ``sampler``; [n, C, H, W]."""
    return sample_images(SamplerSpec(steps, sampler), base, n, None, seed, show_progress=show_progress)


def sample_corrected(correction: Correction, n: int, noise_steps: int, noise_sampler: str = "euler", seed: int = 0,
                     show_progress: bool = True) -> torch.Tensor:
    """z ~ N(0, I) -> noise flow (``noise_steps``) -> frozen base with the sampler it was inverted through."""
    spec = SamplerSpec(correction.base_steps, correction.base_sampler, noise_steps, noise_sampler)
    return sample_images(spec, correction.base, n, correction.noise_model, seed, show_progress=show_progress)


def flops_per_image(spec: SamplerSpec, base: FlowUNet, noise_model: FlowUNet | None = None) -> int:
    """Counted FLOPs/image: base steps x evals/step x FLOPs(base eval) + the same for the noise flow."""
    example = torch.zeros(1, *base.image_shape, device=module_device(base))
    total = sampler_flops(base, example, spec.steps, FLOW_STEP_EVALS[spec.sampler])
    if spec.corrected:
        if noise_model is None:
            raise ValueError(f"sampler {spec.label} needs a noise-correction model to count its FLOPs")
        total += sampler_flops(noise_model, example, spec.noise_steps, FLOW_STEP_EVALS[spec.noise_sampler])
    return total


# ----------------------------------------------------------------------------- evaluation
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


def images_to_grid(images: torch.Tensor, path: str | Path, ncol: int = 8) -> Path:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid (1-pixel gaps)."""
    from PIL import Image

    from .data import unit_to_uint8

    x = unit_to_uint8(images).numpy()
    n, c, h, w = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    image = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
