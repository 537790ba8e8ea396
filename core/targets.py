"""What a ``sample`` / ``evaluate`` command points at: a fine-tuning run, or a base model alone.

Every app's ``sample`` and ``evaluate`` take ``[DIR] [--base VALUE]``. ``DIR`` is a run directory
of the app or a base-model directory; ``--base`` alone names a base as ``train --base`` does
(:data:`~pgraft.core.shipped.SHIPPED` or a directory). A base is sampled by the plain base sampler
(no head, no split). Outputs go where they go for a run, inside the directory, except for the
shipped base: it lives inside the installed package and is never written into, so its outputs go
to ``runs/<app>/shipped-base/`` (:func:`shipped_outputs`) unless ``--out`` says otherwise.

An app says what makes a directory one of its runs or bases by a ``lacks`` function: ``None`` when
the directory is one, else what it lacks (``"no molecule.json"``), which the refusal quotes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .errors import UsageError
from .pretrain import is_pretrained
from .shipped import SHIPPED, open_base_dir, resolve_base, verify_shipped

Lacks = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class Target:
    """A directory to sample: a run (``is_run``) or a base; ``outputs`` is where files go by default."""

    directory: Path
    is_run: bool
    shipped: bool
    outputs: Path

    def output(self, name: str) -> Path:
        """``outputs/name``, its folder created (the shipped base's folder may not exist yet)."""
        self.outputs.mkdir(parents=True, exist_ok=True)
        return self.outputs / name


def shipped_outputs(app: str) -> Path:
    """``runs/<app>/shipped-base``: default outputs of sampling the shipped base (relative to the cwd,
    like every default ``--out``)."""
    return Path("runs") / app / "shipped-base"


def run_lacks(directory: Path, app: str) -> str | None:
    """What keeps ``directory`` from being a run of ``app`` (its ``config.json`` has an ``app.<app>``
    section, as :func:`~pgraft.core.trainer.run_graft` writes it); None when it is one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return f"no {CONFIG_NAME}"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"its {CONFIG_NAME} is not readable JSON"
    section = config.get("app") if isinstance(config, dict) else None
    if not isinstance(section, dict) or app not in section:
        return f"its {CONFIG_NAME} has no '{app}' section"
    return None


def read_run(directory: str | Path, app: str) -> tuple[dict, dict]:
    """(config, its ``app.<app>`` section) of a finished ``pgraft <app> train`` run; a directory
    that is not one, or whose fine-tuned ``head/`` is not saved yet, is refused naming what it
    lacks (one :class:`UsageError` line)."""
    directory = Path(directory)
    lack = run_lacks(directory, app)
    if lack is not None:
        raise UsageError(f"{directory} is not a `pgraft {app} train` run ({lack})")
    if not (directory / "head" / WEIGHTS_NAME).is_file():
        raise UsageError(f"{directory} has no fine-tuned model yet ({directory / 'head'}); "
                         f"finish it with `pgraft {app} train --resume`")
    config = json.loads((directory / CONFIG_NAME).read_text())
    return config, config["app"][app]


def checkpoint_lacks(directory: Path, model_class: str | None = None, files: tuple[str, ...] = ()) -> str | None:
    """What keeps ``directory`` from being a finished base checkpoint: ``files`` (app metadata),
    ``config.json`` of ``model_class`` (any when None), ``model.safetensors``, finished pretraining
    (:func:`~pgraft.core.pretrain.is_pretrained`). None when it is one."""
    directory = Path(directory)
    for name in (*files, CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            return f"no {name}"
    if model_class is not None:
        try:
            found = json.loads((directory / CONFIG_NAME).read_text()).get("_class")
        except (OSError, ValueError, AttributeError):
            return f"its {CONFIG_NAME} is not readable JSON"
        if found != model_class:
            return f"its {CONFIG_NAME} is a {found or 'unnamed'} checkpoint, not a {model_class}"
    if not is_pretrained(directory):
        return "its pretraining has not finished (rerun the same `pretrain` command to resume it)"
    return None


def resolve_target(path: Path | None, base: str | None, app: str, *, lacks_run: Lacks, lacks_base: Lacks,
                   shipped: Path | None, run_kind: str | None = None, make_hint: str | None = None) -> Target:
    """The run or base that ``[DIR] [--base VALUE]`` name; a :class:`UsageError` naming the argument
    when they name neither (or both), :class:`~pgraft.core.shipped.ShippedBaseDamaged` when the
    shipped base fails its manifest, :class:`~pgraft.core.shipped.BaseDamaged` when a base directory
    of the user's fails :func:`~pgraft.core.shipped.open_base_dir`. ``shipped`` is the app's shipped
    base directory (None: none); a positional path that is that directory counts as the shipped base
    too (verified, never written into), and so does the word ``shipped`` as the positional argument
    (unless a directory of that name exists), so every command names the shipped base the same way.
    ``run_kind`` names a run in messages (default ``"<app> run"``); ``make_hint`` (``DIR`` standing
    for the directory) says how to make a base, after the refusal of a ``--base`` that does not exist."""
    run_kind = run_kind or f"{app} run"
    if path is not None and base is None and str(path) == SHIPPED and not Path(path).exists():
        path, base = None, SHIPPED  # `pgraft <app> sample shipped`: the shipped base, named as --base names it
    if path is not None and base is not None:
        raise UsageError(f"give a directory ({path}) or --base ({base}), not both")
    if path is None and base is None:
        ships = shipped is not None and Path(shipped).is_dir()
        raise UsageError(f"missing: give a {run_kind} or {app} base model directory, or --base "
                         f"{f'{SHIPPED}|' if ships else ''}DIR")
    if base is not None:
        if str(base) == SHIPPED and (shipped is None or not Path(shipped).is_dir()):
            raise UsageError(f"this installation ships no {app} base; pass --base DIR (a {app} base model directory)")
        directory = resolve_base(base, shipped)  # the shipped base: verified against its manifest
        if str(base) != SHIPPED:
            lacks = lacks_base(directory)
            if lacks is not None:
                hint = f"; {make_hint.replace('DIR', str(directory))}" if make_hint else ""
                state = f"does not exist{hint}" if not directory.exists() else f"is not a {app} base model ({lacks})"
                raise UsageError(f"--base {directory} {state}")
        return _base_target(directory, app, shipped)
    path = Path(path)
    run_missing = lacks_run(path)
    if run_missing is None:
        return Target(path, True, False, path)
    base_missing = lacks_base(path)
    if base_missing is None:
        return _base_target(path, app, shipped)
    what = f"neither a {run_kind} ({run_missing}) nor a {app} base model ({base_missing})"
    raise UsageError(f"{path} is {what}" if path.exists() else f"{path} does not exist, so it is {what}")


def _base_target(directory: Path, app: str, shipped: Path | None) -> Target:
    is_shipped = shipped is not None and Path(shipped).is_dir() and directory.resolve() == Path(shipped).resolve()
    if is_shipped:
        verify_shipped(directory)
    elif (directory / WEIGHTS_NAME).is_file():  # a pgraft checkpoint of the user's (not a pipeline directory):
        open_base_dir(directory)  # verified as the shipped one is (a damaged one is refused, never sampled)
    return Target(directory, False, is_shipped, shipped_outputs(app) if is_shipped else directory)
