"""The run directory: resolved config, accepted-sample store, metrics table and checkpoints.

Layout::

    run_dir/
      .lock                          PID and host of the one process writing the run (flock)
      config.json                    resolved config (core + app), written once
      metrics.csv                    one row per round (+ a final evaluation row)
      store/round_0003.safetensors   accepted training states of round 3 (X_t for P-GRAFT)
      store/round_0003.parquet       one record per accepted sample (round, reward, key, app columns)
      checkpoints/round_0003/        weights.safetensors, trainer_state.pt (optimizer; tensors and
                                     numbers only) and manifest.json (their SHA-256) after round 3
      checkpoints/latest.json        {"round": 3}: the commit point of round 3

A round writes its store, then its metrics row, then its checkpoint directory (atomically: a
temporary directory renamed into place), and commits by advancing ``latest.json``. Resuming reads
the newest checkpoint that passes its checksums (falling back to the one before it, with a
warning) and discards the store files and metrics rows of later rounds, which are regenerated with
the same seeds: a run killed at any point, SIGKILL included, resumes to the same files an
uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import save_json
from .errors import CheckpointError, RunExistsError, UsageError
from .integrity import load_state_dict_file, verify_manifest, write_manifest
from .state import State, atomic_write

# config fields (dotted paths) that may change on --resume: they steer later rounds only and
# leave the files already written valid. ``graft.rounds`` may only grow.
RESUMABLE = ("graft.rounds", "graft.lr", "graft.train_steps", "graft.grad_clip", "graft.weight_decay")

_X_PREFIX = "x/"
_TENSOR = "x/__tensor__"


class RunDir:
    """Owns a run's files; see the module docstring for the layout."""

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} exists and is not a directory")
        if resume and not (self.path / "config.json").is_file():
            raise UsageError(f"--resume: {self.path} holds no run to resume (no config.json); "
                             "drop --resume to start a new run there")
        if not resume and (self.path / "checkpoints" / "latest.json").exists():
            raise RunExistsError(f"run dir {self.path} already holds a run; pass --resume to continue it "
                                 "or choose another --out directory (nothing was changed)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.path / "store"
        self.ckpt_dir = self.path / "checkpoints"

    # ------------------------------------------------------------------ config
    def save_config(self, config: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Write the resolved config; when resuming, refuse a config that changes the run.

        Only the :data:`RESUMABLE` fields may differ (``graft.rounds`` only upwards); each change
        is recorded under ``"resumed"`` in the saved config. Returns the config in force.
        """
        path = self.path / "config.json"
        normalized = json.loads(json.dumps(config, default=str))
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            history = saved.pop("resumed", [])
            diffs = _diff(saved, normalized, ignore=set(RESUMABLE))
            if diffs:
                raise UsageError(f"--resume with a config that differs from {path}: " + "; ".join(diffs)
                                 + f" (only {', '.join(f.split('.')[-1] for f in RESUMABLE)} may change on --resume)")
            old_rounds, new_rounds = _get(saved, "graft.rounds"), _get(normalized, "graft.rounds")
            if old_rounds is not None and new_rounds is not None and new_rounds < old_rounds:
                raise UsageError(f"--resume with rounds {new_rounds}, fewer than the saved run's {old_rounds}: "
                                 "rounds may only grow on --resume (nothing was changed)")
            changed = {f: [_get(saved, f), _get(normalized, f)] for f in RESUMABLE
                       if _get(saved, f) != _get(normalized, f)}
            if changed:
                history.append({"at_round": self.latest_round() + 1, "changed": changed})
            if history:
                normalized["resumed"] = history
        save_json(normalized, path)
        return normalized

    # ------------------------------------------------------------------ checkpoints
    def latest_round(self) -> int:
        """Last round whose checkpoint is complete, or -1."""
        path = self.ckpt_dir / "latest.json"
        return json.loads(path.read_text())["round"] if path.is_file() else -1

    def save_checkpoint(self, round_: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Write round ``round_``'s weights (safetensors), trainer state (tensors and numbers only)
        and their checksums into a directory moved into place at once, then commit the round by
        advancing ``latest.json``."""
        final = self.ckpt_dir / f"round_{round_:04d}"
        tmp = self.ckpt_dir / f".round_{round_:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        torch.save(extra, tmp / "trainer_state.pt")
        write_manifest(tmp, ["weights.safetensors", "trainer_state.pt"])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_json({"round": round_}, self.ckpt_dir / "latest.json")
        for old in self._checkpoint_rounds()[2:]:  # keep the last two
            shutil.rmtree(self.ckpt_dir / f"round_{old:04d}", ignore_errors=True)

    def _checkpoint_rounds(self) -> list[int]:
        """Rounds with a checkpoint directory, newest first."""
        return sorted((int(p.name.split("_")[1]) for p in self.ckpt_dir.glob("round_*") if p.is_dir()),
                      reverse=True)

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        """(round, weights, trainer state) of the newest committed checkpoint that is intact.

        A damaged newest checkpoint (checksum mismatch, unreadable or unsafe file) is skipped with
        a warning naming the file, and the one before it is used; :class:`CheckpointError` names
        every problem when no checkpoint is good."""
        latest = self.latest_round()
        if latest < 0:
            raise CheckpointError(f"no checkpoint in {self.ckpt_dir}")
        problems: list[str] = []
        for r in [r for r in self._checkpoint_rounds() if r <= latest]:
            d = self.ckpt_dir / f"round_{r:04d}"
            found = verify_manifest(d)
            if not found:
                try:
                    weights, state = load_file(str(d / "weights.safetensors")), load_state_dict_file(d / "trainer_state.pt")
                except CheckpointError as err:
                    found = [str(err)]
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    found = [f"{d / 'weights.safetensors'} cannot be read ({type(err).__name__})"]
            if not found:
                if problems:
                    warnings.warn(f"{'; '.join(problems)}; resuming from the checkpoint of round {r} instead",
                                  stacklevel=2)
                return r, weights, state
            problems += found
        raise CheckpointError(f"no intact checkpoint in {self.ckpt_dir}: " + "; ".join(problems)
                              + " (delete the run directory to start over)")

    # ------------------------------------------------------------------ store
    def write_store(self, round_: int, x: State, cond_index: torch.Tensor, records: pd.DataFrame) -> None:
        tensors = {_TENSOR: x} if isinstance(x, torch.Tensor) else {_X_PREFIX + k: v for k, v in x.items()}
        tensors["cond_index"] = cond_index
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.store_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.store_dir / f"round_{round_:04d}.parquet", lambda tmp: records.to_parquet(tmp, index=False))
        atomic_write(self.store_dir / f"round_{round_:04d}.safetensors", lambda tmp: save_file(tensors, tmp))

    def store_rounds(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.store_dir.glob("round_*.safetensors"))

    def read_store_states(self, rounds: list[int]) -> tuple[list[State], list[torch.Tensor]]:
        xs, conds = [], []
        for r in rounds:
            t = load_file(str(self.store_dir / f"round_{r:04d}.safetensors"))
            conds.append(t.pop("cond_index"))
            xs.append(t[_TENSOR] if _TENSOR in t else {k[len(_X_PREFIX):]: v for k, v in t.items()})
        return xs, conds

    def read_records(self) -> pd.DataFrame:
        """All accepted-sample records so far (one row per accepted sample)."""
        files = sorted(self.store_dir.glob("round_*.parquet"))
        frames = [pd.read_parquet(f) for f in files]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> pd.DataFrame:
        path = self.path / "metrics.csv"
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def append_metrics(self, row: dict[str, Any]) -> pd.DataFrame:
        table = pd.concat([self.read_metrics(), pd.DataFrame([row])], ignore_index=True)
        atomic_write(self.path / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
        return table

    def truncate_after(self, round_: int) -> None:
        """Forget everything from rounds after ``round_`` (used when resuming)."""
        for p in list(self.store_dir.glob("round_*")) + list(self.store_dir.glob(".round_*")):
            if p.name.startswith("."):  # a temporary file of a write that was killed
                p.unlink()
                continue
            if int(p.name.split("_")[1].split(".")[0]) > round_:
                p.unlink()
        table = self.read_metrics()
        if len(table):
            table = table[table["round"] <= round_]
            atomic_write(self.path / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))


def _get(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def _diff(saved: Any, new: Any, ignore: Iterable[str], prefix: str = "") -> list[str]:
    """``"path: saved X, now Y"`` for each differing leaf, except the dotted paths in ``ignore``."""
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(saved) | set(new)):
            if f"{prefix}{k}" in ignore:
                continue
            out += _diff(saved.get(k), new.get(k), ignore, f"{prefix}{k}.")
        return out
    return [] if saved == new else [f"{prefix.rstrip('.')}: saved {saved!r}, now {new!r}"]
