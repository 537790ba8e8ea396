"""Bad input to the molecule app: ``-n`` below 1, the valid count of ``sample``, and SMILES files that
are binary, not UTF-8, unreadable CSV, or hold no usable molecule. Every error is one line naming the
flag or the file (with line numbers), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pgraft.apps.molecule.data import QM9_SPEC, GraphSpec, is_valid_smiles, load_dataset, read_smiles_file
from pgraft.cli import app
from pgraft.core.errors import FieldError

SMALL = ["CCO", "CC(=O)O", "c1ccoc1", "CC#N", "OCC=O", "NC(=O)C", "C1CC1O", "CC(C)O", "FC(F)F", "C=CC=O", "CNC"]


def _invoke(*args: str):
    result = CliRunner().invoke(app, ["molecule", *args], env={"COLUMNS": "400"})
    return result, " ".join(result.output.split())


# ----------------------------------------------------------------------------- CLI: -n and the valid count
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-round run on an 11-molecule dataset (tiny preset: seconds)."""
    from pgraft.apps.molecule.presets import get_preset
    from pgraft.apps.molecule.pretrain import pretrain_molecule

    root = tmp_path_factory.mktemp("molecule-n")
    (root / "tiny.smi").write_text("\n".join(SMALL) + "\n")
    data = load_dataset(root / "tiny.smi", cache_dir=root / "cache", fractions=(0.6, 0.2, 0.2),
                        spec=GraphSpec(atom_types=QM9_SPEC.atom_types, max_nodes=5))
    pretrain_molecule(get_preset("tiny"), root / "base", data=data, show_progress=False)
    result, output = _invoke("train", "--out", str(root / "run"), "--base", str(root / "base"), "--preset", "tiny",
                             "--rounds", "1", "--groups", "2", "--m", "2", "--train-steps", "1", "--batch-size", "2",
                             "--sample-steps", "4", "--seed", "0", "--quiet")
    assert result.exit_code == 0, output + repr(result.exception)
    return root / "run"


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("n", ["0", "-5"])
def test_cli_n_below_one_names_the_flag(tiny_run, command, n):
    result, output = _invoke(command, str(tiny_run), "-n", n, "--quiet")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # a usage error, not a crash
    assert "'-n'" in output and f"got {n}" in output and "Traceback" not in output
    assert not (tiny_run / "sampled.csv").exists() and not (tiny_run / "evaluation.csv").exists()


def test_cli_sample_counts_only_parsable_molecules_valid(tiny_run, tmp_path, monkeypatch):
    import pgraft.apps.molecule.train as train

    # invalid molecules reach the CLI as None, "" (RDKit parses "" to an empty molecule), NaN, or junk
    smiles = ["CCO", "", None, "C1CC", "c1ccccc1", float("nan"), " "]
    monkeypatch.setattr(train, "sample_smiles",
                        lambda problem, head, base, n, split, seed, show: (smiles, torch.arange(7.0)))
    out = tmp_path / "s.csv"
    result, output = _invoke("sample", str(tiny_run), "-n", "7", "--out", str(out), "--quiet")
    assert result.exit_code == 0, output
    assert "7 molecules (2 valid)" in output
    assert len(pd.read_csv(out)) == 7  # the invalid ones are kept in the file, as empty cells


def test_cli_sample_valid_count_matches_the_written_file(tiny_run, tmp_path):
    out = tmp_path / "s.csv"
    result, output = _invoke("sample", str(tiny_run), "-n", "9", "--out", str(out), "--seed", "3", "--quiet")
    assert result.exit_code == 0, output
    written = pd.read_csv(out, keep_default_na=False)["smiles"].tolist()
    assert len(written) == 9
    assert f"9 molecules ({sum(map(is_valid_smiles, written))} valid)" in output


def test_is_valid_smiles():
    assert [is_valid_smiles(s) for s in ["CCO", "c1ccccc1", "CC.O", "[Na+].[Cl-]"]] == [True] * 4
    assert [is_valid_smiles(s) for s in ["", "  ", None, float("nan"), "C1CC", "xx", 3]] == [False] * 7


# ----------------------------------------------------------------------------- SMILES files
def _file(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name,content,words", [
    ("image.smi", b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)) * 8, ":1: not UTF-8"),
    ("nul.smi", b"CCO\nCC\x00O\n", "binary (NUL byte on line 2)"),
    ("latin1.txt", "CCO\n# caf\xe9\nCCN\n".encode("latin-1"), ":2: not UTF-8"),
    ("latin1.csv", "smiles,name\nCCO,ethanol\nCCN,\xe9thylamine\n".encode("latin-1"), ":3: not UTF-8"),
    ("ragged.csv", "smiles,name\nCCO,ethanol\nCCN,a,b\n", "cannot read as CSV"),
])
@pytest.mark.parametrize("strict", [False, True])
def test_unreadable_smiles_file_names_the_path(tmp_path, name, content, words, strict):
    path = _file(tmp_path, name, content)
    for load in (lambda: read_smiles_file(path, strict=strict),
                 lambda: load_dataset(path, cache_dir=tmp_path / "cache", strict=strict)):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        # not a UnicodeDecodeError / pandas error passing through; load_dataset names its flag (--dataset)
        assert type(info.value) is ValueError or (type(info.value) is FieldError and info.value.field == "dataset")
        assert str(path) in message and words in message and "\n" not in message


@pytest.mark.parametrize("strict", [False, True])
def test_file_without_valid_smiles_names_file_count_and_lines(tmp_path, strict):
    path = _file(tmp_path, "junk.smi", "# generated\n" + "\n".join(["xx", "C1CC", "!!"] * 47 + ["((", ""]) + "\n")
    for load in (lambda: read_smiles_file(path, strict=strict),
                 lambda: load_dataset(path, cache_dir=tmp_path / "cache", strict=strict)):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert str(path) in message and "no valid SMILES in 144 lines read" in message
        assert "lines 2, 3, 4, 5, 6 (+137 more)" in message and "\n" not in message


def test_strict_error_lists_the_other_unparsable_lines(tmp_path):
    path = _file(tmp_path, "some.smi", "CCO\nxx\nCCN\nC1CC\n!!\n")
    with pytest.raises(ValueError, match=r"some\.smi:2: cannot parse SMILES 'xx' \(unparsable lines: 2, 4, 5\)"):
        read_smiles_file(path)
    assert read_smiles_file(path, strict=False) == (["CCO", "CCN"], 3)


def test_file_with_no_convertible_molecule_says_why_and_where(tmp_path):
    path = _file(tmp_path, "sulfur.smi", "# thiols\nCCS\nCSC\n")
    with pytest.raises(ValueError) as info:
        load_dataset(path, cache_dir=tmp_path / "cache", spec=QM9_SPEC)
    message = str(info.value)
    assert str(path) in message and "line 2: 'CCS': atom type 'S' not in" in message and "2 skipped" in message


def test_directory_is_not_a_smiles_file(tmp_path):
    folder = tmp_path / "mols.smi"
    folder.mkdir()
    with pytest.raises(ValueError, match=rf"{folder} is not a file"):
        read_smiles_file(folder)
