"""Safe and verifiable run files: checksummed checkpoints, tensor-only state files, one writer.

- :func:`write_manifest` / :func:`replace_files` / :func:`verify_manifest`: a ``manifest.json``
  with the SHA-256 of every file of a checkpoint, checked before the files are used, so a
  truncated, zeroed or swapped file is detected instead of resumed from.
- :func:`load_state_dict_file`: :func:`pgraft.core.torch_checkpoint.read_checkpoint`, which never
  unpickles. Trainer and pretraining state (optimizer, scheduler, generator, step, loss log) is made of tensors, numbers, strings,
  lists and dicts only, which that loader accepts; a pickle that would call a function (e.g.
  ``os.system``) when loaded is refused before anything runs.
- :func:`exclusive`: an advisory ``flock`` on ``<dir>/.lock`` holding the writer's PID and host.
  The kernel drops the lock when its process dies, so a lock file left by a killed run is stale by
  construction and is simply taken over. Re-entrant within one process (a resumed run in the same
  interpreter, an app that wraps the core loop), refused across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, RunDirLocked
from .state import atomic_write, usual_permissions

MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_digest(root: str | Path, paths: Iterable[str | Path]) -> str:
    """One SHA-256 over several files under ``root``: for each file in sorted order, its path
    relative to ``root`` (posix) followed by its own SHA-256 (the identity of a model folder, or of
    the weight files in it)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.relative_to(root).as_posix().encode() + sha256_file(path).encode())
    return h.hexdigest()


def _read_manifest(directory: Path) -> dict[str, list[str]]:
    """name -> accepted SHA-256 digests ({} when there is no readable manifest)."""
    try:
        files = json.loads((directory / MANIFEST_NAME).read_text())["files"]
        return {name: list(entry["sha256"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_manifest(directory: Path, files: dict[str, list[str]]) -> None:
    text = json.dumps({"files": {n: {"sha256": h} for n, h in sorted(files.items())}}, indent=2)
    atomic_write(directory / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text))


def write_manifest(directory: str | Path, names: Iterable[str]) -> None:
    """Record the SHA-256 of ``directory/name`` for each name (for a directory that is itself
    moved into place atomically, e.g. a round checkpoint)."""
    directory = Path(directory)
    _write_manifest(directory, {n: [sha256_file(directory / n)] for n in names})


def replace_files(directory: str | Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Replace several files of ``directory`` so that, wherever the process is killed, every file
    on disk matches the manifest: each ``writers[name](tmp_path)`` writes a temporary file; the
    manifest first accepts the old and the new digest of each file, the files are renamed into
    place, then the manifest keeps only the new digests."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(directory)
    tmps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            tmps[name] = tmp
            write(tmp)
            usual_permissions(tmp)
        new = {name: sha256_file(tmp) for name, tmp in tmps.items()}
        both = {**old, **{n: old.get(n, [])[-1:] + [h] for n, h in new.items()}}
        _write_manifest(directory, both)
        for name, tmp in tmps.items():
            os.replace(tmp, directory / name)
        _write_manifest(directory, {**old, **{n: [h] for n, h in new.items()}})
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def verify_manifest(directory: str | Path, required: bool = True) -> list[str]:
    """Problems found in ``directory`` against its manifest ([] = every listed file intact).
    Without a manifest: one problem when ``required``, else none (directories written before
    manifests existed, or a user's own checkpoint)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return [f"{path} is missing"] if required else []
    files = _read_manifest(directory)
    if not files:
        return [f"{path} is not a valid manifest"]
    problems = []
    for name, digests in sorted(files.items()):
        f = directory / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif sha256_file(f) not in digests:
            problems.append(f"{f} does not match its checksum ({f.stat().st_size} bytes)")
    return problems


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """A ``torch.save`` file of tensors and numbers (a resume state) on the CPU, read by
    :func:`pgraft.core.torch_checkpoint.read_checkpoint`: its pickle is parsed against a whitelist,
    never unpickled, so nothing in it runs. A file that is not plain tensor/number data (or cannot
    be read) raises :class:`CheckpointError` naming it."""
    from .torch_checkpoint import CheckpointFormatError, read_checkpoint

    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return read_checkpoint(path)
    except CheckpointFormatError as err:
        reason = str(err).removeprefix(f"checkpoint {path} ")
        raise CheckpointError(f"{path} cannot be loaded safely (refused: {reason[:200]})") from None


# ----------------------------------------------------------------------------- one writer
_HELD: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth): re-entrancy within a process

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def held_by_another(directory: str | Path) -> str | None:
    """Who holds the writer lock of ``directory`` when another process does ("PID ... on ..."),
    else None (no lock file, a stale one, or held by this process)."""
    path = Path(directory) / LOCK_NAME
    if not path.is_file() or str(path.resolve()) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return None


@contextlib.contextmanager
def exclusive(directory: str | Path) -> Iterator[None]:
    """Hold the writer lock of ``directory`` (created if needed) for the block.

    Raises :class:`RunDirLocked` naming the holder when another process has it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / LOCK_NAME).resolve()
    key = str(path)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(f"{directory} is in use by {_holder(path)}; wait for that run to end or "
                           "choose another --out (nothing was changed)") from None
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.write(fd, info.encode())
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _HELD.pop(key)
        os.close(fd)  # releases the flock; the file stays (a lock file without a flock is stale)
