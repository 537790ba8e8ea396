"""GenEval reward server (Ghosh et al. 2023, djghosh13/geneval) speaking pgraft's JSON protocol.

Each prompt is looked up in GenEval's metadata (``--metadata``; default: the copy pgraft ships,
``apps/t2i/data/geneval_metadata.jsonl``) and each image judged by GenEval's rules on the detections of
Mask2Former (mmdet 2.x, COCO classes) with CLIP colour classification:

- detections of a class are kept above the confidence threshold (0.3; 0.9 for ``counting`` prompts),
  most confident first, at most 16 per class, optionally de-duplicated by IoU (``--max-overlap``; off);
- every ``include`` clause needs ``count`` detections of its class; with ``color``, CLIP must call at
  least ``count`` of the ``count`` most confident ones that colour (zero-shot over GenEval's ten colours,
  three templates, crops masked on a grey background); with ``position [rel, g]``, every one of them must
  stand in relation ``rel`` to every object of clause ``g`` (centre offset shrunk by 0.1 x the summed
  box sizes, then the unit direction's component beyond 0.5 names left of / right of / above / below);
- any ``exclude`` clause met (``count`` or more detections: one too many objects) fails the image.

Score: 1.0 if the image passes (GenEval's ``correct``), else 0.0; ``--score partial``: the share of
clauses (include and exclude) met, a denser training signal. Unknown prompts are refused (HTTP 400).

Run with real weights (in the environment of ``servers/geneval/requirements.txt``; GenEval's
``evaluation/download_models.sh`` fetches the Mask2Former checkpoint; open_clip fetches ViT-L-14)::

    python servers/geneval/server.py --detector-checkpoint DIR/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \\
        --port 8002 [--device cuda]

``--stub``: a deterministic stub detector (it "finds" exactly the objects a prompt asks for, laid out so
that its relation holds, unless the image is all black: then nothing) and a stub colour classifier (the
nearest of ten RGB anchors to the mean colour of the masked crop); the rules above are the real ones.
Standalone: stdlib + numpy + Pillow + (outside stub mode) mmdet, open_clip; see ``servers/reward_protocol.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reward_protocol import BadRequest, add_server_arguments, serve  # noqa: E402

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
SHIPPED_METADATA = Path(__file__).resolve().parents[2] / "apps" / "t2i" / "data" / "geneval_metadata.jsonl"
DEFAULT_CONFIG = "configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"  # inside mmdet

# one detection: (box [x0, y0, x1, y1, confidence] as a numpy array, mask bool [H, W] or None)
Detection = Tuple[Any, Any]
Objects = Dict[str, List[Detection]]
ColourFn = Callable[[Any, List[Detection], str], List[str]]  # (image, detections, class) -> colours


@dataclass(frozen=True)
class Rules:
    """GenEval's evaluation options (its ``--options`` defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # 1: no IoU de-duplication
    position_threshold: float = 0.1


# ----------------------------------------------------------------------------- GenEval's rules (pure)
def load_metadata(path: Path) -> Dict[str, dict]:
    """prompt -> its metadata line (``tag``, ``include``, optional ``exclude``)."""
    table = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            entry = json.loads(line)
            if not isinstance(entry, dict) or "prompt" not in entry or "include" not in entry:
                raise ValueError(f"{path}:{i}: not a GenEval metadata line (need prompt, tag, include)")
            table[entry["prompt"]] = entry
    return table


def iou(a, b) -> float:
    """Intersection over union of two boxes in GenEval's inclusive-pixel convention (+1 per side)."""
    def area(box) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(raw: Dict[str, List[Detection]], tag: str, rules: Rules = Rules()) -> Objects:
    """Per class: detections above the tag's threshold, most confident first, at most ``max_objects``,
    greedily de-duplicated at IoU >= ``max_overlap`` (none at 1); classes with none are left out."""
    floor = rules.counting_threshold if tag == "counting" else rules.threshold
    kept: Objects = {}
    for name, dets in raw.items():
        order = sorted((d for d in dets if float(d[0][4]) > floor), key=lambda d: -float(d[0][4]))
        order = order[: rules.max_objects]
        chosen: List[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                order = [d for d in order if iou(best[0], d[0]) < rules.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(box_a, box_b, threshold: float = 0.1) -> Set[str]:
    """Relations of box A to box B: the centre offset, shrunk towards 0 by ``threshold`` x (A's + B's
    size) per axis; its unit direction beyond 0.5 on an axis names left of / right of / above / below
    (image y grows downwards); no relation when the shrunk offset vanishes."""
    import numpy as np

    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if hit}


@dataclass(frozen=True)
class Verdict:
    correct: bool
    met: int  # clauses met
    clauses: int  # include + exclude clauses
    reasons: Tuple[str, ...]


def judge(image, objects: Objects, metadata: dict, colours: ColourFn, rules: Rules = Rules()) -> Verdict:
    """GenEval's verdict on one image from its kept detections (module docstring)."""
    met, reasons, groups = 0, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            seen = colours(image, found, name)
            if seen.count(clause["color"]) < count:
                ok = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found {seen.count(clause['color'])}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relative_position(a[0], b[0], rules.position_threshold)
                         for a in found for b in groups[target]):
                ok = False
                reasons.append(f"expected {name} {relation} target")
        groups.append(found if ok else None)
        met += ok
    for clause in metadata.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
        else:
            met += 1
    clauses = len(metadata.get("include", [])) + len(metadata.get("exclude", []))
    return Verdict(not reasons, met, clauses, tuple(reasons))


# ----------------------------------------------------------------------------- stub detector / colours
ANCHORS = {"red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
           "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 192, 203), "brown": (139, 69, 19),
           "black": (0, 0, 0), "white": (255, 255, 255)}
STEP = {"left of": (-3, 0), "right of": (3, 0), "above": (0, -3), "below": (0, 3)}


def stub_detect(image, metadata: dict) -> Dict[str, List[Detection]]:
    """The objects ``metadata`` asks for, confidence 0.95, boxes of 1/8 of the image side (a clause with
    a relation 3 box sizes away from its target's first box in that direction; copies of a count stacked
    2 px apart), masks filling their boxes; nothing when the image is all black (every value < 32)."""
    import numpy as np

    h, w = image.shape[:2]
    if int(image.max()) < 32:
        return {}
    side = max(2, min(h, w) // 8)
    raw: Dict[str, List[Detection]] = {}
    centres: List[Tuple[float, float]] = []
    for clause in metadata.get("include", []):
        cx, cy = w / 2, h / 2
        if "position" in clause:
            relation, target = clause["position"]
            tx, ty = centres[target]
            cx, cy = tx + STEP[relation][0] * side, ty + STEP[relation][1] * side
        centres.append((cx, cy))
        for k in range(clause["count"]):
            x0, y0 = cx - side / 2, cy - side / 2 + 2 * k
            box = np.array([x0, y0, x0 + side, y0 + side, 0.95])
            mask = np.zeros((h, w), dtype=bool)
            mask[max(0, int(y0)):max(0, int(y0 + side)), max(0, int(x0)):max(0, int(x0 + side))] = True
            raw.setdefault(clause["class"], []).append((box, mask))
    return raw


def stub_colours(image, found: List[Detection], name: str) -> List[str]:
    """Per detection: the anchor colour nearest (RGB, Euclidean) to the mean of its mask's pixels
    (the whole box when the mask is empty or absent)."""
    import numpy as np

    out = []
    for box, mask in found:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
        region = image[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
        if mask is not None and mask.any():
            pixels = image[mask]
        else:
            pixels = region.reshape(-1, 3) if region.size else image.reshape(-1, 3)
        mean = pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
        out.append(min(COLORS, key=lambda c: float(((mean - np.array(ANCHORS[c])) ** 2).sum())))
    return out


# ----------------------------------------------------------------------------- real models
def mmdet_detector(config: str, checkpoint: str, device: str, class_names: Optional[List[str]]):
    """Mask2Former via mmdet 2.x: image (RGB uint8) -> {class: [(box5, mask)]}."""
    import os

    import mmdet
    from mmdet.apis import inference_detector, init_detector

    if not os.path.isabs(config) and not os.path.exists(config):
        config = os.path.join(os.path.dirname(mmdet.__file__), "..", config)
    model = init_detector(config, checkpoint, device=device)
    names = class_names or list(model.CLASSES)

    def detect(image, metadata: dict) -> Dict[str, List[Detection]]:
        result = inference_detector(model, image[..., ::-1].copy())  # mmdet reads BGR, as from a file
        boxes = result[0] if isinstance(result, tuple) else result
        masks = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        return {name: [(boxes[i][j], None if masks is None else masks[i][j]) for j in range(len(boxes[i]))]
                for i, name in enumerate(names)}

    return detect


def clip_colours(arch: str, device: str, background: str = "#999") -> ColourFn:
    """Zero-shot colour of each detection with open_clip ``arch`` (OpenAI weights): the crop of its box
    with everything outside its mask painted ``background``, against the mean normalised text embedding
    of GenEval's three templates per colour."""
    import open_clip
    import torch
    from PIL import Image

    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained="openai", device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    cache: Dict[str, Any] = {}
    templates = ["a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object"]

    @torch.no_grad()
    def classifier(name: str):
        if name not in cache:
            columns = []
            for c in COLORS:
                emb = model.encode_text(tokenizer([t.format(c=c, name=name) for t in templates]).to(device))
                emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                columns.append(emb / emb.norm())
            cache[name] = torch.stack(columns, dim=1)
        return cache[name]

    @torch.no_grad()
    def colours(image, found: List[Detection], name: str) -> List[str]:
        pil = Image.fromarray(image)
        blank = Image.new("RGB", pil.size, color=background)
        crops = []
        for box, mask in found:
            img = Image.composite(pil, blank, Image.fromarray(mask)) if mask is not None else pil
            crops.append(transform(img.crop(tuple(float(v) for v in box[:4]))))
        feats = torch.nn.functional.normalize(model.encode_image(torch.stack(crops).to(device)), dim=-1)
        return [COLORS[i] for i in (feats @ classifier(name)).argmax(1).tolist()]

    return colours


# ----------------------------------------------------------------------------- server
def make_score(metadata: Dict[str, dict], detect, colours: ColourFn, rules: Rules, partial: bool):
    def score(images: List[Any], prompts: List[str]) -> List[float]:
        unknown = [p for p in prompts if p not in metadata]
        if unknown:
            raise BadRequest(f"prompt {unknown[0]!r} is not in the GenEval metadata (--metadata FILE)")
        out = []
        for image, prompt in zip(images, prompts):
            meta = metadata[prompt]
            verdict = judge(image, keep_detections(detect(image, meta), meta["tag"], rules), meta, colours, rules)
            out.append(verdict.met / max(verdict.clauses, 1) if partial else float(verdict.correct))
        return out

    return score


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="GenEval reward server (Mask2Former + CLIP colours).")
    add_server_arguments(parser)
    parser.add_argument("--metadata", default=str(SHIPPED_METADATA),
                        help="GenEval evaluation_metadata.jsonl (default: pgraft's shipped copy)")
    parser.add_argument("--score", choices=["strict", "partial"], default="strict",
                        help="strict: GenEval's 0/1 verdict; partial: the share of clauses met")
    parser.add_argument("--stub", action="store_true", help="stub detector and colour classifier (tests)")
    parser.add_argument("--detector-config", default=DEFAULT_CONFIG, help="mmdet config (relative: inside mmdet)")
    parser.add_argument("--detector-checkpoint", default=None, help="Mask2Former .pth (GenEval's download_models.sh)")
    parser.add_argument("--class-names", default=None, help="file of class names, one a line (default: the model's)")
    parser.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture (OpenAI weights)")
    parser.add_argument("--device", default="cuda", help="torch device of both models")
    for field in Rules.__dataclass_fields__.values():
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"GenEval option {field.name} (default {field.default})")
    args = parser.parse_args(argv)
    try:
        metadata = load_metadata(Path(args.metadata))
    except (OSError, ValueError) as err:
        parser.error(f"--metadata {args.metadata}: {err}")
    rules = Rules(**{name: getattr(args, name) for name in Rules.__dataclass_fields__})
    if args.stub:
        detect, colours, name = stub_detect, stub_colours, "geneval (stub detector)"
    else:
        if not args.detector_checkpoint:
            parser.error("--detector-checkpoint is required outside --stub (GenEval's Mask2Former .pth)")
        names = None
        if args.class_names:
            names = [x.strip() for x in Path(args.class_names).read_text().splitlines() if x.strip()]
        detect = mmdet_detector(args.detector_config, args.detector_checkpoint, args.device, names)
        colours, name = clip_colours(args.clip_model, args.device), "geneval (Mask2Former + CLIP)"
    serve(make_score(metadata, detect, colours, rules, args.score == "partial"), args.host, args.port,
          f"{name}, {args.score}", quiet=not args.verbose)


if __name__ == "__main__":
    main()
