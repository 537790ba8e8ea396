"""Flow benchmark: FID vs FLOPs/image of the base flow at several Euler step counts against inverse
noise correction (noise flow -> frozen base) at several noise-flow step counts (paper Table 5).

Pipeline (the STAGES table below; the stages, presets, claims and plot live in
:mod:`pgraft.apps.flow.benchmark`): pretrain the base (or reuse --base) -> invert a subset of the
training images through the base's Euler sampler with ``--invert-steps`` steps -> train the small
noise flow -> sample every configuration from the same z seed (corrected rows: noise flow, then the
base with each of ``--corrected-base-steps``) -> feature FID/KID + precision/recall for every row,
Inception FID/KID on ``--inception-n`` samples for the key rows (base at the inverted step count,
base at its largest step count, the best corrected row within the FLOPs budget, the cheapest
corrected row that beats the base's best) and for two references: the inverted training images (the
floor at that sample count) and their reconstructions from the inverted noises (what a perfect noise
flow reaches) -> results.csv, flow.png, summary.json.

    python benchmarks/flow.py --quick                     # tiny 8x8 preset, a few hundred images, < 3 min
    python benchmarks/flow.py --base runs/bench/flow/base  # default preset on Fashion-MNIST
    python benchmarks/flow.py --report a.csv b.csv --out DIR  # claims + plot from `pgraft flow evaluate` CSVs

Every stage resumes from its files in --out, so rerunning the same command continues a killed run.
The summary states, from the numbers, whether correction lowers FID >= 25% at <= 1.35x the base's
FLOPs/image and whether it reaches the base's best FID at fewer FLOPs. The paper's full protocol,
with intervals over seeds: benchmarks/flow_protocol.py (``pgraft flow protocol``).
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"

from pgraft.apps.flow import benchmark as bench  # noqa: E402
from pgraft.core.cli import script_boundary  # noqa: E402

STAGES: list[bench.Stage] = [
    ("base", bench.stage_base),            # pretrain (resumed) or reuse --base
    ("invert", bench.stage_invert),        # training images -> noises through the base's Euler sampler
    ("correct", bench.stage_correct),      # the noise flow on the inverted noises
    ("evaluate", bench.stage_evaluate),    # every row: feature metrics; key rows: Inception -> results.csv
    ("fit", bench.stage_fit),              # noise rms, the perfect-noise-flow bound, Inception references
    ("grids", bench.stage_grids),          # samples_base.png, samples_corrected.png
    ("summary", bench.stage_summary),      # flow.png, summary.json
    ("print", bench.stage_print),          # the table and the verdicts
]

if __name__ == "__main__":   # a refusal (a damaged CSV or base) or a stop: one line
    sys.exit(script_boundary(lambda: bench.main(STAGES, prog="benchmarks/flow.py", description=__doc__)))
