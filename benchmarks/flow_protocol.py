"""Inverse noise correction under the paper's protocol (issue 18): the stages, rows, fits, verdicts
and seed reports live in the flow app (:mod:`pgraft.apps.flow.protocol`, also ``pgraft flow
protocol``); this script is its stage table and command line, kept for the commands in the docs.

    python benchmarks/flow_protocol.py --tiny                      # every stage at toy sizes on a CPU (< 2 min)
    python benchmarks/flow_protocol.py --device cuda --budget 480  # the protocol on a GPU, one piece per command
    python benchmarks/flow_protocol.py --stages report             # CSV, plot and verdicts from the rows so far
    python benchmarks/flow_protocol.py --seed-runs D0,D1,D2 --steps 50   # claim 1 over corrector training seeds

``--help`` prints the protocol's full description (stages, sample sizes, metrics, verdicts, the GPU
and CPU plans).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pgraft.apps.flow.protocol import main  # noqa: E402
from pgraft.core.cli import script_boundary  # noqa: E402

if __name__ == "__main__":   # a refusal (a damaged row or settings file, a locked run) or a stop: one line
    sys.exit(script_boundary(lambda: main(prog="benchmarks/flow_protocol.py")))
