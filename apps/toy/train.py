"""Toy app: pretrain a tiny VP diffusion on a Gaussian mixture, GRAFT / P-GRAFT / PG on top.

The base p̄ is a small MLP, so its density is not available in closed form; but p̄ is cheap to
sample, so every GRS target p ∝ p̄ · E[A] is computed exactly on a large pool of base samples by
weighting each with its acceptance probability E[A(x)] (quadrature over the empirical p̄).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pgraft.core.checkpoint import load_config, load_pretrained
from pgraft.core.errors import FieldError, UsageError
from pgraft.core.losses import eps_matching_loss
from pgraft.core.pretrain import PretrainConfig, infinite_batches, pretrain
from pgraft.core.sampling import ddim_log_prob, ddim_step
from pgraft.core.schedules import cosine_alpha_bar, vp_times
from pgraft.core.shipped import SHIPPED, default_base, open_base_dir, recorded_base, resolve_base, shipped_dir
from pgraft.core.targets import checkpoint_lacks
from pgraft.core.trainer import GraftProblem

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
    model = ToyDenoiser(**cfg.model_config())
    loss = lambda m, x, c, g: eps_matching_loss(m, x, 0.0, cosine_alpha_bar, c, g)  # noqa: E731
    pcfg = PretrainConfig(steps=cfg.pretrain_steps, lr=cfg.lr, warmup=100, ema=0.995, seed=cfg.seed,
                          log_every=100, ckpt_every=max(cfg.pretrain_steps, 1))
    return pretrain(model, infinite_batches(data, cfg.pretrain_batch, cfg.seed), loss, pcfg, out,
                    cfg.model_config(), show_progress=show_progress)


SHIPPED_BASE = shipped_dir(Path(__file__).parent)  # `pgraft toy pretrain` with its defaults, see SHIPPED.json
DEFAULT_BASE = default_base(SHIPPED_BASE, "runs/toy/base")  # "shipped" when the package has it


def base_dir_of(base: str | Path, cfg: ToyConfig) -> Path:
    """The directory a ``--base`` value names: ``"shipped"`` is the base of the default settings
    (mixture "1d"; verified against its manifest), anything else the user's directory."""
    if str(base) == SHIPPED:
        shipped = ToyConfig(reward=cfg.reward, n_steps=cfg.n_steps, eta=cfg.eta)  # sampler settings are free
        if cfg != shipped:
            changed = ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items() if v != asdict(shipped)[k])
            raise UsageError(f"the shipped toy base was pretrained with the default settings, not {changed}; "
                             "pass --base DIR to pretrain one into DIR")
    return resolve_base(base, SHIPPED_BASE)


def run_base_dir(app_config: dict[str, Any]) -> Path:
    """The base directory of a run (its config's ``app`` section), checked to hold the weights and
    config the run was fine-tuned on."""
    return recorded_base(app_config["base"], app_config.get("base_sha256"), SHIPPED_BASE,
                         app_config.get("base_config_sha256"))


def load_or_pretrain(cfg: ToyConfig, base_dir: str | Path, show_progress: bool = True) -> ToyDenoiser:
    """The base in ``base_dir`` (verified by :func:`~pgraft.core.shipped.open_base_dir`; a damaged or
    partial one is refused, never pretrained over), pretrained into it first when it holds none."""
    if not open_base_dir(base_dir):
        return pretrain_toy(cfg, base_dir, show_progress).eval()
    return load_pretrained(ToyDenoiser, base_dir).eval()


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


def base_lacks(directory: Path) -> str | None:
    """What keeps ``directory`` from being a finished toy base (None when it is one), for a refusal
    that names it (see :mod:`pgraft.core.targets`)."""
    return checkpoint_lacks(directory, ToyDenoiser.__name__)


def base_problem(base_dir: str | Path) -> GraftProblem:
    """:func:`make_problem` for a base directory alone. The directory records the model's dimension
    but not its mixture, and sampling needs only the dimension (steps and eta: ToyConfig's defaults,
    those ``train`` uses)."""
    dim = int(load_config(base_dir)["dim"])
    return replace(make_problem(ToyConfig()), prior=lambda n, g: torch.randn(n, dim, generator=g))


def log_prob_fn(cfg: ToyConfig):
    """Per-step log-likelihood of the toy sampler (for the policy-gradient baseline)."""
    return ddim_log_prob(cosine_alpha_bar, cfg.eta)
