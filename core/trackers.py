"""Experiment trackers (``--log-with tensorboard|wandb``) through accelerate's tracker classes.

A :class:`RoundTracker` receives every metrics row the round loop appends to ``metrics.csv``
(:func:`pgraft.core.trainer.run_graft`, :func:`pgraft.core.policy_gradient.run_policy_gradient`;
step = the row's round) and logs each numeric column as ``<phase>/<column>`` (``train/reward_mean``,
``eval/reward_mean``). After each row, and once more when the command ends, it logs the PNG files
the app wrote in the run directory since the last look (t2i's ``grids/round_*.png`` under the tag
``images/grids``; layout's ``samples.png`` as ``images/samples``).

Only the main process logs. Files live in the run directory: ``trackers/tensorboard/`` (event
files) and ``trackers/wandb/`` (wandb's run folders; ``WANDB_MODE=offline`` needs no network), with
``trackers/tracker.json`` holding the wandb run id so that ``--resume`` continues the same wandb
run; TensorBoard's writer drops the events at or after the round a resumed run restarts from.

A command opens one with :func:`tracking` (the CLI's ``--log-with``, see
:func:`pgraft.core.cli.tracker_option`); the round loops take it as their ``tracker`` argument or,
when none is given, the one :func:`tracking` opened around them (:func:`current_tracker`), so an
app's train function need not pass it through.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .state import RESTORE_RUN, read_json

BACKENDS = ("none", "tensorboard", "wandb")
INSTALL = "pip install -e '.[trackers]'"
_ACTIVE: contextvars.ContextVar["RoundTracker | None"] = contextvars.ContextVar("pgraft_tracker", default=None)


def check_backend(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS` and its package is installed, else a one-line
    :class:`~pgraft.core.errors.UsageError` (the CLI names ``--log-with``)."""
    import importlib.util

    if name not in BACKENDS:
        raise UsageError(f"unknown tracker {name!r}; choose one of {', '.join(BACKENDS)}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        raise UsageError(f"{name}: the {module} package is not installed ({INSTALL})")
    return name


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric columns of a metrics row as ``{"<phase>/<column>": value}``; ``round`` (the step)
    and text columns are left out, booleans count as 0/1."""
    phase = str(row.get("phase", "train"))
    out = {}
    for key, value in row.items():
        if key in ("round", "phase") or isinstance(value, str) or value is None:
            continue
        try:
            out[f"{phase}/{key}"] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def image_tag(run_dir: Path, path: Path) -> str:
    """``images/<folder>`` for a PNG in a sub-folder of the run (``grids/round_0003.png`` ->
    ``images/grids``, one series over the rounds), ``images/<stem>`` for one at its top."""
    rel = path.relative_to(run_dir)
    return f"images/{rel.parts[0] if len(rel.parts) > 1 else rel.stem}"


@dataclass
class RoundTracker:
    """One tracker run for one run directory (see the module docstring). Opened lazily at the first
    row, so that it knows the round a resumed run starts from and the run's saved config."""

    backend: str
    run_dir: Path
    main: bool = True
    _tracker: Any = None
    _seen: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _step: int = 0

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self._seen = self._pngs()  # what a resumed run already holds was logged by its first part

    @property
    def folder(self) -> Path:
        return self.run_dir / "trackers"

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        """Log a metrics row at ``step`` (default: its ``round``), then the run's new PNG files."""
        if not self.main:
            return
        step = int(row["round"] if step is None else step)
        self._open(step)
        self._step = max(self._step, step)
        self._tracker.log(row_scalars(row), step=step)
        self.log_new_images(step)

    def log_new_images(self, step: int | None = None) -> None:
        """Log the PNG files written or changed in the run directory since the last look."""
        if not self.main or self._tracker is None:
            return
        now = self._pngs()
        new = sorted(p for p, stamp in now.items() if self._seen.get(p) != stamp)
        self._seen = now
        for path in new:
            self._log_image(image_tag(self.run_dir, path), path, self._step if step is None else step)

    def finish(self) -> None:
        """Log the PNGs written since the last row (e.g. a final ``samples.png``) and close the run."""
        if self._tracker is None:
            return
        self.log_new_images()
        self._tracker.finish()
        self._tracker = None

    # ------------------------------------------------------------------ internals
    def _pngs(self) -> dict[Path, tuple[int, int]]:
        if not self.run_dir.is_dir():
            return {}
        out = {}
        for path in self.run_dir.rglob("*.png"):
            if self.folder in path.parents:
                continue
            stat = path.stat()
            out[path] = (stat.st_mtime_ns, stat.st_size)
        return out

    def _open(self, step: int) -> None:
        if self._tracker is not None:
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.run_dir.resolve().name
        if self.backend == "tensorboard":
            # purge_step: a resumed run rewrites the rounds from `step` on; their old events are dropped
            tracker = TensorBoardTracker(".", self.folder / "tensorboard", purge_step=step if step > 0 else None)
        else:
            state = self.folder / "tracker.json"
            saved = read_json(state, keys=("wandb_id",), fix="delete it to log the resumed run under a new wandb id") \
                if state.is_file() else {}
            run_id = saved.get("wandb_id") or uuid.uuid4().hex[:16]
            state.write_text(json.dumps({**saved, "wandb_id": run_id}, indent=1) + "\n")
            (self.folder / "wandb").mkdir(exist_ok=True)
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "pgraft"), name=name, id=run_id, resume="allow",
                                   dir=str(self.folder / "wandb"))
        tracker.start()
        config = run_config(self.run_dir)
        if config:
            tracker.store_init_configuration(config)
        self._tracker = tracker

    def _log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if self.backend == "tensorboard":
            self._tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
        else:
            self._tracker.log_images({tag: [pixels]}, step=step)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` flattened to ``{"graft.grs.rule": "topk", ...}`` with values a
    tracker's hyper-parameter table takes (bool, int, float, str; anything else as its JSON text)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}

    def walk(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{prefix}{key}.")
        elif value is None or isinstance(value, (bool, int, float, str)):
            yield prefix[:-1], "None" if value is None else value
        else:
            yield prefix[:-1], json.dumps(value)

    return dict(walk(read_json(path, fix=RESTORE_RUN), ""))


def current_tracker() -> RoundTracker | None:
    """The tracker :func:`tracking` opened around the running command (None outside one)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def tracking(backend: str, run_dir: str | Path, main: bool = True) -> Iterator[RoundTracker | None]:
    """Open a :class:`RoundTracker` of ``backend`` for ``run_dir`` for the block (None for
    ``"none"``), made the :func:`current_tracker` of the round loops run inside; it is finished
    when the block ends, however it ends."""
    if check_backend(backend) == "none":
        yield None
        return
    tracker = RoundTracker(backend, Path(run_dir), main=main)
    token = _ACTIVE.set(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.reset(token)
        tracker.finish()
