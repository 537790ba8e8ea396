"""Molecule fine-tuning: the graph masking diffusion as a :class:`GraftProblem`, plus run outputs.

``train_molecule`` pretrains the base if needed, runs the core round loop (GRAFT when ``t = 0``,
P-GRAFT otherwise; any GRS rule; dedup keyed on canonical SMILES) and writes, next to the core run
files, ``samples.csv`` (SMILES + reward of fresh samples from the fine-tuned sampler),
``top_molecules.png`` (RDKit grid of the best unique molecules) and ``rounds.png``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pgraft.core.app import App
from pgraft.core.checkpoint import load_run_head, save_json
from pgraft.core.plots import plot_rounds
from pgraft.core.progress import make_console
from pgraft.core.sampling import unmask_log_prob
from pgraft.core.schedules import masking_times
from pgraft.core.shipped import base_digests, default_base, recorded_section, shipped_dir
from pgraft.core.targets import read_run
from pgraft.core.trainer import GraftConfig, GraftProblem, is_main_process, run_graft, sample_finetuned

from . import diffusion
from .data import load_dataset, state_to_smiles
from .metrics import evaluate_smiles, novelty_rates, novelty_row
from .model import GraphTransformer
from .presets import PRESETS, get_preset
from .pretrain import META_NAME, BaseModel, load_base, pretrain_molecule
from .rewards import get_reward, novel_reward, qed_score, to_mols, training_smiles

console = make_console()

DEFAULT_BASE = default_base(shipped_dir(Path(__file__).parent), "runs/molecule/base")  # "shipped" when shipped


@dataclass(frozen=True)
class MoleculeTrainConfig:
    """App settings of a fine-tuning run (the round-loop settings live in GraftConfig).

    ``base`` is ``"shipped"`` (the base shipped with the package, the default when there is one) or a base directory (loaded, or
    pretrained with ``preset`` when it holds no finished base); ``base_sha256`` and
    ``base_config_sha256`` are the SHA-256 of the base's weights and config.json, filled in by
    :func:`train_molecule` (None in runs recorded before they were).
    ``novel`` scores only novel molecules: one of the base's training split (canonical SMILES) gets
    reward 0, like an invalid one (:class:`.rewards.NovelReward`; False in runs recorded before it existed).
    """

    reward: str = "qed"
    sample_steps: int = 100
    final_samples: int = 1000
    base: str = DEFAULT_BASE
    preset: str = "default"
    base_sha256: str | None = None
    novel: bool = False
    base_config_sha256: str | None = None


def base_training_smiles(base: BaseModel) -> frozenset[str]:
    """Canonical SMILES of the training split the base was trained on, as :func:`evaluate_base_row`
    rebuilds it from the base's recorded preset (dataset, seed, limit); cached per process."""
    return training_smiles(base.preset.dataset, base.preset.seed, base.preset.dataset_limit)


@dataclass(frozen=True)
class _Describe:
    """``describe(x0, rewards, cond)``: the canonical SMILES of each sample (None if invalid)."""

    atom_types: tuple[str, ...]

    def __call__(self, x0, rewards, cond=None) -> pd.DataFrame:
        return pd.DataFrame({"smiles": _smiles(x0, self.atom_types)})


def novelty_reference(base: BaseModel) -> frozenset[str] | None:
    """The base's training split (canonical SMILES) to measure novelty against, when the base
    records that it was trained on its preset's dataset (QM9, MOSES or a SMILES file); None for a
    base trained on data handed to :func:`pretrain_molecule` directly (tests), whose split is not
    recorded."""
    recorded, source = base.dataset, str(base.preset.dataset)
    if recorded is None or recorded not in (source, Path(source).stem):
        return None
    return base_training_smiles(base)


def make_problem(base: BaseModel, reward: str, sample_steps: int, novel: bool = False,
                 reference: frozenset[str] | None = None) -> GraftProblem:
    """The molecule world as a GraftProblem: masked prior, reveal step, masking loss, RDKit reward
    (with ``novel``, 0 for molecules of the base's training split: :func:`base_training_smiles`).
    With ``reference`` (:func:`novelty_reference`), every round's metrics also report novelty and
    V.U.N. against it: what a QED gain is traded against."""
    spec = base.spec
    reward_fn = get_reward(reward, spec)
    if novel:
        reward_fn = novel_reward(reward_fn, base_training_smiles(base))
    atom_types = tuple(spec.atom_types)

    def prior(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return diffusion.prior(n, base.size_distribution, generator, n_atom_types=spec.n_atom_types,
                               n_bond_types=spec.n_bond_types)

    def metrics(x0, rewards, cond=None) -> dict[str, float]:
        mols = to_mols(x0, atom_types)
        valid = [m for m in mols if m is not None]
        qeds = [qed_score(m) for m in valid]
        row = {"validity": len(valid) / len(mols), "qed_valid_mean": sum(qeds) / len(qeds) if qeds else 0.0}
        if reference is not None:
            found = novelty_rates(_smiles(x0, atom_types), reference)
            row.update(novelty=found["novelty"], vun=found["vun"])
        return row

    return GraftProblem(
        prior=prior,
        times=masking_times(sample_steps),
        step=diffusion.step,
        loss=diffusion.loss,
        reward=reward_fn,
        key=lambda x0: _smiles(x0, atom_types),
        describe=_Describe(atom_types),
        metrics=metrics,
    )


def _smiles(x0, atom_types) -> list[str | None]:
    return state_to_smiles(x0, atom_types)


def log_prob(model, x, t, t_next, x_next, cond=None) -> torch.Tensor:
    """Policy-gradient log-likelihood of one reveal step (nodes + upper-triangle edges); [B]."""
    logits = model(x, torch.full((x["nodes"].shape[0],), float(t)), cond)
    n_atoms, n_bonds = logits["nodes"].shape[-1], logits["edges"].shape[-1]
    nodes = unmask_log_prob(x["nodes"], x_next["nodes"], logits["nodes"], n_atoms, x["node_mask"])
    edges = unmask_log_prob(x["edges"], x_next["edges"], logits["edges"], n_bonds,
                            diffusion.edge_maskable(x["node_mask"]))
    return nodes + edges


def train_molecule(cfg: MoleculeTrainConfig, graft: GraftConfig, out: str | Path, resume: bool = False,
                   show_progress: bool = True) -> pd.DataFrame:
    """Fine-tune the base in ``cfg.base`` with ``graft``; returns the metrics table."""
    base_dir, base = APP.base_for_run(cfg.base, cfg.preset, out, resume, show_progress)
    cfg = replace(cfg, **base_digests(base_dir, recorded_section(out, "molecule") if resume else None))
    problem = make_problem(base, cfg.reward, cfg.sample_steps, novel=cfg.novel, reference=novelty_reference(base))
    head, table = run_graft(problem, base.model, base.model.init_kwargs(), graft, out,
                            app_config={"molecule": _app_record(cfg, Path(out), resume)},
                            resume=resume, show_progress=show_progress)
    if is_main_process():
        write_outputs(Path(out), problem, head, base, graft.split, cfg.final_samples, show_progress)
    return table


def _app_record(cfg: MoleculeTrainConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The app config recorded in the run; resuming a run recorded before ``novel`` existed (so
    without it, i.e. not novel) keeps its record unchanged, or the resume would be refused."""
    record = asdict(cfg)
    if resume and not cfg.novel:
        try:
            section = json.loads((run_dir / "config.json").read_text())["app"]["molecule"]
        except (OSError, ValueError, KeyError, TypeError):
            section = None
        if isinstance(section, dict) and "novel" not in section:
            record.pop("novel")
    return record


def write_outputs(run_dir: Path, problem: GraftProblem, head, base: BaseModel, split: float, n: int,
                  show_progress: bool = True) -> None:
    """samples.csv, top_molecules.png and rounds.png for a finished run."""
    smiles, rewards = sample_smiles(problem, head, base.model, n, split, seed=10_007, show_progress=show_progress)
    samples = pd.DataFrame({"smiles": smiles, "reward": rewards.numpy()})
    samples.to_csv(run_dir / "samples.csv", index=False)
    reference = novelty_reference(base)
    if reference is not None:
        summary = {"n": n, "seed": 10_007, "reward_mean": float(rewards.double().mean()),
                   **novelty_row(smiles, reference)}
        save_json(summary, run_dir / "summary.json")
        console.print(f"final {n:,} samples: QED of valid {summary['qed_valid_mean']:.3f}, validity "
                      f"{summary['validity']:.3f}, uniqueness {summary['uniqueness']:.3f}, novelty (vs the base's "
                      f"training split) {summary['novelty']:.3f}, V.U.N. {summary['vun']:.3f} (QED of V.U.N. "
                      f"{summary['qed_vun_mean']:.3f}); {run_dir / 'summary.json'}")
    draw_top(samples, run_dir / "top_molecules.png")
    table = pd.read_csv(run_dir / "metrics.csv")
    plot_rounds(table, [c for c in ["reward_mean", "validity", "unique_frac", "qed_valid_mean", "novelty", "vun",
                                    "accept_rate"] if c in table],
                run_dir / "rounds.png", title=str(run_dir))
    console.print(f"wrote {run_dir / 'samples.csv'}, {run_dir / 'top_molecules.png'}, {run_dir / 'rounds.png'}")


class SampledSmiles(list):
    """A list of SMILES (None = invalid, fragmented graphs included) that also carries
    ``fragments``: the same samples with fragmented-but-sanitizable graphs kept as ``"A.B"``
    SMILES, for :func:`evaluate_base_row`'s largest-fragment validity."""

    def __init__(self, smiles, fragments=None):
        super().__init__(smiles)
        self.fragments = list(smiles) if fragments is None else list(fragments)


def sample_smiles(problem: GraftProblem, head, base_model, n: int, split: float, seed: int = 0,
                  show_progress: bool = True) -> tuple[list[str | None], torch.Tensor]:
    """n molecules from head T -> t, base t -> 0; returns (SMILES or None, rewards). The list is a
    :class:`SampledSmiles` (its ``fragments`` keep fragmented molecules) for a molecule problem."""
    _, x0 = sample_finetuned(problem, head, base_model, n, split, seed, batch=256, show_progress=show_progress)
    smiles = problem.describe(x0, None)["smiles"].tolist()
    if isinstance(problem.describe, _Describe):
        smiles = SampledSmiles(smiles, state_to_smiles(x0, problem.describe.atom_types, require_connected=False))
    return smiles, problem.reward(x0, None)


def draw_top(samples: pd.DataFrame, path: Path, k: int = 24) -> None:
    """RDKit grid PNG of the ``k`` highest-reward unique valid molecules."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    top = samples.dropna(subset=["smiles"]).drop_duplicates("smiles").nlargest(k, "reward")
    if top.empty:
        return
    mols = [Chem.MolFromSmiles(s) for s in top["smiles"]]
    image = Draw.MolsToGridImage(mols, molsPerRow=6, subImgSize=(220, 180),
                                 legends=[f"{r:.3f}" for r in top["reward"]])
    image.save(str(path))


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], GraftConfig, MoleculeTrainConfig, BaseModel, Any]:
    """(config, graft config, app config, base, fine-tuned head) of a finished run directory."""
    run_dir = Path(run_dir)
    config, section = read_run(run_dir, "molecule")
    app_cfg = MoleculeTrainConfig(**section)
    key = "graft" if "graft" in config else "pg"
    graft = GraftConfig.from_dict(config[key]) if key == "graft" else GraftConfig(split=0.0)
    base_dir = APP.run_base(asdict(app_cfg))
    return config, graft, app_cfg, load_base(base_dir), load_run_head(GraphTransformer, run_dir).eval()


def evaluate_run(run_dir: str | Path, n: int = 1000, fcd: bool = True, seed: int = 0,
                 show_progress: bool = True) -> dict[str, Any]:
    """Metrics row (validity, uniqueness, novelty, QED, diversity, type TV, FCD) of n fresh samples."""
    _, graft, app_cfg, base, head = load_run(run_dir)
    problem = make_problem(base, app_cfg.reward, app_cfg.sample_steps, novel=app_cfg.novel)
    smiles, rewards = sample_smiles(problem, head, base.model, n, graft.split, seed, show_progress)
    return evaluate_base_row(smiles, rewards, base, fcd, seed)


def sample_base(base: BaseModel, n: int, seed: int = 0, show_progress: bool = True, reward: str = "qed"
                ) -> tuple[list[str | None], torch.Tensor]:
    """n molecules from the base alone (the plain base sampler: no head, no split; the preset's
    sampler steps) and their ``reward``: what a run is compared with."""
    problem = make_problem(base, reward, base.preset.sample_steps)
    return sample_smiles(problem, base.model, base.model, n, 0.0, seed, show_progress)


def evaluate_base(base_dir: str | Path, n: int = 1000, fcd: bool = True, seed: int = 0,
                  show_progress: bool = True) -> dict[str, Any]:
    """:func:`evaluate_run`'s metrics row for the base in ``base_dir`` sampled alone (reward: QED)."""
    base = load_base(base_dir)
    smiles, rewards = sample_base(base, n, seed, show_progress)
    return evaluate_base_row(smiles, rewards, base, fcd, seed)


def evaluate_base_row(smiles, rewards, base: BaseModel, fcd: bool, seed: int) -> dict[str, Any]:
    """evaluate_smiles against the base's own dataset split, plus the mean reward.

    Keys: see :mod:`.metrics` (``validity`` single-fragment, ``validity_largest_fragment`` DiGress,
    ``vun``, ``qed_novel_mean``, ``sa_raw_mean`` raw SA 1-10, ``fcd`` with ``fcd_n``/``fcd_ref_n``).
    ``smiles`` from :func:`sample_smiles` carry their fragmented samples, which only
    ``validity_largest_fragment`` counts; a plain list has None for those (then it equals ``validity``).
    """
    data = load_dataset(base.preset.dataset, seed=base.preset.seed, limit=base.preset.dataset_limit)
    generated = getattr(smiles, "fragments", smiles)
    return {**evaluate_smiles(generated, data.train.smiles, data.test.smiles, fcd=fcd, seed=seed),
            "reward_mean": float(rewards.double().mean())}


APP = App(
    name="molecule",
    shipped=shipped_dir(Path(__file__).parent),  # the 'default' preset's base, see bases/default/SHIPPED.json
    load=load_base,
    model_class=GraphTransformer.__name__,
    files=(META_NAME,),
    pretrain=lambda directory, preset, show_progress: pretrain_molecule(get_preset(preset), directory,
                                                                         show_progress=show_progress),
    pretrain_note="up to ~30 minutes on 2 CPU cores; an interrupted one resumes",
    make_problem=make_problem,
    evaluate=evaluate_run,
    presets=PRESETS,
)
