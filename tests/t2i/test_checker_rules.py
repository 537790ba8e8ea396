"""The checker's rule sets: GenEval's (default: top-1 = largest object per shape, box centres) and
the legacy rules (every object's colour, any pair, pixel centroids), on scenes drawn by the world's
own renderer."""

from __future__ import annotations

import numpy as np
import pytest

from pgraft.apps.t2i import world
from pgraft.apps.t2i.checker import (
    GENEVAL_RULES,
    LEGACY_RULES,
    RULE_SETS,
    RULES,
    CheckerConfig,
    check,
    check_spec,
    detect,
    ranked,
    relative_position,
)
from pgraft.apps.t2i.world import CATEGORIES, SHAPE_EXTENT, SceneObject, parse_prompt, render

GENEVAL, LEGACY = CheckerConfig(), CheckerConfig(rules="legacy")


def verdicts(objects: list[SceneObject], prompt: str) -> tuple[bool, bool]:
    """(GenEval, legacy) verdicts of ``prompt`` on the render of ``objects`` (32x32), via :func:`check`."""
    image = render(objects, 32)[None]
    return bool(check(image, [prompt], GENEVAL)[0]), bool(check(image, [prompt], LEGACY)[0])


def test_default_rules_are_genevals_and_tables_cover_every_category():
    assert CheckerConfig().rules == "geneval" and RULE_SETS == ("geneval", "legacy")
    assert RULES == {"geneval": GENEVAL_RULES, "legacy": LEGACY_RULES}
    for table in RULES.values():
        assert set(table) == set(CATEGORIES)
    differ = {c for c in CATEGORIES if GENEVAL_RULES[c] is not LEGACY_RULES[c]}
    assert differ == {"colors", "position", "color_attr"}
    with pytest.raises(ValueError, match="unknown checker rules"):
        CheckerConfig(rules="strict")


def test_top1_is_the_largest_object_of_the_shape():
    scene = [SceneObject("circle", "blue", 26.0, 7.0, 3.0), SceneObject("circle", "red", 10.0, 20.0, 6.0),
             SceneObject("square", "green", 24.0, 24.0, 4.0)]
    objs = detect(render(scene, 32))
    top = ranked(objs, "circle")
    assert [d.color for d in top] == ["red", "blue"] and top[0].area > top[1].area
    assert [d.color for d in ranked(objs, "circle", "blue")] == ["blue"] and ranked(objs, "diamond") == []


def test_colors_judges_the_largest_object_of_the_shape():
    # (a) the large circle is red, a small extra circle is blue: GenEval looks at the top-1 object only
    scene = [SceneObject("circle", "red", 10.0, 18.0, 6.0), SceneObject("circle", "blue", 26.0, 7.0, 3.0)]
    assert sorted((d.shape, d.color) for d in detect(render(scene, 32))) == [("circle", "blue"), ("circle", "red")]
    assert verdicts(scene, "a photo of a red circle") == (True, False)
    assert verdicts(scene, "a photo of a blue circle") == (False, False)  # the smaller one does not count


def test_position_uses_the_top1_objects_only():
    # (b) top-1 circle (large, right) is right of the square; only a small extra circle is left of it
    scene = [SceneObject("circle", "red", 26.0, 18.0, 5.5), SceneObject("square", "green", 14.0, 18.0, 5.0),
             SceneObject("circle", "blue", 4.0, 16.0, 3.0)]
    assert sorted(d.shape for d in detect(render(scene, 32))) == ["circle", "circle", "square"]
    assert verdicts(scene, "a photo of a circle left of a square") == (False, True)
    assert verdicts(scene, "a photo of a circle right of a square") == (True, True)


def test_color_attr_uses_the_top1_object_of_each_shape():
    # the largest square is blue; a small red square exists: "a red square" binds to the top-1 only
    scene = [SceneObject("square", "blue", 9.0, 9.0, 5.5), SceneObject("square", "red", 26.0, 6.0, 3.5),
             SceneObject("circle", "green", 20.0, 22.0, 5.0)]
    assert verdicts(scene, "a photo of a red square and a green circle") == (False, True)
    assert verdicts(scene, "a photo of a blue square and a green circle") == (True, True)


def test_position_is_decided_by_box_centres_not_centroids():
    # (c) a triangle's pixel centroid sits ~0.3 r below its box centre; here that flips "right of"
    scene = [SceneObject("circle", "red", 6.5, 6.5, 4.5), SceneObject("triangle", "blue", 18.5, 22.5, 5.0)]
    tri, circ = (ranked(detect(render(scene, 32)), s)[0] for s in ("triangle", "circle"))
    assert tri.cx == pytest.approx(tri.box_center[0]) and tri.cy > tri.box_center[1] + 1  # centroid lower
    assert relative_position(tri, circ, 0.1, "box") == {"right of", "below"}
    assert relative_position(tri, circ, 0.1, "centroid") == {"below"}
    assert verdicts(scene, "a photo of a triangle right of a circle") == (True, False)
    assert verdicts(scene, "a photo of a triangle below a circle") == (True, True)
    with pytest.raises(ValueError, match="center"):
        relative_position(tri, circ, 0.1, "middle")


def test_box_center_is_the_drawn_centre_and_detections_keep_the_box():
    rng = np.random.default_rng(1)
    for shape in world.SHAPES:
        spec = parse_prompt(f"a photo of a {shape}")
        obj = world.sample_scene(spec, 32, rng)[0]
        (d,) = detect(render([obj], 32))
        assert abs(d.box_center[0] - obj.cx) <= 1.0 and abs(d.box_center[1] - obj.cy) <= 1.0
        kx, ky = SHAPE_EXTENT[shape]  # the box spans the shape extent, up to pixelization
        assert abs(d.w - kx * obj.r) <= 2.0 and abs(d.h - ky * obj.r) <= 2.0  # pointed tips lose a row


def test_rules_agree_on_rendered_truth():
    images, captions = world.render_dataset([s.text() for s in world.all_prompts()], 200, 32, seed=4)
    x = world.to_float(images)
    g, leg = check(x, captions, GENEVAL), check(x, captions, LEGACY)
    assert g.all() and leg.all()
    for spec, img in zip(map(parse_prompt, captions[:20]), x[:20]):
        objs = detect(img)
        assert check_spec(spec, objs, 32) == check_spec(spec, objs, 32, GENEVAL)  # default is GenEval's


def test_geometry_has_one_source():
    # the checker's box extents are derived from the renderer's constants, not restated
    assert SHAPE_EXTENT["square"] == (2 * world.SQUARE_HALF_SIDE,) * 2
    assert SHAPE_EXTENT["triangle"] == (2.0, 2 * world.TRIANGLE_HALF_HEIGHT)
    assert SHAPE_EXTENT["diamond"] == (2 * world.DIAMOND_HALF_DIAGONAL,) * 2
    import inspect

    from pgraft.apps.t2i import checker
    src = inspect.getsource(checker)
    for const in ("0.85", "0.9", "1.1", "1.7", "1.8", "2.2"):
        assert const not in src, const
