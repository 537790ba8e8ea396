"""Fault injection: kill a small toy GRAFT (or policy-gradient) run with SIGKILL at many moments,
resume it, and check that it ends with the same files as a run that was never interrupted.

Each moment runs a child process that SIGKILLs itself there (during sampling, during fine-tuning,
right after each file a round writes, during the final evaluation, after the head is saved), then
resumes the run with ``--resume`` semantics in a fresh process. Per moment it prints whether the
accepted-sample store (tensors + records), the metrics rows (without wall times) and the head's
weights equal the uninterrupted run's, and ends with ``x/y moments: ...``.

``--method pg`` does the same for the policy-gradient baseline (:func:`run_policy_gradient` on the
shipped toy base): killed during sampling, while scoring the sampled steps' log-probabilities,
during an update, right after each file a round writes, during the final evaluation and after the
head is saved; it compares the metrics rows (without wall times) and the head (PG keeps no store).

    python benchmarks/faults.py [--method graft|pg] [--out runs/bench/faults]

Exit status 0 when every moment resumes to identical files. 2-3 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

# (name, what the child is told) -- "file:<path suffix>#<n>" kills right after the n-th time a file
# whose path ends with the suffix is moved into place; "reward#n" / "loss#n" during the n-th call.
# The run has 3 rounds of 30 candidates in 4 sampling chunks and 4 fine-tuning steps per round.
MOMENTS = [
    ("sampling, round 1 (chunk 2 of 4)", "reward#6"),
    ("fine-tuning, round 1 (step 2 of 4)", "loss#6"),
    ("after store/round_0001.parquet", "file:store/round_0001.parquet#1"),
    ("after store/round_0001.safetensors", "file:store/round_0001.safetensors#1"),
    ("after metrics.csv gains round 1", "file:metrics.csv#2"),
    ("after checkpoints/round_0001/", "file:checkpoints/round_0001#1"),
    ("after checkpoints/latest.json -> round 1", "file:checkpoints/latest.json#2"),
    ("after checkpoints/latest.json -> round 2 (last)", "file:checkpoints/latest.json#3"),
    ("final evaluation sampling", "reward#14"),
    ("after metrics.csv gains the eval row", "file:metrics.csv#4"),
    ("after head/model.safetensors", "file:head/model.safetensors#1"),
]

# the policy-gradient run: 3 rounds of 16 candidates in 2 sampling chunks (2 reward calls a round,
# then 2 for the final evaluation); per round 2 x 8 log_prob calls for the sampled steps' old
# log-probabilities, then 4 update minibatches (2 epochs x 2) of 4 steps each: 32 calls a round.
PG_MOMENTS = [
    ("sampling, round 0 (chunk 1 of 2; nothing saved)", "reward#1"),
    ("sampling, round 1 (chunk 2 of 2)", "reward#4"),
    ("old log-probs, round 1 (chunk 2 of 2)", "log_prob#44"),
    ("update, round 1 (minibatch 3 of 4)", "log_prob#58"),
    ("after metrics.csv gains round 1", "file:metrics.csv#2"),
    ("after checkpoints/round_0001/", "file:checkpoints/round_0001#1"),
    ("after checkpoints/latest.json -> round 1", "file:checkpoints/latest.json#2"),
    ("after checkpoints/latest.json -> round 2 (last)", "file:checkpoints/latest.json#3"),
    ("final evaluation sampling", "reward#8"),
    ("after metrics.csv gains the eval row", "file:metrics.csv#4"),
    ("after head/model.safetensors", "file:head/model.safetensors#1"),
]


def _child(out: Path, fault: str | None, resume: bool, method: str = "graft") -> None:
    """One run of the toy problem; with ``fault``, SIGKILL this process at that moment."""
    import torch

    from pgraft.apps.toy.model import ToyDenoiser
    from pgraft.apps.toy.train import ToyConfig, log_prob_fn, make_problem
    from pgraft.core.grs import GRSConfig
    from pgraft.core.trainer import GraftConfig, run_graft

    toy = ToyConfig(n_steps=8)
    problem = make_problem(toy)
    calls = {"log_prob": log_prob_fn(toy)}  # the policy-gradient run's per-step log-density
    if fault:
        kind, _, count = fault.rpartition("#")
        count = int(count)
        seen = {"n": 0}

        def hit() -> None:
            seen["n"] += 1
            if seen["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)

        if kind.startswith("file:"):
            suffix, replace = kind[len("file:"):], os.replace

            def replace_then_maybe_die(src, dst, *args, **kwargs):
                replace(src, dst, *args, **kwargs)
                if str(dst).endswith(suffix):
                    hit()

            os.replace = replace_then_maybe_die
        else:
            fn = calls[kind] if kind in calls else getattr(problem, kind)

            def call_then_maybe_die(*args):
                hit()
                return fn(*args)

            if kind in calls:
                calls[kind] = call_then_maybe_die
            else:
                setattr(problem, kind, call_then_maybe_die)
    if method == "pg":
        from pgraft.apps.toy.train import APP
        from pgraft.core.checkpoint import load_pretrained
        from pgraft.core.policy_gradient import PGConfig, run_policy_gradient

        cfg = PGConfig(rounds=3, groups=4, group_size=4, epochs=2, batch_size=8, lr=1e-4, clip=0.2,
                       sample_batch_size=8, timestep_fraction=0.5, seed=3)
        run_policy_gradient(problem, calls["log_prob"], load_pretrained(ToyDenoiser, APP.shipped),
                            toy.model_config(), cfg, out, show_progress=False, resume=resume)
        return
    torch.manual_seed(0)
    base = ToyDenoiser(dim=1, hidden=16, depth=2)
    cfg = GraftConfig(rounds=3, groups=6, group_size=5, grs=GRSConfig(rule="topk", k=2), split=0.25, train_steps=4,
                      batch_size=7, lr=1e-3, sample_batch_size=8, seed=3)
    run_graft(problem, base, {"dim": 1, "hidden": 16, "depth": 2}, cfg, out, resume=resume, show_progress=False)


def _run_child(out: Path, fault: str | None, resume: bool, method: str = "graft") -> int:
    cmd = [sys.executable, __file__, "--child", "--out", str(out)] + (["--fault", fault] if fault else [])
    cmd += ["--resume"] if resume else []
    cmd += ["--method", method] if method != "graft" else []
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).returncode


def _snapshot(run: Path, method: str = "graft") -> dict[str, object]:
    import pandas as pd
    from safetensors.torch import load_file

    store = None if method == "pg" else {p.name: {k: v.tolist() for k, v in load_file(str(p)).items()}
             for p in sorted((run / "store").glob("*.safetensors"))}
    records = None if method == "pg" else {p.name: pd.read_parquet(p).to_dict("list") for p in sorted((run / "store").glob("*.parquet"))}
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=["seconds"])
    metrics = metrics.astype(object).where(metrics.notna(), None).to_dict("list")  # NaN != NaN
    head = {k: v.tolist() for k, v in load_file(str(run / "head" / "model.safetensors")).items()}
    return {"store": (store, records), "metrics": metrics, "head": head}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("graft", "pg"), default="graft",
                        help="the run to kill: GRAFT's round loop or the policy-gradient baseline")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench/faults (-pg with --method pg)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fault", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.out, args.fault, args.resume, args.method)
        return 0
    if args.method == "pg":
        return _kill_and_resume(args.out or Path("runs/bench/faults-pg"), "pg", PG_MOMENTS, ("metrics", "head"))
    return _kill_and_resume(args.out or Path("runs/bench/faults"), "graft", MOMENTS, ("store", "metrics", "head"))


def _kill_and_resume(out: Path, method: str, moments: list[tuple[str, str]], parts: tuple[str, ...]) -> int:
    """Per moment: a child run SIGKILLed there, resumed in a fresh process, and ``parts`` of its
    files (store, metrics rows without wall times, head) compared with an uninterrupted run."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if _run_child(out / "uninterrupted", None, False, method) != 0:
        raise SystemExit("the uninterrupted reference run failed")
    reference = _snapshot(out / "uninterrupted", method)
    widths = {"store": 6, "metrics": 8, "head": 6}
    rows, good = [], 0
    print(f"{'moment':50s} {'killed':>7s} {'resumed':>8s} " + " ".join(f"{p:>{widths[p]}s}" for p in parts))
    for i, (name, fault) in enumerate(moments):
        run = out / f"moment_{i:02d}"
        rc_kill = _run_child(run, fault, False, method)
        rc_resume = _run_child(run, None, True, method)
        try:
            got = _snapshot(run, method)
            same = {part: got[part] == reference[part] for part in parts}
        except (OSError, ValueError, KeyError) as err:
            same = {part: False for part in parts}
            print(f"  could not read the resumed run: {err}")
        killed = "SIGKILL" if rc_kill == -signal.SIGKILL else f"rc {rc_kill}"
        ok = rc_kill == -signal.SIGKILL and rc_resume == 0 and all(same.values())
        good += ok
        rows.append({"moment": name, "fault": fault, "kill_rc": rc_kill, "resume_rc": rc_resume, **same, "ok": ok})
        print(f"{name:50s} {killed:>7s} {rc_resume:>8d} " + " ".join(
            f"{'equal' if same[p] else 'DIFF':>{widths[p]}s}" for p in parts))
    (out / "faults.json").write_text(json.dumps(rows, indent=2))
    labels = [{"metrics": "metrics rows"}.get(p, p) for p in parts]
    compared = ", ".join(labels[:-1]) + f" and {labels[-1]}"
    print(f"{good}/{len(moments)} moments: killed by SIGKILL, resumed, and {compared} equal an uninterrupted run")
    return 0 if good == len(moments) else 1

if __name__ == "__main__":
    sys.exit(main())
