"""``pgraft t2i evaluate --suite ...`` (issue 31, item 3): the suites' protocols and prompt readers, the
per-category table (GenEval's category-balanced overall), the reward-hacking panel, and an end-to-end
shapes suite on a tiny run (its base sampled with the same seeds, a reward server in the panel).

Select them with ``pytest tests/t2i -k suite``."""

from __future__ import annotations

import contextlib
import json
import threading

import pandas as pd
import pytest
import torch
from clitools import invoke, ok

from pgraft.apps.t2i.checker import check
from pgraft.apps.t2i.remote import make_server
from pgraft.apps.t2i.rewards import checker_reward
from pgraft.apps.t2i.suites import (
    SUITES,
    PanelEntry,
    build_panel,
    category_means,
    get_suite,
    panel_table,
    parse_panel,
)
from pgraft.apps.t2i.train import PretrainT2IConfig, load_pipeline, pretrain_world, sample_images
from pgraft.apps.t2i.world import CATEGORIES, to_float, to_uint8
from pgraft.core.errors import UsageError
from pgraft.core.state import load_state


# ----------------------------------------------------------------------------- protocols and readers
def test_suite_protocols_and_shipped_prompt_sets():
    geneval = get_suite("geneval").load(None)
    assert len(geneval) == 553 and set(geneval.categories) == set(CATEGORIES)
    assert (SUITES["geneval"].per_prompt, SUITES["geneval"].expected) == (4, 553)
    assert SUITES["drawbench"].expected == 200 and SUITES["genai-bench"].expected == 1600
    shapes = get_suite("shapes").load(None)
    assert shapes.source == "heldout" and shapes.in_grammar()
    assert get_suite("shapes").load("all").source == "all"
    with pytest.raises(UsageError, match="unknown suite 'gen-eval'"):
        get_suite("gen-eval")


@pytest.mark.parametrize("name", ["drawbench", "genai-bench", "ocr"])
def test_suite_without_shipped_prompts_is_refused_saying_where_to_get_them(name):
    with pytest.raises(UsageError, match=f"--suite {name} needs your copy of its prompts: --prompts PATH"):
        SUITES[name].load(None)


def test_suite_readers_take_the_benchmarks_own_formats(tmp_path):
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text('Prompts,Category\n"A red colored car.",Colors\n"Three cats and one dog.",Counting\n')
    p = SUITES["drawbench"].load(str(drawbench))
    assert p.prompts == ["A red colored car.", "Three cats and one dog."] and p.categories == ["Colors", "Counting"]
    genai = tmp_path / "genai_image.json"
    genai.write_text(json.dumps({"00001": {"prompt": "a cat", "basic_skills": ["Attribute"], "advanced_skills": []},
                                 "00002": {"prompt": "no dog", "basic_skills": [], "advanced_skills": ["Negation"]}}))
    p = SUITES["genai-bench"].load(str(genai))
    assert p.prompts == ["a cat", "no dog"] and p.categories == ["basic", "advanced"]
    ocr = tmp_path / "test.txt"
    ocr.write_text('A sign that says "pgraft"\n\nA mug with "GRAFT" on it\n')
    p = SUITES["ocr"].load(str(ocr))
    assert len(p) == 2 and p.categories == [None, None]
    bad = tmp_path / "bad.csv"
    bad.write_text("caption_id,what\n1,x\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: no prompt column"):
        SUITES["drawbench"].load(str(bad))


# ----------------------------------------------------------------------------- tables and the panel
def test_suite_category_means_balance_categories_and_panel_change_is_the_difference():
    samples = pd.DataFrame({"model": ["base"] * 4 + ["finetuned"] * 4,
                            "prompt": list("abcd") * 2, "category": ["x", "x", "x", "y"] * 2,
                            "r": [0, 0, 1, 1, 1, 1, 1, 0], "s": [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]})
    table = category_means(samples, ["r", "s"])
    assert list(table.index) == ["x", "y", "overall"]
    assert table.loc["x", ("r", "base")] == pytest.approx(1 / 3) and table.loc["y", ("r", "finetuned")] == 0
    # overall is the mean of the category means (1/3 and 1), not the pooled mean (1/2)
    assert table.loc["overall", ("r", "base")] == pytest.approx((1 / 3 + 1) / 2)
    assert table[("n", "")].tolist() == [3, 1, 4]
    entries = [PanelEntry("r", "training", None), PanelEntry("s", "panel", None)]
    panel = panel_table(table, entries)
    assert panel["role"].tolist() == ["training", "panel"]
    assert panel.loc["s", "base"] == pytest.approx((2 + 4) / 2) and panel.loc["s", "change"] == pytest.approx(-3)
    assert panel.loc["r", "change"] == pytest.approx((1 + 0) / 2 - (1 / 3 + 1) / 2)


def test_suite_panel_parsing_and_automatic_members():
    assert parse_panel("clipscore=/w/clip, geneval=http://127.0.0.1:9/,checker") == [
        ("clipscore", "/w/clip"), ("geneval", "http://127.0.0.1:9/"), ("checker", None)]
    for bad, match in [("=x", "expected NAME"), ("a=", "expected NAME"), ("checker,checker", "twice")]:
        with pytest.raises(UsageError, match=match):
            parse_panel(bad)
    made = []

    def make(name, weights=None, device="cpu"):
        made.append((name, weights))
        return name

    training = PanelEntry("vqa", "training", "trained")
    labels = [e.label for e in build_panel(training, "g=http://127.0.0.1:9/", True, make=make, shipped_scorer="S")]
    assert labels == ["vqa", "g", "checker"]  # the shipped vqa scorer is the training reward already
    assert made == [("http://127.0.0.1:9/", None), ("checker", None)]
    out = build_panel(PanelEntry("t", "training", None), None, False, make=make, shipped_scorer="S")
    assert [e.label for e in out] == ["t"]  # outside the grammar no checker, no shipped scorer
    with pytest.raises(UsageError, match="the exact checker scores only prompts of the shapes world"):
        build_panel(PanelEntry("checker", "training", None), None, False, make=make)
    with pytest.raises(UsageError, match="'pickscorez': not a reward name"):
        build_panel(training, "pickscorez=/w", True, make=make)


# ----------------------------------------------------------------------------- end to end on a tiny run
@contextlib.contextmanager
def serving_checker():
    server = make_server(checker_reward, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    pretrain_world(PretrainT2IConfig(preset="tiny", steps=8, n_images=64, batch_size=8, warmup=2), root / "base",
                   show_progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_base):
    root = tiny_base
    ok("t2i", "train", "--out", str(root / "run"), "--model", str(root / "base"), "--prompts", "heldout",
       "--reward", "checker", "--rounds", "1", "--groups", "2", "--m", "2", "--k", "1", "--train-steps", "1",
       "--batch-size", "2", "--n-steps", "3", "--lora", "2", "--sample-batch-size", "4", "--quiet")
    return root


@pytest.mark.slow
def test_suite_shapes_on_a_run_prints_categories_and_the_reward_hacking_panel(tiny_run):
    run, base = tiny_run / "run", tiny_run / "base"
    with serving_checker() as url:
        output = ok("t2i", "evaluate", "--suite", "shapes", "--run", str(run), "--per-prompt", "1",
                    "--panel", f"remote={url}", "--quiet")
    out = run / "eval" / "suite_shapes"
    assert "reward-hacking panel" in output and "color_attr" in output and "overall" in output
    for name in ("samples.csv", "categories.csv", "categories.png", "panel.csv", "grid.png", "grid_base.png",
                 "suite.json"):
        assert (out / name).is_file(), name
    samples = pd.read_csv(out / "samples.csv")
    assert len(samples) == 2 * 62 and set(samples["model"]) == {"base", "finetuned"}  # 62 held-out prompts
    panel = pd.read_csv(out / "panel.csv", index_col=0)
    assert panel.index.tolist() == ["checker", "remote", "vqa"]  # the run's training reward first
    assert panel["role"].tolist() == ["training", "panel", "panel"]
    assert panel["change"].to_numpy() == pytest.approx((panel["finetuned"] - panel["base"]).to_numpy())
    # the base is sampled as `evaluate --base` would, with the suite's seed (2) and the run's sampler (3 steps)
    pipe = load_pipeline(base)
    heldout = samples.loc[samples["model"] == "base", "prompt"].tolist()
    expected, _ = sample_images(pipe, pipe.denoiser, heldout, 1, 0.0, 3, None, 2, show_progress=False)
    images = {m: load_state(out / f"images_{m}.safetensors") for m in ("base", "finetuned")}
    torch.testing.assert_close(images["base"], expected)
    categories = pd.read_csv(out / "categories.csv", index_col=0)
    for model, x in images.items():
        rows = samples[samples["model"] == model]
        correct = check(x, rows["prompt"].tolist()).double().numpy()
        assert rows["checker"].to_numpy() == pytest.approx(correct)
        # the server scored the same images as 8-bit PNGs
        assert rows["remote"].to_numpy() == pytest.approx(checker_reward(to_float(to_uint8(x)), rows["prompt"]))
        per_cat = rows.assign(c=correct).groupby("category", sort=False)["c"].mean()
        for cat, value in per_cat.items():
            assert categories.loc[cat, f"checker[{model}]"] == pytest.approx(value)
        assert categories.loc["overall", f"checker[{model}]"] == pytest.approx(per_cat.mean())
        assert panel.loc["checker", model] == pytest.approx(per_cat.mean())
    protocol = json.loads((out / "suite.json").read_text())
    assert protocol["suite"]["name"] == "shapes" and protocol["used"]["n_prompts"] == 62


def test_suite_cli_refusals_and_help_are_one_line():
    assert "--panel" in ok("t2i", "evaluate", "--suite", "geneval", "--help")
    for args, needle in [(["--suite", "drawbench"], "--suite drawbench needs your copy of its prompts"),
                         (["--suite", "geneval-2"], "unknown suite 'geneval-2'"),
                         (["--suite", "shapes", "--panel", "nope=/x"], "'nope': not a reward name")]:
        result, output = invoke("t2i", "evaluate", *args, "--quiet")  # the shipped base
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(lines) == 1 and needle in output, output
