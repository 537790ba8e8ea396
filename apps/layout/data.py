"""Layout data: a procedural PubLayNet-like page generator (default) and PubLayNet / RICO loaders.

Box convention (used by every module of this app, as in LayoutDM / layout-dm):
    a box is ``(xc, yc, w, h)``: centre x, centre y, width, height, each divided by the page width
    (x, w) or height (y, h), so a box inside the page has all four numbers in [0, 1]. y grows
    *downwards* (image coordinates): ``yc - h/2`` is the top edge.

A set of layouts is a :class:`Layouts` (page units) with padding to ``max_elements``:
    boxes   Float[L, N, 4]  (xc, yc, w, h); zeros at padded slots
    classes Long[L, N]      class index in [0, n_classes); ``PAD_CLASS = -1`` at padded slots
    mask    Bool[L, N]      True for a real element
Real elements always come first (slots ``0..n-1``), but nothing downstream relies on the order
(the model is permutation-equivariant).

:func:`to_state` turns layouts into the diffusion state, whose ``"boxes"`` live in the model's
space ``z = 2 b - 1`` (page [0, 1] -> [-1, 1], a scale comparable to the N(0, I) prior);
:func:`state_to_page` undoes it. Rewards and metrics accept the state and convert.

Nothing here downloads. The synthetic generator draws each split from its own stream
(``numpy.random.default_rng([seed, split_id])``) page after page, so page i of a split never
depends on how many pages were asked for, and the train and test splits are disjoint streams.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pgraft.core.errors import FieldError

PAD_CLASS = -1
PUBLAYNET_CLASSES: tuple[str, ...] = ("text", "title", "list", "table", "figure")
# PubLayNet's COCO category ids 1..5 in the order above.
PUBLAYNET_CATEGORY_IDS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
# RICO semantic annotations ("componentLabel"), the 25 classes of LayoutGAN++ / LayoutDM (rico25),
# ordered by frequency as in those works.
RICO_CLASSES: tuple[str, ...] = (
    "Text", "Image", "Icon", "List Item", "Text Button", "Toolbar", "Web View", "Input", "Card",
    "Advertisement", "Background Image", "Drawer", "Radio Button", "Checkbox", "Multi-Tab",
    "Pager Indicator", "Modal", "On/Off Switch", "Slider", "Map View", "Button Bar", "Video",
    "Bottom Navigation", "Number Stepper", "Date Picker",
)  # fmt: skip
SYNTHETIC_MAX_ELEMENTS = 20
Split = Literal["train", "test"]
_SPLIT_IDS = {"train": 0, "test": 1}
_TEXT, _TITLE, _LIST, _TABLE, _FIGURE = range(5)


# ----------------------------------------------------------------------------- container
@dataclass(frozen=True)
class Layouts:
    """A padded batch of layouts in page units (see the module docstring for the convention)."""

    boxes: torch.Tensor
    classes: torch.Tensor
    mask: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        L, N = self.mask.shape
        if self.boxes.shape != (L, N, 4) or self.classes.shape != (L, N):
            raise ValueError(f"inconsistent layout shapes: boxes {tuple(self.boxes.shape)}, "
                             f"classes {tuple(self.classes.shape)}, mask {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def max_elements(self) -> int:
        return int(self.mask.shape[1])

    def counts(self) -> torch.Tensor:
        """Number of elements per layout, Long[L]."""
        return self.mask.sum(1)

    def count_probs(self) -> list[float]:
        """Empirical distribution of the element count, list of length ``max_elements + 1``."""
        hist = torch.bincount(self.counts(), minlength=self.max_elements + 1).double()
        return (hist / hist.sum()).tolist()

    def subset(self, idx: torch.Tensor | slice) -> Layouts:
        return Layouts(self.boxes[idx], self.classes[idx], self.mask[idx], self.class_names)


def pack(layouts: Sequence[Sequence[tuple[int, float, float, float, float]]], max_elements: int,
         class_names: Sequence[str]) -> Layouts:
    """Pad a list of layouts, each a list of ``(class, xc, yc, w, h)``, into a :class:`Layouts`."""
    L = len(layouts)
    table = np.zeros((L, max_elements, 5))
    table[:, :, 0] = PAD_CLASS
    mask = np.zeros((L, max_elements), dtype=bool)
    for i, elems in enumerate(layouts):
        if len(elems) > max_elements:
            raise ValueError(f"layout {i} has {len(elems)} elements > max_elements={max_elements}")
        if elems:
            table[i, : len(elems)] = elems
            mask[i, : len(elems)] = True
    return Layouts(torch.from_numpy(table[:, :, 1:]).float(), torch.from_numpy(table[:, :, 0]).long(),
                   torch.from_numpy(mask), tuple(class_names))


def to_state(layouts: Layouts) -> dict[str, torch.Tensor]:
    """Diffusion state of clean layouts: ``{"boxes": 2b - 1 (0 at padding), "classes", "mask"}``."""
    z = (2 * layouts.boxes - 1) * layouts.mask.unsqueeze(-1)
    return {"boxes": z.float(), "classes": layouts.classes.clone(), "mask": layouts.mask.clone()}


def state_to_page(boxes: torch.Tensor) -> torch.Tensor:
    """Model-space boxes z [..., 4] -> page units b = (z + 1) / 2 (no clamping: rewards see strays)."""
    return (boxes + 1) / 2


def page_to_state(boxes: torch.Tensor) -> torch.Tensor:
    """Page-unit boxes b [..., 4] -> model space z = 2 b - 1."""
    return 2 * boxes - 1


def from_state(state: dict[str, torch.Tensor], class_names: Sequence[str]) -> Layouts:
    """Inverse of :func:`to_state` (padding boxes zeroed)."""
    mask = state["mask"].bool()
    boxes = state_to_page(state["boxes"].float()) * mask.unsqueeze(-1)
    classes = torch.where(mask, state["classes"], torch.full_like(state["classes"], PAD_CLASS))
    return Layouts(boxes, classes, mask, tuple(class_names))


# ----------------------------------------------------------------------------- synthetic pages
@dataclass(frozen=True)
class PageStyle:
    """Knobs of the procedural generator (probabilities and sizes in page units)."""

    column_probs: tuple[float, float, float] = (0.35, 0.5, 0.15)  # 1, 2, 3 columns
    header_prob: float = 0.3  # article first page: title + authors + abstract across the page
    wide_float_prob: float = 0.2  # figure/table spanning all columns under the header (multi-column)
    jitter: float = 0.002  # std of independent noise on every edge
    misalign_prob: float = 0.06  # per element: shifted sideways by 1-3% of the page width
    overlap_prob: float = 0.06  # per element: grown downwards into its successor


class _Draws:
    """Pre-drawn uniforms consumed one by one: numpy's per-call overhead (~µs) dominated the
    generator, and 20k pages must build in seconds. Deterministic given the page's rng."""

    def __init__(self, rng: np.random.Generator, size: int = 128) -> None:
        self._rng, self._size = rng, size
        self._u, self._i = rng.random(size).tolist(), 0

    def random(self) -> float:
        if self._i == self._size:
            self._u, self._i = self._rng.random(self._size).tolist(), 0
        self._i += 1
        return self._u[self._i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def normal(self, std: float) -> float:
        # Box-Muller from two uniforms (1 - u keeps the log finite)
        return std * math.sqrt(-2.0 * math.log(1.0 - self.random())) * math.cos(2 * math.pi * self.random())

    def choice(self, probs: Sequence[float]) -> int:
        u, acc = self.random(), 0.0
        for k, p in enumerate(probs):
            acc += p
            if u < acc:
                return k
        return len(probs) - 1


def _column_block(rng: _Draws, x0: float, colw: float, y: float, bottom: float,
                  gap: float) -> tuple[list[tuple[int, float, float, float, float]], float]:
    """One vertical block of a column starting at ``y``: returns (elements as (c, x0, y0, w, h), new y).

    Elements are in top-left form here; captions go with their figure (below) or table (above).
    """
    room = bottom - y
    kind = rng.choice((0.45, 0.17, 0.12, 0.11, 0.15))
    out: list[tuple[int, float, float, float, float]] = []
    if kind == 0 or room < 0.08:  # paragraph; a short remainder of the column is always text
        h = min(rng.uniform(0.04, 0.22), room)
        if room - h < 0.06:  # paragraphs run down to the bottom margin
            h = room
        out.append((_TEXT, x0, y, colw, h))
    elif kind == 1:  # section heading + the paragraph it opens
        h = rng.uniform(0.011, 0.02)
        out.append((_TITLE, x0, y, colw * rng.uniform(0.3, 0.85), h))
        y2 = y + h + 0.5 * gap
        h2 = min(rng.uniform(0.04, 0.18), bottom - y2)
        out.append((_TEXT, x0, y2, colw, h2))
    elif kind == 2:  # list, indented
        indent = rng.uniform(0.008, 0.02)
        out.append((_LIST, x0 + indent, y, colw - indent, min(rng.uniform(0.05, 0.15), room)))
    elif kind == 3:  # table with its caption above, centred if narrower than the column
        ch = rng.uniform(0.012, 0.03)
        out.append((_TEXT, x0, y, colw, ch))
        tw = colw * (1.0 if rng.random() < 0.6 else rng.uniform(0.6, 0.95))
        th = min(rng.uniform(0.08, 0.25), room - ch - 0.5 * gap)
        out.append((_TABLE, x0 + (colw - tw) / 2, y + ch + 0.5 * gap, tw, th))
    else:  # figure, centred, with its caption below
        fw = colw * (1.0 if rng.random() < 0.4 else rng.uniform(0.55, 0.95))
        fh = min(rng.uniform(0.1, 0.28), room - 0.03)
        out.append((_FIGURE, x0 + (colw - fw) / 2, y, fw, fh))
        ch = rng.uniform(0.015, 0.04)
        out.append((_TEXT, x0, y + fh + 0.5 * gap, colw, ch))
    last = out[-1]
    return out, last[2] + last[4] + gap


def synthetic_page(np_rng: np.random.Generator, max_elements: int = SYNTHETIC_MAX_ELEMENTS,
                   style: PageStyle = PageStyle()) -> list[tuple[int, float, float, float, float]]:
    """One PubLayNet-like page as a list of ``(class, xc, yc, w, h)`` (page units, see module doc).

    A 1/2/3-column grid with margins, optionally an article header (title, authors, abstract) and
    a full-width float; columns are filled top to bottom with paragraphs, headed sections, lists,
    tables (caption above) and figures (caption below). Imperfections: edge jitter, occasional
    sideways misalignment, occasional overlap with the next element.
    """
    rng = _Draws(np_rng)
    ncol = rng.choice(style.column_probs) + 1
    ml = rng.uniform(0.07, 0.12)
    mr = ml + rng.normal(0.004)
    top, bottom = rng.uniform(0.06, 0.1), 1 - rng.uniform(0.06, 0.1)
    gutter = rng.uniform(0.02, 0.045)
    gap = rng.uniform(0.008, 0.018)
    width = 1 - ml - mr
    colw = (width - (ncol - 1) * gutter) / ncol
    elems: list[tuple[int, float, float, float, float]] = []
    y = top
    if rng.random() < style.header_prob:
        tw = width * rng.uniform(0.5, 1.0)
        th = rng.uniform(0.025, 0.055)
        elems.append((_TITLE, ml + (width - tw) / 2, y, tw, th))  # centred title
        y += th + gap
        ah = rng.uniform(0.015, 0.04)
        elems.append((_TEXT, ml + (width - tw) / 2, y, tw, ah))  # authors, same extent as the title
        y += ah + gap
        bh = rng.uniform(0.06, 0.16)
        elems.append((_TEXT, ml, y, width, bh))  # abstract across the columns
        y += bh + 1.5 * gap
    if ncol > 1 and rng.random() < style.wide_float_prob and bottom - y > 0.35:
        fh = rng.uniform(0.12, 0.3)
        cls = _FIGURE if rng.random() < 0.6 else _TABLE
        elems.append((cls, ml, y, width, fh))
        y += fh + 0.5 * gap
        ch = rng.uniform(0.015, 0.035)
        elems.append((_TEXT, ml, y, width, ch))
        y += ch + 1.5 * gap
    for c in range(ncol):
        x0, cy = ml + c * (colw + gutter), y
        while bottom - cy > 0.03:
            block, cy = _column_block(rng, x0, colw, cy, bottom, gap)
            elems.extend(block)
    elems = elems[:max_elements]  # pages are truncated in reading order, as a crop would do
    n = len(elems)
    a = np.asarray(elems, dtype=np.float64).reshape(n, 5)
    # imperfections, drawn in one go per page: sideways misalignment, growth into the successor,
    # then independent jitter on all four edges
    u = np_rng.random((n, 4))
    shift = np.where(u[:, 0] < style.misalign_prob, np.where(u[:, 1] < 0.5, -1.0, 1.0) * (0.01 + 0.02 * u[:, 2]), 0.0)
    grow = np.where((u[:, 3] < style.overlap_prob) & (np.arange(n) + 1 < n), 0.01 + 0.03 * u[:, 2], 0.0)
    l, t = a[:, 1] + shift, a[:, 2]
    r, b = l + a[:, 3], t + a[:, 4] + grow
    ltrb = np.stack([l, t, r, b], 1) + np_rng.normal(0.0, style.jitter, (n, 4))
    ltrb = np.clip(ltrb, 0.0, 1.0)
    l, t, r, b = ltrb.T
    keep = (r - l > 1e-3) & (b - t > 1e-3)
    out = np.stack([a[:, 0], (l + r) / 2, (t + b) / 2, r - l, b - t], 1)[keep]
    return [(int(row[0]), *row[1:].tolist()) for row in out]


def synthetic_layouts(n: int, split: Split = "train", seed: int = 0,
                      max_elements: int = SYNTHETIC_MAX_ELEMENTS, style: PageStyle = PageStyle()) -> Layouts:
    """"The first ``n`` procedural pages of the split's stream, seeded by ``(seed, split)``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1 or max_elements < 1:
        raise ValueError(f"need n >= 1 and max_elements >= 1, got n={n}, max_elements={max_elements}")
    # one stream per split: page i depends only on pages before it, so the first n pages are the
    # same whatever n is, and the train / test streams never meet
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    pages = [synthetic_page(rng, max_elements, style) for _ in range(n)]
    return pack(pages, max_elements, PUBLAYNET_CLASSES)


# ----------------------------------------------------------------------------- real loaders
# COCO boxes come from PDF / pixel rounding and can poke past the page by a pixel or so: overshoots up
# to this fraction of the page side are clipped; larger ones mean a wrong image size or a corrupt box.
PAGE_OVERSHOOT_TOL = 0.01


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                         "expected a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
    except RecursionError:  # nesting deeper than the decoder's stack: no annotation file looks like this
        raise ValueError(f"{path}: JSON nested too deeply to read (arrays/objects within each other thousands of "
                         "levels deep); expected a COCO-style annotation file") from None


def _number(where: str, field: str, value: Any) -> float:
    """``value`` as a finite float. Bools (``true`` == 1 in Python), strings, null, NaN and Infinity
    (which Python's JSON parser accepts) are refused, naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {field} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {field} must be finite, got {value!r}")
    return float(value)


def _four_numbers(where: str, field: str, value: Any, form: str) -> list[float]:
    """A JSON list of four finite numbers; ``form`` (e.g. ``"[x, y, w, h]"``) is quoted in errors."""
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"{where}: {field} must be {form}, got {value!r}")
    return [_number(where, f"{field} {form}", v) for v in value]


def _check_box(where: str, w: float, h: float) -> None:
    if not (np.isfinite(w) and np.isfinite(h)) or w <= 0 or h <= 0:
        raise ValueError(f"{where}: box must have positive width and height, got w={w}, h={h}")


def _clip_to_page(where: str, box: list[float], W: float, H: float, tol: float) -> tuple[float, float, float, float]:
    """Pixel box [x, y, w, h] clipped to the W x H page, as (left, top, width, height).

    ValueError if it overshoots the page by more than ``tol`` of the page side (see
    :data:`PAGE_OVERSHOOT_TOL`), or if nothing of it is left on the page.
    """
    x, y, w, h = box
    over = max(-x / W, -y / H, (x + w - W) / W, (y + h - H) / H)
    if over > tol:
        raise ValueError(f"{where}: bbox {box} lies outside the {W:g} x {H:g} page by {over:.1%} of the page "
                         f"(tolerance {tol:.1%}): wrong image size or corrupt box?")
    l, t = min(max(x, 0.0), W), min(max(y, 0.0), H)
    r, b = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
    _check_box(f"{where} (bbox {box} clipped to the page)", r - l, b - t)
    return l, t, r - l, b - t


def _publaynet_class(category_id: Any) -> int | None:
    """Class index of a PubLayNet ``category_id`` (1..5), None for anything else (``true``, "1", [1], 9)."""
    if isinstance(category_id, bool) or not isinstance(category_id, (int, float)):
        return None
    return PUBLAYNET_CATEGORY_IDS.get(category_id)


def _is_id(value: Any) -> bool:
    """COCO ids are ints (some exports use strings); ``true`` would silently equal id 1."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _finish(layouts: list[list[tuple[int, float, float, float, float]]], names: list[str],
            max_elements: int, class_names: Sequence[str], too_many: str, source: str) -> Layouts:
    if too_many not in ("skip", "truncate", "error"):
        raise ValueError(f"too_many must be 'skip', 'truncate' or 'error', got {too_many!r}")
    kept = []
    for name, elems in zip(names, layouts):
        if len(elems) > max_elements:
            if too_many == "error":
                raise ValueError(f"{name}: {len(elems)} elements > max_elements={max_elements}")
            if too_many == "skip":  # LayoutDM drops such layouts from PubLayNet/RICO (max 25)
                continue
            elems = elems[:max_elements]
        kept.append(elems)
    if not kept:
        raise ValueError(f"{source}: no layout has at most max_elements={max_elements} elements")
    return pack(kept, max_elements, class_names)


def load_publaynet(path: str | Path, max_elements: int = 25, too_many: str = "skip",
                   skip_empty: bool = False, overshoot_tol: float = PAGE_OVERSHOOT_TOL) -> Layouts:
    """Load a PubLayNet COCO-style annotation file (``train.json`` / ``val.json``).

    Each image ``{"id", "width", "height"}`` becomes one layout; each annotation
    ``{"image_id", "bbox": [x, y, w, h] (top-left, pixels), "category_id" in 1..5}`` one element,
    converted to page-unit centre boxes ``((x + w/2)/W, (y + h/2)/H, w/W, h/H)``. Elements keep the
    file's order. Layouts with more than ``max_elements`` elements are skipped (LayoutDM protocol),
    truncated or rejected per ``too_many``. Boxes overshooting the page by at most ``overshoot_tol``
    of its side are clipped to it. A ``categories`` list is optional (the ids are PubLayNet's); when
    present, its ids 1..5 must carry PubLayNet's names, so another COCO dataset is not silently
    relabelled.

    Raises ValueError naming the path and the offending image / annotation (index and id) on: text
    that is not UTF-8 JSON, a document without ``images`` / ``annotations`` lists, entries that are
    not objects, ids that are not ints/strings or repeat, sizes or bbox entries that are not finite
    numbers, non-positive sizes, boxes further outside the page than the tolerance, unknown
    categories, dangling image ids, or images without annotations (unless ``skip_empty``).
    """
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a COCO-style file (top level is a JSON {type(doc).__name__}, "
                         "need an object with 'images' and 'annotations')")
    for key in ("images", "annotations"):
        if key not in doc:
            raise ValueError(f"{path}: not a COCO-style file (no top-level {key!r}; need 'images' and 'annotations')")
        if not isinstance(doc[key], list):
            raise ValueError(f"{path}: top-level {key!r} must be a list, got {type(doc[key]).__name__}")
    if not doc["images"]:
        raise ValueError(f"{path}: 'images' is empty (no page to load)")
    _check_publaynet_categories(path, doc.get("categories"))
    images: dict[Any, tuple[float, float]] = {}
    first_index: dict[Any, int] = {}
    for k, img in enumerate(doc["images"]):
        if not isinstance(img, dict):
            raise ValueError(f"{path}: images[{k}] must be an object, got {img!r}")
        where = f"{path}: images[{k}] (id={img.get('id')!r})"
        if "id" not in img or "width" not in img or "height" not in img:
            raise ValueError(f"{where}: needs 'id', 'width' and 'height'")
        if not _is_id(img["id"]):
            raise ValueError(f"{where}: id must be an integer or a string")
        if img["id"] in images:
            raise ValueError(f"{where}: duplicate image id (also images[{first_index[img['id']]}])")
        W, H = _number(where, "width", img["width"]), _number(where, "height", img["height"])
        _check_box(where, W, H)
        images[img["id"]], first_index[img["id"]] = (W, H), k
    elems: dict[Any, list[tuple[int, float, float, float, float]]] = {i: [] for i in images}
    for k, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{path}: annotations[{k}] must be an object, got {ann!r}")
        where = f"{path}: annotations[{k}] (id={ann.get('id')!r}, image_id={ann.get('image_id')!r})"
        image_id = ann.get("image_id")
        if not _is_id(image_id) or image_id not in images:
            raise ValueError(f"{where}: image_id not among the file's images")
        cat = ann.get("category_id")
        cls = _publaynet_class(cat)
        if cls is None:
            raise ValueError(f"{where}: unknown category_id {cat!r}; PubLayNet has 1..5 = "
                             f"{', '.join(PUBLAYNET_CLASSES)}")
        x, y, w, h = box = _four_numbers(where, "bbox", ann.get("bbox"), "[x, y, w, h]")
        _check_box(where, w, h)
        W, H = images[image_id]
        x, y, w, h = _clip_to_page(where, box, W, H, overshoot_tol)
        elems[image_id].append((cls, (x + w / 2) / W, (y + h / 2) / H, w / W, h / H))
    names, layouts = [], []
    for k, (img_id, e) in enumerate(elems.items()):
        if not e:
            if skip_empty:
                continue
            raise ValueError(f"{path}: images[{k}] (id={img_id!r}) has no annotations "
                             "(empty layout; pass skip_empty=True to drop such images)")
        names.append(f"{path}: image id={img_id!r}")
        layouts.append(e)
    return _finish(layouts, names, max_elements, PUBLAYNET_CLASSES, too_many, str(path))


def _check_publaynet_categories(path: Path, categories: Any) -> None:
    """An optional COCO ``categories`` list must agree with PubLayNet's ids 1..5 (see load_publaynet)."""
    if categories is None:
        return
    if not isinstance(categories, list):
        raise ValueError(f"{path}: top-level 'categories' must be a list, got {type(categories).__name__}")
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{path}: categories[{k}] must be an object with 'id' and 'name', got {c!r}")
        cid, cls = c["id"], _publaynet_class(c["id"])
        if cls is None:
            continue  # an extra category no annotation may use (checked per annotation)
        expected = PUBLAYNET_CLASSES[cls]
        if str(c["name"]).strip().lower() != expected:
            raise ValueError(f"{path}: categories[{k}] (id={cid!r}) is named {c['name']!r}, but PubLayNet's "
                             f"category {cid} is {expected!r}: not a PubLayNet file?")


def _rico_elements(node: dict, where: str, origin: tuple[float, float, float, float],
                   out: list[tuple[int, float, float, float, float]]) -> None:
    """Depth-first: append every labelled node of the tree under ``node`` to ``out``.

    ``origin`` = (x0, y0, W, H) of the root; boxes are taken relative to the screen's corner.
    """
    ox, oy, W, H = origin
    label = node.get("componentLabel")
    if label is not None:
        if label not in RICO_CLASSES:
            raise ValueError(f"{where}: unknown componentLabel {label!r} (RICO has 25 classes: "
                             f"{', '.join(RICO_CLASSES)})")
        x1, y1, x2, y2 = _four_numbers(where, "bounds", node.get("bounds"), "[x1, y1, x2, y2]")
        _check_box(f"{where} ({label})", x2 - x1, y2 - y1)
        x1, x2, y1, y2 = x1 - ox, x2 - ox, y1 - oy, y2 - oy
        # RICO nodes can poke out of the screen (scroll views); clip to the page, as LayoutDM's
        # loader does, rather than reject whole screens.
        x1, x2 = min(max(x1, 0.0), W), min(max(x2, 0.0), W)
        y1, y2 = min(max(y1, 0.0), H), min(max(y2, 0.0), H)
        if x2 > x1 and y2 > y1:
            out.append((RICO_CLASSES.index(label), (x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H))
    children = node.get("children", []) or []
    if not isinstance(children, list):
        raise ValueError(f"{where}: children must be a list of nodes, got {type(children).__name__}")
    for k, child in enumerate(children):
        if not isinstance(child, dict):
            raise ValueError(f"{where}.children[{k}]: a node must be an object, got {child!r}")
        _rico_elements(child, f"{where}.children[{k}]", origin, out)


def load_rico(paths: str | Path | Sequence[str | Path], max_elements: int = 25, too_many: str = "skip") -> Layouts:
    """Load RICO semantic annotations: one JSON tree per screen (``semantic_annotations/*.json``).

    ``paths``: a file, a directory (all ``*.json`` in it, sorted) or a list of files. The root's
    ``bounds`` [x1, y1, x2, y2] define the page; every node with a ``componentLabel`` (one of the
    25 RICO classes) is an element with page-unit centre box, found depth-first. Out-of-screen parts
    are clipped. Raises ValueError naming the file and the node path (``root.children[2]...``)
    for negative/zero sizes or unknown labels, and for screens without labelled elements.
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise ValueError(f"no RICO JSON files found at {paths}")
    names, layouts = [], []
    for f in files:
        root = _read_json(f)
        if not isinstance(root, dict) or "bounds" not in root:
            raise ValueError(f"{f}: root node needs 'bounds' [x1, y1, x2, y2]")
        x1, y1, x2, y2 = _four_numbers(f"{f}: root", "bounds", root["bounds"], "[x1, y1, x2, y2]")
        _check_box(f"{f}: root", x2 - x1, y2 - y1)
        out: list[tuple[int, float, float, float, float]] = []
        _rico_elements(root, f"{f}: root", (x1, y1, x2 - x1, y2 - y1), out)
        if not out:
            raise ValueError(f"{f}: empty layout (no node with a componentLabel)")
        names.append(str(f))
        layouts.append(out)
    return _finish(layouts, names, max_elements, RICO_CLASSES, too_many, str(paths))


# ----------------------------------------------------------------------------- datasets
# Real-data loaders by name: path -> Layouts (max_elements as the second argument).
REAL_LOADERS = {"publaynet": load_publaynet, "rico": load_rico}


def load_layouts(dataset: str = "synthetic", split: Split = "train", n: int | None = None, seed: int = 0,
                 max_elements: int | None = None, path: str | Path | None = None) -> Layouts:
    """One entry point: the synthetic split (``n`` pages, default 20000 train / 2000 test), or a
    real file / directory via ``path`` (PubLayNet json, RICO directory)."""
    if dataset == "synthetic":
        n = n if n is not None else (20000 if split == "train" else 2000)
        return synthetic_layouts(n, split, seed, max_elements or SYNTHETIC_MAX_ELEMENTS)
    if dataset not in REAL_LOADERS:
        raise FieldError("dataset", f"unknown dataset {dataset!r}; choose from synthetic, {', '.join(REAL_LOADERS)}")
    if path is None:
        raise FieldError("data", f"dataset {dataset!r} needs a path to the user's copy of the data")
    try:
        data = REAL_LOADERS[dataset](path, max_elements or 25)
    except (ValueError, FileNotFoundError) as err:  # what is wrong with the user's copy: name --data
        if isinstance(err, FieldError):
            raise
        raise FieldError("data", " ".join(str(err).split())) from None
    return data if n is None else data.subset(slice(0, n))
