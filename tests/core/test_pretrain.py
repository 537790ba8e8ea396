import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pgraft.core.pretrain import PretrainConfig, TrainingInterrupted, infinite_batches, pretrain
from pgraft.core.state import module_device, resolve_device

CFG = PretrainConfig(steps=12, lr=1e-2, warmup=1, seed=0, log_every=5, ckpt_every=10)


def _data() -> torch.Tensor:
    return torch.randn(40, 3, generator=torch.Generator().manual_seed(1))


def _loss(m, x, c, g):
    return ((m(x) - 2 * x) ** 2).mean()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 3)


def test_sigterm_checkpoints_the_step_in_flight_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    ref = pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "ref", {}, show_progress=False)

    calls = {"n": 0}

    def loss_with_kill(m, x, c, g):
        calls["n"] += 1
        if calls["n"] == 4:  # SIGTERM arrives during step 4 (not a checkpoint step)
            os.kill(os.getpid(), signal.SIGTERM)
        return _loss(m, x, c, g)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="after step 4") as info:
        pretrain(_model(), infinite_batches(_data(), 8, 0), loss_with_kill, CFG, tmp_path / "run", {},
                 show_progress=False)
    assert info.value.step == 4
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler is back
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["log"][-1]["step"] == 4

    resumed = pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "run", {},
                       show_progress=False)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_file(str(tmp_path / "run" / "model.safetensors")).keys() == ref.state_dict().keys()


def test_resolve_device_names_what_is_missing():
    assert resolve_device("auto") == resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")


@pytest.mark.gpu
def test_pretraining_on_the_gpu_matches_the_cpu_and_loads_on_the_cpu(tmp_path):
    """Batches are drawn on the CPU and follow the model, so a seed trains the same model on either
    device (up to float differences); the checkpoint written from the GPU loads on the CPU."""
    cpu = pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "cpu", {}, show_progress=False)
    gpu = pretrain(_model().cuda(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "gpu", {},
                   show_progress=False)
    for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
    state = torch.load(tmp_path / "gpu" / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == CFG.steps
    assert load_file(str(tmp_path / "gpu" / "model.safetensors")).keys() == cpu.state_dict().keys()


@pytest.mark.parametrize("present", [("config.json", "model.safetensors"), ("model.safetensors",), ("config.json",)])
def test_pretraining_never_overwrites_a_model_it_did_not_make(tmp_path, present):
    """A directory holding a model but no pretraining state of ours (a shipped or copied base, maybe
    damaged) is refused before anything is written, the lock file included: pretraining into it
    would replace the user's files."""
    import hashlib

    from pgraft.core.errors import UsageError

    d = tmp_path / "base"
    d.mkdir()
    for name in present:
        (d / name).write_bytes(b"a model made elsewhere " + name.encode())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    with pytest.raises(UsageError, match=r"already holds a model .* no pretraining state \(train_state\.pt\)"):
        pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, d, {}, show_progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()} == before


def test_pretraining_resumes_its_own_finished_directory_without_refusal(tmp_path):
    """A directory this pretraining wrote (it keeps train_state.pt) resumes: rerunning is a no-op."""
    first = pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "b", {}, show_progress=False)
    again = pretrain(_model(), infinite_batches(_data(), 8, 0), _loss, CFG, tmp_path / "b", {}, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
