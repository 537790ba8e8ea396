"""Molecule benchmark: base vs GRAFT (BoN / Top-K), GRAFT+dedup, P-GRAFT+dedup at several t and
the DDPO-style policy-gradient baseline, all at the same budget of sampled molecules
(rounds × groups × M), on the QM9 base model with the QED reward (0 for invalid molecules).

    python benchmarks/molecule.py [--out runs/bench/molecule] [--methods a,b,...] [--quick]
    python benchmarks/molecule.py --report            # only aggregate finished methods

Each method writes results/<method>.json (metrics of --eval-samples fresh molecules) and its run
directory; the report writes results.csv and molecule.png (QED distribution per method, reward and
uniqueness vs round). Methods can run in separate processes (one thread each) and be aggregated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pgraft.apps.molecule.train import (  # noqa: E402
    DEFAULT_BASE,
    MoleculeTrainConfig,
    base_dir_of,
    evaluate_base_row,
    load_or_pretrain,
    log_prob,
    make_problem,
    sample_smiles,
)
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.policy_gradient import PGConfig, run_policy_gradient  # noqa: E402
from pgraft.core.shipped import weights_sha256  # noqa: E402
from pgraft.core.trainer import GraftConfig, run_graft  # noqa: E402


@dataclass(frozen=True)
class Method:
    label: str
    kind: str = "graft"  # graft | pg | base
    grs: GRSConfig = field(default_factory=GRSConfig)
    dedup: bool = False
    t: float = 0.0
    m: int = 8  # group size; groups per round scale so every method samples the same budget


METHODS = {
    "base": Method("base", kind="base"),
    "graft_bon": Method("GRAFT BoN (N=8)", grs=GRSConfig(rule="bon")),
    "graft_topk": Method("GRAFT Top-2 of 8", grs=GRSConfig(rule="topk", k=2)),
    "graft_topk_dedup": Method("GRAFT Top-2 of 8 + dedup", grs=GRSConfig(rule="topk", k=2), dedup=True),
    "pgraft_0.25_dedup": Method("P-GRAFT t=0.25 + dedup", grs=GRSConfig(rule="topk", k=2), dedup=True, t=0.25),
    "pgraft_0.5_dedup": Method("P-GRAFT t=0.5 + dedup", grs=GRSConfig(rule="topk", k=2), dedup=True, t=0.5),
    "pgraft_0.25": Method("P-GRAFT t=0.25 (no dedup)", grs=GRSConfig(rule="topk", k=2), t=0.25),
    "pg": Method("policy gradient (DDPO-style)", kind="pg"),
    "graft_bon_dedup": Method("GRAFT BoN (N=8) + dedup", grs=GRSConfig(rule="bon"), dedup=True),
    "pgraft_0.1_bon_dedup": Method("P-GRAFT t=0.1 BoN + dedup", grs=GRSConfig(rule="bon"), dedup=True, t=0.1),
    "pgraft_0.25_bon_dedup": Method("P-GRAFT t=0.25 BoN + dedup", grs=GRSConfig(rule="bon"), dedup=True, t=0.25),
    "pgraft_0.1_bon16_dedup": Method("P-GRAFT t=0.1 BoN (N=16) + dedup", grs=GRSConfig(rule="bon"), dedup=True, t=0.1,
                                     m=16),
}


def run_method(name: str, args, base, out: Path) -> dict:
    method = METHODS[name]
    app = MoleculeTrainConfig(reward="qed", sample_steps=args.sample_steps, base=args.base,
                              base_sha256=weights_sha256(base_dir_of(MoleculeTrainConfig(base=args.base))))
    problem = make_problem(base, "qed", args.sample_steps)
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    split = 0.0
    if method.kind == "base":
        head = base.model
    elif method.kind == "graft":
        cfg = GraftConfig(rounds=args.rounds, groups=args.groups * 8 // method.m, group_size=method.m, grs=method.grs,
                          dedup=method.dedup,
                          split=method.t, train_steps=args.train_steps, batch_size=64, lr=args.lr, replay=True,
                          sample_batch_size=256, seed=0)
        head, _ = run_graft(problem, base.model, base.model.init_kwargs(), cfg, run_dir,
                            app_config={"molecule": app.__dict__}, show_progress=not args.quiet)
        split = method.t
    else:
        # summed log-density: the clip range these rows were tuned with (docs/derivations.md)
        cfg = PGConfig(rounds=args.rounds, groups=args.groups, group_size=8, epochs=1, batch_size=64, lr=args.lr,
                       log_prob_reduction="sum", clip=0.2, sample_batch_size=256, timestep_fraction=0.25, seed=0)
        head, _ = run_policy_gradient(problem, log_prob, base.model, base.model.init_kwargs(), cfg, run_dir,
                                      app_config={"molecule": app.__dict__}, show_progress=not args.quiet)
    train_seconds = time.time() - t0
    smiles, rewards = sample_smiles(problem, head, base.model, args.eval_samples, split, seed=99,
                                    show_progress=not args.quiet)
    row = evaluate_base_row(smiles, rewards, base, fcd=args.fcd, seed=0)
    row.update(method=method.label, key=name, t=method.t, dedup=method.dedup, train_seconds=round(train_seconds, 1),
               budget=0 if method.kind == "base" else args.rounds * args.groups * 8)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(row, indent=2, default=float))
    pd.DataFrame({"smiles": smiles, "reward": rewards.numpy()}).to_csv(out / "results" / f"{name}_samples.csv",
                                                                       index=False)
    print(json.dumps({k: row[k] for k in ("method", "validity", "uniqueness", "qed_mean", "int_div", "fcd")},
                     default=float), flush=True)
    return row


def report(out: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {out / 'results'}")
    order = {k: i for i, k in enumerate(METHODS)}
    table = pd.DataFrame(rows).sort_values("key", key=lambda s: s.map(order)).reset_index(drop=True)
    cols = ["method", "budget", "validity", "uniqueness", "valid_unique", "novelty", "qed_mean", "qed_median",
            "qed_frac_0.7", "int_div", "atom_tv", "bond_tv", "fcd", "reward_mean", "train_seconds"]
    table = table[[c for c in cols if c in table] + ["key"]]
    table.to_csv(out / "results.csv", index=False)
    base = table[table["key"] == "base"]
    if len(base):
        b = float(base["qed_mean"].iloc[0])
        table["qed_gain_%"] = 100 * (table["qed_mean"] / b - 1)
    print(table.drop(columns="key").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    plot(out, table)
    return table


def plot(out: Path, table: pd.DataFrame) -> None:
    from rdkit import Chem
    from rdkit.Chem import QED

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.3))
    for i, (key, label) in enumerate(zip(table["key"], table["method"])):
        color = f"C{i}"  # one colour per method across the three panels
        samples = pd.read_csv(out / "results" / f"{key}_samples.csv").dropna(subset=["smiles"])
        unique = samples.drop_duplicates("smiles")["smiles"]
        qeds = [QED.qed(m) for m in (Chem.MolFromSmiles(s) for s in unique) if m is not None]
        if qeds:
            axes[0].hist(qeds, bins=40, range=(0, 1), histtype="step", density=True, lw=1.5, label=label,
                         color=color)
        metrics = out / "runs" / key / "metrics.csv"
        if metrics.is_file():
            m = pd.read_csv(metrics)
            axes[1].plot(m["round"], m["reward_mean"], "o-", label=label, color=color)
            if "unique_frac" in m:
                axes[2].plot(m["round"], m["unique_frac"], "o-", label=label, color=color)
    axes[0].set_title("QED of valid unique molecules")
    axes[1].set_title("mean reward (QED, 0 if invalid) of each round's samples")
    axes[2].set_title("unique valid fraction of each round's samples")
    for ax in axes[1:]:
        ax.set_xlabel("round (last point: final model)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "molecule.png", dpi=110)
    print(f"wrote {out / 'results.csv'} and {out / 'molecule.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/molecule"))
    ap.add_argument("--base", default=DEFAULT_BASE,
                    help="'shipped' (the package's base, the default) or a base directory (pretrained if empty)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--fcd", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report", action="store_true", help="only aggregate existing results")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.quick:
        args.rounds, args.groups, args.train_steps, args.sample_steps, args.eval_samples = 2, 8, 10, 20, 100
    if not args.report:
        base = load_or_pretrain(base_dir_of(MoleculeTrainConfig(base=args.base)), "default",
                                show_progress=not args.quiet)
        for name in args.methods.split(","):
            if name not in METHODS:
                raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
            run_method(name, args, base, args.out)
    report(args.out)


if __name__ == "__main__":
    main()
