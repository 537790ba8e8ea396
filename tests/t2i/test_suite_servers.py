"""The standalone reward servers of ``servers/`` (issue 31, item 2) in stub mode: each is started as a
subprocess on a free 127.0.0.1 port, scored through pgraft's own client (``make_reward(URL)``, the
``--reward http://...`` path), checked against closed-form answers, and stopped (SIGTERM). The GenEval
rules and the OCR reward are also checked as pure functions, imported from the scripts.

Select them with ``pytest tests/t2i -k "server or suite"``."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pgraft.apps.t2i.remote import RemoteReward, RemoteRewardError
from pgraft.apps.t2i.rewards import make_reward
from pgraft.apps.t2i.world import to_float

SERVERS = Path(__file__).resolve().parents[2] / "servers"


def _module(name: str):
    """servers/<name>/server.py imported as a module (stub-only code paths: no mmdet / paddle)."""
    spec = importlib.util.spec_from_file_location(f"pgraft_test_{name}_server", SERVERS / name / "server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def running(name: str, *args: str) -> Iterator[str]:
    """Start servers/<name>/server.py --port 0 ARGS; yield its URL (read from its first stderr line)."""
    proc = subprocess.Popen([sys.executable, str(SERVERS / name / "server.py"), "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert match, f"{name} server did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0  # SIGTERM: a clean stop
        proc.stderr.close()


def solid(*colours: tuple[int, int, int], size: int = 24) -> torch.Tensor:
    """Images [B, 3, size, size] in [-1, 1], each one flat RGB colour (exact on the 8-bit grid)."""
    u8 = torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, size, size)
    return to_float(u8.contiguous())


WHITE, BLACK, RED, BLUE, PINK = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255), (255, 192, 203)


# ----------------------------------------------------------------------------- OCR
def test_ocr_server_reward_is_one_minus_clipped_normalised_edit_distance():
    ocr = _module("ocr")
    assert ocr.edit_distance("kitten", "sitting") == 3 and ocr.edit_distance("", "abc") == 3
    assert ocr.quoted_text('a sign that says "Hello World" in red') == "Hello World"
    assert ocr.ocr_reward('a sign "Hello World"', "hello world!") == 1.0  # contained, case and spaces ignored
    assert ocr.ocr_reward('a sign "pgrXft"', "pgraft") == pytest.approx(1 - 1 / 6)
    assert ocr.ocr_reward('a sign "ab"', "pgraft") == 0.0  # d clipped at len(target)
    assert ocr.ocr_reward("no quotes here", "noquoteshere") == 1.0  # the whole prompt is the target
    with pytest.raises(ValueError, match="quotes no text"):
        ocr.ocr_reward('a sign reading ""', "x")


def test_ocr_server_stub_scores_closed_forms_through_the_client():
    prompts = ['a sign that says "PGRAFT"', 'a neon sign "pgrXft"', 'a poster "ab"', 'a mug with "graft"']
    with running("ocr", "--stub", "pgraft") as url:
        reward = make_reward(url)
        assert isinstance(reward, RemoteReward)
        scores = reward(solid(WHITE, BLACK, RED, BLUE), prompts)
        assert scores.dtype == torch.float64
        torch.testing.assert_close(scores, torch.tensor([1.0, 1 - 1 / 6, 0.0, 1.0], dtype=torch.float64))
        reward.probe()  # the empty batch is answered {"scores": []}
        with pytest.raises(RemoteRewardError, match="HTTP 400.*quotes no text"):
            RemoteReward(url + "#attempts=1")(solid(WHITE), ['a sign ""'])


# ----------------------------------------------------------------------------- GenEval
def test_geneval_server_relative_position_and_thresholds_follow_geneval():
    g = _module("geneval")
    a, b = np.array([0, 0, 10, 10, 1.0]), np.array([20, 0, 30, 10, 1.0])
    assert g.relative_position(a, b) == {"left of"} and g.relative_position(b, a) == {"right of"}
    assert g.relative_position(np.array([0, 30, 10, 40]), a) == {"below"}
    assert g.relative_position(np.array([1, 0, 11, 10]), a) == set()  # offset 1 < 0.1 x (10 + 10): none
    diag = g.relative_position(np.array([20, 20, 30, 30]), a)  # 45 degrees: 18/20 each way > 0.5
    assert diag == {"right of", "below"}
    raw = {"cup": [(np.array([0, 0, 5, 5, s]), None) for s in (0.2, 0.5, 0.95, 0.8)]}
    assert [float(d[0][4]) for d in g.keep_detections(raw, "two_object")["cup"]] == [0.95, 0.8, 0.5]
    assert [float(d[0][4]) for d in g.keep_detections(raw, "counting")["cup"]] == [0.95]
    assert g.keep_detections(raw, "counting", g.Rules(counting_threshold=0.99)) == {}
    dedup = g.keep_detections(raw, "single_object", g.Rules(max_overlap=0.5))["cup"]  # same box: one kept
    assert len(dedup) == 1 and g.iou([0, 0, 9, 9], [0, 0, 4, 9]) == 0.5


def test_geneval_server_judge_counting_excludes_and_colours():
    g = _module("geneval")
    meta = {"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}]}
    box = (np.array([0, 0, 4, 4, 1.0]), None)
    never = lambda *a: pytest.fail("no colour asked")  # noqa: E731
    assert g.judge(None, {"bus": [box] * 3}, meta, never) == g.Verdict(True, 2, 2, ())
    four = g.judge(None, {"bus": [box] * 4}, meta, never)
    assert (four.correct, four.met, four.reasons) == (False, 1, ("expected bus<4, found 4",))
    assert g.judge(None, {"bus": [box] * 2}, meta, never).met == 1  # too few, but not too many
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 1, "color": "blue"}]}
    calls = []
    verdict = g.judge("img", {"car": [box], "dog": [box]}, meta, lambda im, f, n: calls.append(n) or ["red"])
    assert (verdict.correct, verdict.met, verdict.clauses, calls) == (False, 1, 2, ["car", "dog"])


def test_geneval_server_stub_scores_closed_forms_through_the_client():
    metadata = [json.loads(line) for line in (SERVERS.parent / "apps/t2i/data/geneval_metadata.jsonl").open()]
    by_tag = {}
    for m in metadata:
        by_tag.setdefault(m["tag"], m["prompt"])
    position = next(m["prompt"] for m in metadata if m["tag"] == "position")
    assert "a photo of a red car" in {m["prompt"] for m in metadata}
    attr = "a photo of a yellow dining table and a pink dog"
    cases = [(WHITE, by_tag["single_object"], 1.0, 1.0), (BLACK, by_tag["single_object"], 0.0, 0.0),
             (RED, "a photo of a red car", 1.0, 1.0), (BLUE, "a photo of a red car", 0.0, 0.0),
             (WHITE, position, 1.0, 1.0), (WHITE, by_tag["counting"], 1.0, 1.0),
             (PINK, attr, 0.0, 0.5)]  # the stub sees pink: the dog's clause met, the table's not
    images = solid(*[c for c, *_ in cases], size=64)
    prompts = [p for _, p, *_ in cases]
    for mode, column in (("strict", 2), ("partial", 3)):
        with running("geneval", "--stub", "--score", mode) as url:
            scores = make_reward(url)(images, prompts)
            expected = torch.tensor([case[column] for case in cases], dtype=torch.float64)
            torch.testing.assert_close(scores, expected)
            with pytest.raises(RemoteRewardError, match="HTTP 400.*not in the GenEval metadata"):
                RemoteReward(url + "#attempts=1")(solid(WHITE), ["a photo of a unicorn"])
