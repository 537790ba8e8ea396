"""The SD3 path on a tiny random pipeline: GRAFT, P-GRAFT and DiffusionNFT at the same budget, with a
known image reward. No real text-to-image weights exist on the machines this project runs on, so the
comparison in the SD3 code path (``train_t2i`` / ``train_t2i_nft``, LoRA on the SD3 transformer's
attention, the Euler sampler on the scheduler's shifted sigmas) runs on the tiny StableDiffusion3Pipeline
the tests use (:func:`pgraft.apps.t2i.tiny.build_tiny_sd3`, fixed weights from ``--pipeline-seed``)
with the reward ``redness`` (red channel mean minus the mean of green and blue,
:func:`pgraft.apps.t2i.tiny.redness`): what it measures is how far each update rule moves a flow model
towards a reward per sampled image and optimizer step, not image quality.

    python benchmarks/t2i_sd3.py --select               # each method's learning rate, on another pipeline (~10 min, 1 core)
    python benchmarks/t2i_sd3.py --seeds 0,1,2,3,4      # every method at its rate, 5 training seeds (~8 min, 1 core)
    python benchmarks/t2i_sd3.py --report               # aggregate the finished cells
    python benchmarks/t2i_sd3.py --quick --lr 1e-3 --seeds 0,1 --out /tmp/sd3_quick   # smoke (~1 min)

Budget, equal for every fine-tuning method: ``--rounds`` x ``--groups`` prompts x ``--m`` images sampled
(the *train* prompt split), ``--steps-per-round`` AdamW steps of ``--batch-size`` per round at the method's rate,
LoRA rank ``--lora`` on the family's attention targets, CFG-free sampling (guidance 1, DiffusionNFT's
setting) with ``--n-steps`` Euler steps. GRAFT and P-GRAFT train on the Top-2 of each prompt's M images
(no trust-region anchor: the paper's GRAFT); DiffusionNFT on every image, its advantages standardised
per prompt, in ``--steps-per-round`` x batch / (groups x M) epochs. Full fine-tuning (``--lora 0``) by
default: on a pilot pipeline (``--pipeline-seed 1``) LoRA rank 4 hardly moved this reward at any rate
tried.

Learning rates are chosen per method, never on the pipeline the verdicts are about: ``--select`` runs
every fine-tuning method at each of ``--select-lrs`` on another tiny pipeline (``--pipeline-seed 1``,
training seed 0, into runs/bench/t2i_sd3_select) and keeps, per method, the rate with the highest
held-out reward there (ties: the smaller); the benchmark then reads that choice (``--selection``) and
records it in its settings. ``--lr`` gives every method one rate instead.

Evaluation: ``--per-prompt`` images for each *held-out* prompt from the evaluation seed a training seed
shares with the base (benchmarks/harness.py), so paired images start from the same noise. Metrics: the
mean reward (``reward``) and ``drift``, the root-mean-square pixel difference from the base's image
drawn from the same noise (what the move cost: the tiny pipeline has no image quality to measure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import harness  # noqa: E402
from harness import Benchmark, Cell, Comparison, Method, Metric  # noqa: E402

from pgraft.apps.t2i.prompts import load_prompts  # noqa: E402
from pgraft.apps.t2i.tiny import build_tiny_sd3, redness  # noqa: E402
from pgraft.apps.t2i.train import T2IConfig, load_pipeline, sample_images, train_t2i, train_t2i_nft  # noqa: E402
from pgraft.apps.t2i.world import all_prompts  # noqa: E402
from pgraft.core.grs import GRSConfig  # noqa: E402
from pgraft.core.integrity import files_digest  # noqa: E402
from pgraft.core.nft import NFTConfig  # noqa: E402
from pgraft.core.state import read_json, write_sealed_json  # noqa: E402
from pgraft.core.trainer import GraftConfig  # noqa: E402

REWARD = "pgraft.apps.t2i.tiny:redness"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"   # present once the pipeline is built
T_VALUES = (0.25, 0.5, 0.75)
TOP2 = {"rule": "topk", "k": 2}

METHODS = {
    "base": Method("base", "base", "base"),
    "graft_topk": Method("graft_topk", "GRAFT Top-2 of M", "graft", {"t": 0.0}),
    **{f"pgraft_{t}": Method(f"pgraft_{t}", f"P-GRAFT t={t} (Top-2 of M)", "graft", {"t": t}) for t in T_VALUES},
    "nft": Method("nft", "DiffusionNFT", "nft"),
}
METRICS = {
    "reward": Metric("held-out reward (redness)", digits=4),
    "drift": Metric("RMS pixel drift from the base", digits=4, higher_is_better=False),
}
COMPARISONS = [Comparison(a, b, metric) for metric in ("reward", "drift") for a, b in [
    *[(f"pgraft_{t}", "nft") for t in T_VALUES],
    ("graft_topk", "nft"),
    *[(f"pgraft_{t}", "graft_topk") for t in T_VALUES],
    ("graft_topk", "base"),
    ("nft", "base"),
]]


FINETUNED = [k for k, m in METHODS.items() if m.kind != "base"]
SELECT_LRS = "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1"
SELECTION = Path("runs/bench/t2i_sd3_select/selection.json")
SELECTION_RULE = "the rate with the highest mean held-out reward over the selection's training seeds (ties: the smaller)"


def select_methods(lrs: list[float]) -> dict[str, Method]:
    """The selection's cells: every fine-tuning method at each rate (``graft_topk@0.001``), and the base."""
    methods = {"base": METHODS["base"]}
    for key in FINETUNED:
        for lr in lrs:
            m = METHODS[key]
            methods[f"{key}@{lr:g}"] = Method(f"{key}@{lr:g}", f"{m.label}, lr {lr:g}", m.kind, {**m.params, "lr": lr})
    return methods


def add_args(ap) -> None:
    ap.set_defaults(out=Path("runs/bench/t2i_sd3"), methods=",".join(METHODS))
    common_args(ap)
    ap.add_argument("--lr", type=float, default=None,
                    help="one learning rate for every method (default: each method's from --selection)")
    ap.add_argument("--selection", type=Path, default=SELECTION, help="the choice --select wrote")
    ap.add_argument("--select", action="store_true",
                    help="instead of the table: choose each method's learning rate on --pipeline-seed 1 (default "
                         f"--out {SELECTION.parent}, --seeds 0) and write selection.json there")
    ap.add_argument("--select-lrs", default=None, help=f"with --select: the rates tried (default {SELECT_LRS})")


def common_args(ap) -> None:
    ap.add_argument("--pipeline-seed", type=int, default=0, help="seed of the tiny SD3 pipeline's random weights")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--groups", type=int, default=8, help="prompts per round")
    ap.add_argument("--m", type=int, default=8, help="images per prompt (group size M)")
    ap.add_argument("--steps-per-round", type=int, default=8, help="optimizer steps per round, every method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on the transformer attention (0: full)")
    ap.add_argument("--n-steps", type=int, default=8, help="Euler sampler steps")
    ap.add_argument("--per-prompt", type=int, default=4, help="held-out images per prompt (62 prompts)")


def quick(args) -> None:
    if args.out == Path("runs/bench/t2i_sd3"):
        args.out = args.out / "quick"
    args.rounds, args.groups, args.m, args.steps_per_round, args.batch_size = 1, 2, 4, 2, 4
    args.n_steps, args.per_prompt = 4, 1


def nft_epochs(args) -> int:
    """DiffusionNFT's passes over a round's images that make ``--steps-per-round`` optimizer steps."""
    per_round = args.groups * args.m
    epochs, rest = divmod(args.steps_per_round * args.batch_size, per_round)
    if rest or epochs < 1:
        raise SystemExit(f"error: --steps-per-round x --batch-size ({args.steps_per_round * args.batch_size}) must be a "
                         f"multiple of --groups x --m ({per_round}) so DiffusionNFT makes the same optimizer steps")
    return epochs


def pipeline_dir(args) -> Path:
    return args.out / f"pipeline_seed{args.pipeline_seed}"


def method_lrs(args) -> dict[str, float] | None:
    """Each fine-tuning method's learning rate: --lr for all, else --selection's choice (None: a
    --select run, whose methods carry their rate)."""
    if getattr(args, "select_lrs", None) is not None:
        return None
    if args.lr is not None:
        return {key: args.lr for key in FINETUNED}
    if not args.selection.is_file():
        raise SystemExit(f"error: --selection {args.selection}: no such file; run `python benchmarks/t2i_sd3.py "
                         "--select` first (each method's learning rate), or give --lr")
    chosen = read_json(args.selection, keys=("lr",), fix="rerun `python benchmarks/t2i_sd3.py --select`")["lr"]
    missing = [key for key in FINETUNED if key not in chosen]
    if missing:
        raise SystemExit(f"error: --selection {args.selection} has no rate for {', '.join(missing)}; rerun --select")
    return {key: float(chosen[key]) for key in FINETUNED}


def describe(args) -> dict:
    if not args.report:
        nft_epochs(args)
    settings = {k: getattr(args, k) for k in ("pipeline_seed", "rounds", "groups", "m", "steps_per_round",
                                              "batch_size", "lora", "n_steps", "per_prompt", "quick")}
    settings |= {"reward": REWARD, "lr": method_lrs(args) if not args.report else None}
    if not args.report:   # the pipeline's identity: cells made with another one are refused
        ensure_pipeline(pipeline_dir(args), args.pipeline_seed)
        settings["pipeline_sha256"] = pipeline_digest(pipeline_dir(args))
    return settings


def pipeline_digest(directory: Path) -> str:
    """SHA-256 over every file of a pipeline directory (names and contents): its identity."""
    return files_digest(directory, [p for p in directory.rglob("*") if p.is_file()])


def ensure_pipeline(directory: Path, seed: int) -> None:
    """Build the tiny pipeline into ``directory`` once: into a private folder first, then renamed into
    place, so two processes starting together never write one folder (the builds are identical)."""
    if (directory / WEIGHTS).is_file():
        return
    if directory.exists():
        raise SystemExit(f"error: {directory} holds no complete pipeline (no {WEIGHTS}); delete it and rerun to "
                         "build it again")
    scratch = directory.with_name(f".{directory.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    build_tiny_sd3(scratch, [s.text() for s in all_prompts()], seed=seed)
    try:
        os.rename(scratch, directory)
    except OSError:   # another process got there first
        shutil.rmtree(scratch, ignore_errors=True)


class Context:
    """The tiny pipeline (built once into --out, then reused), its digest and the held-out prompts."""

    def __init__(self, args):
        self.args = args
        directory = pipeline_dir(args)
        ensure_pipeline(directory, args.pipeline_seed)
        self.pipe = load_pipeline(directory, guidance_scale=1.0)
        self.digest = pipeline_digest(directory)
        self.held = load_prompts("heldout").prompts
        self.lrs = method_lrs(args)
        self.app = T2IConfig(model=str(directory), prompts="train", reward=REWARD, reward_weights=None,
                             n_steps=args.n_steps, guidance_scale=1.0)


def run_cell(ctx: Context, method: Method, seed: int, cell_dir: Path) -> Cell:
    from diffusers import SD3Transformer2DModel

    args, pipe = ctx.args, ctx.pipe
    run_dir = cell_dir / "run"
    show = not args.quiet
    head, split = pipe.denoiser, 0.0
    lr = method.params.get("lr") or (ctx.lrs or {}).get(method.key)
    resume = harness.resumable(method, run_dir)
    with harness.count_compute(SD3Transformer2DModel, ledger=cell_dir / "compute.json", resume=resume) as compute:
        if method.kind == "graft":
            split = method.params["t"]
            cfg = GraftConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, grs=GRSConfig(**TOP2),
                              split=split, train_steps=args.steps_per_round, batch_size=args.batch_size, lr=lr,
                              lora_rank=args.lora, sample_batch_size=args.groups * args.m, anchor=0.0,
                              final_eval=False, seed=seed)
            head, _ = train_t2i(ctx.app, cfg, run_dir, resume=resume, show_progress=show)
        elif method.kind == "nft":
            cfg = NFTConfig(rounds=args.rounds, groups=args.groups, group_size=args.m, epochs=nft_epochs(args),
                            batch_size=args.batch_size, lr=lr, lora_rank=args.lora,
                            sample_batch_size=args.groups * args.m, final_eval=False, seed=seed)
            head, _ = train_t2i_nft(ctx.app, cfg, run_dir, show_progress=show)
    t0 = time.time()
    eval_seed = harness.eval_seed(seed)
    images, prompts = sample_images(pipe, head, ctx.held, args.per_prompt, split, args.n_steps, 0.0, seed=eval_seed,
                                    batch=256, show_progress=False)
    if method.kind == "base":
        drift = 0.0
    else:   # the base's images from the same noises
        base, _ = sample_images(pipe, pipe.denoiser, ctx.held, args.per_prompt, 0.0, args.n_steps, 0.0,
                                seed=eval_seed, batch=256, show_progress=False)
        drift = float((images - base).pow(2).mean().sqrt())
    reward = redness(images, prompts)
    metrics = {"reward": float(reward.mean()), "drift": drift}
    sampled = 0 if method.kind == "base" else args.rounds * args.groups * args.m
    return Cell(metrics, sampled=sampled, compute=None if method.kind == "base" else compute,
                extra={"pipeline_sha256": ctx.digest, "t": split, "lr": lr, "heldout_images": len(prompts),
                       "reward_sd": float(reward.std()), "eval_seconds": round(time.time() - t0, 1)})


def notes(out: Path, long) -> list[str]:
    lines = harness.kept_gain_lines(long, [(f"pgraft_{t}", "graft_topk") for t in T_VALUES], "reward_gain",
                                    {k: m.label for k, m in METHODS.items()})
    lines += harness.kept_gain_lines(long, [(f"pgraft_{t}", "nft") for t in T_VALUES], "reward_gain",
                                     {k: m.label for k, m in METHODS.items()})
    sizes = sorted({c["extra"]["heldout_images"] for c in harness.load_cells(out) if "heldout_images" in c["extra"]})
    lines += [f"held-out evaluation: n = {n} images per cell; the tiny random SD3 pipeline "
              f"(benchmarks/t2i_sd3.py), reward {REWARD}" for n in sizes]
    return lines


BENCH = Benchmark(
    name="t2i_sd3", methods=METHODS, metrics=METRICS, run_cell=run_cell, prepare=Context, comparisons=COMPARISONS,
    headline=["reward", "drift"], reward_metric="reward", add_args=add_args, quick=quick, describe=describe,
    notes=notes)


# ----------------------------------------------------------------------------- --select: each method's rate
def select_lines(long, lrs: list[float], args) -> tuple[dict[str, float], list[str]]:
    """Per fine-tuning method, the rate of ``lrs`` with the highest mean held-out reward (ties: the
    smaller) and one line listing every rate's mean."""
    rewards = long[long["metric"] == "reward"].groupby("method")["value"].mean()
    chosen, lines = {}, [f"learning rate per method, chosen on the tiny pipeline of --pipeline-seed {args.pipeline_seed} "
                         f"(training seeds {args.seeds}; not the pipeline the verdicts are about): {SELECTION_RULE}"]
    for key in FINETUNED:
        means = {lr: float(rewards[f"{key}@{lr:g}"]) for lr in lrs if f"{key}@{lr:g}" in rewards.index}
        if len(means) < len(lrs):
            raise SystemExit(f"error: --select: {key} lacks cells at some of {', '.join(f'{lr:g}' for lr in lrs)}")
        best = max(means.values())
        chosen[key] = min(lr for lr, v in means.items() if v == best)
        shown = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in means.items())
        lines.append(f"  {METHODS[key].label}: lr {chosen[key]:g} (held-out reward at {shown})")
    if "base" in rewards.index:
        lines.append(f"  base: held-out reward {float(rewards['base']):.4f}")
    return chosen, lines


def split_select(argv: list[str]) -> tuple[bool, str, list[str]]:
    """``--select`` and ``--select-lrs`` (any spelling argparse takes) out of ``argv``: (whether to
    select, the rates' text, the rest for the harness); ``--select-lrs`` without ``--select`` is refused."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--select", action="store_true")
    pre.add_argument("--select-lrs", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.select_lrs is not None and not known.select:
        raise SystemExit("error: --select-lrs is an option of --select (the learning-rate choice)")
    return known.select, known.select_lrs or SELECT_LRS, rest


def select_main(argv: list[str]) -> None:
    _, lrs_text, ap_seen = split_select(argv)
    try:
        lrs = sorted({float(x) for x in lrs_text.split(",") if x})
    except ValueError:
        raise SystemExit(f"error: --select-lrs: comma list of numbers, got {lrs_text!r}") from None
    if not lrs or not all(lr > 0 for lr in lrs):
        raise SystemExit(f"error: --select-lrs: comma list of positive numbers, got {lrs_text!r}")
    methods = select_methods(lrs)

    def select_args(ap) -> None:
        common_args(ap)
        ap.set_defaults(out=SELECTION.parent, pipeline_seed=1, seeds="0", methods=",".join(methods),
                        select_lrs=lrs_text, lr=None, selection=None)

    bench = Benchmark(name="t2i_sd3_select", methods=methods, metrics=METRICS, run_cell=run_cell, prepare=Context,
                      headline=["reward"], reward_metric="reward", add_args=select_args, quick=quick,
                      describe=describe)
    args = harness.parser(bench, __doc__).parse_args(ap_seen)
    long = harness.main(bench, __doc__, ap_seen)
    chosen, lines = select_lines(long, lrs, args)
    write_sealed_json(args.out / "selection.json", {"lr": chosen, "rule": SELECTION_RULE, "lrs": lrs,
                                                    "pipeline_seed": args.pipeline_seed, "seeds": args.seeds})
    (args.out / "selection.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\nwrote {args.out / 'selection.json'}, {args.out / 'selection.txt'}")


if __name__ == "__main__":
    if split_select(sys.argv[1:])[0]:
        select_main(sys.argv[1:])
    else:
        harness.main(BENCH, __doc__)
