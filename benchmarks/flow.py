"""Flow benchmark: FID vs FLOPs/image of the base flow at several Euler step counts against inverse
noise correction (noise flow -> frozen base) at several noise-flow step counts (paper Table 5).

Pipeline: pretrain the base (or reuse --base) -> invert a subset of the training images through the
base's Euler sampler with ``--invert-steps`` steps -> train the small noise flow -> sample every
configuration from the same z seed (corrected rows: noise flow, then the base with each of
``--corrected-base-steps``) -> feature FID/KID + precision/recall for every row, Inception FID/KID on
``--inception-n`` samples for the key rows (base at the inverted step count, base at its largest
step count, the best corrected row within the FLOPs budget, the cheapest corrected row that beats
the base's best) and for two references: the inverted training images (the floor at that sample
count) and their reconstructions from the inverted noises (what a perfect noise flow reaches)
-> results.csv, flow.png, summary.json.

    python benchmarks/flow.py --quick                     # tiny 8x8 preset, a few hundred images, < 3 min
    python benchmarks/flow.py --base runs/bench/flow/base  # default preset on Fashion-MNIST
    python benchmarks/flow.py --report a.csv b.csv --out DIR  # claims + plot from `pgraft flow evaluate` CSVs

Every stage resumes from its files in --out, so rerunning the same command continues a killed run.
The summary states, from the numbers, whether correction lowers FID >= 25% at <= 1.35x the base's
FLOPs/image and whether it reaches the base's best FID at fewer FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pgraft.apps.flow.correct import NOISE_MODELS, InvertConfig, correction_config, invert_dataset  # noqa: E402
from pgraft.apps.flow.data import load_fashion_mnist  # noqa: E402
from pgraft.apps.flow.evaluate import EvalConfig, Evaluator, evaluate  # noqa: E402
from pgraft.apps.flow.pretrain import (  # noqa: E402
    FlowPretrainConfig,
    load_base,
    load_training_images,
    pretrain_flow,
    pretraining_finished,
)
from pgraft.apps.flow.sample import SamplerSpec, images_to_grid, sample_images  # noqa: E402
from pgraft.core.inversion import read_shards  # noqa: E402
from pgraft.core.noise_correction import load_correction, train_correction  # noqa: E402
from pgraft.core.pretrain import trained_steps
from pgraft.core.sampling import FLOW_STEPS  # noqa: E402
from pgraft.core.state import module_device, resolve_device  # noqa: E402

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


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


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
    table = pd.concat([pd.read_csv(p).assign(source=p.stem) for p in csvs], ignore_index=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/flow (runs/bench/flow-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny 8x8 preset on a few hundred images (< 3 min)")
    ap.add_argument("--base", type=Path, default=None, help="reuse this pretrained base directory")
    ap.add_argument("--base-steps", default=None, help="Euler step counts of the plain-base rows")
    ap.add_argument("--invert-steps", type=int, default=None, help="base Euler steps inverted through (and used after correction)")
    ap.add_argument("--noise-steps", default=None, help="noise-flow step counts of the corrected rows")
    ap.add_argument("--corrected-base-steps", default=None,
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
    args = ap.parse_args()
    if args.report:
        summarize_csvs(args.report, args.out or Path("runs/bench/flow-report"), args.fid_line)
        return
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(1)
    q = args.quick
    out = args.out or Path("runs/bench/flow-quick" if q else "runs/bench/flow")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base_steps = parse_ints(args.base_steps or ("2,3,5,8,16" if q else "5,10,13,20,40"))
    invert_steps = args.invert_steps or (5 if q else 10)
    noise_steps = parse_ints(args.noise_steps or ("1,2,4" if q else "2,3,5,10"))
    n = args.n or (200 if q else 1000)
    inception = args.inception if args.inception is not None else not q
    corrected_base_steps = parse_ints(args.corrected_base_steps or f"{invert_steps}" + ("" if q else ",13,20"))
    base_steps = sorted({*base_steps, invert_steps, *corrected_base_steps})  # each corrected row has its plain twin

    # ---- data overrides for --quick (tiny preset works at 8x8)
    train_x = train_y = ref_x = ref_y = None
    if q:
        train_x, train_y = quick_images("train", 600)
        ref_x, ref_y = quick_images("test", 400)

    # ---- base
    base_dir = args.base or out / "base"
    if args.base is None and not pretraining_finished(base_dir):
        cfg = FlowPretrainConfig(preset="tiny", steps=400, batch_size=32, lr=2e-3, limit=600) if q else FlowPretrainConfig()
        print(f"pretraining the {cfg.preset} base in {base_dir} ({cfg.steps} steps)")
        pretrain_flow(cfg, base_dir, show_progress=not q, images=train_x, device=device)
    base, base_cfg = load_base(base_dir)
    base = base.to(device)
    base_trained = trained_steps(base_dir)
    print(f"base {base_dir}: {base.num_parameters():,} parameters, preset {base_cfg.preset}, trained "
          f"{base_trained} of {base_cfg.steps} configured steps  [{time.time() - t0:.0f}s]")

    # ---- inversion and correction
    inv_cfg = InvertConfig(steps=invert_steps, limit=args.invert_limit or (300 if q else 2000),
                           shard_size=100 if q else 250, batch_size=100 if q else 125, tol=args.invert_tol,
                           max_iter=args.invert_max_iter, seed=args.seed)
    report = invert_dataset(base_dir, out / "invert", inv_cfg, show_progress=not q, images=train_x, device=device)
    print(f"inverted {report.n_images} training images through {invert_steps} Euler steps: reconstruction "
          f"mean |err| {report.mean_abs:.2e}, max {report.max_abs:.2e}, worst residual {report.max_residual:.2e} "
          f"[{time.time() - t0:.0f}s]")
    corr_cfg = correction_config(preset="noise-tiny" if q else "noise-small",
                                 steps=args.correct_steps or (300 if q else 6000), coupling=args.coupling,
                                 seed=args.seed)
    train_correction(out / "invert", out / "correct", corr_cfg, NOISE_MODELS, show_progress=not q, device=device)
    noise_model = load_correction(out / "correct", NOISE_MODELS).noise_model.to(device)
    print(f"noise flow {corr_cfg.preset}: {noise_model.num_parameters():,} parameters "
          f"({noise_model.num_parameters() / base.num_parameters():.2f}x the base)  [{time.time() - t0:.0f}s]")

    # ---- evaluation
    eval_cfg = EvalConfig(n=n, reference_n=400 if q else 5000, inception=inception, inception_n=min(args.inception_n, n),
                          inception_weights=None if args.inception_weights is None else str(args.inception_weights),
                          classifier_steps=300 if q else 2000, seed=args.seed)
    evaluator = Evaluator.build(eval_cfg, base_cfg, out / "cache", ref_x, ref_y, show_progress=not q,
                                train_images=train_x, train_labels=train_y, device=device)
    specs = [SamplerSpec(s) for s in base_steps] + [SamplerSpec(b, noise_steps=k, noise_sampler=args.noise_sampler)
                                                    for b in corrected_base_steps for k in noise_steps]
    samples: dict[str, torch.Tensor] = {}
    rows = evaluate(specs, base, evaluator, noise_model, lambda spec: False, seed=args.seed + 1,
                    show_progress=not q, keep_samples=samples)
    table = pd.DataFrame(rows)
    print(f"feature metrics of {len(rows)} configurations done  [{time.time() - t0:.0f}s]")
    if inception:
        # Inception costs ~0.4 s/image, so only the key rows: the base at the inverted step count,
        # the base at its largest step count, and the corrected row with the best feature FID
        # within the FLOPs budget (plus the cheapest corrected row that beats the base's best).
        ref_flops = table.loc[(table.noise_steps == 0) & (table.steps == invert_steps), "flops_per_image"].iloc[0]
        corr = table[table.noise_steps > 0]
        in_budget = corr[corr.flops_per_image <= FLOPS_BUDGET * ref_flops]
        key = {f"base euler-{invert_steps}", f"base euler-{max(base_steps)}"}
        if len(in_budget):
            key.add(in_budget.loc[in_budget.feature_fid.idxmin(), "config"])
        best_base = table[table.noise_steps == 0].feature_fid.min()
        beating = corr[corr.feature_fid <= best_base]
        if len(beating):
            key.add(beating.loc[beating.flops_per_image.idxmin(), "config"])
        for label in table.config:
            if label in key:
                i = table.index[table.config == label][0]
                for k, v in evaluator.inception_metrics(samples[label], not q).items():
                    table.loc[i, k] = v
                print(f"Inception metrics of {label}: FID {table.loc[i, 'fid']:.3f} on {eval_cfg.inception_n} "
                      f"samples  [{time.time() - t0:.0f}s]")
    table.to_csv(out / "results.csv", index=False)
    fit, recon, recon_index = noise_fit(base, noise_model, out / "invert", invert_steps, noise_steps,
                                        args.noise_sampler, evaluator, min(n, report.n_images), args.seed + 2)
    if inception:
        # what Inception sees of the base's decoder alone: the training images themselves against
        # the test images (the floor at this sample count), and their reconstructions through the
        # inverted noise (a perfect noise flow); correction cannot go below the second
        originals = (train_x if train_x is not None else load_training_images(base_cfg))[recon_index]
        for key, images in (("train_images", originals), ("reconstructions", recon)):
            fit[f"inception_{key}"] = evaluator.inception_metrics(images, not q)
            print(f"Inception metrics of the {len(images)} inverted {key.replace('_', ' ')}: "
                  f"FID {fit[f'inception_{key}']['fid']:.3f} on {fit[f'inception_{key}']['n_inception']} samples  "
                  f"[{time.time() - t0:.0f}s]")
    for spec, name in ((SamplerSpec(invert_steps), "samples_base.png"),
                       (SamplerSpec(invert_steps, noise_steps=noise_steps[len(noise_steps) // 2], noise_sampler=args.noise_sampler),
                        "samples_corrected.png")):
        images_to_grid(sample_images(spec, base, 64, noise_model, args.seed + 1, show_progress=False), out / name)

    n_text = sample_counts(n, evaluator.classifier_reference.count, eval_cfg.inception_n, eval_cfg.inception_n)
    plot(table, out / "flow.png", n_text, reference_lines(fit))
    summary = {"feature_fid": claims(table, "feature_fid", invert_steps), "fid": claims(table, "fid", invert_steps),
               "n_samples": n, "n_inception": eval_cfg.inception_n if inception else 0,
               "reconstruction": report.__dict__, "classifier": evaluator.classifier_report,
               "base_dir": str(base_dir), "base_trained_steps": base_trained, "base_configured_steps": base_cfg.steps,
               "invert_steps": invert_steps, "correction": {"preset": corr_cfg.preset, "steps": corr_cfg.steps, "coupling": corr_cfg.coupling,
                              "noise_sampler": args.noise_sampler},
               "base_parameters": base.num_parameters(), "noise_parameters": noise_model.num_parameters(),
               "noise_fit": fit,
               "seconds": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print_results(table, summary, n_text, ["config", "flops_per_image", "feature_fid", "feature_kid", "precision",
                                           "recall", "fid", "kid", "n_samples", "n_inception"])
    print("noise rms: " + ", ".join(f"{k} {v:.3f}" for k, v in fit["rms"].items()))
    o = fit["oracle"]
    print(f"upper bound ({o['config']}, {o['n']} images): feature_fid {o['feature_fid']:.4g}, "
          f"precision {o['precision']:.3f}, recall {o['recall']:.3f}")
    if "inception_train_images" in fit:
        a, b = fit["inception_train_images"], fit["inception_reconstructions"]
        print(f"Inception FID ({a['n_inception']} vs {a['n_reference_inception']} test images): the inverted training "
              f"images {a['fid']:.4g} (the floor), their reconstructions by base euler-{invert_steps} {b['fid']:.4g} "
              f"(the best a noise flow can reach)")
    if not math.isnan(evaluator.classifier_report.get("test_accuracy", float("nan"))):
        print(f"feature classifier test accuracy {evaluator.classifier_report['test_accuracy']:.3f}")
    print(f"wrote {out / 'results.csv'}, {out / 'flow.png'}, {out / 'summary.json'}  [{time.time() - t0:.0f}s total]")


if __name__ == "__main__":
    main()
