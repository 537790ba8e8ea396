"""The single-seed flow benchmark (``benchmarks/flow.py``, paper Table 5 at small scale): FID vs
FLOPs/image of the base flow at several Euler step counts against inverse noise correction (noise
flow -> frozen base) at several noise-flow step counts, decided from one run.

The run is a sequence of stages over one :class:`Run` (:func:`stage_base`, :func:`stage_invert`,
:func:`stage_correct`, :func:`stage_evaluate`, :func:`stage_inception`, :func:`stage_fit`,
:func:`stage_grids`, :func:`stage_summary`, :func:`stage_print`); the script holds their table and
calls :func:`main`. Each stage that trains or samples resumes from its files in ``--out``. The
claims (:func:`claims`), their printout (:func:`describe`), the plot and the ``--report`` path
(:func:`summarize_csvs`, CSVs of ``pgraft flow evaluate``) are plain functions of a results table.
The paper's full protocol, with intervals over seeds, is :mod:`pgraft.apps.flow.protocol`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from pgraft.core.inversion import read_shards
from pgraft.core.noise_correction import load_correction, train_correction
from pgraft.core.pretrain import trained_steps
from pgraft.core.sampling import FLOW_STEPS
from pgraft.core.state import module_device, read_table, resolve_device

from .correct import NOISE_MODELS, InvertConfig, correction_config, invert_dataset
from .data import load_fashion_mnist
from .evaluate import EvalConfig, Evaluator, evaluate
from .pretrain import FlowPretrainConfig, load_base, load_training_images, pretrain_flow, pretraining_finished
from .protocol import OneLineParser, parse_ints
from .sample import SamplerSpec, images_to_grid, sample_images

FLOPS_BUDGET = 1.35      # corrected FLOPs/image may be at most this multiple of the base row's
FID_DROP = 0.25          # ... and must lower FID by at least this fraction


def quick_images(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST downsampled 28 -> 8 (antialiased) for the tiny preset: [n, 1, 8, 8], labels [n]."""
    x, y = load_fashion_mnist(split, limit=n)
    return F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True).clamp(-1, 1), y


def noise_fit(base, noise_model, invert_dir: Path, invert_steps: int, noise_steps: list[int], noise_sampler: str,
              evaluator, n: int, seed: int) -> dict:
    """How well the noise flow fits the inverted-noise law, and how far correction could go.

    - ``rms``: root-mean-square value of the inverted noises, of N(0, I) draws and of the noise
      flow's output at each step count (a flow that shrinks its samples toward the mean shows a
      lower rms, and the base then decodes blurred, average images);
    - ``oracle``: feature metrics of the base decoding the inverted training noises themselves
      (reconstructions of training images): what a perfect noise flow would reach, an upper bound.

    Returns (that dict, the reconstructions, the training-set indices of the images they reconstruct).
    """
    from pgraft.core.sampling import sample
    from pgraft.core.schedules import flow_times

    shards = read_shards(invert_dir)
    device = module_device(base)
    inverted = shards["noise"][:n].to(device)
    z = torch.randn(inverted.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rms = {"inverted": inverted.pow(2).mean().sqrt().item(), "gaussian": z.pow(2).mean().sqrt().item()}
    with torch.no_grad():
        for k in noise_steps:
            for name in dict.fromkeys(("euler", noise_sampler)):  # Euler as the reference, once
                x = sample(noise_model, z, flow_times(k), FLOW_STEPS[name])
                rms[f"noise_flow_{name}_{k}"] = x.pow(2).mean().sqrt().item()
        recon = torch.cat([sample(base, inverted[i:i + 250], flow_times(invert_steps), FLOW_STEPS["euler"]).clamp(-1, 1).cpu()
                           for i in range(0, len(inverted), 250)])
    row = evaluator.row(recon, with_inception=False)
    oracle = {"config": f"inverted training noise -> base euler-{invert_steps}", "n": len(inverted),
              **{k: row[k] for k in ("feature_fid", "feature_kid", "precision", "recall")}}
    return {"rms": rms, "oracle": oracle}, recon, shards["index"][:n].long()


def claims(table: pd.DataFrame, metric: str, invert_steps: int) -> dict:
    """Relative FID change and FLOPs ratio of each corrected row against the base at the inverted
    step count, and the two claims of the issue, decided from ``metric`` (NaN rows ignored)."""
    t = table.dropna(subset=[metric])
    base = t[t.noise_steps == 0]
    corr = t[t.noise_steps > 0]
    ref = base[base.steps == invert_steps]
    if ref.empty or corr.empty:
        return {"metric": metric, "available": False}
    ref = ref.iloc[0]
    rows = []
    for _, r in corr.iterrows():
        same = base[base.steps == r.steps]  # the plain base with the corrected row's own base steps
        rows.append({"config": r.config, "flops_ratio": r.flops_per_image / ref.flops_per_image,
                     "relative_change": (r[metric] - ref[metric]) / ref[metric], metric: r[metric],
                     "change_vs_same_base": (float((r[metric] - same[metric].iloc[0]) / same[metric].iloc[0])
                                             if len(same) else None)})
    in_budget = [r for r in rows if r["flops_ratio"] <= FLOPS_BUDGET + 1e-9]
    best_base = base.loc[base[metric].idxmin()]
    beats_best = corr[(corr[metric] <= best_base[metric]) & (corr.flops_per_image < best_base.flops_per_image)]
    best_in_budget = min(in_budget, key=lambda r: r["relative_change"]) if in_budget else None
    return {
        "metric": metric, "available": True,
        "reference": {"config": ref.config, metric: float(ref[metric]), "flops_per_image": int(ref.flops_per_image)},
        "corrected": rows,
        "best_in_budget": best_in_budget,
        "lowers_fid_25pct_within_1.35x": bool(best_in_budget is not None and best_in_budget["relative_change"] <= -FID_DROP),
        "best_base": {"config": best_base.config, metric: float(best_base[metric]),
                      "flops_per_image": int(best_base.flops_per_image)},
        "reaches_best_base_at_fewer_flops": bool(len(beats_best)),
        "rows_beating_best_base": list(beats_best.config),
    }


def describe(c: dict, n_text: str) -> list[str]:
    """Printable lines of one metric's :func:`claims`: every corrected row against the reference and
    the two verdicts (``n_text``: the feature space and sample counts behind the metric)."""
    if not c["available"]:
        return [f"{c['metric']}: not available"]
    m = c["metric"]
    lines = [f"{m} ({n_text}); reference {c['reference']['config']} = {c['reference'][m]:.4g} "
             f"at {c['reference']['flops_per_image'] / 1e9:.3f} GFLOPs/image"]
    for r in c["corrected"]:
        same = r.get("change_vs_same_base")
        lines.append(f"  {r['config']}: {m} {r[m]:.4g} ({100 * r['relative_change']:+.1f}%), "
                     f"FLOPs x{r['flops_ratio']:.3f}"
                     + (f"; {100 * same:+.1f}% vs the base with the same Euler steps" if same is not None else ""))
    b = c["best_in_budget"]
    verdict = "YES" if c["lowers_fid_25pct_within_1.35x"] else "NO"
    lines.append(f"  lowers {m} >= 25% at <= 1.35x FLOPs: {verdict}"
                 + (f" (best within budget {100 * b['relative_change']:+.1f}% at x{b['flops_ratio']:.3f})" if b else
                    " (no corrected row within budget)"))
    bb = c["best_base"]
    verdict = "YES" if c["reaches_best_base_at_fewer_flops"] else "NO"
    lines.append(f"  reaches the base's best {m} ({bb['config']}: {bb[m]:.4g} at {bb['flops_per_image'] / 1e9:.3f} "
                 f"GFLOPs) at fewer FLOPs: {verdict}" + (f" ({', '.join(c['rows_beating_best_base'])})"
                                                       if c["reaches_best_base_at_fewer_flops"] else ""))
    return lines


def sample_counts(n: int, n_reference: int, n_inception: int, n_inception_reference: int) -> dict[str, str]:
    """Per metric, the feature space and sample counts stated next to every FID (titles, printouts)."""
    return {"feature_fid": f"classifier features, {n} samples vs {n_reference} test images",
            "fid": f"Inception-v3, {n_inception} samples vs {n_inception_reference} test images"}


def print_results(table: pd.DataFrame, summary: dict, n_text: dict[str, str], cols: list[str]) -> None:
    """The results table (``cols``) and, per metric, the claims' verdicts."""
    pd.set_option("display.width", 200)
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for m in ("feature_fid", "fid"):
        for line in describe(summary[m], n_text[m]):
            print(line)


def reference_lines(fit: dict) -> dict[str, dict[str, float]]:
    """Horizontal lines of the plot, per metric: what a perfect noise flow reaches (the base decoding
    the inverted training noises) and, for Inception, the training images themselves (the floor)."""
    lines = {"feature_fid": {"perfect noise flow (reconstructions)": fit["oracle"]["feature_fid"]}}
    if "inception_train_images" in fit:
        lines["fid"] = {"training images (floor)": fit["inception_train_images"]["fid"],
                        "perfect noise flow (reconstructions)": fit["inception_reconstructions"]["fid"]}
    return lines


def plot(table: pd.DataFrame, path: Path, n_text: dict[str, str], lines: dict[str, dict[str, float]] | None = None) -> None:
    """FID (feature and, when measured, Inception) against counted GFLOPs/image: the base's Euler steps
    as one line, each corrected family (source, base steps) as another, ``lines`` as horizontal
    references; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # file-only backend, imported when a plot is drawn, not with the app
    import matplotlib.pyplot as plt

    metrics = [m for m in ("feature_fid", "fid") if table[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        t = table.dropna(subset=[m])
        base, corr = t[t.noise_steps == 0], t[t.noise_steps > 0]
        ax.plot(base.flops_per_image / 1e9, base[m], "o-", label="base (Euler steps)")
        for _, r in base.iterrows():
            ax.annotate(str(r.steps), (r.flops_per_image / 1e9, r[m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        keys = ["source", "steps"] if "source" in corr else ["steps"]
        for j, (key, grp) in enumerate(corr.groupby(keys)):
            color = f"C{3 + j}"
            what = f"{key[0]}: " if len(keys) == 2 else ""
            ax.plot(grp.flops_per_image / 1e9, grp[m], "s-", color=color,
                    label=f"{what}noise-corrected + base euler-{key[-1]} (noise steps)")
            for _, r in grp.iterrows():
                ax.annotate(str(r.noise_steps), (r.flops_per_image / 1e9, r[m]), fontsize=7, color=color,
                            xytext=(3, -9), textcoords="offset points")
        for j, (label, value) in enumerate((lines or {}).get(m, {}).items()):
            ax.axhline(value, color="grey", ls=("--", ":")[j % 2], lw=1, label=f"{label}: {value:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("GFLOPs / image (counted)")
        ax.set_ylabel(m)
        ax.set_title(f"{m} ({n_text[m]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize_csvs(csvs: list[Path], out: Path, fid_lines: list[str]) -> None:
    """Claims, plot and summary from ``pgraft flow evaluate`` CSVs of one base (rows of several files are
    pooled; corrected rows are labelled by their file). The reference is the plain base at the corrected
    rows' smallest base step count (the inverted one, as `pgraft flow evaluate` runs them by default).
    Samples nothing: for runs made elsewhere."""
    missing = [str(p) for p in csvs if not p.is_file()]
    if missing:
        raise SystemExit(f"no such evaluation CSV: {', '.join(missing)}")
    table = pd.concat([read_table(p, columns=["config", "n_samples"], numeric=["noise_steps", "steps", "flops_per_image"],
                                  what="CSV of `pgraft flow evaluate`", fix="give --report the CSVs `pgraft flow "
                                  "evaluate` wrote (nothing was changed)").assign(source=p.stem) for p in csvs],
                      ignore_index=True)
    corrected = table.noise_steps > 0  # rows of different noise flows may share a sampler label
    table.loc[corrected, "config"] = table.loc[corrected, "source"] + ": " + table.loc[corrected, "config"]
    table = table.drop_duplicates(subset=["config"], keep="first").reset_index(drop=True)  # a base row seen twice
    base_rows = table[table.noise_steps == 0]
    invert_steps = int(table.loc[table.noise_steps > 0, "steps"].min()) if (table.noise_steps > 0).any() else 0
    if base_rows.empty or invert_steps not in set(base_rows.steps):
        raise SystemExit(f"the CSVs need a plain-base row at the corrected rows' base steps ({invert_steps})")
    lines: dict[str, dict[str, float]] = {"fid": {}}
    for item in fid_lines:
        label, _, value = item.rpartition("=")
        try:
            if not label:
                raise ValueError(item)
            lines["fid"][label] = float(value)
        except ValueError:
            raise SystemExit(f"--fid-line takes LABEL=VALUE with a number, got {item!r}") from None
    n_text = sample_counts(*(int(table[c].max()) for c in ("n_samples", "n_reference", "n_inception",
                                                            "n_reference_inception")))
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    plot(table, out / "flow.png", n_text, lines)
    summary = {m: claims(table, m, invert_steps) for m in ("feature_fid", "fid")}
    (out / "summary.json").write_text(json.dumps({**summary, "sources": [str(p) for p in csvs]}, indent=2, default=str))
    print_results(table, summary, n_text, ["source", "config", "flops_per_image", "feature_fid", "precision", "recall",
                                           "fid", "kid", "n_samples", "n_inception"])
    print(f"wrote {out / 'results.csv'}, {out / 'flow.png'}, {out / 'summary.json'}")



# ----------------------------------------------------------------------------- presets and the run
@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark preset; the command line overrides the step counts, ``n`` and the
    inversion and correction sizes it names."""

    out: str                          # default --out
    base_steps: str                   # Euler step counts of the plain-base rows
    invert_steps: int                 # base Euler steps inverted through (and used after correction)
    noise_steps: str                  # noise-flow step counts of the corrected rows
    extra_corrected_steps: str        # base step counts after the noise flow besides the inverted one
    n: int                            # samples per row (feature metrics)
    inception: bool                   # Inception FID/KID on key rows unless --inception/--no-inception
    pretrain: FlowPretrainConfig      # the base pretrained when --base is not given
    images: tuple[int, int] | None    # (train, test) Fashion-MNIST images at 8x8, or None: the base's data
    invert_limit: int
    shard_size: int
    invert_batch: int
    correct_preset: str
    correct_steps: int
    reference_n: int
    classifier_steps: int
    show_progress: bool


PRESETS = {
    "quick": Preset(out="runs/bench/flow-quick", base_steps="2,3,5,8,16", invert_steps=5, noise_steps="1,2,4",
                    extra_corrected_steps="", n=200, inception=False,
                    pretrain=FlowPretrainConfig(preset="tiny", steps=400, batch_size=32, lr=2e-3, limit=600),
                    images=(600, 400), invert_limit=300, shard_size=100, invert_batch=100,
                    correct_preset="noise-tiny", correct_steps=300, reference_n=400, classifier_steps=300,
                    show_progress=False),
    "default": Preset(out="runs/bench/flow", base_steps="5,10,13,20,40", invert_steps=10, noise_steps="2,3,5,10",
                      extra_corrected_steps=",13,20", n=1000, inception=True, pretrain=FlowPretrainConfig(),
                      images=None, invert_limit=2000, shard_size=250, invert_batch=125,
                      correct_preset="noise-small", correct_steps=6000, reference_n=5000, classifier_steps=2000,
                      show_progress=True),
}


@dataclass
class Run:
    """One benchmark run: its resolved rows and data (from :func:`make_run`) and what each stage
    leaves for the next ones (None until that stage ran)."""

    args: argparse.Namespace
    preset: Preset
    device: torch.device
    out: Path
    t0: float
    base_steps: list[int]
    invert_steps: int
    noise_steps: list[int]
    corrected_base_steps: list[int]
    n: int
    inception: bool
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    ref_x: torch.Tensor | None = None
    ref_y: torch.Tensor | None = None
    base_dir: Path | None = None
    base: Any = None
    base_cfg: Any = None
    base_trained: int = 0
    report: Any = None                 # the inversion report
    corr_cfg: Any = None
    noise_model: Any = None
    eval_cfg: EvalConfig | None = None
    evaluator: Evaluator | None = None
    table: pd.DataFrame | None = None
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    recon: torch.Tensor | None = None
    recon_index: torch.Tensor | None = None
    n_text: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> str:
        return f"[{time.time() - self.t0:.0f}s]"


def make_run(args: argparse.Namespace, device: torch.device) -> Run:
    """The rows of the run from the preset and the flags: every corrected row's base step count also
    gets its plain-base row, and the inverted step count is always a base row."""
    p = PRESETS["quick" if args.quick else "default"]
    out = args.out or Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    invert_steps = args.invert_steps or p.invert_steps
    corrected_base_steps = args.corrected_base_steps or parse_ints(f"{invert_steps}" + p.extra_corrected_steps)
    base_steps = sorted({*(args.base_steps or parse_ints(p.base_steps)), invert_steps, *corrected_base_steps})
    run = Run(args=args, preset=p, device=device, out=out, t0=t0, base_steps=base_steps, invert_steps=invert_steps,
              noise_steps=args.noise_steps or parse_ints(p.noise_steps), corrected_base_steps=corrected_base_steps,
              n=args.n or p.n, inception=args.inception if args.inception is not None else p.inception)
    if p.images is not None:  # the tiny preset works at 8x8
        run.train_x, run.train_y = quick_images("train", p.images[0])
        run.ref_x, run.ref_y = quick_images("test", p.images[1])
    run.base_dir = args.base or out / "base"
    return run


# ----------------------------------------------------------------------------- stages
def stage_base(run: Run) -> None:
    """Pretrain the base in --out (resumed) unless --base names one, and load it."""
    cfg = run.preset.pretrain
    if run.args.base is None and not pretraining_finished(run.base_dir):
        print(f"pretraining the {cfg.preset} base in {run.base_dir} ({cfg.steps} steps)")
        pretrain_flow(cfg, run.base_dir, show_progress=run.preset.show_progress, images=run.train_x,
                      device=run.device)
    base, run.base_cfg = load_base(run.base_dir)
    run.base = base.to(run.device)
    run.base_trained = trained_steps(run.base_dir)
    print(f"base {run.base_dir}: {run.base.num_parameters():,} parameters, preset {run.base_cfg.preset}, trained "
          f"{run.base_trained} of {run.base_cfg.steps} configured steps  {run.elapsed()}")


def stage_invert(run: Run) -> None:
    """Invert training images through the base's Euler sampler into --out/invert (resumed)."""
    a, p = run.args, run.preset
    inv_cfg = InvertConfig(steps=run.invert_steps, limit=a.invert_limit or p.invert_limit, shard_size=p.shard_size,
                           batch_size=p.invert_batch, tol=a.invert_tol, max_iter=a.invert_max_iter, seed=a.seed)
    run.report = invert_dataset(run.base_dir, run.out / "invert", inv_cfg, show_progress=p.show_progress,
                                images=run.train_x, device=run.device)
    r = run.report
    print(f"inverted {r.n_images} training images through {run.invert_steps} Euler steps: reconstruction "
          f"mean |err| {r.mean_abs:.2e}, max {r.max_abs:.2e}, worst residual {r.max_residual:.2e} {run.elapsed()}")


def stage_correct(run: Run) -> None:
    """Train the noise flow on the inverted noises into --out/correct (resumed), and load it."""
    a, p = run.args, run.preset
    run.corr_cfg = correction_config(preset=p.correct_preset, steps=a.correct_steps or p.correct_steps,
                                     coupling=a.coupling, seed=a.seed)
    train_correction(run.out / "invert", run.out / "correct", run.corr_cfg, NOISE_MODELS,
                     show_progress=p.show_progress, device=run.device)
    run.noise_model = load_correction(run.out / "correct", NOISE_MODELS).noise_model.to(run.device)
    ratio = run.noise_model.num_parameters() / run.base.num_parameters()
    print(f"noise flow {run.corr_cfg.preset}: {run.noise_model.num_parameters():,} parameters "
          f"({ratio:.2f}x the base)  {run.elapsed()}")


def inception_rows(table: pd.DataFrame, invert_steps: int, base_steps: list[int]) -> set[str]:
    """The configs worth Inception (~0.4 s/image): the base at the inverted and at its largest step
    count, the corrected row with the best feature FID within the FLOPs budget, and the cheapest
    corrected row that reaches the base's best feature FID."""
    ref_flops = table.loc[(table.noise_steps == 0) & (table.steps == invert_steps), "flops_per_image"].iloc[0]
    corr = table[table.noise_steps > 0]
    in_budget = corr[corr.flops_per_image <= FLOPS_BUDGET * ref_flops]
    key = {f"base euler-{invert_steps}", f"base euler-{max(base_steps)}"}
    if len(in_budget):
        key.add(in_budget.loc[in_budget.feature_fid.idxmin(), "config"])
    beating = corr[corr.feature_fid <= table[table.noise_steps == 0].feature_fid.min()]
    if len(beating):
        key.add(beating.loc[beating.flops_per_image.idxmin(), "config"])
    return key


def stage_evaluate(run: Run) -> None:
    """Sample every row from the same z seed, feature metrics for all, Inception for the key rows
    (:func:`inception_rows`) when asked; writes --out/results.csv."""
    a, p = run.args, run.preset
    run.eval_cfg = EvalConfig(n=run.n, reference_n=p.reference_n, inception=run.inception,
                              inception_n=min(a.inception_n, run.n),
                              inception_weights=None if a.inception_weights is None else str(a.inception_weights),
                              classifier_steps=p.classifier_steps, seed=a.seed)
    run.evaluator = Evaluator.build(run.eval_cfg, run.base_cfg, run.out / "cache", run.ref_x, run.ref_y,
                                    show_progress=p.show_progress, train_images=run.train_x,
                                    train_labels=run.train_y, device=run.device)
    specs = [SamplerSpec(s) for s in run.base_steps] + [
        SamplerSpec(b, noise_steps=k, noise_sampler=a.noise_sampler)
        for b in run.corrected_base_steps for k in run.noise_steps]
    rows = evaluate(specs, run.base, run.evaluator, run.noise_model, lambda spec: False, seed=a.seed + 1,
                    show_progress=p.show_progress, keep_samples=run.samples)
    table = run.table = pd.DataFrame(rows)
    print(f"feature metrics of {len(rows)} configurations done  {run.elapsed()}")
    if run.inception:
        key = inception_rows(table, run.invert_steps, run.base_steps)
        for label in table.config:
            if label in key:
                i = table.index[table.config == label][0]
                for k, v in run.evaluator.inception_metrics(run.samples[label], p.show_progress).items():
                    table.loc[i, k] = v
                print(f"Inception metrics of {label}: FID {table.loc[i, 'fid']:.3f} on {run.eval_cfg.inception_n} "
                      f"samples  {run.elapsed()}")
    table.to_csv(run.out / "results.csv", index=False)


def stage_fit(run: Run) -> None:
    """How well the noise flow fits the inverted noises (:func:`noise_fit`) and, with Inception, the
    two references: the inverted training images against the test images (the floor at this sample
    count) and their reconstructions through the inverted noises (what a perfect noise flow reaches)."""
    a = run.args
    run.fit, run.recon, run.recon_index = noise_fit(
        run.base, run.noise_model, run.out / "invert", run.invert_steps, run.noise_steps, a.noise_sampler,
        run.evaluator, min(run.n, run.report.n_images), a.seed + 2)
    if not run.inception:
        return
    originals = (run.train_x if run.train_x is not None else load_training_images(run.base_cfg))[run.recon_index]
    for key, images in (("train_images", originals), ("reconstructions", run.recon)):
        m = run.fit[f"inception_{key}"] = run.evaluator.inception_metrics(images, run.preset.show_progress)
        print(f"Inception metrics of the {len(images)} inverted {key.replace('_', ' ')}: "
              f"FID {m['fid']:.3f} on {m['n_inception']} samples  {run.elapsed()}")


def stage_grids(run: Run) -> None:
    """Sample grids of the base at the inverted step count and of the middle corrected row."""
    a = run.args
    middle = SamplerSpec(run.invert_steps, noise_steps=run.noise_steps[len(run.noise_steps) // 2],
                         noise_sampler=a.noise_sampler)
    for spec, name in ((SamplerSpec(run.invert_steps), "samples_base.png"), (middle, "samples_corrected.png")):
        images_to_grid(sample_images(spec, run.base, 64, run.noise_model, a.seed + 1, show_progress=False),
                       run.out / name)


def stage_summary(run: Run) -> None:
    """flow.png and summary.json: the claims per metric and what the run was made of."""
    cfg, ev = run.eval_cfg, run.evaluator
    run.n_text = sample_counts(run.n, ev.classifier_reference.count, cfg.inception_n, cfg.inception_n)
    plot(run.table, run.out / "flow.png", run.n_text, reference_lines(run.fit))
    c = run.corr_cfg
    run.summary = {
        "feature_fid": claims(run.table, "feature_fid", run.invert_steps),
        "fid": claims(run.table, "fid", run.invert_steps),
        "n_samples": run.n, "n_inception": cfg.inception_n if run.inception else 0,
        "reconstruction": run.report.__dict__, "classifier": ev.classifier_report,
        "base_dir": str(run.base_dir), "base_trained_steps": run.base_trained,
        "base_configured_steps": run.base_cfg.steps, "invert_steps": run.invert_steps,
        "correction": {"preset": c.preset, "steps": c.steps, "coupling": c.coupling,
                       "noise_sampler": run.args.noise_sampler},
        "base_parameters": run.base.num_parameters(), "noise_parameters": run.noise_model.num_parameters(),
        "noise_fit": run.fit,
        "seconds": time.time() - run.t0}
    (run.out / "summary.json").write_text(json.dumps(run.summary, indent=2, default=str))


def stage_print(run: Run) -> None:
    """The results table, the verdicts, the noise fit and the references."""
    print_results(run.table, run.summary, run.n_text, ["config", "flops_per_image", "feature_fid", "feature_kid",
                                                       "precision", "recall", "fid", "kid", "n_samples",
                                                       "n_inception"])
    fit = run.fit
    print("noise rms: " + ", ".join(f"{k} {v:.3f}" for k, v in fit["rms"].items()))
    o = fit["oracle"]
    print(f"upper bound ({o['config']}, {o['n']} images): feature_fid {o['feature_fid']:.4g}, "
          f"precision {o['precision']:.3f}, recall {o['recall']:.3f}")
    if "inception_train_images" in fit:
        a, b = fit["inception_train_images"], fit["inception_reconstructions"]
        print(f"Inception FID ({a['n_inception']} vs {a['n_reference_inception']} test images): the inverted training "
              f"images {a['fid']:.4g} (the floor), their reconstructions by base euler-{run.invert_steps} {b['fid']:.4g} "
              f"(the best a noise flow can reach)")
    report = run.evaluator.classifier_report
    if not math.isnan(report.get("test_accuracy", float("nan"))):
        print(f"feature classifier test accuracy {report['test_accuracy']:.3f}")
    out = run.out
    print(f"wrote {out / 'results.csv'}, {out / 'flow.png'}, {out / 'summary.json'}  "
          f"[{time.time() - run.t0:.0f}s total]")


# ----------------------------------------------------------------------------- command line
Stage = tuple[str, Callable[[Run], None]]  # (name, function), run in table order


def step_counts(text: str) -> list[int]:
    """A comma-separated list of step counts (``2,3,5``); argparse names the flag when it is not one."""
    return parse_ints(text)


def parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    """The benchmark's flags (one-line refusals)."""
    ap = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/flow (runs/bench/flow-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny 8x8 preset on a few hundred images (< 3 min)")
    ap.add_argument("--base", type=Path, default=None, help="reuse this pretrained base directory")
    ap.add_argument("--base-steps", type=step_counts, default=None, help="Euler step counts of the plain-base rows")
    ap.add_argument("--invert-steps", type=int, default=None, help="base Euler steps inverted through (and used after correction)")
    ap.add_argument("--noise-steps", type=step_counts, default=None, help="noise-flow step counts of the corrected rows")
    ap.add_argument("--corrected-base-steps", type=step_counts, default=None,
                    help="base Euler step counts after the noise flow (default: the inverted count, and 13,20)")
    ap.add_argument("--invert-limit", type=int, default=None, help="training images to invert")
    ap.add_argument("--invert-tol", type=float, default=1e-4, help="fixed-point tolerance of each inverted step")
    ap.add_argument("--invert-max-iter", type=int, default=30, help="fixed-point iterations per inverted step (at most)")
    ap.add_argument("--correct-steps", type=int, default=None, help="training steps of the noise flow")
    ap.add_argument("--noise-sampler", choices=sorted(FLOW_STEPS), default="heun",
                    help="ODE sampler of the noise flow (Euler's few-step samples shrink toward the mean)")
    ap.add_argument("--coupling", choices=("ot", "independent"), default="ot", help="noise-flow training pairs")
    ap.add_argument("-n", "--n", type=int, default=None, help="samples per row (feature metrics)")
    ap.add_argument("--inception", action=argparse.BooleanOptionalAction, default=None,
                    help="Inception FID/KID on key rows (default: on, off with --quick)")
    ap.add_argument("--inception-n", type=int, default=1000,
                    help="samples and reference images for Inception FID (300 does not separate the rows)")
    ap.add_argument("--inception-weights", type=Path, default=None)
    ap.add_argument("--device", default="auto", help="auto (the GPU when torch sees one), cpu, cuda or cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", nargs="+", type=Path, default=None, metavar="CSV",
                    help="only summarise these `pgraft flow evaluate` CSVs (one base) into --out: claims, plot, summary")
    ap.add_argument("--fid-line", action="append", default=[], metavar="LABEL=VALUE",
                    help="with --report: a reference line on the Inception FID plot (e.g. the floor)")
    return ap


def main(stages: Sequence[Stage], argv: list[str] | None = None, prog: str | None = None,
         description: str | None = None) -> int:
    """Run ``stages`` in order on one :class:`Run` built from the flags (or, with ``--report``, only
    summarise evaluation CSVs); returns the exit status."""
    ap = parser(prog, description)
    args = ap.parse_args(argv)
    if args.report:
        summarize_csvs(args.report, args.out or Path("runs/bench/flow-report"), args.fid_line)
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(1)
    run = make_run(args, device)
    for _, stage in stages:
        stage(run)
    return 0
