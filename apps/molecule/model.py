"""Dense graph-transformer denoiser for masked molecular graphs (in the spirit of DiGress).

Input: a (partially) masked graph state ``{"nodes" [B,N], "edges" [B,N,N], "node_mask" [B,N]}``
whose node tokens are in ``0..n_atom_types`` and edge tokens in ``0..n_bond_types`` (the last id of
each is the mask token), and the time t [B]. Output: clean-token logits over the real classes,

    {"nodes": [B, N, n_atom_types], "edges": [B, N, N, n_bond_types]}   (edge logits symmetric)

Layer (after DiGress' "XEy" layer, Vignac et al. 2023, App. B, without the global-feature stream):
pair features Y_ij = Q_i * K_j / sqrt(de) (elementwise, width de) are modulated by the edge features,
Y_ij <- Y_ij (1 + W1 e_ij) + W2 e_ij; the edge stream is updated from Y_ij, the node stream by a
per-head softmax over j of W_s Y_ij weighting V_j. Time enters by FiLM on every layer norm. Dense tensors are
fine for N <= ~30 (QM9: N = 9, MOSES: N = 27) and avoid torch-geometric's scatter overhead on CPU.

Structural features: attention averages (softmax), it cannot count; but valence is a *sum* of bond
orders, and connectivity is a global property. So each node also receives counts of its revealed
single/double/triple bonds, its still masked incident edges, its revealed bond-order sum, and the
size of its connected component through revealed bonds (and through revealed-or-masked edges):
cheap, and they are what a valid single-fragment molecule is checked against. Measured on QM9
(600 steps): without the component features ~20% of samples were disconnected.

All constructor arguments are plain ints/floats/bools (JSON-able), as
``pgraft.core.checkpoint.save_pretrained`` / ``load_pretrained`` require.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import N_BOND_TYPES


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DDPM), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def reachable(adj: torch.Tensor) -> torch.Tensor:
    """Transitive closure of a boolean adjacency [B, N, N] (self included), by ceil(log2 N) squarings."""
    n = adj.shape[-1]
    r = (adj | torch.eye(n, dtype=torch.bool, device=adj.device)[None]).float()
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        r = (torch.bmm(r, r) > 0).float()
    return r > 0


def structural_features(edges: torch.Tensor, node_mask: torch.Tensor, n_bond_types: int,
                        max_nodes: int) -> torch.Tensor:
    """Per-node features of the partially revealed graph, [B, N, n_bond_types + 3].

    Columns (over real neighbours j != i, scaled by 1/max_nodes unless noted):
    - #revealed bonds of each bond type 1..n_bond_types-1 and #masked incident edges;
    - revealed bond-order sum (the partial valence);
    - fraction of the graph's real nodes connected to i through revealed bonds, and through revealed
      bonds or masked edges (a molecule is one fragment: if the second is < 1 the graph is already
      disconnected, if the first is < 1 connections are still missing).
    """
    n = edges.shape[1]
    pair = node_mask[:, :, None] & node_mask[:, None, :]
    pair = pair & ~torch.eye(n, dtype=torch.bool, device=edges.device)[None]
    one_hot = F.one_hot(edges.clamp(max=n_bond_types), n_bond_types + 1).float() * pair[..., None]
    counts = one_hot.sum(2)  # [B, N, n_bond_types + 1]; column 0 ("no bond") is implied, dropped
    # bond id k is a bond of order k (none/single/double/triple), so the partial valence is sum_j id_ij
    order = torch.arange(n_bond_types, dtype=torch.float32, device=edges.device)
    valence = (one_hot[..., :n_bond_types] * order).sum((2, 3))
    bonded = pair & (edges > 0) & (edges < n_bond_types)
    maybe = pair & (edges > 0)  # revealed bond or still masked
    n_real = node_mask.float().sum(1, keepdim=True).clamp_min(1)
    comp = (reachable(bonded) & node_mask[:, None, :]).float().sum(2) / n_real
    comp_potential = (reachable(maybe) & node_mask[:, None, :]).float().sum(2) / n_real
    feats = torch.cat([counts[..., 1:] / max_nodes, valence[..., None] / max_nodes,
                       comp[..., None], comp_potential[..., None]], dim=-1)
    return feats * node_mask[..., None]


class XELayer(nn.Module):
    """One graph-transformer layer on node features h [B,N,d] and edge features e [B,N,N,de].

    Pair tensors are kept at the (smaller) edge width de: they are N^2 times larger than node tensors
    and dominate the cost on CPU. Attention uses ``n_heads`` heads, each scored from a linear map of
    the edge-modulated pair features Y_ij.
    """

    def __init__(self, dim: int, edge_dim: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.norm_h = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm_e = nn.LayerNorm(edge_dim, elementwise_affine=False)
        self.film = nn.Linear(dim, 2 * dim + 2 * edge_dim)  # time/size -> (scale, shift) for h and e
        self.q, self.k = nn.Linear(dim, edge_dim), nn.Linear(dim, edge_dim)
        self.v = nn.Linear(dim, dim)
        self.e_mul, self.e_add = nn.Linear(edge_dim, edge_dim), nn.Linear(edge_dim, edge_dim)
        self.score = nn.Linear(edge_dim, n_heads)
        self.out_h, self.out_e = nn.Linear(dim, dim), nn.Linear(edge_dim, edge_dim)
        self.ffn_h = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim), nn.GELU(),
                                   nn.Linear(ffn_mult * dim, dim))
        self.ffn_e = nn.Sequential(nn.LayerNorm(edge_dim), nn.Linear(edge_dim, ffn_mult * edge_dim), nn.GELU(),
                                   nn.Linear(ffn_mult * edge_dim, edge_dim))
        self.drop = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(edge_dim)

    def forward(self, h: torch.Tensor, e: torch.Tensor, c: torch.Tensor, node_mask: torch.Tensor,
                pair_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = h.shape
        de = e.shape[-1]
        sh, bh, se, be = self.film(c).split([d, d, de, de], dim=-1)
        hn = self.norm_h(h) * (1 + sh[:, None]) + bh[:, None]
        en = self.norm_e(e) * (1 + se[:, None, None]) + be[:, None, None]
        y = self.q(hn)[:, :, None, :] * self.k(hn)[:, None, :, :] * self.scale  # [B, N, N, de]
        y = y * (1 + self.e_mul(en)) + self.e_add(en)  # FiLM of pair scores by the edge features
        e = e + self.drop(self.out_e(y)) * pair_mask[..., None]
        # softmax over neighbours j per head; padded j excluded
        logits = self.score(y).masked_fill(~node_mask[:, None, :, None], float("-inf"))  # [B, N, N, H]
        attn = torch.softmax(logits, dim=2)
        v = self.v(hn).view(b, n, self.n_heads, d // self.n_heads)
        agg = torch.einsum("bijh,bjhc->bihc", attn, v).reshape(b, n, d)
        h = h + self.drop(self.out_h(agg)) * node_mask[..., None]
        h = h + self.drop(self.ffn_h(h)) * node_mask[..., None]
        e = e + self.drop(self.ffn_e(e)) * pair_mask[..., None]
        return h, e


class GraphTransformer(nn.Module):
    """Masked-graph denoiser: ``model(state, t [B], cond=None) -> {"nodes", "edges"}`` logits.

    Attributes ``n_atom_types``/``n_bond_types`` tell ``diffusion.py`` the mask ids (= these numbers).
    """

    def __init__(
        self,
        n_atom_types: int,
        n_bond_types: int = N_BOND_TYPES,
        max_nodes: int = 9,
        hidden_dim: int = 64,
        edge_dim: int = 32,
        n_layers: int = 4,
        n_heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        use_structural_features: bool = True,
    ) -> None:
        super().__init__()
        if n_atom_types < 1 or n_bond_types < 2 or max_nodes < 1 or n_layers < 1:
            raise ValueError(f"bad model sizes: n_atom_types={n_atom_types}, n_bond_types={n_bond_types}, "
                             f"max_nodes={max_nodes}, n_layers={n_layers}")
        self.n_atom_types, self.n_bond_types, self.max_nodes = n_atom_types, n_bond_types, max_nodes
        self.use_structural_features = use_structural_features
        self.node_embed = nn.Embedding(n_atom_types + 1, hidden_dim)  # + mask token
        self.edge_embed = nn.Embedding(n_bond_types + 1, edge_dim)
        n_struct = n_bond_types + 3 if use_structural_features else 0
        self.struct_proj = nn.Linear(n_struct, hidden_dim) if use_structural_features else None
        # global conditioning: time embedding + graph size (the model must know how many atoms it fills)
        # + numbers of connected components (revealed / potential) when structural features are on
        n_global = 1 + (2 if use_structural_features else 0)
        self.cond_mlp = nn.Sequential(nn.Linear(hidden_dim + n_global, hidden_dim), nn.SiLU(),
                                      nn.Linear(hidden_dim, hidden_dim))
        self.layers = nn.ModuleList(XELayer(hidden_dim, edge_dim, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.head_h = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, n_atom_types))
        self.head_e = nn.Sequential(nn.LayerNorm(edge_dim), nn.Linear(edge_dim, n_bond_types))

    def forward(self, x: dict[str, torch.Tensor], t: torch.Tensor, cond: Any = None) -> dict[str, torch.Tensor]:
        nodes, edges, node_mask = x["nodes"], x["edges"], x["node_mask"]
        n = nodes.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=nodes.device)[None]
        pair_mask = node_mask[:, :, None] & node_mask[:, None, :] & ~eye
        h = self.node_embed(nodes)
        n_real = node_mask.float().sum(1, keepdim=True)
        globals_ = [n_real / self.max_nodes]
        if self.struct_proj is not None:
            feats = structural_features(edges, node_mask, self.n_bond_types, self.max_nodes)
            h = h + self.struct_proj(feats)
            # #components = sum_i 1/|component(i)|; |component(i)| = fraction * n_real
            comp_sizes = (feats[..., -2:] * n_real[..., None]).clamp_min(1.0)
            n_comp = ((1.0 / comp_sizes) * node_mask[..., None]).sum(1)  # [B, 2]
            globals_.append(n_comp / self.max_nodes)
        e = self.edge_embed(edges)
        c = self.cond_mlp(torch.cat([timestep_embedding(t, self.node_embed.embedding_dim), *globals_], dim=-1))
        h = h * node_mask[..., None]
        e = e * pair_mask[..., None]
        for layer in self.layers:
            h, e = layer(h, e, c, node_mask, pair_mask)
        edge_logits = self.head_e(e)
        # an undirected bond has one distribution: symmetrize the logits
        edge_logits = 0.5 * (edge_logits + edge_logits.transpose(1, 2))
        return {"nodes": self.head_h(h), "edges": edge_logits}

    def init_kwargs(self) -> dict[str, Any]:
        """The JSON-able constructor kwargs (for ``save_pretrained``)."""
        return {"n_atom_types": self.n_atom_types, "n_bond_types": self.n_bond_types, "max_nodes": self.max_nodes,
                "hidden_dim": self.node_embed.embedding_dim, "edge_dim": self.edge_embed.embedding_dim,
                "n_layers": len(self.layers), "n_heads": self.layers[0].n_heads, "ffn_mult": self.layers[0].ffn_h[1].out_features // self.node_embed.embedding_dim,
                "dropout": self.layers[0].drop.p, "use_structural_features": self.use_structural_features}
