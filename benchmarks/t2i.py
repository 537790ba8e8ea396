"""Text-to-image benchmark: base, GRAFT Top-2 of M, P-GRAFT (Top-2 of M) at t = 0.25 / 0.5 / 0.75 and the
DDPO-style policy-gradient baseline (plus, on request, GRAFT BoN and the no-selection control
``sft_all``), every method trained once per training seed at the same budget of generated images
(rounds × groups × M), on the embedded shapes world's base pipeline with the learned VQA-style reward
and the trust-region anchor of ``pgraft t2i train`` (``--anchor``, default 5).

    pgraft t2i pretrain --out runs/t2i/base          # the base pipeline (~45 min on one core); required
    pgraft t2i train-scorer --out runs/t2i/scorer    # the learned reward (~3-8 min); required
    python benchmarks/t2i.py --seeds 0,1,2           # default methods, 3 training seeds
    python benchmarks/t2i.py --seeds 0,1,2 --per-prompt 18 --methods base,sft_all,graft_bon,graft_topk,pgraft_0.25,pgraft_0.5,pgraft_0.75,pg,grpo
    python benchmarks/t2i.py --report                # aggregate the finished cells
    python benchmarks/t2i.py --quick --seeds 0,1 --out /tmp/t2i_quick   # tiny budget smoke (needs --base too)

Every method fine-tunes (LoRA on the UNet attention, as ``pgraft t2i train``) on the *train* prompt
split (148 prompts) with reward ``vqa`` (``--reward checker``: the exact checker, an oracle
ablation) and is evaluated on the *held-out* split (62 prompts: unseen combinations of seen words),
``--per-prompt`` images each, drawn with the evaluation seed shared by every method trained with the
same seed (benchmarks/harness.py), so the images of two methods start from the same noise. Metrics:
the learned reward (``reward``), the exact checker's accuracy over all held-out images
(``accuracy``, the checker reward's mean), GenEval's ``overall`` (the mean of the per-category
accuracies) and each category's accuracy.

How precise one cell is (binomial, at the worst case p = 0.5; n = 62 × per-prompt held-out images):

    --per-prompt   n images   SE of accuracy = sqrt(p(1-p)/n)   SE of GenEval overall (5 categories)
    2 (--quick)       124          0.045                             0.102
    4 (default)       248          0.032                             0.072
    8                 496          0.022                             0.051
    16                992          0.016                             0.036
    18               1116          0.015                             0.034
    20               1240          0.014                             0.032

so ``--per-prompt 18`` is the least that gets one standard error of a cell's accuracy to 0.015.
GenEval's overall weighs the held-out categories equally although they hold 43, 14, 2, 2 and 1
prompts, so its standard error is about twice as large (0.015 needs ~94 images per prompt). The
paired differences and CIs in verdicts.txt are over training seeds and include this noise.

Cost (the default preset on one shared CPU core, measured with a random-weight base): a fine-tuning
cell at the defaults takes roughly 5 min of CPU (~75 s per round, ~15 s per 62 held-out images),
the base cell about 1 min; ``--per-prompt 18`` adds about 3-4 min to every cell.

Cells (method × seed) are resumable (GRAFT runs continue from their last round). Writes seeds.csv
(long format), summary.csv (mean, 95% CI), verdicts.txt and t2i_seeds.png in --out, plus
t2i_rounds.png (the training candidates' learned reward and checker accuracy per round, mean over
seeds), t2i_grid.png (rows = the first held-out prompt of each category, columns = methods, first
seed: every image from the same noise) and, per cell, samples.csv (per held-out image: prompt,
reward, category, verdict) and grid.safetensors.

P-GRAFT's t is the fraction of sampler steps left to the frozen base (0 = GRAFT). The PG baseline
samples every step with its policy (DDIM(eta), classifier-free guidance, as GRAFT's head) and is
trained on the log-density of those steps (:func:`pgraft.apps.t2i.train.log_prob`); it has no anchor.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import harness  # noqa: E402
import pandas as pd  # noqa: E402
from harness import Benchmark, Cell, Comparison, Method, Metric  # noqa: E402

from pgraft.apps.t2i import DEFAULT_ANCHOR  # noqa: E402
from pgraft.apps.t2i.model import UNET_ATTENTION  # noqa: E402
from pgraft.apps.t2i.prompts import load_prompts  # noqa: E402
from pgraft.apps.t2i.rewards import make_reward  # noqa: E402
from pgraft.apps.t2i.train import (  # noqa: E402
    APP,
    T2IConfig,
    evaluate_images,
    load_pipeline,
    log_prob,
    recorded_problem,
    sample_images,
    train_t2i,
)
from pgraft.apps.t2i.world import CATEGORIES  # noqa: E402
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.integrity import sha256_file  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.state import default_device, load_state, read_json, save_state  # noqa: E402
from pgraft.core.trainer import GraftConfig  # noqa: E402

REWARD = "vqa"  # the learned reward every method is evaluated with (and trained with, by default)
BASE_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"  # the base's main weights file (its identity)
SCORER_WEIGHTS = "model.safetensors"
TOP2 = {"rule": "topk", "k": 2}
T_VALUES = (0.25, 0.5, 0.75)

METHODS = {
    "base": Method("base", "base", "base"),
    # control: the same self-training with no selection, to separate selection from drift
    # (threshold -1: both rewards lie in [0, 1])
    "sft_all": Method("sft_all", "SFT on all samples (no selection)", "graft",
                      {"grs": {"rule": "threshold", "threshold": -1.0}, "t": 0.0}),
    "graft_bon": Method("graft_bon", "GRAFT BoN (1 of M)", "graft", {"grs": {"rule": "bon"}, "t": 0.0}),
    "graft_topk": Method("graft_topk", "GRAFT Top-2 of M", "graft", {"grs": TOP2, "t": 0.0}),
    **{f"pgraft_{t}": Method(f"pgraft_{t}", f"P-GRAFT t={t} (Top-2 of M)", "graft", {"grs": TOP2, "t": t})
       for t in T_VALUES},
    "pg": Method("pg", "policy gradient (DDPO-style)", "pg"),
    # Flow-GRPO's trust term: the same group-relative advantages plus KL(policy || base) at beta 0.04
    "grpo": Method("grpo", "GRPO (group advantages, KL 0.04)", "pg", {"kl": 0.04}),
}
DEFAULT_METHODS = ["base", "graft_topk", *[f"pgraft_{t}" for t in T_VALUES], "pg", "grpo"]
METRICS = {
    "reward": Metric(f"held-out reward ({REWARD})", digits=4),
    "accuracy": Metric("held-out accuracy (checker)"),
    "overall": Metric("GenEval overall (category mean)"),
    **{c: Metric(f"acc. {c}") for c in CATEGORIES},
}
COMPARISONS = [Comparison(a, b, metric) for metric in ("accuracy", "reward", "overall") for a, b in [
    *[(f"pgraft_{t}", "graft_topk") for t in T_VALUES],
    *[(f"pgraft_{t}", "pg") for t in T_VALUES],
    *[(f"pgraft_{t}", "grpo") for t in T_VALUES],
    ("graft_topk", "base"),
]]


def add_args(ap) -> None:
    ap.set_defaults(methods=",".join(DEFAULT_METHODS))
    ap.add_argument("--base", type=Path, default=Path("runs/t2i/base"),
                    help="base pipeline directory: the output of `pgraft t2i pretrain` (required; nothing is "
                         "pretrained here)")
    ap.add_argument("--scorer", type=Path, default=Path("runs/t2i/scorer"),
                    help="the learned VQA reward: the output of `pgraft t2i train-scorer` (required: every method "
                         "is evaluated with it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", type=int, default=16, help="prompts per round")
    ap.add_argument("--m", type=int, default=8, help="images per prompt (group size M)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reward", default=REWARD, choices=[REWARD, "checker"],
                    help="training reward (evaluation always reports both): the learned scorer, or the exact "
                         "checker as an oracle ablation")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's)")
    ap.add_argument("--cond-dropout", type=float, default=0.0,
                    help="fine-tuning also trains the unconditional eps on this fraction of accepted images")
    ap.add_argument("--replay", action="store_true", help="GRAFT / P-GRAFT train on every accepted image so far")
    ap.add_argument("--anchor", type=float, default=DEFAULT_ANCHOR,
                    help="GRAFT / P-GRAFT trust region: weight of the squared head-base difference (0 = off; "
                         "the default is `pgraft t2i train`'s)")
    ap.add_argument("--lora", type=int, default=8, help="LoRA rank on the UNet attention (0 = full fine-tune)")
    ap.add_argument("--n-steps", type=int, default=20, help="DDIM sampler steps")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0: P-GRAFT's tail and PG need noise)")
    ap.add_argument("--sample-batch-size", type=int, default=64)
    ap.add_argument("--pg-clip", type=float, default=0.2)
    ap.add_argument("--pg-timestep-fraction", type=float, default=0.25)
    ap.add_argument("--per-prompt", "--eval-per-prompt", dest="per_prompt", type=int, default=4,
                    help="held-out images per prompt (62 prompts); 18 gets one standard error of a cell's "
                         "accuracy to 0.015 (see the table above)")


def quick(args) -> None:
    if args.out == Path("runs/bench/t2i"):
        args.out = args.out / "quick"
    args.rounds, args.groups, args.m, args.train_steps, args.batch_size = 2, 4, 4, 10, 8
    args.n_steps, args.per_prompt, args.lr = 10, 2, 1e-3


def _sha256(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def require_inputs(args) -> None:
    """Refuse in one line when --base or --scorer does not hold what the benchmark needs."""
    lack = APP.lacks(args.base) if args.base.is_dir() else "it does not exist"
    if lack is not None:
        raise SystemExit(f"error: --base {args.base} holds no pretrained pipeline ({lack}); run "
                         f"`pgraft t2i pretrain --out {args.base}` first (or pass --base DIR)")
    if not (args.scorer / SCORER_WEIGHTS).is_file():
        raise SystemExit(f"error: --scorer {args.scorer} holds no learned VQA reward (no {SCORER_WEIGHTS}); run "
                         f"`pgraft t2i train-scorer --out {args.scorer}` first (or pass --scorer DIR)")


def describe(args) -> dict:
    if args.per_prompt < 1:
        raise SystemExit(f"error: --per-prompt must be at least 1, got {args.per_prompt}")
    if not args.report:
        require_inputs(args)
    settings = {k: getattr(args, k) for k in (
        "base", "scorer", "rounds", "groups", "m", "train_steps", "batch_size", "lr", "reward", "guidance",
        "cond_dropout", "replay", "anchor", "lora", "n_steps", "eta", "sample_batch_size", "pg_clip",
        "pg_timestep_fraction", "per_prompt", "quick")}
    # the weights' identities: cells made with another base or scorer are refused
    settings["base_sha256"] = _sha256(args.base / BASE_WEIGHTS)
    settings["scorer_sha256"] = _sha256(args.scorer / SCORER_WEIGHTS)
    return settings


def grid_prompts(categories: list[str | None]) -> list[int]:
    """Indices of the first held-out prompt of each category (rows of the side-by-side grid)."""
    first: dict[str, int] = {}
    for i, c in enumerate(categories):
        first.setdefault(str(c), i)
    return [first[c] for c in CATEGORIES if c in first]


class Context:
    """The base pipeline (loaded once per process), the weights' digests, the held-out prompts and
    the learned reward they are scored with."""

    def __init__(self, args):
        require_inputs(args)
        self.args = args
        self.pipe = load_pipeline(args.base, args.guidance)
        self.base_sha256 = _sha256(args.base / BASE_WEIGHTS)
        self.scorer_sha256 = _sha256(args.scorer / SCORER_WEIGHTS)
        self.held = load_prompts("heldout")
        self.train_prompts = load_prompts("train").prompts
        self.eval_reward = make_reward(REWARD, args.scorer)
        self.app = T2IConfig(model=str(args.base), prompts="train", reward=args.reward,
                             reward_weights=str(args.scorer) if args.reward == REWARD else None,
                             n_steps=args.n_steps, eta=args.eta, guidance_scale=args.guidance,
                             cond_dropout=args.cond_dropout)


def run_cell(ctx: Context, method: Method, seed: int, cell_dir: Path) -> Cell:
    args, pipe, app = ctx.args, ctx.pipe, ctx.app
    run_dir = cell_dir / "run"
    show = not args.quiet
    head, split, sampled = pipe.denoiser, 0.0, 0
    from diffusers import UNet2DConditionModel  # the network: guided sampling counts both halves of the batch

    # train_t2i builds its own problem, so a resumed GRAFT cell's count is marked incomplete
    resume = harness.resumable(method, run_dir)
    with harness.count_compute(UNet2DConditionModel, ledger=cell_dir / "compute.json", resume=resume) as compute:
        if method.kind == "graft":
            # `pgraft t2i train` with the benchmark's budget (LoRA targets: the app's default)
            split = method.params["t"]
            cfg = GraftConfig(rounds=args.rounds, groups=args.groups, group_size=args.m,
                              grs=GRSConfig(**method.params["grs"]), split=split, train_steps=args.train_steps,
                              batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora,
                              sample_batch_size=args.sample_batch_size, replay=args.replay, anchor=args.anchor,
                              final_eval=False, seed=seed)
            # a killed cell continues from its last checkpointed round
            head, _ = train_t2i(app, cfg, run_dir, resume=resume, show_progress=show)
            sampled = args.rounds * args.groups * args.m
        elif method.kind == "pg":
            # same prompts, reward, sampler and image budget; the reward is wrapped in the app's
            # recorder so metrics.csv also logs the checker accuracy.
            # summed log-density: the clip range these rows were tuned with (docs/derivations.md)
            cfg = PGConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, epochs=1,
                           batch_size=args.batch_size, lr=args.lr, log_prob_reduction="sum", clip=args.pg_clip,
                           lora_rank=args.lora, lora_targets=UNET_ATTENTION, sample_batch_size=args.sample_batch_size,
                           timestep_fraction=args.pg_timestep_fraction, kl=method.params.get("kl", 0.0),
                           final_eval=False, seed=seed)
            problem = compute.metered(recorded_problem(pipe, app, ctx.train_prompts, run_dir))
            head, _ = run_policy_gradient(problem, log_prob(pipe, app.eta), pipe.denoiser,
                                          pipe.denoiser.init_kwargs(), cfg, run_dir, app_config={"t2i": asdict(app)},
                                          show_progress=show)
            sampled = args.rounds * args.groups * args.m
    device = default_device()  # the trainers already moved there
    pipe.denoiser, head = pipe.denoiser.to(device), head.to(device)
    t0 = time.time()
    held = ctx.held
    images, plist = sample_images(pipe, head, held.prompts, args.per_prompt, split, args.n_steps, args.eta,
                                  seed=harness.eval_seed(seed), batch=args.sample_batch_size, show_progress=show)
    samples, acc = evaluate_images(images, plist, {REWARD: ctx.eval_reward}, method.key)
    metrics = {"reward": float(samples[REWARD].mean()), "accuracy": float(samples["correct"].mean())}
    for key, value in acc.iloc[0].items():
        if key in METRICS and key not in metrics and not math.isnan(float(value)):
            metrics[key] = float(value)
    samples.to_csv(cell_dir / "samples.csv", index=False)
    rows = grid_prompts(held.categories)
    save_state(images[[i * args.per_prompt for i in rows]].cpu(), cell_dir / "grid.safetensors")
    n = len(plist)
    per_category = samples.groupby("category").size()  # GenEval's overall: categories weigh the same
    overall_se = 0.5 / len(per_category) * math.sqrt(float((1.0 / per_category).sum()))
    return Cell(metrics, sampled=sampled, compute=None if method.kind == "base" else compute,
                extra={"base_sha256": ctx.base_sha256, "scorer_sha256": ctx.scorer_sha256, "t": split,
                       "heldout_images": n, "accuracy_se_at_half": math.sqrt(0.25 / n),
                       "overall_se_at_half": overall_se,
                       "grid_prompts": [held.prompts[i] for i in rows],
                       "eval_seconds": round(time.time() - t0, 1)})


# ----------------------------------------------------------------------------- extra report outputs
def plot_grid(out: Path, methods: list[str], path: Path) -> bool:
    """Rows = held-out prompts, columns = methods (their first seed with a grid); each row shares its noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for key in methods:
        found = sorted((out / "cells" / key).glob("seed_*/grid.safetensors"),
                       key=lambda p: int(p.parent.name.removeprefix("seed_")))
        if found:
            cells[key] = found[0]
    if not cells:
        return False
    seed = {p.parent.name for p in cells.values()}
    grids = {k: load_state(p) for k, p in cells.items()}
    prompts = read_json(next(iter(cells.values())).parent / "cell.json", keys=("extra",),
                        fix="delete it and rerun the same command to recompute the cell")["extra"]["grid_prompts"]
    fig, axes = plt.subplots(len(prompts), len(grids), figsize=(1.6 * len(grids) + 1.6, 1.6 * len(prompts)),
                             squeeze=False)
    for j, (key, grid) in enumerate(grids.items()):
        for i, prompt in enumerate(prompts):
            ax = axes[i, j]
            ax.imshow(((grid[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(key, fontsize=8)
            if j == 0:
                ax.set_ylabel(prompt.removeprefix("a photo of "), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"held-out prompts, {', '.join(sorted(seed))} (same noise in each row)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def notes(out: Path, long: pd.DataFrame) -> list[str]:
    present = [k for k in METHODS if k in set(long["method"])]
    wrote = []
    if harness.plot_rounds(out, long, out / "t2i_rounds.png", {"reward_mean": "candidates' training reward",
                                                        "checker_acc": "candidates' checker accuracy"},
                   "t2i: training candidates per round (train prompts, mean over seeds)", METHODS):
        wrote.append(out / "t2i_rounds.png")
    if plot_grid(out, present, out / "t2i_grid.png"):
        wrote.append(out / "t2i_grid.png")
    if wrote:
        print(f"\nwrote {', '.join(map(str, wrote))}; per cell: samples.csv, grid.safetensors")
    # the share of GRAFT Top-2's held-out reward gain P-GRAFT keeps (paired by seed); `pgraft t2i diagnose`
    # predicts it as R²(t)
    lines = harness.kept_gain_lines(long, [(f"pgraft_{t}", "graft_topk") for t in T_VALUES], "reward_gain",
                                    {k: m.label for k, m in METHODS.items()})
    sizes = sorted({(c["extra"]["heldout_images"], c["extra"]["overall_se_at_half"])
                    for c in harness.load_cells(out, present) if "overall_se_at_half" in c.get("extra", {})})
    for n, overall_se in sizes:
        lines.append(f"held-out evaluation: n = {n} images per cell; one standard error of a cell's accuracy "
                     f"≤ sqrt(0.25/n) = {math.sqrt(0.25 / n):.3f}, of its GenEval overall ≤ {overall_se:.3f} (p = 0.5)")
    return lines


BENCH = Benchmark(
    name="t2i", methods=METHODS, metrics=METRICS, run_cell=run_cell, prepare=Context, comparisons=COMPARISONS,
    headline=["reward", "accuracy", "overall"], reward_metric="reward", add_args=add_args, quick=quick,
    describe=describe, notes=notes)

if __name__ == "__main__":
    harness.main(BENCH, __doc__)
