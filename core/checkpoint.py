"""save_pretrained-style model checkpoints: ``config.json`` + ``model.safetensors``, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_model, save_model
from torch import nn

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
    config = json.loads(path.read_text())
    config.pop("_class", None)
    return config


def load_pretrained(cls: type[M], directory: str | Path, **overrides: Any) -> M:
    """Rebuild ``cls(**config)`` from ``directory`` and load its weights (strict)."""
    config = {**load_config(directory), **overrides}
    model = cls(**config)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has a config but no {WEIGHTS_NAME}")
    load_model(model, str(weights))
    return model
