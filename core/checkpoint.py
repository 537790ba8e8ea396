"""save_pretrained-style model checkpoints: ``config.json`` + ``model.safetensors``, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .errors import CheckpointError
from .state import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound=nn.Module)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_pretrained(model: nn.Module, config: dict[str, Any], directory: str | Path) -> Path:
    """Save ``model``'s weights and the kwargs that rebuild it; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_model(model, tmp))
    save_json({"_class": type(model).__name__, **config}, directory / CONFIG_NAME)
    return directory


def load_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a model config (a JSON object)")
    config.pop("_class", None)
    return config


def load_pretrained(cls: type[M], directory: str | Path, **overrides: Any) -> M:
    """Rebuild ``cls(**config)`` from ``directory`` and load its weights (strict). A config that
    does not build ``cls``, or a weights file that cannot be read (truncated, not safetensors) or
    does not fit the model, raises :class:`CheckpointError` naming the file."""
    config = {**load_config(directory), **overrides}
    try:
        model = cls(**config)
    except TypeError as err:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} does not describe a {cls.__name__} ({err})") from None
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has a config but no {WEIGHTS_NAME}")
    try:
        load_model(model, str(weights))
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{weights} cannot be loaded into the model its {CONFIG_NAME} describes "
                              f"({reason})") from None
    return model


HEAD_NAME = "head"


def load_run_head(cls: type[M], run_dir: str | Path, **overrides: Any) -> M:
    """The fine-tuned model of a run, ``run_dir/head`` (:func:`load_pretrained`); a damaged or
    missing one raises :class:`CheckpointError` naming the file and how to write it again (the
    run's last checkpoint holds the same weights: resuming a finished run rewrites ``head/``)."""
    try:
        return load_pretrained(cls, Path(run_dir) / HEAD_NAME, **overrides)
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(f"{err}; the run's fine-tuned model {Path(run_dir) / HEAD_NAME} is damaged: rerun the "
                              "run's train command with --resume (same flags) to write it again from its last "
                              "checkpoint") from None
