"""FID feature network (train, save, reload), the metric row, rendering, Fourier box features."""

from __future__ import annotations

import torch

from pgraft.apps.layout.data import synthetic_layouts
from pgraft.apps.layout.features import (
    FeatureTrainConfig,
    corrupt,
    layout_features,
    load_feature_net,
    train_feature_net,
)
from pgraft.apps.layout.metrics import evaluate
from pgraft.apps.layout.model import PRESETS, LayoutDenoiser
from pgraft.apps.layout.render import render_grid


def test_corrupt_keeps_conventions(gen):
    d = synthetic_layouts(33, "train", max_elements=7)
    b, c, m = corrupt(d.boxes, d.classes, d.mask, 5, gen)
    assert b.shape == d.boxes.shape and c.shape == d.classes.shape and m.shape == d.mask.shape
    assert m.any(1).all()  # no page emptied
    assert (c[~m] == -1).all() and (b[~m] == 0).all() and ((c[m] >= 0) & (c[m] < 5)).all()


def test_feature_net_round_trip_and_metric_row(tmp_path, gen):
    train = synthetic_layouts(64, "train", max_elements=7)
    test = synthetic_layouts(24, "test", max_elements=7)
    net = train_feature_net(train, FeatureTrainConfig(steps=3, batch_size=8, d_model=16, n_layers=1, n_heads=2),
                            tmp_path / "fid")
    again = load_feature_net(tmp_path / "fid")
    f1 = layout_features(net, test.boxes, test.classes, test.mask, batch_size=5)
    f2 = layout_features(again, test.boxes, test.classes, test.mask)
    assert f1.shape == (24, 16) and torch.allclose(f1, f2, atol=1e-6)
    row = evaluate(test, test, again)
    assert set(row) == {"n", "alignment", "overlap", "out_of_page", "fid", "max_iou", "max_iou_coverage",
                        "max_iou_n", "max_iou_ref_n", "class_tv"}
    assert abs(row["fid"]) < 1e-6 and row["max_iou"] > 0.999 and row["class_tv"] == 0.0
    assert render_grid(test.subset(slice(0, 5)), tmp_path / "grid.png", n_cols=3).stat().st_size > 0


def test_fourier_box_features_keep_equivariance():
    torch.manual_seed(0)
    model = LayoutDenoiser(max_elements=5, fourier_features=3, **PRESETS["tiny"]).eval()
    z = torch.rand(2, 5, 4) * 2 - 1
    assert model.box_features(z).shape == (2, 5, 4 * 7)
    x = {"boxes": z, "classes": torch.randint(0, 5, (2, 5)), "mask": torch.ones(2, 5, dtype=torch.bool)}
    perm = torch.tensor([2, 4, 0, 1, 3])
    t = torch.full((2,), 0.5)
    out = model(x, t)["velocity"]
    outp = model({k: v[:, perm] for k, v in x.items()}, t)["velocity"]
    assert torch.allclose(out[:, perm], outp, atol=1e-5)
