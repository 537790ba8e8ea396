"""``--model ORG/NAME`` read from the local Hugging Face cache (a fake cache laid out on disk as
``huggingface-cli download`` leaves it; nothing is downloaded): the snapshot ``refs/main`` names is loaded,
a local path wins over a hub id, and a repository not in the cache is refused in one line saying how to
download it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_families_tiny import build_tiny_flux

from pgraft.apps.t2i.hub import cached_snapshot, is_hub_id
from pgraft.apps.t2i.presets import resolve_model
from pgraft.apps.t2i.train import load_pipeline
from pgraft.core.errors import UsageError


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache: Path, repo_id: str, source: Path, revision: str) -> Path:
    """models--ORG--NAME/snapshots/<revision>/ holding ``source``'s files, refs/main naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_flux_hub_id_resolves_from_the_local_cache(hf_cache, tmp_path, monkeypatch):
    from pgraft.apps.t2i.world import all_prompts

    source = build_tiny_flux(tmp_path / "src" / "flux", [s.text() for s in all_prompts()])
    old = _cache_repo(hf_cache, "tiny-org/tiny-flux", source, "0" * 40)
    new_rev = "a" * 40
    snapshot = _cache_repo(hf_cache / "second", "x/y", source, new_rev)  # an unrelated cache: not seen
    assert snapshot.is_dir() and old.is_dir()
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("tiny-org/tiny-flux") and not is_hub_id("./tiny-org/tiny-flux") and not is_hub_id("a/b/c")
    assert resolve_model("tiny-org/tiny-flux") == old
    assert cached_snapshot("tiny-org/tiny-flux") == old
    pipe = load_pipeline("tiny-org/tiny-flux", image_size=16)
    reference = load_pipeline(source, image_size=16)
    assert pipe.kind == "flux" and pipe.directory == old
    x, t = torch.randn(1, *pipe.state_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    cond = pipe.prompt_encoder()(["a photo of a red circle"], guidance=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.denoiser(x, t, cond), reference.denoiser(x, t, cond))
    # a local directory of the same spelling wins over the hub id
    local = tmp_path / "tiny-org" / "tiny-flux"
    shutil.copytree(source, local)
    assert not is_hub_id("tiny-org/tiny-flux") and resolve_model("tiny-org/tiny-flux") == Path("tiny-org/tiny-flux")


def test_hub_id_not_in_the_cache_is_refused_with_the_download_command(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"`huggingface-cli download black-forest-labs/FLUX\.1-dev`") as err:
        load_pipeline("black-forest-labs/FLUX.1-dev")
    assert "\n" not in str(err.value) and str(hf_cache) in str(err.value)
    # a cached repository whose refs/main names a missing snapshot is refused alike
    (hf_cache / "models--o--n" / "refs").mkdir(parents=True)
    (hf_cache / "models--o--n" / "refs" / "main").write_text("b" * 40)
    with pytest.raises(UsageError, match="huggingface-cli download o/n"):
        resolve_model("o/n")
