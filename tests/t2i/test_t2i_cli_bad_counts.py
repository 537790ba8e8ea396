"""``pgraft t2i sample/evaluate`` sample counts (--per-prompt, --max-prompts; t2i has no -n) below 1:
a usage error naming the flag, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pgraft.apps.t2i.cli import app
from pgraft.apps.t2i.train import PretrainT2IConfig, pretrain_world


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-n")
    pretrain_world(PretrainT2IConfig(preset="tiny", steps=8, n_images=64, batch_size=8, warmup=2), root / "base",
                   show_progress=False)
    result = CliRunner().invoke(app, ["train", "--out", str(root / "run"), "--model", str(root / "base"),
                                      "--prompts", "heldout", "--reward", "checker", "--rounds", "1", "--groups", "2",
                                      "--m", "2", "--k", "1", "--train-steps", "1", "--batch-size", "2",
                                      "--n-steps", "3", "--lora", "2", "--sample-batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run"


@pytest.mark.parametrize("args,flag,value", [
    (["sample", "{run}", "--per-prompt", "0"], "--per-prompt", "0"),
    (["sample", "{run}", "--per-prompt", "-1"], "--per-prompt", "-1"),
    (["sample", "{run}", "--max-prompts", "0"], "--max-prompts", "0"),
    (["evaluate", "--run", "{run}", "--per-prompt", "0", "--reward", "checker"], "--per-prompt", "0"),
    (["evaluate", "--run", "{run}", "--per-prompt", "-2", "--reward", "checker"], "--per-prompt", "-2"),
])
def test_counts_below_one_name_the_flag(tiny_run, args, flag, value):
    result = CliRunner().invoke(app, [a.format(run=tiny_run) for a in args] + ["--quiet"], env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert f"'{flag}'" in output and f"got {value}" in output and "Traceback" not in output
    assert not (tiny_run / "samples").exists() and not (tiny_run / "eval").exists()



def test_evaluate_on_a_run_whose_config_was_cut_names_the_file(tiny_run, tmp_path, capsys):
    """`pgraft t2i evaluate --run R` where R's config.json was cut short: one error line naming that
    file, before any sampling (the JSON error alone, without the file, before). `sample` refuses the
    same run through its RUN_DIR check."""
    import shutil

    from pgraft.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(SystemExit) as exit_:
        main(["t2i", "evaluate", "--run", str(run), "--reward", "checker", "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {config}: damaged JSON (Unterminated string")
    assert not (run / "eval").exists()
