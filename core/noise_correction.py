"""The inverse-noise-correction workflow (paper Sec. 5), shared by every app that drives a flow model.

    invert            data -> noises z = Phi^{-1}(x) through the base's *discrete* sampler, in shards
    train_correction  N(0, I) -> law of the inverted noises (a small noise flow), resumable
    sample_corrected  z ~ N(0, I) -> noise flow -> frozen base sampler

An app plugs in with two small objects: a :class:`FlowBase` (the frozen base as a velocity model, its time
grid and step, its identity for the directory's metadata, the shape of one noise) and a :class:`NoiseModels`
(how to build, check and load its noise models, its default :class:`CorrectionConfig`, and what else its
``correct.json`` records). The math (fixed-point inversion, noise-flow training, shard files) lives in
:mod:`pgraft.core.inversion`; this module owns the directories: invert.json and correct.json are written
only under the directory's writer lock (:func:`pgraft.core.integrity.exclusive`) and after the settings
were compared with what the directory already holds; every refusal is a one-line :class:`UsageError`.

Directories::

    invert/   invert.json (settings, base identity), shards/noise_NNNNN.safetensors
    correct/  config.json + model.safetensors (the noise flow, EMA), train_state.pt, loss.csv, correct.json
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint import load_pretrained, save_json
from .errors import UsageError
from .integrity import exclusive
from .inversion import InversionResult, invert, read_shards, shard_done, shard_path, train_noise_flow
from .pretrain import is_pretrained
from .progress import progress_bar
from .sampling import StepFn, euler_step, sample
from .schedules import flow_times
from .state import RESTORE_OUT, atomic_write, read_json

INVERT_META = "invert.json"
CORRECT_META = "correct.json"
COUPLINGS = ("ot", "independent")
RESUMABLE = ("steps", "lr")  # the settings a rerun may change while it resumes a noise flow's weights


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CorrectionConfig:
    """How a noise-correction flow is trained: ``steps`` AdamW steps of flow matching from N(0, I) to
    the inverted noises, on batches of ``batch_size`` noises, with a linear warmup and an EMA copy.

    ``coupling``: "ot" pairs each batch's prior draws with its noises by minibatch optimal transport
    (near-straight paths, so few corrector steps suffice); "independent" is plain conditional flow
    matching. ``preset`` names the app's noise model (:meth:`NoiseModels.config` fills the app's
    defaults and refuses a preset the app does not have).
    """

    preset: str = ""
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    coupling: str = "ot"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise UsageError(f"coupling must be one of {', '.join(COUPLINGS)}; got {self.coupling!r}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.warmup < 0 or not 0 <= self.ema < 1:
            raise UsageError("a noise flow needs steps >= 1, batch size >= 1, lr > 0, warmup >= 0 and ema in [0, 1); "
                             f"got {self.steps}, {self.batch_size}, {self.lr}, {self.warmup}, {self.ema}")

    def pretrain_config(self):
        """The :class:`pgraft.core.pretrain.PretrainConfig` for :func:`~pgraft.core.inversion.train_noise_flow`
        (warmup capped at ``steps``; a log line every 50 steps and a checkpoint every 500, or fewer for short runs)."""
        from .pretrain import PretrainConfig

        return PretrainConfig(steps=self.steps, lr=self.lr, warmup=min(self.warmup, self.steps), ema=self.ema,
                              seed=self.seed, log_every=min(50, self.steps), ckpt_every=max(1, min(500, self.steps)))


def resume_conflicts(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What a rerun would change about a saved noise flow (``correct.json`` dicts, whose "config" is a
    :class:`CorrectionConfig` as a dict) other than :data:`RESUMABLE`: "key old -> new" for each differing
    entry (config entries by their own names). Empty: the rerun may resume the weights."""
    def entries(meta: dict[str, Any]) -> dict[tuple[str, ...], Any]:
        meta = json.loads(json.dumps(meta))  # as saved: tuples become lists
        config = {("config", k): v for k, v in meta.get("config", {}).items() if k not in RESUMABLE}
        return {**{(k,): v for k, v in meta.items() if k != "config"}, **config}

    old, now = entries(saved), entries(new)
    return [f"{k[-1]} {old.get(k)!r} -> {now.get(k)!r}" for k in dict.fromkeys([*now, *old]) if old.get(k) != now.get(k)]


# ----------------------------------------------------------------------------- the adapters
@dataclass(frozen=True)
class FlowBase:
    """A frozen base flow as the workflow sees it: the velocity ``model(x, t, cond)`` sampled by ``step``
    on ``times`` (1 -> 0) is the map Phi that is inverted and sampled; ``noise_shape`` is one noise's
    shape; ``identity`` (e.g. its path and a weights digest) is what invert.json records of it, so an
    inversion refuses to mix shards of two bases."""

    model: nn.Module
    times: torch.Tensor
    noise_shape: tuple[int, ...]
    step: StepFn = euler_step
    identity: Mapping[str, Any] = field(default_factory=dict)

    def sample(self, noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Phi(noise): the base's deterministic sampler."""
        return sample(self.model, noise, self.times, self.step, cond)

    def invert(self, x: torch.Tensor, cond: Any = None, **solver: Any) -> InversionResult:
        """Phi^{-1}(x) by :func:`pgraft.core.inversion.invert` (``solver``: its max_iter, tol, patience,
        warm_start)."""
        return invert(self.model, x, self.times, self.step, cond, **solver)


@dataclass(frozen=True)
class NoiseModels:
    """An app's noise-correction flows: ``build(preset, noise_shape)`` makes a fresh one (refusing, as a
    :class:`UsageError`, a preset that does not fit the shape), ``model_class`` reloads a saved one
    (``load_pretrained``), ``presets`` are the names it knows, ``defaults`` its :class:`CorrectionConfig`
    defaults, and ``describe(invert_meta, noises, model)`` what its correct.json records besides the
    settings, the inversion directory, the base step count and the number of noises. ``app`` names its
    commands in refusals (`pgraft APP invert`)."""

    app: str
    model_class: type[nn.Module]
    build: Callable[[str, tuple[int, ...]], nn.Module]
    presets: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    describe: Callable[[dict[str, Any], torch.Tensor, nn.Module], dict[str, Any]] = lambda inv, noises, model: {}

    def command(self, verb: str) -> str:
        return f"pgraft {self.app} {verb}"

    def check(self, cfg: CorrectionConfig) -> CorrectionConfig:
        """``cfg``, after refusing a preset this app does not have."""
        if cfg.preset not in self.presets:
            raise UsageError(f"unknown {self.app} noise-model preset {cfg.preset!r}; choose one of "
                             f"{', '.join(self.presets)}")
        return cfg

    def config(self, **settings: Any) -> CorrectionConfig:
        """A :class:`CorrectionConfig` of this app's defaults overridden by ``settings`` (preset checked)."""
        unknown = sorted(set(settings) - {f.name for f in fields(CorrectionConfig)})
        if unknown:
            raise UsageError(f"no correction setting named {unknown[0]!r}")
        return self.check(CorrectionConfig(**{**self.defaults, **settings}))

    def load(self, directory: str | Path) -> nn.Module:
        return load_pretrained(self.model_class, directory).eval()


# ----------------------------------------------------------------------------- invert
@contextmanager
def claim(directory: str | Path, meta_name: str, settle: Callable[[dict[str, Any] | None], dict[str, Any]]
          ) -> Iterator[dict[str, Any]]:
    """Hold ``directory``'s writer lock for the block and yield its metadata: ``settle(saved)`` (saved: the
    ``meta_name`` JSON already there, or None) returns the metadata of this run or raises a refusal; it is
    written only then, under the lock, so two writers never interleave and a refused run changes nothing."""
    directory = Path(directory)
    with exclusive(directory):
        path = directory / meta_name
        saved = read_json(path, fix=RESTORE_OUT) if path.is_file() else None
        meta = settle(saved)
        save_json(meta, path)
        yield meta


@dataclass(frozen=True)
class ShardRun:
    """What one pass of :func:`invert_shards` did: shards written now, and items inverted / skipped."""

    computed: list[int]
    items: int
    skipped: int


@torch.no_grad()
def invert_batch(base: FlowBase, x: torch.Tensor, cond: Any = None, **solver: Any
                 ) -> tuple[dict[str, torch.Tensor], InversionResult]:
    """Invert ``x`` [B, ...] through ``base`` and sample the noises back: the shard tensors of the batch
    (CPU) ``noise`` (float32), ``residual`` [B] (worst per-step fixed-point residual), ``recon_abs_sum``
    (float64) and ``recon_abs_max`` [B] (|Phi(noise) - x| summed / maxed over the elements), and the
    inversion itself (its iteration counts)."""
    res = base.invert(x, cond, **solver)
    err = (base.sample(res.noise, cond) - x).abs().flatten(1).cpu()
    return {"noise": res.noise.float().cpu(), "residual": res.residual.float().cpu(),
            "recon_abs_sum": err.double().sum(1), "recon_abs_max": err.float().amax(1)}, res


def invert_shards(directory: str | Path, shards: Mapping[int, torch.Tensor],
                  invert_rows: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int,
                  label: str = "invert", show_progress: bool = True,
                  on_shard: Callable[[int], None] | None = None) -> ShardRun:
    """Write shard ``i`` of ``directory`` for each ``i: rows`` of ``shards`` (rows: int64 item indices),
    skipping the shards already written for exactly those rows (the unit of resume).

    ``invert_rows(batch_rows)`` returns a batch's tensors (e.g. :func:`invert_batch`'s), ``batch_size`` rows
    at a time; a shard is their concatenation plus ``index`` (its rows), written atomically, so a killed run
    loses at most the shard in progress. ``on_shard(i)`` runs after shard i is written (tests kill there).
    The caller holds the directory (:func:`claim`) or owns these shards alone."""
    directory = Path(directory)
    computed, items, skipped = [], 0, 0
    with progress_bar(sum(len(r) for r in shards.values()), label, show_progress) as advance:
        for i, rows in shards.items():
            if shard_done(directory, i, rows):
                skipped += len(rows)
                advance(len(rows))
                continue
            parts: dict[str, list[torch.Tensor]] = {}
            for b in rows.split(batch_size):
                batch = invert_rows(b)
                for k, v in batch.items():
                    parts.setdefault(k, []).append(v)
                worst = batch.get("recon_abs_max")
                advance(len(b), **({} if worst is None else {"recon_max": float(worst.max())}))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tensors["index"] = rows.contiguous()
            atomic_write(shard_path(directory, i), lambda tmp: save_file(tensors, tmp))
            computed.append(i)
            items += len(rows)
            if on_shard is not None:
                on_shard(i)
    return ShardRun(computed=computed, items=items, skipped=skipped)


def load_inversion(invert_dir: str | Path, app: str) -> dict[str, Any]:
    """invert.json of an inversion directory (a one-line :class:`UsageError` naming it when missing)."""
    path = Path(invert_dir) / INVERT_META
    if not path.is_file():
        raise UsageError(f"{invert_dir} is not a `pgraft {app} invert` directory (no {INVERT_META})")
    return read_json(path, keys=("config",), fix=f"rerun `pgraft {app} invert` into a new directory")


# ----------------------------------------------------------------------------- correct
@dataclass(frozen=True)
class Correction:
    """A trained noise flow (EMA, eval mode), its directory and its correct.json (``meta``: the settings,
    the inversion it learned, the base step count it targets, and what the app records)."""

    noise_model: nn.Module
    meta: dict[str, Any]
    directory: Path

    @property
    def base_steps(self) -> int:
        """The base sampler's step count the noises were inverted through (the one the correction targets)."""
        return int(self.meta["base_steps"])


def train_correction(invert_dir: str | Path, out: str | Path, cfg: CorrectionConfig, models: NoiseModels,
                     show_progress: bool = True, device: torch.device | str = "cpu") -> Correction:
    """Fit ``models``' noise flow of ``cfg.preset`` on every inverted noise in ``invert_dir`` (held on the
    CPU; batches move to ``device``) and save it in ``out``, resuming the weights there.

    correct.json is compared with the one in ``out`` and written under ``out``'s writer lock; a rerun that
    changes anything but :data:`RESUMABLE` (another seed, preset, inversion, ...) is refused: it would
    resume weights trained otherwise."""
    invert_dir, out = Path(invert_dir), Path(out)
    models.check(cfg)
    inv = load_inversion(invert_dir, models.app)
    noises = read_shards(invert_dir, command=models.command("invert"))["noise"]
    with torch.random.fork_rng():  # the initial weights are a function of cfg.seed, not of torch's global state
        torch.manual_seed(cfg.seed)
        model = models.build(cfg.preset, tuple(noises.shape[1:]))
    meta = {"config": asdict(cfg), "invert": str(invert_dir.resolve()), "base_steps": int(inv["config"]["steps"]),
            "n_noises": int(len(noises)), **models.describe(inv, noises, model)}

    def settle(saved: dict[str, Any] | None) -> dict[str, Any]:
        conflicts = [] if saved is None else resume_conflicts(saved, meta)
        if conflicts:
            raise UsageError(f"{out} holds a noise flow trained with other settings or noises ({', '.join(conflicts)}); "
                             f"it would resume those weights: use another --out or delete it (only "
                             f"{' and '.join(RESUMABLE)} may change on a rerun)")
        return meta

    with claim(out, CORRECT_META, settle):
        model = model.to(device)
        ema = train_noise_flow(model, noises, cfg.pretrain_config(), out, model.config, batch_size=cfg.batch_size,
                               show_progress=show_progress, coupling=cfg.coupling)
    return Correction(noise_model=ema.eval(), meta=json.loads(json.dumps(meta)), directory=out)


def load_correction(correct_dir: str | Path, models: NoiseModels) -> Correction:
    """The noise flow trained in ``correct_dir`` (refused in one line when its training did not finish)."""
    correct_dir = Path(correct_dir)
    meta_path = correct_dir / CORRECT_META
    if not meta_path.is_file() or not is_pretrained(correct_dir):
        raise UsageError(f"{correct_dir} holds no trained noise corrector (no {CORRECT_META} or unfinished training); "
                         f"run `{models.command('correct')}` first")
    meta = read_json(meta_path, fix="retrain the corrector into a new directory")
    return Correction(noise_model=models.load(correct_dir), meta=meta, directory=correct_dir)


# ----------------------------------------------------------------------------- sample
@torch.no_grad()
def correct_noise(noise_model: nn.Module | None, z: torch.Tensor, noise_steps: int,
                  step: StepFn = euler_step) -> torch.Tensor:
    """The base's starting noise: z ~ N(0, I) moved by ``noise_steps`` of ``step`` on the noise flow's own
    uniform grid (s = 1, its prior, -> s = 0, the inverted-noise law); z itself when there is no noise
    flow or ``noise_steps`` is 0."""
    if noise_model is None or noise_steps == 0:
        return z
    return sample(noise_model, z, flow_times(noise_steps), step)


@torch.no_grad()
def sample_corrected(noise_model: nn.Module | None, base: FlowBase, z: torch.Tensor, noise_steps: int,
                     noise_step: StepFn = euler_step, cond: Any = None) -> torch.Tensor:
    """z ~ N(0, I) -> noise flow (:func:`correct_noise`) -> frozen base sampler Phi: the corrected samples."""
    return base.sample(correct_noise(noise_model, z, noise_steps, noise_step), cond)
