"""Self-training drift check for the t2i app (a diagnostic, not a benchmark table).

Fine-tunes the base pipeline's UNet (LoRA rank 8 on the attention, the app's P-GRAFT loss at t = 0)
on ONE fixed data set, then measures the exact checker's accuracy on 4 images for each of 48
training prompts (same seed for every run). Data sets: fresh renders of the training prompts
(ground truth), or the base's own samples drawn with a given number of DDIM steps. If fine-tuning on
renders helps but on own samples hurts, the loss and optimiser are sound and the loss comes from the
samples themselves, i.e. the self-training loop.

    python benchmarks/diagnostics/t2i_self_training.py --data base          # accuracy of the base
    python benchmarks/diagnostics/t2i_self_training.py --data renders --n 1184
    python benchmarks/diagnostics/t2i_self_training.py --data own --sample-steps 60 --per-prompt 4
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pgraft.apps.t2i.checker import check  # noqa: E402
from pgraft.apps.t2i.model import UNET_ATTENTION, T2IPipeline  # noqa: E402
from pgraft.apps.t2i.prompts import load_prompts  # noqa: E402
from pgraft.apps.t2i.train import make_problem, sample_images  # noqa: E402
from pgraft.apps.t2i.world import render_dataset, to_float  # noqa: E402
from pgraft.core.trainer import GraftConfig, build_head, generator_for, merged_copy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/t2i/base")
    p.add_argument("--data", choices=("base", "renders", "own"), required=True)
    p.add_argument("--n", type=int, default=1184, help="renders to fine-tune on (--data renders)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the own samples (--data own)")
    p.add_argument("--per-prompt", type=int, default=8, help="own samples per training prompt (--data own)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the evaluation samples")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    pipe = T2IPipeline.load(args.base)
    prompts = load_prompts("train").prompts
    evaluated = prompts[::3][:48]

    def accuracy(model) -> float:
        images, plist = sample_images(pipe, model, evaluated, 4, 0.0, args.eval_steps, 1.0, seed=5,
                                      show_progress=False)
        return check(images, plist).float().mean().item()

    if args.data == "base":
        print(f"base accuracy {accuracy(pipe.denoiser):.4f}  [{time.time() - t0:.0f}s]")
        return
    if args.data == "renders":
        images, captions = render_dataset(prompts, args.n, pipe.info.image_size, 7)
        x = pipe.encode_images(to_float(images))
        cond_index = torch.tensor([prompts.index(c) for c in captions])
    else:
        images, plist = sample_images(pipe, pipe.denoiser, prompts, args.per_prompt, 0.0, args.sample_steps, 1.0,
                                      seed=9, show_progress=False)
        print(f"own samples ({args.sample_steps} steps): checker accuracy {check(images, plist).float().mean():.4f}")
        x = pipe.encode_images(images)
        cond_index = torch.arange(len(prompts)).repeat_interleave(args.per_prompt)
    problem = make_problem(pipe, prompts, None, args.eval_steps, 1.0)
    torch.manual_seed(0)  # LoRA's A initialisation draws from the global generator
    head = build_head(pipe.denoiser, GraftConfig(lora_rank=8, lora_targets=UNET_ATTENTION))
    opt = torch.optim.AdamW([q for q in head.parameters() if q.requires_grad], lr=args.lr)
    for step in range(args.steps):
        gen = generator_for(0, step)
        idx = torch.randint(len(x), (32,), generator=gen)
        loss = problem.loss(head, x[idx], 0.0, problem.cond_batch(cond_index[idx]), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"fine-tuned on {args.data} ({len(x)} images): accuracy {accuracy(merged_copy(head).eval()):.4f}  "
          f"[{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
