import torch
from torch import nn

from pgraft.core.heads import build_head
from pgraft.core.trainer import GraftConfig


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def _lora(head):
    return {n: p.detach().clone() for n, p in head.named_parameters() if "lora" in n}


def test_lora_head_init_depends_on_its_seed_only():
    torch.manual_seed(0)
    base = _Net()
    cfg = GraftConfig(lora_rank=2, lora_targets=("proj",))
    first = _lora(build_head(base, cfg, init_seed=5))
    torch.rand(100)  # the global generator moves on between the two runs of one process
    second = _lora(build_head(base, cfg, init_seed=5))
    other = _lora(build_head(base, cfg, init_seed=6))
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    state = torch.random.get_rng_state()
    build_head(base, cfg, init_seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator is left as it was
