"""The app contract: what an app declares once so that core handles its base model the same way in
every command.

An app (toy, molecule, layout, t2i, flow) builds one :class:`App` in its ``train`` module (``APP``)
and every command, benchmark and test asks it, instead of re-implementing:

- ``lacks(directory)``: what keeps a directory from being a finished base (None when it is one);
  a pgraft checkpoint of ``model_class`` holding ``files``, after an optional ``check`` hook
  (flow: a noise-correction directory is no base; t2i: a diffusers pipeline, ``checkpoint=False``);
- ``resolve_base(value, preset)``: the directory a ``--base`` value names, one grammar everywhere:
  :data:`~pgraft.core.shipped.SHIPPED` (the base shipped with the package, verified; refused with a
  preset it was not pretrained with) or a directory of the user's (refused when missing for an app
  that never pretrains on its own, naming the command that makes one);
- ``load_or_pretrain(directory, preset)``: the base in the directory, verified by
  :func:`~pgraft.core.shipped.open_base_dir` (a damaged or partial one refused, never pretrained
  over), pretrained there first (one line says so) when it holds none;
- ``sample_target(path, base)``: what a ``sample`` / ``evaluate`` command's ``[DIR] [--base]`` name
  (:func:`pgraft.core.cli.sample_target`);
- ``run_base(section)``: the base a run recorded, checked to be the one it was fine-tuned on.

``make_problem``, ``evaluate`` and ``presets`` are the app's own, kept here so a generic caller
finds them by the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .progress import make_console
from .shipped import SHIPPED, default_base, open_base_dir, recorded_base, resolve_base
from .targets import Target, checkpoint_lacks, run_lacks

Lacks = Callable[[Path], "str | None"]


def resolve_base_dir(value: str | Path, shipped: Path | None, *, app: str, flag: str = "--base",
                     must_exist: bool = False, note: str = "") -> Path:
    """The directory a base option's ``value`` names (:func:`pgraft.core.shipped.resolve_base`; the
    shipped base is verified against its manifest). ``must_exist``: a directory that does not exist
    is refused in one line naming the command that makes one (and ``note``, e.g. how long it takes)."""
    ships = shipped is not None and Path(shipped).is_dir()
    directory = resolve_base(value, shipped if ships else None)
    if must_exist and not directory.exists():
        how = f" ({note})" if note else ""
        alternative = f" or use the shipped one ({flag} {SHIPPED})" if ships else ""
        raise UsageError(f"{flag} {directory} does not exist: make a base with `pgraft {app} pretrain --out "
                         f"{directory}`{how}{alternative}")
    return directory


@dataclass(frozen=True)
class App:
    """What core needs to know of an app to handle its base model (see the module docstring).

    ``load(directory)`` loads a finished base; ``pretrain(directory, preset, show_progress)`` makes
    one (None: the app never pretrains on its own, so a missing base directory is refused).
    ``preset`` is whatever names a pretraining of the app: a preset name, or a config (toy).
    ``shipped_preset`` is the one the shipped base was pretrained with; ``preset_mismatch(preset)``
    overrides the comparison with it (a refusal text, None when the shipped base fits). ``resolve``
    replaces :func:`resolve_base_dir` where an app names bases in more ways (t2i: a Hugging Face hub
    id found in the local cache); it must keep ``shipped`` and a directory meaning what they mean here."""

    name: str
    shipped: Path
    load: Callable[[Path], Any]
    model_class: str | None = None
    files: tuple[str, ...] = ()
    check: Lacks | None = None
    checkpoint: bool = True
    pretrain: Callable[[Path, Any, bool], Any] | None = None
    pretrain_note: str = ""
    shipped_preset: Any = "default"
    preset_mismatch: Callable[[Any], str | None] | None = None
    flag: str = "--base"
    resolve: Callable[[str | Path], Path] | None = None
    run_lacks: Lacks | None = None
    run_kind: str | None = None
    make_problem: Callable[..., Any] | None = None
    evaluate: Callable[..., Any] | None = None
    presets: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ naming a base
    @property
    def ships(self) -> bool:
        """Does this installation ship the app's base?"""
        return Path(self.shipped).is_dir()

    @property
    def shipped_or_none(self) -> Path | None:
        """The shipped base directory, None when this installation has none."""
        return Path(self.shipped) if self.ships else None

    @property
    def default_base(self) -> str:
        """The default base value: ``shipped`` when the package ships one, else ``runs/<app>/base``."""
        return default_base(self.shipped, f"runs/{self.name}/base")

    @property
    def pretrain_command(self) -> str:
        return f"pgraft {self.name} pretrain"

    def shipped_refusal(self, preset: Any) -> str | None:
        """Why the shipped base does not fit ``preset`` (None when it does)."""
        if self.preset_mismatch is not None:
            return self.preset_mismatch(preset)
        if preset == self.shipped_preset:
            return None
        return (f"the shipped base is the {self.shipped_preset!r} preset, not {preset!r}; pass {self.flag} DIR to "
                f"pretrain the {preset!r} preset into DIR")

    def resolve_base(self, value: str | Path, preset: Any = None) -> Path:
        """The directory ``value`` names (``shipped`` or a directory; see the module docstring); a
        :class:`UsageError` (one line) when ``shipped`` does not fit ``preset`` (None: not checked),
        when this installation ships none, or (an app that never pretrains) when the directory is
        missing."""
        if str(value) == SHIPPED and preset is not None:
            refusal = self.shipped_refusal(preset)
            if refusal is not None:
                raise UsageError(refusal)
        if self.resolve is not None:
            return self.resolve(value)
        return resolve_base_dir(value, self.shipped, app=self.name, flag=self.flag,
                                must_exist=self.pretrain is None, note=self.pretrain_note)

    def run_base(self, section: Mapping[str, Any], key: str = "base") -> Path:
        """The base directory a run recorded (``section[key]`` with its ``base_sha256`` /
        ``base_config_sha256``), refused unless it still holds the weights and config the run was
        fine-tuned on (:func:`~pgraft.core.shipped.recorded_base`)."""
        return recorded_base(section[key], section.get("base_sha256"), self.shipped,
                             section.get("base_config_sha256"))

    # ------------------------------------------------------------------ what a base directory holds
    def lacks(self, directory: str | Path) -> str | None:
        """What keeps ``directory`` from being a finished base of this app (None when it is one):
        the ``check`` hook's answer, then (a checkpoint app) ``files``, ``config.json`` of
        ``model_class``, ``model.safetensors``, finished pretraining."""
        directory = Path(directory)
        if self.check is not None:
            found = self.check(directory)
            if found is not None:
                return found
        if not self.checkpoint:
            return None
        return checkpoint_lacks(directory, self.model_class, self.files)

    def base_for_run(self, value: str | Path, preset: Any, out: str | Path, resume: bool,
                     show_progress: bool = True) -> tuple[Path, Any]:
        """(directory, model) of the base a train command's ``--base value`` names, for a run in
        ``out``: the run directory's refusals come first (:func:`~pgraft.core.rundir.preflight`: in
        use, nothing to resume, a finished run), before a missing base is pretrained, so that a
        refused command neither pretrains nor prints more than its one line."""
        from .rundir import preflight
        from .trainer import is_main_process

        preflight(out, resume, report=is_main_process())
        directory = self.resolve_base(value, preset)
        return directory, self.load_or_pretrain(directory, preset, show_progress)

    def load_or_pretrain(self, directory: str | Path, preset: Any = None, show_progress: bool = True) -> Any:
        """The base in ``directory``: loaded when :func:`~pgraft.core.shipped.open_base_dir` finds a
        finished, verified one (a damaged or partial one is refused, never pretrained over); else
        ``preset`` (default: the shipped one's) is pretrained (or resumed) into it first, announced
        in one line. An app that never pretrains refuses, naming the command that makes a base."""
        directory = Path(directory)
        if not self.checkpoint:  # a directory of other files (t2i: a pipeline), loaded as it is
            resolved = self.resolve_base(directory)
            lack = self.lacks(resolved)
            if lack is not None:
                raise UsageError(f"{self.flag} {directory} is not a {self.name} base ({lack}); make one with "
                                 f"`{self.pretrain_command} --out {directory}`")
            return self.load(resolved)
        if open_base_dir(directory, self.files):
            return self.load(directory)
        if self.pretrain is None:
            raise UsageError(f"{self.flag} {directory} holds no {self.name} base; make one with "
                             f"`{self.pretrain_command} --out {directory}`")
        preset = self.shipped_preset if preset is None else preset
        what = f"the {preset!r} preset" if isinstance(preset, str) else "the given settings"
        note = f" ({self.pretrain_note})" if self.pretrain_note else ""
        make_console().print(f"No finished {self.name} base in {directory}: pretraining {what} first{note}.",
                             highlight=False, soft_wrap=True, markup=False)
        self.pretrain(directory, preset, show_progress)
        return self.load(directory)

    # ------------------------------------------------------------------ what a sample command points at
    def is_run(self, directory: Path) -> str | None:
        """What keeps ``directory`` from being a run of this app (None when it is one)."""
        return self.run_lacks(directory) if self.run_lacks is not None else run_lacks(directory, self.name)

    def sample_target(self, path: Path | None, base: str | None, argument: str = "RUN_DIR") -> Target:
        """The run or base that a ``sample`` / ``evaluate`` command's ``[DIR] [--base]`` name, refused
        in one line naming the argument (:func:`pgraft.core.cli.sample_target`)."""
        from .cli import sample_target

        return sample_target(path, base, self.name, lacks_run=self.is_run, lacks_base=self.lacks,
                             shipped=self.shipped_or_none, argument=argument, run_kind=self.run_kind,
                             make_hint=f"make one with `{self.pretrain_command} --out DIR`")
