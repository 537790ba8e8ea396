"""Prompt sets: the world's grammar (train / held-out / all), GenEval's prompt metadata, and user
prompt files (.txt, .csv, .jsonl).

``load_prompts(name_or_path)`` is what the CLI calls: a registered set name or a file path.
File formats:

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- ``.csv``: a header row with a ``prompt`` column (optional ``category`` or ``tag`` column);
- ``.jsonl``: one JSON object per line with a ``prompt`` key (optional ``category``/``tag``),
  which is also GenEval's ``evaluation_metadata.jsonl`` format.

GenEval's metadata (553 prompts, djghosh13/geneval, MIT license, see data/GENEVAL_LICENSE.txt) is
shipped as ``data/geneval_metadata.jsonl`` for the real path; its nouns are COCO classes, so the
embedded world's checker cannot score it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .world import CATEGORIES, SplitConfig, all_prompts, parse_prompt, split_prompts

DATA_DIR = Path(__file__).parent / "data"
GENEVAL_METADATA = DATA_DIR / "geneval_metadata.jsonl"


@dataclass(frozen=True)
class PromptSet:
    """Prompts with their GenEval category where known (None otherwise); ``source`` says where
    they came from (a set name or a path)."""

    prompts: list[str]
    categories: list[str | None]
    source: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.categories):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.categories)} categories")
        if not self.prompts:
            raise ValueError(f"prompt set {self.source} is empty")

    def __len__(self) -> int:
        return len(self.prompts)

    def in_grammar(self) -> bool:
        """True when every prompt parses in the world grammar (so the exact checker can score it)."""
        try:
            for p in self.prompts:
                parse_prompt(p)
        except ValueError:
            return False
        return True


def grammar_set(split: str, split_cfg: SplitConfig = SplitConfig()) -> PromptSet:
    """The world's prompts: ``split`` in {"train", "heldout", "all"}."""
    if split == "all":
        prompts = [s.text() for s in all_prompts()]
    elif split in ("train", "heldout"):
        prompts = getattr(split_prompts(split_cfg), split)
    else:
        raise ValueError(f"unknown grammar split {split!r}; choose train, heldout or all")
    return PromptSet(prompts, [parse_prompt(p).category for p in prompts], split)


PROMPT_SETS: dict[str, Callable[[], PromptSet]] = {
    "train": lambda: grammar_set("train"),
    "heldout": lambda: grammar_set("heldout"),
    "all": lambda: grammar_set("all"),
    "geneval": lambda: load_prompt_file(GENEVAL_METADATA),
}


def load_prompts(name_or_path: str | Path) -> PromptSet:
    """A registered prompt set (:data:`PROMPT_SETS`) or a prompt file."""
    if str(name_or_path) in PROMPT_SETS:
        return PROMPT_SETS[str(name_or_path)]()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"prompt set {str(name_or_path)!r} is neither a registered set "
                                f"({', '.join(PROMPT_SETS)}) nor an existing file")
    return load_prompt_file(path)


def _category(value: object, where: str) -> str | None:
    if value is None or value == "":
        return None
    if value not in CATEGORIES:
        raise ValueError(f"{where}: unknown category {value!r}; expected one of {', '.join(CATEGORIES)}")
    return str(value)


def _prompt(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: prompt must be a non-empty string, got {value!r}")
    return value.strip()


def load_prompt_file(path: str | Path) -> PromptSet:
    """Read a .txt / .csv / .jsonl prompt file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    prompts: list[str] = []
    cats: list[str | None] = []
    if suffix in (".txt", ""):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(_prompt(line, f"{path}:{i}"))
                cats.append(None)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise ValueError(f"{path}:1: CSV prompt files need a header with a 'prompt' column, "
                                 f"got columns {reader.fieldnames}")
            for i, row in enumerate(reader, start=2):
                prompts.append(_prompt(row["prompt"], f"{path}:{i}"))
                cats.append(_category(row.get("category") or row.get("tag"), f"{path}:{i}"))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: invalid JSON ({err.msg})") from err
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(f"{path}:{i}: each JSONL line must be an object with a 'prompt' key")
            prompts.append(_prompt(obj["prompt"], f"{path}:{i}"))
            cats.append(_category(obj.get("category", obj.get("tag")), f"{path}:{i}"))
    else:
        raise ValueError(f"prompt file {path}: unsupported extension {suffix!r}; use .txt, .csv or .jsonl")
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return PromptSet(prompts, cats, str(path))


# ----------------------------------------------------------------------------- benchmark files (any categories)
PROMPT_KEYS = ("prompt", "prompts", "text", "caption")
CATEGORY_KEYS = ("category", "tag", "categories", "skill")
CategoryOf = Callable[[dict], "str | None"]


def _field(record: dict, keys: tuple[str, ...]) -> object:
    """The value of the first of ``keys`` in ``record``, its keys compared case-insensitively."""
    lower = {str(k).lower(): v for k, v in record.items()}
    return next((lower[k] for k in keys if k in lower), None)


def plain_category(record: dict) -> str | None:
    """A record's ``category`` / ``tag`` (any case) as a string, None when it has none."""
    value = _field(record, CATEGORY_KEYS)
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of a .csv (header row), .jsonl (an object a line) or .json (a list of objects, or
    an object of objects keyed by id, as GenAI-Bench's genai_image.json) benchmark file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [(f"{path}:{i}", dict(row)) for i, row in enumerate(csv.DictReader(f), start=2)]
    if suffix in (".jsonl", ".ndjson"):
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: invalid JSON ({err.msg})") from err
        return out
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    items = data.items() if isinstance(data, dict) else enumerate(data if isinstance(data, list) else [])
    return [(f"{path}[{key}]", value) for key, value in items]


def load_benchmark_prompts(path: str | Path, category_of: CategoryOf = plain_category) -> PromptSet:
    """A benchmark's prompt file whose categories are its own (not the world's): ``.txt`` (a prompt a line,
    no categories), ``.csv`` (a ``prompt``/``Prompts``/``text`` column, any case; DrawBench's export has
    ``Prompts`` and ``Category``), ``.jsonl`` or ``.json`` records with such a key; ``category_of(record)``
    names each record's category. Errors name the file and line (or key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (or is not a file)")
    if path.suffix.lower() in (".txt", ""):
        return load_prompt_file(path)
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise ValueError(f"prompt file {path}: unsupported extension {path.suffix!r}; use .txt, .csv, .jsonl or .json")
    prompts: list[str] = []
    cats: list[str | None] = []
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with a prompt, got {type(record).__name__}")
        value = _field(record, PROMPT_KEYS)
        if value is None:
            raise ValueError(f"{where}: no prompt column/key (one of {', '.join(PROMPT_KEYS)}, any case)")
        prompts.append(_prompt(value, where))
        cats.append(category_of(record))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return PromptSet(prompts, cats, str(path))
