"""The app contract (:mod:`pgraft.core.app`): every app's ``APP`` names its base the same way,
says what an empty directory lacks, finds nothing lacking in its shipped base, and refuses a
missing base directory in one line naming the command that makes one; a fake tiny app gets the
same behaviour (pretrain into an empty directory once, then load; refuse a damaged one; the
shipped base only with its own preset; a run's recorded base checked) from the contract alone."""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from clitools import invoke
from torch import nn

from pgraft.core.app import App
from pgraft.core.checkpoint import load_pretrained
from pgraft.core.errors import UsageError
from pgraft.core.pretrain import PretrainConfig, infinite_batches, pretrain
from pgraft.core.shipped import SHIPPED, BaseChanged, BaseDamaged, ship_base, weights_sha256

torch.set_num_threads(1)

# app -> (what an empty directory lacks first, a preset the shipped base is not)
APPS = {"toy": ("no config.json", None), "molecule": ("no molecule.json", "tiny"),
        "layout": ("no layout_preset.json", "tiny"), "t2i": ("no unet/", None),
        "flow": ("no config.json", None)}
# where an app declares APP (flow has no train module: its base lives in pretrain)
HOME = {"flow": "pretrain"}


def _app(name: str) -> App:
    return importlib.import_module(f"pgraft.apps.{name}.{HOME.get(name, 'train')}").APP


@pytest.mark.parametrize("name", APPS)
def test_every_app_declares_the_contract(name, tmp_path):
    app = _app(name)
    assert isinstance(app, App) and app.name == name
    assert app.lacks(tmp_path) == APPS[name][0]
    if name != "flow":  # flow has no default base: its commands name one, or a correct dir
        module = importlib.import_module(f"pgraft.apps.{name}.{'presets' if name == 't2i' else 'train'}")
        assert app.default_base == getattr(module, "DEFAULT_MODEL" if name == "t2i" else "DEFAULT_BASE")
    if not app.ships:
        pytest.skip(f"this checkout ships no {name} base")
    assert app.default_base == SHIPPED
    assert app.lacks(app.shipped) is None
    assert app.resolve_base(SHIPPED) == app.shipped
    target = app.sample_target(None, SHIPPED)
    assert target.shipped and not target.is_run and target.outputs == Path("runs") / name / "shipped-base"
    wrong = APPS[name][1]
    if wrong is not None:
        with pytest.raises(UsageError, match=f"the shipped base is the 'default' preset, not '{wrong}'"):
            app.resolve_base(SHIPPED, wrong)


def test_the_toy_shipped_base_fits_only_its_pretraining_settings():
    from pgraft.apps.toy.train import APP, ToyConfig

    assert APP.resolve_base(SHIPPED, ToyConfig(reward="ring", n_steps=7, eta=0.0)) == APP.shipped  # sampler only
    with pytest.raises(UsageError, match=r"not mixture='2d', hidden=8; pass --base DIR") as err:
        APP.resolve_base(SHIPPED, ToyConfig(mixture="2d", hidden=8))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", APPS)
def test_sample_refuses_a_missing_base_directory_in_one_line_naming_pretrain(name, tmp_path):
    missing = tmp_path / "missing"
    result, output = invoke(name, "sample", "--base", str(missing))
    lines = [line for line in result.output.splitlines() if "does not exist" in line]
    assert result.exit_code == 2 and "Traceback" not in output and len(lines) == 1, output
    assert f"--base {missing} does not exist; make one with `pgraft {name} pretrain --out {missing}`" in output


def test_t2i_never_pretrains_so_its_base_must_exist(tmp_path):
    app = _app("t2i")
    missing = tmp_path / "missing"
    with pytest.raises(UsageError, match=rf"--model {missing} does not exist: make a base with `pgraft t2i pretrain "
                                         rf"--out {missing}` \(~45 min") as err:
        app.resolve_base(missing)
    assert "\n" not in str(err.value)
    assert _app("toy").resolve_base(missing) == missing  # an app that pretrains: DIR is where it goes


def test_flow_never_pretrains_and_a_correct_dir_is_no_base(tmp_path):
    app = _app("flow")
    missing = tmp_path / "missing"
    with pytest.raises(UsageError, match=rf"--base {missing} does not exist: make a base with `pgraft flow pretrain "
                                         rf"--out {missing}`"):
        app.resolve_base(missing)
    (tmp_path / "correct.json").write_text("{}")
    assert app.lacks(tmp_path) == "it holds correct.json: a `pgraft flow correct` directory"
    assert app.is_run(tmp_path) == "no config.json"  # a correct dir needs the noise flow's checkpoint too


# ----------------------------------------------------------------------------- a fake tiny app
class Line(nn.Linear):
    def __init__(self, n: int = 3) -> None:
        super().__init__(n, n)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def fake(tmp_path):
    """(a fake app with a ``meta.json`` beside its checkpoint and a shipped dir not made yet, the
    presets it pretrained)."""
    pretrained = []

    def pretrain_line(directory: Path, preset: str, show_progress: bool) -> None:
        pretrained.append(preset)
        torch.manual_seed(0)
        data = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
        loss = lambda m, x, c, g: ((m(x) - 2 * x) ** 2).mean()  # noqa: E731
        steps = {"tiny": 2, "default": 3}[preset]
        pretrain(Line(), infinite_batches(data, 8, 0), loss, PretrainConfig(steps=steps, warmup=1), directory,
                 {"n": 3}, show_progress=show_progress)
        (directory / "meta.json").write_text(json.dumps({"preset": preset}))

    app = App(name="fake", shipped=tmp_path / "package" / "bases" / "default",
              load=lambda d: load_pretrained(Line, d).eval(), model_class="Line", files=("meta.json",),
              pretrain=pretrain_line, presets={"tiny": 2, "default": 3})
    return app, pretrained


def test_a_fake_app_pretrains_an_empty_directory_once_then_loads_it(fake, tmp_path, capsys):
    app, pretrained = fake
    assert app.default_base == "runs/fake/base" and not app.ships
    mine = tmp_path / "mine"
    assert app.lacks(mine) == "no meta.json"
    model = app.load_or_pretrain(mine, "tiny", show_progress=False)
    assert pretrained == ["tiny"] and isinstance(model, Line) and app.lacks(mine) is None
    lines = [line for line in capsys.readouterr().out.splitlines() if "pretraining" in line]
    assert lines == [f"No finished fake base in {mine}: pretraining the 'tiny' preset first."]
    before = _hashes(mine)
    again = app.load_or_pretrain(mine, "tiny", show_progress=False)
    assert pretrained == ["tiny"] and _hashes(mine) == before  # loaded, not pretrained again
    torch.testing.assert_close(again.weight, model.weight)

    data = bytearray((mine / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (mine / "model.safetensors").write_bytes(bytes(data))
    damaged = _hashes(mine)
    with pytest.raises(BaseDamaged, match=r"model\.safetensors does not match its checksum"):
        app.load_or_pretrain(mine, "tiny", show_progress=False)
    assert pretrained == ["tiny"] and _hashes(mine) == damaged  # never pretrained over


def test_a_fake_app_names_its_shipped_base_and_checks_a_runs_base(fake, tmp_path):
    app, _ = fake
    with pytest.raises(UsageError, match="this installation has no shipped base"):
        app.resolve_base(SHIPPED)
    made = tmp_path / "made"
    app.load_or_pretrain(made, "default", show_progress=False)
    ship_base(made, app.shipped, ["config.json", "model.safetensors", "meta.json"], {"command": "test"})
    assert app.ships and app.default_base == SHIPPED and app.lacks(app.shipped) is None
    assert app.resolve_base(SHIPPED, "default") == app.shipped
    with pytest.raises(UsageError, match="the shipped base is the 'default' preset, not 'tiny'; pass --base DIR"):
        app.resolve_base(SHIPPED, "tiny")
    section = {"base": SHIPPED, "base_sha256": weights_sha256(app.shipped)}
    assert app.run_base(section) == app.shipped
    with pytest.raises(BaseChanged, match="sampling it would pair"):
        app.run_base({**section, "base_sha256": "0" * 64})


def test_a_fake_app_hook_and_an_app_that_never_pretrains(fake, tmp_path):
    app, _ = fake
    made = tmp_path / "made"
    app.load_or_pretrain(made, "tiny", show_progress=False)
    hooked = replace(app, check=lambda d: "it holds other.json" if (d / "other.json").is_file() else None)
    assert hooked.lacks(made) is None
    (made / "other.json").write_text("{}")
    assert hooked.lacks(made) == "it holds other.json" and app.lacks(made) is None
    never = replace(app, pretrain=None)
    with pytest.raises(UsageError, match=rf"--base {tmp_path / 'empty'} does not exist: make a base with "
                                         r"`pgraft fake pretrain --out"):
        never.resolve_base(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"holds no fake base; make one with `pgraft fake pretrain --out"):
        never.load_or_pretrain(tmp_path / "empty")
    # a base that is no checkpoint (t2i's pipeline directories): the check alone decides, nothing is pretrained
    pipeline = replace(never, checkpoint=False, check=lambda d: None if (d / "unet").is_dir() else "no unet/",
                       load=lambda d: ("loaded", d))
    assert pipeline.lacks(made) == "no unet/"
    with pytest.raises(UsageError, match=r"is not a fake base \(no unet/\); make one with `pgraft fake pretrain"):
        pipeline.load_or_pretrain(made)
    (made / "unet").mkdir()
    assert pipeline.lacks(made) is None and pipeline.load_or_pretrain(made) == ("loaded", made)


def test_a_fake_app_sample_target_tells_runs_from_bases(fake, tmp_path):
    import typer

    app, _ = fake
    base = tmp_path / "base"
    app.load_or_pretrain(base, "tiny", show_progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"app": {"fake": {"base": str(base)}}}))
    assert app.sample_target(run, None).is_run
    target = app.sample_target(base, None)
    assert not target.is_run and not target.shipped and target.outputs == base
    with pytest.raises(typer.BadParameter, match=r"make one with `pgraft fake pretrain --out .*nowhere`"):
        app.sample_target(None, str(tmp_path / "nowhere"))
    with pytest.raises(typer.BadParameter, match="neither a fake run .* nor a fake base model"):
        app.sample_target(tmp_path, None)
