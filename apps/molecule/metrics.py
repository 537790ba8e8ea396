"""Generation metrics for molecules: one row of a pandas table per set of generated SMILES.

Conventions (DiGress/MOSES style, made explicit):
- ``validity`` = valid / all samples, the strict (single-fragment) convention: a sample is valid if it
  is a SMILES string RDKit parses into one connected molecule (``None`` = the graph failed to decode,
  ``"A.B"`` = several fragments, invalid). Every other metric below uses this notion of valid;
- ``validity_largest_fragment`` = the DiGress convention, also over all samples: the whole sample must
  sanitize, then its largest fragment (most atoms) is kept and the sample is valid if that fragment
  sanitizes, so ``"CCO.C"`` counts as valid (as ethanol). Always >= ``validity``; it only differs when
  the generated SMILES keep their fragments (``data.state_to_smiles(..., require_connected=False)``,
  what ``train.sample_smiles`` hands to the evaluation);
- uniqueness = distinct canonical SMILES / valid;  novelty = unique not in train / unique;
- ``vun`` = valid AND unique AND novel / all samples (DiGress/MiDi "V.U.N."), canonical SMILES of
  ``data.mol_to_smiles`` for both uniqueness and novelty; ``qed_novel_mean`` = mean QED of those
  valid, unique, novel molecules;
- QED statistics, SA and internal diversity are over the *valid unique* molecules;
- ``sa_raw_mean`` is the raw synthetic accessibility score, 1 (easy) to 10 (hard), lower is better,
  NOT the ``sa`` reward of :mod:`.rewards` ((10 - SA)/9 in [0, 1], higher is better);
- internal diversity = 1 - mean pairwise Tanimoto similarity of Morgan fingerprints (radius 2,
  2048 bits), pairs i != j;
- atom / bond distribution distance = total variation 0.5 * sum_k |p_k - q_k| between the type
  frequencies of the valid generated molecules and of the test set (atoms: element + formal charge;
  bonds: kekulized single/double/triple);
- FCD (Preuer et al. 2018) between valid generated and test SMILES with ``fcd-torch`` (ChemNet weights
  ship inside the package, so it runs offline); slow, hence ``fcd=False`` to skip it. ``fcd_n`` is the
  number of generated molecules it was computed on (0 when not computed) and ``fcd_ref_n`` the number
  of reference molecules: FCD has a sample-size floor (real vs real about 0.40 at 1,000 molecules,
  0.15 at 3,000, 0.07 at 10,000), so compare FCDs only at equal n.
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


def _largest_fragment_valid(smiles: str | None) -> bool:
    """DiGress validity: the whole sample sanitizes and so does its largest fragment (most atoms)."""
    if smiles is None or not isinstance(smiles, str) or not smiles:
        return False
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)  # sanitizes the whole molecule
        if mol is None or mol.GetNumAtoms() == 0:
            return False
        try:
            frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=True)
        except Chem.rdchem.MolSanitizeException:
            return False
        largest = max(frags, key=lambda m: m.GetNumAtoms())
        return Chem.MolFromSmiles(mol_to_smiles(largest)) is not None


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


def valid_unique_novel(smiles: Sequence[str | None],
                       train_smiles: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """(canonical SMILES of the valid samples, the unique ones in first-occurrence order, the unique
    ones not in ``train_smiles``): the three sets behind validity, uniqueness, novelty and V.U.N."""
    valid = [mol_to_smiles(mol) for mol in (_mol(s) for s in smiles) if mol is not None]
    unique = list(dict.fromkeys(valid))
    train_set = train_smiles if isinstance(train_smiles, (set, frozenset)) else set(train_smiles)
    return valid, unique, [s for s in unique if s not in train_set]


def _rates(n: int, valid: list[str], unique: list[str], novel: list[str]) -> dict[str, float]:
    nan = float("nan")
    return {"validity": len(valid) / n if n else nan, "uniqueness": len(unique) / len(valid) if valid else nan,
            "novelty": len(novel) / len(unique) if unique else nan, "vun": len(novel) / n if n else nan}


def novelty_rates(smiles: Sequence[str | None], train_smiles: Iterable[str]) -> dict[str, float]:
    """validity, uniqueness, novelty and V.U.N., as in :func:`evaluate_smiles` (no RDKit scoring:
    cheap enough for every round's candidates)."""
    return _rates(len(smiles), *valid_unique_novel(smiles, train_smiles))


def novelty_row(smiles: Sequence[str | None], train_smiles: Iterable[str]) -> dict[str, float]:
    """:func:`novelty_rates` and the mean QED of the valid samples and of the V.U.N. ones (the
    quantities the QED gain is traded against)."""
    valid, unique, novel = valid_unique_novel(smiles, train_smiles)
    qed_of = {s: qed_score(_mol(s)) for s in unique}
    nan = float("nan")
    return {**_rates(len(smiles), valid, unique, novel),
            "qed_valid_mean": float(np.mean([qed_of[s] for s in valid])) if valid else nan,
            "qed_vun_mean": float(np.mean([qed_of[s] for s in novel])) if novel else nan}


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
    """Metrics of generated ``smiles`` (None = invalid graph; ``"A.B"`` = a fragmented one, invalid
    except for ``validity_largest_fragment``) as one flat dict (a DataFrame row); see the module
    docstring for each key.

    ``train_smiles``/``test_smiles`` must be canonical SMILES without stereo, as stored by
    ``data.load_dataset`` (``MoleculeData.train.smiles``), so novelty is a set lookup. The test set
    is subsampled (seeded) to ``max_reference`` molecules for the distribution distances and FCD.
    """
    n = len(smiles)
    if n == 0:
        raise ValueError("evaluate_smiles needs at least one generated sample")
    valid, unique, novel = valid_unique_novel(smiles, train_smiles)  # unique: first occurrence order
    unique_mols = [_mol(s) for s in unique]
    qeds = [qed_score(m) for m in unique_mols]
    qed_of = dict(zip(unique, qeds))
    novel_qeds = [qed_of[s] for s in novel]
    n_largest_fragment = sum(_largest_fragment_valid(s) for s in smiles)
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
        "validity_largest_fragment": n_largest_fragment / n,
        "uniqueness": len(unique) / len(valid) if valid else nan,
        "novelty": len(novel) / len(unique) if unique else nan,
        "valid_unique": len(unique) / n,
        "vun": len(novel) / n,
        "qed_mean": float(np.mean(qeds)) if qeds else nan,
        "qed_median": float(statistics.median(qeds)) if qeds else nan,
        "qed_frac_0.7": float(np.mean([q > 0.7 for q in qeds])) if qeds else nan,
        "qed_frac_0.9": float(np.mean([q > 0.9 for q in qeds])) if qeds else nan,
        "qed_novel_mean": float(np.mean(novel_qeds)) if novel_qeds else nan,
        "sa_raw_mean": float(np.mean(sas)) if sas else nan,
        "int_div": internal_diversity(unique_mols, seed=seed),
        "atom_tv": total_variation(gen_atoms, ref_atoms),
        "bond_tv": total_variation(gen_bonds, ref_bonds),
    }
    reference = [mol_to_smiles(m) for m in test_mols]
    row["fcd"] = fcd_score(valid, reference, fcd_device) if fcd else nan
    if not math.isfinite(row["fcd"]) and fcd:
        row["fcd"] = nan  # fewer than 2 valid molecules: FCD undefined
    computed = math.isfinite(row["fcd"])
    row["fcd_n"] = len(valid) if computed else 0  # FCD depends on n: report it next to it
    row["fcd_ref_n"] = len(reference) if computed else 0
    return row
