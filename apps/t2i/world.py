"""The embedded compositional world: coloured shapes on a small canvas, captioned by a grammar that
mirrors GenEval's six categories, with a train / held-out split by held-out *combinations*.

Images are float tensors ``[3, H, W]`` in [-1, 1] on a black background (-1). Every object is an
axis-aligned shape of one palette colour, rendered without anti-aliasing (a pixel belongs to a shape
iff its centre does), so the exact checker (:mod:`.checker`) can recover every object of a render.

Grammar (GenEval templates, our nouns)::

    single_object    a photo of a {shape}
    two_object       a photo of a {shape} and a {shape'}
    counting         a photo of {two|three|four} {shape}s
    colors           a photo of a {color} {shape}
    position         a photo of a {shape} {left of|right of|above|below} a {shape'}
    color_attr       a photo of a {color} {shape} and a {color'} {shape'}

Held-out combinations (never rendered for the training prompts): one unordered shape *pair* (every
two-object, position and colour-attribution prompt with both shapes), a few colour-shape *bindings*,
a few (count, shape) pairs and a few (shape, relation, shape') triples. Every single word still
occurs in training, so the held-out set measures compositional generalization.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# RGB in [0, 1]; far apart (pairwise distance >= 1) so colour segmentation is unambiguous
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (1.0, 0.0, 1.0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


# ----------------------------------------------------------------------------- prompt specs
@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``, all of ``color`` (None: any colour)."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {SHAPES}")
        if self.color is not None and self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; choose from {COLORS}")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its GenEval category, the required objects, and for ``position`` the
    relation of ``objects[0]`` to ``objects[1]``."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def text(self) -> str:
        """The caption of this spec (inverse of :func:`parse_prompt`)."""
        if self.category not in CAPTIONS:
            raise ValueError(f"unknown category {self.category!r}")
        return CAPTIONS[self.category](self.objects, self.relation)

    def combinations(self) -> set[tuple]:
        """The combination keys this prompt binds (what a held-out split withholds)."""
        keys: set[tuple] = set()
        shapes = [o.shape for o in self.objects]
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            keys.add(("pair", frozenset(shapes)))
        for o in self.objects:
            if o.color is not None:
                keys.add(("binding", o.color, o.shape))
            if o.count > 1:
                keys.add(("count", o.count, o.shape))
        if self.relation is not None:
            keys.add(("position", shapes[0], self.relation, shapes[1]))
        return keys


_S = "|".join(SHAPES)
_C = "|".join(COLORS)
_N = "|".join(NUMBERS.values())
_R = "|".join(RELATIONS)
_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("single_object", re.compile(rf"a photo of an? (?P<s1>{_S})")),
    ("two_object", re.compile(rf"a photo of an? (?P<s1>{_S}) and an? (?P<s2>{_S})")),
    ("counting", re.compile(rf"a photo of (?P<n>{_N}) (?P<s1>{_S})s")),
    ("colors", re.compile(rf"a photo of an? (?P<c1>{_C}) (?P<s1>{_S})")),
    ("position", re.compile(rf"a photo of an? (?P<s1>{_S}) (?P<rel>{_R}) an? (?P<s2>{_S})")),
    ("color_attr", re.compile(rf"a photo of an? (?P<c1>{_C}) (?P<s1>{_S}) and an? (?P<c2>{_C}) (?P<s2>{_S})")),
]
_WORD_TO_NUMBER = {v: k for k, v in NUMBERS.items()}

# the caption of each category (one table: parse_prompt's patterns are its inverse)
CAPTIONS = {
    "single_object": lambda o, rel: f"a photo of a {o[0].shape}",
    "two_object": lambda o, rel: f"a photo of a {o[0].shape} and a {o[1].shape}",
    "counting": lambda o, rel: f"a photo of {NUMBERS[o[0].count]} {o[0].shape}s",
    "colors": lambda o, rel: f"a photo of a {o[0].color} {o[0].shape}",
    "position": lambda o, rel: f"a photo of a {o[0].shape} {rel} a {o[1].shape}",
    "color_attr": lambda o, rel: f"a photo of a {o[0].color} {o[0].shape} and a {o[1].color} {o[1].shape}",
}


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a caption of the grammar (case and surrounding whitespace/period ignored).

    Raises ``ValueError`` naming the prompt if it is not in the grammar.
    """
    text = " ".join(prompt.strip().lower().rstrip(".").split())
    for category, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        if category == "counting":
            objects = (ObjectSpec(g["s1"], None, _WORD_TO_NUMBER[g["n"]]),)
        elif "s2" in g:
            objects = (ObjectSpec(g["s1"], g.get("c1")), ObjectSpec(g["s2"], g.get("c2")))
        else:
            objects = (ObjectSpec(g["s1"], g.get("c1")),)
        if len(objects) == 2 and objects[0].shape == objects[1].shape:
            raise ValueError(f"prompt {prompt!r} names the shape {objects[0].shape!r} twice; "
                             "the grammar needs two different shapes")
        return PromptSpec(category, objects, g.get("rel"))
    raise ValueError(f"prompt {prompt!r} is not in the t2i world grammar (see pgraft.apps.t2i.world); "
                     "e.g. 'a photo of a red circle left of a square' is not, 'a photo of a circle left of a square' is")


def all_prompts() -> list[PromptSpec]:
    """Every prompt of the grammar, in a fixed order (category, then lexicographic)."""
    specs: list[PromptSpec] = [PromptSpec("single_object", (ObjectSpec(s),)) for s in SHAPES]
    pairs = list(itertools.combinations(SHAPES, 2))
    specs += [PromptSpec("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in pairs]
    specs += [PromptSpec("counting", (ObjectSpec(s, None, n),)) for n in NUMBERS for s in SHAPES]
    specs += [PromptSpec("colors", (ObjectSpec(s, c),)) for c in COLORS for s in SHAPES]
    specs += [PromptSpec("position", (ObjectSpec(a), ObjectSpec(b)), r)
              for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    specs += [PromptSpec("color_attr", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
              for a, b in pairs for ca in COLORS for cb in COLORS if ca != cb]
    return specs


# ----------------------------------------------------------------------------- split
@dataclass(frozen=True)
class SplitConfig:
    """How many combinations of each kind the held-out split withholds (drawn with ``seed``)."""

    pairs: int = 1
    bindings: int = 2
    counts: int = 2
    positions: int = 6
    seed: int = 0


@dataclass(frozen=True)
class PromptSplit:
    train: list[str]
    heldout: list[str]
    heldout_combinations: frozenset = field(default_factory=frozenset)


def split_prompts(cfg: SplitConfig = SplitConfig()) -> PromptSplit:
    """Train / held-out prompts: a prompt is held out iff it binds any held-out combination.

    Withheld combinations are drawn so that every shape, colour, number and relation still
    occurs in some training prompt of each category that uses it (single words are never new).
    """
    rng = random.Random(cfg.seed)
    pairs = [frozenset(p) for p in itertools.combinations(SHAPES, 2)]
    held: set[tuple] = {("pair", p) for p in rng.sample(pairs, cfg.pairs)}
    # distinct shapes and colours so no word loses all of its single-object colour prompts
    shapes, colors = rng.sample(SHAPES, len(SHAPES)), rng.sample(COLORS, len(COLORS))
    held |= {("binding", colors[i % len(colors)], shapes[i % len(shapes)]) for i in range(cfg.bindings)}
    counts = rng.sample(sorted(NUMBERS), len(NUMBERS))
    count_shapes = rng.sample(SHAPES, len(SHAPES))
    held |= {("count", counts[i % len(counts)], count_shapes[i % len(count_shapes)]) for i in range(cfg.counts)}
    free_triples = [(a, r, b) for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS
                    if ("pair", frozenset((a, b))) not in held]
    held |= {("position", *tr) for tr in rng.sample(free_triples, cfg.positions)}
    train, heldout = [], []
    for spec in all_prompts():
        (heldout if spec.combinations() & held else train).append(spec.text())
    return PromptSplit(train, heldout, frozenset(held))


# ----------------------------------------------------------------------------- scenes and rendering
@dataclass(frozen=True)
class SceneObject:
    """One object: centre (cx, cy) and radius r in pixels (y grows downwards)."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


# shape geometry, in units of the object's size r (the checker's templates use the same numbers)
SQUARE_HALF_SIDE = 0.85  # similar area to the circle of radius r
TRIANGLE_HALF_HEIGHT = 0.9  # apex up, height 1.8 r, base 2 r
DIAMOND_HALF_DIAGONAL = 1.1
# continuous bounding-box (width, height) of each shape in units of r: what the checker fits its
# templates to (derived from the numbers above, so drawing and checking share one geometry)
SHAPE_EXTENT: dict[str, tuple[float, float]] = {
    "circle": (2.0, 2.0),
    "square": (2 * SQUARE_HALF_SIDE, 2 * SQUARE_HALF_SIDE),
    "triangle": (2.0, 2 * TRIANGLE_HALF_HEIGHT),  # base 2 r
    "diamond": (2 * DIAMOND_HALF_DIAGONAL, 2 * DIAMOND_HALF_DIAGONAL),
}


def shape_template(shape: str, dx: np.ndarray, dy: np.ndarray, r) -> np.ndarray:
    """Boolean mask of offsets (dx, dy) from a shape's centre that lie inside it (broadcasts).

    circle: radius r; square: half-side 0.85 r (similar area); triangle: apex up, height 1.8 r,
    base 2 r; diamond: a square rotated 45 degrees with half-diagonal 1.1 r.
    """
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        frac = (dy + TRIANGLE_HALF_HEIGHT * r) / (2 * TRIANGLE_HALF_HEIGHT * r)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= r * frac)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= DIAMOND_HALF_DIAGONAL * r
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of pixels whose centre lies inside the shape: :func:`shape_template`
    evaluated in absolute pixel coordinates (the arithmetic every rendered dataset was drawn with)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "triangle":
        top, bottom = cy - TRIANGLE_HALF_HEIGHT * r, cy + TRIANGLE_HALF_HEIGHT * r
        frac = (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= r * frac)
    return shape_template(shape, dx, dy, r)


def render(objects: list[SceneObject], size: int) -> torch.Tensor:
    """Paint objects on a black canvas; returns [3, size, size] float32 in [-1, 1]."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    for o in objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.r, size)] = PALETTE[o.color]
    return torch.from_numpy(img).permute(2, 0, 1).mul(2).sub(1).contiguous()


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """Does centre ``a`` lie ``relation`` of centre ``b`` by more than ``margin`` pixels?"""
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation] > margin


def _box(o: SceneObject) -> tuple[float, float, float, float]:
    return o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r


def _separated(o: SceneObject, others: list[SceneObject], gap: float) -> bool:
    x0, y0, x1, y1 = _box(o)
    for p in others:
        a0, b0, a1, b1 = _box(p)
        if not (x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0):
            return False
    return True


def sample_scene(spec: PromptSpec, size: int, rng: np.random.Generator, max_tries: int = 500) -> list[SceneObject]:
    """Objects satisfying ``spec``: unspecified colours drawn uniformly, non-overlapping boxes
    (gap >= size/16 px, so same-coloured objects never touch), and for ``position`` a displacement along
    the named axis of >= size/4 that dominates the orthogonal one."""
    wanted = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    gap = 2.0 * size / 32
    for attempt in range(max_tries):
        # small canvases cannot always hold four full-size objects: shrink them slowly on failure
        shrink = 0.9 ** (attempt // 100)
        r_lo, r_hi = 0.15 * size * shrink, 0.19 * size * shrink
        placed: list[SceneObject] = []
        for shape, color in wanted:
            r = float(rng.uniform(r_lo, r_hi))
            for _ in range(50):
                o = SceneObject(shape, color or COLORS[rng.integers(len(COLORS))],
                                float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)), r)
                if _separated(o, placed, gap):
                    placed.append(o)
                    break
            else:
                break
        if len(placed) != len(wanted):
            continue
        if spec.relation is not None:
            a, b = (placed[0].cx, placed[0].cy), (placed[1].cx, placed[1].cy)
            along = abs(a[0] - b[0]) if spec.relation in ("left of", "right of") else abs(a[1] - b[1])
            ortho = abs(a[1] - b[1]) if spec.relation in ("left of", "right of") else abs(a[0] - b[0])
            if not (relation_holds(a, b, spec.relation, size / 4) and ortho <= along):
                continue
        return placed
    raise RuntimeError(f"could not place {spec.text()!r} on a {size}x{size} canvas in {max_tries} tries")


def render_dataset(prompts: list[str], n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` (image, caption) pairs with captions drawn uniformly from ``prompts``.

    Images are returned as uint8 [n, 3, size, size] (0 / 255 per channel) to keep large datasets
    small in memory; :func:`to_float` maps them back to [-1, 1].
    """
    if not prompts:
        raise ValueError("render_dataset needs at least one prompt")
    rng = np.random.default_rng(seed)
    captions = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    specs = {p: parse_prompt(p) for p in set(captions)}
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i, cap in enumerate(captions):
        images[i] = ((render(sample_scene(specs[cap], size, rng), size) + 1) * 127.5).round().to(torch.uint8)
    return images, captions


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..] in 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..] in [-1, 1] (clamped) -> uint8 in 0..255 on the CPU; the inverse of :func:`to_float`."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
