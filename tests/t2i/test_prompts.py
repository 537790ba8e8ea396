"""Prompt sets and user prompt files."""

from __future__ import annotations

import json

import pytest

from pgraft.apps.t2i.prompts import PROMPT_SETS, load_prompt_file, load_prompts


def test_registered_sets():
    train, held = load_prompts("train"), load_prompts("heldout")
    assert train.in_grammar() and held.in_grammar()
    assert len(load_prompts("all")) == len(train) + len(held)
    geneval = load_prompts("geneval")
    assert len(geneval) == 553 and set(geneval.categories) == {"single_object", "two_object", "counting", "colors",
                                                                "position", "color_attr"}
    assert set(PROMPT_SETS) >= {"train", "heldout", "all", "geneval"}


def test_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na photo of a circle\n\n  a photo of two squares  \n")
    assert load_prompt_file(tmp_path / "p.txt").prompts == ["a photo of a circle", "a photo of two squares"]
    (tmp_path / "p.csv").write_text("prompt,category\na photo of a circle,single_object\na cat,\n")
    s = load_prompt_file(tmp_path / "p.csv")
    assert s.prompts == ["a photo of a circle", "a cat"] and s.categories == ["single_object", None]
    assert not s.in_grammar()
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a photo of a red circle", "tag": "colors"}) + "\n")
    assert load_prompts(tmp_path / "p.jsonl").categories == ["colors"]


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"prompt": "a"}\n{not json}\n', r"bad.jsonl:2: invalid JSON"),
    ("nokey.jsonl", '{"text": "a"}\n', r"nokey.jsonl:1: .*'prompt' key"),
    ("empty.jsonl", '{"prompt": "  "}\n', r"empty.jsonl:1: prompt must be a non-empty"),
    ("nocol.csv", "text\na\n", r"nocol.csv:1: .*'prompt' column"),
    ("badcat.csv", "prompt,category\na,dogs\n", r"badcat.csv:2: unknown category 'dogs'"),
    ("blank.txt", "# only a comment\n\n", r"holds no prompts"),
    ("p.yaml", "a\n", r"unsupported extension"),
])
def test_bad_files_name_path_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_prompt_file(tmp_path / name)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a registered set"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.txt")
