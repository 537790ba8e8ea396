"""The run directory: resolved config, accepted-sample store, metrics table and checkpoints.

Layout::

    run_dir/
      .lock                          PID and host of the one process writing the run (flock)
      config.json                    resolved config (core + app), written once
      metrics.csv                    one row per round (+ a final evaluation row)
      store/round_0003.safetensors   accepted training states of round 3 (X_t for P-GRAFT)
      store/round_0003.parquet       one record per accepted sample (round, reward, key, app columns)
      checkpoints/round_0003/        weights.safetensors, trainer_state.pt (optimizer; tensors and
                                     numbers only), store.json (SHA-256 of every store file of rounds
                                     <= 3) and manifest.json (SHA-256 of those three) after round 3
      checkpoints/latest.json        {"round": 3}: the commit point of round 3

A round writes its store, then its metrics row, then its checkpoint directory (atomically: a
temporary directory renamed into place), and commits by advancing ``latest.json``. Resuming reads
the newest checkpoint that passes its checksums (falling back to the one before it, with a
warning) and discards the store files and metrics rows of later rounds, which are regenerated with
the same seeds: a run killed at any point, SIGKILL included, resumes to the same files an
uninterrupted run writes.

The store is verified like the checkpoints: the digests of a round's two store files are taken
when the round writes them and committed with its checkpoint (``store.json``, listed in the
checkpoint's manifest), and every read of a store file checks it against them. A store file that
was deleted or changed since its round committed is refused (:class:`CheckpointError`) where it
would be trained on (``--replay``); elsewhere a resume names it in a warning and goes on.
Resuming also removes the temporary files of writes that were killed before their rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load, load_file, save_file

from .checkpoint import save_json
from .errors import CheckpointError, RunDirLocked, RunExistsError, UsageError
from .integrity import held_by_another, load_state_dict_file, sha256_file, verify_manifest, write_manifest
from .progress import warn
from .state import RESTORE_RUN, State, atomic_write, read_json, read_table

# config fields (dotted paths) that may change on --resume: they steer later rounds only and
# leave the files already written valid. ``graft.rounds`` may only grow.
RESUMABLE = ("graft.rounds", "graft.lr", "graft.train_steps", "graft.grad_clip", "graft.weight_decay",
             "pg.rounds", "pg.lr", "pg.epochs", "pg.grad_clip")
GROWING = ("graft.rounds", "pg.rounds")  # resumable fields that may only grow

_X_PREFIX = "x/"
_TENSOR = "x/__tensor__"
STORE_DIGESTS = "store.json"  # in a round's checkpoint directory: {"files": {store file name: sha256}}

# temporary names of writes killed before their rename: core.state.atomic_write and
# core.integrity.replace_files (tempfile.mkstemp: ".<name>." + 8 characters + ".tmp") and
# save_checkpoint's ".round_NNNN.tmp" directory
_TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_TEMP_CHECKPOINT = re.compile(r"\.round_\d{4,}\.tmp")
_STORE_FILE = re.compile(r"round_(\d{4,})\.(safetensors|parquet)")


def preflight(path: str | Path, resume: bool, report: bool = True) -> None:
    """The refusals of opening ``path`` as a run directory, checked without writing anything: a
    file in its place, another process writing it (asked by the one process that will write: the
    other processes of a multi-process run open it while their rank 0 holds it), ``--resume`` with no
    run there, or a new run over a finished one. A train command calls it before any slow work
    (pretraining a missing base), so that such a refusal comes first and alone."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    holder = held_by_another(path) if report else None  # first: whatever else is wrong, it is in use
    if holder is not None:
        raise RunDirLocked(f"{path} is in use by {holder}; wait for that run to end or choose another "
                           "--out (nothing was changed)")
    if resume and not (path / "config.json").is_file():
        raise UsageError(f"--resume: {path} holds no run to resume (no config.json); "
                         "drop --resume to start a new run there")
    if not resume and (path / "checkpoints" / "latest.json").exists():
        raise RunExistsError(f"run dir {path} already holds a run; pass --resume to continue it "
                             "or choose another --out directory (nothing was changed)")


class RunDir:
    """Owns a run's files; see the module docstring for the layout."""

    def __init__(self, path: str | Path, resume: bool = False, report: bool = True) -> None:
        """``report``: this is the process that writes the run (and prints its warnings); False on
        the other processes of a multi-process run."""
        self.path = Path(path)
        preflight(self.path, resume, report)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out {self.path} cannot be created ({err.strerror or err}: "
                             f"{err.filename or self.path})") from None
        self.store_dir = self.path / "store"
        self.ckpt_dir = self.path / "checkpoints"
        self.report = report
        self._warned: set[str] = set()
        # store file name -> SHA-256, for every store file of the rounds known to this object:
        # restored by load_checkpoint, extended by write_store / record_store. None: not known (a
        # run dir opened to resume before its checkpoint is loaded): the store is globbed, unchecked.
        self.store_digests: dict[str, str] | None = None if resume else {}

    # ------------------------------------------------------------------ config
    def save_config(self, config: dict[str, Any], resume: bool) -> dict[str, Any]:
        """Write the resolved config; when resuming, refuse a config that changes the run.

        Only the :data:`RESUMABLE` fields of the run's section (``graft`` or ``pg``) may differ
        (:data:`GROWING` ones only upwards); each change is recorded under ``"resumed"`` in the
        saved config. Returns the config in force.
        """
        path = self.path / "config.json"
        normalized = json.loads(json.dumps(config, default=str))
        if resume and path.is_file():
            saved = read_json(path, fix=RESTORE_RUN)
            if not isinstance(saved, dict):
                raise UsageError(f"{path}: not a run's config (a JSON object); {RESTORE_RUN}")
            history = saved.pop("resumed", [])
            diffs = _diff(saved, normalized, ignore=set(RESUMABLE))
            if diffs:
                may = [f.split(".")[-1] for f in RESUMABLE if f.split(".")[0] in normalized]
                hint = (" (a run from before --reward-max: resume it with --reward-max inf)"
                        if any(d.startswith("graft.grs.bound: saved None") for d in diffs) else "")
                raise UsageError(f"--resume with a config that differs from {path}: " + "; ".join(diffs)
                                 + f" (only {', '.join(may)} may change on --resume){hint}")
            for field in GROWING:
                old, new = _get(saved, field), _get(normalized, field)
                if isinstance(old, int) and isinstance(new, int) and new < old:
                    raise UsageError(f"--resume with rounds {new}, fewer than the saved run's {old}: "
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
        """Last round whose checkpoint is complete, or -1.

        An unreadable ``latest.json`` counts as a missing one (with a warning): no round is known
        to be committed, so a resume starts again from round 0 and regenerates the same files."""
        path = self.ckpt_dir / "latest.json"
        if not path.is_file():
            return -1
        try:
            round_ = json.loads(path.read_text())["round"]
            if isinstance(round_, int) and not isinstance(round_, bool) and round_ >= -1:
                return round_
            reason = f"round {round_!r} is not a round number"
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = f"{type(err).__name__}: {str(err)[:80]}" if str(err) else type(err).__name__
        self._warn_once(f"{path} cannot be read ({reason}); treating it as missing: the run starts again "
                        "from round 0 (same seeds, same files)")
        return -1

    def _warn_once(self, message: str) -> None:
        if self.report and message not in self._warned:
            self._warned.add(message)
            warn(message)

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
        store = {n: h for n, h in (self.store_digests or {}).items() if _store_round(n) <= round_}
        save_json({"files": store}, tmp / STORE_DIGESTS)
        write_manifest(tmp, ["weights.safetensors", "trainer_state.pt", STORE_DIGESTS])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_json({"round": round_}, self.ckpt_dir / "latest.json")
        # keep the last two at or before this round (a directory of a later round is left by a run
        # that started again from round 0; it is replaced when that round commits again)
        for old in [r for r in self._checkpoint_rounds() if r <= round_][2:]:
            shutil.rmtree(self.ckpt_dir / f"round_{old:04d}", ignore_errors=True)

    def _checkpoint_rounds(self) -> list[int]:
        """Rounds with a checkpoint directory, newest first."""
        return sorted((int(p.name.split("_")[1]) for p in self.ckpt_dir.glob("round_*") if p.is_dir()),
                      reverse=True)

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
        """(round, weights, trainer state) of the newest committed checkpoint that is intact;
        restores :attr:`store_digests` (the store files of rounds <= that round).

        A damaged newest checkpoint (checksum mismatch, unreadable or unsafe file) is skipped with
        a warning naming the file, and the one before it is used; :class:`CheckpointError` names
        every problem when no checkpoint is good. A checkpoint written before the store had
        digests (no ``store.json``): a warning that the store of its rounds cannot be verified,
        and the store files found are taken as they are."""
        latest = self.latest_round()
        if latest < 0:
            raise CheckpointError(f"no checkpoint in {self.ckpt_dir}")
        problems: list[str] = []
        for r in [r for r in self._checkpoint_rounds() if r <= latest]:
            d = self.ckpt_dir / f"round_{r:04d}"
            found = verify_manifest(d)
            store = None
            if not found and (d / STORE_DIGESTS).is_file():
                try:
                    store = _store_digests_of(json.loads((d / STORE_DIGESTS).read_text()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    found = [f"{d / STORE_DIGESTS} is not a valid list of store digests"]
            if not found:
                try:
                    weights, state = load_file(str(d / "weights.safetensors")), load_state_dict_file(d / "trainer_state.pt")
                except CheckpointError as err:
                    found = [str(err)]
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    found = [f"{d / 'weights.safetensors'} cannot be read ({type(err).__name__})"]
            if not found:
                if problems:
                    self._warn_once(f"{'; '.join(problems)}; resuming from the checkpoint of round {r} instead")
                if store is None:  # written before store digests: take the files as they are
                    self._warn_once(f"{d} has no {STORE_DIGESTS} (written before the store had digests): the "
                                    f"accepted-sample store of rounds <= {r} cannot be verified; going on with "
                                    "its files as they are")
                    store = {p.name: sha256_file(p) for p in sorted(self.store_dir.glob("round_*"))
                             if _STORE_FILE.fullmatch(p.name) and _store_round(p.name) <= r}
                self.store_digests = store
                return r, weights, state
            problems += found
        raise CheckpointError(f"no intact checkpoint in {self.ckpt_dir}: " + "; ".join(problems)
                              + " (delete the run directory to start over)")

    # ------------------------------------------------------------------ store
    def write_store(self, round_: int, x: State, cond_index: torch.Tensor, records: pd.DataFrame) -> None:
        """Write round ``round_``'s store files and keep their digests (committed with the round's
        checkpoint)."""
        tensors = {_TENSOR: x} if isinstance(x, torch.Tensor) else {_X_PREFIX + k: v for k, v in x.items()}
        tensors["cond_index"] = cond_index
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.store_dir.mkdir(parents=True, exist_ok=True)
        digests: dict[str, str] = {}

        def written(name: str, write):
            def wrapped(tmp: str) -> None:
                write(tmp)
                digests[name] = sha256_file(tmp)
            return wrapped

        for name, write in ((f"round_{round_:04d}.parquet", lambda tmp: records.to_parquet(tmp, index=False)),
                            (f"round_{round_:04d}.safetensors", lambda tmp: save_file(tensors, tmp))):
            atomic_write(self.store_dir / name, written(name, write))
        self.store_digests = {**(self.store_digests or {}), **digests}

    def record_store(self, round_: int) -> None:
        """Take the digests of round ``round_``'s store files as they are on disk: for the processes
        that did not write them (in a multi-process run, after the main process wrote them)."""
        names = [f"round_{round_:04d}.{ext}" for ext in ("parquet", "safetensors")]
        found = {n: sha256_file(self.store_dir / n) for n in names if (self.store_dir / n).is_file()}
        self.store_digests = {**(self.store_digests or {}), **found}

    def store_rounds(self) -> list[int]:
        """Rounds in the store: those with recorded digests (a deleted file is still listed, and
        refused when read), or, when the digests are not known, the files found."""
        names = self.store_digests if self.store_digests is not None else \
            [p.name for p in self.store_dir.glob("round_*.safetensors")]
        return sorted({_store_round(n) for n in names if n.endswith(".safetensors") and _STORE_FILE.fullmatch(n)})

    def read_store_states(self, rounds: list[int]) -> tuple[list[State], list[torch.Tensor]]:
        xs, conds = [], []
        for r in rounds:
            name = f"round_{r:04d}.safetensors"
            data = self._read_store_file(name)
            try:
                t = load(data)
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{self.store_dir / name} cannot be read ({type(err).__name__}: "
                                      f"{str(err)[:120]})") from None
            conds.append(t.pop("cond_index"))
            xs.append(t[_TENSOR] if _TENSOR in t else {k[len(_X_PREFIX):]: v for k, v in t.items()})
        return xs, conds

    def read_records(self) -> pd.DataFrame:
        """All accepted-sample records so far (one row per accepted sample), verified."""
        names = sorted(n for n in self.store_digests if n.endswith(".parquet")) if self.store_digests is not None \
            else sorted(p.name for p in self.store_dir.glob("round_*.parquet"))
        frames = []
        for name in names:
            data = self._read_store_file(name)
            try:
                frames.append(pd.read_parquet(io.BytesIO(data)))
            except Exception as err:  # noqa: BLE001 - pyarrow raises its own error types
                raise CheckpointError(f"{self.store_dir / name} cannot be read ({type(err).__name__})") from None
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _read_store_file(self, name: str) -> bytes:
        """The bytes of a store file, checked against its recorded digest (a file without one, e.g.
        of a run resumed from a checkpoint without digests, is read as it is)."""
        path = self.store_dir / name
        expected = (self.store_digests or {}).get(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if expected is not None and (data is None or hashlib.sha256(data).hexdigest() != expected):
            size = None if data is None else len(data)
            raise CheckpointError(self._store_refusal({name: self._store_problem(name, size)}))
        if data is None:
            raise CheckpointError(f"{path} is missing")
        return data

    def _store_problem(self, name: str, size: int | None) -> str:
        now = "it is missing" if size is None else f"{size} bytes now"
        return (f"{self.store_dir / name} does not match the digest recorded at round {_store_round(name)} "
                f"(deleted or changed since; {now})")

    def _store_refusal(self, problems: dict[str, str]) -> str:
        """The refusal of a replay run whose store files ``problems`` (name -> problem) are damaged."""
        rounds = sorted({_store_round(name) for name in problems})
        which = ", ".join(map(str, rounds))
        return ("; ".join(problems.values()) + ": this run trains on the store of every round so far (--replay) and "
                f"cannot replay round{'s' if len(rounds) > 1 else ''} {which}; start over in a new --out (the finished "
                f"rounds and checkpoints in {self.path} are left as they are)")

    def verify_store(self) -> dict[str, str]:
        """Store file name -> one line saying how it does not match its recorded digest (deleted or
        changed), for each such file; {} when every recorded file is intact."""
        problems = {}
        for name in sorted(self.store_digests or {}):
            path = self.store_dir / name
            if not path.is_file():
                problems[name] = self._store_problem(name, None)
            elif sha256_file(path) != self.store_digests[name]:
                problems[name] = self._store_problem(name, path.stat().st_size)
        return problems

    def check_store(self, replay: bool) -> None:
        """On resume, before anything is written: a damaged store file of a kept round is refused
        with :class:`CheckpointError` when ``replay`` (rounds left to run would train on it), else
        named in a warning (nothing trains on it again, so the run goes on)."""
        problems = self.verify_store()
        if problems and replay:
            raise CheckpointError(self._store_refusal(problems))
        for problem in problems.values():
            self._warn_once(f"{problem}; nothing left to run trains on it (no --replay, or no round left), so "
                            "the run goes on")

    def remove_temp_files(self) -> list[Path]:
        """Remove the temporary files (and checkpoint directories) of writes killed before their
        rename; returns what was removed. Only names our writers give temporary files."""
        removed = []
        for d in (self.path, self.store_dir, self.ckpt_dir, self.path / "head"):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if _TEMP_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
                elif d == self.ckpt_dir and _TEMP_CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                    removed.append(p)
        return removed

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> pd.DataFrame:
        """The rows of metrics.csv (none before the first round); a damaged file (a row without a
        round number or phase) is refused in one line rather than truncated or appended to."""
        path = self.path / "metrics.csv"
        if not path.is_file():
            return pd.DataFrame()
        return read_table(path, numeric=["round"], text=["phase"], what="run's metrics.csv", fix=RESTORE_RUN)

    def append_metrics(self, row: dict[str, Any]) -> pd.DataFrame:
        table = pd.concat([self.read_metrics(), pd.DataFrame([row])], ignore_index=True)
        atomic_write(self.path / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
        return table

    def truncate_after(self, round_: int) -> None:
        """Forget everything from rounds after ``round_`` (used when resuming)."""
        self.forget_store_after(round_)
        for p in list(self.store_dir.glob("round_*")) + list(self.store_dir.glob(".round_*")):
            if p.name.startswith("."):  # a temporary file of a write that was killed
                p.unlink()
                continue
            if _store_round(p.name) > round_:
                p.unlink()
        table = self.read_metrics()
        if len(table):
            table = table[table["round"] <= round_]
            atomic_write(self.path / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))

    def forget_store_after(self, round_: int) -> None:
        """Drop the digests of the store files of rounds after ``round_`` (files untouched)."""
        self.store_digests = {n: h for n, h in (self.store_digests or {}).items() if _store_round(n) <= round_}


def _store_round(name: str) -> int:
    """The round of a store file name (``round_0003.parquet`` -> 3)."""
    return int(name.split("_")[1].split(".")[0])


def _store_digests_of(saved: dict[str, Any]) -> dict[str, str]:
    """The ``files`` of a ``store.json``, checked: store file names -> 64-hex-digit digests."""
    files = saved["files"]
    if not all(isinstance(n, str) and _STORE_FILE.fullmatch(n) and isinstance(h, str)
               and re.fullmatch(r"[0-9a-f]{64}", h) for n, h in files.items()):
        raise ValueError("not store file names and SHA-256 digests")
    return dict(files)


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
