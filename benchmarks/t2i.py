"""Text-to-image benchmark: base vs GRAFT (BoN / Top-K) vs P-GRAFT at several t vs the DDPO-style
policy-gradient baseline, all at the same budget of generated images (rounds x groups x M), on the
embedded shapes world's base pipeline with the learned VQA-style reward.

    python benchmarks/t2i.py --quick                          # tiny base + scorer, ~2-3 min smoke
    python benchmarks/t2i.py [--base runs/t2i/base] [--methods a,b,...] [--rounds R --groups G --m M]
    python benchmarks/t2i.py --report [--out DIR]             # only aggregate finished methods

Every method fine-tunes (LoRA on the UNet attention, as ``pgraft t2i train``) on the *train* prompt
split with reward ``vqa`` and is evaluated on the *held-out* split (unseen combinations of seen
words) with the same sampler seeds for every method: the learned reward and the exact checker's
GenEval-style accuracy per category. Each method writes results/<method>.json,
results/<method>_samples.csv (per image: prompt, reward, category, verdict),
results/<method>_grid.safetensors (first image of a few held-out prompts) and its run directory
runs/<method>; the report writes results.csv, t2i.png (reward and per-category accuracy bars,
candidates' reward and checker accuracy per round), t2i_grid.png (rows = prompts, columns =
methods, same seed) and summary.txt (the gain of P-GRAFT over base and whether it beats GRAFT and
PG). Methods can run in separate processes (one thread each) and be aggregated with --report.

P-GRAFT's t is the fraction of sampler steps left to the frozen base (0 = GRAFT). The PG baseline
samples every step with its policy (DDIM(eta), classifier-free guidance, as GRAFT's head) and is
trained on the log-density of those steps (:func:`pgraft.apps.t2i.train.log_prob`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

from pgraft.apps.t2i import DEFAULT_ANCHOR  # noqa: E402
from pgraft.apps.t2i.model import UNET_ATTENTION, T2IPipeline  # noqa: E402
from pgraft.apps.t2i.prompts import load_prompts  # noqa: E402
from pgraft.apps.t2i.rewards import ScorerTrainConfig, make_reward, train_scorer  # noqa: E402
from pgraft.apps.t2i.train import (  # noqa: E402
    PRETRAIN_STEPS,
    PretrainT2IConfig,
    T2IConfig,
    evaluate_images,
    load_pipeline,
    log_prob,
    pretrain_world,
    recorded_problem,
    sample_images,
    train_t2i,
)
from pgraft.apps.t2i.world import CATEGORIES  # noqa: E402
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.state import default_device, load_state, save_state  # noqa: E402
from pgraft.core.trainer import GraftConfig  # noqa: E402

REWARD = "vqa"  # the learned reward every method is evaluated with (and trained with, by default)
EVAL_SEED = 2  # the seed of `pgraft t2i evaluate`; shared by every method, so columns of the grid share x_T


@dataclass(frozen=True)
class Method:
    label: str
    kind: str = "graft"  # a key of TRAINERS
    grs: GRSConfig = field(default_factory=lambda: GRSConfig(rule="topk", k=2))
    t: float = 0.0


METHODS: dict[str, Method] = {
    "base": Method("base", kind="base"),
    # control: the same self-training with no selection, to separate selection from drift
    "sft_all": Method("SFT on all samples (no selection)", grs=GRSConfig(rule="threshold", threshold=-1.0)),  # both rewards lie in [0, 1]
    "graft_bon": Method("GRAFT BoN (1 of M)", grs=GRSConfig(rule="bon")),
    "graft_topk": Method("GRAFT Top-2 of M"),
    "pgraft_0.25": Method("P-GRAFT t=0.25", t=0.25),
    "pgraft_0.5": Method("P-GRAFT t=0.5", t=0.5),
    "pgraft_0.75": Method("P-GRAFT t=0.75", t=0.75),
    "pg": Method("policy gradient (DDPO-style)", kind="pg"),
}


@dataclass(frozen=True)
class Bench:
    """What every method shares: the base pipeline's path, the reward's weights and the budget."""

    base: str
    scorer: str
    rounds: int
    groups: int
    m: int
    train_steps: int
    batch_size: int
    lr: float
    lora: int
    n_steps: int
    eta: float
    sample_batch_size: int
    pg_clip: float
    pg_timestep_fraction: float
    eval_per_prompt: int
    replay: bool = False
    reward: str = REWARD
    guidance: float | None = None
    cond_dropout: float = 0.0
    anchor: float = 0.0

    def app(self) -> T2IConfig:
        return T2IConfig(model=self.base, prompts="train", reward=self.reward,
                         reward_weights=self.scorer if self.reward == REWARD else None,
                         n_steps=self.n_steps, eta=self.eta, guidance_scale=self.guidance,
                         cond_dropout=self.cond_dropout)


# ----------------------------------------------------------------------------- fine-tuning, per kind
def train_base(method: Method, bench: Bench, pipe: T2IPipeline, run_dir: Path, show: bool) -> nn.Module:
    return pipe.denoiser


def train_graft(method: Method, bench: Bench, pipe: T2IPipeline, run_dir: Path, show: bool) -> nn.Module:
    """``pgraft t2i train`` with the benchmark's budget (LoRA targets: the app's default)."""
    cfg = GraftConfig(rounds=bench.rounds, groups=bench.groups, group_size=bench.m, grs=method.grs, split=method.t,
                      train_steps=bench.train_steps, batch_size=bench.batch_size, lr=bench.lr, lora_rank=bench.lora,
                      sample_batch_size=bench.sample_batch_size, replay=bench.replay, anchor=bench.anchor,
                      final_eval=False, seed=0)
    head, _ = train_t2i(bench.app(), cfg, run_dir, show_progress=show)
    return head


def train_pg(method: Method, bench: Bench, pipe: T2IPipeline, run_dir: Path, show: bool) -> nn.Module:
    """DDPO-style clipped policy gradient on the same prompts, reward, sampler and image budget;
    the reward is wrapped in the app's recorder so metrics.csv also logs the checker accuracy."""
    # summed log-density: the clip range these rows were tuned with (docs/derivations.md)
    cfg = PGConfig(rounds=bench.rounds, groups=bench.groups, group_size=bench.m, epochs=1,
                   batch_size=bench.batch_size, lr=bench.lr, log_prob_reduction="sum", clip=bench.pg_clip, lora_rank=bench.lora,
                   lora_targets=UNET_ATTENTION, sample_batch_size=bench.sample_batch_size,
                   timestep_fraction=bench.pg_timestep_fraction, final_eval=False, seed=0)
    app = bench.app()
    problem = recorded_problem(pipe, app, load_prompts(app.prompts).prompts, run_dir)
    head, _ = run_policy_gradient(problem, log_prob(pipe, app.eta), pipe.denoiser, pipe.denoiser.init_kwargs(), cfg,
                                  run_dir, app_config={"t2i": asdict(app)}, show_progress=show)
    return head


TRAINERS: dict[str, Callable[[Method, Bench, T2IPipeline, Path, bool], nn.Module]] = {
    "base": train_base, "graft": train_graft, "pg": train_pg}


def grid_prompts(prompts: list[str], categories: list[str | None]) -> list[int]:
    """Indices of the first held-out prompt of each category (rows of the side-by-side grid)."""
    first: dict[str, int] = {}
    for i, c in enumerate(categories):
        first.setdefault(str(c), i)
    return [first[c] for c in CATEGORIES if c in first]


def run_method(name: str, bench: Bench, out: Path, show: bool) -> dict:
    method = METHODS[name]
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    pipe = load_pipeline(bench.base, bench.guidance)
    t0 = time.time()
    head = TRAINERS[method.kind](method, bench, pipe, run_dir, show)
    train_seconds = time.time() - t0
    device = default_device()  # the trainers already moved there
    pipe.denoiser, head = pipe.denoiser.to(device), head.to(device)
    held = load_prompts("heldout")
    t0 = time.time()
    images, plist = sample_images(pipe, head, held.prompts, bench.eval_per_prompt, method.t, bench.n_steps,
                                  bench.eta, seed=EVAL_SEED, batch=bench.sample_batch_size, show_progress=show)
    samples, acc = evaluate_images(images, plist, {REWARD: make_reward(REWARD, bench.scorer)}, name)
    eval_seconds = time.time() - t0
    rows = grid_prompts(held.prompts, held.categories)
    row = {"method": name, "label": method.label, "kind": method.kind, "t": method.t,
           "rule": "" if method.kind != "graft" else method.grs.rule,
           "budget": 0 if method.kind == "base" else bench.rounds * bench.groups * bench.m,
           "reward": float(samples[REWARD].mean()),
           **{k: float(v) for k, v in acc.iloc[0].items() if k not in ("n", f"mean_{REWARD}")},
           "n": len(plist),
           "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
           "grid_prompts": [held.prompts[i] for i in rows], "bench": asdict(bench)}
    res = out / "results"
    res.mkdir(parents=True, exist_ok=True)
    samples.to_csv(res / f"{name}_samples.csv", index=False)
    save_state(images[[i * bench.eval_per_prompt for i in rows]], res / f"{name}_grid.safetensors")
    (res / f"{name}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps({k: row[k] for k in ("method", "budget", "reward", "overall", "train_seconds")}), flush=True)
    return row


# ----------------------------------------------------------------------------- report
def report(out: Path) -> pd.DataFrame:
    """results.csv, t2i.png, t2i_grid.png and summary.txt from every results/<method>.json."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results under {out / 'results'}")
    order = {m: i for i, m in enumerate(METHODS)}
    table = pd.DataFrame(rows).sort_values("method", key=lambda s: s.map(order)).reset_index(drop=True)
    cats = [c for c in CATEGORIES if c in table and table[c].notna().any()]
    base = table[table["method"] == "base"]
    for col, gain in (("reward", "reward_gain_%"), ("overall", "acc_gain_%")):
        table[gain] = 100 * (table[col] / float(base[col].iloc[0]) - 1) if len(base) else float("nan")
    cols = ["method", "label", "t", "budget", "reward", "reward_gain_%", "overall", "acc_gain_%", *cats, "n",
            "train_seconds", "eval_seconds"]
    table = table[cols + ["grid_prompts"]]
    table.drop(columns="grid_prompts").to_csv(out / "results.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.drop(columns=["label", "grid_prompts"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    plot(out, table, cats)
    plot_grid(out, table)
    lines = verdict(table)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'results.csv'}, {out / 't2i.png'}, {out / 't2i_grid.png'}, {out / 'summary.txt'}")
    return table


def verdict(table: pd.DataFrame) -> list[str]:
    """The issue's question: P-GRAFT's relative gain over base on held-out prompts, and whether the
    best P-GRAFT beats the best GRAFT and the PG baseline (learned reward and checker accuracy)."""
    by = table.set_index("method")
    pgraft = [m for m in by.index if m.startswith("pgraft")]
    graft = [m for m in by.index if m.startswith("graft")]
    lines = []
    for col, what in (("reward", f"learned reward ({REWARD})"), ("overall", "checker accuracy (overall)")):
        if not pgraft:
            break
        best = by.loc[pgraft, col].idxmax()
        v = by.loc[best, col]
        line = f"{what}: best P-GRAFT is {best} = {v:.4f}"
        if "base" in by.index:
            line += f" ({100 * (v / by.loc['base', col] - 1):+.2f}% vs base {by.loc['base', col]:.4f})"
        if graft:
            g = by.loc[graft, col].idxmax()
            line += f"; {_beats(v, by.loc[g, col])} best GRAFT {g} = {by.loc[g, col]:.4f}"
        if "pg" in by.index:
            line += f"; {_beats(v, by.loc['pg', col])} PG = {by.loc['pg', col]:.4f}"
        lines.append(line)
    return lines


def _beats(a: float, b: float) -> str:
    return "beats" if a > b else "ties" if a == b else "does not beat"


def plot(out: Path, table: pd.DataFrame, cats: list[str]) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.3), gridspec_kw={"width_ratios": [1, 2.4, 1.2, 1.2]})
    colors = [f"C{i}" for i in range(len(table))]
    x = np.arange(len(table))
    axes[0].bar(x, table["reward"], color=colors)
    axes[0].set_xticks(x, table["method"], rotation=60, ha="right", fontsize=7)
    axes[0].set_title(f"held-out mean learned reward ({REWARD}) ↑")
    groups = ["overall", *cats]
    width = 0.8 / len(table)
    for i, (name, c) in enumerate(zip(table["method"], colors)):
        axes[1].bar(np.arange(len(groups)) + (i - (len(table) - 1) / 2) * width, table.loc[i, groups], width,
                    color=c, label=name)
    axes[1].set_xticks(np.arange(len(groups)), groups, fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("held-out checker accuracy per category (GenEval-style) ↑")
    axes[1].legend(fontsize=7, ncol=2)
    for i, (name, c) in enumerate(zip(table["method"], colors)):
        path = out / "runs" / name / "metrics.csv"
        if path.is_file():
            m = pd.read_csv(path)
            m = m[m["phase"] == "train"]
            axes[2].plot(m["round"], m["reward_mean"], "o-", color=c, label=name)
            if "checker_acc" in m:
                axes[3].plot(m["round"], m["checker_acc"], "o-", color=c, label=name)
    axes[2].set_title("train prompts: candidates' reward per round")
    axes[3].set_title("train prompts: candidates' checker acc. per round")
    for ax in axes[2:]:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "t2i.png", dpi=110)
    plt.close(fig)


def plot_grid(out: Path, table: pd.DataFrame) -> None:
    """Rows = held-out prompts, columns = methods; every cell starts from the same noise."""
    names = [m for m in table["method"] if (out / "results" / f"{m}_grid.safetensors").is_file()]
    if not names:
        return
    grids = {m: load_state(out / "results" / f"{m}_grid.safetensors") for m in names}
    prompts = table.set_index("method").loc[names[0], "grid_prompts"]
    fig, axes = plt.subplots(len(prompts), len(names), figsize=(1.6 * len(names) + 1.6, 1.6 * len(prompts)),
                             squeeze=False)
    for j, m in enumerate(names):
        for i, prompt in enumerate(prompts):
            ax = axes[i, j]
            ax.imshow(((grids[m][i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(m, fontsize=8)
            if j == 0:
                ax.set_ylabel(prompt.removeprefix("a photo of "), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(out / "t2i_grid.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- setup
def ensure_base(path: Path, preset: str, quick: bool, show: bool) -> None:
    """Pretrain the base pipeline into ``path`` unless it already holds a finished one (``unet/``
    is written last, by ``pipe.save``)."""
    if (path / "unet").is_dir():
        return
    cfg = (PretrainT2IConfig(preset="tiny", steps=PRETRAIN_STEPS["tiny"], n_images=2000, batch_size=16,
                                      warmup=20) if quick
           else PretrainT2IConfig(preset=preset, steps=PRETRAIN_STEPS[preset]))
    print(f"{path} holds no finished base pipeline: pretraining the {cfg.preset!r} preset for {cfg.steps} steps "
          f"there first (`pgraft t2i pretrain --preset {cfg.preset}`; ~40 min for 'default' on one core)", flush=True)
    pretrain_world(cfg, path, show_progress=show)


def ensure_scorer(path: Path, image_size: int, quick: bool, show: bool) -> None:
    """Train the learned VQA reward into ``path`` unless it exists (the app's ``train-scorer`` defaults)."""
    if (path / "model.safetensors").is_file():
        return
    cfg = (ScorerTrainConfig(image_size=image_size, n_images=2000, steps=400, batch_size=32) if quick
           else ScorerTrainConfig(image_size=image_size))
    print(f"{path} holds no VQA scorer: training one ({cfg.steps} steps, `pgraft t2i train-scorer`)", flush=True)
    _, metrics = train_scorer(cfg, path, show_progress=show)
    print(f"scorer: {json.dumps(metrics)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench/t2i"))
    p.add_argument("--base", type=Path, default=Path("runs/t2i/base"),
                   help="pipeline directory (`pgraft t2i pretrain` output); pretrained with --preset if missing")
    p.add_argument("--preset", default="default", help="preset to pretrain if --base holds no finished model")
    p.add_argument("--scorer", type=Path, default=Path("runs/t2i/scorer"),
                   help="VQA scorer directory (`pgraft t2i train-scorer` output); trained if missing")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--groups", type=int, default=16, help="prompts per round")
    p.add_argument("--m", type=int, default=8, help="images per prompt (group size M)")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--reward", default=REWARD, choices=[REWARD, "checker"],
                   help="training reward (evaluation always reports both): the learned scorer, or the exact "
                        "checker as an oracle ablation")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--cond-dropout", type=float, default=0.0,
                   help="fine-tuning also trains the unconditional eps on this fraction of accepted images")
    p.add_argument("--replay", action="store_true", help="GRAFT / P-GRAFT train on every accepted image so far")
    p.add_argument("--anchor", type=float, default=DEFAULT_ANCHOR,
                   help="GRAFT / P-GRAFT trust region: weight of the squared head-base difference (0 = off; "
                        "the default is `pgraft t2i train`'s)")
    p.add_argument("--lora", type=int, default=8, help="LoRA rank on the UNet attention (0 = full fine-tune)")
    p.add_argument("--n-steps", type=int, default=20, help="DDIM sampler steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0: P-GRAFT's tail and PG need noise)")
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--pg-clip", type=float, default=0.2)
    p.add_argument("--pg-timestep-fraction", type=float, default=0.25)
    p.add_argument("--eval-per-prompt", type=int, default=4, help="images per held-out prompt (62 prompts)")
    p.add_argument("--quick", action="store_true", help="tiny base, scorer and budget: a ~2-3 min smoke")
    p.add_argument("--report", action="store_true", help="only aggregate finished methods")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.report:
        report(args.out)
        return
    if args.quick:
        args.out = args.out / "quick" if args.out == Path("runs/bench/t2i") else args.out
        args.base, args.scorer = args.out / "base", args.out / "scorer"
        args.rounds, args.groups, args.m, args.train_steps, args.batch_size = 2, 4, 4, 10, 8
        args.n_steps, args.eval_per_prompt, args.lr, args.quiet = 10, 2, 1e-3, True
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    show = not args.quiet
    ensure_base(args.base, args.preset, args.quick, show)
    ensure_scorer(args.scorer, load_pipeline(args.base).info.image_size, args.quick, show)
    bench = Bench(base=str(args.base), scorer=str(args.scorer), rounds=args.rounds, groups=args.groups, m=args.m,
                  train_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, lora=args.lora,
                  n_steps=args.n_steps, eta=args.eta, sample_batch_size=args.sample_batch_size,
                  pg_clip=args.pg_clip, pg_timestep_fraction=args.pg_timestep_fraction,
                  eval_per_prompt=args.eval_per_prompt, replay=args.replay, reward=args.reward,
                  guidance=args.guidance, cond_dropout=args.cond_dropout, anchor=args.anchor)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_method(name, bench, args.out, show)
    report(args.out)


if __name__ == "__main__":
    main()
