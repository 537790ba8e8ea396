"""Layout app: pretrain the base layout diffusion, fine-tune it with GRAFT / P-GRAFT, sample, evaluate.

The base (``pretrain_layout``) is a :class:`~pgraft.apps.layout.model.LayoutDenoiser` trained by
:func:`pgraft.core.pretrain.pretrain` on the joint box-flow / class-masking loss, next to this
project's layout feature network for FID (``<base>/features``) and ``layout_preset.json``.

Sampler. Boxes follow the flow's probability-flow ODE by Euler (deterministic) and classes are
unmasked stochastically, so GRAFT / P-GRAFT use the plain :func:`diffusion.step`. The
policy-gradient baseline needs a likelihood for every step; with Euler only the class reveals have
one, so :func:`make_problem` with ``box_noise = a > 0`` switches to the small-noise reverse SDE
:func:`diffusion.sde_step` (same marginals as the ODE; g(s)^2 = a^2 s; last step deterministic) and
:func:`log_prob_fn` returns the matching per-step log-density (Gaussian box term + class reveals).
``box_noise = 0`` gives PG the class-unmasking log-probability only.

Fine-tuning outputs (``train_layout``), beside the core run files: ``samples.png`` (rendered pages
of fresh samples from the fine-tuned sampler), ``evaluation.csv`` (one metrics row) and ``rounds.png``.

Evaluation protocols (:data:`PROTOCOLS`, :func:`evaluate_run`):

* ``unconditional`` (default): n layouts from the run's own sampler (a base or an unconditional run
  draws element counts and classes itself; a ``--conditional`` run cycles over the test class
  sets), FID against the whole test split, Max-IoU between the first ``max_iou_limit`` (1000)
  layouts of each set (LayoutGAN++-style; ``max_iou_ref_n`` / ``max_iou_coverage`` say how many
  reference layouts entered and which share of the generated ones could be matched at all);
* ``layoutdm``: LayoutDM's label-conditioned task (C -> S+P): for each test layout one layout is
  generated with its classes clamped (same slots, same labels, only the boxes are generated:
  :func:`diffusion.project_on_cond`, which the pretraining's ``p_class_cond`` share teaches the
  model), and every metric is computed against the *full* test split (Max-IoU uncapped; its
  coverage is 1 by construction when all test layouts are conditioned on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from pgraft.core.app import App
from pgraft.core.checkpoint import load_config, load_pretrained, load_run_head, save_json
from pgraft.core.plots import plot_rounds
from pgraft.core.pretrain import PretrainConfig, infinite_batches, pretrain
from pgraft.core.progress import make_console
from pgraft.core.shipped import base_digests, default_base, recorded_section, shipped_dir
from pgraft.core.state import RESTORE_BASE, read_json
from pgraft.core.targets import read_run
from pgraft.core.trainer import GraftConfig, GraftProblem, is_main_process, run_graft, sample_finetuned

from . import diffusion
from .data import PAD_CLASS, Layouts, from_state, load_layouts, to_state
from .features import LayoutFeatureNet, load_feature_net, train_feature_net
from .metrics import describe as describe_state
from .metrics import evaluate
from .model import PRESETS as MODEL_PRESETS
from .model import LayoutDenoiser
from .presets import PRESETS, LayoutPreset, get_preset
from .render import render_grid
from .rewards import REWARDS, alignment, overlap

console = make_console()
PRESET_NAME = "layout_preset.json"
FEATURES_DIR = "features"
BASE_FILES = (PRESET_NAME, f"{FEATURES_DIR}/model.safetensors")  # a finished base's files besides the checkpoint
DEFAULT_BASE = default_base(shipped_dir(Path(__file__).parent), "runs/layout/base")  # "shipped" when shipped


def load_split(preset: LayoutPreset, split: str) -> Layouts:
    """The preset's train or test layouts (synthetic: fixed seeded streams; real: the user's file)."""
    n = preset.n_train if split == "train" else preset.n_test
    if preset.dataset == "synthetic":
        return load_layouts("synthetic", split, n, preset.seed, preset.max_elements)
    # real data: one file / directory; the last n_test layouts are the test split
    data = load_layouts(preset.dataset, path=preset.data_path, max_elements=preset.max_elements)
    if len(data) < 2:
        raise ValueError(f"{preset.data_path}: need at least 2 layouts for a train/test split, got {len(data)}")
    n_test = min(preset.n_test, len(data) // 2)
    return data.subset(slice(len(data) - n_test, None) if split == "test" else slice(0, min(n, len(data) - n_test)))


# ----------------------------------------------------------------------------- base model
@dataclass
class BaseModel:
    """A pretrained base: the EMA denoiser, its preset, the FID feature net and the test split."""

    model: LayoutDenoiser
    preset: LayoutPreset
    feature_net: LayoutFeatureNet
    directory: Path

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(read_json(self.directory / PRESET_NAME, keys=("class_names",), fix=RESTORE_BASE)["class_names"])

    def reference(self) -> Layouts:
        return load_split(self.preset, "test")


def model_config(base: BaseModel) -> dict[str, Any]:
    """JSON constructor kwargs of the base denoiser (as saved with it), for the fine-tuned head."""
    return load_config(base.directory)


def pretrain_layout(preset: LayoutPreset, out: str | Path, show_progress: bool = True) -> BaseModel:
    """Train (or resume) the base denoiser and the FID feature net; writes ``out`` (see module doc)."""
    out = Path(out)
    train = load_split(preset, "train")
    kwargs = {"n_classes": train.n_classes, "max_elements": train.max_elements, **MODEL_PRESETS[preset.model],
              "count_probs": train.count_probs()}
    torch.manual_seed(preset.seed)
    model = LayoutDenoiser(**kwargs)
    out.mkdir(parents=True, exist_ok=True)
    save_json({"preset": asdict(preset), "class_names": list(train.class_names)}, out / PRESET_NAME)
    pcfg = PretrainConfig(steps=preset.steps, lr=preset.lr, warmup=preset.warmup, ema=preset.ema, seed=preset.seed,
                          log_every=max(1, min(100, preset.steps // 10)), ckpt_every=max(1, min(500, preset.steps)))
    pretrain(model, infinite_batches(to_state(train), preset.batch_size, preset.seed),
             diffusion.pretrain_loss(preset.p_class_cond), pcfg, out, kwargs, show_progress=show_progress)
    if not (out / FEATURES_DIR / "model.safetensors").is_file():
        train_feature_net(train, preset.feature, out / FEATURES_DIR)
    return load_base(out)


def load_base(directory: str | Path) -> BaseModel:
    directory = Path(directory)
    path = directory / PRESET_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a layout base model (no {PRESET_NAME}); "
                                "train one with `pgraft layout pretrain`")
    preset = LayoutPreset(**read_json(path, keys=("preset",), fix=RESTORE_BASE)["preset"])
    model = load_pretrained(LayoutDenoiser, directory).eval().requires_grad_(False)
    return BaseModel(model, preset, load_feature_net(directory / FEATURES_DIR), directory)


# ----------------------------------------------------------------------------- the GRAFT problem
def make_problem(base: BaseModel, reward: str = "combined", sample_steps: int | None = None,
                 box_noise: float = 0.0, conditions: list[torch.Tensor] | None = None) -> GraftProblem:
    """The layout world as a :class:`GraftProblem`.

    - prior: N(0, I) boxes and all-masked classes, element counts from the training law;
    - step: Euler on boxes + class unmasking (``box_noise = 0``) or the SDE step (``box_noise > 0``);
    - loss: :func:`diffusion.loss` (P-GRAFT bridge from X_t when t > 0);
    - reward: ``REWARDS[reward]`` (higher is better);
    - ``conditions``: optional list of Long[N] class rows (-1 = absent) for class-conditioned
      fine-tuning ("given the classes, generate the boxes"); the prior then draws every slot and the
      step restricts the state to the condition (:func:`diffusion.project_on_cond`).
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; choose from {sorted(REWARDS)}")
    model = base.model
    steps = sample_steps or base.preset.sample_steps
    class_names = base.class_names
    step = diffusion.step if box_noise == 0 else diffusion.sde_step(box_noise)
    if conditions is not None:
        if not conditions:
            raise ValueError("conditions must be a non-empty list of class rows")
        step = diffusion.project_on_cond(step)
        all_slots = [0.0] * model.max_elements + [1.0]

        def prior(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            return diffusion.prior(n, all_slots, model.n_classes, None, generator)
    else:

        def prior(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            return diffusion.model_prior(model, n, None, generator)

    def metrics(x0: dict[str, torch.Tensor], rewards: torch.Tensor, cond=None) -> dict[str, float]:
        page = from_state(x0, class_names)
        return {"alignment": float(alignment(page.boxes, page.mask).mean()),
                "overlap": float(overlap(page.boxes, page.mask).mean())}

    return GraftProblem(
        prior=prior,
        times=diffusion.times(steps),
        step=step,
        loss=diffusion.loss,
        reward=REWARDS[reward],
        conditions=conditions,
        collate=(lambda rows: torch.stack(rows)) if conditions is not None else None,
        key=diffusion.key,
        describe=lambda x0, r, cond: describe_state(x0, class_names),
        metrics=metrics,
    )


def reference_conditions(base: BaseModel, n: int | None = None) -> list[torch.Tensor]:
    """Class rows (Long[N], -1 = absent) of the test split: LayoutDM's class-conditioned protocol
    generates boxes for the test layouts' class sets; the test boxes themselves are never used."""
    ref = base.reference()
    rows = list(ref.classes[: n or len(ref)])
    return rows


def log_prob_fn(box_noise: float):
    """Per-step log p_theta(x_next | x) for the PG baseline (see the module docstring)."""
    return diffusion.sde_log_prob(box_noise)


# ----------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class LayoutTrainConfig:
    """App settings of a fine-tuning run (the round-loop settings live in GraftConfig).

    ``base`` is ``"shipped"`` (the base shipped with the package, the default when there is one) or a base directory (loaded, or
    pretrained with ``preset`` when it holds no finished base); ``base_sha256`` and
    ``base_config_sha256`` are the SHA-256 of the base's weights and config.json, filled in by
    :func:`train_layout` (None in runs recorded before they were).
    """

    reward: str = "combined"
    sample_steps: int = 0  # 0 = the base preset's
    base: str = DEFAULT_BASE
    preset: str = "default"
    conditional: bool = False
    final_samples: int = 512
    base_sha256: str | None = None
    base_config_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose from {sorted(REWARDS)}")


def problem_for(cfg: LayoutTrainConfig, base: BaseModel) -> GraftProblem:
    return make_problem(base, cfg.reward, cfg.sample_steps or None,
                        conditions=reference_conditions(base) if cfg.conditional else None)


def train_layout(cfg: LayoutTrainConfig, graft: GraftConfig, out: str | Path, resume: bool = False,
                 show_progress: bool = True) -> pd.DataFrame:
    """Fine-tune the base in ``cfg.base`` with ``graft``; returns the metrics table."""
    base_dir, base = APP.base_for_run(cfg.base, cfg.preset, out, resume, show_progress)
    cfg = replace(cfg, **base_digests(base_dir, recorded_section(out, "layout") if resume else None))
    problem = problem_for(cfg, base)
    head, table = run_graft(problem, base.model, model_config(base), graft, out,
                            app_config={"layout": asdict(cfg)}, resume=resume, show_progress=show_progress)
    if is_main_process() and cfg.final_samples > 0:
        out = Path(out)
        layouts, rewards = sample_layouts(problem, head, base.model, cfg.final_samples, graft.split,
                                          base.class_names, seed=10_007,
                                          show_progress=show_progress)
        row = {**evaluate_layouts(layouts, base), "reward_mean": float(rewards.mean())}
        pd.DataFrame([row]).to_csv(out / "evaluation.csv", index=False)
        render_grid(layouts.subset(slice(0, 24)), out / "samples.png")
        plot_rounds(table, ["reward_mean", "alignment", "overlap", "accept_rate"], out / "rounds.png", title=str(out))
    return table


def sample_layouts(problem: GraftProblem, head: nn.Module, base_model: nn.Module, n: int, split: float,
                   class_names: tuple[str, ...], seed: int = 0, show_progress: bool = True) -> tuple[Layouts, torch.Tensor]:
    """n layouts from head T -> t, base t -> 0 (page units) and their rewards Float[n].

    With conditions, layout i uses condition i mod len(conditions)."""
    cond_index = None
    if problem.conditions is not None:
        cond_index = torch.arange(n) % len(problem.conditions)
    _, x0 = sample_finetuned(problem, head, base_model, n, split, seed, batch=256, cond_index=cond_index,
                             show_progress=show_progress)
    cond = problem.cond_batch(cond_index) if cond_index is not None else None
    rewards = torch.as_tensor(problem.reward(x0, cond), dtype=torch.float64)
    return from_state(x0, class_names), rewards


def evaluate_layouts(layouts: Layouts, base: BaseModel, max_iou_limit: int | None = 1000) -> dict[str, Any]:
    """Metric row (FID on this project's feature net, alignment, overlap, max-IoU with its
    ``max_iou_coverage`` / ``max_iou_n`` / ``max_iou_ref_n``, class TV) against the test split."""
    return evaluate(layouts, base.reference(), base.feature_net, max_iou_limit=max_iou_limit)


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], float, LayoutTrainConfig, BaseModel, nn.Module]:
    """(config, split t, app config, base, fine-tuned head) of a finished run directory."""
    run_dir = Path(run_dir)
    config, section = read_run(run_dir, "layout")
    app_cfg = LayoutTrainConfig(**section)
    split = float(config.get("graft", {}).get("split", 0.0))
    head = load_run_head(LayoutDenoiser, run_dir).eval()
    base_dir = APP.run_base(section)
    return config, split, app_cfg, load_base(base_dir), head


PROTOCOLS = ("unconditional", "layoutdm")  # see the module docstring
UNCONDITIONAL_N = 1000  # layouts evaluate_run samples under "unconditional" when n is None


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")


def sample_run(run_dir: str | Path, n: int | None, seed: int = 0, show_progress: bool = True,
               protocol: str = "unconditional") -> tuple[Layouts, torch.Tensor, BaseModel]:
    """n fresh layouts (and rewards) of a run directory or of a base model directory.

    ``protocol="layoutdm"``: layout i is generated with the classes (and slots) of test layout i
    clamped, for i < n <= the test split's size (n = None: the whole test split); only the boxes
    are sampled (see the module docstring). ``unconditional`` needs an n.
    """
    _check_protocol(protocol)
    run_dir = Path(run_dir)
    if (run_dir / PRESET_NAME).is_file():  # a base model: sample it alone
        base = load_base(run_dir)
        head, split, app_cfg = base.model, 0.0, None
    else:
        _, split, app_cfg, base, head = load_run(run_dir)
    if protocol == "layoutdm":
        n_test = len(base.reference())
        n = n_test if n is None else n
        if n > n_test:
            raise ValueError(f"the layoutdm protocol generates one layout per test layout: n={n} is more "
                             f"than the {n_test} layouts of the test split")
        problem = (make_problem(base, conditions=reference_conditions(base)) if app_cfg is None
                   else problem_for(replace(app_cfg, conditional=True), base))
    else:
        if n is None:
            raise ValueError("the unconditional protocol needs a number of layouts n")
        problem = make_problem(base) if app_cfg is None else problem_for(app_cfg, base)
    layouts, rewards = sample_layouts(problem, head, base.model, n, split, base.class_names, seed, show_progress)
    return layouts, rewards, base


def evaluate_run(run_dir: str | Path, n: int | None = None, seed: int = 0, show_progress: bool = True,
                 protocol: str = "unconditional") -> dict[str, Any]:
    """Metric row of fresh samples of a run (or base) directory, plus the protocol and the mean reward.

    ``unconditional``: n layouts (None = 1000), Max-IoU between the first 1000 of each set.
    ``layoutdm``: one class-clamped layout per test layout (n = None: all of them, the protocol;
    a smaller n conditions on the first n test layouts only, a partial run), every metric against
    the full test split, Max-IoU uncapped.
    """
    _check_protocol(protocol)
    if protocol == "unconditional" and n is None:
        n = UNCONDITIONAL_N
    layouts, rewards, base = sample_run(run_dir, n, seed, show_progress, protocol)
    metrics = evaluate_layouts(layouts, base, max_iou_limit=None if protocol == "layoutdm" else 1000)
    return {"protocol": protocol, **metrics, "reward_mean": float(rewards.mean())}



APP = App(
    name="layout",
    shipped=shipped_dir(Path(__file__).parent),  # the 'default' preset's base, see bases/default/SHIPPED.json
    load=load_base,
    model_class=LayoutDenoiser.__name__,
    files=BASE_FILES,
    pretrain=lambda directory, preset, show_progress: pretrain_layout(get_preset(preset), directory, show_progress),
    pretrain_note="about 25 minutes on 2 CPU cores with the 'default' preset; an interrupted one resumes",
    make_problem=make_problem,
    evaluate=evaluate_run,
    presets=PRESETS,
)

__all__ = ["APP", "PRESETS", "LayoutPreset", "BaseModel", "LayoutTrainConfig", "PAD_CLASS", "get_preset",
           "pretrain_layout", "load_base", "make_problem", "log_prob_fn", "train_layout", "sample_layouts",
           "evaluate_layouts", "evaluate_run", "sample_run", "model_config", "PROTOCOLS"]
