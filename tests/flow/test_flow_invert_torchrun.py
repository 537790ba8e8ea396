"""`pgraft flow invert` shared between processes (torchrun): each rank inverts every WORLD_SIZE-th
shard, and the shards are the ones a single process writes, bit for bit on the CPU."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pgraft.apps.flow.correct import InvertConfig, distributed_env, invert_dataset
from pgraft.apps.flow.model import from_preset
from pgraft.apps.flow.pretrain import FlowPretrainConfig
from pgraft.core.checkpoint import save_json, save_pretrained

torch.set_num_threads(1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def _fabricated_fashion(root: Path, n_train: int = 40, n_test: int = 8) -> Path:
    """idx files in Fashion-MNIST's format with random 8x8 images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for n, img, lab in ((n_train, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                        (n_test, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        _write_idx(root / f"{img}.gz", rng.integers(0, 256, (n, 8, 8)))
        _write_idx(root / f"{lab}.gz", rng.integers(0, 10, n))
    return root


def _tiny_base(tmp_path: Path) -> Path:
    """A randomly initialised tiny FlowUNet saved as a base dir whose training data are fabricated idx files."""
    data = _fabricated_fashion(tmp_path / "fashion")
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    base = tmp_path / "base"
    save_pretrained(model, model.config, base)
    save_json(json.loads(json.dumps(FlowPretrainConfig(preset="tiny", path=str(data)).__dict__)), base / "flow.json")
    return base


def _shards(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((run / "shards").glob("*.safetensors"))}


def _assert_same_shards(one: Path, two: Path) -> None:
    a, b = _shards(one), _shards(two)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


def test_distributed_env_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed_env()


def test_ranks_in_threads_write_the_shards_of_one_process(tmp_path):
    """Two ranks (threads here; processes under torchrun) split the shards and write exactly the
    shards of a one-process run; rank 0 alone writes invert.json and reconstruction.json; each rank
    reports its own images/s. Extending the run with more ranks than before works too."""
    base = _tiny_base(tmp_path)
    images = torch.rand(23, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = InvertConfig(steps=3, limit=10, shard_size=3, batch_size=2, max_iter=20, tol=1e-5)
    one = tmp_path / "one"
    invert_dataset(base, one, cfg, show_progress=False, images=images)

    def run_ranks(out: Path, config: InvertConfig, world: int) -> tuple[list, list, list]:
        reports, stats, written = [None] * world, [{} for _ in range(world)], [[] for _ in range(world)]
        errors = []

        def work(r: int) -> None:
            try:
                reports[r] = invert_dataset(base, out, config, show_progress=False, images=images, rank=r,
                                            world_size=world, throughput=stats[r], poll_seconds=0.02,
                                            on_shard=written[r].append)
            except Exception as err:  # noqa: BLE001 - re-raised below in the test thread
                errors.append(err)

        threads = [threading.Thread(target=work, args=(r,)) for r in reversed(range(world))]  # rank 1 first
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        return reports, stats, written

    two = tmp_path / "two"
    reports, stats, written = run_ranks(two, cfg, 2)
    assert written == [[0, 2], [1, 3]]  # shard i goes to rank i % 2
    _assert_same_shards(one, two)
    assert json.loads((one / "invert.json").read_text()) == json.loads((two / "invert.json").read_text())
    assert json.loads((one / "reconstruction.json").read_text()) == json.loads((two / "reconstruction.json").read_text())
    assert reports[0].n_images == 10 and reports[1].n_images == 3 + 1  # rank 1: its own shards 1 and 3
    assert [s["images"] for s in stats] == [3 + 3, 3 + 1] and all(s["images_per_s"] > 0 for s in stats)
    assert sorted(p.name for p in (two / "throughput").iterdir()) == ["rank_000.json", "rank_001.json"]
    assert json.loads((two / "throughput" / "rank_001.json").read_text())["images"] == 4
    assert json.loads((two / "invert.json").read_text())["config"]["warm_start"] == "extrapolate"

    # extend to 20 images with 3 ranks: finished shards are kept, the old partial shard 3 and the
    # new ones are inverted; the result is again a one-process run's
    bigger = InvertConfig(**{**cfg.__dict__, "limit": 20})
    invert_dataset(base, one, bigger, show_progress=False, images=images)
    reports, stats, written = run_ranks(two, bigger, 3)
    assert written == [[3, 6], [4], [5]]
    _assert_same_shards(one, two)
    assert reports[0].n_images == 20
    assert sorted(p.name for p in (two / "throughput").iterdir()) == ["rank_000.json", "rank_001.json", "rank_002.json"]
    # a rank other than 0 refuses changed settings as rank 0 does
    with pytest.raises(ValueError, match="different settings"):
        invert_dataset(base, two, InvertConfig(**{**bigger.__dict__, "steps": 4}), show_progress=False, images=images,
                       rank=1, world_size=2)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """The README's command: `python -m torch.distributed.run --standalone --nproc_per_node 2 --no-python
    pgraft flow invert ...` (2 CPU processes) writes the shards of a 1-process run, bit for bit."""
    base = _tiny_base(tmp_path)
    common = ["flow", "invert", str(base), "--steps", "3", "--limit", "10", "--shard-size", "3", "--batch-size", "2",
              "--max-iter", "20", "--tol", "1e-5", "--device", "cpu", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    pgraft = shutil.which("pgraft") or str(Path(sys.executable).parent / "pgraft")
    one = subprocess.run([pgraft, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "10 noises in 4 shards" in one.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    two = subprocess.run([*torchrun, pgraft, *common, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "rank 0/2" in two.stdout and "rank 1/2" in two.stdout and "images/s" in two.stdout
    assert two.stdout.count("10 noises in 4 shards") == 1  # the run's summary: rank 0 only
    _assert_same_shards(tmp_path / "one", tmp_path / "two")
    for name in ("invert.json", "reconstruction.json"):
        assert json.loads((tmp_path / "one" / name).read_text()) == json.loads((tmp_path / "two" / name).read_text())
    ranks = [json.loads((tmp_path / "two" / "throughput" / f"rank_{r:03d}.json").read_text()) for r in (0, 1)]
    assert [r["images"] for r in ranks] == [3 + 3, 3 + 1] and [r["world_size"] for r in ranks] == [2, 2]
