"""Layout benchmark: base, GRAFT (Top-2 of M), P-GRAFT (Top-2 of M) at t = 0.25 / 0.5 / 0.75 and the
DDPO-style policy-gradient baseline, every method trained once per training seed at the same budget
of sampled layouts (rounds × groups × M), on the shipped default-preset base with the ``combined``
reward (the weighted negative of LayoutGAN++'s alignment, overlap and out-of-page).

    python benchmarks/layout.py --seeds 0,1,2            # all methods, 3 training seeds, shipped base
    python benchmarks/layout.py --seeds 0,1,2 &  python benchmarks/layout.py --seeds 0,1,2   # two processes share the cells
    python benchmarks/layout.py --report                 # aggregate the finished cells
    python benchmarks/layout.py --budget-sweep --seeds 0,1,2   # t × optimizer steps (benchmarks/budget.py)
    python benchmarks/layout.py --quick --seeds 0,1 --out /tmp/layout_quick   # tiny budget smoke (shipped base)

Every method is evaluated on ``--eval-samples`` fresh layouts drawn with the shared evaluation seed
(benchmarks/harness.py): mean reward, alignment, overlap and out-of-page (raw values: LayoutGAN++
prints alignment and overlap ×100), layout FID on this project's own feature net (not comparable to
published numbers), max-IoU against the test split (with ``max_iou_coverage``, the share of
generated layouts that could be matched, and ``max_iou_ref_n``, the test layouts that entered) and
the class TV distance. At the defaults a GRAFT / P-GRAFT cell takes roughly 2 min of one CPU core
(~30 s per round, ~20 s to evaluate 512 layouts), PG about 1.5 min, the base about 20 s; the
``--quick`` run of all 12 cells about 1 min. Cells (method × seed) are resumable. Writes seeds.csv
(long format), summary.csv (mean, 95% CI), verdicts.txt and layout_seeds.png in --out, plus
layout_rounds.png (the candidates' reward per round, mean over seeds) and, per cell, layouts.png
(rendered pages).

The PG baseline needs a stochastic box sampler: it samples (and is evaluated) with the small-noise
reverse SDE of :func:`pgraft.apps.layout.diffusion.sde_step` (``--pg-noise``), whose marginals equal
the Euler ODE's; the other methods use the deterministic Euler box sampler.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import budget  # noqa: E402
import harness  # noqa: E402
import pandas as pd  # noqa: E402
from harness import Benchmark, Cell, Comparison, Method, Metric  # noqa: E402

from pgraft.apps.layout.features import layout_features  # noqa: E402
from pgraft.apps.layout.metrics import evaluate  # noqa: E402
from pgraft.apps.layout.model import LayoutDenoiser  # noqa: E402
from pgraft.apps.layout.render import render_grid  # noqa: E402
from pgraft.apps.layout.train import (  # noqa: E402
    APP,
    DEFAULT_BASE,
    LayoutTrainConfig,
    log_prob_fn,
    make_problem,
    model_config,
    sample_layouts,
)
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.shipped import weights_sha256  # noqa: E402
from pgraft.core.trainer import GraftConfig, run_graft  # noqa: E402

TOP2 = {"rule": "topk", "k": 2}
T_VALUES = (0.25, 0.5, 0.75)

METHODS = {
    "base": Method("base", "base", "base"),
    "graft": Method("graft", "GRAFT Top-2 of M", "graft", {"grs": TOP2, "t": 0.0}),
    **{f"pgraft_{t}": Method(f"pgraft_{t}", f"P-GRAFT t={t}", "graft", {"grs": TOP2, "t": t}) for t in T_VALUES},
    "pg": Method("pg", "policy gradient (DDPO-style)", "pg"),
    # Flow-GRPO's trust term: the same group-relative advantages plus KL(policy || base) at beta 0.04
    "grpo": Method("grpo", "GRPO (group advantages, KL 0.04)", "pg", {"kl": 0.04}),
}
METRICS = {
    "reward_mean": Metric("reward (mean)"),
    "fid": Metric("FID (own feature net)", higher_is_better=False, digits=2),
    "alignment": Metric("alignment (raw; LayoutGAN++ prints ×100)", higher_is_better=False, digits=5),
    "overlap": Metric("overlap (raw; LayoutGAN++ prints ×100)", higher_is_better=False, digits=4),
    "out_of_page": Metric("out-of-page", higher_is_better=False, digits=5),
    "max_iou": Metric("max-IoU"),
    "max_iou_coverage": Metric("max-IoU coverage"),
    "max_iou_ref_n": Metric("max-IoU reference layouts", digits=0),
    "class_tv": Metric("class TV", higher_is_better=False),
}
COMPARISONS = [Comparison(a, b, metric) for metric in ("reward_mean", "fid") for a, b in [
    *[(f"pgraft_{t}", "graft") for t in T_VALUES],
    *[(f"pgraft_{t}", "pg") for t in T_VALUES],
    *[(f"pgraft_{t}", "grpo") for t in T_VALUES],
    ("graft", "base"),
]]


def add_args(ap) -> None:
    ap.add_argument("--base", default=DEFAULT_BASE,
                    help="'shipped' (the package's base, the default) or a base directory (pretrained with "
                         "--preset if it holds no finished base)")
    ap.add_argument("--preset", default="default", help="preset to pretrain if --base holds no finished base")
    ap.add_argument("--reward", default="combined")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--m", type=int, default=8, help="group size M (Top-2 of M)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sample-steps", type=int, default=0, help="0 = the base preset's")
    ap.add_argument("--pg-noise", type=float, default=0.3, help="box noise of the PG baseline's SDE sampler")
    ap.add_argument("--pg-timestep-fraction", type=float, default=0.25)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--max-iou-limit", type=int, default=512, help="layouts of each set entering max-IoU")
    ap.add_argument("--render", type=int, default=16, help="pages rendered per cell (layouts.png; 0 = none)")


def quick(args) -> None:
    if args.out == Path("runs/bench/layout"):
        args.out = args.out / "quick"
    args.rounds, args.groups, args.m, args.train_steps, args.batch_size = 2, 4, 4, 10, 8
    args.eval_samples, args.render = 48, 8


def describe(args) -> dict:
    return {k: getattr(args, k) for k in ("base", "preset", "reward", "rounds", "groups", "m", "train_steps",
                                          "batch_size", "lr", "sample_steps", "pg_noise", "pg_timestep_fraction",
                                          "eval_samples", "max_iou_limit", "quick")}


class Context:
    """The base (loaded once per process), its weights' digest, the test split's FID features and
    the two samplers (Euler ODE; the SDE for PG)."""

    def __init__(self, args):
        self.args = args
        self.base_dir = APP.resolve_base(str(args.base), args.preset)
        self.base = APP.load_or_pretrain(self.base_dir, args.preset, show_progress=not args.quiet)
        self.base_sha256 = weights_sha256(self.base_dir)
        self.reference = self.base.reference()
        ref = self.reference
        self.reference_features = layout_features(self.base.feature_net, ref.boxes, ref.classes, ref.mask)
        steps = args.sample_steps or None
        self.problems = {"ode": make_problem(self.base, args.reward, steps),
                         "sde": make_problem(self.base, args.reward, steps, box_noise=args.pg_noise)}

    def app_config(self) -> dict:
        cfg = LayoutTrainConfig(reward=self.args.reward, sample_steps=self.args.sample_steps, base=str(self.args.base),
                                preset=self.args.preset, base_sha256=self.base_sha256)
        return {"layout": asdict(cfg)}


def run_cell(ctx: Context, method: Method, seed: int, cell_dir: Path) -> Cell:
    args, base = ctx.args, ctx.base
    run_dir = cell_dir / "run"
    show = not args.quiet
    problem, head, split, sampled = ctx.problems["ode"], base.model, 0.0, 0
    resume = harness.resumable(method, run_dir)
    with harness.count_compute(LayoutDenoiser, ledger=cell_dir / "compute.json", resume=resume) as compute:
        if method.kind == "graft":
            split = method.params["t"]
            cfg = GraftConfig(rounds=args.rounds, groups=args.groups, group_size=args.m,
                              grs=GRSConfig(**method.params["grs"]), split=split, train_steps=args.train_steps,
                              batch_size=args.batch_size, lr=args.lr, replay=True, sample_batch_size=256,
                              final_eval=False, seed=seed)
            # a killed cell continues from its last checkpointed round
            head, _ = run_graft(compute.metered(problem), base.model, model_config(base), cfg, run_dir,
                                app_config=ctx.app_config(), resume=resume, show_progress=show)
            sampled = args.rounds * args.groups * args.m
        elif method.kind == "pg":
            # same sampled-layout budget; the SDE sampler gives every step a likelihood
            problem = ctx.problems["sde"]
            # summed log-density: the clip range these rows were tuned with (docs/derivations.md)
            cfg = PGConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, epochs=1,
                           batch_size=args.batch_size, lr=args.lr, log_prob_reduction="sum", clip=0.2,
                           kl=method.params.get("kl", 0.0), sample_batch_size=256,
                           timestep_fraction=args.pg_timestep_fraction, final_eval=False, seed=seed)
            head, _ = run_policy_gradient(compute.metered(problem), log_prob_fn(args.pg_noise), base.model, model_config(base), cfg,
                                          run_dir, app_config={**ctx.app_config(), "pg_noise": args.pg_noise},
                                          show_progress=show)
            sampled = args.rounds * args.groups * args.m
    t0 = time.time()
    layouts, rewards = sample_layouts(problem, head, base.model, args.eval_samples, split, base.class_names,
                                      seed=harness.eval_seed(seed), show_progress=show)
    row = evaluate(layouts, ctx.reference, base.feature_net, max_iou_limit=args.max_iou_limit,
                   reference_features=ctx.reference_features)
    metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
    metrics["reward_mean"] = float(rewards.mean())
    if args.render > 0:
        render_grid(layouts.subset(slice(0, args.render)), cell_dir / "layouts.png",
                    titles=[f"r={r:.2f}" for r in rewards[: args.render].tolist()])
    return Cell(metrics, sampled=sampled, compute=None if method.kind == "base" else compute,
                extra={"base_sha256": ctx.base_sha256, "t": split, "eval_seconds": round(time.time() - t0, 1)})


def notes(out: Path, long: pd.DataFrame) -> list[str]:
    path = out / "layout_rounds.png"
    if harness.plot_rounds(out, long, path, {"reward_mean": "candidates' reward", "overlap": "candidates' overlap"},
                   "layout: training candidates per round (mean over seeds)", METHODS):
        print(f"\nwrote {path} (candidates per round); rendered pages: cells/<method>/seed_<s>/layouts.png")
    return []


BENCH = Benchmark(
    name="layout", methods=METHODS, metrics=METRICS, run_cell=run_cell, prepare=Context, comparisons=COMPARISONS,
    headline=["reward_mean", "fid", "alignment", "overlap", "max_iou"], reward_metric="reward_mean",
    add_args=add_args, quick=quick, describe=describe, notes=notes)

# `--budget-sweep` (benchmarks/budget.py): GRAFT / P-GRAFT Top-2 of 8 at t ∈ {0, 0.25, 0.5, 0.75} × optimizer
# steps per round, at equal sampled layouts (rounds × groups × M), smaller scales than the table above
SWEEP = budget.Sweep(
    t_values=(0.0,) + T_VALUES, budgets=(3, 10, 30, 150), reward="reward_mean", quality=("fid", "overlap"),
    distance="accepted_minus_model",
    distance_note="accepted_minus_model: the last round's accepted-set mean reward minus the fine-tuned model's "
                  "evaluated mean reward (the head's target is the accepted set's law; exact in reward units at "
                  "t = 0, an upper bound on the gap at t > 0, whose target's reward is E[h | A] < E[r | A]); "
                  "fid: the layout FID on the project's own feature net, evaluated per cell")
SWEEP_DEFAULTS = {"rounds": 2, "groups": 16, "eval_samples": 256, "max_iou_limit": 128, "render": 0}


def sweep_method(t: float, capacity: dict) -> Method:
    return Method(f"top2_{t}", f"Top-2 t={t}", "graft", {"grs": TOP2, "t": t})


if __name__ == "__main__":
    if budget.wants_sweep():
        budget.main(BENCH, SWEEP, sweep_method, __doc__, SWEEP_DEFAULTS)
    else:
        harness.main(BENCH, __doc__)
