"""Base models shipped inside the package: where they live, how they are checked, what ``--base`` means.

An app that ships its default base keeps it in ``apps/<app>/bases/default/``::

    config.json, model.safetensors, <app metadata>   exactly the files the app's loader reads
    SHIPPED.json                                     how it was made: command, seed, git commit,
                                                     wall time, the base's evaluation row
    manifest.json                                    SHA-256 of each file above

It is the output of the app's own ``pretrain`` command with the resumable training state, loss
log and evaluation samples left out (:func:`ship_base`), so rerunning the recorded command
reproduces it. A ``train`` command's ``--base`` is either :data:`SHIPPED` (the default where an
app ships a base: that directory, verified against its manifest before use) or a directory of
the user's own (loaded, or pretrained into when it holds no finished base). The run records the
value and the SHA-256 of the base's weights, so sampling a run later finds the same base, or says
that it changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import WEIGHTS_NAME
from .errors import CheckpointError, UsageError
from .integrity import sha256_file, verify_manifest, write_manifest

SHIPPED = "shipped"
RECORD_NAME = "SHIPPED.json"


class ShippedBaseDamaged(CheckpointError):
    """A file of a shipped base does not match the manifest it was shipped with."""


class BaseChanged(UsageError):
    """A run's base no longer holds the weights the run was fine-tuned on."""


def shipped_dir(app_dir: str | Path, name: str = "default") -> Path:
    """``<app_dir>/bases/<name>``: where an app package keeps a shipped base (it may not exist)."""
    return Path(app_dir) / "bases" / name


def default_base(shipped: str | Path, fallback: str) -> str:
    """The default ``--base`` of an app: :data:`SHIPPED` when the package ships that base, else
    ``fallback`` (a directory the app pretrains into on first use)."""
    return SHIPPED if Path(shipped).is_dir() else fallback


def verify_shipped(directory: str | Path) -> None:
    """Raise :class:`ShippedBaseDamaged` (one line, naming the file) unless every file of the shipped
    base in ``directory`` matches its ``manifest.json``."""
    problems = verify_manifest(directory, required=True)
    if problems:
        raise ShippedBaseDamaged(f"the shipped base is damaged: {problems[0]}; reinstall pgraft, or pass "
                                 "--base DIR to use (or pretrain) a base of your own")


def resolve_base(value: str | Path, shipped: str | Path | None) -> Path:
    """The directory a ``--base`` value names: :data:`SHIPPED` -> ``shipped`` (verified; a
    :class:`UsageError` when the app ships none), anything else -> that path, unchecked (it may not
    exist yet: the app pretrains into it)."""
    if str(value) != SHIPPED:
        return Path(value)
    if shipped is None or not Path(shipped).is_dir():
        raise UsageError(f"this installation has no shipped base{'' if shipped is None else f' at {shipped}'}; "
                         "pass --base DIR (a directory to load, or to pretrain into)")
    verify_shipped(shipped)
    return Path(shipped)


def resolve_preset_base(value: str | Path, preset: str, shipped: str | Path | None,
                        shipped_preset: str = "default") -> Path:
    """:func:`resolve_base` for apps whose base comes from a pretraining preset: the shipped base is
    the ``shipped_preset`` one, so asking for it with another ``--preset`` is refused."""
    if str(value) == SHIPPED and preset != shipped_preset:
        raise UsageError(f"the shipped base is the {shipped_preset!r} preset, not {preset!r}; pass --base DIR to "
                         f"pretrain the {preset!r} preset into DIR")
    return resolve_base(value, shipped)


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 of ``directory/model.safetensors``: the identity of a base recorded in a run's config."""
    return sha256_file(Path(directory) / WEIGHTS_NAME)


def check_same_base(directory: str | Path, expected_sha256: str | None, value: str | Path) -> None:
    """Raise :class:`BaseChanged` when the base in ``directory`` (named ``value`` in the run's
    config) is not the one the run recorded; a run recorded before digests were kept passes."""
    if expected_sha256 is None:
        return
    found = weights_sha256(directory)
    if found != expected_sha256:
        where = "the shipped base of this installation" if str(value) == SHIPPED else str(directory)
        raise BaseChanged(f"the run was fine-tuned on a base with weights sha256 {expected_sha256[:12]}..., but "
                          f"{where} now holds {found[:12]}...; sampling it would pair the head with another base")


def recorded_base(value: str | Path, expected_sha256: str | None, shipped: str | Path | None) -> Path:
    """The base directory a run's config names (``base`` and ``base_sha256``): :func:`resolve_base`,
    then :func:`check_same_base`, so a run is never sampled with a base it was not fine-tuned on."""
    directory = resolve_base(value, shipped)
    check_same_base(directory, expected_sha256, value)
    return directory


def read_record(directory: str | Path) -> dict[str, Any]:
    """The ``SHIPPED.json`` record of a shipped base."""
    return json.loads((Path(directory) / RECORD_NAME).read_text())


def ship_base(source: str | Path, dest: str | Path, files: list[str], record: dict[str, Any]) -> Path:
    """Copy ``files`` of a finished pretraining run ``source`` into ``dest`` (emptied first), write
    ``record`` as ``SHIPPED.json`` (plus the weights' SHA-256) and the manifest of all of them.
    Returns ``dest``. A file listed but absent raises ``FileNotFoundError`` naming it."""
    source, dest = Path(source), Path(dest)
    missing = [name for name in files if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} has no {', '.join(missing)}; is its pretraining finished?")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    record = {**record, "files": sorted(files), "weights_sha256": weights_sha256(dest)}
    (dest / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(dest, [*sorted(files), RECORD_NAME])
    return dest
