"""Masking (absorbing-state) discrete diffusion on molecular graphs: prior, reverse step, P-GRAFT loss.

Forward process (linear mask rate, ``pgraft.core.schedules.mask_rate(t) = t``): at time t every
*maskable* token is independently replaced by its mask id with probability t. Maskable tokens are
the real nodes (``node_mask``) and the upper-triangle pairs i < j of real nodes; the lower triangle
mirrors the upper one, padding never moves. t = 1 is the fully masked graph, t = 0 the molecule.

Why masking rather than DiGress' marginal transitions
-----------------------------------------------------
P-GRAFT (docs/derivations.md, "P-GRAFT losses") fine-tunes the head on accepted *intermediate* states X_t, so its
loss needs the forward process restarted at X_t, q(x_s | x_t) for s > t, in closed form, and a
reverse process whose marginal at t is exactly what the head was trained to produce.
- With masking, q(x_s | x_t) is trivial and factorizes: a token unmasked at t is masked by s with
  probability (s - t)/(1 - t); a token masked at t stays masked. The clean target of every token
  newly masked between t and s is *known* (its value in X_t), so the P-GRAFT loss is plain
  cross-entropy on those tokens, and tokens masked at t carry no loss (nothing about them is known).
  The t_start = 0 case is ordinary masked-diffusion pretraining / GRAFT on clean graphs.
- With marginal (uniform/marginal-prior) transitions, X_t is a noisy graph whose tokens are all
  "real" types; restarting the chain at X_t needs the posterior over X_0 given X_t, which is not
  available, so the head's target is not a simple function of X_t.
Masking also makes the reverse step simple and monotone: revealed tokens are never changed again.

Reverse step (MDLM/LLaDA, Sahoo et al. 2024): a token masked at t is still masked at t_next < t with
probability t_next / t, so it is revealed with probability (t - t_next)/t, its value drawn from the
model's clean-token distribution; t_next = 0 reveals everything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pgraft.core.losses import masked_cross_entropy, remask, sample_times
from pgraft.core.sampling import sample, time_vector, unmask_tokens
from pgraft.core.schedules import masking_times

GraphState = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- masks
def edge_maskable(node_mask: torch.Tensor) -> torch.Tensor:
    """Upper-triangle pairs (i < j) of real nodes, bool [B, N, N]: the edge tokens that diffuse."""
    pair = node_mask[:, :, None] & node_mask[:, None, :]
    return torch.triu(pair, diagonal=1)


def mirror_upper(edges: torch.Tensor) -> torch.Tensor:
    """Symmetric matrix with zero diagonal from the strict upper triangle of ``edges`` [B, N, N]."""
    upper = torch.triu(edges, diagonal=1)
    return upper + upper.transpose(1, 2)


def vocab_sizes(model: nn.Module) -> tuple[int, int]:
    """(n_atom_types, n_bond_types) of a denoiser; the mask ids are these numbers."""
    try:
        return int(model.n_atom_types), int(model.n_bond_types)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no n_atom_types/n_bond_types attributes; a molecule "
                         "denoiser must expose them (they define the mask token ids)") from None


def masked_fraction(x: GraphState, n_atom_types: int, n_bond_types: int) -> torch.Tensor:
    """Fraction of maskable tokens that are masked, per sample, float [B] (≈ t under the forward process)."""
    node_mask = x["node_mask"]
    upper = edge_maskable(node_mask)
    masked = ((x["nodes"] == n_atom_types) & node_mask).sum(1) + ((x["edges"] == n_bond_types) & upper).sum((1, 2))
    total = node_mask.sum(1) + upper.sum((1, 2))
    return masked.float() / total.clamp_min(1).float()


# ----------------------------------------------------------------------------- forward process
def forward_mask(x: GraphState, t_from: float, t_to: torch.Tensor, n_atom_types: int, n_bond_types: int,
                 generator: torch.Generator | None = None) -> tuple[GraphState, torch.Tensor, torch.Tensor]:
    """Run the forward process from time ``t_from`` to per-sample times ``t_to`` [B].

    Each maskable token still unmasked in ``x`` is masked with probability (t_to - t_from)/(1 - t_from)
    (``core.losses.remask``). Returns (x at t_to, newly masked nodes bool [B, N], newly masked
    upper-triangle edges bool [B, N, N]); ``x_to["edges"]`` is symmetric.
    """
    node_mask = x["node_mask"]
    nodes, new_nodes = remask(x["nodes"], node_mask, n_atom_types, t_from, t_to, generator)
    edges, new_edges = remask(x["edges"], edge_maskable(node_mask), n_bond_types, t_from, t_to, generator)
    return {"nodes": nodes, "edges": mirror_upper(edges), "node_mask": node_mask}, new_nodes, new_edges


# ----------------------------------------------------------------------------- prior / step / sample
def prior(n: int, size_distribution: torch.Tensor, generator: torch.Generator | None = None, *,
          n_atom_types: int, n_bond_types: int = 4) -> GraphState:
    """Fully masked graphs (t = 1) with sizes drawn from ``size_distribution`` [N + 1] (P(n atoms = k)).

    Returns {"nodes" [n, N], "edges" [n, N, N], "node_mask" [n, N]}: real nodes first, carrying the
    node mask id ``n_atom_types``; real off-diagonal pairs carry ``n_bond_types``; padding is 0.
    """
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    probs = torch.as_tensor(size_distribution, dtype=torch.float64)
    if probs.ndim != 1 or probs.numel() < 2 or (probs < 0).any() or probs[1:].sum() <= 0:
        raise ValueError(f"size_distribution must be a 1-D [N+1] probability vector with mass on n >= 1, got {probs}")
    probs = probs.clone()
    probs[0] = 0.0  # an empty molecule is never a sample
    gen_device = generator.device if generator is not None else "cpu"
    sizes = torch.multinomial(probs.to(gen_device), n, replacement=True, generator=generator).cpu()
    max_nodes = probs.numel() - 1
    node_mask = torch.arange(max_nodes)[None, :] < sizes[:, None]
    nodes = torch.where(node_mask, n_atom_types, 0)
    pair = node_mask[:, :, None] & node_mask[:, None, :] & ~torch.eye(max_nodes, dtype=torch.bool)[None]
    edges = torch.where(pair, n_bond_types, 0)
    return {"nodes": nodes, "edges": edges, "node_mask": node_mask}


def step(model: nn.Module, x: GraphState, t: float, t_next: float, cond: Any = None,
         generator: torch.Generator | None = None) -> GraphState:
    """One reverse step t -> t_next (core step signature); masked nodes and upper-triangle edges are
    revealed with probability (t - t_next)/t from the model's logits (``core.sampling.unmask_tokens``),
    then edges are mirrored. Revealed tokens are never re-masked or changed.
    """
    logits = model(x, time_vector(t, x["nodes"]), cond)
    node_mask = x["node_mask"]
    n_atom_types, n_bond_types = logits["nodes"].shape[-1], logits["edges"].shape[-1]
    nodes = unmask_tokens(x["nodes"], logits["nodes"], n_atom_types, t, t_next, generator, maskable=node_mask)
    edges = unmask_tokens(x["edges"], logits["edges"], n_bond_types, t, t_next, generator,
                          maskable=edge_maskable(node_mask))
    return {"nodes": nodes, "edges": mirror_upper(edges), "node_mask": node_mask}


@torch.no_grad()
def sample_graphs(model: nn.Module, n: int, size_distribution: torch.Tensor, n_steps: int,
                  generator: torch.Generator | None = None, batch_size: int = 512, cond: Any = None) -> GraphState:
    """Draw ``n`` graphs with ``n_steps`` reverse steps (fully revealed, t = 0), in chunks of ``batch_size``."""
    n_atom_types, n_bond_types = vocab_sizes(model)
    times = masking_times(n_steps)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, n, batch_size):
        x = prior(min(batch_size, n - start), size_distribution, generator,
                  n_atom_types=n_atom_types, n_bond_types=n_bond_types)
        x = {k: v.to(next(model.parameters()).device) for k, v in x.items()}
        chunks.append(sample(model, x, times, step, cond, generator))
    model.train(was_training)
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


# ----------------------------------------------------------------------------- loss
def loss(model: nn.Module, x_start: GraphState, t_start: float = 0.0, cond: Any = None,
         generator: torch.Generator | None = None, *, edge_weight: float = 1.0) -> torch.Tensor:
    """Masked-diffusion loss from X_{t_start} (core loss signature); t_start = 0: pretraining / GRAFT.

    s ~ U(t_start, 1) per sample; X_s = forward_mask(X_{t_start}, t_start -> s): each token unmasked at
    t_start is masked with probability (s - t_start)/(1 - t_start). With M_nodes / M_edges the tokens
    newly masked (upper triangle for edges),

        L = CE(node logits, X_{t_start} nodes)[M_nodes] + edge_weight * CE(edge logits, X_{t_start} edges)[M_edges]

    each CE a mean over its positions in the batch. Tokens already masked at t_start have no target
    and zero weight (docs/derivations.md, "Masking diffusion"). Averaging per token instead of the ELBO weight
    1/(s - t_start) changes only the weighting over s, not the optimum at each s, and has lower variance.
    """
    n_atom_types, n_bond_types = vocab_sizes(model)
    s = sample_times(x_start["nodes"].shape[0], t_start, generator, x_start["nodes"].device)
    x_s, new_nodes, new_edges = forward_mask(x_start, t_start, s, n_atom_types, n_bond_types, generator)
    logits = model(x_s, s, cond)
    node_ce = masked_cross_entropy(logits["nodes"], x_start["nodes"], new_nodes)
    edge_ce = masked_cross_entropy(logits["edges"], x_start["edges"], new_edges)
    return node_ce + edge_weight * edge_ce
