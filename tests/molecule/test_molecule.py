"""Molecule app: graph conversion, rewards, dedup keys, masking diffusion invariants, tiny pretrain."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rdkit import Chem, RDConfig

from pgraft.apps.molecule import diffusion
from pgraft.apps.molecule.data import (
    QM9_SPEC,
    GraphSpec,
    batches,
    canonical_smiles,
    graph_to_smiles,
    graphs_to_state,
    load_dataset,
    parse_atom_type,
    read_smiles_file,
    smiles_to_graph,
    state_to_smiles,
)
from pgraft.apps.molecule.metrics import evaluate_smiles
from pgraft.apps.molecule.model import GraphTransformer
from pgraft.apps.molecule.presets import get_preset
from pgraft.apps.molecule.pretrain import load_base, pretrain_molecule
from pgraft.apps.molecule.rewards import REWARDS, get_reward, make_rewards, to_smiles

torch.set_num_threads(1)

NCI = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
BROAD_SPEC = GraphSpec(atom_types=("C", "N", "O", "F", "S", "Cl", "Br", "I", "P", "N+", "O-"), max_nodes=40)
SMALL_QM9 = ["CCO", "CC(=O)O", "c1ccoc1", "CC#N", "OCC=O", "NC(=O)C", "C1CC1O", "CC(C)O", "FC(F)F", "C=CC=O",
             "CNC", "OC1CC1", "CCCN", "O=CC=O"]


def nci_smiles(n: int) -> list[str]:
    return [line.split()[0] for line in NCI.read_text().splitlines()[:n]]


# ----------------------------------------------------------------------------- data
def test_atom_type_names():
    assert parse_atom_type("N+") == ("N", 1)
    assert parse_atom_type("O-") == ("O", -1)
    assert parse_atom_type("Cl") == ("Cl", 0)
    with pytest.raises(ValueError, match="Xx"):
        parse_atom_type("Xx")


def test_roundtrip_nci_sample():
    """SMILES -> kekulized graph -> SMILES gives the same canonical molecule (stereo dropped)."""
    converted = 0
    for s in nci_smiles(80):
        try:
            nodes, edges = smiles_to_graph(s, BROAD_SPEC)
        except ValueError:
            continue  # outside the vocabulary / too large / not representable: rejected, not mangled
        assert torch.equal(edges, edges.T) and edges.diagonal().eq(0).all()
        back = graph_to_smiles(nodes, edges, BROAD_SPEC.atom_types, require_connected=False)
        want = Chem.MolToSmiles(Chem.MolFromSmiles(s), isomericSmiles=False)
        assert back == want, s
        converted += 1
    assert converted >= 30


def test_roundtrip_charged_qm9_like():
    for s in ["C[NH3+]", "CC(=O)[O-]", "C[N+](C)(C)C", "[NH3+]CC(=O)[O-]", "c1cc[nH]c1"]:
        nodes, edges = smiles_to_graph(s, QM9_SPEC)
        assert graph_to_smiles(nodes, edges, QM9_SPEC.atom_types) == Chem.MolToSmiles(Chem.MolFromSmiles(s))


def test_unrepresentable_rejected():
    with pytest.raises(ValueError, match="not in"):
        smiles_to_graph("CCS", QM9_SPEC)  # S is not a QM9 atom type
    with pytest.raises(ValueError, match="max_nodes"):
        smiles_to_graph("CCCCCCCCCC", QM9_SPEC)
    with pytest.raises(ValueError, match="round-trip"):
        smiles_to_graph("[CH2]C", QM9_SPEC)  # radical: H count not implied by valence
    with pytest.raises(ValueError, match="parse"):
        smiles_to_graph("C1CC", QM9_SPEC)


def test_invalid_graph_decodes_to_none():
    nodes = torch.tensor([0, 3])  # C-F
    edges = torch.tensor([[0, 2], [2, 0]])  # double bond on F: valence violation
    assert graph_to_smiles(nodes, edges, QM9_SPEC.atom_types) is None
    two_fragments = torch.zeros(2, 2, dtype=torch.long)
    assert graph_to_smiles(torch.tensor([0, 0]), two_fragments, QM9_SPEC.atom_types) is None
    assert graph_to_smiles(torch.tensor([0, 0]), two_fragments, QM9_SPEC.atom_types, require_connected=False) == "C.C"
    assert graph_to_smiles(torch.tensor([QM9_SPEC.node_mask_id]), torch.zeros(1, 1, dtype=torch.long),
                           QM9_SPEC.atom_types) is None


def write_smi(tmp_path: Path, lines: list[str], name: str = "mols.smi") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_smiles_file_errors(tmp_path):
    bad = write_smi(tmp_path, ["CCO", "# comment", "C1CC", "CC"])
    with pytest.raises(ValueError, match=r"mols\.smi:3: cannot parse SMILES 'C1CC'"):
        read_smiles_file(bad, strict=True)
    smiles, skipped = read_smiles_file(bad, strict=False)
    assert smiles == ["CCO", "CC"] and skipped == 1
    empty = tmp_path / "empty.smi"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_smiles_file(empty)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    with pytest.raises(ValueError, match="empty.csv"):
        read_smiles_file(empty_csv)
    with pytest.raises(ValueError, match="not found"):
        read_smiles_file(tmp_path / "missing.smi")
    csv = tmp_path / "m.csv"
    csv.write_text("id,SMILES\n1,CCO\n2,xx\n")
    with pytest.raises(ValueError, match=r"m\.csv:3"):
        read_smiles_file(csv)


def tiny_dataset(tmp_path: Path, max_nodes: int = 5):
    path = write_smi(tmp_path, SMALL_QM9 + ["CCCCCCC"], "tiny.smi")  # the 7-atom one is skipped (> 5)
    spec = GraphSpec(atom_types=QM9_SPEC.atom_types, max_nodes=max_nodes)
    return load_dataset(path, cache_dir=tmp_path / "cache", spec=spec, fractions=(0.6, 0.2, 0.2))


def test_dataset_split_cache_and_batches(tmp_path):
    data = tiny_dataset(tmp_path)
    assert data.n_skipped == 1
    assert len(data.train) + len(data.val) + len(data.test) == len(SMALL_QM9)
    assert not set(data.train.smiles) & set(data.test.smiles)
    again = tiny_dataset(tmp_path)  # from the cache
    assert again.train.smiles == data.train.smiles
    assert torch.equal(again.size_distribution, data.size_distribution)
    assert math.isclose(float(data.size_distribution.sum()), 1.0, rel_tol=1e-6)
    assert data.size_distribution.shape == (6,)
    x, cond = next(batches(data.train, 3, seed=0))
    assert cond is None and x["nodes"].shape == (3, 5) and x["edges"].shape == (3, 5, 5)
    assert torch.equal(x["edges"], x["edges"].transpose(1, 2))
    # the dense batch decodes back to the stored canonical SMILES
    full = data.train.all()
    assert state_to_smiles(full, data.spec.atom_types) == list(data.train.smiles)


def test_unknown_dataset_and_strict_conversion(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope", cache_dir=tmp_path)
    path = write_smi(tmp_path, ["CCO", "CCS"], "s.smi")
    with pytest.raises(ValueError, match=r"s\.smi:#2.*'S'"):
        load_dataset(path, cache_dir=tmp_path, spec=QM9_SPEC, strict=True)


# ----------------------------------------------------------------------------- rewards
def state_of(smiles: list[str], spec: GraphSpec = BROAD_SPEC):
    return graphs_to_state([smiles_to_graph(s, spec) for s in smiles], spec.max_nodes)


def test_rewards_known_molecules():
    spec = BROAD_SPEC
    rewards = make_rewards(spec)
    x = state_of(["c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"], spec)
    # an invalid valence: a carbon with five single bonds (pentavalent C)
    bad = graphs_to_state([(torch.zeros(6, dtype=torch.long),
                            torch.tensor([[0, 1, 1, 1, 1, 1]] + [[1, 0, 0, 0, 0, 0]] * 5))], spec.max_nodes)
    x = {k: torch.cat([x[k], bad[k]]) for k in x}
    valid = rewards["valid"](x, None)
    qed = rewards["qed"](x, None)
    sa = rewards["sa"](x, None)
    both = rewards["qed+valid"](x, None)
    assert valid.tolist() == [1.0, 1.0, 0.0]
    # RDKit QED: benzene 0.443, aspirin 0.550 (Bickerton et al. weights)
    assert qed[0].item() == pytest.approx(0.4427, abs=2e-3)
    assert qed[1].item() == pytest.approx(0.5501, abs=2e-3)
    assert qed[2].item() == 0.0
    # SA: benzene ~1.0 (trivial), aspirin ~1.58, normalized (10 - SA)/9
    assert sa[0].item() == pytest.approx(1.0, abs=0.01)
    assert sa[1].item() == pytest.approx((10 - 1.58) / 9, abs=0.02)
    assert sa[2].item() == 0.0
    assert torch.allclose(both, valid + qed)
    assert all(torch.isfinite(r(x, None)).all() for r in rewards.values())
    assert to_smiles(x, spec.atom_types)[2] is None
    assert set(REWARDS) == {"valid", "qed", "sa", "qed+valid"}
    with pytest.raises(ValueError, match="unknown molecule reward"):
        get_reward("logp")


def test_dedup_keys_canonical():
    assert canonical_smiles("OCC") == canonical_smiles("C(O)C") == canonical_smiles("[CH3][CH2][OH]")
    assert canonical_smiles("c1ccccc1") == canonical_smiles("C1=CC=CC=C1")
    assert canonical_smiles("CCO") != canonical_smiles("COC")
    # graphs of the same molecule with permuted atoms share a key
    x = state_of(["OCC", "CCO", "C(C)O", "COC"], QM9_SPEC)
    keys = to_smiles(x, QM9_SPEC.atom_types)
    assert keys[0] == keys[1] == keys[2] != keys[3]


def test_one_smiles_convention_for_keys_records_and_metrics():
    """Dedup keys, reported SMILES, dataset SMILES and metrics use one form (canonical, no stereo),
    so a stereo-annotated input and its generated graph are the same molecule everywhere."""
    from pgraft.apps.molecule.data import canonical_smiles, state_to_smiles
    from pgraft.apps.molecule.train import _smiles

    given = ["C[C@H](N)C(=O)O", "C/C=C/C(=O)O", "OC[C@@H](O)CO", "c1ccccc1O"]
    x = state_of(given, BROAD_SPEC)
    expected = [canonical_smiles(s) for s in given]
    assert all("@" not in s and "/" not in s for s in expected)
    assert state_to_smiles(x, BROAD_SPEC.atom_types) == expected
    assert to_smiles(x, BROAD_SPEC.atom_types) == expected
    assert _smiles(x, BROAD_SPEC.atom_types) == expected
    assert [canonical_smiles(s) for s in given] == expected
    row = evaluate_smiles(state_to_smiles(x, BROAD_SPEC.atom_types), set(expected[:2]), expected, fcd=False)
    assert row["novelty"] == pytest.approx(0.5)  # the two stereo-annotated training molecules are not novel


# ----------------------------------------------------------------------------- diffusion
def small_model(max_nodes: int = 5, seed: int = 0) -> GraphTransformer:
    torch.manual_seed(seed)
    return GraphTransformer(n_atom_types=QM9_SPEC.n_atom_types, max_nodes=max_nodes, hidden_dim=16, edge_dim=8,
                            n_layers=2, n_heads=2)


def test_prior_shapes_and_masks():
    sizes = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.5])
    x = diffusion.prior(7, sizes, torch.Generator().manual_seed(0), n_atom_types=6, n_bond_types=4)
    n = x["node_mask"].sum(1)
    assert set(n.tolist()) <= {2, 5}
    assert (x["nodes"][x["node_mask"]] == 6).all() and (x["nodes"][~x["node_mask"]] == 0).all()
    upper = diffusion.edge_maskable(x["node_mask"])
    assert (x["edges"][upper] == 4).all() and torch.equal(x["edges"], x["edges"].transpose(1, 2))
    assert x["edges"].diagonal(dim1=1, dim2=2).eq(0).all()
    assert diffusion.masked_fraction(x, 6, 4).eq(1).all()


def test_step_symmetric_and_never_remasks():
    model = small_model().eval()
    g = torch.Generator().manual_seed(1)
    x = diffusion.prior(3, torch.tensor([0, 0, 0, 0.3, 0.3, 0.4]), g, n_atom_types=6, n_bond_types=4)
    times = torch.linspace(1, 0, 9).tolist()
    prev_frac = diffusion.masked_fraction(x, 6, 4)
    for t, t_next in zip(times[:-1], times[1:]):
        prev = x
        with torch.no_grad():
            x = diffusion.step(model, x, t, t_next, None, g)
        assert torch.equal(x["edges"], x["edges"].transpose(1, 2))
        assert x["edges"].diagonal(dim1=1, dim2=2).eq(0).all()
        assert torch.equal(x["node_mask"], prev["node_mask"])
        revealed_n = prev["nodes"] != 6
        revealed_e = prev["edges"] != 4
        assert torch.equal(x["nodes"][revealed_n], prev["nodes"][revealed_n])  # never re-masked / changed
        assert torch.equal(x["edges"][revealed_e], prev["edges"][revealed_e])
        frac = diffusion.masked_fraction(x, 6, 4)
        assert (frac <= prev_frac).all()
        prev_frac = frac
    assert prev_frac.eq(0).all()  # t_next = 0 reveals everything
    assert (x["nodes"][~x["node_mask"]] == 0).all()


def test_forward_mask_rate():
    """Each token unmasked at t_from is masked by t_to with probability (t_to - t_from)/(1 - t_from)."""
    g = torch.Generator().manual_seed(0)
    x = graphs_to_state([smiles_to_graph("CCOCC", QM9_SPEC)] * 4000, 5)
    x_t, _, _ = diffusion.forward_mask(x, 0.0, torch.full((4000,), 0.4), 6, 4, g)
    assert diffusion.masked_fraction(x_t, 6, 4).mean().item() == pytest.approx(0.4, abs=0.01)
    x_s, new_n, new_e = diffusion.forward_mask(x_t, 0.4, torch.full((4000,), 0.7), 6, 4, g)
    assert diffusion.masked_fraction(x_s, 6, 4).mean().item() == pytest.approx(0.7, abs=0.01)
    assert not (new_n & (x_t["nodes"] == 6)).any() and not (new_e & (x_t["edges"] == 4)).any()
    assert torch.equal(x_s["edges"], x_s["edges"].transpose(1, 2))


class LogitTable(torch.nn.Module):
    """Denoiser whose logits are free parameters per position: gradients show each token's loss weight."""

    def __init__(self, n: int, b: int):
        super().__init__()
        self.n_atom_types, self.n_bond_types = 6, 4
        self.node_logits = torch.nn.Parameter(torch.zeros(b, n, 6))
        self.edge_logits = torch.nn.Parameter(torch.zeros(b, n, n, 4))

    def forward(self, x, t, cond=None):
        return {"nodes": self.node_logits, "edges": self.edge_logits}


def test_pgraft_loss_ignores_tokens_masked_at_t_start():
    g = torch.Generator().manual_seed(0)
    b = 64
    x0 = graphs_to_state([smiles_to_graph("CC(=O)O", QM9_SPEC)] * b, 5)
    x_t, _, _ = diffusion.forward_mask(x0, 0.0, torch.full((b,), 0.5), 6, 4, g)
    model = LogitTable(5, b)
    diffusion.loss(model, x_t, 0.5, None, g).backward()
    masked_nodes = x_t["nodes"] == 6
    upper = diffusion.edge_maskable(x_t["node_mask"])
    masked_edges = (x_t["edges"] == 4) & upper
    assert model.node_logits.grad[masked_nodes].abs().max() == 0
    assert model.edge_logits.grad[masked_edges].abs().max() == 0
    # padding and the lower triangle carry no loss either; some unmasked tokens do
    assert model.node_logits.grad[~x_t["node_mask"]].abs().max() == 0
    assert model.edge_logits.grad[~upper].abs().max() == 0
    assert model.node_logits.grad[~masked_nodes & x_t["node_mask"]].abs().sum() > 0
    assert model.edge_logits.grad[~masked_edges & upper].abs().sum() > 0


def test_loss_t0_finite_and_deterministic():
    x0 = graphs_to_state([smiles_to_graph(s, QM9_SPEC) for s in ["CCO", "c1ccoc1", "CC#N"]], 5)
    model = small_model()
    a = diffusion.loss(model, x0, 0.0, None, torch.Generator().manual_seed(3))
    b = diffusion.loss(model, x0, 0.0, None, torch.Generator().manual_seed(3))
    assert torch.isfinite(a) and a.item() == b.item() and a.item() > 0


def test_model_symmetric_edge_logits_and_padding_invariance():
    model = small_model().eval()
    x = state_of(["CCO", "C1CC1O"], QM9_SPEC)
    x = {k: v[:, :5] if k != "edges" else v[:, :5, :5] for k, v in x.items()}
    out = model(x, torch.tensor([0.3, 0.7]))
    assert out["nodes"].shape == (2, 5, 6) and out["edges"].shape == (2, 5, 5, 4)
    assert torch.allclose(out["edges"], out["edges"].transpose(1, 2))
    # changing padded positions' tokens must not change real positions' logits
    x2 = dict(x)
    x2["nodes"] = torch.where(x["node_mask"], x["nodes"], 3)
    out2 = model(x2, torch.tensor([0.3, 0.7]))
    m = x["node_mask"]
    assert torch.allclose(out["nodes"][m], out2["nodes"][m], atol=1e-5)


# ----------------------------------------------------------------------------- pretrain + metrics smoke
def test_tiny_pretrain_sample_and_reload(tmp_path):
    data = tiny_dataset(tmp_path)
    preset = get_preset("tiny")
    assert preset.batch_size == 3
    base = pretrain_molecule(preset, tmp_path / "run", data=data, show_progress=False)
    x = diffusion.sample_graphs(base.model, 5, data.size_distribution, preset.sample_steps,
                                torch.Generator().manual_seed(0))
    assert x["nodes"].shape == (5, 5) and (x["nodes"][x["node_mask"]] < 6).all()
    assert diffusion.masked_fraction(x, 6, 4).eq(0).all()
    smiles = state_to_smiles(x, data.spec.atom_types)
    assert len(smiles) == 5
    loaded = load_base(tmp_path / "run")
    assert loaded.spec == data.spec and torch.allclose(loaded.size_distribution, data.size_distribution)
    for p, q in zip(loaded.model.parameters(), base.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError, match="pretrain"):
        load_base(tmp_path / "nothing")


def test_evaluate_smiles_row():
    train = [canonical_smiles(s) for s in ["CCO", "CC"]]
    test = [canonical_smiles(s) for s in ["CCN", "CCO", "c1ccccc1"]]
    row = evaluate_smiles(["OCC", "CCO", None, "c1ccccc1", "C1CC", "CC.O"], train, test, fcd=False)
    assert row["n_samples"] == 6 and row["n_valid"] == 3
    assert row["validity"] == pytest.approx(0.5)
    assert row["uniqueness"] == pytest.approx(2 / 3)
    assert row["novelty"] == pytest.approx(0.5)  # benzene is novel, ethanol is in train
    assert 0 < row["int_div"] <= 1 and row["atom_tv"] >= 0 and row["bond_tv"] >= 0
    assert math.isnan(row["fcd"])


def test_moses_missing_gives_install_line(monkeypatch):
    import importlib.util

    from pgraft.apps.molecule import data as data_module

    real = importlib.util.find_spec
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None if name == "moses" else real(name))
    with pytest.raises(ValueError, match=r"pip install --no-deps molsets==0\.3\.1"):
        data_module.moses_folder()
