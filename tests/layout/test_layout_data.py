"""Synthetic generator, loaders on fixtures, and clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgraft.apps.layout.data import (
    PAD_CLASS,
    PUBLAYNET_CLASSES,
    RICO_CLASSES,
    from_state,
    load_layouts,
    load_publaynet,
    load_rico,
    pack,
    state_to_page,
    synthetic_layouts,
    to_state,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_generator_is_deterministic_and_prefix_stable():
    a = synthetic_layouts(40, "train", seed=3, max_elements=12)
    b = synthetic_layouts(40, "train", seed=3, max_elements=12)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.classes, b.classes) and torch.equal(a.mask, b.mask)
    # page i does not depend on how many pages were asked for
    c = synthetic_layouts(10, "train", seed=3, max_elements=12)
    assert torch.equal(c.boxes, a.boxes[:10])
    # a different seed or split gives different pages
    assert not torch.equal(synthetic_layouts(10, "train", seed=4, max_elements=12).boxes, c.boxes)
    assert not torch.equal(synthetic_layouts(10, "test", seed=3, max_elements=12).boxes, c.boxes)


def test_generator_conventions():
    d = synthetic_layouts(200, "train", seed=0, max_elements=15)
    assert d.boxes.shape == (200, 15, 4) and d.class_names == PUBLAYNET_CLASSES
    counts = d.counts()
    assert counts.min() >= 1 and counts.max() <= 15
    # real slots first, padding is class -1 with zero boxes
    assert torch.equal(d.mask, torch.arange(15) < counts.unsqueeze(1))
    assert (d.classes[~d.mask] == PAD_CLASS).all() and (d.boxes[~d.mask] == 0).all()
    b = d.boxes[d.mask]
    l, t, r, bt = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    tol = 1e-5
    assert (b[:, 2:] > 0).all() and (l >= -tol).all() and (t >= -tol).all() and (r <= 1 + tol).all() and (bt <= 1 + tol).all()
    assert set(d.classes[d.mask].tolist()) == set(range(5))  # every class occurs
    probs = d.count_probs()
    assert len(probs) == 16 and probs[0] == 0 and abs(sum(probs) - 1) < 1e-9


def test_state_round_trip():
    d = synthetic_layouts(7, "test", max_elements=9)
    s = to_state(d)
    assert s["boxes"].min() >= -1 - 1e-5 and s["boxes"].max() <= 1 + 1e-5
    back = from_state(s, d.class_names)
    assert torch.allclose(back.boxes, d.boxes, atol=1e-6) and torch.equal(back.classes, d.classes)
    assert torch.allclose(state_to_page(s["boxes"])[d.mask], d.boxes[d.mask], atol=1e-6)


def test_publaynet_fixture():
    d = load_publaynet(FIXTURES / "publaynet_tiny.json", max_elements=5)
    assert len(d) == 3 and d.counts().tolist() == [4, 2, 1]
    # title of image 341427: bbox [61, 60, 490, 24] on a 612 x 792 page -> centre box
    assert d.classes[0, 0] == PUBLAYNET_CLASSES.index("title")
    expected = torch.tensor([(61 + 245) / 612, (60 + 12) / 792, 490 / 612, 24 / 792])
    assert torch.allclose(d.boxes[0, 0], expected, atol=1e-6)
    assert d.classes[1, :2].tolist() == [PUBLAYNET_CLASSES.index("table"), PUBLAYNET_CLASSES.index("list")]
    assert torch.allclose(d.boxes[2, 0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    # max_elements: the 4-element page is skipped (LayoutDM protocol) or truncated
    assert len(load_publaynet(FIXTURES / "publaynet_tiny.json", max_elements=3)) == 2
    assert load_publaynet(FIXTURES / "publaynet_tiny.json", 3, too_many="truncate").counts().tolist() == [3, 2, 1]


def test_rico_fixture():
    d = load_rico(FIXTURES / "rico", max_elements=6)
    assert d.class_names == RICO_CLASSES and len(RICO_CLASSES) == 25
    assert d.counts().tolist() == [5, 3]
    names = [RICO_CLASSES[c] for c in d.classes[0, :5].tolist()]
    assert names == ["Toolbar", "Icon", "Text", "List Item", "List Item"]
    assert torch.allclose(d.boxes[0, 0], torch.tensor([0.5, 182 / 2560, 1.0, 196 / 2560]))
    # the advertisement sticking out of the screen is clipped to the page
    ad = d.boxes[1, 2]
    assert torch.allclose(ad, torch.tensor([0.5, (2200 + 2560) / 2 / 2560, 1.0, 360 / 2560]))
    assert len(load_layouts("rico", path=FIXTURES / "rico")) == 2


def _write(tmp_path: Path, name: str, doc) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=1))
    return p


def _coco(ann: dict) -> dict:
    return {"images": [{"id": 7, "width": 100, "height": 200}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10]}, ann]}


def test_publaynet_bad_inputs_name_path_and_element(tmp_path):
    p = _write(tmp_path, "neg.json", _coco({"id": 99, "image_id": 7, "category_id": 1, "bbox": [5, 5, -3, 10]}))
    with pytest.raises(ValueError, match=r"neg\.json.*annotations\[1\].*id=99.*positive width"):
        load_publaynet(p)
    p = _write(tmp_path, "cat.json", _coco({"id": 5, "image_id": 7, "category_id": 9, "bbox": [5, 5, 3, 10]}))
    with pytest.raises(ValueError, match=r"cat\.json.*annotations\[1\].*unknown category_id 9"):
        load_publaynet(p)
    doc = _coco({"id": 5, "image_id": 7, "category_id": 1, "bbox": [5, 5, 3, 10]})
    doc["images"].append({"id": 8, "width": 100, "height": 100})
    p = _write(tmp_path, "empty.json", doc)
    with pytest.raises(ValueError, match=r"empty\.json.*id=8.*no annotations"):
        load_publaynet(p)
    assert len(load_publaynet(p, skip_empty=True)) == 1
    p = tmp_path / "broken.json"
    p.write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(ValueError, match=r"broken\.json:2:"):
        load_publaynet(p)


def test_rico_bad_inputs_name_path_and_node(tmp_path):
    bad = {"bounds": [0, 0, 100, 200], "children": [
        {"bounds": [0, 0, 50, 50], "componentLabel": "Text"},
        {"bounds": [0, 0, 100, 100], "children": [{"bounds": [60, 10, 40, 20], "componentLabel": "Icon"}]}]}
    with pytest.raises(ValueError, match=r"neg\.json: root\.children\[1\]\.children\[0\] \(Icon\).*w=-20"):
        load_rico(_write(tmp_path, "neg.json", bad))
    unknown = {"bounds": [0, 0, 100, 200], "children": [{"bounds": [0, 0, 5, 5], "componentLabel": "Hologram"}]}
    with pytest.raises(ValueError, match=r"unk\.json: root\.children\[0\].*unknown componentLabel 'Hologram'"):
        load_rico(_write(tmp_path, "unk.json", unknown))
    empty = {"bounds": [0, 0, 100, 200], "children": [{"bounds": [0, 0, 5, 5]}]}
    with pytest.raises(ValueError, match=r"empty\.json.*empty layout"):
        load_rico(_write(tmp_path, "empty.json", empty))


def test_pack_rejects_oversized_layouts():
    with pytest.raises(ValueError, match="3 elements > max_elements=2"):
        pack([[(0, 0.5, 0.5, 0.1, 0.1)] * 3], 2, PUBLAYNET_CLASSES)
