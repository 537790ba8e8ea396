"""Text-to-image at scale, per pipeline family, precision and method: sampling images/s, LoRA training steps/s
and the seconds and peak accelerator memory of one round of GRAFT, P-GRAFT or DiffusionNFT at an equal number
of sampled images, on each family's REAL transformer and VAE configuration
with random weights (SD3.5-medium, FLUX.1-dev, Qwen-Image, SANA-1.6B: benchmarks/configs/t2i_scale/*.json,
each naming its source) when no weights are present.

    python benchmarks/t2i_scale.py                       # real configs (needs a GPU: ~80 GB for Qwen-Image bf16)
    python benchmarks/t2i_scale.py --tiny                # tiny configs on the CPU, < 2 minutes
    python benchmarks/t2i_scale.py --families flux,sana --precisions bf16
    python benchmarks/t2i_scale.py --tiny --methods graft,pgraft,nft   # the three rows per cell, on the CPU

What is timed is the part that scales: the transformer and the VAE, through the family adapters of
``pgraft.apps.t2i.pipelines`` (the same velocity, grid and decode the app runs). Prompt embeddings are
random tensors of the family's text shape (tokens x dim, pooled, mask): a run embeds each prompt once and
releases the text encoders (``prepare_flow_training``), so they are not part of a round's cost.

Cells: sampling = ``--images`` images, ``--steps`` Euler steps on the family's grid with its default
guidance, then chunked VAE decoding; training = LoRA (rank ``--rank``, the family's attention targets,
AdamW, fp32 adapters over frozen ``precision`` weights, gradient checkpointing on the real configs) on the
linear-flow loss, batch ``--batch``. One round of a method (``--methods``; default all three on the real
configs, P-GRAFT alone with ``--tiny``, the committed CPU rows) = sampling ``--images`` images + decoding
+ ``--train-steps`` LoRA updates of batch ``--batch``, its peak memory measured from a reset
(``torch.cuda.max_memory_allocated``; NaN on the CPU); rewards and selection are not timed (alike for all):

- ``graft``: the head samples the whole grid; updates on the linear-flow loss from the clean latents;
- ``pgraft``: the split sampler (head T -> t = 0.5, base t -> 0); updates on the flow bridge from X_t;
- ``nft``: the head samples the whole grid; DiffusionNFT updates (:func:`pgraft.core.nft.nft_minibatch_loss`,
  beta 1, optimality weights drawn in [0, 1]), each with the round's frozen-policy prediction v_old at the
  update's draw (one extra no-gradient transformer call, as ``run_nft`` computes it before the updates).

``train_steps_per_s`` is the method's own update (the flow loss for GRAFT / P-GRAFT, the NFT loss with its
v_old call for NFT); ``sample_images_per_s`` is the base's sampler, shared by a cell's rows.

Writes one row per (family, precision, config, device, method) to ``--out`` (default
docs/results/t2i_scale.csv; rows written before the method column are P-GRAFT's) as soon as it is measured
and skips rows already there (resumable); prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from pgraft.apps.t2i.flow_pipeline import PRECISIONS, FlowDenoiser
from pgraft.apps.t2i.model import PromptBatch
from pgraft.apps.t2i.pipelines import FAMILIES
from pgraft.core.bridges import LinearFlowPath
from pgraft.core.cli import script_boundary
from pgraft.core.heads import apply_lora
from pgraft.core.losses import flow_matching_loss
from pgraft.core.nft import minibatch_draw, nft_minibatch_loss
from pgraft.core.sampling import euler_step, sample_split
from pgraft.core.schedules import split_times
from pgraft.core.state import atomic_write, read_table

CONFIGS = Path(__file__).parent / "configs" / "t2i_scale"
REAL = {"sd3": "sd3.5-medium", "flux": "flux.1-dev", "qwen_image": "qwen-image", "sana": "sana-1.6b"}
_KL = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32], norm_num_groups=8,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
# the tiny configs of tests/t2i (test_sd3_flow.py, test_families_tiny.py): same code paths, seconds on a CPU
TINY = {
    "sd3": {"name": "SD3 tiny", "family": "sd3", "image_size": 16, "guidance_scale": 4.5,
            "text": {"tokens": 24, "dim": 32, "pooled": 32, "mask": False},
            "transformer": {"_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
                            "out_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                            "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 32,
                            "pos_embed_max_size": 8},
            "vae": {"_class_name": "AutoencoderKL", **_KL, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            "scheduler": {"shift": 3.0}},
    "flux": {"name": "FLUX tiny", "family": "flux", "image_size": 16, "guidance_scale": 1.0,
             "text": {"tokens": 24, "dim": 32, "pooled": 32, "mask": False},
             "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16,
                             "out_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                             "guidance_embeds": True, "axes_dims_rope": [4, 4, 8]},
             "vae": {"_class_name": "AutoencoderKL", **_KL, "scaling_factor": 0.3611, "shift_factor": 0.1159},
             "scheduler": {"shift": 3.0, "use_dynamic_shifting": True}},
    "qwen_image": {"name": "Qwen-Image tiny", "family": "qwen_image", "image_size": 32, "guidance_scale": 4.0,
                   "text": {"tokens": 24, "dim": 16, "pooled": 0, "mask": True},
                   "transformer": {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 16,
                                   "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
                                   "num_attention_heads": 3, "joint_attention_dim": 16, "guidance_embeds": False,
                                   "axes_dims_rope": [8, 4, 4]},
                   "vae": {"_class_name": "AutoencoderKLQwenImage", "base_dim": 24, "z_dim": 4, "dim_mult": [1, 2, 4],
                           "num_res_blocks": 1, "temperal_downsample": [False, True], "latents_mean": [0.0] * 4,
                           "latents_std": [1.0] * 4},
                   "scheduler": {"shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
                                 "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}},
    "sana": {"name": "SANA tiny", "family": "sana", "image_size": 32, "guidance_scale": 4.5,
             "text": {"tokens": 24, "dim": 8, "pooled": 0, "mask": True},
             "transformer": {"_class_name": "SanaTransformer2DModel", "patch_size": 1, "in_channels": 4,
                             "out_channels": 4, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 4,
                             "num_cross_attention_heads": 2, "cross_attention_head_dim": 4, "cross_attention_dim": 8,
                             "caption_channels": 8, "sample_size": 16},
             "vae": {"_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 4, "attention_head_dim": 2,
                     "encoder_block_types": ["ResBlock", "EfficientViTBlock"],
                     "decoder_block_types": ["ResBlock", "EfficientViTBlock"], "encoder_block_out_channels": [8, 8],
                     "decoder_block_out_channels": [8, 8], "encoder_qkv_multiscales": [[], [5]],
                     "decoder_qkv_multiscales": [[], [5]], "encoder_layers_per_block": [1, 1],
                     "decoder_layers_per_block": [1, 1], "downsample_block_type": "conv",
                     "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
                     "scaling_factor": 0.41407},
             "scheduler": {"shift": 3.0}},
}
COLUMNS = ["family", "model", "config", "precision", "device", "method", "image_size", "images", "steps",
           "sample_images_per_s", "train_steps_per_s", "round_seconds", "peak_memory_gib", "transformer_params_m"]
METHODS = ("graft", "pgraft", "nft")
PGRAFT_SPLIT = 0.5  # P-GRAFT's t: the head samples T -> 0.5, the base 0.5 -> 0


def _component(config: dict, device: torch.device, dtype: torch.dtype):
    import diffusers

    config = {k: v for k, v in config.items() if k not in ("note",)}
    cls = getattr(diffusers, config.pop("_class_name"))
    with torch.device(device):  # random init in place (no CPU copy of a 20B-parameter model)
        return cls.from_config(config).to(dtype).eval().requires_grad_(False)


def _vae_scale(vae) -> int:
    if hasattr(vae.config, "temperal_downsample"):
        return 2 ** len(vae.config.temperal_downsample)
    if hasattr(vae.config, "encoder_block_out_channels"):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build(spec: dict, precision: str, device: torch.device):
    """(denoiser, pipe-like namespace, latent shape, a condition maker) of a family spec with random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = FAMILIES[spec["family"]]
    dtype = PRECISIONS[precision]
    transformer = _component(spec["transformer"], device, dtype)
    vae = _component(spec["vae"], device, dtype)
    scheduler_config = {k: v for k, v in spec["scheduler"].items() if not k.startswith(("_", "note"))}
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    pipe = SimpleNamespace(transformer=transformer, vae=vae, scheduler=scheduler, vae_scale_factor=_vae_scale(vae),
                           default_sample_size=spec["image_size"] // _vae_scale(vae))
    shape = fam.latent_shape(pipe, spec["image_size"])
    mu = fam.mu(pipe, shape)
    denoiser = FlowDenoiser.from_transformer(transformer, 1000, spec["guidance_scale"], family=fam.name)
    text = spec["text"]

    def cond(n: int, seed: int = 0) -> PromptBatch:
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(n, text["tokens"], text["dim"], generator=g)
        pooled = torch.randn(n, text["pooled"], generator=g) if text["pooled"] else None
        mask = torch.ones(n, text["tokens"], dtype=torch.long) if text["mask"] else None
        guided = spec["guidance_scale"] != 1.0
        unc = torch.randn(1, text["tokens"], text["dim"], generator=g) if guided else None
        unc_pooled = torch.randn(1, text["pooled"], generator=g) if guided and text["pooled"] else None
        unc_mask = torch.ones(1, text["tokens"], dtype=torch.long) if guided and text["mask"] else None
        return PromptBatch([""] * n, emb.to(device), None if unc is None else unc.to(device),
                           None if pooled is None else pooled.to(device),
                           None if unc_pooled is None else unc_pooled.to(device),
                           None if mask is None else mask.to(device), None if unc_mask is None else unc_mask.to(device))

    return denoiser, pipe, shape, mu, cond


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(spec: dict, precision: str, device: torch.device, images: int, steps: int, batch: int, rank: int,
            train_steps: int, checkpointing: bool, methods: tuple[str, ...] = ("pgraft",)) -> Iterator[dict]:
    """One row per method, yielded as soon as it is measured: sampling images/s (the cell's), the method's
    training steps/s, and its round's seconds and peak memory, each method with a fresh LoRA head."""
    fam = FAMILIES[spec["family"]]
    torch.manual_seed(0)
    denoiser, pipe, shape, mu, cond = build(spec, precision, device)
    times = fam.grid(pipe.scheduler, steps, mu)
    c = cond(images)
    decode = lambda x: torch.cat([fam.from_latents(pipe.vae, x[i:i + 2]) for i in range(0, len(x), 2)])  # noqa: E731
    x_T = torch.randn(images, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():  # warm-up (kernels, allocator), then timed
        sample_split(denoiser, denoiser, x_T[:1], times[:2], 1, euler_step, cond(1))
        _sync(device)
        t0 = time.perf_counter()
        x0 = sample_split(denoiser, denoiser, x_T, times, len(times) - 1, euler_step, c).x_0
        decode(x0)
        _sync(device)
    sample_ips = images / (time.perf_counter() - t0)
    if checkpointing:
        denoiser.transformer.enable_gradient_checkpointing()
    cb = cond(batch)
    for method in methods:
        head = apply_lora(copy.deepcopy(denoiser).requires_grad_(True).train(), rank, rank, fam.lora_targets)
        train_step = _update(method, head)
        train_step(x0[:batch].float(), cb, 0.0, 0)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for i in range(train_steps):
            loss = train_step(x0[:batch].float(), cb, 0.0, i + 1)
        _sync(device)
        train_sps = train_steps / (time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{spec['name']} {precision} {method}: non-finite training loss {loss}")

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        head.eval()
        with torch.no_grad():  # the round's sampling: the split sampler for P-GRAFT, the head alone otherwise
            split = split_times(times, PGRAFT_SPLIT) if method == "pgraft" else None
            out = sample_split(head, denoiser, x_T, times, len(times) - 1 if split is None else split.index,
                               euler_step, c)
            decode(out.x_0)
        head.train()
        t_start = 0.0 if split is None else float(times[split.index])
        for i in range(train_steps):
            train_step(out.x_t[:batch].float(), cb, t_start, 100 + i)
        _sync(device)
        round_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        yield ({"family": fam.name, "model": spec["name"], "precision": precision, "device": _device_name(device),
               "method": method, "image_size": spec["image_size"], "images": images, "steps": steps,
               "sample_images_per_s": sample_ips, "train_steps_per_s": train_sps, "round_seconds": round_s,
               "peak_memory_gib": peak,
               "transformer_params_m": sum(p.numel() for p in denoiser.transformer.parameters()) / 1e6})
        del head, train_step  # the next method's head starts from the base, with this one's memory released
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _velocity(model, x: torch.Tensor, s: torch.Tensor, cond: PromptBatch) -> torch.Tensor:
    """The conditional velocity (guidance 1) every method trains, as the app's losses call it."""
    return model(x, s, cond, guidance_scale=1.0)


def _update(method: str, head):
    """``step(x, cond, t_start, seed) -> loss`` of ``method``: one AdamW update of ``head``'s LoRA parameters on
    the linear-flow loss from ``t_start`` (GRAFT, P-GRAFT) or on DiffusionNFT's loss (``t_start`` unused: NFT
    noises the clean latents), its draws from ``seed``."""
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-5)

    def flow_loss(x, cc, t_start, gen):
        return flow_matching_loss(lambda x_s, s, c: _velocity(head, x_s, s, c), x, t_start, cc, gen)

    def nft_loss(x, cc, t_start, gen):
        w = torch.rand(len(x), generator=gen).to(x.device)  # optimality weights (no reward is timed)
        drawn = minibatch_draw(LinearFlowPath(), x, gen)
        head.eval()
        with torch.no_grad():  # v_old: the round-start policy at this draw (run_nft computes it before the updates)
            v_old = _velocity(head, drawn.x_t, drawn.t, cc)
        head.train()
        return nft_minibatch_loss(head, v_old, drawn, w, cc, 1.0, _velocity)

    loss_of = nft_loss if method == "nft" else flow_loss

    def step(x, cc, t_start: float, seed: int) -> float:
        loss = loss_of(x, cc, t_start, torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (< 2 minutes)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--precisions", default=None, help="default: fp32,bf16 (tiny), bf16 (real)")
    parser.add_argument("--methods", default=None, help=f"of {','.join(METHODS)}; default: pgraft (tiny), all (real)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/t2i_scale.csv"))
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    args = parser.parse_args(argv)
    tiny = args.tiny
    device = torch.device("cpu") if tiny or not torch.cuda.is_available() else torch.device("cuda")
    precisions = (args.precisions or ("fp32,bf16" if tiny else "bf16")).split(",")
    settings = dict(images=args.images or (4 if tiny else 4), steps=args.steps or (4 if tiny else 20),
                    batch=args.batch or (2 if tiny else 1), rank=args.rank or (2 if tiny else 32),
                    train_steps=args.train_steps or (2 if tiny else 3), checkpointing=not tiny)
    methods = tuple((args.methods or ("pgraft" if tiny else ",".join(METHODS))).split(","))
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"error: --methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    # the rows measured so far (a rerun skips them); a damaged file is refused, not measured over
    done = (read_table(args.out, columns=["model"], text=["family", "config", "precision", "device"],
                       name=f"--out {args.out}", what="t2i_scale table",
                       fix="restore it, or give another --out (its rows are the cells measured so far)")
            if args.out.is_file() else pd.DataFrame(columns=COLUMNS))
    if "method" not in done.columns:  # rows written before the method column: P-GRAFT rounds
        done["method"] = "pgraft"
    rows = done.to_dict("records")
    config = "tiny" if tiny else "real"
    for name in args.families.split(","):
        if name not in FAMILIES:
            raise SystemExit(f"error: --families: unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        spec = TINY[name] if tiny else json.loads((CONFIGS / f"{REAL[name]}.json").read_text())
        for precision in precisions:
            if precision not in PRECISIONS:
                raise SystemExit(f"error: --precisions: unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
            key = (name, config, precision, _device_name(device))
            todo = tuple(m for m in methods
                         if not any((r["family"], r["config"], r["precision"], r["device"], r["method"]) == (*key, m)
                                    for r in rows))
            if not todo:
                continue  # measured already: resumable
            for row in measure(spec, precision, device, methods=todo, **settings):
                row = {"config": config, **row}
                rows.append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                table = pd.DataFrame(rows, columns=COLUMNS)
                atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
                print(f"{row['model']:>16} {precision:>5} {row['method']:>6}: {row['sample_images_per_s']:.2f} images/s, "
                      f"{row['train_steps_per_s']:.2f} steps/s, round {row['round_seconds']:.1f} s, "
                      f"peak {row['peak_memory_gib']:.1f} GiB", flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":   # a refusal (a damaged --out table) or a stop: one line
    sys.exit(script_boundary(main))
