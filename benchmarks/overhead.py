"""Overhead of the core: how long GRS decisions take, and how close the round loop's sampling comes
to the model's own forward passes.

- GRS: ``accept`` on 10^6 rewards in groups of 8 (the round loop's layout), rules rs / bon / topk
  (K = 2), best of 3 runs, one thread.
- Sampling: one round's candidates through ``core.trainer.sample_candidates`` (chunking, seeding,
  prior, the app's step function, moving to and from the device, the reward set to zero so that it
  is not counted) against a raw loop that replays exactly the model calls that sampling made (same
  inputs, recorded by a forward hook). The ratio raw / round loop is what the loop adds beyond the
  network: 1.00 means nothing; the rest is the step function's own work (drawing tokens or noise)
  plus the loop's bookkeeping.

    python benchmarks/overhead.py

Prints one line per figure and ends with ``overhead ratio: X.XX`` (the molecule model's ratio,
512 molecules x 100 steps, the issue's reference setting).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pgraft.core.grs import GRSConfig, accept  # noqa: E402
from pgraft.core.trainer import GraftConfig, sample_candidates  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def grs_timings(n: int = 10**6, m: int = 8) -> dict[str, float]:
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    groups = torch.arange(n) // m
    return {rule: best_of(lambda c=GRSConfig(rule=rule, k=2): accept(rewards, groups, c, torch.Generator()
                                                                      .manual_seed(1)))
            for rule in ("rs", "bon", "topk")}


def sampling_ratio(problem, model: torch.nn.Module, n: int) -> tuple[float, float]:
    """(seconds of the round loop's sampling, seconds of the same forward calls replayed raw)."""
    problem.reward = lambda x0, cond: torch.zeros(len(next(iter(x0.values())) if isinstance(x0, dict) else x0))
    problem.key = problem.describe = problem.metrics = None
    cfg = GraftConfig(rounds=1, groups=n // 8, group_size=8, sample_batch_size=n, seed=0)
    calls: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        calls.append((args, kwargs))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    sample_candidates(problem, model, model, cfg, 0, None, show_progress=False)
    handle.remove()
    loop = best_of(lambda: sample_candidates(problem, model, model, cfg, 0, None, show_progress=False))

    @torch.no_grad()
    def replay() -> None:
        for args, kwargs in calls:
            model(*args, **kwargs)

    return loop, best_of(replay)


def toy_setup():
    from pgraft.apps.toy.model import ToyDenoiser
    from pgraft.apps.toy.train import ToyConfig, make_problem

    cfg = ToyConfig()
    torch.manual_seed(0)
    return make_problem(cfg), ToyDenoiser(**cfg.model_config()).eval()


def molecule_setup():
    from pgraft.apps.molecule.presets import get_preset
    from pgraft.apps.molecule.train import APP, make_problem

    if not APP.ships:
        raise SystemExit(f"no shipped molecule base in {APP.shipped}")
    base = APP.load(APP.shipped)
    return make_problem(base, "qed", get_preset("default").sample_steps), base.model


def main() -> None:
    torch.set_num_threads(1)
    for rule, seconds in grs_timings().items():
        print(f"grs {rule:4s} on 1,000,000 rewards (groups of 8): {seconds:.3f} s")
    ratios = {}
    for name, setup, n in (("toy", toy_setup, 4096), ("molecule", molecule_setup, 512)):
        problem, model = setup()
        loop, raw = sampling_ratio(problem, model, n)
        steps = len(problem.times) - 1
        ratios[name] = raw / loop
        print(f"{name} sampling, {n} x {steps} steps: round loop {loop:.3f} s, raw forward loop {raw:.3f} s, "
              f"ratio {ratios[name]:.2f}")
    print(f"overhead ratio: {ratios['molecule']:.2f}")


if __name__ == "__main__":
    main()
