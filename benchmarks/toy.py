"""Toy benchmark: distance to the exact GRS target for base, GRAFT (RS/BoN/Top-K), P-GRAFT at
several t and three baselines (the DDPO-style policy gradient, GRPO with a KL term to the base,
DiffusionNFT), at an equal budget of sampled candidates, once per training seed
(benchmarks/harness.py: paired evaluation seeds, 95% CIs, resumable cells).

Policy-gradient convention (docs/derivations.md, section 4): per-dimension log-density
(``log_prob_reduction="mean"``; the toy's state has D = 1 entry, so it equals the summed one) and
PPO clip range 0.2, the toy's setting of eps (DDPO's 1e-4 is for D ~ 10^4 latents); every PG row's
label says so.

The exact target of GRS with rule R is p ∝ p̄ · E[A_R(x)] (Lemma 2.3). p̄ (the shipped base MLP) is
represented by a pool of base samples, so the target is that pool weighted by E[A_R]. For
P-GRAFT the accepted law is on X_t: its X_0 law is ∫ p̄_t(x_t) h(x_t) p̄(x_0 | x_t) with
h(x_t) = E[A_R | x_t], estimated with K base tails per pooled x_t.

The target is itself a Monte-Carlo estimate, so W1 has a floor: the W1 that an ideal sampler of
the target would score. The benchmark measures it as the W1 between ``--eval-samples`` draws from
a second, independent estimate of the target (fresh pool, fresh tails) and the estimate methods
are scored against, and prints it beside every W1 ("at the noise floor" when the CI of W1 reaches
it). Lemma 4.3's Var(r | X_t) table moved to ``pgraft toy diagnose``.

    python benchmarks/toy.py --seeds 0,1,2 [--out runs/bench/toy] [--quick]
    python benchmarks/toy.py --budget-sweep --seeds 0,1,2   # t × steps × capacity (benchmarks/budget.py)
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import budget  # noqa: E402
import harness  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from harness import Benchmark, Cell, Comparison, Method, Metric  # noqa: E402

from pgraft.apps.toy.metrics import acceptance_weights, conditional_weights, wasserstein_1d  # noqa: E402
from pgraft.apps.toy.model import ToyDenoiser  # noqa: E402
from pgraft.apps.toy.train import (  # noqa: E402
    APP,
    DEFAULT_BASE,
    ToyConfig,
    log_prob_fn,
    make_problem,
)
from pgraft.core.bridges import VPPath  # noqa: E402
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.nft import NFTConfig, run_nft  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.sampling import sample  # noqa: E402
from pgraft.core.schedules import cosine_alpha_bar, split_times  # noqa: E402
from pgraft.core.shipped import weights_sha256  # noqa: E402
from pgraft.core.stats import mean_ci  # noqa: E402
from pgraft.core.trainer import GraftConfig, generator_for, run_graft, sample_finetuned  # noqa: E402

RULES = {"rs": ("RS (α=1)", dict(rule="rs", alpha=1.0), 8), "bon": ("BoN (N=4)", dict(rule="bon"), 4),
         "topk": ("Top-2 of 8", dict(rule="topk", k=2), 8)}
T_VALUES = (0.25, 0.5, 0.75)


def _methods() -> dict[str, Method]:
    out = {"base": Method("base", "base", "base")}
    for rule, (label, _, _) in RULES.items():
        for t in (0.0,) + (T_VALUES if rule != "topk" else ()):
            key = f"graft_{rule}" if t == 0 else f"pgraft_{rule}_{t}"
            name = f"GRAFT {label}" if t == 0 else f"P-GRAFT {label} t={t}"
            out[key] = Method(key, name, "graft", {"rule": rule, "t": t})
    pg = "mean log-density, clip 0.2"  # the PG convention of these rows (module docstring)
    out["pg"] = Method("pg", f"policy gradient (no KL; {pg})", "pg")
    out["grpo"] = Method("grpo", f"GRPO (group advantages, KL 0.04; {pg})", "pg", {"kl": 0.04})
    out["nft"] = Method("nft", "DiffusionNFT (β=1)", "nft")
    # 32 epochs x 16 minibatches x 4 rounds = 2,048 updates of 256: GRAFT's 2,000 fine-tuning steps
    out["nft_long"] = Method("nft_long", "DiffusionNFT (β=1, 2,048 updates)", "nft", {"epochs": 32})
    return out


METHODS = _methods()
METRICS = {
    "W1_to_own_target": Metric("W1 to own target", higher_is_better=False),
    "W1_floor": Metric("W1 noise floor", higher_is_better=False),
    "mean_reward": Metric("mean reward"),
    "W1_to_RS_target": Metric("W1 to RS target", higher_is_better=False),
}
COMPARISONS = [Comparison(a, b, "W1_to_own_target") for a, b in [
    ("pgraft_rs_0.25", "graft_rs"), ("pgraft_rs_0.5", "graft_rs"), ("pgraft_rs_0.75", "graft_rs"),
    ("pgraft_bon_0.25", "graft_bon"), ("pgraft_bon_0.5", "graft_bon"), ("pgraft_bon_0.75", "graft_bon"),
    ("pgraft_rs_0.75", "pgraft_rs_0.25"), ("pgraft_bon_0.75", "pgraft_bon_0.25")]] + [
    Comparison("pg", "graft_rs", "W1_to_RS_target")] + [
    Comparison(a, "pgraft_rs_0.25", metric) for a in ("grpo", "nft", "nft_long")
    for metric in ("W1_to_RS_target", "mean_reward")]


def add_args(ap) -> None:
    ap.add_argument("--base", default=DEFAULT_BASE, help="'shipped' (default) or a base directory")
    ap.add_argument("--budget", type=int, default=16384, help="sampled candidates per method")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=20000)
    ap.add_argument("--pool", type=int, default=20000, help="pooled x_t per target estimate (×5 for t = 0)")
    ap.add_argument("--tails", type=int, default=16, help="base tails per pooled x_t")


def quick(args) -> None:
    args.budget, args.train_steps, args.eval_samples, args.pool, args.tails = 2048, 100, 4000, 4000, 8


def describe(args) -> dict:
    return {k: getattr(args, k) for k in ("base", "budget", "train_steps", "eval_samples", "pool", "tails", "quick")}


class Context:
    """The base, the problem, and two independent estimates of every method's target (A: scored
    against; B: the noise floor). Deterministic seeds, so every process builds the same ones."""

    def __init__(self, args):
        self.args = args
        self.toy = ToyConfig()
        self.problem = make_problem(self.toy)
        base_dir = APP.resolve_base(args.base, self.toy)
        self.base = APP.load_or_pretrain(base_dir, self.toy, show_progress=False)
        self.base_sha256 = weights_sha256(base_dir)
        estimates = [self._targets(seed) for seed in (123, 456)]
        self.targets = estimates[0]
        self.floor = {}
        gen = torch.Generator().manual_seed(789)
        for key, (x, w) in estimates[1].items():
            draws = x[torch.multinomial(w.double() / w.sum(), args.eval_samples, replacement=True, generator=gen)]
            self.floor[key] = wasserstein_1d(draws, *self.targets[key])

    def _targets(self, seed: int) -> dict:
        args, base, problem = self.args, self.base, self.problem
        gen = torch.Generator().manual_seed(seed)
        times = problem.times
        pool_x0 = sample(base, torch.randn(args.pool * 5, 1, generator=gen), times, problem.step, None, gen)
        pool_r = problem.reward(pool_x0, None)
        targets = {}
        for rule, (_, grs, m) in RULES.items():
            targets[(rule, 0.0)] = (pool_x0, acceptance_weights(pool_r, GRSConfig(**grs), m, pool_r))
        for t in T_VALUES:
            k = split_times(times, t).index
            x_t = sample(base, torch.randn(args.pool, 1, generator=gen), times[: k + 1], problem.step, None, gen)
            rep = x_t.repeat_interleave(args.tails + 1, 0)
            x0 = sample(base, rep, times[k:], problem.step, None, gen).view(args.pool, args.tails + 1, 1)
            r = problem.reward(x0.view(-1, 1), None).view(args.pool, args.tails + 1)
            for rule, (_, grs, m) in RULES.items():
                if rule != "topk":
                    h = conditional_weights(r[:, :args.tails], GRSConfig(**grs), m, pool_r)
                    targets[(rule, t)] = (x0[:, args.tails], h)  # a fresh tail from each weighted x_t
        return targets


def run_cell(ctx: Context, method: Method, seed: int, cell_dir: Path) -> Cell:
    args, problem, base, toy = ctx.args, ctx.problem, ctx.base, ctx.toy
    run_dir = cell_dir / "run"
    sampled, compute = 0, None
    if method.kind == "base":
        gen = generator_for(harness.eval_seed(seed))
        x0 = sample(base, torch.randn(args.eval_samples, 1, generator=gen), problem.times, problem.step, None, gen)
    elif method.kind == "graft":
        rule, t = method.params["rule"], method.params["t"]
        _, grs, m = RULES[rule]
        cfg = GraftConfig(rounds=1, groups=args.budget // m, group_size=m, grs=GRSConfig(**grs), split=t,
                          train_steps=args.train_steps, batch_size=256, lr=1e-3, sample_batch_size=4096,
                          lora_rank=method.params.get("lora_rank", 0), final_eval=False, seed=seed)
        resume = harness.resumable(method, run_dir)
        with harness.count_compute(ToyDenoiser, ledger=cell_dir / "compute.json", resume=resume) as compute:
            head, _ = run_graft(compute.metered(problem), base, toy.model_config(), cfg, run_dir, resume=resume,
                                show_progress=False)
        _, x0 = sample_finetuned(problem, head, base, args.eval_samples, t, seed=harness.eval_seed(seed), batch=4096,
                                 show_progress=False)
        sampled = cfg.groups * m
    elif method.kind == "pg":
        rounds = 4
        # per-dimension log-density (D = 1: the same as the summed one), clip 0.2 (module docstring)
        cfg = PGConfig(rounds=rounds, groups=args.budget // (8 * rounds), group_size=8, epochs=2, batch_size=256,
                       lr=3e-4, log_prob_reduction="mean", clip=0.2, kl=method.params.get("kl", 0.0),
                       sample_batch_size=4096, final_eval=False, seed=seed)
        harness.resumable(method, run_dir)  # clears a killed policy-gradient run
        with harness.count_compute(ToyDenoiser, ledger=cell_dir / "compute.json") as compute:
            head, _ = run_policy_gradient(compute.metered(problem), log_prob_fn(toy), base, toy.model_config(), cfg, run_dir,
                                          show_progress=False)
        _, x0 = sample_finetuned(problem, head, base, args.eval_samples, 0.0, seed=harness.eval_seed(seed),
                                 batch=4096, show_progress=False)
        sampled = rounds * cfg.groups * 8
    else:
        rounds = 4
        # DiffusionNFT on the eps-model's own forward process; the PG rows' rounds, epochs, batch and lr
        cfg = NFTConfig(rounds=rounds, groups=args.budget // (8 * rounds), group_size=8,
                        epochs=method.params.get("epochs", 2), batch_size=256,
                        lr=3e-4, beta=1.0, sample_batch_size=4096, final_eval=False, seed=seed)
        harness.resumable(method, run_dir)  # clears a killed run
        with harness.count_compute(ToyDenoiser, ledger=cell_dir / "compute.json") as compute:
            head, _ = run_nft(compute.metered(problem), VPPath(cosine_alpha_bar), base, toy.model_config(), cfg,
                              run_dir, show_progress=False)
        _, x0 = sample_finetuned(problem, head, base, args.eval_samples, 0.0, seed=harness.eval_seed(seed),
                                 batch=4096, show_progress=False)
        sampled = rounds * cfg.groups * 8
    metrics = {"mean_reward": float(problem.reward(x0, None).mean()),
               "W1_to_RS_target": wasserstein_1d(x0, *ctx.targets[("rs", 0.0)])}
    if method.kind == "graft":
        key = (method.params["rule"], method.params["t"])
        metrics["W1_to_own_target"] = wasserstein_1d(x0, *ctx.targets[key])
        metrics["W1_floor"] = ctx.floor[key]
    return Cell(metrics, sampled=sampled, compute=compute, extra={"base_sha256": ctx.base_sha256})


def notes(out: Path, long: pd.DataFrame) -> list[str]:
    """Each method's W1 against the target's own Monte-Carlo error."""
    lines = []
    for key, method in METHODS.items():
        w1 = long[(long["method"] == key) & (long["metric"] == "W1_to_own_target")]["value"].tolist()
        floor = long[(long["method"] == key) & (long["metric"] == "W1_floor")]["value"].tolist()
        if len(w1) < 2 or not floor:
            continue
        ci = mean_ci(w1)
        verdict = "at the noise floor" if ci.lo <= floor[0] else "above the noise floor"
        lines.append(f"{method.label}: W1 {ci.mean:.3f} [95% CI {ci.lo:.3f}, {ci.hi:.3f}] vs the target's own "
                     f"error {floor[0]:.3f} → {verdict}")
    # the share of GRAFT's reward gain P-GRAFT keeps at each t (paired by seed); `pgraft toy diagnose`
    # predicts it as R²(t) (core/diagnose.py)
    pairs = [(f"pgraft_{rule}_{t}", f"graft_{rule}") for rule in ("rs", "bon") for t in T_VALUES]
    lines += harness.kept_gain_lines(long, pairs, "mean_reward_gain", {k: m.label for k, m in METHODS.items()})
    return lines


BENCH = Benchmark(
    name="toy", methods=METHODS, metrics=METRICS, run_cell=run_cell, prepare=Context, comparisons=COMPARISONS,
    headline=["W1_to_own_target", "mean_reward"], reward_metric="mean_reward", add_args=add_args, quick=quick,
    describe=describe, notes=notes)

# `--budget-sweep` (benchmarks/budget.py): RS (α=1) at t ∈ {0, 0.25, 0.5, 0.75} × optimizer steps × head
# capacity (full fine-tune, LoRA rank 1), at equal sampled candidates; the distance is W1 to the exact target
SWEEP = budget.Sweep(
    t_values=(0.0,) + T_VALUES, budgets=(3, 10, 30, 100, 1000), reward="mean_reward",
    capacities={"full": {}, "lora1": {"lora_rank": 1}}, distance="W1_to_own_target",
    distance_note="W1_to_own_target: W1 between the fine-tuned sampler and the exact GRS target of its own t "
                  "(the base pool weighted by E[A | x_t]; its Monte-Carlo floor is W1_floor)")
SWEEP_DEFAULTS = {"budget": 8192, "eval_samples": 10000, "pool": 10000, "tails": 8}


def sweep_method(t: float, capacity: dict) -> Method:
    return Method(f"rs_{t}", f"RS t={t}", "graft", {"rule": "rs", "t": t})


if __name__ == "__main__":
    if budget.wants_sweep():
        budget.main(BENCH, SWEEP, sweep_method, __doc__, SWEEP_DEFAULTS)
    else:
        harness.main(BENCH, __doc__)
