"""Generation metrics for molecules: one row of a pandas table per set of generated SMILES.

Conventions (DiGress/MOSES style, made explicit):
- validity = valid / all samples; a sample is valid if it is a SMILES string RDKit parses into one
  connected molecule (``None`` = the graph failed to decode);
- uniqueness = distinct canonical SMILES / valid;  novelty = unique not in train / unique;
- QED statistics, SA and internal diversity are over the *valid unique* molecules;
- internal diversity = 1 - mean pairwise Tanimoto similarity of Morgan fingerprints (radius 2,
  2048 bits), pairs i != j;
- atom / bond distribution distance = total variation 0.5 * sum_k |p_k - q_k| between the type
  frequencies of the valid generated molecules and of the test set (atoms: element + formal charge;
  bonds: kekulized single/double/triple);
- FCD (Preuer et al. 2018) between valid generated and test SMILES with ``fcd-torch`` (ChemNet weights
  ship inside the package, so it runs offline); slow, hence ``fcd=False`` to skip it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from rdkit import Chem, DataStructs, rdBase
from rdkit.Chem import rdFingerprintGenerator

from .data import atom_type_name, mol_to_smiles
from .rewards import qed_score, sa_raw

BOND_LABELS = {Chem.BondType.SINGLE: "single", Chem.BondType.DOUBLE: "double", Chem.BondType.TRIPLE: "triple"}


def _mol(smiles: str | None) -> Chem.Mol | None:
    """Parse one connected molecule (None if unparsable or fragmented)."""
    if smiles is None or not isinstance(smiles, str) or not smiles or "." in smiles:
        return None
    with rdBase.BlockLogs():
        return Chem.MolFromSmiles(smiles)


def type_counts(mols: Iterable[Chem.Mol]) -> tuple[Counter, Counter]:
    """(atom-type counts, kekulized bond-type counts) over ``mols``."""
    atoms, bonds = Counter(), Counter()
    for mol in mols:
        for a in mol.GetAtoms():
            atoms[atom_type_name(a.GetSymbol(), a.GetFormalCharge())] += 1
        kek = Chem.Mol(mol)
        with rdBase.BlockLogs():
            try:
                Chem.Kekulize(kek, clearAromaticFlags=True)
            except Chem.rdchem.KekulizeException:
                continue
        for b in kek.GetBonds():
            bonds[BOND_LABELS.get(b.GetBondType(), "other")] += 1
    return atoms, bonds


def total_variation(p: Counter, q: Counter) -> float:
    """0.5 * sum_k |p_k/|p| - q_k/|q||; nan if either side is empty."""
    sp, sq = sum(p.values()), sum(q.values())
    if sp == 0 or sq == 0:
        return float("nan")
    return 0.5 * sum(abs(p[k] / sp - q[k] / sq) for k in set(p) | set(q))


def internal_diversity(mols: Sequence[Chem.Mol], max_mols: int = 2000, seed: int = 0) -> float:
    """1 - mean Tanimoto over pairs i != j of Morgan fingerprints (a seeded subset of ``max_mols``)."""
    if len(mols) < 2:
        return float("nan")
    if len(mols) > max_mols:
        mols = random.Random(seed).sample(list(mols), max_mols)
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(m) for m in mols]
    total, pairs = 0.0, 0
    for i in range(len(fps) - 1):
        sims = DataStructs.BulkTanimotoSimilarity(fps[i], fps[i + 1 :])
        total += sum(sims)
        pairs += len(sims)
    return 1.0 - total / pairs


def fcd_score(generated: Sequence[str], reference: Sequence[str], device: str = "cpu") -> float:
    """Fréchet ChemNet Distance with fcd-torch (single process: ``n_jobs=1`` avoids worker pools)."""
    if len(generated) < 2 or len(reference) < 2:
        return float("nan")
    from fcd_torch import FCD  # imported lazily: loading ChemNet takes a few seconds

    return float(FCD(device=device, n_jobs=1)(list(generated), list(reference)))


def evaluate_smiles(
    smiles: Sequence[str | None],
    train_smiles: Iterable[str],
    test_smiles: Sequence[str],
    *,
    fcd: bool = True,
    fcd_device: str = "cpu",
    max_reference: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of generated ``smiles`` (None = invalid graph) as one flat dict (a DataFrame row).

    ``train_smiles``/``test_smiles`` must be canonical SMILES without stereo, as stored by
    ``data.load_dataset`` (``MoleculeData.train.smiles``), so novelty is a set lookup. The test set
    is subsampled (seeded) to ``max_reference`` molecules for the distribution distances and FCD.
    """
    n = len(smiles)
    if n == 0:
        raise ValueError("evaluate_smiles needs at least one generated sample")
    valid: list[str] = []
    for s in smiles:
        mol = _mol(s)
        if mol is not None:
            valid.append(mol_to_smiles(mol))
    unique = list(dict.fromkeys(valid))  # first occurrence order, deterministic
    train_set = train_smiles if isinstance(train_smiles, (set, frozenset)) else set(train_smiles)
    novel = [s for s in unique if s not in train_set]
    unique_mols = [_mol(s) for s in unique]
    qeds = [qed_score(m) for m in unique_mols]
    sas = [sa_raw(m) for m in unique_mols]
    test = list(test_smiles)
    if len(test) > max_reference:
        test = random.Random(seed).sample(test, max_reference)
    test_mols = [m for m in (_mol(s) for s in test) if m is not None]
    gen_atoms, gen_bonds = type_counts(_mol(s) for s in valid)
    ref_atoms, ref_bonds = type_counts(test_mols)
    nan = float("nan")
    row: dict[str, Any] = {
        "n_samples": n,
        "n_valid": len(valid),
        "n_unique": len(unique),
        "validity": len(valid) / n,
        "uniqueness": len(unique) / len(valid) if valid else nan,
        "novelty": len(novel) / len(unique) if unique else nan,
        "valid_unique": len(unique) / n,
        "qed_mean": float(np.mean(qeds)) if qeds else nan,
        "qed_median": float(statistics.median(qeds)) if qeds else nan,
        "qed_frac_0.7": float(np.mean([q > 0.7 for q in qeds])) if qeds else nan,
        "qed_frac_0.9": float(np.mean([q > 0.9 for q in qeds])) if qeds else nan,
        "sa_mean": float(np.mean(sas)) if sas else nan,
        "int_div": internal_diversity(unique_mols, seed=seed),
        "atom_tv": total_variation(gen_atoms, ref_atoms),
        "bond_tv": total_variation(gen_bonds, ref_bonds),
    }
    row["fcd"] = fcd_score(valid, [mol_to_smiles(m) for m in test_mols], fcd_device) if fcd else nan
    if not math.isfinite(row["fcd"]) and fcd:
        row["fcd"] = nan  # fewer than 2 valid molecules: FCD undefined
    return row
