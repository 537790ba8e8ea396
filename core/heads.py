"""The fine-tuned head: LoRA adapters, merging, and the anchor to the frozen base.

Used by the GRAFT round loop (:mod:`pgraft.core.trainer`, which re-exports these names) and by the
policy-gradient baseline.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .trainer import GraftConfig


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft) on ``targets`` (default: every nn.Linear)."""
    from peft import LoraConfig, get_peft_model

    if not targets:
        # full module names: suffixes such as "0" would also match non-Linear siblings (nn.Sequential)
        targets = tuple(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    if not targets:
        raise ValueError("LoRA needs nn.Linear layers or explicit lora_targets; the model has none")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), lora_dropout=0.0)
    return get_peft_model(model, config)


def merged_copy(head: nn.Module) -> nn.Module:
    """A plain module with LoRA weights merged in (or a copy of a fully fine-tuned head)."""
    head = copy.deepcopy(head)
    return head.merge_and_unload() if hasattr(head, "merge_and_unload") else head


def _squared_difference(out: Any, ref: Any) -> torch.Tensor:
    """Mean squared difference of two model outputs (tensors, or tuples/lists/dicts of tensors)."""
    if isinstance(out, torch.Tensor):
        return (out.float() - ref.float()).square().mean()
    if isinstance(out, dict):
        return sum(_squared_difference(out[k], ref[k]) for k in out) / len(out)
    if isinstance(out, (tuple, list)):
        return sum(_squared_difference(o, r) for o, r in zip(out, ref)) / len(out)
    raise TypeError(f"cannot anchor a model output of type {type(out).__name__}")


class Anchored(nn.Module):
    """``head`` that also runs the frozen ``base`` on every call and accumulates the mean squared
    difference of their outputs in ``penalty``: the fine-tuning loss plus ``anchor * penalty`` is a
    trust region around the base at exactly the states the loss visits.

    It is a trust region, not a KL. For Gaussian denoising steps the KL between the head's and the
    base's sampling paths (the regulariser of DPOK, Fan et al. 2023) is a sum of squared prediction
    differences *with time weights* (which vary over the schedule)
    along the model's own paths; this penalty weighs every time alike and is taken at forward-noised
    accepted samples instead. For logits (masking diffusion) it is a squared-logit proxy.
    """

    def __init__(self, head: nn.Module, base: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.base = [base]  # a list: not a submodule, so it is neither trained nor saved
        self.penalty: torch.Tensor | float = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.head(*args, **kwargs)
        with torch.no_grad():
            ref = self.base[0](*args, **kwargs)
        self.penalty = self.penalty + _squared_difference(out, ref)
        return out


def build_head(base: nn.Module, cfg: GraftConfig, init_seed: int | None = None) -> nn.Module:
    """A trainable copy of ``base`` (the base itself is untouched), with LoRA adapters when
    ``cfg.lora_rank`` > 0, initialised from ``init_seed`` (peft draws from torch's global
    generator: without a seed two runs in one process would start from different adapters)."""
    head = copy.deepcopy(base).requires_grad_(True).train()
    if cfg.lora_rank > 0:
        with seeded(init_seed):
            head = apply_lora(head, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return head


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run the block with torch's global CPU generator seeded (restored afterwards); no-op for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
