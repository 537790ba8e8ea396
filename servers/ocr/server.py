"""OCR reward server (Flow-GRPO's OCR reward) speaking pgraft's JSON protocol.

reward(image, prompt) = 1 - min(d, n) / n, where ``target`` is the text between the first pair of
double quotes in the prompt (the whole prompt when it quotes nothing), ``recognised`` is what PaddleOCR
reads in the image (the lines it finds, joined), both lower-cased with spaces removed, n = len(target)
and d = 0 when target occurs in recognised, else the Levenshtein (edit) distance between them. So 1
is a perfect rendering, 0 is nothing of it (d is clipped at n: reading many unrelated characters costs
no more than reading nothing). A prompt whose quotes hold no text is refused (HTTP 400).

Run with real weights (in the environment of ``servers/ocr/requirements.txt``; PaddleOCR fetches its
English detection / recognition models on first use, or point ``--det-model-dir`` / ``--rec-model-dir``
at local copies)::

    python servers/ocr/server.py --port 8001 [--use-gpu]
    pgraft t2i train ... --reward http://127.0.0.1:8001/

``--stub TEXT``: a deterministic stub recogniser that reads TEXT in every image (tests, no paddle).
Standalone: stdlib + numpy + Pillow + (outside stub mode) paddleocr; see ``servers/reward_protocol.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reward_protocol import BadRequest, add_server_arguments, serve  # noqa: E402

Recogniser = Callable[[Any], str]  # uint8 [H, W, 3] RGB -> recognised text


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes of ``prompt`` (all of it without quotes)."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else prompt


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions), O(len(a) len(b))."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def ocr_reward(prompt: str, recognised: str) -> float:
    """1 - min(d, n) / n of the module docstring; :class:`BadRequest` when the prompt quotes empty text."""
    target, seen = normalise(quoted_text(prompt)), normalise(recognised)
    if not target:
        raise BadRequest(f"prompt {prompt!r} quotes no text to render")
    distance = 0 if target in seen else min(edit_distance(seen, target), len(target))
    return 1.0 - distance / len(target)


def paddle_recogniser(use_gpu: bool, lang: str, det_dir: Optional[str], rec_dir: Optional[str]) -> Recogniser:
    """PaddleOCR 2.x without the angle classifier, as Flow-GRPO: the lines with a positive confidence, joined."""
    from paddleocr import PaddleOCR

    kwargs = {"use_angle_cls": False, "lang": lang, "use_gpu": use_gpu, "show_log": False}
    if det_dir:
        kwargs["det_model_dir"] = det_dir
    if rec_dir:
        kwargs["rec_model_dir"] = rec_dir
    ocr = PaddleOCR(**kwargs)

    def read(image) -> str:
        result = ocr.ocr(image, cls=False)
        lines = result[0] if result else None
        return "".join(text for _, (text, confidence) in lines or [] if confidence > 0)

    return read


def make_score(recognise: Recogniser):
    def score(images: List[Any], prompts: List[str]) -> List[float]:
        for p in prompts:  # refuse a bad prompt before any OCR
            ocr_reward(p, "")
        return [ocr_reward(p, recognise(x)) for x, p in zip(images, prompts)]

    return score


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="OCR reward server (PaddleOCR; Flow-GRPO's OCR reward).")
    add_server_arguments(parser)
    parser.add_argument("--stub", metavar="TEXT", default=None,
                        help="stub recogniser reading TEXT in every image (no paddle; for tests)")
    parser.add_argument("--use-gpu", action="store_true", help="run PaddleOCR on the GPU")
    parser.add_argument("--lang", default="en", help="PaddleOCR language (default en)")
    parser.add_argument("--det-model-dir", default=None, help="local PaddleOCR detection model")
    parser.add_argument("--rec-model-dir", default=None, help="local PaddleOCR recognition model")
    args = parser.parse_args(argv)
    if args.stub is not None:
        text = args.stub
        recognise: Recogniser = lambda image: text  # noqa: E731
        name = f"ocr (stub: reads {text!r})"
    else:
        recognise = paddle_recogniser(args.use_gpu, args.lang, args.det_model_dir, args.rec_model_dir)
        name = "ocr (PaddleOCR)"
    serve(make_score(recognise), args.host, args.port, name, quiet=not args.verbose)


if __name__ == "__main__":
    main()
