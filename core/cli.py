"""Command-line flags shared by every app's ``train`` command (typer), and their mapping to
:class:`~pgraft.core.trainer.GraftConfig`. Apps declare ``rule: opts.Rule = "topk"`` etc., so the
flags read the same in ``pgraft toy train`` and ``pgraft molecule train``.

The short flags ``--m``, ``--k`` and ``--t`` have long aliases (``--group-size``, ``--top-k``,
``--split``): launchers such as torchrun abbreviate-match ``--m``/``--t`` against their own
options, so multi-process command lines must use the long names."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional, get_type_hints

import typer
from rich.markup import escape

from .errors import FieldError, RunError, UsageError
from .grs import RULES, GRSConfig
from .pretrain import TrainingInterrupted
from .progress import make_console
from .shipped import BaseDamaged
from .targets import Lacks, Target, resolve_target, shipped_outputs
from .trainer import GraftConfig

PANEL = "GRAFT / P-GRAFT rounds"
Rule = Annotated[str, typer.Option(help=f"GRS acceptance rule: {', '.join(sorted(RULES))}.",
                                   rich_help_panel=PANEL)]
Alpha = Annotated[float, typer.Option(help="Temperature α of rejection sampling (accept ∝ exp(r/α)).",
                                      rich_help_panel=PANEL)]
K = Annotated[int, typer.Option("--k", "--top-k", help="K of Top-K: samples kept per group of M.", rich_help_panel=PANEL)]
M = Annotated[int, typer.Option("--m", "--group-size", help="M: candidates per group (BoN's N).", rich_help_panel=PANEL)]
Groups = Annotated[int, typer.Option(help="Groups sampled per round (candidates per round = groups × M).",
                                     rich_help_panel=PANEL)]
Threshold = Annotated[float, typer.Option(help="Reward threshold τ for --rule threshold.", rich_help_panel=PANEL)]
RewardMax = Annotated[Optional[float], typer.Option(
    "--reward-max", help="Upper bound of the reward, known before sampling, for --rule rs: accept with probability "
                         "exp((r - bound)/α), exact rejection sampling (a reward above it stops the run). Default: the "
                         "bound the app declares for the chosen --reward, if any. 'inf' (or no declared bound): the "
                         "round's best reward is the bound, which always keeps the best candidate and biases the "
                         "accepted law below exp(r/α) (docs/derivations.md); runs made before this flag used it, so "
                         "resume one with --reward-max inf.", show_default=False, rich_help_panel=PANEL)]
Dedup = Annotated[bool, typer.Option("--dedup/--no-dedup", help="Keep one copy of each distinct accepted sample.",
                                     rich_help_panel=PANEL)]
T = Annotated[float, typer.Option("--t", "--split", help="P-GRAFT split: fraction of sampler steps left to the frozen base "
                                             "(0 = plain GRAFT, 0.25 = fine-tune the first 75% of steps).",
                                  rich_help_panel=PANEL)]
Rounds = Annotated[int, typer.Option(help="GRAFT rounds (sample → accept → fine-tune).", rich_help_panel=PANEL)]
TrainSteps = Annotated[int, typer.Option(help="Optimizer steps per round.", rich_help_panel=PANEL)]
BatchSize = Annotated[int, typer.Option(help="Training batch size (pretraining, or fine-tuning in GRAFT rounds).")]
LR = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
Lora = Annotated[int, typer.Option("--lora", help="LoRA rank (0 = full fine-tune).", rich_help_panel=PANEL)]
Replay = Annotated[bool, typer.Option(help="Train on every accepted sample so far, not just this round's.",
                                      rich_help_panel=PANEL)]
Anchor = Annotated[float, typer.Option(help="Weight of the trust region around the frozen base: mean squared "
                                              "difference of head and base outputs at the training inputs (0 = off).",
                                         rich_help_panel=PANEL)]
Seed = Annotated[int, typer.Option(help="Seed for sampling, acceptance and training.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last intact checkpoint. "
                                      "Only --rounds (to extend), --lr and --train-steps may differ from the saved "
                                      "config.")]
Out = Annotated[Path, typer.Option("--out", help="Run directory (config, store, metrics, checkpoints).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
Device = Annotated[str, typer.Option(help="Where to run: auto (the GPU when torch sees one), cpu, cuda or cuda:N.")]


# GraftConfig / GRSConfig field -> the flag a user types, for error messages
FLAGS = {"rounds": "--rounds", "groups": "--groups", "group_size": "--m", "batch_size": "--batch-size",
         "train_steps": "--train-steps", "lora_rank": "--lora", "split": "--t", "k": "--k", "lr": "--lr",
         "anchor": "--anchor", "alpha": "--alpha", "threshold": "--threshold", "rule": "--rule", "seed": "--seed",
         "sample_batch_size": "--sample-batch-size", "bound": "--reward-max", "reward_max": "--reward-max"}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; returns the ``typer.Exit(code)`` to raise."""
    make_console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code)


def run_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands, the error boundary of one command: a refusal
    (:class:`~pgraft.core.errors.RunError`: bad input, a locked or damaged run directory, a
    non-finite loss) prints one line and exits with its code (2 for usage errors, 1 otherwise); a
    stop by SIGTERM / Ctrl-C prints how to resume and exits with 128 + the signal number; anything
    else is unexpected and prints one line too (:func:`unexpected`; the traceback with
    ``PGRAFT_DEBUG=1``)."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FieldError as err:  # a config's check: name the flag the user typed (or the --config key)
            raise fail(f"Invalid value for {file_hint(flag_of(err))}: {err.detail}", err.exit_code) from None
        except RunError as err:
            raise fail(str(err), err.exit_code) from None
        except TrainingInterrupted as err:
            raise typer.Exit(stop_status(err)) from None  # the message is already printed
        except typer.BadParameter as err:  # raised in the body: name the --config key if the value came from it
            err.param_hint = file_hint(err.param_hint)
            raise
        except (typer.Exit, *CLICK_EXITS, *CLICK_ERRORS, *CLICK_ABORTS):
            raise
        except Exception as err:  # noqa: BLE001 - the boundary: one line, the traceback on request
            raise unexpected(err) from None

    command._pgraft_boundary = True
    return command


def flag_of(err: FieldError) -> str:
    """The flag a :class:`~pgraft.core.errors.FieldError` is about: the one it names (``flag``), the
    shared GRAFT flags' (:data:`FLAGS`), else ``--field-name``."""
    return err.flag or FLAGS.get(err.field) or "--" + err.field.replace("_", "-")


def _click_exception_modules() -> list[Any]:
    """click's exception modules: typer's own copy of click (typer >= 0.20 vendors it) and click."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            pass
    return modules


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    return tuple(getattr(m, name) for m in _click_exception_modules() if hasattr(m, name))


CLICK_ERRORS = _click_classes("ClickException")  # usage errors of the option parser: they name the flag
CLICK_ABORTS = _click_classes("Abort")
CLICK_EXITS = _click_classes("Exit")


DEBUG_HINT = "rerun with PGRAFT_DEBUG=1 for the traceback"


def one_line(err: BaseException) -> str:
    """The message of ``err`` folded to one line (an OSError as ``file: reason``)."""
    if isinstance(err, OSError) and err.filename is not None:
        names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        text = f"{names}: {err.strerror or type(err).__name__}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())[:500]


def stop_status(err: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by a signal, as a shell reports a killed process: 128 +
    the signal number (:class:`~pgraft.core.pretrain.TrainingInterrupted` carries it; a bare Ctrl-C
    is SIGINT, 2)."""
    return 128 + (getattr(err, "signum", None) or 2)


def script_boundary(main: Callable[[], Any]) -> int:
    """The error boundary of a script outside the ``pgraft`` command (``benchmarks/*.py``): returns
    ``main()``'s exit status (0 when it returns something other than an int), or, for a refusal
    (:class:`~pgraft.core.errors.RunError`), its one ``error:`` line and code; for a stop by SIGTERM
    / Ctrl-C, one ``stopped:`` line and 128 + the signal number, as a shell reports a killed
    process. Use as ``sys.exit(script_boundary(main))``."""
    try:
        status = main()
    except RunError as err:
        return fail(str(err), err.exit_code).exit_code
    except KeyboardInterrupt as err:
        make_console(stderr=True).print("stopped: what was finished is kept; rerun the same command to go on",
                                        highlight=False, soft_wrap=True, markup=False)
        return stop_status(err)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def unexpected(err: BaseException) -> typer.Exit:
    """An exception no refusal anticipated: one line ``error: <message> (<type>; rerun with
    PGRAFT_DEBUG=1 for the traceback)`` and exit code 1; with ``PGRAFT_DEBUG`` set in the
    environment the traceback is printed first. Returns the ``typer.Exit`` to raise."""
    import os
    import traceback

    if os.environ.get("PGRAFT_DEBUG", "") not in ("", "0"):
        traceback.print_exception(err)
        return fail(f"{one_line(err)} ({type(err).__name__})", 1)
    return fail(f"{one_line(err)} ({type(err).__name__}; {DEBUG_HINT})", 1)


def base_only(app: str, ships: bool = True):
    """The ``--base`` option of an app's ``sample`` / ``evaluate``: a base sampled alone, no DIR then
    (see :mod:`pgraft.core.targets`)."""
    shipped = (f"'shipped' (the base shipped with pgraft; outputs in {shipped_outputs(app)}/ unless --out) or "
               if ships else "")
    return Annotated[Optional[str], typer.Option("--base", help=f"The plain base alone (no head, no split), "
                                                                f"instead of a directory argument: {shipped}a base "
                                                                "directory (outputs go inside it).")]


def sample_target(path: Path | None, base: str | None, app: str, *, lacks_run: Lacks, lacks_base: Lacks,
                  shipped: Path | None, argument: str = "RUN_DIR", run_kind: str | None = None,
                  make_hint: str | None = None) -> Target:
    """:func:`pgraft.core.targets.resolve_target` for a command's ``[DIR] [--base]``; a refusal is a
    usage error naming the argument (one line), as a bad ``--base`` of ``train`` is. An app calls it
    through its contract, :meth:`pgraft.core.app.App.sample_target`."""
    hint = "--base" if base is not None and path is None else argument
    with bad_parameter(BaseDamaged, UsageError, param_hint=hint):
        return resolve_target(path, base, app, lacks_run=lacks_run, lacks_base=lacks_base, shipped=shipped,
                              run_kind=run_kind, make_hint=make_hint)


def app_base(app: Any, value: str | Path, preset: Any = None) -> Path:
    """``app.resolve_base(value, preset)`` (:class:`pgraft.core.app.App`) inside a command: a refusal
    is a usage error naming the app's base flag (one line)."""
    with bad_parameter(BaseDamaged, UsageError, param_hint=app.flag):
        return app.resolve_base(value, preset)


@contextlib.contextmanager
def bad_parameter(*errors: type[BaseException], param_hint: str | None = None) -> Iterator[None]:
    """Inside a command: turn ``errors`` (default ValueError and FileNotFoundError) raised in the
    block into a usage error that names ``param_hint`` (one line, exit 2)::

        with opts.bad_parameter(param_hint="--base"):
            base = resolve_base(base, SHIPPED_BASE)
    """
    errors = errors or (ValueError, FileNotFoundError)
    try:
        yield
    except errors as err:
        if isinstance(err, RunError) and not any(issubclass(e, RunError) for e in errors):
            raise  # a refusal with its own message (a reward that failed, a field error naming its flag)
        raise typer.BadParameter(str(err), param_hint=param_hint) from err


def output_file(value: Path | None) -> Path | None:
    """typer callback of an output file flag (``--out x.csv``): refused before any work when it
    names a directory or sits in a folder that does not exist (None: the command's default)."""
    if value is None:
        return None
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a directory; give a file path (e.g. {value / 'out.csv'})")
    if not value.parent.is_dir():
        raise typer.BadParameter(f"the folder {value.parent} of {value} does not exist; create it first")
    return value


def check_choice(value: str, choices, what: str, param_hint: str) -> None:
    """A usage error naming ``param_hint`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise typer.BadParameter(f"unknown {what} {value!r}; choose one of {sorted(choices)}", param_hint=param_hint)


def device_option(name: str):
    """Resolve a ``--device`` value (see :func:`pgraft.core.state.resolve_device`); bad values are
    reported as a usage error naming the flag."""
    from .state import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--device") from err


def print_row(row: dict[str, Any], title: str) -> None:
    """Print one metric row (name -> value) as a two-column rich table."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in row.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    make_console().print(table)


# name -> (annotation, default) of every flag that maps onto GraftConfig; apps override defaults
GRAFT_FLAGS: dict[str, tuple[Any, Any]] = {
    "rule": (Rule, "topk"), "alpha": (Alpha, 1.0), "k": (K, 2), "m": (M, 8), "groups": (Groups, 64),
    "threshold": (Threshold, 0.0), "dedup": (Dedup, False), "t": (T, 0.0), "rounds": (Rounds, 5),
    "train_steps": (TrainSteps, 100), "batch_size": (BatchSize, 64), "lr": (LR, 1e-4), "lora": (Lora, 0),
    "replay": (Replay, False), "anchor": (Anchor, 0.0), "seed": (Seed, 0), "reward_max": (RewardMax, None),
}


def rs_bound(rule: str, reward_max: float | None) -> float | None:
    """``GRSConfig.bound`` from ``--reward-max``: the value for ``--rule rs`` (None for every other
    rule, which ignores it, so their configs stay as before), None for ``inf`` (no bound known: the
    batch-max approximation); a usage error naming the flag for nan or -inf."""
    if reward_max is None or rule != "rs":
        return None
    if math.isnan(reward_max) or reward_max == -math.inf:
        raise typer.BadParameter(f"must be a number (or inf for no bound), got {reward_max}", param_hint="--reward-max")
    return None if reward_max == math.inf else float(reward_max)


def graft_config(*, rounds: int, groups: int, m: int, rule: str, alpha: float, k: int, threshold: float,
                 dedup: bool, t: float, train_steps: int, batch_size: int, lr: float, lora: int,
                 replay: bool, seed: int, anchor: float = 0.0, sample_batch_size: int = 256,
                 reward_max: float | None = None) -> GraftConfig:
    """Build the core config from the shared flags, turning ValueErrors into usage errors that name
    the flag typed (``--m``, not ``group_size``). ``reward_max`` becomes ``GRSConfig.bound`` for
    ``--rule rs`` (:func:`rs_bound`)."""
    try:
        bound = rs_bound(rule, reward_max)  # None for rs: the round loop says it approximates (when it starts)
        return GraftConfig(rounds=rounds, groups=groups, group_size=m,
                           grs=GRSConfig(rule=rule, alpha=alpha, k=k, threshold=threshold, bound=bound), dedup=dedup,
                           split=t, train_steps=train_steps, batch_size=batch_size, lr=lr, lora_rank=lora,
                           replay=replay, anchor=anchor, seed=seed, sample_batch_size=sample_batch_size)
    except FieldError as err:  # GraftConfig's and GRSConfig's checks name their field
        raise typer.BadParameter(err.detail, param_hint=FLAGS.get(err.field, err.field)) from None
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def graft_options(*, fixed: dict[str, Any] | None = None, sample_batch_size: int = 256,
                  reward_max: float | Mapping[str, float] | Callable[[dict[str, Any]], float | None] | None = None,
                  **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an app's ``train`` command: appends the shared GRAFT flags (:data:`GRAFT_FLAGS`,
    with this app's ``defaults``) to the command's options and calls it with one ``graft:
    GraftConfig`` argument built from them. ``fixed`` pins flags the app does not expose
    (e.g. ``{"dedup": False}``); the command may then declare a flag of the same name itself.
    ``reward_max``: the reward's declared upper bound, used for ``--rule rs`` when ``--reward-max``
    is not given: a number, a table ``{reward name: bound}`` looked up by the command's
    ``--reward`` (a name not in it: no bound known), or a function of the command's other arguments
    returning a bound or None. It must be a true bound of the reward::

        @app.command("train")
        @opts.graft_options(rule="bon", m=16, t=0.1, reward_max=REWARD_MAX)  # {"qed": 1.0, ...}
        def train_cmd(graft: GraftConfig, out: opts.Out = Path("runs/x"), ...) -> None: ...
    """
    fixed = dict(fixed or {})
    declared = reward_max
    unknown = (set(defaults) | set(fixed)) - set(GRAFT_FLAGS)
    if unknown:
        raise ValueError(f"unknown GRAFT flags {sorted(unknown)}; known: {sorted(GRAFT_FLAGS)}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "graft"]
        clash = {p.name for p in own} & (set(GRAFT_FLAGS) - set(fixed))
        if clash:
            raise ValueError(f"{fn.__name__} declares shared GRAFT flags itself: {sorted(clash)}")
        flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=defaults.get(name, d))
                 for name, (ann, d) in GRAFT_FLAGS.items() if name not in fixed]

        @functools.wraps(fn)
        @run_errors
        def command(**kwargs: Any) -> Any:
            values = {**fixed, **{name: kwargs.pop(name) for name in GRAFT_FLAGS if name not in fixed}}
            if values.get("reward_max") is None and declared is not None:
                values["reward_max"] = (declared.get(kwargs["reward"]) if isinstance(declared, Mapping)
                                        else declared(kwargs) if callable(declared) else declared)
            return fn(graft=graft_config(**values, sample_batch_size=sample_batch_size), **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + flags
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# ----------------------------------------------------------------------------- config file, trackers
def _config_callback(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """Eager callback of ``--config``: the file's keys become the command's defaults
    (:func:`pgraft.core.config_file.apply_config_file`)."""
    from .config_file import apply_config_file

    apply_config_file(ctx, value)
    return value


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", is_eager=True, callback=_config_callback, show_default=False,
    help="YAML file of this command's flags (keys: the flag names with _ for -, e.g. rounds: 4, train_steps: 50, "
         "m: 8; a mapping value is a section of such keys); flags typed on the command line override it.")]


def _log_with_callback(value: str) -> str:
    from .trackers import check_backend

    with bad_parameter(UsageError):
        return check_backend(value)


LogWith = Annotated[str, typer.Option(
    "--log-with", callback=_log_with_callback,
    help="Experiment tracker of the metrics rows (and the image grids the app writes): none, tensorboard "
         "(RUN/trackers/tensorboard) or wandb (RUN/trackers/wandb; WANDB_MODE=offline works without network); "
         "needs pip install -e '.[trackers]'.")]


def _with_option(fn: Callable[..., Any], name: str, annotation: Any, default: Any,
                 body: Callable[[Callable[..., Any], Any, dict[str, Any]], Any]) -> Callable[..., Any]:
    """``fn`` (a typer command, possibly from :func:`graft_options`) with one more keyword option
    ``name``; the new command calls ``body(fn, value, kwargs)``."""
    hints = get_type_hints(fn, include_extras=True)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
              for p in inspect.signature(fn).parameters.values()]
    params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default))

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return body(fn, kwargs.pop(name), kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return run_errors(command) if not getattr(fn, "_pgraft_boundary", False) else command


def config_file(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator giving a command ``--config FILE`` (:mod:`pgraft.core.config_file`): every flag of
    the command may be given in the YAML file, checked as the flag is; the command line wins::

        @app.command("train")
        @opts.config_file
        @opts.graft_options(...)
        def train_cmd(graft: GraftConfig, ...) -> None: ...
    """
    return _with_option(fn, "config", ConfigFile, None, lambda inner, _, kwargs: inner(**kwargs))


def trackers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator giving a round-loop command (one with ``out`` and ``resume``) ``--log-with``: the
    body runs inside :func:`pgraft.core.trackers.tracking` for ``--out``, so the round loop logs
    every metrics row (and the app's image grids) to the tracker, on the main process."""
    from .trainer import is_main_process

    def body(inner: Callable[..., Any], log_with: str, kwargs: dict[str, Any]) -> Any:
        from .trackers import tracking

        with tracking(log_with, kwargs["out"], main=is_main_process()):
            return inner(**kwargs)

    return _with_option(fn, "log_with", LogWith, "none", body)


def file_hint(hint: Any) -> Any:
    """A flag name (``param_hint``) with `` (key 'k' of run.yaml)`` appended when its value came
    from the command's ``--config`` file; unchanged otherwise."""
    from .config_file import file_source

    where = file_source(hint) if isinstance(hint, str) else None
    return hint + where if where else hint


# ----------------------------------------------------------------------------- diagnose
# The options every app's ``diagnose`` command shares (see :mod:`pgraft.core.diagnose`).
def at_least(minimum: int) -> Callable[[int], int]:
    """typer callback of a count flag: a value below ``minimum`` is a usage error naming the flag
    (``callback=opts.at_least(1)``), not a failure deep inside a sampler."""

    def check(value: int) -> int:
        if value < minimum:
            raise typer.BadParameter(f"must be at least {minimum}, got {value}")
        return value

    return check


TGrid = Annotated[str, typer.Option("--t", help="Split times to diagnose: a comma list of values in (0, 1], each "
                                                "the fraction of sampler steps left to the frozen base (train's --t; "
                                                "1 = X_T).")]
States = Annotated[int, typer.Option("--states", help="n: states X_t drawn per t with the base (T→t).",
                                     callback=at_least(2))]
Tails = Annotated[int, typer.Option("--tails", help="K: independent base tails t→0 scored from each state.",
                                    callback=at_least(2))]
DiagnoseBatch = Annotated[int, typer.Option("--batch", help="Rows per sampler call.", callback=at_least(1))]
DiagnoseOut = Annotated[Path, typer.Option("--out", help="Folder for diagnose.csv (the table) and diagnose.png.")]
ProbeSteps = Annotated[int, typer.Option(
    "--train-steps", callback=at_least(0),
    help="Budget-aware recommendation: the optimizer steps per round you will train with (0 = off). A learning probe "
         "then runs, at t = 0 and each --t: one round of candidates from the base (--groups × --m), accepted by the "
         "rule, a head (LoRA of rank --lora when > 0, as train's) fine-tuned N steps on the accepted X_t with train's "
         "batch size and lr, and the head's paired "
         "reward shift over the base divided by its target's (a fresh base tail per X_t): the progress. Predicted "
         "one-round gain = G0 × kept(t) × progress(t, N) (G0: GRAFT's ideal gain); prints that table (probe.csv) and "
         "the t of largest predicted gain.")]
DIAGNOSE_GRID = "0.1,0.25,0.5,0.75,0.9"
DIAGNOSE_HELP = ("Which P-GRAFT split --t to train with, from the base alone (n states × K base tails per t, 95% "
                 "intervals): the share R²(t) of the reward's variance that X_t already decides, and the kept share: "
                 "the share of GRAFT's per-round reward gain that P-GRAFT keeps at t under the GRS rule given by "
                 "--rule/--m/--k/--alpha/--threshold/--reward-max/--groups (train's defaults), estimated by simulating "
                 "that rule on the states × tails (assumes perfect learning of the accepted X_t, one round, acceptance "
                 "decided by the reward alone; R² equals it only where the mean of E(r | X_t) given r is linear in r). Recommends "
                 "the largest t whose kept-share lower bound is >= 0.5 (R²'s when no kept share can be estimated). With "
                 "--train-steps N the recommendation is budget-aware: a learning probe measures how far N fine-tuning "
                 "steps take the head toward its target at each t, and the t of largest predicted gain G0 × kept × "
                 "progress is recommended.")
# the GRAFT flags a diagnose command does not take (the rule's flags stay: the kept share uses them)
DIAGNOSE_FIXED = {"dedup": False, "t": 0.0, "rounds": 1, "train_steps": 0, "batch_size": 1, "lr": 1e-4,
                  "replay": False, "anchor": 0.0, "seed": 0}


def diagnose_options(*, probe: bool = True, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an app's ``diagnose`` command: :func:`graft_options` with only the GRS rule's
    flags (``--rule --m --k --alpha --threshold --reward-max --groups``; pass the app's train
    defaults, ``reward_max`` included) and, when the command has the learning probe (``probe``:
    its ``--train-steps``), ``--lora`` for the probe's head; the command gets ``graft:
    GraftConfig`` and hands it to :func:`diagnose` as ``rule``. ``--lora`` without ``--train-steps``
    is refused here, before the command loads (or pretrains) a base."""
    options = graft_options(fixed=DIAGNOSE_FIXED if probe else {**DIAGNOSE_FIXED, "lora": 0}, **defaults)
    if not probe:
        return options

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def checked(*, graft: GraftConfig, **kwargs: Any) -> Any:
            check_probe_lora(graft, kwargs.get("train_steps", 0))
            return fn(graft=graft, **kwargs)

        return options(checked)

    return decorate


def check_probe_lora(rule: GraftConfig | None, train_steps: int) -> None:
    """``--lora`` sets the learning probe's head: a usage error without ``--train-steps N > 0``."""
    if rule is not None and rule.lora_rank > 0 and train_steps == 0:
        raise typer.BadParameter("sets the learning probe's LoRA head, which runs with --train-steps N > 0",
                                 param_hint="--lora")


def t_grid(text: str) -> list[float]:
    """A ``--t`` grid (comma list in (0, 1]); a bad value is a usage error naming ``--t``."""
    from .diagnose import parse_grid

    with bad_parameter(ValueError, param_hint="--t"):
        return parse_grid(text)


def diagnose(problem: Any, base: Any, grid: list[float], *, states: int, tails: int, seed: int, batch: int,
             out: Path, quiet: bool, rule: GraftConfig | None = None, train_steps: int = 0,
             probe: dict[str, Any] | None = None) -> Any:
    """The shared body of ``pgraft <app> diagnose``: :func:`pgraft.core.diagnose.run_diagnose`;
    ``rule`` (from :func:`diagnose_options`): the GRS rule of the kept share. ``train_steps`` > 0
    (``--train-steps``) adds the budget-aware recommendation: the learning probe fine-tunes with
    the rule and the app's train settings ``probe`` (``batch_size``, ``lr``, ...: GraftConfig fields)."""
    import dataclasses

    from .diagnose import run_diagnose

    train = None
    if train_steps > 0:
        train = dataclasses.replace(rule if rule is not None else GraftConfig(), train_steps=train_steps,
                                    **(probe or {}))
    return run_diagnose(problem, base, grid, states, tails, seed, batch, out, show_progress=not quiet, rule=rule,
                        train=train)
