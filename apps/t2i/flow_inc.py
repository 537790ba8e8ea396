"""Inverse noise correction (INC, paper Sec. 5) of a frozen flow-matching text-to-image model (any
family of :data:`.pipelines.FAMILIES`: SD3 / 3.5, FLUX, Qwen-Image, SANA), at latent resolution and unconditional in the prompt.

    invert_images     real images -> VAE latents -> noises z = Phi^{-1}(latent) through the pipeline's
                      *discrete* deterministic Euler sampler (empty prompt, or per-image captions, guidance 1)
    NOISE_MODELS      the correctors (small UNet flows N(0, I) -> law of the inverted latent noises) for
                      :func:`pgraft.core.noise_correction.train_correction` / ``load_correction``
    sample_corrected  z ~ N(0, I) -> corrector (its own Euler grid) -> frozen base sampler -> VAE decode

This module is the t2i adapter on :mod:`pgraft.core.noise_correction` (locks, metadata, resume, refusals).

Run directories (every file written atomically; invert resumes shard by shard, correct resumes from
its last checkpoint)::

    invert/   invert.json (settings, model, images, captions), shards/noise_00000.safetensors, report.json
    correct/  config.json + model.safetensors (the corrector, EMA), train_state.pt, loss.csv, correct.json

Why invert the discrete sampler, at latent resolution
-----------------------------------------------------
The pipeline samples by drawing z ~ N(0, I) in latent space, running N Euler steps of its learned
velocity v on the scheduler's shifted sigma grid 1 = s_0 > s_1 > ... > s_N = 0, and decoding: an image is
D(Phi_N(z)), where Phi_N is the composition of the N steps x -> x + (s_{i+1} - s_i) v(x, s_i) and D the
VAE decoder. Two things make Phi_N(N(0, I)) differ from the law of real latents: v is learned
imperfectly, and N steps of Euler are not the ODE's flow. The correction wants a law q on z with
Phi_N(z) ~ (law of real latents) when z ~ q; then drawing z ~ q and running the *unchanged* base is
exact. Each Euler step is a bijection when |s_{i+1} - s_i| Lip(v) < 1 (a contraction perturbation of
the identity), so Phi_N is one too and q is unique: q is the law of Phi_N^{-1}(E(x)), x a real image and
E the encoder. That is why the inversion goes through the same discrete steps, grid and step count that
sampling will use (:func:`pgraft.core.inversion.invert` solves each step's backward-Euler equation
x_i = x_{i+1} - (s_{i+1} - s_i) v(x_i, s_i) by fixed-point iteration, and records the per-image residual):
inverting the exact ODE instead would give noises whose discrete-sampler images miss the data by the
discretisation error, which is part of what the correction is meant to absorb. The corrector therefore
belongs to one step count; sampling with other ``--steps`` is allowed but is no longer the target.

Latent resolution is the only place where this is well posed. The base flow was trained on, and samples,
latents E(x) = (posterior mean - shift) * scale (:meth:`FlowT2IPipeline.encode_images`); the decoder is
not invertible from pixels (16 x 128 x 128 latents against 3 x 1024 x 1024 pixels), so "the noise that
produces this image" only exists for the latent the encoder assigns it. With q targeted at E(x), the
corrected images D(Phi_N(z)) have the law of D(E(x)), i.e. the real images up to the VAE's
reconstruction error, which INC neither causes nor removes. The posterior *mean* is used (not a sample
of the posterior), which keeps the inversion deterministic and resumable; the posterior's small variance
is left out of the target.

Prompts. Phi_N depends on the condition and guidance. The inversion uses the empty prompt at guidance
1 (one map for every image), or each image's caption at guidance 1 when a captions file is given; the
corrector learns the *marginal* law of the inverted noises and sees no text. So the correction is exact
in target for the sampler it was inverted through (same steps, empty prompt or captions, guidance 1);
sampling a prompt with classifier-free guidance runs a different map Phi_N^{prompt, w}, and feeding it the
corrected noise is a transfer that nothing here measures.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pgraft.core.checkpoint import save_json
from pgraft.core.errors import UsageError
from pgraft.core.integrity import files_digest
from pgraft.core.inversion import SHARD_DIR, InversionResult, count_flops, full_fp32, read_shards
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
)
from pgraft.core.progress import progress_bar
from pgraft.core.sampling import euler_step

from .flow_pipeline import FlowT2IPipeline, flow_lacks, local_device, pipeline_kind
from .pipelines import FAMILIES, FLOW_CLASSES

REPORT_NAME = "report.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- the model
def flow_model_lacks(directory: str | Path) -> str | None:
    """Why ``directory`` cannot be inverted through (None: it can): INC needs the deterministic Euler
    sampler of a flow-matching pipeline directory of a supported family (:data:`.pipelines.FAMILIES`:
    SD3, FLUX, Qwen-Image, SANA); one line, naming the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"model directory {directory} does not exist"
    try:
        kind = pipeline_kind(directory)
    except ValueError as err:  # a pipeline of an unsupported class, or a flow family missing a component
        return str(err)
    if kind not in FAMILIES:
        what = "the embedded shapes world" if kind == "world" else "a UNet / DDIM Stable Diffusion pipeline"
        return (f"{directory} is {what}, not a flow-matching pipeline directory ({', '.join(FLOW_CLASSES)}): "
                "inverse noise correction here inverts the deterministic Euler sampler of a flow pipeline")
    lacks = flow_lacks(directory)
    return None if lacks is None else f"{directory} is not a {FAMILIES[kind].pipeline_class} directory: {lacks}"


def load_flow_pipeline(directory: str | Path, guidance_scale: float | None = None) -> FlowT2IPipeline:
    """:meth:`FlowT2IPipeline.load`, after refusing (:class:`UsageError`, one line) a non-flow directory."""
    lacks = flow_model_lacks(directory)
    if lacks is not None:
        raise UsageError(lacks)
    return FlowT2IPipeline.load(directory, guidance_scale)


class Counted(nn.Module):
    """``model(x, t, cond)``, counting its calls in ``calls`` (a sampler's model evaluations, as they run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t, cond)


class Guided(Counted):
    """``v(x, t, cond)`` of a :class:`FlowDenoiser` at a fixed guidance scale (1: the conditional velocity,
    one transformer call; otherwise classifier-free guidance when ``cond.uncond`` is set: one call on the
    doubled batch), its calls counted."""

    def __init__(self, denoiser: nn.Module, guidance_scale: float = 1.0) -> None:
        super().__init__(denoiser)
        self.guidance_scale = float(guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t, cond, guidance_scale=self.guidance_scale)


def transformer_parameters(model_dir: str | Path) -> int:
    """Parameters of the pipeline's transformer (its family's class), counted on a weightless copy built
    from its config (accelerate's ``init_empty_weights``: nothing is loaded or allocated)."""
    from accelerate import init_empty_weights

    kind = pipeline_kind(model_dir)
    transformer_type = FAMILIES[kind if kind in FAMILIES else "sd3"].transformer_type()
    config = transformer_type.load_config(str(Path(model_dir) / "transformer"))
    with init_empty_weights(include_buffers=True):
        model = transformer_type.from_config(config)
    return sum(p.numel() for p in model.parameters())


def transformer_digest(model_dir: str | Path) -> str:
    """SHA-256 over the transformer's weight files (a rerun of ``invert`` after the weights changed must
    not mix stale shards with new ones)."""
    folder = Path(model_dir) / "transformer"
    return files_digest(folder, [p for p in folder.glob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")])


# ----------------------------------------------------------------------------- images and captions
class ImageSource:
    """Images to invert: a folder of PNG/JPG files (sorted by name, not recursive) or a ``.safetensors``
    file holding one tensor [N, 3, H, W] in [-1, 1]. Loaded lazily, a batch at a time, as [B, 3, S, S] in
    [-1, 1] (S = ``size``): files are centre-cropped to a square and resized; tensors are resized when
    their side differs. ``names`` are the file names, or the row numbers ("0", "1", ...) of a tensor."""

    def __init__(self, path: str | Path, size: int) -> None:
        self.path, self.size = Path(path), int(size)
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"no PNG/JPG images in {self.path}")
            self.files: list[Path] | None = files
            self.names = [p.name for p in files]
            self.key = None
        elif self.path.is_file() and self.path.suffix == ".safetensors":
            self.files = None
            with safe_open(str(self.path), "pt") as f:
                keys = list(f.keys())
                if len(keys) != 1:
                    raise UsageError(f"{self.path} must hold one tensor of images [N, 3, H, W], found keys {keys}")
                self.key = keys[0]
                shape = f.get_slice(self.key).get_shape()
            if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[0] < 1:
                raise UsageError(f"{self.path}: expected square RGB images [N, 3, H, H], got shape {list(shape)}")
            self.names = [str(i) for i in range(int(shape[0]))]
        else:
            raise UsageError(f"{self.path} is neither a folder of PNG/JPG images nor a .safetensors file of images")

    def __len__(self) -> int:
        return len(self.names)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        if self.files is not None:
            return torch.stack([self._read_file(self.files[i]) for i in indices])
        with safe_open(str(self.path), "pt") as f:
            part = f.get_slice(self.key)
            x = torch.stack([part[int(i):int(i) + 1][0] for i in indices]).float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise UsageError(f"{self.path}: images must be in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(-1, 1)
        return x

    def _read_file(self, path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
            arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def read_captions(path: str | Path, names: Sequence[str]) -> list[str]:
    """One caption per image, in the order of ``names``. ``.txt``: one caption per line, in the images'
    sorted order (as many lines as images); ``.jsonl``: lines ``{"file": NAME, "caption": TEXT}``;
    ``.csv``: columns ``file`` and ``caption``. NAME is an image's file name (or, for a tensor of images,
    its row number); every image needs a caption."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"captions file {path} does not exist")
    if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(names):
            raise UsageError(f"{path} has {len(lines)} captions for {len(names)} images (one line per image, "
                             "in sorted file-name order)")
        return [line.strip() for line in lines]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise UsageError(f"captions file {path}: use a .txt, .jsonl or .csv file")
    try:
        by_name = {str(r["file"]): str(r["caption"]) for r in rows}
    except (KeyError, TypeError):
        raise UsageError(f"{path}: every entry needs a 'file' and a 'caption'") from None
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UsageError(f"{path} has no caption for {len(missing)} of the images, e.g. {missing[0]!r}")
    return [by_name[n] for n in names]


# ----------------------------------------------------------------------------- inversion
@dataclass(frozen=True)
class InvertConfig:
    """Invert images through ``steps`` Euler steps of the pipeline's sampler (its shifted sigma grid).

    ``limit``: the first ``limit`` images in sorted order (0 = all; a rerun with a larger limit extends
    the inversion). Each image's fixed-point solve of each step stops at ``tol`` (its max-abs residual),
    after ``max_iter`` iterations, or when its residual stalls for ``patience`` iterations."""

    steps: int = 28
    limit: int = 0
    shard_size: int = 64
    batch_size: int = 4
    max_iter: int = 30
    tol: float = 1e-4
    patience: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "shard_size", "batch_size", "max_iter", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit < 0 or not self.tol > 0:
            raise UsageError(f"need limit >= 0 and tol > 0, got {self.limit}, {self.tol}")


@dataclass(frozen=True)
class InvertReport:
    """The inversion in a directory: images, shards (and how many this run computed), the worst
    per-image fixed-point residual, and the reconstruction |Phi(Phi^{-1}(latent)) - latent| (mean, max)."""

    n_images: int
    shards: int
    shards_computed: int
    max_residual: float
    recon_mean_abs: float
    recon_max_abs: float


@torch.no_grad()
def invert_latents(model: nn.Module, latents: torch.Tensor, times: torch.Tensor, cond: Any,
                   max_iter: int = 30, tol: float = 1e-4, patience: int = 5) -> tuple[InversionResult, torch.Tensor]:
    """Noises that ``times``' Euler sampler maps onto ``latents`` (:func:`pgraft.core.inversion.invert`),
    and the per-image reconstruction error max |sample(noise) - latents| [B]. ``model`` is called as
    ``model(x, t, cond)`` (e.g. :class:`Guided` at guidance 1)."""
    base = FlowBase(model, times, tuple(latents.shape[1:]), euler_step)
    res = base.invert(latents, cond, max_iter=max_iter, tol=tol, patience=patience)
    return res, (base.sample(res.noise, cond) - latents).flatten(1).abs().amax(1)


def empty_prompt_cond(pipe: FlowT2IPipeline, n: int):
    """The empty prompt's (unguided) condition for ``n`` images."""
    return pipe.prompt_encoder()([""] * n, guidance=False)


def invert_images(model_dir: str | Path, images: str | Path, out: str | Path, cfg: InvertConfig,
                  captions: str | Path | None = None, show_progress: bool = True,
                  device: torch.device | str | None = None,
                  on_shard: Callable[[int], None] | None = None) -> InvertReport:
    """Invert real images into latent noises, shard by shard; finished shards are skipped on a rerun.

    Shard ``i`` holds images ``i * shard_size ...`` of the (sorted) source as tensors ``noise``
    [n, C, h, w] (float32), ``index`` int64 [n] (position in the source), ``residual`` [n] (worst
    per-step fixed-point residual) and ``recon_max`` [n] (max |Phi(noise) - latent|). Each shard is
    written atomically. A rerun with other settings, another model (weights digest) or other images or
    captions is refused; a larger ``limit`` extends the inversion. ``on_shard(i)`` runs after shard i is
    written (tests simulate a kill there).
    """
    model_dir, out = Path(model_dir), Path(out)
    pipe = load_flow_pipeline(model_dir)
    source = ImageSource(images, pipe.info.image_size)
    n = len(source) if cfg.limit == 0 else min(cfg.limit, len(source))
    names = source.names[:n]
    texts = read_captions(captions, source.names)[:n] if captions is not None else None
    times = pipe.times(cfg.steps)
    settings = {k: v for k, v in asdict(cfg).items() if k != "limit"}
    meta = {"config": settings, "model": str(model_dir.resolve()), "transformer_sha256": transformer_digest(model_dir),
            "times": times.tolist(), "latent_shape": list(pipe.state_shape), "images": str(Path(images).resolve()),
            "image_size": pipe.info.image_size,
            "captions": None if captions is None else str(Path(captions).resolve())}
    def settle(saved: dict[str, Any] | None) -> dict[str, Any]:
        if saved is not None:
            old_names, old_texts = saved.pop("names", []), saved.pop("texts", None)
            if saved != json.loads(json.dumps(meta)):
                changed = sorted(k for k in meta if saved.get(k) != json.loads(json.dumps(meta[k])))
                raise UsageError(f"{out} holds an inversion with other settings ({', '.join(changed)} differ); "
                                 "use another --out or delete it")
            if names[: len(old_names)] != old_names or (old_texts is not None and texts[: len(old_texts)] != old_texts):
                raise UsageError(f"{out} holds an inversion of {len(old_names)} images that are not the first images "
                                 "(or captions) of this source any more; use another --out or delete it")
        return {**meta, "names": names, "texts": texts}

    with claim(out, INVERT_META, settle):
        device = torch.device(device) if device is not None else local_device()
        base = FlowBase(Guided(pipe.denoiser.to(device), 1.0), times, tuple(pipe.state_shape), euler_step,
                        {"model": meta["model"], "transformer_sha256": meta["transformer_sha256"]})

        def invert_rows(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            latents = pipe.encode_images(source.load(rows.tolist())).to(device)
            cond = (empty_prompt_cond(pipe, len(rows)) if texts is None
                    else pipe.prompt_encoder()([texts[j] for j in rows.tolist()], guidance=False))
            t, _ = invert_batch(base, latents, cond, max_iter=cfg.max_iter, tol=cfg.tol, patience=cfg.patience)
            return {"noise": t["noise"], "residual": t["residual"], "recon_max": t["recon_abs_max"]}

        n_shards = -(-n // cfg.shard_size)
        shards = {i: torch.arange(i * cfg.shard_size, min(n, (i + 1) * cfg.shard_size), dtype=torch.int64)
                  for i in range(n_shards)}
        with full_fp32():
            run = invert_shards(out, shards, invert_rows, cfg.batch_size, f"invert ({cfg.steps} Euler steps)",
                                show_progress, on_shard)
        report = inversion_report(out, n_shards, len(run.computed))
        save_json(asdict(report), out / REPORT_NAME)
    return report


def inversion_report(invert_dir: str | Path, n_shards: int | None = None, computed: int = 0) -> InvertReport:
    s = read_shards(invert_dir, n_shards, "pgraft t2i invert")
    return InvertReport(n_images=len(s["index"]), shards=len(list((Path(invert_dir) / SHARD_DIR).glob("noise_*.safetensors")))
                        if n_shards is None else n_shards, shards_computed=computed,
                        max_residual=float(s["residual"].max()), recon_mean_abs=float(s["recon_max"].mean()),
                        recon_max_abs=float(s["recon_max"].max()))


# ----------------------------------------------------------------------------- the corrector
# UNet2DModel sizes (the corrector is meant to be small next to the transformer: "small" on SD3's 16 x 128 x 128
# latents has ~11M parameters, ~0.5% of SD3-medium's 2B)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, add_attention=False),
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=32),
    "base": dict(block_out_channels=(128, 256, 512), layers_per_block=2,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32, attention_head_dim=64),
}


class LatentNoiseFlow(nn.Module):
    """The corrector: a diffusers ``UNet2DModel`` (built from ``unet``, a config dict) called as
    ``model(x, t, cond)`` with t [B] in [0, 1] (core time: 1 = its N(0, I) prior, 0 = the inverted-noise
    law), passed to the UNet as timestep ``t * timestep_scale``; ``cond`` is ignored."""

    def __init__(self, unet: dict[str, Any], timestep_scale: float = 1000.0) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**unet)
        self.unet_config = dict(unet)
        self.timestep_scale = float(timestep_scale)

    @classmethod
    def from_preset(cls, preset: str, latent_shape: Sequence[int]) -> "LatentNoiseFlow":
        if preset not in PRESETS:
            raise UsageError(f"unknown corrector preset {preset!r}; choose one of {sorted(PRESETS)}")
        c, h, w = (int(v) for v in latent_shape)
        spec = PRESETS[preset]
        factor = 2 ** (len(spec["block_out_channels"]) - 1)
        if h % factor or w % factor:
            raise UsageError(f"corrector preset {preset!r} downsamples by {factor}; latents {h}x{w} are not divisible")
        unet = {**{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
                "sample_size": h, "in_channels": c, "out_channels": c}
        return cls(unet)

    @property
    def config(self) -> dict[str, Any]:
        """The kwargs that rebuild this module (saved in config.json, read by ``load_pretrained``)."""
        return {"unet": self.unet_config, "timestep_scale": self.timestep_scale}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        ts = t.to(x.device, torch.float32).reshape(-1).expand(x.shape[0]) * self.timestep_scale
        return self.unet(x, ts).sample


@dataclass(frozen=True)
class CorrectionReport:
    n_noises: int
    parameters: int
    transformer_parameters: int

    @property
    def relative_size(self) -> float:
        return self.parameters / max(1, self.transformer_parameters)


def _build_corrector(preset: str, latent_shape: tuple[int, ...]) -> LatentNoiseFlow:
    return LatentNoiseFlow.from_preset(preset, latent_shape)


def _describe(inv: dict[str, Any], noises: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    """correct.json's t2i entries: the pipeline, the latent shape, the conditioning the noises were inverted
    with, and the corrector's size next to the transformer's."""
    return {"model": inv["model"], "latent_shape": list(noises.shape[1:]),
            "conditioning": "captions" if inv.get("captions") else "empty prompt",
            "parameters": sum(p.numel() for p in model.parameters()),
            "transformer_parameters": transformer_parameters(inv["model"])}


NOISE_MODELS = NoiseModels(app="t2i", model_class=LatentNoiseFlow, build=_build_corrector, presets=tuple(PRESETS),
                           defaults={"preset": "small", "batch_size": 16, "lr": 5e-4}, describe=_describe)
"""The t2i app's correctors (:class:`LatentNoiseFlow` presets), by default "small" at batch 16, lr 5e-4."""


def correction_config(**settings: Any) -> CorrectionConfig:
    """The t2i app's :class:`~pgraft.core.noise_correction.CorrectionConfig`: its defaults, ``settings`` over them."""
    return NOISE_MODELS.config(**settings)


def correction_report(meta: dict[str, Any]) -> CorrectionReport:
    """The corrector's size and noise count recorded in a correct.json."""
    return CorrectionReport(int(meta["n_noises"]), int(meta["parameters"]), int(meta["transformer_parameters"]))


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Flops:
    """FLOPs per image of the sampler (VAE decode excluded, the same either way): the base's
    ``base_calls`` guided transformer evaluations, the corrector's ``noise_calls`` evaluations, each
    evaluation counted by :func:`pgraft.core.inversion.count_flops` on one image."""

    base_per_call: int
    base_calls: int
    noise_per_call: int
    noise_calls: int

    @property
    def base(self) -> int:
        return self.base_per_call * self.base_calls

    @property
    def noise(self) -> int:
        return self.noise_per_call * self.noise_calls

    @property
    def corrected(self) -> int:
        return self.base + self.noise

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "base": self.base, "noise": self.noise, "corrected": self.corrected,
                "ratio": self.corrected / max(1, self.base)}


@dataclass(frozen=True)
class CorrectedSamples:
    images: torch.Tensor  # [n, 3, H, W] in [-1, 1], CPU
    noises: torch.Tensor  # [n, C, h, w]: the base sampler's starting latents (after the corrector)
    flops: Flops


@torch.no_grad()
def sample_corrected(pipe: FlowT2IPipeline, noise_model: nn.Module | None, prompts: Sequence[str], steps: int,
                     noise_steps: int, guidance_scale: float | None = None, seed: int = 0, batch_size: int = 8,
                     show_progress: bool = True, device: torch.device | str | None = None) -> CorrectedSamples:
    """One image per prompt: z ~ N(0, I) -> ``noise_steps`` Euler steps of the corrector on its own uniform
    grid (0 or no corrector: the plain base) -> ``steps`` Euler steps of the base on the pipeline's grid, with
    classifier-free guidance on the prompt (``guidance_scale``; default the pipeline's) -> VAE decode.

    z is drawn on the CPU for all images at once, so a seed gives the same starting noise on any device
    and batch size. FLOPs are counted from the model calls the sampler made (per batch) times the FLOPs of
    one such call on one image."""
    if steps < 1 or noise_steps < 0:
        raise UsageError(f"need steps >= 1 and noise steps >= 0, got {steps}, {noise_steps}")
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts to sample")
    device = torch.device(device) if device is not None else local_device()
    w = pipe.info.guidance_scale if guidance_scale is None else float(guidance_scale)
    base = Guided(pipe.denoiser.to(device), w)
    use_noise = noise_model is not None and noise_steps > 0
    counter = Counted(noise_model.to(device)) if use_noise else None
    encoder = pipe.prompt_encoder()
    times = pipe.times(steps)
    z_all = torch.randn((len(prompts), *pipe.state_shape), generator=torch.Generator().manual_seed(seed))
    images, starts, batches = [], [], 0
    with progress_bar(len(prompts), "sample (corrected)" if use_noise else "sample (base)", show_progress) as advance:
        for i in range(0, len(prompts), batch_size):
            z = z_all[i:i + batch_size].to(device)
            z = correct_noise(counter, z, noise_steps if use_noise else 0)
            cond = encoder(prompts[i:i + batch_size], guidance=w != 1.0)
            x0 = FlowBase(base, times, tuple(pipe.state_shape)).sample(z, cond)
            images.append(pipe.decode(x0))
            starts.append(z.cpu())
            batches += 1
            advance(len(z))
    base_calls, noise_calls = base.calls // batches, counter.calls // batches if use_noise else 0
    example, t1 = z_all[:1].to(device), torch.ones(1, device=device)
    one = encoder(prompts[:1], guidance=w != 1.0)  # a guided call runs the doubled batch: counted as it runs
    flops = Flops(base_per_call=count_flops(lambda: base.model(example, t1, one, guidance_scale=w)),
                  base_calls=base_calls, noise_calls=noise_calls,
                  noise_per_call=count_flops(lambda: noise_model(example, t1, None)) if use_noise else 0)
    return CorrectedSamples(torch.cat(images), torch.cat(starts), flops)


__all__ = ["CORRECT_META", "INVERT_META", "NOISE_MODELS", "PRESETS", "CorrectionReport", "CorrectedSamples", "Counted",
           "Flops", "Guided", "ImageSource", "InvertConfig", "InvertReport", "LatentNoiseFlow", "correction_config",
           "correction_report", "flow_model_lacks", "invert_images", "invert_latents", "inversion_report",
           "load_flow_pipeline", "read_captions", "sample_corrected", "transformer_parameters"]
