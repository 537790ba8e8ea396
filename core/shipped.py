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
the user's own: :func:`open_base_dir` verifies it as the shipped one is verified (its manifest, or
the digests its pretraining or shipping recorded) and says whether it holds a finished base to load
or nothing yet (pretrain into it); a damaged or partial base is refused and never pretrained over.
The run records the value and the SHA-256 of the base's weights and of its ``config.json``
(:func:`base_digests`), so sampling a run later finds the same base, or says which file changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .errors import CheckpointError, UsageError
from .integrity import LOCK_NAME, MANIFEST_NAME, sha256_file, verify_manifest, write_manifest
from .pretrain import DONE_NAME, STATE_NAME, is_pretrained
from .progress import warn

SHIPPED = "shipped"
RECORD_NAME = "SHIPPED.json"


class BaseDamaged(CheckpointError):
    """A base directory holds a damaged or partial base (a file that fails its checksum or cannot be
    read, or a base with files missing): refused, and the directory is left as it is."""


class ShippedBaseDamaged(BaseDamaged):
    """A file of a shipped base does not match the manifest it was shipped with."""


class BaseChanged(UsageError):
    """A run's base no longer holds the weights (or config) the run was fine-tuned on."""


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


def config_sha256(directory: str | Path) -> str:
    """SHA-256 of ``directory/config.json``: the architecture the weights are loaded into."""
    return sha256_file(Path(directory) / CONFIG_NAME)


# the run-config keys of a base's digests, and the file each one is the SHA-256 of
DIGEST_FILES = {"base_sha256": WEIGHTS_NAME, "base_config_sha256": CONFIG_NAME}


def base_digests(directory: str | Path, resumed: dict[str, Any] | None = None) -> dict[str, str]:
    """What a run records of its base: ``{"base_sha256": weights, "base_config_sha256": config.json}``.
    ``resumed`` is the section of a run being resumed that holds these keys (None for a new run):
    only the keys it recorded are returned, so a run recorded before a key existed resumes with its
    config unchanged."""
    digests = {key: sha256_file(Path(directory) / name) for key, name in DIGEST_FILES.items()}
    return digests if resumed is None else {k: v for k, v in digests.items() if k in resumed}


def recorded_section(run_dir: str | Path, *keys: str) -> dict[str, Any] | None:
    """``config.json["app"][keys...]`` of the run in ``run_dir`` (None when there is no such run or
    section yet): what a resumed run recorded (see :func:`base_digests`)."""
    try:
        section = json.loads((Path(run_dir) / CONFIG_NAME).read_text())["app"]
        for key in keys:
            section = section[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return section if isinstance(section, dict) else None


def check_same_base(directory: str | Path, expected_sha256: str | None, value: str | Path,
                    expected_config_sha256: str | None = None) -> None:
    """Raise :class:`BaseChanged`, naming the file, when the base in ``directory`` (named ``value``
    in the run's config) is not the one the run recorded: its weights or its ``config.json`` differ
    (or are gone). A digest the run did not record (runs recorded before it was kept) is not checked."""
    directory = Path(directory)
    where = "the shipped base of this installation" if str(value) == SHIPPED else str(directory)
    if (expected_sha256 or expected_config_sha256) and not directory.is_dir():
        raise BaseChanged(f"the run was fine-tuned on the base in {directory}, which does not exist any more; "
                          "restore it to sample this run")
    for name, expected in ((WEIGHTS_NAME, expected_sha256), (CONFIG_NAME, expected_config_sha256)):
        if expected is None:
            continue
        path = directory / name
        found = sha256_file(path) if path.is_file() else None
        if found == expected:
            continue
        what = "weights" if name == WEIGHTS_NAME else name
        now = f"now holds {found[:12]}... ({path} changed)" if found else f"now holds no {name} ({path} is missing)"
        raise BaseChanged(f"the run was fine-tuned on a base with {what} sha256 {expected[:12]}..., but {where} "
                          f"{now}; sampling it would pair the head with another base")


def recorded_base(value: str | Path, expected_sha256: str | None, shipped: str | Path | None,
                  expected_config_sha256: str | None = None) -> Path:
    """The base directory a run's config names (``base``, ``base_sha256`` and ``base_config_sha256``):
    :func:`resolve_base`, then :func:`check_same_base`, then (a directory of the user's)
    :func:`open_base_dir`, so a run is never sampled with a base it was not fine-tuned on, nor with
    a damaged one."""
    directory = resolve_base(value, shipped)
    check_same_base(directory, expected_sha256, value, expected_config_sha256)
    if str(value) != SHIPPED and not open_base_dir(directory):
        raise BaseChanged(f"the run was fine-tuned on the base in {directory}, which holds no finished base any "
                          "more; restore it to sample this run")
    return directory


# ----------------------------------------------------------------------------- a user's base directory
# what a pretraining leaves before its first checkpoint (besides the app's own files): not a base yet
PRETRAIN_TRACES = frozenset({"pretrain_config.json", "loss.csv", LOCK_NAME})
_WARNED: set[str] = set()


def _is_trace(name: str, app_files: tuple[str, ...]) -> bool:
    """A file a pretraining writes before its first checkpoint: its settings, log, lock, temporary
    files (``.NAME.XXXX.tmp``) and the app's metadata (``app_files``, top-level part)."""
    return (name in PRETRAIN_TRACES or (name.startswith(".") and name.endswith(".tmp"))
            or name in {f.split("/")[0] for f in app_files})


def _refuse(directory: Path, problem: str) -> BaseDamaged:
    return BaseDamaged(f"{problem}, so {directory} holds a damaged base; it was left as it is: restore it, or "
                       "pass another (or an empty) --base directory to pretrain a new base there")


def _check_recorded_digests(directory: Path) -> None:
    """The weights' SHA-256 that a finished pretraining (``pretrain_done.json``) or shipping
    (``SHIPPED.json``) recorded, where one exists, checked against ``model.safetensors``."""
    weights = directory / WEIGHTS_NAME
    found = None
    for name, key in ((DONE_NAME, "sha256"), (RECORD_NAME, "weights_sha256")):
        path = directory / name
        if not path.is_file() or not weights.is_file():
            continue
        try:
            expected = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            raise _refuse(directory, f"{path} is not valid JSON") from None
        if expected is None:
            continue
        found = found or sha256_file(weights)
        if found != expected:
            raise _refuse(directory, f"{weights} does not match the sha256 recorded in {path} "
                                     f"({expected[:12]}..., found {found[:12]}...)")


def open_base_dir(directory: str | Path, app_files: tuple[str, ...] = ()) -> bool:
    """Is there a finished, verified base in ``directory`` (a ``--base`` of the user's)? True: load
    it. False: nothing there yet (missing, empty, or a pretraining of ours to start or resume):
    pretrain into it. Anything else is refused, and the directory is left as it is:

    - a file, not a directory (:class:`UsageError`);
    - ``manifest.json`` present and a file missing from it, failing its checksum, or the manifest
      unreadable; a weights digest recorded by ``pretrain_done.json`` or ``SHIPPED.json`` that does
      not match; ``config.json`` that is not valid JSON (:class:`BaseDamaged`, naming the file);
    - files that are not a complete base (``config.json`` or ``model.safetensors`` missing, or one
      of ``app_files``, the app's metadata such as ``molecule.json``, missing from a base that is no
      pretraining of ours) and more than the traces a pretraining leaves before its first
      checkpoint (:class:`BaseDamaged`).

    A complete base without ``manifest.json`` (a user's own) cannot be verified: a warning says so
    (once per directory) and it is loaded; the run records its digests (:func:`base_digests`)."""
    directory = Path(directory)
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise UsageError(f"--base {directory} is a file, not a directory")
    names = {p.name for p in directory.iterdir()}
    if not names - {LOCK_NAME}:
        return False
    manifest = MANIFEST_NAME in names
    if manifest:
        problems = verify_manifest(directory, required=True)
        if problems:
            raise _refuse(directory, problems[0])
    config = directory / CONFIG_NAME
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (OSError, ValueError):
            raise _refuse(directory, f"{config} is not valid JSON") from None
    _check_recorded_digests(directory)
    lacking = [name for name in (CONFIG_NAME, WEIGHTS_NAME, *app_files) if not (directory / name).is_file()]
    if (directory / STATE_NAME).is_file() and CONFIG_NAME not in lacking and WEIGHTS_NAME not in lacking:
        # a pretraining of ours (verified above, and again by pretrain when it resumes): unfinished,
        # or finished without the app's files, it is resumed; finished, it is loaded
        return not lacking and is_pretrained(directory)
    if not lacking:
        key = str(directory.resolve())
        if not manifest and key not in _WARNED:
            _WARNED.add(key)
            warn(f"{directory} has no {MANIFEST_NAME}, so its files cannot be verified; the run records their digests")
        return True
    if all(_is_trace(name, app_files) for name in names):
        return False
    raise BaseDamaged(f"{directory} holds files but no complete base (missing {lacking[0]}); refusing to pretrain "
                      "over it: restore it, or pass a new or empty --base directory")


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
    weights = {"weights_sha256": weights_sha256(dest)} if (dest / WEIGHTS_NAME).is_file() else {}  # a pipeline
    record = {**record, "files": sorted(files), **weights}  # directory keeps its weights in parts (the manifest has them)
    (dest / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    write_manifest(dest, [*sorted(files), RECORD_NAME])
    return dest
