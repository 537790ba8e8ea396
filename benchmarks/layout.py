"""Layout benchmark: base vs GRAFT vs P-GRAFT at several t vs the DDPO-style policy-gradient baseline,
all at the same budget of sampled layouts (rounds x groups x M), on one base model and one reward.

    python benchmarks/layout.py --quick                       # tiny base, < 3 min, smoke of the pipeline
    python benchmarks/layout.py                               # a real run on the shipped default-preset base
    python benchmarks/layout.py --report --out DIR            # only aggregate finished methods

Each method writes results/<method>.json (metrics of --eval-samples fresh layouts: alignment,
overlap, out-of-page, layout FID on this project's feature net, max-IoU, class TV, mean reward) and
layouts_<method>.png (rendered pages); the report writes results.csv, layout.png (metric bars and
reward per round) and prints the table. Methods may run in separate processes and be aggregated.

The PG baseline needs a stochastic box sampler: it samples (and is evaluated) with the small-noise
reverse SDE of :func:`pgraft.apps.layout.diffusion.sde_step` (``--pg-noise``), whose marginals equal
the Euler ODE's; the other methods use the deterministic Euler box sampler.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pgraft.apps.layout.render import render_grid  # noqa: E402
from pgraft.apps.layout.train import (  # noqa: E402
    DEFAULT_BASE,
    BaseModel,
    LayoutTrainConfig,
    base_dir_of,
    evaluate_layouts,
    get_preset,
    load_base,
    load_or_pretrain,
    log_prob_fn,
    make_problem,
    model_config,
    pretrain_layout,
    sample_layouts,
)
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.trainer import GraftConfig, run_graft  # noqa: E402


@dataclass(frozen=True)
class Method:
    label: str
    kind: str = "graft"  # graft | pg | base
    grs: GRSConfig = field(default_factory=lambda: GRSConfig(rule="topk", k=2))
    t: float = 0.0


METHODS: dict[str, Method] = {
    "base": Method("base", kind="base"),
    "graft": Method("GRAFT Top-2 of M"),
    "pgraft_0.25": Method("P-GRAFT t=0.25", t=0.25),
    "pgraft_0.5": Method("P-GRAFT t=0.5", t=0.5),
    "pgraft_0.75": Method("P-GRAFT t=0.75", t=0.75),
    "pg": Method("policy gradient (DDPO-style)", kind="pg"),
}
METRICS = ["reward_mean", "alignment", "overlap", "fid", "max_iou", "class_tv"]


def run_method(name: str, args: argparse.Namespace, base: BaseModel, out: Path) -> dict:
    method = METHODS[name]
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    problem = make_problem(base, args.reward, args.sample_steps or None)
    split = 0.0
    if method.kind == "base":
        head = base.model
    elif method.kind == "graft":
        cfg = GraftConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, grs=method.grs, split=method.t,
                          train_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, replay=True,
                          sample_batch_size=256, final_eval=False, seed=0)
        head, _ = run_graft(problem, base.model, model_config(base), cfg, run_dir,
                            app_config={"reward": args.reward}, show_progress=not args.quiet)
        split = method.t
    else:
        # same sampled-layout budget; the SDE sampler gives every step a likelihood
        problem = make_problem(base, args.reward, args.sample_steps or None, box_noise=args.pg_noise)
        # summed log-density: the clip range these rows were tuned with (docs/derivations.md)
        cfg = PGConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, epochs=1,
                       batch_size=args.batch_size, lr=args.lr, log_prob_reduction="sum", clip=0.2, sample_batch_size=256,
                       timestep_fraction=args.pg_timestep_fraction, final_eval=False, seed=0)
        head, _ = run_policy_gradient(problem, log_prob_fn(args.pg_noise), base.model, model_config(base), cfg,
                                      run_dir, app_config={"reward": args.reward}, show_progress=not args.quiet)
    train_seconds = time.time() - t0
    layouts, rewards = sample_layouts(problem, head, base.model, args.eval_samples, split, base.class_names,
                                      seed=10_007, show_progress=not args.quiet)
    row = {"method": name, "label": method.label, "t": split,
           "sampled_for_training": 0 if method.kind == "base" else args.rounds * args.groups * args.m,
           **evaluate_layouts(layouts, base, max_iou_limit=args.max_iou_limit),
           "reward_mean": float(rewards.mean()), "train_seconds": train_seconds}
    render_grid(layouts.subset(slice(0, args.render)), out / f"layouts_{name}.png",
                titles=[f"r={r:.2f}" for r in rewards[: args.render].tolist()])
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row), flush=True)
    return row


def report(out: Path) -> pd.DataFrame:
    """results.csv + layout.png from every results/<method>.json under ``out``."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results under {out / 'results'}")
    order = {m: i for i, m in enumerate(METHODS)}
    table = pd.DataFrame(rows).sort_values("method", key=lambda s: s.map(order)).reset_index(drop=True)
    table.to_csv(out / "results.csv", index=False)
    cols = [c for c in METRICS if c in table]
    fig, axes = plt.subplots(1, len(cols) + 1, figsize=(3.3 * (len(cols) + 1), 3.6))
    for ax, col in zip(axes, cols):
        ax.bar(range(len(table)), table[col], color=[f"C{i}" for i in range(len(table))])
        ax.set_xticks(range(len(table)), table["method"], rotation=60, ha="right", fontsize=7)
        ax.set_title(col + (" (↑)" if col in ("reward_mean", "max_iou") else " (↓)"))
    ax = axes[-1]
    for i, name in enumerate(table["method"]):
        path = out / "runs" / name / "metrics.csv"
        if path.is_file():
            m = pd.read_csv(path)
            m = m[m["phase"] == "train"]
            ax.plot(m["round"], m["reward_mean"], "o-", color=f"C{i}", label=name)
    ax.set_title("candidates' reward per round")
    ax.set_xlabel("round")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "layout.png", dpi=110)
    plt.close(fig)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["method", *cols, "out_of_page", "max_iou_coverage", "train_seconds"]].round(4).to_string())
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench/layout"))
    p.add_argument("--base", default=DEFAULT_BASE,
                   help="'shipped' (the package's base, when it ships one) or a base directory (pretrained if empty)")
    p.add_argument("--preset", default="default", help="preset to pretrain if --base holds no finished model")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reward", default="combined")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sample-steps", type=int, default=0, help="0 = the base preset's")
    p.add_argument("--pg-noise", type=float, default=0.3)
    p.add_argument("--pg-timestep-fraction", type=float, default=0.25)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--max-iou-limit", type=int, default=512)
    p.add_argument("--render", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny base and budget: a < 3 min smoke of the pipeline")
    p.add_argument("--report", action="store_true", help="only aggregate finished methods")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(args.out)
        return
    if args.quick:
        args.out = args.out / "quick" if args.out == Path("runs/bench/layout") else args.out
        args.base = args.out / "base"
        args.rounds, args.groups, args.m, args.train_steps, args.batch_size = 1, 4, 4, 10, 8
        args.eval_samples, args.render, args.quiet = 48, 8, True
        args.methods = ",".join(["base", "graft", "pgraft_0.5", "pg"])
        base = load_base(args.base) if (args.base / "features").is_dir() else \
            pretrain_layout(get_preset("tiny"), args.base, show_progress=False)
    else:
        base_dir = base_dir_of(LayoutTrainConfig(base=str(args.base), preset=args.preset))
        base = load_or_pretrain(base_dir, args.preset, show_progress=not args.quiet)
    names = [m for m in args.methods.split(",") if m]
    unknown = set(names) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_method(name, args, base, args.out)
    report(args.out)


if __name__ == "__main__":
    main()
