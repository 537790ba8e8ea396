"""Malformed PubLayNet / RICO files and bad ``-n`` values: one clear error naming the file (and the
annotation id) or the flag, never a raw exception, a traceback, or a silently accepted file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pgraft.apps.layout.cli import app
from pgraft.apps.layout.data import PUBLAYNET_CLASSES, load_publaynet, load_rico

CATEGORIES = [{"supercategory": "", "id": i + 1, "name": n} for i, n in enumerate(PUBLAYNET_CLASSES)]
BAD_ID = 42  # the id of the malformed annotation in every annotation-level case


def _doc(bad_ann: dict | None = None, **top) -> dict:
    """A valid one-page file (100 x 200 px) plus, if given, a second annotation with id 42 merged with ``bad_ann``."""
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10]}]
    if bad_ann is not None:
        anns.append({"id": BAD_ID, "image_id": 7, "category_id": 2, "bbox": [5, 5, 20, 20], **bad_ann})
    doc = {"images": [{"id": 7, "width": 100, "height": 200}], "annotations": anns, "categories": CATEGORIES}
    doc.update(top)
    return {k: v for k, v in doc.items() if v is not None}


def _without(key: str) -> dict:
    doc = _doc()
    del doc[key]
    return doc


def _ann_without(key: str) -> dict:
    doc = _doc({})
    del doc["annotations"][1][key]
    return doc


# (case id, file content: bytes / str written as is, anything else json.dumps'ed, words the message must hold,
#  whether the message must name the malformed annotation's id)
MALFORMED = [
    ("invalid-utf8", b'{"images": [{"id": 7, "file_name": "p\xe9ge.png", "width": 100, "height": 200}]}',
     "not UTF-8", False),
    ("binary", bytes(range(256)) * 4, "not UTF-8", False),
    ("not-json", "images: [], annotations: []", "invalid JSON", False),
    ("top-level-list", [_doc()], "JSON list", False),
    ("no-images", _without("images"), "'images'", False),
    ("no-annotations", _without("annotations"), "'annotations'", False),
    ("images-not-a-list", _doc(images={"7": {"width": 100, "height": 200}}), "'images' must be a list", False),
    ("images-empty", _doc(images=[]), "'images' is empty", False),
    ("categories-not-a-list", _doc(categories={"1": "text"}), "'categories' must be a list", False),
    ("categories-not-publaynet", _doc(categories=[{"id": 1, "name": "caption"}]), "categories[0]", False),
    ("image-not-an-object", _doc(images=[7]), "images[0]", False),
    ("image-zero-width", _doc(images=[{"id": 7, "width": 0, "height": 200}]), "positive width", False),
    ("image-width-string", _doc(images=[{"id": 7, "width": "100px", "height": 200}]), "width must be a number", False),
    ("image-duplicate-id", _doc(images=[{"id": 7, "width": 100, "height": 200}] * 2), "duplicate image id", False),
    ("annotation-not-an-object", _doc(annotations=[{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]},
                                                   "bbox"]), "annotations[1]", False),
    ("bbox-missing", _ann_without("bbox"), "bbox must be [x, y, w, h]", True),
    ("bbox-three-numbers", _doc({"bbox": [1, 2, 3]}), "bbox must be [x, y, w, h]", True),
    ("bbox-string", _doc({"bbox": [1, "2", 3, 4]}), "must be a number", True),
    ("bbox-null", _doc({"bbox": [1, None, 3, 4]}), "must be a number", True),
    ("bbox-nan", _doc({"bbox": [float("nan"), 2, 3, 4]}), "must be finite", True),
    ("bbox-infinity", _doc({"bbox": [float("inf"), 2, 3, 4]}), "must be finite", True),
    ("bbox-negative-width", _doc({"bbox": [1, 2, -3, 4]}), "positive width", True),
    ("bbox-zero-height", _doc({"bbox": [1, 2, 3, 0]}), "positive width", True),
    ("bbox-far-outside-page", _doc({"bbox": [500, 20, 10, 10]}), "outside the 100 x 200 page", True),
    ("bbox-overhanging-page", _doc({"bbox": [60, 20, 50, 10]}), "outside the 100 x 200 page", True),
    ("bbox-just-off-page", _doc({"bbox": [100.5, 20, 0.4, 10]}), "clipped to the page", True),
    ("category-true", _doc({"category_id": True}), "category_id True", True),
    ("category-unknown", _doc({"category_id": 6}), "unknown category_id 6", True),
    ("category-string", _doc({"category_id": "1"}), "unknown category_id '1'", True),
    ("category-list", _doc({"category_id": [1]}), "unknown category_id [1]", True),
    ("image-id-unknown", _doc({"image_id": 8}), "image_id not among", True),
]


def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / f"{name}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))  # NaN / Infinity come out as the (non-standard) tokens
    return path


def test_malformed_cases_are_valid_json_but_for_the_bad_part(tmp_path):
    # the valid document every case starts from loads, so each case fails for its own defect only
    d = load_publaynet(_write(tmp_path, "good", _doc({})))
    assert d.counts().tolist() == [2] and d.classes[0, :2].tolist() == [0, 1]


@pytest.mark.parametrize("name,content,words,names_annotation", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_publaynet_malformed_file_refused_naming_file(tmp_path, name, content, words, names_annotation):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError) as info:
        load_publaynet(path)
    message = str(info.value)
    assert str(path) in message and words in message
    assert "\n" not in message  # one line
    if names_annotation:
        assert f"id={BAD_ID}" in message


def test_publaynet_image_id_true_is_not_image_1(tmp_path):
    # Python's True == 1: without the type check the annotation landed on image 1
    doc = _doc({"image_id": True}, images=[{"id": 1, "width": 100, "height": 200}])
    doc["annotations"][0]["image_id"] = 1
    path = _write(tmp_path, "true-image-id", doc)
    with pytest.raises(ValueError, match=rf"true-image-id\.json: annotations\[1\] \(id={BAD_ID}.*image_id"):
        load_publaynet(path)


def test_publaynet_small_overshoot_is_clipped(tmp_path):
    # a box poking 0.5 px left and 0.8 px right of a 100 px page (rounding) is clipped to the page
    doc = _doc(annotations=[{"id": 1, "image_id": 7, "category_id": 1, "bbox": [-0.5, 100, 101.3, 100.4]}])
    d = load_publaynet(_write(tmp_path, "overshoot", doc))
    assert torch.allclose(d.boxes[0, 0], torch.tensor([0.5, 0.75, 1.0, 0.5]), atol=1e-6)
    # 1.5 px past the right edge of a 100 px page is beyond the 1 % tolerance, unless it is raised
    doc = _doc(annotations=[{"id": 3, "image_id": 7, "category_id": 1, "bbox": [50, 0, 51.5, 10]}])
    path = _write(tmp_path, "overshoot2", doc)
    with pytest.raises(ValueError, match=r"overshoot2\.json: annotations\[0\] \(id=3.*by 1\.5% of the page"):
        load_publaynet(path)
    assert load_publaynet(path, overshoot_tol=0.02).boxes[0, 0, 2].item() == pytest.approx(0.5)


@pytest.mark.parametrize("node,words", [
    ({"bounds": [0, 0, "10", 10], "componentLabel": "Text"}, "bounds [x1, y1, x2, y2] must be a number"),
    ({"bounds": [0, 0, float("nan"), 10], "componentLabel": "Text"}, "must be finite"),
    ("Text", "a node must be an object"),
])
def test_rico_malformed_node_refused_naming_file_and_node(tmp_path, node, words):
    path = _write(tmp_path, "screen", {"bounds": [0, 0, 100, 200], "children": [node]})
    with pytest.raises(ValueError) as info:
        load_rico(path)
    assert f"{path}: root.children[0]" in str(info.value) and words in str(info.value)


def test_cli_pretrain_on_malformed_file_is_a_usage_error(tmp_path):
    bad = _write(tmp_path, "nan-box", _doc({"bbox": [float("nan"), 2, 3, 4]}))
    result = CliRunner().invoke(app, ["pretrain", "--preset", "tiny", "--dataset", "publaynet", "--data", str(bad),
                                      "--out", str(tmp_path / "base"), "--quiet"], env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert str(bad) in output and f"id={BAD_ID}" in output and "Traceback" not in output


# ----------------------------------------------------------------------------- -n of sample / evaluate
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from pgraft.apps.layout.train import get_preset, pretrain_layout

    out = tmp_path_factory.mktemp("layout-n") / "base"
    pretrain_layout(get_preset("tiny"), out, show_progress=False)
    return out


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("n", ["0", "-5"])
def test_cli_n_below_one_names_the_flag(tiny_base, command, n):
    result = CliRunner().invoke(app, [command, str(tiny_base), "-n", n, "--quiet"], env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "'-n'" in output and f"got {n}" in output and "Traceback" not in output
