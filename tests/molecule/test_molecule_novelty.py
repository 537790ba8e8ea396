"""V.U.N., novel QED, the two validity conventions, FCD's n, the SA metric's name, and ``--novel``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from clitools import invoke
from rdkit import Chem

from pgraft.apps.molecule.data import (
    QM9_SPEC,
    GraphSpec,
    canonical_smiles,
    graphs_to_state,
    load_dataset,
    smiles_to_graph,
    state_to_smiles,
)
from pgraft.apps.molecule.metrics import evaluate_smiles
from pgraft.apps.molecule.rewards import NovelReward, get_reward, novel_reward, qed_score

torch.set_num_threads(1)

SMALL = ["CCO", "CC(=O)O", "c1ccoc1", "CC#N", "OCC=O", "NC(=O)C", "C1CC1O", "CC(C)O", "FC(F)F", "C=CC=O", "CNC"]


def qed_of(smiles: str) -> float:
    return qed_score(Chem.MolFromSmiles(smiles))


def test_vun_and_novel_qed_hand_count():
    train = {canonical_smiles(s) for s in ["CCO", "CC"]}
    test = [canonical_smiles(s) for s in ["CCN", "CCO", "c1ccccc1"]]
    generated = [
        "OCC",        # valid, unique, in train (ethanol)
        "CCO",        # duplicate of the above
        None,         # graph that failed to decode
        "c1ccccc1",   # valid, unique, novel
        "C1=CC=CC=C1",  # benzene again (Kekulé form): duplicate
        "CCN",        # valid, unique, novel
        "C1CC",       # unparsable
        "CC.O",       # two fragments: invalid (single-fragment), valid (largest fragment)
    ]
    row = evaluate_smiles(generated, train, test, fcd=False)
    # hand count: 8 samples; valid = OCC, CCO, benzene x2, CCN (5); unique = 3; novel = benzene, CCN (2)
    assert row["n_samples"] == 8 and row["n_valid"] == 5 and row["n_unique"] == 3
    assert row["vun"] == pytest.approx(2 / 8)
    assert row["novelty"] == pytest.approx(2 / 3)
    assert row["qed_novel_mean"] == pytest.approx(np.mean([qed_of("c1ccccc1"), qed_of("CCN")]))
    assert row["qed_novel_mean"] != pytest.approx(row["qed_mean"])  # ethanol is left out
    assert row["validity"] == pytest.approx(5 / 8)
    assert row["validity_largest_fragment"] == pytest.approx(6 / 8)
    # the raw SA metric (1 easy .. 10 hard) has its own name, apart from the "sa" reward in [0, 1]
    assert "sa_mean" not in row and 1.0 <= row["sa_raw_mean"] <= 10.0
    # FCD not computed: its n says so
    assert math.isnan(row["fcd"]) and row["fcd_n"] == 0
    assert list(row).index("fcd_n") == list(row).index("fcd") + 1


def test_no_novel_molecule_gives_nan_novel_qed():
    row = evaluate_smiles(["CCO", "OCC"], {"CCO"}, ["CCN"], fcd=False)
    assert row["vun"] == 0.0 and math.isnan(row["qed_novel_mean"])


def test_largest_fragment_validity_vs_single_fragment():
    row = evaluate_smiles(["CCO.C", "C.CCO", "c1ccccc1.O", "CC(C)(C)(C)C.C"], set(), ["CCO"], fcd=False)
    assert row["validity"] == 0.0  # fragmented: rejected by the single-fragment convention
    assert row["validity_largest_fragment"] == pytest.approx(3 / 4)  # pentavalent C never sanitizes
    # the same from graphs: a two-fragment graph decodes to None when one fragment is required
    g_a, g_b = smiles_to_graph("CCO", QM9_SPEC), smiles_to_graph("C", QM9_SPEC)
    n_a = g_a[0].shape[0]
    nodes = torch.cat([g_a[0], g_b[0]])
    edges = torch.zeros(n_a + 1, n_a + 1, dtype=torch.long)
    edges[:n_a, :n_a] = g_a[1]
    state = graphs_to_state([(nodes, edges)], QM9_SPEC.max_nodes)
    assert state_to_smiles(state, QM9_SPEC.atom_types) == [None]
    kept = state_to_smiles(state, QM9_SPEC.atom_types, require_connected=False)
    assert "." in kept[0]
    row = evaluate_smiles(kept, set(), ["CCO"], fcd=False)
    assert row["validity"] == 0.0 and row["validity_largest_fragment"] == 1.0


def state_of(smiles: list[str]):
    return graphs_to_state([smiles_to_graph(s, QM9_SPEC) for s in smiles], QM9_SPEC.max_nodes)


def test_novel_reward_zero_for_training_molecules():
    x = state_of(["OCC", "c1ccoc1", "CC#N"])
    plain = get_reward("qed")(x, None)
    reward = novel_reward(get_reward("qed"), {canonical_smiles("CCO"), canonical_smiles("CC#N")})
    assert isinstance(reward, NovelReward)
    got = reward(x, None)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert got[0].item() == 0.0 and got[2].item() == 0.0  # ethanol, acetonitrile: in the training set
    assert got[1].item() == pytest.approx(plain[1].item()) and got[1].item() > 0  # furan: novel, plain QED
    # generic: wraps any molecule reward (qed+valid is in [0, 2])
    both = novel_reward(get_reward("qed+valid"), {canonical_smiles("CCO")})(x, None)
    assert both[0].item() == 0.0 and both[1].item() == pytest.approx(1 + plain[1].item())


def _tiny_base(root):
    from pgraft.apps.molecule.presets import get_preset
    from pgraft.apps.molecule.pretrain import pretrain_molecule

    (root / "tiny.smi").write_text("\n".join(SMALL) + "\n")
    data = load_dataset(root / "tiny.smi", cache_dir=root / "cache", fractions=(0.6, 0.2, 0.2),
                        spec=GraphSpec(atom_types=QM9_SPEC.atom_types, max_nodes=5))
    return pretrain_molecule(get_preset("tiny"), root / "base", data=data, show_progress=False), data


def test_make_problem_novel_and_cli_train_novel(tmp_path, monkeypatch):
    import pgraft.apps.molecule.train as mtrain

    base, data = _tiny_base(tmp_path)
    reference = frozenset(data.train.smiles)
    calls = []
    monkeypatch.setattr(mtrain, "training_smiles", lambda *key: calls.append(key) or reference)
    in_train, novel = data.train.smiles[0], "C1CC1"
    assert novel not in reference
    x = state_of([in_train, novel])
    plain = mtrain.make_problem(base, "qed", 4).reward(x, None)
    scored = mtrain.make_problem(base, "qed", 4, novel=True).reward(x, None)
    assert scored[0].item() == 0.0 and plain[0].item() > 0
    assert scored[1].item() == pytest.approx(plain[1].item())
    # the reference is the split the base's preset names (dataset, seed, limit)
    assert calls == [(base.preset.dataset, base.preset.seed, base.preset.dataset_limit)]

    result, output = invoke("molecule", "train", "--out", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                            "--preset", "tiny", "--novel", "--rounds", "1", "--groups", "2", "--m", "2",
                            "--train-steps", "1", "--batch-size", "2", "--sample-steps", "4", "--seed", "0", "--quiet")
    assert result.exit_code == 0, output + repr(result.exception)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["app"]["molecule"]["novel"] is True
    assert mtrain.load_run(tmp_path / "run")[2].novel is True


def test_cli_help_names_novel_and_sa_scales():
    result, output = invoke("molecule", "train", "--help")
    assert result.exit_code == 0
    assert "--novel" in output and "--no-novel" in output and "training split" in output
    assert "sa_raw_mean" in output


def test_novelty_row_counts_valid_unique_novel_as_evaluate_smiles_does():
    """Five samples, one invalid, one repeated, one in the training split: validity 4/5, uniqueness
    3/4, novelty 2/3, V.U.N. 2/5, and the same four numbers as the full evaluation row."""
    from rdkit import Chem

    from pgraft.apps.molecule.metrics import evaluate_smiles, novelty_row, qed_score

    smiles = ["CCO", "OCC", "CCN", None, "c1ccccc1"]  # OCC is CCO written another way
    row = novelty_row(smiles, frozenset({"CCO"}))
    assert row["validity"] == 4 / 5 and row["uniqueness"] == 3 / 4
    assert row["novelty"] == 2 / 3 and row["vun"] == 2 / 5
    qeds = {s: qed_score(Chem.MolFromSmiles(s)) for s in ("CCO", "CCN", "c1ccccc1")}
    assert row["qed_vun_mean"] == pytest.approx((qeds["CCN"] + qeds["c1ccccc1"]) / 2)
    assert row["qed_valid_mean"] == pytest.approx((2 * qeds["CCO"] + qeds["CCN"] + qeds["c1ccccc1"]) / 4)
    full = evaluate_smiles(smiles, {"CCO"}, ["CCO", "CCN"], fcd=False)
    assert {k: full[k] for k in ("validity", "uniqueness", "novelty", "vun")} == \
        {k: row[k] for k in ("validity", "uniqueness", "novelty", "vun")}
