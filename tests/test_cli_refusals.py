"""Every refusal is one line at one boundary: a table of bad inputs, each run as a real ``pgraft``
process, each expected to exit non-zero with no traceback, exactly one ``error:`` line on stderr
that names the flag or the file at fault, and the run / base directories it was pointed at left
byte-identical.

The cases are those a probe of new and hostile use found (numbered as in the issue that listed
them) plus their neighbours. The processes run two at a time in one module fixture; each case is
its own test so a failure names the case.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "apps" / "toy" / "bases" / "default"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{W}" is the work folder of the module, "{O}" this case's own output folder
    names: tuple[str, ...]  # the error line names one of these (a flag or a file)
    watch: tuple[str, ...] = ("run", "toybase")  # folders of {W} that must not change
    code: int | None = None  # the exit code, when it matters
    extra: dict = field(default_factory=dict)


SMALL_TOY = ("--rounds", "1", "--groups", "4", "--m", "2", "--k", "1", "--train-steps", "1", "--batch-size", "4",
             "--quiet")
T2 = ("t2i", "train", "--model", "{W}/t2base", "--prompts", "train", "--rounds", "1", "--groups", "2", "--m", "2",
      "--k", "1", "--train-steps", "1", "--batch-size", "2", "--sample-batch-size", "4", "--n-steps", "2", "--quiet",
      "--out", "{O}")
MOL_PRETRAIN = ("molecule", "pretrain", "--preset", "tiny", "--steps", "2", "--eval-samples", "0", "--out", "{O}",
                "--quiet", "--dataset")


def c(id: str, *argv: str, names: tuple[str, ...] | str, **kw) -> Case:
    return Case(id, tuple(argv), (names,) if isinstance(names, str) else tuple(names), **kw)


CASES = [
    # --- the probe's cases, numbered as it listed them
    c("01-toy-reward", "toy", "train", "--reward", "bogus", "--out", "{O}", *SMALL_TOY, names="--reward", code=2),
    c("02-toy-mixture", "toy", "train", "--mixture", "bogus", "--out", "{O}", *SMALL_TOY, names="--mixture", code=2),
    c("03-toy-pretrain-mixture", "toy", "pretrain", "--mixture", "bogus", "--out", "{O}", names="--mixture", code=2),
    c("04-toy-pretrain-steps", "toy", "pretrain", "--steps", "-1", "--out", "{O}", names="--steps", code=2),
    c("05-threshold-nan", "toy", "train", "--rule", "threshold", "--threshold", "nan", "--out", "{O}", *SMALL_TOY[2:],
      "--rounds", "1", names="--threshold", code=2),
    c("06-groups-too-many", "toy", "train", "--groups", "1000000000000", "--out", "{O}", "--quiet",
      names="--groups", code=2),
    c("07-out-unwritable", "toy", "train", "--out", "/proc/x/y", *SMALL_TOY, names=("--out", "/proc/x")),
    c("08-base-is-a-file", "toy", "train", "--base", "{W}/rew.py", "--out", "{O}", *SMALL_TOY, names="rew.py"),
    c("09-base-config-garbage", "toy", "train", "--base", "{W}/garbage-config", "--out", "{O}", *SMALL_TOY,
      names="config.json", watch=("run", "toybase", "garbage-config")),
    c("10-sample-out-no-folder", "toy", "sample", "{W}/run", "-n", "5", "--out", "{W}/no/such/x.csv", names="--out",
      code=2),
    c("11-sample-out-is-dir", "toy", "sample", "{W}/run", "-n", "5", "--out", "{W}/adir", names="--out", code=2),
    *[c(f"{12 + i}-mol-dataset-{name}", *MOL_PRETRAIN, f"{{W}}/{file}", names="--dataset", code=2)
      for i, (name, file) in enumerate([("empty", "empty.smi"), ("binary", "bin.smi"), ("not-utf8", "bad.csv"),
                                         ("header", "hdr.csv"), ("unparsable", "bad.smi"),
                                         ("missing", "missing.smi"), ("directory", "adir")])],
    c("19-mol-sample-steps", "molecule", "train", "--sample-steps", "0", "--out", "{O}", "--quiet",
      names="--sample-steps", code=2),
    c("20-user-reward-signature", *T2, "--reward", "os:getcwd", names="os:getcwd"),
    c("21-user-reward-raises", *T2, "--reward", "{W}/rew.py:boom", names="rew.py:boom"),
    c("22-serve-port", "t2i", "serve-reward", "--reward", "checker", "--port", "99999", names="--port", code=2),
    c("23-user-reward-nan", *T2, "--reward", "{W}/rew.py:nan", names="rew.py:nan"),
    c("24-user-reward-inf", *T2, "--reward", "{W}/rew.py:inf", names="rew.py:inf"),
    c("25-head-truncated", "toy", "sample", "{W}/run-head-truncated", "-n", "5", "--out", "{W}/s25.csv",
      names="model.safetensors", watch=("run-head-truncated", "toybase")),
    c("26-head-pickle", "toy", "sample", "{W}/run-head-pickle", "-n", "5", "--out", "{W}/s26.csv",
      names="model.safetensors", watch=("run-head-pickle", "toybase")),
    c("27-head-config-garbage", "toy", "sample", "{W}/run-head-config", "-n", "5", "--out", "{W}/s27.csv",
      names="config.json", watch=("run-head-config", "toybase")),
    # --- the round loop's flags name themselves
    c("toy-m-zero", "toy", "train", "--m", "0", "--out", "{O}", names="--m", code=2),
    c("toy-k-zero", "toy", "train", "--k", "0", "--out", "{O}", names="--k", code=2),
    c("toy-t-out-of-range", "toy", "train", "--t", "1.5", "--out", "{O}", names="--t", code=2),
    c("toy-lr-negative", "toy", "train", "--lr", "-1", "--out", "{O}", names="--lr", code=2),
    c("toy-alpha-zero", "toy", "train", "--rule", "rs", "--alpha", "0", "--out", "{O}", names="--alpha", code=2),
    c("toy-rule-unknown", "toy", "train", "--rule", "bogus", "--out", "{O}", names="--rule", code=2),
    c("toy-rounds-zero", "toy", "train", "--rounds", "0", "--out", "{O}", names="--rounds", code=2),
    c("toy-unknown-flag", "toy", "train", "--bogus-flag", "1", names="--bogus-flag", code=2),
    c("toy-m-not-a-number", "toy", "train", "--m", "many", names="--m", code=2),
    c("unknown-app", "bogus", names="bogus", code=2),
    c("unknown-command", "toy", "bogus", names="bogus", code=2),
    # --- run directories: resume, config changes
    c("train-over-a-run", "toy", "train", "--out", "{W}/run", *SMALL_TOY, names="--resume", code=2),
    c("resume-fewer-rounds", "toy", "train", "--out", "{W}/run", "--resume", *SMALL_TOY, names="rounds", code=2),
    c("resume-other-m", "toy", "train", "--out", "{W}/run", "--resume", "--rounds", "3", "--groups", "4", "--m", "4",
      "--k", "1", "--train-steps", "2", "--batch-size", "4", "--quiet", names="config.json", code=2),
    c("resume-nothing", "toy", "train", "--out", "{O}", "--resume", *SMALL_TOY, names="--resume", code=2),
    c("resume-config-cut", "toy", "train", "--out", "{W}/run-config-cut", "--resume", "--rounds", "3", "--groups", "4",
      "--m", "2", "--k", "1", "--train-steps", "2", "--batch-size", "4", "--quiet", names="run-config-cut/config.json",
      code=2, watch=("run", "toybase", "run-config-cut")),
    c("sample-no-target", "toy", "sample", names="RUN_DIR", code=2),
    c("sample-missing-dir", "toy", "sample", "{W}/nosuch", "-n", "5", names="nosuch", code=2),
    c("sample-n-zero", "toy", "sample", "{W}/run", "-n", "0", names="-n", code=2),
    c("sample-base-missing", "toy", "sample", "--base", "{W}/nosuch", "-n", "5", names="nosuch", code=2),
    c("diagnose-t-out-of-range", "toy", "diagnose", "--t", "2", "--out", "{O}", names="--t", code=2),
    c("diagnose-states-one", "toy", "diagnose", "--states", "1", "--out", "{O}", names="--states", code=2),
    # --- a user's base directory: verified, never pretrained over
    c("base-bit-flipped", "toy", "train", "--base", "{W}/base-flipped", "--out", "{O}", *SMALL_TOY,
      names="model.safetensors", watch=("run", "toybase", "base-flipped")),
    c("base-manifest-garbage", "toy", "train", "--base", "{W}/base-manifest", "--out", "{O}", *SMALL_TOY,
      names="manifest.json", watch=("run", "toybase", "base-manifest")),
    c("base-weights-deleted", "toy", "train", "--base", "{W}/base-noweights", "--out", "{O}", *SMALL_TOY,
      names="model.safetensors", watch=("run", "toybase", "base-noweights")),
    c("base-config-deleted", "toy", "sample", "--base", "{W}/base-noconfig", "-n", "5", "--out", "{W}/s-nc.csv",
      names="config.json", watch=("run", "toybase", "base-noconfig")),
    c("pretrain-over-a-base", "toy", "pretrain", "--out", "{W}/toybase", "--steps", "5", "--quiet",
      names="toybase", code=2),
    # --- molecule
    c("mol-reward", "molecule", "train", "--reward", "bogus", "--out", "{O}", "--quiet", names="--reward", code=2),
    c("mol-preset", "molecule", "pretrain", "--preset", "bogus", "--out", "{O}", "--quiet", names="bogus", code=2),
    c("mol-sample-n-zero", "molecule", "sample", "--base", "shipped", "-n", "0", names="-n", code=2),
    c("mol-sample-out-is-dir", "molecule", "sample", "--base", "shipped", "-n", "2", "--out", "{W}/adir",
      names="--out", code=2),
    c("mol-evaluate-missing", "molecule", "evaluate", "{W}/nosuch", names="nosuch", code=2),
    c("mol-base-meta-cut", "molecule", "sample", "--base", "{W}/molbase-cut", "-n", "2", "--out", "{W}/mcut.csv",
      names="molbase-cut/molecule.json", code=2, watch=("molbase-cut",)),
    # --- text-to-image
    c("t2i-model-missing", *T2[:3], "{W}/nosuch", *T2[4:], "--reward", "checker", names="nosuch"),
    c("t2i-reward-unknown", *T2, "--reward", "bogus", names="bogus"),
    c("t2i-reward-no-function", *T2, "--reward", "{W}/rew.py:nothere", names="rew.py"),
    c("t2i-prompts-unknown", *T2, "--reward", "checker", "--prompts", "bogus", names="bogus"),
    c("t2i-n-steps-zero", *T2, "--reward", "checker", "--n-steps", "0", names="--n-steps", code=2),
    c("t2i-nonfinite-nan", *T2, "--reward", "checker", "--nonfinite-reward", "nan", names="--nonfinite-reward",
      code=2),
    c("t2i-pretrain-preset", "t2i", "pretrain", "--preset", "bogus", "--out", "{O}", "--quiet", names="bogus"),
    # --- layout and flow
    c("layout-reward", "layout", "train", "--reward", "bogus", "--out", "{O}", "--quiet", names="--reward", code=2),
    c("layout-sample-n-zero", "layout", "sample", "--base", "shipped", "-n", "0", names="-n", code=2),
    c("layout-sample-out-no-folder", "layout", "sample", "--base", "shipped", "-n", "2", "--out",
      "{W}/no/such/x.png", names="--out", code=2),
    c("layout-evaluate-missing", "layout", "evaluate", "{W}/nosuch", names="nosuch", code=2),
    c("layout-deep-json", "layout", "pretrain", "--preset", "tiny", "--dataset", "publaynet", "--data",
      "{W}/deep.json", "--steps", "1", "--eval-samples", "0", "--out", "{O}", "--quiet", names="deep.json"),
    c("flow-sample-n-zero", "flow", "sample", "--base", "shipped", "-n", "0", names="-n", code=2),
    c("flow-evaluate-out-is-dir", "flow", "evaluate", "--base", "shipped", "--out", "{W}/adir", names="--out",
      code=2),
    c("flow-invert-missing", "flow", "invert", "{W}/nosuch", "--out", "{O}", names="nosuch"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under ``folder`` (the writer lock aside)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _flip_bit(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def _make_world(w: Path, env: dict[str, str]) -> None:
    """The files the cases point at: a finished 3-round toy run and damaged copies of it, damaged
    copies of the shipped toy base, a tiny t2i base pipeline, user reward functions, bad data."""
    subprocess.run([sys.executable, "-m", "pgraft.cli", "toy", "train", "--out", str(w / "run"), "--rounds", "3",
                    "--groups", "4", "--m", "2", "--k", "1", "--train-steps", "2", "--batch-size", "4", "--quiet"],
                   check=True, env=env, cwd=w, capture_output=True)
    shutil.copytree(TOY_BASE, w / "toybase")
    for name, damage in [("head-truncated", lambda h: h.joinpath("model.safetensors").write_bytes(
                             h.joinpath("model.safetensors").read_bytes()[:100])),
                         ("head-pickle", lambda h: __import__("torch").save({"x": 1}, h / "model.safetensors")),
                         ("head-config", lambda h: h.joinpath("config.json").write_text("{{{"))]:
        shutil.copytree(w / "run", w / f"run-{name}")
        damage(w / f"run-{name}" / "head")
    # a user's molecule base without a manifest (nothing to verify against) whose molecule.json was cut short
    shutil.copytree(REPO / "apps" / "molecule" / "bases" / "default", w / "molbase-cut")
    (w / "molbase-cut" / "manifest.json").unlink()
    meta = w / "molbase-cut" / "molecule.json"
    meta.write_text(meta.read_text()[:300])
    shutil.copytree(w / "run", w / "run-config-cut")   # the run's config.json cut short (a disk filled up)
    config = w / "run-config-cut" / "config.json"
    config.write_text(config.read_text()[: len(config.read_text()) // 2])
    for name in ("base-flipped", "base-manifest", "base-noweights", "base-noconfig"):
        shutil.copytree(TOY_BASE, w / name)
    _flip_bit(w / "base-flipped" / "model.safetensors")
    (w / "base-manifest" / "manifest.json").write_text("garbage")
    (w / "base-noweights" / "model.safetensors").unlink()
    (w / "base-noconfig" / "config.json").unlink()
    (w / "garbage-config").mkdir()
    (w / "garbage-config" / "config.json").write_text("garbage")
    (w / "rew.py").write_text(
        "import torch\n"
        "def boom(images, prompts):\n    raise RuntimeError('boom from user reward')\n"
        "def nan(images, prompts):\n    return torch.full((len(prompts),), float('nan'))\n"
        "def inf(images, prompts):\n    return torch.full((len(prompts),), float('inf'))\n")
    (w / "empty.smi").write_text("")
    (w / "bin.smi").write_bytes(b"\x00\x01\x02binary")
    (w / "bad.csv").write_bytes(b"smiles\n\xff\xfe\n")
    (w / "hdr.csv").write_text("foo,bar\n1,2\n")
    (w / "bad.smi").write_text("XYZ((\nQQ[\n")
    (w / "adir").mkdir()
    (w / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    from pgraft.apps.t2i.train import PretrainT2IConfig, pretrain_world

    pretrain_world(PretrainT2IConfig(preset="tiny", steps=2, n_images=16, batch_size=8, warmup=1), w / "t2base",
                   show_progress=False)


def _run(case: Case, w: Path, env: dict[str, str]) -> dict:
    out = w / "out" / case.id
    argv = [a.replace("{W}", str(w)).replace("{O}", str(out)) for a in case.argv]
    before = {d: _snapshot(w / d) for d in case.watch}
    proc = subprocess.run([sys.executable, "-m", "pgraft.cli", *argv], env=env, cwd=w, capture_output=True,
                          text=True, timeout=600)
    after = {d: _snapshot(w / d) for d in case.watch}
    return {"rc": proc.returncode, "stderr": proc.stderr, "changed": [d for d in case.watch if before[d] != after[d]]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    w = tmp_path_factory.mktemp("refusals")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400", "PGRAFT_CACHE": str(w / "cache")}
    env.pop("PGRAFT_DEBUG", None)
    _make_world(w, env)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(_run, case, w, env) for case in CASES}
        return {key: f.result() for key, f in futures.items()}


def test_the_table_holds_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refusal_is_one_line_naming_the_culprit(case: Case, results):
    r = results[case.id]
    stderr = r["stderr"]
    assert r["rc"] != 0, f"exit 0; stderr:\n{stderr}"
    if case.code is not None:
        assert r["rc"] == case.code, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert any(name in errors[0] for name in case.names), f"{errors[0]!r} names none of {case.names}"
    assert not r["changed"], f"changed: {r['changed']}"
