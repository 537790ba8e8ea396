"""A base directory of the user's (``--base DIR``) is verified like the shipped one and never
pretrained over: a flipped bit, an edited or garbage manifest, a missing file or an unreadable one
is refused naming the file, and the directory is left byte for byte as it was; an empty one is
pretrained into; one without a manifest loads with a warning. A run records the digest of its
base's config.json beside the weights', so sampling after the config changed is refused naming it.
A non-finite loss that comes from what was read (the frozen base, the accepted set) says so instead
of blaming the learning rate."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from clitools import invoke
from torch import nn

from pgraft.apps.toy.model import ToyDenoiser
from pgraft.apps.toy.train import APP, ToyConfig, make_problem
from pgraft.core.errors import UsageError
from pgraft.core.grs import GRSConfig
from pgraft.core.pretrain import NonFiniteLossError, PretrainConfig, infinite_batches, pretrain
from pgraft.core.shipped import (
    BaseChanged,
    BaseDamaged,
    base_digests,
    check_same_base,
    config_sha256,
    open_base_dir,
    recorded_base,
    weights_sha256,
)
from pgraft.core.trainer import GraftConfig, run_graft

SHIPPED_TOY = APP.shipped
TINY_TRAIN = ("--rounds", "1", "--groups", "4", "--m", "2", "--k", "1", "--train-steps", "1", "--batch-size", "4",
              "--quiet")


def _copy(tmp_path: Path, name: str = "mine") -> Path:
    dest = tmp_path / name
    shutil.copytree(SHIPPED_TOY, dest)
    return dest


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _flip_bit(path: Path, offset: int = 100_000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_manifest_sha(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    digest = manifest["files"]["model.safetensors"]["sha256"][0]
    manifest["files"]["model.safetensors"]["sha256"] = [("0" if digest[0] != "0" else "1") + digest[1:]]
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _no_manifest_flipped_bit(d: Path) -> None:
    (d / "manifest.json").unlink()
    _flip_bit(d / "model.safetensors")


def _garbage_config_no_manifest(d: Path) -> None:
    (d / "manifest.json").unlink()
    (d / "config.json").write_text('{"_class": "ToyDenoiser", "depth": ')


def _weights_only(d: Path) -> None:
    (d / "manifest.json").unlink()
    (d / "config.json").unlink()


# damage -> what the refusal names
DAMAGES = {
    "flipped-weight-bit": (lambda d: _flip_bit(d / "model.safetensors"), r"model\.safetensors does not match"),
    "edited-manifest-sha": (_flip_manifest_sha, r"model\.safetensors does not match its checksum"),
    "garbage-manifest": (lambda d: (d / "manifest.json").write_text("not json {"), r"manifest\.json is not a valid"),
    "manifest-deleted-flipped-bit": (_no_manifest_flipped_bit,
                                     r"model\.safetensors does not match the sha256 recorded in .*SHIPPED\.json"),
    "weights-deleted": (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    "config-deleted": (lambda d: (d / "config.json").unlink(), r"config\.json is missing"),
    "config-and-manifest-deleted": (_weights_only, r"no complete base \(missing config\.json\); refusing to pretrain"),
    "garbage-config-no-manifest": (_garbage_config_no_manifest, r"config\.json is not valid JSON"),
}


def _damaged_copy(tmp_path: Path, damage: str) -> tuple[Path, str, dict[str, str]]:
    """A copy of the shipped toy base with ``damage`` done to it, the pattern its refusal names, and
    the hashes of its files (to compare after the refusal)."""
    mine = _copy(tmp_path)
    damage_fn, names = DAMAGES[damage]
    damage_fn(mine)
    return mine, names, _hashes(mine)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_user_base_is_refused_naming_the_file_and_left_as_it_is(tmp_path, damage):
    mine, names, before = _damaged_copy(tmp_path, damage)
    with pytest.raises(BaseDamaged, match=names) as info:
        open_base_dir(mine)
    assert "\n" not in str(info.value) and str(mine) in str(info.value)
    assert _hashes(mine) == before


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_toy_train_refuses_a_damaged_base_and_never_pretrains_over_it(tmp_path, damage):
    mine, names, before = _damaged_copy(tmp_path, damage)
    out = tmp_path / "run"
    result, output = invoke("toy", "train", "--base", str(mine), "--out", str(out), *TINY_TRAIN)
    assert result.exit_code == 1, output
    assert output.count("error: ") == 1 and "Traceback" not in output  # one error line, no traceback
    assert re.search(names, output), output
    assert _hashes(mine) == before  # nothing pretrained, no config or manifest rewritten
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("how", ["--base", "argument"])
def test_toy_sample_refuses_a_damaged_base_directory(tmp_path, how):
    mine = _copy(tmp_path)
    _flip_bit(mine / "model.safetensors")
    before = _hashes(mine)
    args = ["--base", str(mine)] if how == "--base" else [str(mine)]
    result, output = invoke("toy", "sample", *args, "-n", "3", "--quiet")
    assert result.exit_code != 0 and "model.safetensors does not match its checksum" in output, output
    assert _hashes(mine) == before


def test_a_file_is_not_a_base_directory(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"weights\.bin is a file, not a directory"):
        open_base_dir(path)


def test_a_truncated_weights_file_without_manifest_is_refused_naming_it(tmp_path):
    mine = _copy(tmp_path)
    for name in ("manifest.json", "SHIPPED.json"):
        (mine / name).unlink()
    data = (mine / "model.safetensors").read_bytes()
    (mine / "model.safetensors").write_bytes(data[:1000])
    result, output = invoke("toy", "train", "--base", str(mine), "--out", str(tmp_path / "run"), *TINY_TRAIN)
    assert result.exit_code == 1 and "model.safetensors cannot be loaded" in output, output
    assert "Traceback" not in output and (mine / "model.safetensors").read_bytes() == data[:1000]


def test_a_user_base_without_manifest_warns_once_and_loads(tmp_path, capsys):
    mine = _copy(tmp_path)
    (mine / "manifest.json").unlink()
    assert open_base_dir(mine) is True
    assert open_base_dir(mine) is True
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "has no manifest.json, so its files cannot be verified" in err
    other = _copy(tmp_path, "other")
    (other / "manifest.json").unlink()
    (other / "SHIPPED.json").unlink()
    assert open_base_dir(other) is True  # nothing left to check the weights against: still a base
    model = APP.load_or_pretrain(other, ToyConfig(), show_progress=False)
    assert isinstance(model, ToyDenoiser)


def test_missing_empty_or_only_pretraining_traces_pretrain_and_then_load(tmp_path):
    assert open_base_dir(tmp_path / "nowhere") is False
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".lock").write_text("{}")
    assert open_base_dir(empty) is False
    traces = tmp_path / "traces"
    traces.mkdir()
    for name in ("pretrain_config.json", "loss.csv", ".model.safetensors.abc123.tmp"):
        (traces / name).write_text("")
    assert open_base_dir(traces) is False

    cfg = ToyConfig(hidden=8, depth=1, pretrain_steps=3, pretrain_batch=16, n_data=64)
    APP.load_or_pretrain(empty, cfg, show_progress=False)
    assert json.loads((empty / "pretrain_done.json").read_text())["steps"] == 3
    assert open_base_dir(empty) is True  # verified against the manifest the pretraining wrote
    before = _hashes(empty)
    assert isinstance(APP.load_or_pretrain(empty, cfg, show_progress=False), ToyDenoiser)
    assert _hashes(empty) == before  # loaded, not pretrained again
    _flip_bit(empty / "model.safetensors", 200)
    with pytest.raises(BaseDamaged, match=r"model\.safetensors does not match its checksum"):
        APP.load_or_pretrain(empty, cfg, show_progress=False)


class Line(nn.Linear):
    def __init__(self, n: int = 3) -> None:
        super().__init__(n, n)


def _pretrained(run_dir: Path, steps: int = 3) -> Path:
    torch.manual_seed(0)
    data = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
    loss = lambda m, x, c, g: ((m(x) - 2 * x) ** 2).mean()  # noqa: E731
    pretrain(Line(), infinite_batches(data, 8, 0), loss, PretrainConfig(steps=steps, warmup=1), run_dir, {"n": 3},
             show_progress=False)
    return run_dir


def test_a_pretraining_of_ours_resumes_and_app_files_are_required(tmp_path):
    run = _pretrained(tmp_path / "run")
    assert open_base_dir(run) is True
    # without the app's metadata: our pretraining (train_state.pt) resumes to write it ...
    assert open_base_dir(run, ("meta.json",)) is False
    (run / "meta.json").write_text("{}")
    assert open_base_dir(run, ("meta.json",)) is True
    # ... an interrupted one resumes
    (run / "pretrain_done.json").unlink()
    settings = json.loads((run / "pretrain_config.json").read_text())
    (run / "pretrain_config.json").write_text(json.dumps({**settings, "steps": 10}))
    assert open_base_dir(run) is False
    # a base of the user's (no pretraining state) without the app's metadata is refused, not pretrained over
    mine = _copy(tmp_path)
    with pytest.raises(BaseDamaged, match=r"missing meta\.json"):
        open_base_dir(mine, ("meta.json",))
    # a digest the pretraining recorded catches a changed weights file even without a manifest
    done = _pretrained(tmp_path / "done")
    (done / "manifest.json").unlink()
    (done / "train_state.pt").unlink()
    _flip_bit(done / "model.safetensors", 100)
    with pytest.raises(BaseDamaged, match=r"does not match the sha256 recorded in .*pretrain_done\.json"):
        open_base_dir(done)


def _app_loader(app: str, monkeypatch):
    """(shipped base, the app's metadata files, load(directory)) with pretraining forbidden."""
    import importlib

    try:  # flow's base lives in its pretrain module (train in older layouts)
        train = importlib.import_module(f"pgraft.apps.{app}.{'pretrain' if app == 'flow' else 'train'}")
    except ModuleNotFoundError:
        train = importlib.import_module(f"pgraft.apps.{app}.train")
    for name in ("pretrain_molecule", "pretrain_layout", "pretrain_flow"):
        if hasattr(train, name):
            monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("pretrained over a damaged base"))
    if app == "flow":
        return train.APP.shipped, ("config.json",), train.APP.load
    files = {"molecule": ("molecule.json",), "layout": ("features/model.safetensors", "layout_preset.json")}[app]
    return train.APP.shipped, files, lambda d: train.APP.load_or_pretrain(d, "default", show_progress=False)


@pytest.mark.parametrize("app", ["molecule", "layout", "flow"])
def test_every_app_refuses_a_damaged_copy_of_its_shipped_base(tmp_path, monkeypatch, app):
    shipped, files, load = _app_loader(app, monkeypatch)
    flipped = tmp_path / "flipped"
    shutil.copytree(shipped, flipped)
    _flip_bit(flipped / "model.safetensors", 5000)
    partial = tmp_path / "partial"  # the app's own file gone, and the manifest that would say so
    shutil.copytree(shipped, partial)
    (partial / "manifest.json").unlink()
    (partial / files[0]).unlink()
    for directory, names in ((flipped, r"model\.safetensors does not match its checksum"),
                             (partial, f"missing {re.escape(files[0])}")):
        before = _hashes(directory)
        with pytest.raises(BaseDamaged, match=names):
            load(directory)
        assert _hashes(directory) == before


# ----------------------------------------------------------------------------- the run's base fingerprint
def test_check_same_base_names_the_changed_config(tmp_path):
    mine = _copy(tmp_path)
    digests = base_digests(mine)
    assert digests == {"base_sha256": weights_sha256(mine), "base_config_sha256": config_sha256(mine)}
    assert base_digests(mine, {"base_sha256": "x"}) == {"base_sha256": weights_sha256(mine)}  # an older run resumed
    check_same_base(mine, digests["base_sha256"], str(mine), digests["base_config_sha256"])
    (mine / "config.json").write_text((mine / "config.json").read_text().replace('"depth": 3', '"depth": 2'))
    check_same_base(mine, digests["base_sha256"], str(mine))  # a run that recorded only the weights' digest
    with pytest.raises(BaseChanged, match=r"config\.json sha256 .*config\.json changed\); sampling it would pair"):
        check_same_base(mine, digests["base_sha256"], str(mine), digests["base_config_sha256"])
    (mine / "config.json").unlink()
    with pytest.raises(BaseChanged, match=r"config\.json is missing"):
        recorded_base(str(mine), digests["base_sha256"], SHIPPED_TOY, digests["base_config_sha256"])


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "without-manifest"])
def test_sampling_a_run_after_its_base_config_changed_is_refused_naming_it(tmp_path, manifest):
    mine = _copy(tmp_path)
    if not manifest:
        (mine / "manifest.json").unlink()
    run = tmp_path / "run"
    result, output = invoke("toy", "train", "--base", str(mine), "--out", str(run), *TINY_TRAIN)
    assert result.exit_code == 0, output
    recorded = json.loads((run / "config.json").read_text())["app"]
    assert recorded["base_sha256"] == weights_sha256(mine)
    assert recorded["base_config_sha256"] == config_sha256(mine)
    config = mine / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"depth": 3', '"depth": 2'))
    result, output = invoke("toy", "sample", str(run), "-n", "3", "--quiet")
    assert result.exit_code != 0 and "config.json changed" in output, output
    assert "size mismatch" not in output and "Traceback" not in output
    config.write_text(original)
    # a run recorded before the config digest was kept still samples (its weights are checked)
    path = run / "config.json"
    saved = json.loads(path.read_text())
    del saved["app"]["base_config_sha256"]
    path.write_text(json.dumps(saved))
    result, output = invoke("toy", "sample", str(run), "-n", "3", "--quiet")
    assert result.exit_code == 0, output


def test_resuming_a_run_recorded_without_the_config_digest_keeps_its_config(tmp_path):
    run = tmp_path / "run"
    result, output = invoke("toy", "train", "--out", str(run), *TINY_TRAIN)
    assert result.exit_code == 0, output
    path = run / "config.json"
    saved = json.loads(path.read_text())
    del saved["app"]["base_config_sha256"]
    path.write_text(json.dumps(saved))
    result, output = invoke("toy", "train", "--out", str(run), "--resume", "--rounds", "2", *TINY_TRAIN[2:])
    assert result.exit_code == 0, output
    assert "base_config_sha256" not in json.loads(path.read_text())["app"]


# ----------------------------------------------------------------------------- a non-finite loss, explained
CFG = GraftConfig(rounds=1, groups=4, group_size=2, grs=GRSConfig(rule="topk", k=1), split=0.0, train_steps=2,
                  batch_size=4, lr=1e-3, sample_batch_size=8, seed=0)


def _toy_base() -> ToyDenoiser:
    torch.manual_seed(0)
    return ToyDenoiser(dim=1, hidden=8, depth=1)


def _finite_reward(problem):
    reward = problem.reward
    problem.reward = lambda x, c: torch.nan_to_num(reward(x, c), nan=0.0, posinf=0.0, neginf=0.0)
    return problem


def test_a_damaged_base_weight_is_named_instead_of_the_learning_rate(tmp_path):
    base = _toy_base()
    with torch.no_grad():
        base.net[0].weight[0, 0] = 3e38  # what a flipped exponent bit makes of a small weight
    with pytest.raises(NonFiniteLossError, match=r"the frozen base holds .* in net\.0\.weight") as info:
        run_graft(_finite_reward(make_problem(ToyConfig(n_steps=4))), base, {}, CFG, tmp_path, show_progress=False)
    assert "lower the learning rate" not in str(info.value) and "--base" in str(info.value)


def test_a_broken_accepted_set_is_named_instead_of_the_learning_rate(tmp_path):
    problem = make_problem(ToyConfig(n_steps=4))
    problem.step = lambda model, x, t, t_next, cond=None, generator=None: torch.full_like(x, 1e30)
    with pytest.raises(NonFiniteLossError, match=r"the accepted set of round 0 .* holds a value of magnitude 1e\+30"):
        run_graft(problem, _toy_base(), {}, CFG, tmp_path, show_progress=False)
