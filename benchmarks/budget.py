"""The budget sweep every app's benchmark runs with ``--budget-sweep``: when does P-GRAFT win?

P-GRAFT at t > 0 loses reward information (the kept share ≈ R²(t) of GRAFT's gain, the bias side)
but leaves its head an easier law to learn (the variance side). At a converged fine-tune only the
first matters, and t = 0 wins; this sweep looks for the other half, where learning is the
bottleneck: t ∈ {0, t₁, t₂, ...} × fine-tuning budget (optimizer steps per round, at EQUAL
sampled candidates) [× head capacity, e.g. LoRA rank] × training seeds, on the harness
(benchmarks/harness.py: paired evaluation seeds, resumable cells). Method keys encode the cell:
``t0.25_s100`` (t, steps) or ``t0.25_s100_lora1`` (with a capacity).

An app hands in a :class:`Sweep` (the grid, the reward metric, its quality metric, the distance
of the fine-tuned law to its own target where it measures one) and a function that turns a
(t, capacity) into one of its own benchmark methods; its ``run_cell`` then runs with
``train_steps`` = the budget. Outputs (``--results``, default docs/results):

- ``<app>_budget.csv``: long, one row per method × seed × metric, with t, budget and capacity;
- ``<app>_budget.png``: reward (and the distance to the own target) against the budget, one line
  per t, 95% CI bands over training seeds;
- ``<app>_budget_verdicts.txt``: per budget (and capacity), each t > 0 minus t = 0 on the reward,
  paired over seeds with a 95% CI, the Holm family line, the best t per budget, the quality metric
  and the distance per cell, and one summary line answering "does some t > 0 beat t = 0, separated?";
- ``<app>_budget_settings.json``: the sweep's settings (scales are smaller than the main benchmark's).
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import pandas as pd
from harness import Benchmark, Cell, Comparison, Method, Metric

from pgraft.core.state import read_table
from pgraft.core.stats import family_line, format_verdict, holm, mean_ci, paired_difference

FLAG = "--budget-sweep"


@dataclass(frozen=True)
class Sweep:
    """The grid of a budget sweep and what an app reports along it.

    t_values: split times, 0 (GRAFT) first. budgets: optimizer steps per round. capacities: label ->
    params handed to the app's method (``{"": {}}``: one capacity, no label). reward: the reward
    metric the verdicts compare; quality: the app's quality metrics (reported per cell); distance:
    the metric measuring the fine-tuned law's distance to its own target (None: not measured) and
    ``distance_note``, what it is in words."""

    t_values: tuple[float, ...]
    budgets: tuple[int, ...]
    reward: str
    capacities: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    quality: tuple[str, ...] = ()
    distance: str | None = None
    distance_note: str = "not measured"


def method_key(t: float, budget: int, capacity: str = "") -> str:
    """``t0.25_s100`` or, with a capacity label, ``t0.25_s100_lora1``."""
    return f"t{t:g}_s{budget}" + (f"_{capacity}" if capacity else "")


def parse_key(key: str) -> tuple[float, int, str]:
    """Inverse of :func:`method_key`: (t, budget, capacity)."""
    t, s, *cap = key.split("_", 2)
    return float(t[1:]), int(s[1:]), cap[0] if cap else ""


def sweep_methods(sweep: Sweep, to_method: Callable[[float, dict[str, Any]], Method]) -> dict[str, Method]:
    """The base, then one method per (capacity, budget, t); ``to_method(t, capacity_params)`` gives
    the app's own method, whose kind and params the sweep method keeps (plus t, budget, capacity)."""
    out = {"base": Method("base", "base", "base")}
    for cap, cap_params in sweep.capacities.items():
        for budget in sweep.budgets:
            for t in sweep.t_values:
                inner = to_method(t, cap_params)
                key = method_key(t, budget, cap)
                label = f"t={t:g}, {budget} steps" + (f", {cap}" if cap else "")
                out[key] = Method(key, label, inner.kind, {**inner.params, "t": t, "budget": budget,
                                                            "capacity": cap, **cap_params})
    return out


def sweep_comparisons(sweep: Sweep) -> list[Comparison]:
    """Each t > 0 minus t = 0 on the reward, at every budget and capacity."""
    t0 = sweep.t_values[0]
    return [Comparison(method_key(t, b, cap), method_key(t0, b, cap), sweep.reward)
            for cap in sweep.capacities for b in sweep.budgets for t in sweep.t_values[1:]]


def accepted_gap(metrics_csv: Path, model_reward: float) -> float | None:
    """The last training round's accepted-set mean reward minus the fine-tuned model's evaluated
    reward: how far the model is from the law it was fine-tuned on, in reward units. At t = 0 the
    accepted set is a sample of the head's target; at t > 0 its reward overstates the target's
    (selection also picked the base tails t -> 0: the target's is E[h | A], the kept share's part)."""
    if not metrics_csv.is_file():
        return None
    rows = harness.read_cell_metrics(metrics_csv)
    rows = rows[rows.get("phase", "train") == "train"] if "phase" in rows else rows
    if rows.empty or "accepted_reward_mean" not in rows:
        return None
    return float(rows["accepted_reward_mean"].iloc[-1]) - float(model_reward)


def sweep_bench(app: Benchmark, sweep: Sweep, to_method: Callable[[float, dict[str, Any]], Method],
                settings: Callable[[Any], dict[str, Any]] | None = None) -> Benchmark:
    """The app's benchmark with the sweep's methods: a cell runs the app's ``run_cell`` with
    ``train_steps`` set to the cell's budget (the context is shallow-copied, its args replaced)."""
    methods = sweep_methods(sweep, to_method)

    def run_cell(ctx, method: Method, seed: int, cell_dir: Path) -> Cell:
        if method.kind == "base":
            return app.run_cell(ctx, method, seed, cell_dir)
        local = copy.copy(ctx)
        local.args = copy.copy(ctx.args)
        local.args.train_steps = int(method.params["budget"])
        cell = app.run_cell(local, method, seed, cell_dir)
        if sweep.reward in cell.metrics:
            gap = accepted_gap(cell_dir / "run" / "metrics.csv", cell.metrics[sweep.reward])
            if gap is not None:
                cell.metrics["accepted_minus_model"] = gap
        return cell

    def describe(args) -> dict[str, Any]:
        base = app.describe(args) if app.describe is not None else {}
        base.pop("train_steps", None)
        grid = {"t_values": list(sweep.t_values), "budgets (optimizer steps per round)": list(sweep.budgets),
                "capacities": sweep.capacities, "distance": sweep.distance_note}
        return {**base, **(settings(args) if settings else {}), "sweep": grid}

    return Benchmark(name=f"{app.name}_budget", methods=methods, metrics=app.metrics, run_cell=run_cell,
                     prepare=app.prepare, comparisons=sweep_comparisons(sweep), headline=[sweep.reward],
                     reward_metric=sweep.reward, add_args=app.add_args, quick=app.quick, describe=describe)


# ----------------------------------------------------------------------------- outputs
def long_frame(long: pd.DataFrame) -> pd.DataFrame:
    """The harness's long table with t, budget and capacity columns (the base: t = nan, budget 0)."""
    parsed = [parse_key(m) if m != "base" else (math.nan, 0, "") for m in long["method"]]
    out = long.copy()
    out.insert(1, "t", [p[0] for p in parsed])
    out.insert(2, "budget", [p[1] for p in parsed])
    out.insert(3, "capacity", [p[2] for p in parsed])
    return out[["method", "t", "budget", "capacity", "seed", "eval_seed", "metric", "value"]]


def per_seed(frame: pd.DataFrame, key: str, metric: str) -> dict[int, float]:
    sel = frame[(frame["method"] == key) & (frame["metric"] == metric)]
    return dict(zip(sel["seed"].astype(int), sel["value"]))


def cell_summary(frame: pd.DataFrame, key: str, metric: str, digits: int = 3) -> str:
    """``mean [lo, hi]`` over seeds, or ``–`` when the cell has no such metric."""
    vals = list(per_seed(frame, key, metric).values())
    if not vals:
        return "–"
    ci = mean_ci(vals)
    if math.isnan(ci.lo):
        return f"{ci.mean:.{digits}f}"
    return f"{ci.mean:.{digits}f} [{ci.lo:.{digits}f}, {ci.hi:.{digits}f}]"


@dataclass
class Verdicts:
    lines: list[str]
    wins: list[str]  # "t=…, N steps[, cap]" where some t > 0 beats t = 0, separated (one by one)


def verdicts(frame: pd.DataFrame, sweep: Sweep, metrics: dict[str, Metric], app: str) -> Verdicts:
    """The verdict file's lines (see the module docstring)."""
    spec = metrics.get(sweep.reward, Metric(sweep.reward))
    lines, labels, diffs, wins, win_index = [], [], [], [], []
    t0 = sweep.t_values[0]
    for cap in sweep.capacities:
        for budget in sweep.budgets:
            ref = method_key(t0, budget, cap)
            head = f"budget {budget} steps/round" + (f", capacity {cap}" if cap else "")
            if not per_seed(frame, ref, sweep.reward):
                lines.append(f"\n[{head}] t={t0:g} not run yet")
                continue
            lines.append(f"\n[{head}]")
            means = {}
            for t in sweep.t_values:
                key = method_key(t, budget, cap)
                vals = per_seed(frame, key, sweep.reward)
                if not vals:
                    continue
                means[t] = mean_ci(list(vals.values())).mean
                extra = [f"{sweep.reward} {cell_summary(frame, key, sweep.reward, spec.digits)}"]
                for q in sweep.quality:
                    extra.append(f"{q} {cell_summary(frame, key, q, metrics.get(q, Metric(q)).digits)}")
                if sweep.distance:
                    extra.append(f"{sweep.distance} {cell_summary(frame, key, sweep.distance)}")
                lines.append(f"  t={t:g}: " + "; ".join(extra) + f" (n = {len(vals)} seeds)")
            for t in sweep.t_values[1:]:
                key = method_key(t, budget, cap)
                a, b = per_seed(frame, key, sweep.reward), per_seed(frame, ref, sweep.reward)
                if not a:
                    continue
                diff = paired_difference(a, b)
                la, lb = f"t={t:g}", f"t={t0:g}"
                lines.append("  " + format_verdict(la, lb, spec.label, diff, spec.higher_is_better, spec.digits))
                labels.append(f"{la} − {lb} at {budget} steps" + (f" ({cap})" if cap else ""))
                diffs.append(diff)
                if diff.excludes_zero and (diff.mean > 0) == spec.higher_is_better:
                    wins.append(f"t={t:g} at {budget} steps" + (f" ({cap})" if cap else ""))
                    win_index.append(len(diffs) - 1)
            if means:
                pick = max if spec.higher_is_better else min
                best = pick(means, key=means.get)
                lines.append(f"  best t at {budget} steps" + (f" ({cap})" if cap else "")
                             + f": t={best:g} (mean {spec.label} {means[best]:.{spec.digits}f})")
    if diffs:
        lines.append("\n" + family_line(labels, diffs))
    after_holm = holm([d.p for d in diffs]) if diffs else []
    n_kept = sum(after_holm[i] for i in win_index)
    answer = (f"yes: {', '.join(wins)} beat{'s' if len(wins) == 1 else ''} t=0 on reward, separated one by one "
              f"({n_kept} of {len(wins)} stay separated after Holm)") if wins else (
        "no: no t > 0 beats t = 0 on reward, separated, at any budget"
        + (" or capacity" if len(sweep.capacities) > 1 else "") + " of the sweep")
    lines.insert(0, f"{app}: is there a budget" + (" (or capacity)" if len(sweep.capacities) > 1 else "")
                 + f" where some t > 0 beats t = 0 on reward, separated? {answer}")
    lines.insert(1, f"distance to own target: {sweep.distance_note}")
    if per_seed(frame, "base", sweep.reward):
        base = [f"{sweep.reward} {cell_summary(frame, 'base', sweep.reward, spec.digits)}"]
        base += [f"{q} {cell_summary(frame, 'base', q, metrics.get(q, Metric(q)).digits)}" for q in sweep.quality]
        lines.insert(2, "base (no fine-tuning; a t whose reward is below it lost reward): " + "; ".join(base))
    return Verdicts(lines, wins)


def plot(frame: pd.DataFrame, sweep: Sweep, metrics: dict[str, Metric], path: Path, title: str) -> None:
    """Reward (and the distance, when measured) against the budget: one line per t, 95% CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [sweep.reward] + ([sweep.distance] if sweep.distance else [])
    caps = list(sweep.capacities)
    fig, axes = plt.subplots(len(rows), len(caps), figsize=(max(4.6 * len(caps), 7.5), 3.4 * len(rows)),
                             squeeze=False)
    for i, metric in enumerate(rows):
        for j, cap in enumerate(caps):
            ax = axes[i][j]
            for c, t in enumerate(sweep.t_values):
                xs, mid, lo, hi = [], [], [], []
                for b in sweep.budgets:
                    vals = list(per_seed(frame, method_key(t, b, cap), metric).values())
                    if not vals:
                        continue
                    ci = mean_ci(vals)
                    xs.append(b)
                    mid.append(ci.mean)
                    lo.append(ci.mean if math.isnan(ci.lo) else ci.lo)
                    hi.append(ci.mean if math.isnan(ci.hi) else ci.hi)
                if xs:
                    ax.plot(xs, mid, "o-", color=f"C{c}", label=f"t={t:g}")
                    ax.fill_between(xs, lo, hi, color=f"C{c}", alpha=0.18)
            base = list(per_seed(frame, "base", metric).values())
            if base:
                ax.axhline(mean_ci(base).mean, color="k", ls=":", lw=1, label="base")
            ax.set_xscale("log")
            ax.set_xlabel("optimizer steps per round (equal sampled candidates)")
            # a distance without a Metric entry (accepted_minus_model) is lower-is-better
            spec = metrics.get(metric, Metric(metric, higher_is_better=metric != sweep.distance))
            ax.set_ylabel(f"{spec.label} ({'higher' if spec.higher_is_better else 'lower'} is better)", fontsize=8)
            if cap:
                ax.set_title(cap, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(long: pd.DataFrame, sweep: Sweep, metrics: dict[str, Metric], app: str, out: Path,
                  results: Path) -> Verdicts:
    """Write the four result files of the module docstring to ``results``; print the verdicts."""
    results.mkdir(parents=True, exist_ok=True)
    frame = long_frame(long)
    frame.to_csv(results / f"{app}_budget.csv", index=False)
    found = verdicts(frame, sweep, metrics, app)
    text = "\n".join(found.lines) + "\n"
    (results / f"{app}_budget_verdicts.txt").write_text(text)
    plot(frame, sweep, metrics, results / f"{app}_budget.png",
         f"{app}: reward vs fine-tuning budget, one line per t (mean, 95% CI over training seeds)")
    if (out / "settings.json").is_file():
        shutil.copyfile(out / "settings.json", results / f"{app}_budget_settings.json")
    print("\n" + text, flush=True)
    print(f"wrote {results}/{app}_budget.csv, {app}_budget.png, {app}_budget_verdicts.txt, "
          f"{app}_budget_settings.json", flush=True)
    return found


def wants_sweep(argv: list[str] | None = None) -> bool:
    return FLAG in (sys.argv[1:] if argv is None else argv)


def main(app: Benchmark, sweep: Sweep, to_method: Callable[[float, dict[str, Any]], Method], doc: str,
         defaults: dict[str, Any], argv: list[str] | None = None) -> pd.DataFrame:
    """``python benchmarks/<app>.py --budget-sweep [harness options] [--results DIR]``: the
    app's options with the sweep's ``defaults`` (smaller scales); ``--out`` defaults to
    runs/bench/<app>_budget."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != FLAG]
    bench = sweep_bench(app, sweep, to_method)
    inner_add = bench.add_args

    def add_args(ap) -> None:
        if inner_add is not None:
            inner_add(ap)
        ap.add_argument("--results", type=Path, default=Path("docs/results"),
                        help="folder for <app>_budget.csv / .png / _verdicts.txt / _settings.json")
        # after the app's own add_args, which may narrow --methods to its table's defaults
        ap.set_defaults(out=Path("runs/bench") / bench.name, methods=",".join(bench.methods), **defaults)

    bench = Benchmark(**{**bench.__dict__, "add_args": add_args})
    args = harness.parser(bench, doc).parse_args(argv)
    long = harness.main(bench, doc, argv)
    write_outputs(long, sweep, bench.metrics, app.name, args.out, args.results)
    return long


# ----------------------------------------------------------------------------- validation of the probe
def validation_lines(frame: pd.DataFrame, probes: dict[int, pd.DataFrame], sweep: Sweep, capacity: str,
                     metrics: dict[str, Metric], app: str) -> list[str]:
    """For each budget N with a probe table (``pgraft <app> diagnose --train-steps N``'s probe.csv):
    the recommended t (core.diagnose.recommend_budget_t) against the sweep's best measured t at N,
    both measured rewards with their 95% CIs, and recommended − best paired over seeds."""
    from pgraft.core.diagnose import recommend_budget_t

    spec = metrics.get(sweep.reward, Metric(sweep.reward))
    lines, hits = [], 0
    for n, pred in sorted(probes.items()):
        t_rec, reason = recommend_budget_t(pred)
        means = {}
        for t in sweep.t_values:
            vals = per_seed(frame, method_key(t, n, capacity), sweep.reward)
            if vals:
                means[t] = mean_ci(list(vals.values())).mean
        if not means:
            lines.append(f"{n} steps: recommended t = {t_rec:g}; the sweep has no cells at this budget yet")
            continue
        pick = max if spec.higher_is_better else min
        best = pick(means, key=means.get)
        predicted = ", ".join(f"t={t:g}: {g:.4g}" for t, g in zip(pred["t"], pred["predicted_gain"]))
        line = (f"{n} steps: recommended t = {t_rec:g} (predicted one-round gains {predicted}); best measured t = "
                f"{best:g}; measured {spec.label}: recommended "
                f"{cell_summary(frame, method_key(t_rec, n, capacity), sweep.reward, spec.digits)}, best "
                f"{cell_summary(frame, method_key(best, n, capacity), sweep.reward, spec.digits)}")
        if t_rec != best and method_key(t_rec, n, capacity) in set(frame["method"]):
            diff = paired_difference(per_seed(frame, method_key(t_rec, n, capacity), sweep.reward),
                                     per_seed(frame, method_key(best, n, capacity), sweep.reward))
            line += "; " + format_verdict("recommended", "best", spec.label, diff, spec.higher_is_better, spec.digits)
            hits += int(not diff.excludes_zero)
        else:
            hits += int(t_rec == best)
        lines.append(line)
    done = [n for n in probes if any(per_seed(frame, method_key(t, n, capacity), sweep.reward)
                                      for t in sweep.t_values)]
    lines.insert(0, f"{app}: recommended t (pgraft {app} diagnose --train-steps N) vs the budget sweep's best "
                    f"measured t" + (f", capacity {capacity}" if capacity else "") + f": {hits} of {len(done)} "
                    "budgets agree (the same t, or a recommended t whose paired difference to the best is "
                    "not separated)")
    lines.insert(1, "no sweep budget was used to design the probe (it was designed from the bias/variance argument "
                    "and tested on the synthetic drift world of tests/core/test_budget_probe.py only)")
    return lines


def validate_main(argv: list[str] | None = None) -> None:
    """``python benchmarks/budget.py APP --probes DIR [--results docs/results]``: read
    ``DIR/s<N>/probe.csv`` for every budget N and write ``<app>_budget_validation.txt``."""
    import argparse
    import importlib

    ap = argparse.ArgumentParser(description=validate_main.__doc__)
    ap.add_argument("app")
    ap.add_argument("--probes", type=Path, action="append", required=True,
                    help="a folder of s<N>/probe.csv; repeat it with one --capacity each for several capacities")
    ap.add_argument("--results", type=Path, default=Path("docs/results"))
    ap.add_argument("--capacity", action="append", default=None,
                    help="the sweep capacity each --probes ran with (default: the sweep's first)")
    args = ap.parse_args(argv)
    module = importlib.import_module(args.app)
    sweep: Sweep = module.SWEEP
    capacities = args.capacity or [next(iter(sweep.capacities))] * len(args.probes)
    if len(capacities) != len(args.probes):
        raise SystemExit(f"error: --capacity given {len(capacities)} times for {len(args.probes)} --probes")
    frame = read_table(args.results / f"{args.app}_budget.csv", columns=["capacity", "budget"],
                       numeric=["seed", "value"], text=["method", "metric"], what=f"{args.app}_budget.csv",
                       fix="rerun the sweep's report (--budget-sweep --report) to rewrite it",
                       keep_default_na=False, na_values=[""])
    frame["capacity"] = frame["capacity"].fillna("").astype(str)
    lines = []
    for folder, capacity in zip(args.probes, capacities):
        probes = {int(p.parent.name[1:]): read_table(p, columns=["predicted_gain"], numeric=["t", "train_steps"],
                                                     what="probe.csv of `pgraft <app> diagnose --train-steps N`",
                                                     fix="delete it and rerun that diagnose")
                  for p in sorted(folder.glob("s*/probe.csv")) if p.parent.name[1:].isdigit()}
        if not probes:
            raise SystemExit(f"error: --probes {folder}: no s<N>/probe.csv inside")
        lines += validation_lines(frame, probes, sweep, capacity, module.BENCH.metrics, args.app) + [""]
    text = "\n".join(lines) + "\n"
    (args.results / f"{args.app}_budget_validation.txt").write_text(text)
    print(text + f"wrote {args.results / (args.app + '_budget_validation.txt')}")


if __name__ == "__main__":   # a refusal (a damaged table): one line
    from pgraft.core.cli import script_boundary

    sys.exit(script_boundary(validate_main))
