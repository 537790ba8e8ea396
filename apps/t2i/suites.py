"""Evaluation suites of ``pgraft t2i evaluate --suite NAME``: a prompt set with its categories and the
field's sampling protocol, scored by every reward at hand (the reward-hacking panel).

A :class:`Suite` fixes what a benchmark's protocol fixes: the prompts (shipped, or the user's copy read
by the suite's reader), images per prompt, the seed, and the protocol's reference resolution, guidance
and step count. pgraft samples a pipeline at its own resolution and a run with its own sampler, so the
last three are recorded in ``suite.json`` and printed beside the results, not imposed.

The panel: the same images are scored by the training reward (the run's ``--reward`` unless one is
given), by each ``--panel`` entry (``name=WEIGHTS_DIR`` of :data:`~.rewards.REWARDS`, ``label=URL`` of a
reward server such as ``servers/geneval``, or a bare weight-free name) and by what needs no weights: the
exact checker and the shipped learned scorer, on prompts of the shapes world's grammar. Evaluating a
run also samples its base with the same seeds (paired noise), so each reward's change from base to
fine-tuned is read off one table: a gain on the training reward beside losses on the others is the
signature of reward hacking.

Per category (the suite's categories; "all" for prompts without one), every reward's mean over the
images; ``overall`` is the mean of the category means (GenEval's convention: each category weighs the
same). With the checker (shapes) or a GenEval server scoring 0/1 (geneval), these means are GenEval's
per-category accuracies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pgraft.core.errors import UsageError

from .prompts import PromptSet, load_benchmark_prompts, load_prompts, plain_category
from .world import CATEGORIES

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
NO_CATEGORY = "all"


def genai_skill(record: dict) -> str | None:
    """GenAI-Bench's split of a record: ``advanced`` when it lists advanced skills (counting, comparison,
    differentiation, negation, universality), else ``basic`` when it lists skills, else its category."""
    lower = {str(k).lower(): v for k, v in record.items()}
    for key in ("advanced_skills", "advanced"):
        if lower.get(key):
            return "advanced"
    if any(k in lower for k in ("basic_skills", "basic", "advanced_skills", "advanced")):
        return "basic"
    return plain_category(record)


@dataclass(frozen=True)
class Suite:
    """A benchmark's protocol. ``prompts``: a registered prompt set (:data:`~.prompts.PROMPT_SETS`), or
    None when the user supplies the file (``--prompts PATH``, read by ``reader``); ``expected``: the
    protocol's prompt count (a copy of another size is evaluated with a warning); ``resolution`` /
    ``guidance`` / ``n_steps``: the protocol's reference values (None: the model's own), recorded, not
    imposed; ``headline``: the panel label whose per-category means the suite reports first (None: the
    training reward); ``get``: where the prompts come from; ``licence``: why they ship or not."""

    name: str
    description: str
    prompts: str | None
    expected: int | None
    per_prompt: int
    seed: int
    resolution: int | None
    guidance: float | None
    n_steps: int | None
    headline: str | None
    reports: str
    get: str
    licence: str
    reader: Callable[[Path], PromptSet] = field(default=load_benchmark_prompts, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The protocol as ``suite.json`` keeps it."""
        out = asdict(self)
        del out["reader"]
        return out

    def load(self, path: str | None) -> PromptSet:
        """The suite's prompts: ``path`` (the user's copy, or another prompt set) when given, else the
        shipped set; a suite that ships none refuses in one line saying where to get it."""
        if path is None and self.prompts is None:
            raise UsageError(f"--suite {self.name} needs your copy of its prompts: --prompts PATH "
                             f"(get it from {self.get}; not shipped: {self.licence})")
        if self.prompts is not None:
            return load_prompts(path or self.prompts)  # a set name (e.g. shapes on `all`) or a file
        return self.reader(Path(path))


SUITES: dict[str, Suite] = {
    "shapes": Suite(
        "shapes", "the embedded shapes world's held-out prompts, judged by the exact checker",
        prompts="heldout", expected=None, per_prompt=4, seed=2, resolution=None, guidance=None, n_steps=None,
        headline="checker", reports="per-category accuracy of the exact checker (GenEval's six categories)",
        get="pgraft itself (the world grammar's held-out split)", licence="pgraft's own"),
    "geneval": Suite(
        "geneval", "GenEval (Ghosh et al. 2023): 553 prompts in six categories, 4 images each",
        prompts="geneval", expected=553, per_prompt=4, seed=42, resolution=512, guidance=None, n_steps=None,
        headline="geneval", reports="per-category GenEval accuracy: a GenEval server in --panel "
                                    "(geneval=http://HOST:PORT/, servers/geneval)",
        get="djghosh13/geneval prompts/evaluation_metadata.jsonl", licence="MIT, shipped"),
    "drawbench": Suite(
        "drawbench", "DrawBench (Saharia et al. 2022, Imagen): 200 prompts in 11 categories",
        prompts=None, expected=200, per_prompt=1, seed=42, resolution=None, guidance=None, n_steps=None,
        headline=None, reports="mean of each reward per category (ImageReward, PickScore, HPSv2... via --panel)",
        get="the DrawBench sheet linked from imagen.research.google, exported as CSV (Prompts, Category)",
        licence="released without a licence that allows redistribution"),
    "genai-bench": Suite(
        "genai-bench", "GenAI-Bench (Li, Lin et al. 2024): 1600 prompts, basic and advanced skills",
        prompts=None, expected=1600, per_prompt=1, seed=42, resolution=None, guidance=9.0, n_steps=50,
        headline=None, reports="mean VQAScore (--reward vqascore or --panel vqascore=DIR) on basic / advanced",
        get="genai_image.json of the GenAI-Bench dataset (linzhiqiu/t2v_metrics, genai_bench/)",
        licence="its licence could not be checked offline, so it is not redistributed", reader=lambda p:
        load_benchmark_prompts(p, genai_skill)),
    "ocr": Suite(
        "ocr", "Flow-GRPO's OCR test prompts: text to render between double quotes",
        prompts=None, expected=None, per_prompt=1, seed=42, resolution=512, guidance=None, n_steps=None,
        headline="ocr", reports="mean OCR reward, 1 - normalised edit distance: an OCR server in --panel "
                                "(ocr=http://HOST:PORT/, servers/ocr)",
        get="dataset/ocr/test.txt of yifan123/flow_grpo", licence="not bundled with pgraft (no copy here)"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]


# ----------------------------------------------------------------------------- the panel
@dataclass(frozen=True)
class PanelEntry:
    """One reward of the panel: ``label`` (its column), ``role`` (``training`` or ``panel``), ``fn``."""

    label: str
    role: str
    fn: RewardFn = field(repr=False, compare=False)


def parse_panel(spec: str | None) -> list[tuple[str, str | None]]:
    """``--panel`` as (label or reward name, weights dir / URL / None): ``name=DIR,label=URL,name``."""
    out: list[tuple[str, str | None]] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        label, sep, value = item.partition("=")
        label, value = label.strip(), value.strip()
        if not label or (sep and not value):
            raise UsageError(f"--panel entry {item!r}: expected NAME, NAME=WEIGHTS_DIR or LABEL=http://HOST:PORT/")
        out.append((label, value or None))
    labels = [label for label, _ in out]
    if len(set(labels)) < len(labels):
        raise UsageError(f"--panel names {sorted({x for x in labels if labels.count(x) > 1})[0]!r} twice")
    return out


def build_panel(training: PanelEntry, spec: str | None, in_grammar: bool, device: str = "cpu",
                make: Callable[..., RewardFn] | None = None, shipped_scorer: str | None = None) -> list[PanelEntry]:
    """The training reward, each ``--panel`` entry, then the weight-free rewards that apply (the exact
    checker and the shipped learned scorer ``vqa`` on in-grammar prompts) not already listed."""
    from .remote import is_url
    from .rewards import REWARDS, make_reward

    make = make or make_reward
    if not in_grammar and "checker" in [training.label] + [label for label, _ in parse_panel(spec)]:
        raise UsageError("the exact checker scores only prompts of the shapes world's grammar, and these are "
                         "not: choose another --reward (and --panel)")
    entries = [training]
    for label, value in parse_panel(spec):
        if value is not None and is_url(value):
            fn = make(value)
        elif label in REWARDS:
            fn = make(label, value, device)
        else:
            raise UsageError(f"--panel {label!r}: not a reward name ({', '.join(REWARDS)}) and not "
                             f"LABEL=http://HOST:PORT/ (a reward server)")
        entries.append(PanelEntry(label, "panel", fn))
    if in_grammar:
        automatic = [("checker", None)] + ([("vqa", shipped_scorer)] if shipped_scorer else [])
        for label, weights in automatic:
            if label not in {e.label for e in entries}:
                entries.append(PanelEntry(label, "panel", make(label, weights, device)))
    return entries


# ----------------------------------------------------------------------------- scoring and tables
def score_images(images: torch.Tensor, prompts: Sequence[str], categories: Sequence[str | None],
                 entries: Sequence[PanelEntry], model: str) -> pd.DataFrame:
    """One row per image: model, prompt, category, then each panel reward's score."""
    df = pd.DataFrame({"model": model, "prompt": list(prompts),
                       "category": [c if c is not None else NO_CATEGORY for c in categories]})
    for entry in entries:
        scores = torch.as_tensor(entry.fn(images, list(prompts))).double().reshape(-1)
        if len(scores) != len(prompts):
            raise ValueError(f"reward {entry.label} returned {len(scores)} scores for {len(prompts)} images")
        df[entry.label] = scores.numpy()
    return df


def category_means(samples: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Rows: the categories (GenEval's order, then others as first seen) and ``overall`` (mean of the category means); columns
    ``(reward, model)`` means, and ``n`` images per category and model."""
    seen = list(dict.fromkeys(samples["category"]))
    order = sorted(seen, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), seen.index(c)))
    models = list(dict.fromkeys(samples["model"]))
    means = samples.groupby(["category", "model"], sort=False)[list(labels)].mean()
    table = pd.DataFrame(index=order)
    for label in labels:
        for model in models:
            table[(label, model)] = [means.loc[(c, model), label] for c in order]
    table.loc["overall"] = table.mean(axis=0)
    counts = samples.groupby("category", sort=False).size() // len(models)
    table[("n", "")] = [int(counts[c]) for c in order] + [int(counts.sum())]
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["reward", "model"])
    table.index.name = "category"
    return table


def panel_table(categories: pd.DataFrame, entries: Sequence[PanelEntry]) -> pd.DataFrame:
    """Rows: the panel's rewards; columns: role, each model's overall (category-balanced) mean and, with
    a base and a fine-tuned model, ``change`` = fine-tuned - base."""
    overall = categories.loc["overall"]
    models = [m for m in categories.columns.get_level_values("model").unique() if m]
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"reward": entry.label, "role": entry.role}
        row.update({m: float(overall[(entry.label, m)]) for m in models})
        if len(models) == 2:
            row["change"] = row[models[1]] - row[models[0]]
        rows.append(row)
    return pd.DataFrame(rows).set_index("reward")


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``(reward, model)`` columns as ``reward[model]`` (``n`` alone), for a CSV file."""
    out = table.copy()
    out.columns = [f"{r}[{m}]" if m else r for r, m in table.columns]
    return out


def plot_categories(categories: pd.DataFrame, path: Path, title: str) -> Path:
    """One bar panel per reward: its per-category means (``overall`` included), one bar per model."""
    from pgraft.core.plots import plt  # pyplot on the Agg backend

    labels = [r for r in categories.columns.get_level_values("reward").unique() if r != "n"]
    models = [m for m in categories.columns.get_level_values("model").unique() if m]
    fig, axes = plt.subplots(len(labels), 1, figsize=(max(6.0, 1.1 * len(categories)), 2.6 * len(labels)),
                             squeeze=False)
    x = np.arange(len(categories))
    width = 0.8 / len(models)
    for ax, label in zip(axes[:, 0], labels):
        for i, model in enumerate(models):
            ax.bar(x + (i - (len(models) - 1) / 2) * width, categories[(label, model)].to_numpy(dtype=float),
                   width, label=model)
        ax.set_xticks(x, list(categories.index), fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_protocol(suite: Suite, path: Path, **used: Any) -> Path:
    """``suite.json``: the suite's protocol and what this evaluation used."""
    path.write_text(json.dumps({"suite": suite.record(), "used": used}, indent=2, default=str))
    return path


@dataclass(frozen=True)
class SuiteResult:
    """What :func:`run_suite` wrote: the per-image scores, per-category means and the panel."""

    samples: pd.DataFrame
    categories: pd.DataFrame
    panel: pd.DataFrame
    out: Path


def run_suite(suite: Suite, prompt_set: PromptSet, entries: Sequence[PanelEntry], sample: Callable[..., Any],
              models: Sequence[tuple[str, Any]], per_prompt: int, seed: int, out: Path,
              save_grid: Callable[..., Any], used: dict[str, Any] | None = None) -> SuiteResult:
    """Sample ``per_prompt`` images a prompt with each of ``models`` ((name, head) pairs; the same
    seed, so a base and its fine-tuned run share their initial noises), score them with every panel
    entry and write ``samples.csv``, ``categories.csv`` (+ ``.png``), ``panel.csv``, ``grid.png`` (a
    ``grid_<model>.png`` per further model), ``images_<model>.safetensors`` and ``suite.json`` in ``out``.
    ``sample(head, prompts, per_prompt, seed) -> (images, prompts of the images)``."""
    from pgraft.core.state import save_state

    out.mkdir(parents=True, exist_ok=True)
    frames = []
    cat_of = dict(zip(prompt_set.prompts, prompt_set.categories))
    for i, (name, head) in enumerate(models):
        images, plist = sample(head, prompt_set.prompts, per_prompt, seed)
        frames.append(score_images(images, plist, [cat_of[p] for p in plist], entries, name))
        save_state(images, out / f"images_{name}.safetensors")
        shown = 8 * per_prompt
        save_grid(images[:shown], out / ("grid.png" if i == len(models) - 1 else f"grid_{name}.png"),
                  plist[:shown], ncol=per_prompt)
    samples = pd.concat(frames, ignore_index=True)
    labels = [e.label for e in entries]
    categories = category_means(samples, labels)
    panel = panel_table(categories, entries)
    samples.to_csv(out / "samples.csv", index=False)
    flat_columns(categories).to_csv(out / "categories.csv")
    panel.to_csv(out / "panel.csv")
    plot_categories(categories, out / "categories.png", f"{suite.name}: per-category means")
    write_protocol(suite, out / "suite.json", prompts=prompt_set.source, n_prompts=len(prompt_set),
                   per_prompt=per_prompt, seed=seed, models=[m for m, _ in models],
                   panel={e.label: e.role for e in entries}, **(used or {}))
    return SuiteResult(samples, categories, panel, out)


__all__ = ["SUITES", "Suite", "PanelEntry", "get_suite", "parse_panel", "build_panel", "score_images",
           "category_means", "panel_table", "flat_columns", "plot_categories", "write_protocol", "genai_skill",
           "SuiteResult", "run_suite"]
