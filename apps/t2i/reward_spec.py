"""What ``--reward`` accepts (:func:`build_reward`, reached through :func:`.rewards.make_reward`):

- a **name** of :data:`.rewards.REWARDS`: ``vqa``, ``checker``, ``clipscore``, ``itm``, ``vqascore``,
  ``pickscore``, ``hpsv2``, ``imagereward``, ``aesthetic``, ``clipflant5`` (:mod:`.named_rewards`;
  ``--reward-weights`` is their weights directory);
- a **reward server**: ``http://HOST:PORT/PATH`` or ``https://...`` (:mod:`.remote`: JSON POST of
  prompts + base64 PNGs, answer ``{"scores": [...]}``; client options after ``#``, e.g.
  ``#timeout=120&attempts=5``);
- **your own function**: ``MODULE:FUNCTION`` (an importable module; the current directory is on the
  import path) or ``path/to/file.py:FUNCTION`` (a dotted ``FUNCTION`` such as ``Scorer.score`` reaches
  into the module). It is called once per scoring chunk as::

      fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor | Sequence[float]

  with ``images`` float [B, 3, H, W] in **[0, 1]** (RGB, on the device of the decoded samples: the CPU
  in the round loop; the app's own rewards see [-1, 1], a plug-in gets [0, 1] as image libraries
  expect) and ``prompts`` B strings; it returns B scores (a tensor of shape [B], or any sequence of
  B numbers; higher is better). Load heavy models once at import time or in a module-level object with ``__call__``.
  As for every reward (:mod:`pgraft.core.rewards`), a function that raises stops the run in one line
  naming it, and a non-finite score is refused unless ``--nonfinite-reward VALUE`` says what it counts as;
- a **weighted sum**: a comma list ``ITEM:WEIGHT,ITEM:WEIGHT`` of any of the above (``WEIGHT`` a
  decimal number, default 1; weights need not sum to 1 and may be negative), e.g.
  ``checker:0.5,clipscore:0.5`` or ``vqa:1,http://host:8000/score:0.5``. The part after the last ``:``
  is a weight only when it is a decimal number (``12``, ``0.5``, ``-1e-2``), which no Python name
  is, so ``my_module:my_function`` is a function and ``my_module:my_function:0.5`` a weighted one; in
  a URL, ``:DIGITS`` right after the host is the port (``http://host:8000`` has no weight,
  ``http://host:8000:0.5`` has). Items may not contain commas;
- a **JSON file** ``rewards.json`` holding ``{"checker": 0.5, "clipscore": 0.5}`` (keys are items as
  above, values weights), or ``{"vqa": {"weight": 1, "weights": "runs/t2i/scorer"}, "clipscore":
  {"weight": 0.5, "weights": "/models/clip"}}`` to give each component its own weights directory.

Normalisation of weighted sums (``--reward-norm``): ``raw`` sums ``weight x score``; ``zscore`` first
standardises each component within each call, ``(s - mean) / std`` over the images of the call
(population std; a component constant over the call contributes 0). The round loop scores a round's
candidates chunk by chunk (``--sample-batch-size`` images, one call each, right after sampling them),
so the z-score is **per chunk**, not per round: the whole round's candidates are never in one call.
The candidates of a group are put on one scale only when the group lies in one chunk: make
``--sample-batch-size`` a multiple of the group size M. ``--reward-norm zscore`` on a single reward
standardises it the same way.

Two round-level norms combine the raw component scores of the **whole round** once every chunk is
scored (:meth:`CombinedReward.chunk` hands each chunk's raw components to the round loop in
``Scores.components``; :attr:`CombinedReward.round_combine` is the loop's ``GraftProblem.combine``
hook, whose total replaces the chunks' rewards before selection):

- ``zscore-round``: each component standardised over the round's candidates, then weighted
  (:func:`combine_components`), whatever ``--sample-batch-size`` is;
- ``rank``: the weighted sum of each component's normalised rank within its GRS group
  (:func:`group_ranks`, in [0, 1], ties share their mean rank), so group-relative selection accepts on
  the weighted rank sum: scale-free, and one component's outliers cannot dominate.

Called directly (``pgraft t2i evaluate``, ``serve-reward``), a round-level norm takes the call as one
round of one group.

A combination is a :class:`CombinedReward`: its ``components`` say what it sums, and
:meth:`CombinedReward.with_metrics` returns, with the total, the chunk mean of each component's raw
score as ``reward_<label>_mean`` (``label``: the name, the URL's host, port and path, or
``module_function``, lower-cased with other characters as ``_``); the t2i scorer logs them in each round's metrics row (``metrics.csv``,
the round mean: the loop averages chunk metrics weighted by chunk size).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgraft.core.errors import UsageError
from pgraft.core.rewards import call_reward, finite_scores

from .remote import RemoteReward, is_url

NORMS = ("raw", "zscore", "zscore-round", "rank")
ROUND_NORMS = ("zscore-round", "rank")  # need the whole round's component scores (GraftProblem.combine)
SYNTAX = ("a name (vqa, checker, clipscore, itm, vqascore, pickscore, hpsv2, imagereward, aesthetic, clipflant5), "
          "an http(s):// reward server URL, MODULE:FUNCTION or "
          "path/to/file.py:FUNCTION, a weighted list ITEM:WEIGHT,ITEM:WEIGHT or a .json file of {ITEM: WEIGHT}")
_WEIGHT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


# ----------------------------------------------------------------------------- parsing
def split_weight(item: str) -> tuple[str, float | None]:
    """``"name:0.5"`` -> ``("name", 0.5)``; ``"module:function"`` -> (itself, None). The part after the
    last ``:`` is a weight only when it is a decimal number, and in a URL not the port (module docstring)."""
    head, sep, tail = item.rpartition(":")
    if not sep or not _WEIGHT.fullmatch(tail.strip()):
        return item, None
    if is_url(item):
        start = item.index("://") + 3
        authority = re.split(r"[/?#]", item[start:], maxsplit=1)[0]
        if len(head) < start + len(authority):  # the colon is inside HOST[:PORT][:WEIGHT]
            if re.sub(r"\[[^\]]*\]", "", authority).count(":") < 2:
                return item, None  # http://host:8000: a port, not a weight
    weight = float(tail)
    if not math.isfinite(weight):
        raise ValueError(f"reward {item!r}: the weight must be finite")
    return head.strip(), weight


@dataclass(frozen=True)
class ComponentSpec:
    """One item of a reward specification: what to build, its weight (None: not weighted) and its own
    weights directory (None: ``--reward-weights``)."""

    item: str
    weight: float | None = None
    weights: str | None = None


def parse_reward_spec(spec: str) -> list[ComponentSpec]:
    """The items of ``spec`` (module docstring); a JSON file is read here. ValueError on bad syntax."""
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty --reward; give {SYNTAX}")
    if spec.lower().endswith(".json") and "," not in spec and not is_url(spec):
        return _read_json(Path(spec).expanduser())
    items = [s.strip() for s in spec.split(",")]
    if any(not s for s in items):
        raise ValueError(f"reward {spec!r}: empty item in the comma list")
    out = [ComponentSpec(*split_weight(s)) for s in items]
    for c in out:
        if not c.item:
            raise ValueError(f"reward {spec!r}: an item has a weight but no reward")
    return out


def _read_json(path: Path) -> list[ComponentSpec]:
    if not path.is_file():
        raise ValueError(f"reward file {path} does not exist (a --reward ending in .json is a JSON file "
                         '{"checker": 0.5, "clipscore": 0.5})')
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"reward file {path} is not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'reward file {path} must hold a non-empty object {{"ITEM": WEIGHT, ...}}')
    out = []
    for item, value in data.items():
        weights = None
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"weight", "weights"})
            if unknown:
                raise ValueError(f"reward file {path}: {item!r} has unknown keys {unknown} (known: weight, weights)")
            weights = value.get("weights")
            if weights is not None and not isinstance(weights, str):
                raise ValueError(f"reward file {path}: {item!r}: weights must be a directory path string")
            value = value.get("weight", 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward file {path}: the weight of {item!r} must be a finite number, got {value!r}")
        if not isinstance(item, str) or not item.strip() or "," in item:
            raise ValueError(f"reward file {path}: bad item {item!r}")
        out.append(ComponentSpec(item.strip(), float(value), weights))
    return out


# ----------------------------------------------------------------------------- user functions
class PluginReward:
    """A user's ``fn(images in [0, 1], prompts) -> B scores`` as a RewardFn of the app (images in [-1, 1])."""

    def __init__(self, fn: Callable[..., Any], spec: str) -> None:
        self.fn, self.spec = fn, spec

    def __repr__(self) -> str:
        return f"PluginReward({self.spec!r})"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        n = len(prompts)
        out = self.fn(((images.float() + 1) / 2).clamp(0, 1), list(prompts))
        try:
            if isinstance(out, torch.Tensor):
                scores = out.detach().to("cpu", torch.float64)
            else:
                scores = torch.from_numpy(np.asarray(out, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward {self.spec}: returned a {type(out).__name__} that is not B numbers "
                             f"({' '.join(str(err).split())})") from None
        if tuple(scores.shape) != (n,):
            raise ValueError(f"reward {self.spec}: returned shape {tuple(scores.shape)} for {n} images; "
                             f"need one score per image, shape ({n},)")
        return scores


def load_plugin(spec: str) -> PluginReward:
    """``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` -> :class:`PluginReward`; ValueError naming
    ``spec`` when the import fails, the attribute is missing or it is not callable."""
    target, _, attr = spec.rpartition(":")
    target, attr = target.strip(), attr.strip()
    if not target or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"reward {spec!r}: need MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(spec, Path(target).expanduser())
    else:
        if not all(p.isidentifier() for p in target.split(".")):
            raise ValueError(f"reward {spec!r}: {target!r} is not a module name (for a file, give path/to/file.py)")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # `pgraft` is a console script: let it import the user's cwd modules
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - any failure of the user's module is reported in one line
            raise ValueError(f"reward {spec!r}: cannot import module {target!r} "
                             f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {getattr(obj, '__name__', target)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr} is a {type(obj).__name__}, not a callable "
                         "fn(images, prompts) -> scores")
    return PluginReward(obj, spec)


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: no file {path}")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"pgraft_reward_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward {spec!r}: cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001
        del sys.modules[name]
        raise ValueError(f"reward {spec!r}: importing {path} failed "
                         f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    return module


# ----------------------------------------------------------------------------- combinations
@dataclass(frozen=True)
class RewardComponent:
    """One summand of a :class:`CombinedReward`: ``weight x fn(images, prompts)`` (after normalisation);
    ``label`` names its metric ``reward_<label>_mean``."""

    label: str
    item: str
    weight: float
    fn: RewardFn


def _label(item: str) -> str:
    if is_url(item):
        item = item.split("://", 1)[1].split("#", 1)[0]
    elif ":" in item:  # module:function / path/file.py:function
        target, _, attr = item.rpartition(":")
        item = f"{Path(target).stem if target.endswith('.py') else target}_{attr}"
    return re.sub(r"[^0-9A-Za-z]+", "_", item).strip("_").lower() or "reward"


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(unbiased=False) if len(x) > 1 else x.new_zeros(())
    if not std > 1e-12 * max(1.0, float(x.abs().max())):
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def group_ranks(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The normalised rank of each score within its group, in [0, 1]: ``(r - 1) / (M - 1)`` with
    ``r`` the 1-based rank among the group's M scores (ties share their mean rank, so equal scores
    get equal ranks; a group of one gets 1/2). Shape [N] float64."""
    x = torch.as_tensor(x, dtype=torch.float64)
    out = torch.empty_like(x)
    for g in torch.unique(groups):
        idx = (groups == g).nonzero().flatten()
        v = x[idx]
        m = len(v)
        if m == 1:
            out[idx] = 0.5
            continue
        below = (v[None, :] < v[:, None]).sum(1).double()
        ties = (v[None, :] == v[:, None]).sum(1).double()
        out[idx] = (below + (ties - 1) / 2) / (m - 1)
    return out


def combine_components(components: dict[str, torch.Tensor], weights: dict[str, float], norm: str,
                       groups: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_c weights[c] * norm(components[c])`` over the scores given together:

    - ``raw``: the scores themselves;
    - ``zscore`` / ``zscore-round``: ``(s - mean) / std`` over all the scores given (population std;
      a constant component contributes 0): per chunk when given a chunk, per round when given the
      round (:meth:`CombinedReward.combine`);
    - ``rank``: :func:`group_ranks` within each group of ``groups`` (None: all one group), so
      group-relative selection accepts on the weighted rank sum of the components.
    """
    n = len(next(iter(components.values()))) if components else 0
    total = torch.zeros(n, dtype=torch.float64)
    for label, values in components.items():
        v = torch.as_tensor(values, dtype=torch.float64)
        if norm in ("zscore", "zscore-round"):
            v = _zscore(v)
        elif norm == "rank":
            v = group_ranks(v, torch.zeros(n, dtype=torch.long) if groups is None else groups)
        elif norm != "raw":
            raise ValueError(f"unknown reward normalisation {norm!r}; choose from {list(NORMS)}")
        total += weights[label] * v
    return total


class CombinedReward:
    """``sum_i weight_i * norm(component_i(images, prompts))``; ``norm`` is ``raw`` (identity),
    ``zscore`` (per call), or a round-level norm, ``zscore-round`` / ``rank`` (module docstring):
    those combine the raw :meth:`component_scores` of a whole round in :meth:`combine` (the round
    loop's ``GraftProblem.combine`` hook); called directly, they treat the call as one round of one
    group. A non-finite component score is refused naming the component, or counts as
    ``nonfinite`` when that is given (:func:`pgraft.core.rewards.finite_scores`)."""

    def __init__(self, components: Sequence[RewardComponent], norm: str = "raw",
                 nonfinite: float | None = None) -> None:
        if norm not in NORMS:
            raise ValueError(f"unknown reward normalisation {norm!r}; choose from {list(NORMS)}")
        if not components:
            raise ValueError("a combined reward needs at least one component")
        self.components, self.norm, self.nonfinite = list(components), norm, nonfinite

    def __repr__(self) -> str:
        parts = ",".join(f"{c.item}:{c.weight:g}" for c in self.components)
        return f"CombinedReward({parts!r}, norm={self.norm!r})"

    @property
    def weights(self) -> dict[str, float]:
        """label -> weight of each component."""
        return {c.label: c.weight for c in self.components}

    def component_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, float]]:
        """(``{label: raw scores [B] float64}``, ``{"reward_<label>_mean": their mean}``), after the
        non-finite rule."""
        n = len(prompts)
        scores, metrics = {}, {}
        for c in self.components:
            values = torch.as_tensor(call_reward(c.fn, c.item, images, prompts), dtype=torch.float64).detach().cpu()
            if tuple(values.shape) != (n,):
                raise ValueError(f"reward component {c.item!r} returned shape {tuple(values.shape)} for {n} images")
            scores[c.label] = finite_scores(values, c.item, self.nonfinite)
            metrics[f"reward_{c.label}_mean"] = float(scores[c.label].mean()) if n else float("nan")
        return scores, metrics

    def combine(self, components: dict[str, torch.Tensor], groups: torch.Tensor | None = None) -> torch.Tensor:
        """The total of raw ``components`` given together (a round: ``GraftProblem.combine``)."""
        return combine_components(components, self.weights, self.norm, groups)

    @property
    def round_combine(self) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None:
        """The round loop's ``GraftProblem.combine`` for a round-level norm, else None."""
        return self.combine if self.norm in ROUND_NORMS else None

    def chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, float],
                                                                          dict[str, torch.Tensor] | None]:
        """What a scorer of the round loop needs from one chunk: (total [B], metrics, raw components
        for ``Scores.components``). With a round-level norm the total is provisional (this chunk
        taken as a round of one group): :attr:`round_combine` replaces it once the round is scored;
        otherwise the components are None and the total is final."""
        scores, metrics = self.component_scores(images, prompts)
        return self.combine(scores), metrics, scores if self.norm in ROUND_NORMS else None

    def with_metrics(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """(total [B] float64, ``{"reward_<label>_mean": chunk mean of the raw component}``) of one
        scoring chunk. Refused for a round-level norm: a chunk's total would be a per-chunk one."""
        if self.norm in ROUND_NORMS:
            raise UsageError(f"--reward-norm {self.norm} normalises over the whole round: this scorer scores "
                             "chunk by chunk without passing component scores to the round (CombinedReward.chunk, "
                             "GraftProblem.combine); use --reward-norm zscore for a per-chunk z-score")
        scores, metrics = self.component_scores(images, prompts)
        return self.combine(scores), metrics

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(self.component_scores(images, prompts)[0])


# ----------------------------------------------------------------------------- building
def build_item(item: str, weights: str | Path | None = None, device: str | torch.device = "cpu") -> RewardFn:
    """One unweighted item: a registered name, a reward server URL or a user's function."""
    from .rewards import REWARDS

    if is_url(item):
        return RemoteReward(item)
    if "://" in item:
        raise ValueError(f"reward {item!r}: only http:// and https:// reward servers are supported")
    if item in REWARDS:
        return REWARDS[item](weights, device)
    if ":" in item:
        if item.rpartition(":")[0].strip() in REWARDS:
            raise ValueError(f"reward {item!r}: the weight after ':' must be a decimal number such as 0.5")
        return load_plugin(item)
    if item.lower().endswith(".json"):
        raise ValueError(f"reward {item!r}: a JSON reward file must be the whole --reward, not an item of a list")
    raise ValueError(f"unknown reward {item!r}; choose from {sorted(REWARDS)}, or give {SYNTAX}")


def build_reward(spec: str, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 norm: str = "raw", nonfinite: float | None = None) -> RewardFn:
    """The RewardFn of a ``--reward`` specification (module docstring): the item itself when ``spec``
    is one unweighted item and ``norm`` is raw, else a :class:`CombinedReward`."""
    if norm not in NORMS:
        raise ValueError(f"unknown reward normalisation {norm!r}; choose from {list(NORMS)}")
    parts = parse_reward_spec(spec)
    if len(parts) == 1 and parts[0].weight is None and parts[0].weights is None and norm == "raw":
        return build_item(parts[0].item, weights, device)
    labels: dict[str, int] = {}
    components = []
    for p in parts:
        label = _label(p.item)
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f"{label}_{labels[label]}"
        fn = build_item(p.item, p.weights if p.weights is not None else weights, device)
        components.append(RewardComponent(label, p.item, 1.0 if p.weight is None else p.weight, fn))
    return CombinedReward(components, norm, nonfinite)


__all__ = ["build_reward", "build_item", "parse_reward_spec", "split_weight", "load_plugin", "PluginReward",
           "CombinedReward", "RewardComponent", "ComponentSpec", "NORMS", "ROUND_NORMS", "SYNTAX", "group_ranks",
           "combine_components"]
