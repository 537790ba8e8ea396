"""``--config run.yaml``: a command's flags read from a YAML file.

The file is a mapping whose keys are the command's parameter names, the names a flag has in
Python (``rounds``, ``train_steps``, ``m`` for ``--m``; ``-`` may stand for ``_``). A key whose
value is itself a mapping is a section: its keys are read as if written at the top level, so a
file may group them for the reader::

    rounds: 4
    graft: {rule: topk, m: 8, k: 2}
    toy: {mixture: 1d, reward: x}

The keys become click's ``default_map`` of the command: click then applies the command line over
the file over the defaults (``ParameterSource.DEFAULT_MAP`` for a value from the file) and runs the
same type conversions, callbacks and config dataclasses as for the flags. An unknown key, a key
given twice, a non-mapping file or a value a flag would refuse is a usage error naming the file and
the key (one line). Only ``yaml.safe_load`` reads the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from .errors import UsageError

META_KEY = "pgraft.config_file"  # ctx.meta: (path, {parameter name: key as written}) of the file applied


def read_config_file(path: Path) -> dict[str, Any]:
    """The flattened ``{parameter name: value}`` of a YAML config file; a
    :class:`~pgraft.core.errors.UsageError` naming the file (and the key) when it cannot be read, is
    not a mapping, or gives a key twice."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UsageError(f"--config {path}: cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{line} ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"--config {path}: must be a mapping of flag names to values (key: value lines), "
                         f"got a {type(data).__name__}")
    return flatten(data, str(path))


def flatten(data: Mapping[Any, Any], source: str, section: str = "") -> dict[str, Any]:
    """``{parameter name: value}`` of a (possibly sectioned) mapping: a mapping value is a section
    whose keys are read as top-level keys; ``-`` in a key reads as ``_``. A key given twice (in two
    sections, or as ``a-b`` and ``a_b``) or a non-string key is refused naming ``source``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{section}{key}"
        if not isinstance(key, str):
            raise UsageError(f"--config {source}: key {where!r} is not a name (keys are flag names such as rounds)")
        items = flatten(value, source, f"{where}.") if isinstance(value, Mapping) else {key.replace("-", "_"): value}
        for name, item in items.items():
            if name in out:
                raise UsageError(f"--config {source}: key {name!r} is given twice")
            out[name] = item
    return out


def apply_config_file(ctx: typer.Context, path: Path | None) -> None:
    """Eager callback body of ``--config``: read ``path`` and make it the ``default_map`` of the
    command being parsed, after checking every key names one of its parameters and every value
    passes that parameter's type and callback (refusals name the file and the key)."""
    if path is None or ctx.resilient_parsing:
        return
    values = read_config_file(path)
    params = {p.name: p for p in ctx.command.params if p.expose_value and p.name not in (None, "config")}
    for name, value in values.items():
        param = params.get(name)
        if param is None:
            known = ", ".join(sorted(params))
            raise UsageError(f"--config {path}: unknown key {name!r}; the keys are the flags of "
                             f"{ctx.command_path}: {known}")
        if value is None:
            continue  # `key:` with no value: the flag's own default
        try:
            param.process_value(ctx, value)
        except typer.BadParameter as err:
            raise UsageError(f"--config {path}: key {name!r}: {one_line(err.message)}") from None
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in values.items() if v is not None}}
    ctx.meta[META_KEY] = (Path(path), sorted(values))


def file_source(flag: str | None) -> str | None:
    """`` (key 'k' of run.yaml)`` when the parameter behind ``flag`` (``--k``, or its name) took its
    value from the ``--config`` file of the command being run, else None (no file, a value typed on
    the command line, or no click context)."""
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    if ctx is None or flag is None or META_KEY not in ctx.meta:
        return None
    path, _ = ctx.meta[META_KEY]
    for param in ctx.command.params:
        names = {param.name, *getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())}
        if flag in names:
            source = ctx.get_parameter_source(param.name)
            return f" (key {param.name!r} of {path})" if source is not None and source.name == "DEFAULT_MAP" else None
    return None


def one_line(text: str) -> str:
    """``text`` with its white space folded to single spaces."""
    return " ".join(str(text).split())
