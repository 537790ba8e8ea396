"""Inversion and noise correction of the unconditional image flow: the flow app's adapter on
:mod:`pgraft.core.noise_correction` (docs/derivations.md, "Inverse noise correction"; paper Table 5).

    invert_dataset    training images -> noises z = Phi^{-1}(x) through the *discrete* base sampler
    NOISE_MODELS      the app's noise flows (small ``noise-*`` FlowUNets) for
                      :func:`pgraft.core.noise_correction.train_correction` / ``load_correction``
    corrected_base    the base a correction was inverted through (or another one)

Run directories (every file written atomically, every stage resumable)::

    invert/    invert.json (config + base dir + weights digest), shards/noise_00003.safetensors,
               reconstruction.json, throughput/rank_000.json (images/s of each process of the last run)
    correct/   config.json, model.safetensors (noise flow), correct.json (invert dir, base dir, base sampler)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pgraft.core.checkpoint import save_json
from pgraft.core.errors import UsageError
from pgraft.core.inversion import SHARD_DIR, WARM_STARTS, full_fp32, read_shards, shard_done, shard_path
from pgraft.core.noise_correction import (
    CORRECT_META,
    INVERT_META,
    Correction,
    CorrectionConfig,
    FlowBase,
    NoiseModels,
    claim,
    invert_batch,
    invert_shards,
)
from pgraft.core.sampling import FLOW_STEPS
from pgraft.core.schedules import flow_times
from pgraft.core.state import RESTORE_OUT, read_json
from pgraft.core.targets import checkpoint_lacks

from .model import PRESETS, FlowUNet, from_preset
from .pretrain import APP, FlowPretrainConfig, load_base, load_training_images, weights_digest
from .sample import check_sampler

RECONSTRUCTION = "reconstruction.json"
THROUGHPUT_DIR = "throughput"


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
        check_sampler(self.sampler)
        if self.warm_start is not None and self.warm_start not in WARM_STARTS:
            raise UsageError(f"warm_start must be one of {WARM_STARTS}, got {self.warm_start!r}")
        for name in ("steps", "limit", "shard_size", "batch_size", "max_iter"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")


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
        raise UsageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def _settle_meta(out: Path, saved: dict[str, Any] | None, cfg: InvertConfig, identity: dict[str, Any],
                 n_train: int) -> tuple[InvertConfig, dict[str, Any]]:
    """(config with its warm start resolved, the invert.json it implies) for an inversion into ``out``
    that holds ``saved`` (its invert.json, or None); refuses settings that differ from it, and a smaller limit."""
    if saved is not None:
        saved = json.loads(json.dumps(saved))
        saved.setdefault("config", {}).setdefault("warm_start", "previous")  # written before the option existed
    if cfg.warm_start is None:
        cfg = replace(cfg, warm_start=saved["config"]["warm_start"] if saved is not None else "extrapolate")
    # the weights' digest makes a rerun after the base changed (e.g. more pretraining) refuse to
    # mix stale shards with new ones instead of silently resuming
    meta = {"config": asdict(cfg), **identity, "n_train": int(n_train)}
    if saved is not None:
        now = json.loads(json.dumps(meta))
        saved_limit = saved["config"].pop("limit", None)
        now["config"].pop("limit")
        if saved != now:
            raise UsageError(f"{out} holds an inversion with different settings ({saved}); "
                             f"use another --out or delete it (now: {now})")
        if saved_limit is not None and cfg.limit < saved_limit:
            raise UsageError(f"{out} holds an inversion of {saved_limit} images; --limit {cfg.limit} would drop "
                             f"some of them (use a limit >= {saved_limit}, or another --out)")
    return cfg, meta


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = out / INVERT_META
    return read_json(path, fix=RESTORE_OUT) if path.is_file() else None


@contextmanager
def _meta_of_rank_0(out: Path, settle: Callable[[dict[str, Any] | None], dict[str, Any]], rank: int,
                    timeout: float, poll_seconds: float) -> Iterator[dict[str, Any]]:
    """For a rank other than 0: wait until rank 0 wrote exactly the invert.json this process would
    (``settle`` also refuses settings that differ from it), and yield it."""
    deadline = time.monotonic() + timeout
    while True:
        saved = _read_meta(out)
        meta = settle(saved)
        if saved is not None and saved == json.loads(json.dumps(meta)):
            yield meta
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: rank 0 did not write {out / INVERT_META} within {timeout:.0f} s")
        time.sleep(poll_seconds)


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
        raise UsageError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    base_dir, out = APP.resolve_base(base_dir), Path(out)  # "shipped": verified, then its directory
    model, base_cfg = load_base(base_dir)
    model = model.to(device)
    data = images if images is not None else load_training_images(base_cfg)
    identity = {"base": str(base_dir.resolve()), "base_weights": weights_digest(base_dir)}

    def settle(saved: dict[str, Any] | None) -> dict[str, Any]:
        return _settle_meta(out, saved, cfg, identity, len(data))[1]

    with (claim(out, INVERT_META, settle) if rank == 0
          else _meta_of_rank_0(out, settle, rank, meta_timeout, poll_seconds)) as meta:
        cfg = InvertConfig(**meta["config"])  # its warm start resolved
        if rank == 0:
            for stale in (out / THROUGHPUT_DIR).glob("rank_*.json"):  # ranks of an earlier, wider run
                if int(stale.stem.split("_")[1]) >= world_size:
                    stale.unlink(missing_ok=True)
        subset = _subset(len(data), cfg.limit, cfg.seed)
        base = FlowBase(model, flow_times(cfg.steps), tuple(model.image_shape), FLOW_STEPS[cfg.sampler], identity)
        n_shards = -(-len(subset) // cfg.shard_size)
        mine = [i for i in range(n_shards) if i % world_size == rank]
        shard_idx = {i: subset[i * cfg.shard_size : (i + 1) * cfg.shard_size] for i in range(n_shards)}
        label = f"invert ({cfg.steps} {cfg.sampler} steps" + (f", rank {rank}/{world_size})" if world_size > 1 else ")")
        iterations: list[float] = []

        def invert_rows(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            tensors, res = invert_batch(base, data[rows].to(device), max_iter=cfg.max_iter, tol=cfg.tol,
                                        warm_start=cfg.warm_start)
            iterations.append(sum(res.iterations) / cfg.steps)
            return tensors

        started = time.perf_counter()
        with full_fp32():
            run = invert_shards(out, {i: shard_idx[i] for i in mine}, invert_rows, cfg.batch_size, label,
                                show_progress, on_shard)
        seconds = time.perf_counter() - started
        done = run.items
        stats = {"rank": rank, "world_size": world_size, "device": str(device), "threads": torch.get_num_threads(),
                 "images": done, "skipped": run.skipped, "shards": len(mine), "seconds": seconds,
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
        tensors = read_shards(invert_dir, command="pgraft flow invert")
        files = list((invert_dir / SHARD_DIR).glob("noise_*.safetensors"))
    n = len(tensors["index"])
    pixels = tensors["noise"][0].numel()
    return ReconstructionReport(n_images=n, mean_abs=float(tensors["recon_abs_sum"].sum() / (n * pixels)),
                                max_abs=float(tensors["recon_abs_max"].max()),
                                max_residual=float(tensors["residual"].max()), shards=len(files))


# ----------------------------------------------------------------------------- noise correction
def _build_noise_model(preset: str, noise_shape: tuple[int, ...]) -> FlowUNet:
    model = from_preset(preset)
    if tuple(noise_shape) != tuple(model.image_shape):
        raise UsageError(f"noise preset {preset!r} works on {tuple(model.image_shape)}, the inverted noises are "
                         f"{tuple(noise_shape)}")
    return model


def _describe(inv: dict[str, Any], noises: torch.Tensor, model: FlowUNet) -> dict[str, Any]:
    """correct.json's flow entries: the base directory and the sampler the noises were inverted through."""
    return {"base": inv["base"], "base_sampler": inv["config"]["sampler"]}


NOISE_MODELS = NoiseModels(app="flow", model_class=FlowUNet, build=_build_noise_model, presets=tuple(PRESETS),
                           defaults={"preset": "noise-small", "steps": 6000}, describe=_describe)
"""The flow app's noise-correction flows: FlowUNet presets (the ``noise-*`` ones are sized for it), by
default "noise-small" trained 6,000 steps."""


def correction_config(**settings: Any) -> CorrectionConfig:
    """The flow app's :class:`~pgraft.core.noise_correction.CorrectionConfig`: its defaults, ``settings`` over them."""
    return NOISE_MODELS.config(**settings)


def correct_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a finished ``pgraft flow correct`` directory (None when it is one)."""
    return checkpoint_lacks(directory, FlowUNet.__name__, (CORRECT_META,))


def corrected_base(correction: Correction, base_dir: str | Path | None = None
                   ) -> tuple[FlowUNet, FlowPretrainConfig, Path, str]:
    """(base model, its pretraining config, its directory, the base sampler) of ``correction``: the base
    recorded when its noises were inverted, or ``base_dir`` instead."""
    path = Path(base_dir) if base_dir is not None else Path(correction.meta["base"])
    base, base_cfg = load_base(path)
    return base, base_cfg, path, str(correction.meta["base_sampler"])
