"""The run directory: resolved config, accepted-sample store, metrics table and checkpoints.

Layout::

    run_dir/
      config.json                    resolved config (core + app), written once
      metrics.csv                    one row per round (+ a final evaluation row)
      store/round_0003.safetensors   accepted training states of round 3 (X_t for P-GRAFT)
      store/round_0003.parquet       one record per accepted sample (round, reward, key, app columns)
      checkpoints/round_0003/        fine-tuned weights + optimizer after round 3
      checkpoints/latest.json        {"round": 3}

Every file is written atomically (temp + rename) and a round's checkpoint is written after its
store, so a run killed at any point resumes from the last checkpoint: store files of later rounds
are discarded and regenerated with the same seeds, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import save_json
from .state import State, atomic_write

_X_PREFIX = "x/"
_TENSOR = "x/__tensor__"


class RunDir:
    """Owns a run's files; see the module docstring for the layout."""

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run dir {self.path} exists and is not a directory")
        if not resume and (self.path / "checkpoints" / "latest.json").exists():
            raise FileExistsError(f"run dir {self.path} already holds a run; pass --resume to continue it "
                                  "or choose another --out directory (nothing was changed)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.path / "store"
        self.ckpt_dir = self.path / "checkpoints"

    # ------------------------------------------------------------------ config
    def save_config(self, config: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Write the resolved config; when resuming, refuse a config that changes the run.

        Only ``rounds`` may differ (to extend a finished run). Returns the config in force.
        """
        path = self.path / "config.json"
        normalized = json.loads(json.dumps(config, default=str))
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            diffs = _diff(saved, normalized, ignore={"rounds"})
            if diffs:
                raise ValueError(f"--resume with a config that differs from {path}: " + "; ".join(diffs))
        save_json(normalized, path)
        return normalized

    # ------------------------------------------------------------------ checkpoints
    def latest_round(self) -> int:
        """Last round whose checkpoint is complete, or -1."""
        path = self.ckpt_dir / "latest.json"
        return json.loads(path.read_text())["round"] if path.is_file() else -1

    def save_checkpoint(self, round_: int, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Atomically write round ``round_``'s weights (safetensors) and trainer state (torch)."""
        final = self.ckpt_dir / f"round_{round_:04d}"
        tmp = self.ckpt_dir / f".round_{round_:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        torch.save(extra, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_json({"round": round_}, self.ckpt_dir / "latest.json")
        for old in sorted(self.ckpt_dir.glob("round_*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        r = self.latest_round()
        if r < 0:
            raise FileNotFoundError(f"no checkpoint in {self.ckpt_dir}")
        d = self.ckpt_dir / f"round_{r:04d}"
        return r, load_file(str(d / "weights.safetensors")), torch.load(d / "trainer_state.pt", weights_only=False)

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
        for p in list(self.store_dir.glob("round_*")):
            if int(p.name.split("_")[1].split(".")[0]) > round_:
                p.unlink()
        table = self.read_metrics()
        if len(table):
            table = table[table["round"] <= round_]
            atomic_write(self.path / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))


def _diff(saved: Any, new: Any, ignore: set[str], prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(saved) | set(new)):
            if k in ignore:
                continue
            out += _diff(saved.get(k), new.get(k), ignore, f"{prefix}{k}.")
        return out
    return [] if saved == new else [f"{prefix.rstrip('.')}: saved {saved!r}, now {new!r}"]
