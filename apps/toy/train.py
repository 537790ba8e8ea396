"""Toy app: pretrain a tiny VP diffusion on a Gaussian mixture, GRAFT / P-GRAFT / PG on top.

The base p̄ is a small MLP, so its density is not available in closed form; but p̄ is cheap to
sample, so every GRS target p ∝ p̄ · E[A] is computed exactly on a large pool of base samples by
weighting each with its acceptance probability E[A(x)] (quadrature over the empirical p̄).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pgraft.core.app import App
from pgraft.core.checkpoint import load_config, load_pretrained
from pgraft.core.errors import FieldError
from pgraft.core.losses import eps_matching_loss
from pgraft.core.pretrain import PretrainConfig, infinite_batches, pretrain
from pgraft.core.sampling import ddim_log_prob, ddim_step
from pgraft.core.schedules import cosine_alpha_bar, vp_times
from pgraft.core.shipped import base_digests, default_base, recorded_section, shipped_dir
from pgraft.core.trainer import GraftConfig, GraftProblem, run_graft

from .data import MIXTURES
from .model import ToyDenoiser
from .rewards import REWARDS


@dataclass(frozen=True)
class ToyConfig:
    """The toy world and its base model. ``eta = 1`` makes the sampler stochastic (DDPM-like),
    which gives P-GRAFT a nonzero Var[r | X_t] and gives the policy-gradient baseline a likelihood."""

    mixture: str = "1d"
    reward: str = "x"
    n_steps: int = 40
    eta: float = 1.0
    hidden: int = 128
    depth: int = 3
    pretrain_steps: int = 3000
    pretrain_batch: int = 512
    n_data: int = 50_000
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixture not in MIXTURES:
            raise FieldError("mixture", f"unknown mixture {self.mixture!r}; choose from {sorted(MIXTURES)}")
        if self.reward not in REWARDS:
            raise FieldError("reward", f"unknown reward {self.reward!r}; choose from {sorted(REWARDS)}")

    def model_config(self) -> dict:
        return {"dim": MIXTURES[self.mixture].dim, "hidden": self.hidden, "depth": self.depth}


def pretrain_toy(cfg: ToyConfig, out: str | Path, show_progress: bool = True) -> ToyDenoiser:
    """Train the base eps-model on ``cfg.n_data`` mixture samples; writes a save_pretrained dir."""
    mixture = MIXTURES[cfg.mixture]
    data = mixture.sample(cfg.n_data, torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)  # model init (core.pretrain seeds only after the model exists)
    model = ToyDenoiser(**cfg.model_config())
    loss = lambda m, x, c, g: eps_matching_loss(m, x, 0.0, cosine_alpha_bar, c, g)  # noqa: E731
    pcfg = PretrainConfig(steps=cfg.pretrain_steps, lr=cfg.lr, warmup=100, ema=0.995, seed=cfg.seed,
                          log_every=100, ckpt_every=max(cfg.pretrain_steps, 1))
    return pretrain(model, infinite_batches(data, cfg.pretrain_batch, cfg.seed), loss, pcfg, out,
                    cfg.model_config(), show_progress=show_progress)


DEFAULT_BASE = default_base(shipped_dir(Path(__file__).parent), "runs/toy/base")  # "shipped" when the package has it
SAMPLER_FIELDS = ("reward", "n_steps", "eta")  # settings a base does not depend on


def shipped_mismatch(cfg: ToyConfig) -> str | None:
    """Why the shipped toy base (pretrained with the default settings, see its SHIPPED.json) does not
    fit ``cfg`` (None when it does: only the sampler settings differ)."""
    shipped = replace(ToyConfig(), **{k: getattr(cfg, k) for k in SAMPLER_FIELDS})
    if cfg == shipped:
        return None
    changed = ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items() if v != asdict(shipped)[k])
    return (f"the shipped toy base was pretrained with the default settings, not {changed}; "
            "pass --base DIR to pretrain one into DIR")


def make_problem(cfg: ToyConfig) -> GraftProblem:
    """The toy as a :class:`GraftProblem` (unconditional, VP eps-prediction, DDIM with ``cfg.eta``)."""
    dim = MIXTURES[cfg.mixture].dim
    return GraftProblem(
        prior=lambda n, g: torch.randn(n, dim, generator=g),
        times=vp_times(cfg.n_steps),
        step=ddim_step(cosine_alpha_bar, cfg.eta),
        loss=lambda m, x, t, c, g: eps_matching_loss(m, x, t, cosine_alpha_bar, c, g),
        reward=REWARDS[cfg.reward],
        key=None,
        metrics=None,
    )


def base_problem(base_dir: str | Path) -> GraftProblem:
    """:func:`make_problem` for a base directory alone. The directory records the model's dimension
    but not its mixture, and sampling needs only the dimension (steps and eta: ToyConfig's defaults,
    those ``train`` uses)."""
    dim = int(load_config(base_dir)["dim"])
    return replace(make_problem(ToyConfig()), prior=lambda n, g: torch.randn(n, dim, generator=g))


def log_prob_fn(cfg: ToyConfig):
    """Per-step log-likelihood of the toy sampler (for the policy-gradient baseline)."""
    return ddim_log_prob(cosine_alpha_bar, cfg.eta)


def train_toy(cfg: ToyConfig, graft: GraftConfig, out: str | Path, base: str = DEFAULT_BASE, resume: bool = False,
              show_progress: bool = True):
    """GRAFT / P-GRAFT rounds on the base ``base`` names (``shipped`` or a directory, pretrained with
    ``cfg`` first when it holds none); with ``graft.dedup`` one copy of each distinct sample (2
    decimals) is kept. Returns (fine-tuned head, metrics table)."""
    problem = make_problem(cfg)
    if graft.dedup:
        from pgraft.core.dedup import tensor_key

        problem.key = lambda x: [tensor_key(row, 2) for row in x]
    base_dir, model = APP.base_for_run(base, cfg, out, resume, show_progress)
    digests = base_digests(base_dir, recorded_section(out) if resume else None)
    return run_graft(problem, model, cfg.model_config(), graft, out, app_config={"toy": asdict(cfg), "base": base,
                                                                               **digests},
                     resume=resume, show_progress=show_progress)


def _load_base(directory: Path) -> ToyDenoiser:
    return load_pretrained(ToyDenoiser, directory).eval()


APP = App(
    name="toy",
    shipped=shipped_dir(Path(__file__).parent),  # `pgraft toy pretrain` with its defaults, see SHIPPED.json
    load=_load_base,
    model_class=ToyDenoiser.__name__,
    pretrain=lambda directory, cfg, show_progress: pretrain_toy(cfg, directory, show_progress),
    shipped_preset=ToyConfig(),
    preset_mismatch=shipped_mismatch,
    make_problem=make_problem,
)
