"""The benchmark harness every app's benchmark script runs on.

A benchmark is data: a table of :class:`Method` entries, the metrics it reports (and which way is
better), the pairs it compares, and one function ``run_cell(ctx, method, seed, cell_dir)`` that
trains one method with one training seed and evaluates it. The harness does the rest:

- ``--seeds 0,1,2`` runs every (method, seed) *cell*. Evaluation seeds are shared: every method
  trained with seed s is evaluated with ``eval_seed(s)``, so two methods' results at seed s are a
  pair and their difference removes the evaluation noise they share.
- Cells are resumable and can be shared between processes: a finished cell is a ``cell.json``
  (written atomically) and is skipped; a cell another process holds (``core.integrity.exclusive``
  on its directory) is skipped too, so ``python benchmarks/<app>.py`` started twice splits the work;
  a killed cell restarts (GRAFT runs continue from their last checkpointed round).
- Two currencies of budget, side by side: sampled candidates, and compute, counted as rows through
  the model's forward (one row = one sample through one network evaluation): sampling rows (no
  gradient) and training rows (with gradient; a training row costs about 3 forward rows of FLOPs,
  forward plus backward). Plus wall time of the cell (shared machine: indicative only).
- Output in ``--out``: ``cells/<method>/seed_<s>/cell.json``, ``seeds.csv`` (long: one row per
  method × seed × metric), ``summary.csv`` (mean and 95% CI over training seeds), ``verdicts.txt``
  (paired differences, :mod:`pgraft.core.stats`), and ``<name>_seeds.png`` (bars with 95% CIs and
  the seeds as dots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pgraft.core.cli import stop_status
from pgraft.core.errors import RunDirLocked, RunError
from pgraft.core.integrity import exclusive
from pgraft.core.state import atomic_write, read_json, read_table, write_sealed_json
from pgraft.core.stats import family_line, format_verdict, mean_ci, paired_difference

EVAL_SEED_OFFSET = 1000
TRAIN_ROW_FLOPS = 3  # forward + backward ≈ 3 forward passes


def eval_seed(seed: int) -> int:
    """The evaluation seed every method trained with ``seed`` is evaluated with (paired comparisons)."""
    return EVAL_SEED_OFFSET + seed


@dataclass(frozen=True)
class Method:
    """One row of a benchmark: ``kind`` is ``base`` (no training), ``graft`` or ``pg``; ``params``
    are the app's knobs (rule, t, dedup, ...)."""

    key: str
    label: str
    kind: str = "graft"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool = True
    digits: int = 3


@dataclass(frozen=True)
class Comparison:
    """A verdict line: ``a − b`` on ``metric``."""

    a: str
    b: str
    metric: str


@dataclass
class Cell:
    """What ``run_cell`` returns: metric values, the sampled-candidate budget and compute counts."""

    metrics: dict[str, float]
    sampled: int = 0
    compute: "count_compute | None" = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Compute:
    sample_rows: int = 0
    train_rows: int = 0
    seconds: float = 0.0

    @property
    def forward_equivalents(self) -> int:
        return self.sample_rows + TRAIN_ROW_FLOPS * self.train_rows


def _rows(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() else 1
    if isinstance(obj, dict) and obj:
        return _rows(next(iter(obj.values())))
    if isinstance(obj, (list, tuple)) and obj:
        return _rows(obj[0])
    return 0


class count_compute:
    """Count rows through every module whose type is in ``classes`` (the app's network class) while
    the block runs; a call with gradients enabled is a training row, one without a sampling row.

    A global forward hook, so the copies and LoRA heads the training loop makes are counted too.
    With a ``ledger`` file, :meth:`metered` makes the round loop write the running total there each
    time a round is committed, and a resumed cell (``resume=True``) starts from that total: the
    rounds an earlier, killed process committed are counted once, the round it lost is not.
    ``complete`` is False when a resumed cell found no ledger (its count misses the earlier rounds).
    """

    def __init__(self, *classes: type, ledger: Path | None = None, resume: bool = False):
        self.classes = tuple(classes)
        self.ledger = ledger
        self.committed = Compute()
        self.complete = True
        if ledger is not None and resume:
            if ledger.is_file():
                self.committed = Compute(**read_json(ledger, keys=("sample_rows", "train_rows", "seconds")))
            else:
                self.complete = False
        self.live = Compute()  # rows of this process (its time: since __enter__)
        self.compute = Compute()

    def total(self) -> Compute:
        return Compute(self.committed.sample_rows + self.live.sample_rows,
                       self.committed.train_rows + self.live.train_rows,
                       self.committed.seconds + (time.perf_counter() - self._t0))

    def commit(self) -> None:
        if self.ledger is not None:
            total = self.total()
            atomic_write(self.ledger, lambda p: Path(p).write_text(json.dumps(
                {"sample_rows": total.sample_rows, "train_rows": total.train_rows, "seconds": total.seconds})))

    def metered(self, problem):
        """``problem`` with an ``on_round`` that commits the count after every committed round."""
        inner = problem.on_round

        def on_round(round_, result):
            if result.phase == "train":
                self.commit()
            if inner is not None:
                inner(round_, result)

        return dataclasses.replace(problem, on_round=on_round)

    def __enter__(self) -> "count_compute":
        def hook(module, args, kwargs, output):
            if isinstance(module, self.classes):
                # diffusers' transformers are called with keywords only (hidden_states=...)
                rows = _rows(args) or _rows([v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim()])
                if torch.is_grad_enabled():
                    self.live.train_rows += rows
                else:
                    self.live.sample_rows += rows

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.compute = self.total()
        self._handle.remove()
        if exc[0] is None:
            self.commit()


def resumable(method: Method, run_dir: Path) -> bool:
    """Whether a cell's training run continues where a killed process left it: a GRAFT run with a
    saved config resumes from its last checkpointed round; a policy-gradient run (not resumable)
    is cleared and restarts."""
    if method.kind == "graft":
        return (run_dir / "config.json").is_file()
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


@dataclass
class Benchmark:
    """A benchmark as data (see the module docstring)."""

    name: str
    methods: dict[str, Method]
    metrics: dict[str, Metric]
    run_cell: Callable[[Any, Method, int, Path], Cell]
    prepare: Callable[[argparse.Namespace], Any]
    comparisons: list[Comparison] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)   # metrics in the plot
    reward_metric: str | None = None                   # the metric "gain per budget" is reported for
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    quick: Callable[[argparse.Namespace], None] | None = None
    describe: Callable[[argparse.Namespace], dict[str, Any]] | None = None  # settings saved with results
    notes: Callable[[Path, pd.DataFrame], list[str]] | None = None          # extra printed lines


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def parser(bench: Benchmark, doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench") / bench.name)
    ap.add_argument("--seeds", default="0,1,2",
                    help="training seeds, comma list; every method is trained once per seed and evaluated with "
                         f"the shared evaluation seed {EVAL_SEED_OFFSET} + seed (paired comparisons)")
    ap.add_argument("--methods", default=",".join(bench.methods), help=f"comma list of {', '.join(bench.methods)}")
    ap.add_argument("--report", action="store_true", help="only aggregate the finished cells")
    ap.add_argument("--merge", type=Path, default=None,
                    help="aggregate the cells together with an earlier seeds.csv (say docs/results/<name>_seeds.csv): "
                         "its rows of the (method, seed) cells --methods selects here are replaced, the others kept")
    ap.add_argument("--quick", action="store_true", help="tiny budget smoke run (not for conclusions)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    if bench.add_args is not None:
        bench.add_args(ap)
    return ap


def main(bench: Benchmark, doc: str, argv: list[str] | None = None) -> pd.DataFrame:
    """A benchmark's command line: runs the cells still missing, then writes the report. A refusal
    (:class:`~pgraft.core.errors.RunError`: a damaged cell or settings file, a bad base) is one line."""
    try:
        return _main(bench, doc, argv)
    except RunError as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt as err:   # SIGTERM/SIGINT in training (TrainingInterrupted), or Ctrl-C elsewhere
        print(f"stopped: {INTERRUPTED}", file=sys.stderr, flush=True)
        raise SystemExit(stop_status(err)) from None


# what a stopped benchmark keeps, said once (training's own message, printed before it, speaks of
# --resume, which a benchmark does not take: it resumes its cells by itself)
INTERRUPTED = ("finished cells are kept; rerun the same benchmark command as it was (no --resume) to go on: a "
               "GRAFT cell continues from its last saved round, any other cell that was running starts again")


def _main(bench: Benchmark, doc: str, argv: list[str] | None) -> pd.DataFrame:
    args = parser(bench, doc).parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = parse_seeds(args.seeds)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in bench.methods]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {', '.join(unknown)}; choose from {', '.join(bench.methods)}")
    if args.quick and bench.quick is not None:
        bench.quick(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = bench.describe(args) if bench.describe is not None else {}
    settings_path = out / "settings.json"
    if settings_path.is_file() and not args.report:
        saved = read_json(settings_path, keys=("settings",), fix="delete it to rerun with the options given (cells run with other "
                          "settings are kept and would be mixed in) or use another --out")
        if saved.get("settings") != json.loads(json.dumps(settings, default=str)):
            raise SystemExit(f"error: {out} holds cells run with other settings ({settings_path}); "
                             "use another --out or the same options (nothing was changed)")
    elif not args.report:
        atomic_write(settings_path, lambda p: Path(p).write_text(json.dumps(
            {"benchmark": bench.name, "settings": settings, "commit": git_commit()}, indent=2, default=str)))
    if not args.report:
        run_cells(bench, args, methods, seeds, out)
    return report(bench, out, methods, merge=args.merge)


def cell_dir(out: Path, method: str, seed: int) -> Path:
    return out / "cells" / method / f"seed_{seed}"


def run_cells(bench: Benchmark, args, methods: list[str], seeds: list[int], out: Path) -> None:
    ctx = None
    # method by method: a benchmark cut short leaves whole methods missing, not seeds of every method
    todo = [(m, s) for m in methods for s in seeds if not (cell_dir(out, m, s) / "cell.json").is_file()]
    print(f"{bench.name}: {len(methods) * len(seeds) - len(todo)} of {len(methods) * len(seeds)} cells done, "
          f"{len(todo)} to run", flush=True)
    for key, seed in todo:
        d = cell_dir(out, key, seed)
        try:
            with exclusive(d):
                if (d / "cell.json").is_file():       # another process finished it meanwhile
                    continue
                if ctx is None:
                    ctx = bench.prepare(args)
                method = bench.methods[key]
                print(f"-- {method.label} (seed {seed}) --", flush=True)
                t0 = time.time()
                cell = bench.run_cell(ctx, method, seed, d)
                record = {"method": key, "label": method.label, "kind": method.kind, "params": method.params,
                          "seed": seed, "eval_seed": eval_seed(seed), "metrics": cell.metrics,
                          "sampled": cell.sampled, "wall_s": round(time.time() - t0, 1),
                          "compute": None if cell.compute is None else {
                              "sample_rows": cell.compute.compute.sample_rows,
                              "train_rows": cell.compute.compute.train_rows,
                              "forward_equivalents": cell.compute.compute.forward_equivalents,
                              "train_seconds": round(cell.compute.compute.seconds, 1),
                              "complete": cell.compute.complete},
                          "extra": cell.extra, "commit": git_commit()}
                write_sealed_json(d / "cell.json", record)   # a digit changed later is refused, not reported
                shown = ", ".join(f"{k}={v:.4g}" for k, v in cell.metrics.items() if isinstance(v, (int, float)))
                print(f"   {shown}", flush=True)
        except RunDirLocked:
            print(f"-- {key} seed {seed}: held by another process, skipped --", flush=True)


CELL_KEYS = ("method", "label", "seed", "eval_seed", "metrics", "sampled", "wall_s")   # what long_table reads


def load_cells(out: Path, methods: list[str] | None = None) -> list[dict]:
    cells = [read_json(p, keys=CELL_KEYS, fix="delete it and rerun the same command to recompute the cell")
             for p in sorted((out / "cells").glob("*/seed_*/cell.json"))]
    return [c for c in cells if methods is None or c["method"] in methods]


def read_cell_metrics(path: Path) -> pd.DataFrame:
    """A cell's training metrics (``cells/<method>/seed_<s>/run/metrics.csv``); a damaged one is
    refused in one line (the cell is recomputed once its folder is deleted)."""
    return read_table(path, what="run's metrics.csv", fix="delete the cell's folder and rerun the same command")


def long_table(cells: list[dict]) -> pd.DataFrame:
    rows = []
    for c in cells:
        values = dict(c["metrics"])
        values["sampled"] = c["sampled"]
        values["wall_s"] = c["wall_s"]
        if c.get("compute") and c["compute"].get("complete", True):
            values["sample_rows"] = c["compute"]["sample_rows"]
            values["train_rows"] = c["compute"]["train_rows"]
            values["forward_equivalents"] = c["compute"]["forward_equivalents"]
        for metric, value in values.items():
            if isinstance(value, (int, float)) and not math.isnan(value):  # NaN: not measured (e.g. --no-fcd)
                rows.append({"method": c["method"], "label": c["label"], "seed": c["seed"],
                             "eval_seed": c["eval_seed"], "metric": metric, "value": float(value)})
    return pd.DataFrame(rows, columns=["method", "label", "seed", "eval_seed", "metric", "value"])


def add_gains(long: pd.DataFrame, reward: str | None) -> pd.DataFrame:
    """Reward gained over the base (paired by seed) per 1,000 sampled candidates and per 10⁶ forward rows."""
    if reward is None or "base" not in set(long["method"]):
        return long
    wide = long.pivot_table(index=["method", "seed"], columns="metric", values="value")
    if reward not in wide:
        return long
    base = wide.loc["base", reward] if "base" in wide.index.get_level_values(0) else None
    extra = []
    for (method, seed), row in wide.iterrows():
        if method == "base" or base is None or seed not in base.index:
            continue
        gain = row[reward] - base[seed]
        label = long[long["method"] == method]["label"].iloc[0]
        extra.append({"method": method, "label": label, "seed": seed, "eval_seed": eval_seed(seed),
                      "metric": f"{reward}_gain", "value": gain})
        if row.get("sampled", 0) > 0:
            extra.append({"method": method, "label": label, "seed": seed, "eval_seed": eval_seed(seed),
                          "metric": f"{reward}_gain_per_1k_sampled", "value": 1000 * gain / row["sampled"]})
        if row.get("forward_equivalents", 0) > 0:
            extra.append({"method": method, "label": label, "seed": seed, "eval_seed": eval_seed(seed),
                          "metric": f"{reward}_gain_per_1M_fwd", "value": 1e6 * gain / row["forward_equivalents"]})
    return pd.concat([long, pd.DataFrame(extra)], ignore_index=True) if extra else long


def kept_gain_lines(long: pd.DataFrame, pairs: list[tuple[str, str]], gain_metric: str,
                    labels: dict[str, str]) -> list[str]:
    """For each (key, ref) pair, the share of ``ref``'s gain over the base that ``key`` keeps: the
    per-seed ratio gain[key] / gain[ref] (paired by seed), mean and 95% CI over seeds. `pgraft <app>
    diagnose` predicts it as R²(t) for P-GRAFT at t against GRAFT (core/diagnose.py)."""
    gain = long[long["metric"] == gain_metric].pivot_table(index="seed", columns="method", values="value")
    lines = []
    for key, ref in pairs:
        if key in gain and ref in gain:
            ratio = (gain[key] / gain[ref]).dropna().tolist()
            if len(ratio) >= 2:
                ci = mean_ci(ratio)
                lines.append(f"{labels[key]}: keeps {ci.mean:.3f} [95% CI {ci.lo:.3f}, {ci.hi:.3f}] "
                             f"of {labels[ref]}'s reward gain over the base")
    return lines


def summary_table(long: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, metric), group in long.groupby(["method", "metric"], sort=False):
        ci = mean_ci(group.sort_values("seed")["value"].tolist())
        rows.append({"method": method, "label": group["label"].iloc[0], "metric": metric, "n_seeds": ci.n,
                     "mean": ci.mean, "ci_lo": ci.lo, "ci_hi": ci.hi})
    return pd.DataFrame(rows)


def verdict_lines(bench: Benchmark, long: pd.DataFrame) -> list[str]:
    """One paired-difference line per comparison of ``bench``, then the family-wise line (Holm)."""
    lines, labels, diffs = [], [], []
    for comp in bench.comparisons:
        per = {}
        for key in (comp.a, comp.b):
            sel = long[(long["method"] == key) & (long["metric"] == comp.metric)]
            per[key] = dict(zip(sel["seed"].astype(int), sel["value"]))
        if not per[comp.a] or not per[comp.b]:
            continue
        metric = bench.metrics.get(comp.metric, Metric(comp.metric))
        diff = paired_difference(per[comp.a], per[comp.b])
        a, b = bench.methods[comp.a].label, bench.methods[comp.b].label
        lines.append(format_verdict(a, b, metric.label, diff, metric.higher_is_better, metric.digits))
        labels.append(f"{a} − {b} ({metric.label})")
        diffs.append(diff)
    if len(diffs) > 1:
        lines.append(family_line(labels, diffs))
    return lines


def wide_summary(bench: Benchmark, summary: pd.DataFrame, methods: list[str],
                 metrics: dict[str, Metric] | None = None) -> pd.DataFrame:
    """One row per method, one ``mean ± half-width`` column per metric (the README's tables)."""
    rows = []
    for key in methods:
        sel = summary[summary["method"] == key]
        if sel.empty:
            continue
        row = {"method": bench.methods[key].label}
        for metric, spec in (metrics or bench.metrics).items():
            hit = sel[sel["metric"] == metric]
            if hit.empty:
                continue
            r = hit.iloc[0]
            half = (r["ci_hi"] - r["ci_lo"]) / 2
            row[spec.label] = (f"{r['mean']:.{spec.digits}f}" if math.isnan(half)
                               else f"{r['mean']:.{spec.digits}f} ± {half:.{spec.digits}f}")
        for budget in ("sampled", "forward_equivalents"):
            hit = sel[sel["metric"] == budget]
            if not hit.empty and hit.iloc[0]["mean"] > 0:
                row[budget] = f"{hit.iloc[0]['mean']:.3g}"
        row["seeds"] = int(sel["n_seeds"].max())
        rows.append(row)
    table = pd.DataFrame(rows)
    order = ["method"] + [spec.label for spec in (metrics or bench.metrics).values()] + [
        "sampled", "forward_equivalents", "seeds"]
    return table[[c for c in order if c in table.columns]].fillna("–")


def merge_long(earlier: pd.DataFrame, fresh: pd.DataFrame) -> pd.DataFrame:
    """``earlier``'s rows (a seeds.csv) without the (method, seed) cells ``fresh`` holds and without the
    derived gain rows (recomputed over the union by :func:`add_gains`), followed by ``fresh``'s rows."""
    held = set(zip(fresh["method"], fresh["seed"].astype(int)))
    replaced = [(m, int(s)) in held for m, s in zip(earlier["method"], earlier["seed"])]
    kept = earlier[~pd.Series(replaced, index=earlier.index, dtype=bool)]
    kept = kept[~kept["metric"].str.contains("_gain", regex=False)]
    return pd.concat([kept[fresh.columns], fresh], ignore_index=True)


def read_seeds_csv(path: Path) -> pd.DataFrame:
    """A seeds.csv given to --merge; long_table never writes a missing value (NaN metrics are left
    out), so one here is damage."""
    return read_table(path, columns=["label"], numeric=["seed", "eval_seed", "value"], text=["method", "metric"],
                      name=f"--merge {path}", what="seeds.csv",
                      fix="give --merge a seeds.csv a benchmark wrote (nothing was changed)")


def report(bench: Benchmark, out: Path, methods: list[str] | None = None, merge: Path | None = None) -> pd.DataFrame:
    cells = load_cells(out, methods)
    if not cells:
        raise SystemExit(f"error: no finished cells in {out / 'cells'}; run without --report first")
    long = long_table(cells)
    if merge is not None:
        long = merge_long(read_seeds_csv(merge), long)
    long = add_gains(long, bench.reward_metric)
    order = {k: i for i, k in enumerate(bench.methods)}
    long = long.sort_values(["method", "seed"], key=lambda s: s.map(order) if s.name == "method" else s)
    long.to_csv(out / "seeds.csv", index=False)
    summary = summary_table(long)
    summary.to_csv(out / "summary.csv", index=False)
    present = [k for k in bench.methods if k in set(long["method"])]
    table = wide_summary(bench, summary, present)
    headline = {m: bench.metrics[m] for m in bench.headline if m in bench.metrics} or None
    print(f"\n{bench.name}: mean ± 95% CI half-width over training seeds (all metrics: table.csv, summary.csv)")
    print(wide_summary(bench, summary, present, headline).to_string(index=False))
    if bench.reward_metric is not None:
        r = bench.reward_metric
        label = bench.metrics[r].label if r in bench.metrics else r
        gains = {f"{r}_gain": Metric(f"{label} gain over base"),
                 f"{r}_gain_per_1k_sampled": Metric("per 1k sampled", digits=4),
                 f"{r}_gain_per_1M_fwd": Metric("per 10⁶ forward rows", digits=4)}
        gain_table = wide_summary(bench, summary, [k for k in present if k != "base"], gains)
        if len(gain_table.columns) > 2:
            print("\nreward gained per unit of budget (paired with the base by seed; a training row = 3 forward rows)")
            print(gain_table.drop(columns=["sampled", "forward_equivalents"], errors="ignore").to_string(index=False))
    lines = verdict_lines(bench, long)
    if bench.notes is not None:
        lines += bench.notes(out, long)
    if lines:
        print("\npaired differences (same training and evaluation seeds):")
        print("\n".join(lines))
    (out / "verdicts.txt").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "table.csv", index=False)
    plot(bench, long, present, out / f"{bench.name}_seeds.png")
    print(f"\nwrote {out / 'seeds.csv'}, {out / 'summary.csv'}, {out / 'verdicts.txt'}, "
          f"{out / (bench.name + '_seeds.png')}", flush=True)
    return long


def plot(bench: Benchmark, long: pd.DataFrame, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in (bench.headline or list(bench.metrics)) if m in set(long["metric"])]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.9 + 0.33 * len(methods)),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, key in enumerate(methods):
            vals = long[(long["method"] == key) & (long["metric"] == metric)]["value"].tolist()
            if not vals:
                continue
            ci = mean_ci(vals)
            err = None if math.isnan(ci.lo) else [[ci.mean - ci.lo], [ci.hi - ci.mean]]
            ax.barh(i, ci.mean, xerr=err, color=f"C{i % 10}", alpha=0.55, capsize=3)
            ax.plot(vals, [i] * len(vals), "k.", ms=4)
        ax.set_yticks(range(len(methods)), [bench.methods[k].label for k in methods], fontsize=7)
        ax.invert_yaxis()
        spec = bench.metrics.get(metric, Metric(metric))
        ax.set_title(f"{spec.label} ({'higher' if spec.higher_is_better else 'lower'} is better)", fontsize=9)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"{bench.name}: mean and 95% CI over training seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(out: Path, long: pd.DataFrame, path: Path, columns: dict[str, str], title: str,
                methods: dict[str, Method]) -> bool:
    """Candidates' metrics per training round (each cell's run/metrics.csv, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = {k: m.label for k, m in methods.items()}
    present = [k for k in methods if k in set(long["method"])]
    frames = {}
    for key in present:
        parts = [read_cell_metrics(p) for p in sorted((out / "cells" / key).glob("seed_*/run/metrics.csv"))]
        parts = [m[m["phase"] == "train"] for m in parts if "phase" in m and "round" in m]
        if parts:
            frames[key] = pd.concat(parts).groupby("round").mean(numeric_only=True)
    if not frames:
        return False
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 3.6), squeeze=False)
    for ax, (col, name) in zip(axes[0], columns.items()):
        for i, key in enumerate(present):
            if key in frames and col in frames[key]:
                ax.plot(frames[key].index, frames[key][col], "o-", color=f"C{i % 10}", label=labels[key])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
