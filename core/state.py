"""Batched sample states: a tensor or a flat dict of tensors, batch dimension first.

Apps describe a sample however suits them (an image tensor, a molecule as
``{"nodes", "edges", "node_mask"}``); the core only ever needs to index, concatenate, repeat, move
and store batches, so those operations are what this module offers, with the two every run file goes
through: :func:`atomic_write` and its reading sides, :func:`read_json` and :func:`read_table` (CSV).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file

from .errors import UsageError

State = Union[torch.Tensor, dict[str, torch.Tensor]]

_TENSOR_KEY = "__tensor__"


def batch_size(x: State) -> int:
    """Number of samples in ``x`` (size of the leading dimension)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    sizes = {int(v.shape[0]) for v in x.values()}
    if len(sizes) != 1:
        raise ValueError(f"state fields disagree on batch size: {sizes}")
    return sizes.pop()


def index(x: State, idx: torch.Tensor | slice | Sequence[int]) -> State:
    """Select samples ``idx`` (indices, boolean mask or slice) from every field."""
    if isinstance(idx, Sequence) and not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
    if isinstance(x, torch.Tensor):
        return x[idx]
    return {k: v[idx] for k, v in x.items()}


def cat(xs: Sequence[State]) -> State:
    """Concatenate states along the batch dimension."""
    if not xs:
        raise ValueError("cannot concatenate an empty list of states")
    if isinstance(xs[0], torch.Tensor):
        return torch.cat(list(xs), dim=0)
    return {k: torch.cat([x[k] for x in xs], dim=0) for k in xs[0]}


def repeat_interleave(x: State, repeats: int) -> State:
    """Each sample ``repeats`` times in a row: ``[a, b] -> [a, a, b, b]`` for ``repeats=2``
    (``torch.repeat_interleave`` along the batch dimension of every field)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(repeats, dim=0)
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in x.items()}


def default_device() -> torch.device:
    """Where the round loops train and sample: the GPU when one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> :func:`default_device`; otherwise the named device, refused (naming it)
    when it is a GPU that is not visible, so a run never silently falls back to the CPU."""
    if name is None or str(name) == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(x: State, device: torch.device | str) -> State:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


def empty_like(x: State) -> State:
    """A zero-sample state with the same fields, dtypes and trailing shapes."""
    return index(x, slice(0, 0))


def usual_permissions(path: str | Path) -> None:
    """mkstemp makes 0600 files: give ``path`` the permissions a plain ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        usual_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# how to mend a damaged JSON file (read_json's ``fix``): a file a rerun recomputes (rows, caches) ...
RECOMPUTE = "delete it and rerun the same command to recompute it"
# ... and files it does not: a run's or base's settings, a directory the user handed in
RESTORE_OUT = "restore it, or rerun into a new --out"
RESTORE_RUN = "restore it, or start the run afresh in another --out"
RESTORE_BASE = "restore it, or point --base at another base directory"
RESTORE_DIR = "restore it, or point at another directory"


def read_json(path: str | Path, keys: Sequence[str] = (), fix: str = RECOMPUTE) -> Any:
    """The JSON in ``path``, written by :func:`atomic_write` (so whole, unless something else damaged
    it): a file that cannot be read, is not UTF-8 JSON, (``keys``) is not an object holding each key,
    or was sealed by :func:`write_sealed_json` and no longer matches its digest, is refused with one
    :class:`~pgraft.core.errors.UsageError` line that names the file, where it breaks and ``fix``.
    A sealed object is returned without its digest; an unsealed one (older files) is not checked."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or type(err).__name__}); {fix}") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not JSON text (byte {data[err.start]:#04x} at offset {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: damaged JSON ({err.msg}: line {err.lineno}, column {err.colno}); {fix}") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply to read; {fix}") from None
    if isinstance(value, dict) and DIGEST_KEY in value:   # sealed by write_sealed_json: check, then drop
        if _digest({k: v for k, v in value.items() if k != DIGEST_KEY}) != value[DIGEST_KEY]:
            raise UsageError(f"{path}: its content does not match its digest (changed after it was written: a "
                             f"flipped byte or a hand edit?); {fix}")
        value = {k: v for k, v in value.items() if k != DIGEST_KEY}
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    if missing:
        raise UsageError(f"{path}: no {', '.join(repr(k) for k in missing)} in its JSON; {fix}")
    return value


# the key of a sealed JSON object's digest (write_sealed_json); read_json checks and removes it
DIGEST_KEY = "_digest"


def _digest(value: Any) -> str:
    import hashlib

    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_sealed_json(path: str | Path, value: dict[str, Any], default: Any = float) -> None:
    """Write ``value`` (a JSON object) atomically with a SHA-256 digest of its content under
    :data:`DIGEST_KEY`, so that :func:`read_json` also refuses a change that leaves valid JSON (a
    flipped digit in a result). ``default`` converts what JSON cannot hold (e.g. numpy floats)."""
    plain = json.loads(json.dumps(value, default=default))   # as it will read back
    if not isinstance(plain, dict) or DIGEST_KEY in plain:
        raise ValueError(f"write_sealed_json takes an object without a {DIGEST_KEY!r} key")
    text = json.dumps({**plain, DIGEST_KEY: _digest(plain)}, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_table(path: str | Path, columns: Sequence[str] = (), numeric: Sequence[str] = (),
               text: Sequence[str] = (), fix: str = RECOMPUTE, name: str | None = None, what: str = "table",
               **read_csv: Any) -> Any:
    """The CSV table in ``path`` as a pandas DataFrame, refused with one
    :class:`~pgraft.core.errors.UsageError` line when it cannot be read or parsed, lacks one of
    ``columns`` (it is then not the ``what`` expected), or has a row whose ``numeric`` column is
    missing or not a finite number, or whose ``text`` column is empty: the marks of a file cut
    short or a flipped byte. The line names the file (``name``, e.g. the flag that gave it, else the
    path), the first bad row as a line number (the header is line 1) and ``fix``."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    label = name or str(path)
    try:
        table = pd.read_csv(path, **read_csv)
    except OSError as err:
        raise UsageError(f"{label}: cannot read ({err.strerror or type(err).__name__}); {fix}") from None
    except pd.errors.EmptyDataError:
        raise UsageError(f"{label}: empty, not a {what}; {fix}") from None
    except (ValueError, UnicodeDecodeError) as err:   # pandas' parser errors are ValueErrors
        raise UsageError(f"{label}: cannot read as CSV ({' '.join(str(err).split())}); {fix}") from None
    missing = [c for c in dict.fromkeys([*columns, *numeric, *text]) if c not in table.columns]
    if missing:
        raise UsageError(f"{label}: not a {what} (no column {', '.join(missing)}); {fix}")
    bad = np.zeros(len(table), dtype=bool)
    culprit = np.full(len(table), "", dtype=object)
    for col in numeric:
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(float)
        wrong = ~np.isfinite(values) & ~bad
        culprit[wrong], bad = col, bad | wrong
    for col in text:
        wrong = (table[col].isna() | (table[col].astype(str).str.strip() == "")).to_numpy() & ~bad
        culprit[wrong], bad = col, bad | wrong
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UsageError(f"{label}: row {row + 2} has a missing or non-numeric value in column {culprit[row]} "
                         f"(a truncated or damaged file?); {fix}")
    return table


def save_state(x: State, path: str | Path) -> None:
    """Write a state to a safetensors file atomically."""
    tensors = {_TENSOR_KEY: x} if isinstance(x, torch.Tensor) else dict(x)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_state(path: str | Path) -> State:
    """Inverse of :func:`save_state`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no state file at {path}")
    tensors = load_file(str(path))
    if set(tensors) == {_TENSOR_KEY}:
        return tensors[_TENSOR_KEY]
    return tensors
