"""Shipped bases: a pretraining run packed by ``ship_base`` loads and verifies; a flipped byte, a
missing file or a changed base is refused with a message naming it; and every base shipped in the
package still matches the manifest it was shipped with."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import pgraft.apps
from pgraft.core.checkpoint import load_pretrained
from pgraft.core.errors import UsageError
from pgraft.core.pretrain import PretrainConfig, infinite_batches, is_pretrained, pretrain
from pgraft.core.shipped import (
    RECORD_NAME,
    SHIPPED,
    BaseChanged,
    ShippedBaseDamaged,
    check_same_base,
    read_record,
    resolve_base,
    ship_base,
    shipped_dir,
    verify_shipped,
    weights_sha256,
)

SHIPPED_BASES = sorted(p for p in Path(pgraft.apps.__file__).parent.glob("*/bases/*") if p.is_dir())


class Line(nn.Linear):
    def __init__(self, n: int = 3) -> None:
        super().__init__(n, n)


def _pretrained(run_dir: Path) -> Path:
    torch.manual_seed(0)
    data = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
    loss = lambda m, x, c, g: ((m(x) - 2 * x) ** 2).mean()  # noqa: E731
    pretrain(Line(), infinite_batches(data, 8, 0), loss, PretrainConfig(steps=3, warmup=1), run_dir, {"n": 3},
             show_progress=False)
    (run_dir / "meta.json").write_text("{}")
    return run_dir


def _shipped(tmp_path: Path) -> Path:
    run = _pretrained(tmp_path / "run")
    return ship_base(run, shipped_dir(tmp_path / "app"), ["config.json", "model.safetensors", "meta.json"],
                     {"command": "pgraft x pretrain", "seed": 0})


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_ship_base_keeps_only_the_loader_files_and_loads_as_the_run(tmp_path):
    dest = _shipped(tmp_path)
    assert dest == tmp_path / "app" / "bases" / "default"
    assert sorted(p.name for p in dest.iterdir()) == ["SHIPPED.json", "config.json", "manifest.json", "meta.json",
                                                      "model.safetensors"]
    record = read_record(dest)
    assert record["seed"] == 0 and record["weights_sha256"] == weights_sha256(tmp_path / "run")
    assert is_pretrained(dest)  # no train_state.pt: a finished base
    assert resolve_base(SHIPPED, dest) == dest
    a, b = load_pretrained(Line, dest), load_pretrained(Line, tmp_path / "run")
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        ship_base(tmp_path / "run", tmp_path / "other", ["config.json", "absent.json"], {})


def test_a_directory_value_is_taken_as_given_even_named_like_the_keyword(tmp_path):
    assert resolve_base(tmp_path / "mine", tmp_path / "nowhere") == tmp_path / "mine"
    assert resolve_base("./shipped", tmp_path / "nowhere") == Path("shipped")  # a path, not the keyword
    with pytest.raises(UsageError, match="--base DIR"):
        resolve_base(SHIPPED, None)
    with pytest.raises(UsageError, match="no shipped base"):
        resolve_base(SHIPPED, tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "meta.json", RECORD_NAME])
def test_a_flipped_byte_in_a_shipped_file_is_refused_naming_the_file(tmp_path, name):
    dest = _shipped(tmp_path)
    _flip_byte(dest / name, (dest / name).stat().st_size // 2)
    with pytest.raises(ShippedBaseDamaged, match=f"damaged: {dest / name} does not match") as info:
        resolve_base(SHIPPED, dest)
    assert "\n" not in str(info.value)


def test_a_missing_file_or_manifest_is_refused(tmp_path):
    dest = _shipped(tmp_path)
    (dest / "meta.json").unlink()
    with pytest.raises(ShippedBaseDamaged, match="meta.json is missing"):
        verify_shipped(dest)
    (dest / "manifest.json").unlink()
    with pytest.raises(ShippedBaseDamaged, match="manifest.json is missing"):
        verify_shipped(dest)


def test_check_same_base_refuses_other_weights(tmp_path):
    dest = _shipped(tmp_path)
    sha = weights_sha256(dest)
    check_same_base(dest, sha, SHIPPED)
    check_same_base(dest, None, SHIPPED)  # a run recorded before digests were kept
    with pytest.raises(BaseChanged, match="shipped base of this installation now holds"):
        check_same_base(dest, "0" * 64, SHIPPED)
    with pytest.raises(BaseChanged, match=str(dest)):
        check_same_base(dest, "0" * 64, str(dest))


# ----------------------------------------------------------------------------- the package's own
def test_the_package_ships_the_molecule_base():
    assert any(p.parent.parent.name == "molecule" for p in SHIPPED_BASES)


@pytest.mark.parametrize("base", SHIPPED_BASES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_shipped_base_matches_its_manifest_and_record(base):
    verify_shipped(base)
    record = read_record(base)
    for key in ("command", "seed", "commit", "pretrain_seconds", "eval", "files"):
        assert key in record, key
    if (base / "model.safetensors").is_file():  # a pipeline directory (t2i) keeps its weights in parts
        assert record["weights_sha256"] == weights_sha256(base)
    else:
        assert any(name.endswith(".safetensors") for name in record["files"])
    listed = set(json.loads((base / "manifest.json").read_text())["files"])
    on_disk = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk == {*record["files"], RECORD_NAME}
    assert not (base / "train_state.pt").exists()
    assert sum(p.stat().st_size for p in base.rglob("*") if p.is_file()) < 20 * 2**20


def test_a_copy_of_a_shipped_base_with_a_flipped_byte_is_refused(tmp_path):
    base = next(p for p in SHIPPED_BASES if p.parent.parent.name == "molecule")
    copy = tmp_path / "default"
    shutil.copytree(base, copy)
    _flip_byte(copy / "model.safetensors", 1000)
    with pytest.raises(ShippedBaseDamaged, match=r"model\.safetensors does not match its checksum"):
        resolve_base(SHIPPED, copy)
